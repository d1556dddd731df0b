//! `meridian apply -f template.json`: sends an ARM template to a running API as a deployment, waits
//! for it and prints the per-resource status and the outputs.
//!
//! The binary wires it as a subcommand: `Apply(meridian_api::deployments::cli::ApplyArgs)` and calls
//! [`run_apply`].

use std::{path::PathBuf, time::Duration};

use serde_json::{Map, Value, json};

/// Arguments of `meridian apply`.
#[derive(Debug, Clone, clap::Args)]
pub struct ApplyArgs {
    /// The ARM template (JSON). A full deployment body (`{"properties": {"template": …}}`) works too.
    #[arg(short = 'f', long = "file")]
    pub file: PathBuf,
    /// Parameter values as `name=value` (value parsed as JSON when it is valid JSON, else a string).
    #[arg(short = 'p', long = "parameter")]
    pub parameters: Vec<String>,
    /// Base URL of the Meridian API.
    #[arg(long, env = "MERIDIAN_URL", default_value = "https://127.0.0.1:8080")]
    pub url: String,
    /// Bearer token (see `meridian token`).
    #[arg(long, env = "MERIDIAN_TOKEN")]
    pub token: String,
    /// Subscription id to deploy into.
    #[arg(long, env = "MERIDIAN_SUBSCRIPTION")]
    pub subscription: String,
    /// Resource group to deploy into.
    #[arg(long, short = 'g', env = "MERIDIAN_RESOURCE_GROUP")]
    pub resource_group: String,
    /// Deployment name (default: the file name without extension).
    #[arg(long)]
    pub name: Option<String>,
    /// PEM file of the CA that signed the API's certificate (e.g. the one `meridian api` prints).
    #[arg(long, env = "MERIDIAN_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
}

/// Errors of `meridian apply`.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Reading the template or CA file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The template file is not JSON, or a parameter is malformed.
    #[error("{0}")]
    Input(String),
    /// The HTTP exchange failed.
    #[error("request to the API failed: {0}")]
    Http(#[from] reqwest::Error),
    /// The API rejected the deployment (status and ARM error body).
    #[error("the API rejected the deployment ({status}): {body}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Error body.
        body: Value,
    },
    /// The deployment ran and failed.
    #[error("deployment failed: {0}")]
    Failed(Value),
    /// The deployment did not finish in time.
    #[error("deployment still running after {0} s")]
    Timeout(u64),
}

/// Builds the deployment request body from a template file's JSON and `name=value` parameters.
pub fn deployment_body(file_json: Value, parameters: &[String]) -> Result<Value, ApplyError> {
    let mut body = if file_json
        .get("properties")
        .and_then(|p| p.get("template"))
        .is_some()
    {
        file_json
    } else {
        json!({"properties": {"mode": "Incremental", "template": file_json}})
    };
    let props = body["properties"]
        .as_object_mut()
        .ok_or_else(|| ApplyError::Input("'properties' must be an object".into()))?;
    let params = props
        .entry("parameters")
        .or_insert_with(|| Value::Object(Map::new()));
    let params = params
        .as_object_mut()
        .ok_or_else(|| ApplyError::Input("'properties.parameters' must be an object".into()))?;
    for p in parameters {
        let (name, raw) = p
            .split_once('=')
            .ok_or_else(|| ApplyError::Input(format!("parameter '{p}' is not name=value")))?;
        let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
        params.insert(name.to_owned(), json!({ "value": value }));
    }
    Ok(body)
}

fn read(path: &PathBuf) -> Result<Vec<u8>, ApplyError> {
    std::fs::read(path).map_err(|source| ApplyError::Read {
        path: path.clone(),
        source,
    })
}

/// Runs `meridian apply`: PUT the deployment, poll it to a terminal state, print operations and
/// outputs to stdout. Returns the final deployment JSON.
pub async fn run_apply(args: &ApplyArgs) -> Result<Value, ApplyError> {
    // ring is the workspace's one rustls provider; installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let file_json: Value = serde_json::from_slice(&read(&args.file)?)
        .map_err(|e| ApplyError::Input(format!("{} is not JSON: {e}", args.file.display())))?;
    let body = deployment_body(file_json, &args.parameters)?;
    let name = args.name.clone().unwrap_or_else(|| {
        args.file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "deployment".into())
    });
    let mut client = reqwest::Client::builder().timeout(Duration::from_secs(60));
    if let Some(ca) = &args.ca_file {
        let cert = reqwest::Certificate::from_pem(&read(ca)?)?;
        client = client.tls_certs_only([cert]);
    }
    let client = client.build()?;
    let base = args.url.trim_end_matches('/');
    let url = format!(
        "{base}/subscriptions/{}/resourcegroups/{}/providers/Microsoft.Resources/deployments/{name}?api-version=2024-03-01",
        args.subscription, args.resource_group
    );
    let resp = client
        .put(&url)
        .bearer_auth(&args.token)
        .json(&body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    let answer: Value = resp.json().await.unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        return Err(ApplyError::Rejected {
            status,
            body: answer,
        });
    }
    println!("deployment '{name}' accepted; waiting");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let final_state = loop {
        let d: Value = client
            .get(&url)
            .bearer_auth(&args.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        match d["properties"]["provisioningState"].as_str() {
            Some("Succeeded" | "Failed" | "Canceled") => break d,
            _ if tokio::time::Instant::now() > deadline => {
                return Err(ApplyError::Timeout(args.timeout_secs));
            }
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    };
    let ops_url = url.replacen("?api-version", "/operations?api-version", 1);
    let ops: Value = client
        .get(&ops_url)
        .bearer_auth(&args.token)
        .send()
        .await?
        .json()
        .await?;
    for op in ops["value"].as_array().into_iter().flatten() {
        let p = &op["properties"];
        println!(
            "{:<10} {}",
            p["provisioningState"].as_str().unwrap_or("?"),
            p["targetResource"]["id"].as_str().unwrap_or("?")
        );
    }
    if final_state["properties"]["provisioningState"] == "Succeeded" {
        if let Some(outputs) = final_state["properties"].get("outputs") {
            println!(
                "outputs: {}",
                serde_json::to_string_pretty(outputs).unwrap_or_default()
            );
        }
        Ok(final_state)
    } else {
        Err(ApplyError::Failed(
            final_state["properties"]["error"].clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_is_wrapped_and_parameters_parsed() {
        let body = deployment_body(
            json!({"resources": []}),
            &["count=3".into(), "name=ns1".into(), "obj={\"a\":1}".into()],
        )
        .unwrap();
        assert_eq!(body["properties"]["template"], json!({"resources": []}));
        assert_eq!(body["properties"]["parameters"]["count"]["value"], json!(3));
        assert_eq!(
            body["properties"]["parameters"]["name"]["value"],
            json!("ns1")
        );
        assert_eq!(
            body["properties"]["parameters"]["obj"]["value"],
            json!({"a": 1})
        );
        assert!(deployment_body(json!({}), &["novalue".into()]).is_err());
    }

    #[test]
    fn full_deployment_body_is_kept() {
        let full = json!({"properties": {"mode": "Incremental", "template": {"resources": []}, "parameters": {"a": {"value": 1}}}});
        let body = deployment_body(full.clone(), &[]).unwrap();
        assert_eq!(body, full);
    }
}
