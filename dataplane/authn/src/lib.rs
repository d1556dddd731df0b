//! Authentication of MQTT clients by something other than a password or a certificate: this
//! crate owns **token** authentication (JWTs verified by configured public keys or a JWKS URL:
//! the IoT Operations `ServiceAccountToken` method, `K8S-SAT`, and Event Grid style `OAUTH2-JWT`)
//! and **custom** authentication (an HTTPS call to an operator's server that decides).
//!
//! It knows nothing about connections or MQTT packets: the broker hands it the facts of a
//! CONNECT (or of an AUTH re-authentication) and gets back an identity (subject, attributes,
//! when it expires) or a refusal with the MQTT reason code to send. Settings come from the
//! config contract ([`meridian_contract::TokenSettings`], [`meridian_contract::CustomAuthSettings`]).
//!
//! Invariants: every failure refuses (fail closed: an unreachable key source or custom server
//! admits nobody); tokens and passwords are never logged; only asymmetric signatures (RSA, EC,
//! Ed25519) are accepted, never `none` or a shared secret; `exp` and `aud` are required.

mod custom;
mod token;

pub use custom::{CustomAllow, CustomAuthenticator, CustomDenial, CustomRequest, CustomTls};
pub use token::{TokenError, TokenVerifier, VerifiedToken};

/// A method's settings that cannot be used (reported when a snapshot is applied).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A verification key that is not an RSA, EC or Ed25519 public key in PEM.
    #[error("verification key {index}: {message}")]
    Key { index: usize, message: String },
    /// A URL that does not parse or uses a scheme that is not allowed.
    #[error("{field} {url:?}: {message}")]
    Url {
        field: &'static str,
        url: String,
        message: String,
    },
    /// A CA bundle or header that cannot be used.
    #[error("{0}")]
    Invalid(String),
}

/// `http://` is accepted only for loopback hosts (tests, sidecars); anything else needs TLS.
fn checked_url(field: &'static str, url: &str) -> Result<reqwest::Url, ConfigError> {
    let bad = |message: &str| ConfigError::Url {
        field,
        url: url.to_owned(),
        message: message.to_owned(),
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" => {
            let host = parsed.host_str().unwrap_or_default();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(parsed)
            } else {
                Err(bad("must be https:// (http:// only for loopback hosts)"))
            }
        }
        _ => Err(bad("must be https://")),
    }
}

/// Seconds since the Unix epoch.
fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_only_for_loopback() {
        assert!(checked_url("jwksUrl", "https://login.example.com/keys").is_ok());
        assert!(checked_url("jwksUrl", "http://127.0.0.1:8080/keys").is_ok());
        assert!(checked_url("jwksUrl", "http://localhost/keys").is_ok());
        assert!(checked_url("jwksUrl", "http://[::1]:9/keys").is_ok());
        let e = checked_url("jwksUrl", "http://keys.example.com/").unwrap_err();
        assert!(e.to_string().contains("https"), "{e}");
        assert!(checked_url("endpoint", "ftp://127.0.0.1/").is_err());
        assert!(checked_url("endpoint", "not a url").is_err());
    }
}
