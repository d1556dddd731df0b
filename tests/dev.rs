//! `meridian dev` as a user meets it: one process, and a broker listener resource PUT to its
//! control plane opens a port on its in-process node (the same config contract as remote nodes).

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{free_port, meridian};
use serde_json::{Value, json};

struct Dev {
    child: std::process::Child,
    base_url: String,
    token: String,
    ca: String,
    broker_id: String,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_dev(dir: &std::path::Path) -> Dev {
    let mut child = meridian()
        .arg("dev")
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--mqtt-listen",
            &format!("mqtt://127.0.0.1:{}", free_port()),
        ])
        .args(["--broker-admin", &format!("127.0.0.1:{}", free_port())])
        .args(["--api-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--subscription", "11111111-2222-3333-4444-555555555555"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("meridian dev starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut base_url, mut token, mut ca, mut broker_id) = (None, None, None, None);
    let field = |line: &str, label: &str| {
        line.trim().strip_prefix(label).map(|rest| {
            rest.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
    };
    for line in lines.by_ref() {
        let line = line.expect("stdout");
        base_url = base_url.or_else(|| field(&line, "control plane:"));
        token = token.or_else(|| field(&line, "Owner token:"));
        ca = ca.or_else(|| field(&line, "CA certificate:"));
        broker_id = broker_id.or_else(|| field(&line, "broker resource:"));
        if token.is_some() && broker_id.is_some() {
            break;
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Dev {
        child,
        base_url: base_url.expect("control plane URL printed"),
        token: token.expect("Owner token printed"),
        ca: ca.expect("CA certificate printed"),
        broker_id: broker_id.expect("broker resource printed"),
    }
}

#[tokio::test]
async fn dev_applies_a_broker_listener_resource_to_its_in_process_node() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path());
    let http = reqwest::Client::builder()
        .tls_certs_only(
            reqwest::Certificate::from_pem_bundle(&std::fs::read(&dev.ca).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let broker = dev.broker_id.clone();
    let instance = broker.rsplit_once("/brokers/").unwrap().0.to_owned();
    let rg = instance.split("/providers/").next().unwrap().to_owned();
    let cl = json!({"name": format!("{rg}/providers/Microsoft.ExtendedLocation/customLocations/edge"), "type": "CustomLocation"});
    let put = |id: String, body: Value| {
        let http = http.clone();
        let url = format!("{}{id}?api-version=2024-11-01", dev.base_url);
        let token = dev.token.clone();
        async move {
            let r = http
                .put(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(
                r.status().is_success(),
                "PUT {id}: {} {}",
                r.status(),
                r.text().await.unwrap()
            );
        }
    };
    put(instance.clone(), json!({"location": "westeurope", "extendedLocation": cl, "properties": {
        "schemaRegistryRef": {"resourceId": format!("{rg}/providers/Microsoft.DeviceRegistry/schemaRegistries/sr")}}})).await;
    put(
        broker.clone(),
        json!({"extendedLocation": cl, "properties": {}}),
    )
    .await;
    let port = free_port();
    let listener = format!("{broker}/listeners/local");
    put(
        listener.clone(),
        json!({"extendedLocation": cl, "properties": {"ports": [{"port": port}]}}),
    )
    .await;

    // provisioningState turns Succeeded once the in-process node applied it, and the port serves MQTT.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r: Value = http
            .get(format!("{}{listener}?api-version=2024-11-01", dev.base_url))
            .bearer_auth(&dev.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let state = r["properties"]["provisioningState"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if state == "Succeeded" {
            break;
        }
        assert_ne!(state, "Failed", "{r}");
        assert!(Instant::now() < deadline, "listener still {state}: {r}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("the listener's port is open");
    // A minimal MQTT 3.1.1 CONNECT; CONNACK 0x20 0x02 0x00 0x00 = accepted (no authentication on the port).
    use std::io::{Read, Write};
    stream
        .write_all(&[
            0x10, 0x0F, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 3, b'd', b'e', b'v',
        ])
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut ack = [0u8; 4];
    stream.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);

    // The node is listed by the control plane as the broker's in-process node.
    let nodes: Value = http
        .get(format!("{}/meridian/nodes", dev.base_url))
        .bearer_auth(&dev.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let dev_node = nodes["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["nodeId"] == "dev");
    assert!(dev_node.is_some(), "{nodes}");
}

/// `meridian authz explain` against the control plane of `meridian dev`: exit 0 with ALLOW and
/// the deciding rule, 1 with DENY, 2 with the ARM error for a broker that does not exist.
#[tokio::test]
async fn authz_explain_cli_answers_allow_deny_and_errors() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let dev = start_dev(dir.path());
    let http = reqwest::Client::builder()
        .tls_certs_only(
            reqwest::Certificate::from_pem_bundle(&std::fs::read(&dev.ca).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let broker = dev.broker_id.clone();
    let instance = broker.rsplit_once("/brokers/").unwrap().0.to_owned();
    let rg = instance.split("/providers/").next().unwrap().to_owned();
    let cl = json!({"name": format!("{rg}/providers/Microsoft.ExtendedLocation/customLocations/edge"), "type": "CustomLocation"});
    for (id, body) in [
        (
            instance.clone(),
            json!({"location": "westeurope", "extendedLocation": cl, "properties": {
            "schemaRegistryRef": {"resourceId": format!("{rg}/providers/Microsoft.DeviceRegistry/schemaRegistries/sr")}}}),
        ),
        (
            broker.clone(),
            json!({"extendedLocation": cl, "properties": {}}),
        ),
        (
            format!("{broker}/authorizations/plant"),
            json!({"extendedLocation": cl, "properties": {"authorizationPolicies": {"rules": [
            {"principals": {"attributes": [{"site": "plant-1"}]},
             "brokerResources": [{"method": "Connect"}, {"method": "Publish", "topics": ["site/{principal.attributes.site}/#"]}]}]}}}),
        ),
    ] {
        let r = http
            .put(format!("{}{id}?api-version=2024-11-01", dev.base_url))
            .bearer_auth(&dev.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "PUT {id}: {}",
            r.text().await.unwrap()
        );
    }
    let explain = |extra: &[&str], broker: &str| {
        let out = meridian()
            .args([
                "authz",
                "explain",
                "--url",
                &dev.base_url,
                "--token",
                &dev.token,
                "--ca-file",
                &dev.ca,
            ])
            .args([
                "--broker",
                broker,
                "--client-id",
                "pump-7",
                "--attr",
                "site=plant-1",
            ])
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = explain(&["--publish", "site/plant-1/temp"], &broker);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("ALLOW Publish site/plant-1/temp"), "{out}");
    assert!(
        out.contains("plant"),
        "names the deciding authorization: {out}"
    );
    let (code, out, _) = explain(&["--publish", "site/plant-2/temp"], &broker);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("DENY"), "{out}");
    let (code, out, _) = explain(&["--publish", "site/plant-1/t", "--json"], &broker);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).expect("--json prints the answer");
    assert_eq!(v["allowed"], true);
    let (code, _, err) = explain(&["--connect"], &format!("{instance}/brokers/absent"));
    assert_eq!(code, Some(2));
    assert!(err.contains("ResourceNotFound"), "{err}");
    let (code, _, err) = explain(&[], &broker);
    assert_eq!(code, Some(2), "no question asked");
    assert!(err.contains("--publish"), "{err}");
}
