//! Custom authentication: the node asks an operator's HTTPS server whether to admit a client.
//!
//! The wire protocol (documented in docs/broker.md, "Custom authentication"):
//! `POST {endpoint}` with the resource's headers and a JSON [`CustomRequest`]; the server answers
//! `200` with `{"result": "allow", "attributes": {..}, "expiresAt": <unix seconds>}` or
//! `{"result": "deny", "reasonCode": 134|135|138|140, "reason": ".."}`. `401` means bad
//! credentials (0x86), `403` not authorized (0x87); anything else, an unreadable answer or no
//! answer within the timeout refuses the client with 0x88 Server unavailable (fail closed).

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use meridian_contract::CustomAuthSettings;
use serde::{Deserialize, Serialize};

use crate::{ConfigError, checked_url};

/// MQTT reason codes the custom server may ask for (others become 0x87).
const ALLOWED_DENIAL_CODES: [u8; 4] = [0x86, 0x87, 0x8A, 0x8C];

/// What the node tells the custom server about a client. `Debug` leaves the secrets out.
#[derive(Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomRequest {
    /// `connect` or `reauthenticate` (an MQTT 5 AUTH with reason 0x19).
    pub event: &'static str,
    pub client_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The CONNECT password, base64.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "b64")]
    pub password: Option<Vec<u8>>,
    /// MQTT 5 Authentication Method, when the client used enhanced authentication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication_method: Option<String>,
    /// MQTT 5 Authentication Data, base64.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "b64")]
    pub authentication_data: Option<Vec<u8>>,
    /// 4 (3.1.1) or 5.
    pub protocol_version: u8,
    pub remote_address: String,
    /// The listener port the client connected to.
    pub listener_port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<CustomTls>,
}

impl std::fmt::Debug for CustomRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomRequest")
            .field("event", &self.event)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("authentication_method", &self.authentication_method)
            .field("protocol_version", &self.protocol_version)
            .field("remote_address", &self.remote_address)
            .finish_non_exhaustive()
    }
}

/// TLS facts of the connection.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomTls {
    /// SNI the client sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// The client's certificate chain (leaf first), PEM, as verified by the listener (if it
    /// verifies client certificates) or as presented.
    pub client_certificates: Vec<String>,
}

impl CustomTls {
    /// From the SNI and a DER certificate chain (leaf first).
    pub fn new(server_name: Option<String>, chain_der: &[Vec<u8>]) -> CustomTls {
        let engine = base64::engine::general_purpose::STANDARD;
        let client_certificates = chain_der
            .iter()
            .map(|der| {
                let b64 = engine.encode(der);
                let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
                for line in b64.as_bytes().chunks(64) {
                    pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
                    pem.push('\n');
                }
                pem.push_str("-----END CERTIFICATE-----\n");
                pem
            })
            .collect();
        CustomTls {
            server_name,
            client_certificates,
        }
    }
}

fn b64<S: serde::Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(b) => s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b)),
        None => s.serialize_none(),
    }
}

/// The server admitted the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustomAllow {
    /// Attributes for authorization rules (`{principal.attributes.X}`).
    pub attributes: BTreeMap<String, String>,
    /// When the admission ends (unix seconds): the client must re-authenticate by then.
    pub expires_at: Option<u64>,
}

/// The server refused the client, or could not be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomDenial {
    /// The MQTT reason code for CONNACK (or DISCONNECT on re-authentication).
    pub reason_code: u8,
    /// Why (safe to log and to send as a reason string).
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    result: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
    #[serde(default)]
    expires_at: Option<u64>,
    #[serde(default)]
    reason_code: Option<u8>,
    #[serde(default)]
    reason: Option<String>,
}

/// A client for one `Custom` method.
#[derive(Debug)]
pub struct CustomAuthenticator {
    endpoint: reqwest::Url,
    headers: reqwest::header::HeaderMap,
    http: reqwest::Client,
    timeout: Duration,
}

impl CustomAuthenticator {
    /// Checks the settings and builds the HTTPS client (trusting only `caCertPem` when set).
    pub fn new(settings: &CustomAuthSettings) -> Result<Self, ConfigError> {
        let endpoint = checked_url("endpoint", &settings.endpoint)?;
        let mut headers = reqwest::header::HeaderMap::new();
        for (k, v) in &settings.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| ConfigError::Invalid(format!("header {k:?}: {e}")))?;
            let mut value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|e| ConfigError::Invalid(format!("header {k:?}: {e}")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let timeout = Duration::from_secs(u64::from(settings.timeout_seconds.max(1)));
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout);
        if let Some(pem) = &settings.ca_cert_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| ConfigError::Invalid(format!("caCertPem: {e}")))?;
            if certs.is_empty() {
                return Err(ConfigError::Invalid("caCertPem: no PEM certificate".into()));
            }
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .map_err(|e| ConfigError::Invalid(format!("HTTP client: {e}")))?;
        Ok(CustomAuthenticator {
            endpoint,
            headers,
            http,
            timeout,
        })
    }

    /// The server's URL.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    /// Asks the server about one client.
    pub async fn authenticate(&self, req: &CustomRequest) -> Result<CustomAllow, CustomDenial> {
        let unavailable = |why: String| CustomDenial {
            reason_code: 0x88,
            reason: why,
        };
        let sent = self
            .http
            .post(self.endpoint.clone())
            .headers(self.headers.clone())
            .json(req)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(unavailable(format!(
                    "custom authentication server did not answer within {} s",
                    self.timeout.as_secs()
                )));
            }
            Err(e) => {
                return Err(unavailable(format!(
                    "custom authentication server unreachable: {}",
                    error_chain(&e)
                )));
            }
        };
        let status = resp.status();
        match status.as_u16() {
            200 => {}
            401 => {
                return Err(CustomDenial {
                    reason_code: 0x86,
                    reason: "custom authentication: bad credentials".into(),
                });
            }
            403 => {
                return Err(CustomDenial {
                    reason_code: 0x87,
                    reason: "custom authentication: not authorized".into(),
                });
            }
            _ => {
                return Err(unavailable(format!(
                    "custom authentication server answered HTTP {status}"
                )));
            }
        }
        let answer: Answer = match resp.json().await {
            Ok(a) => a,
            Err(e) => {
                return Err(unavailable(format!(
                    "custom authentication server sent an unreadable answer: {e}"
                )));
            }
        };
        match answer.result.as_str() {
            "allow" => Ok(CustomAllow {
                attributes: answer.attributes,
                expires_at: answer.expires_at,
            }),
            "deny" => Err(CustomDenial {
                reason_code: answer
                    .reason_code
                    .filter(|c| ALLOWED_DENIAL_CODES.contains(c))
                    .unwrap_or(0x87),
                reason: answer
                    .reason
                    .unwrap_or_else(|| "refused by custom authentication".into()),
            }),
            other => Err(unavailable(format!(
                "custom authentication server answered result {other:?} (expected allow or deny)"
            ))),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
