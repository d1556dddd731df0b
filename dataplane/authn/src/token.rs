//! JWT verification: configured PEM keys and/or a JWKS URL, audience, issuer and expiry.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use meridian_contract::TokenSettings;
use parking_lot::RwLock;

use crate::{ConfigError, checked_url, now_unix};

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 5;
/// A JWKS is fetched again after this long, to pick up rotated keys.
const JWKS_TTL: Duration = Duration::from_secs(600);
/// A token naming an unknown key makes the JWKS be fetched again, at most this often.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(10);
/// Bound on one JWKS fetch.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// Registered claims that say nothing about who the client is; they do not become attributes.
const NOT_ATTRIBUTES: [&str; 5] = ["exp", "nbf", "iat", "aud", "jti"];
/// The standard claims Event Grid leaves out of a token client's attributes (Event Grid
/// documentation, "Authenticate with namespaces using JSON Web Tokens").
const EVENT_GRID_NOT_ATTRIBUTES: [&str; 5] = ["iss", "sub", "aud", "exp", "nbf"];

/// Why a token was refused. The `Display` text is safe to log and to send as a reason string:
/// it never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWT, or an algorithm that is not accepted.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// No configured or published key can check this token's signature.
    #[error("no verification key for this token{}", .0.as_deref().map(|k| format!(" (kid {k:?})")).unwrap_or_default())]
    UnknownKey(Option<String>),
    /// The signature does not verify with any candidate key.
    #[error("invalid token signature")]
    BadSignature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// A claim check failed (audience, issuer, not-before, a required claim).
    #[error("token rejected: {0}")]
    Claims(String),
    /// The JWKS could not be fetched or read (fail closed).
    #[error("verification keys unavailable: {0}")]
    KeySource(String),
}

/// Who a verified token says the client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// The `sub` claim.
    pub subject: Option<String>,
    /// The `exp` claim (seconds since the Unix epoch): the connection must re-authenticate by then.
    pub expires_at: u64,
    /// The other claims as attributes: strings as they are, numbers and booleans as text, nested
    /// objects flattened with `.` (`kubernetes.io.namespace`); arrays and the registered claims
    /// `exp`, `nbf`, `iat`, `aud`, `jti` are left out.
    pub attributes: BTreeMap<String, String>,
    /// Every claim as the token carried it.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl VerifiedToken {
    /// The claims as Event Grid client attributes: the claims that are 32-bit integers, strings
    /// or arrays of strings, except `iss`, `sub`, `aud`, `exp` and `nbf`; claims of other types
    /// (floats, booleans, objects, arrays of anything else) are left out, as Event Grid does.
    pub fn event_grid_attributes(&self) -> BTreeMap<String, serde_json::Value> {
        use serde_json::Value as V;
        self.claims
            .iter()
            .filter(|(k, _)| !EVENT_GRID_NOT_ATTRIBUTES.contains(&k.as_str()))
            .filter(|(_, v)| match v {
                V::String(_) => true,
                V::Number(n) => n.as_i64().is_some_and(|i| i32::try_from(i).is_ok()),
                V::Array(items) => items.iter().all(V::is_string),
                _ => false,
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Which `aud` values a verifier accepts.
#[derive(Debug)]
enum Audience {
    /// At least one of these, exactly.
    OneOf(Vec<String>),
    /// A host name of this Event Grid namespace: `<namespace>.<any domain>` (first DNS label
    /// equal ignoring ASCII case, at least two labels), optionally as an `https://` URL.
    NamespaceHost(String),
}

impl Audience {
    fn accepts_namespace_host(namespace: &str, aud: &str) -> bool {
        let host = aud.strip_prefix("https://").unwrap_or(aud);
        let host = host.split('/').next().unwrap_or_default();
        let mut labels = host.split('.');
        labels
            .next()
            .is_some_and(|first| first.eq_ignore_ascii_case(namespace))
            && labels.next().is_some_and(|l| !l.is_empty())
    }
}

struct Key {
    kid: Option<String>,
    key: DecodingKey,
}

struct JwksCache {
    keys: Vec<Key>,
    fetched: Option<Instant>,
    last_attempt: Option<Instant>,
}

struct Jwks {
    url: reqwest::Url,
    http: reqwest::Client,
    cache: RwLock<JwksCache>,
    /// One fetch at a time; others wait for its result.
    fetching: tokio::sync::Mutex<()>,
}

/// Verifies the JWTs of one token method.
pub struct TokenVerifier {
    audience: Audience,
    issuer: Option<String>,
    /// Event Grid also requires `nbf` and `sub`.
    event_grid: bool,
    keys: Vec<Key>,
    jwks: Option<Jwks>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .field("keys", &self.keys.len())
            .field("jwks", &self.jwks.as_ref().map(|j| j.url.as_str()))
            .finish()
    }
}

/// The public key of an X.509 certificate (PEM), as a verification key.
fn certificate_key(index: usize, pem: &str) -> Result<DecodingKey, ConfigError> {
    use base64::Engine as _;
    let bad = |message: String| ConfigError::Key { index, message };
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.trim().as_bytes())
        .map_err(|e| bad(format!("not a PEM certificate ({e})")))?;
    let cert = block
        .parse_x509()
        .map_err(|e| bad(format!("not an X.509 certificate ({e})")))?;
    let spki = base64::engine::general_purpose::STANDARD.encode(cert.public_key().raw);
    let mut key_pem = String::from("-----BEGIN PUBLIC KEY-----\n");
    for chunk in spki.as_bytes().chunks(64) {
        key_pem.push_str(&String::from_utf8_lossy(chunk));
        key_pem.push('\n');
    }
    key_pem.push_str("-----END PUBLIC KEY-----\n");
    parse_key(index, &key_pem)
}

/// Parses one PEM public key (RSA, EC P-256/P-384 or Ed25519, SPKI or PKCS#1).
pub(crate) fn parse_key(index: usize, pem: &str) -> Result<DecodingKey, ConfigError> {
    let bytes = pem.trim().as_bytes();
    DecodingKey::from_rsa_pem(bytes)
        .or_else(|_| DecodingKey::from_ec_pem(bytes))
        .or_else(|_| DecodingKey::from_ed_pem(bytes))
        .map_err(|e| ConfigError::Key {
            index,
            message: format!("not an RSA, EC or Ed25519 public key in PEM ({e})"),
        })
}

impl TokenVerifier {
    /// A verifier for `settings`. `node_keys` (PEM) are the node's own configured keys, used
    /// when the settings carry neither keys nor a JWKS URL (the resources carry no keys).
    pub fn new(settings: &TokenSettings, node_keys: &[String]) -> Result<Self, ConfigError> {
        let pems: &[String] = if settings.keys_pem.is_empty() && settings.jwks_url.is_none() {
            node_keys
        } else {
            &settings.keys_pem
        };
        let keys = pems
            .iter()
            .enumerate()
            .map(|(i, pem)| {
                Ok(Key {
                    kid: None,
                    key: parse_key(i, pem)?,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let jwks = match &settings.jwks_url {
            None => None,
            Some(url) => {
                let url = checked_url("jwksUrl", url)?;
                let http = reqwest::Client::builder()
                    .timeout(JWKS_TIMEOUT)
                    .build()
                    .map_err(|e| ConfigError::Invalid(format!("JWKS HTTP client: {e}")))?;
                Some(Jwks {
                    url,
                    http,
                    cache: RwLock::new(JwksCache {
                        keys: Vec::new(),
                        fetched: None,
                        last_attempt: None,
                    }),
                    fetching: tokio::sync::Mutex::new(()),
                })
            }
        };
        Ok(TokenVerifier {
            audience: Audience::OneOf(settings.audiences.clone()),
            issuer: settings.issuer.clone(),
            event_grid: false,
            keys,
            jwks,
        })
    }

    /// The verifier of an Event Grid namespace's custom JWT authentication: `iss` must be the
    /// settings' `tokenIssuer`; signatures are checked with the public keys of its issuer
    /// certificates (a token naming a `kid` only with the certificate of that `kid`); `aud` must
    /// name a host of the namespace, `<namespace>.<domain>`; `exp`, `nbf` and `sub` are required.
    pub fn for_event_grid_namespace(
        namespace: &str,
        settings: &meridian_contract::CustomJwtAuthentication,
    ) -> Result<Self, ConfigError> {
        let keys = settings
            .issuer_certificates
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Ok(Key {
                    kid: c.kid.clone().filter(|k| !k.is_empty()),
                    key: certificate_key(i, &c.pem())?,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        if keys.is_empty() {
            return Err(ConfigError::Invalid(
                "customJwtAuthentication has no issuer certificate".into(),
            ));
        }
        Ok(TokenVerifier {
            audience: Audience::NamespaceHost(namespace.to_owned()),
            issuer: Some(settings.token_issuer.clone()),
            event_grid: true,
            keys,
            jwks: None,
        })
    }

    /// Whether this verifier can ever accept a token (it has keys or a key source).
    pub fn has_key_source(&self) -> bool {
        !self.keys.is_empty() || self.jwks.is_some()
    }

    /// Whether keys come (also) from a JWKS URL.
    pub fn has_jwks(&self) -> bool {
        self.jwks.is_some()
    }

    /// Verifies `token`, fetching the JWKS when it is stale or does not know the token's key.
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        if let Some(j) = &self.jwks {
            let stale = j
                .cache
                .read()
                .fetched
                .is_none_or(|t| t.elapsed() > JWKS_TTL);
            if stale {
                // A failure here is not final: configured keys may still verify the token, and
                // an unknown key reports the fetch error below.
                let _ = self.refresh(j, false).await;
            }
        }
        match self.verify_cached(token) {
            Err(TokenError::UnknownKey(kid)) if self.jwks.is_some() => {
                let j = self.jwks.as_ref().expect("checked");
                if self.refresh(j, true).await? {
                    self.verify_cached(token)
                } else {
                    Err(TokenError::UnknownKey(kid))
                }
            }
            other => other,
        }
    }

    /// Fetches the JWKS; `Ok(false)` when a recent fetch makes another one pointless.
    async fn refresh(&self, j: &Jwks, because_unknown_key: bool) -> Result<bool, TokenError> {
        let _one = j.fetching.lock().await;
        {
            let c = j.cache.read();
            if let Some(t) = c.last_attempt
                && t.elapsed() < JWKS_MIN_REFRESH
            {
                // Someone fetched meanwhile (or failed very recently).
                return if c.fetched.is_some() {
                    Ok(!because_unknown_key)
                } else {
                    Err(TokenError::KeySource(
                        "the last JWKS fetch failed; retrying in a few seconds".into(),
                    ))
                };
            }
        }
        j.cache.write().last_attempt = Some(Instant::now());
        let set = async {
            j.http
                .get(j.url.clone())
                .send()
                .await?
                .error_for_status()?
                .json::<JwkSet>()
                .await
        }
        .await;
        let set = match set {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(url = %j.url, error = %e, "JWKS fetch failed");
                return Err(TokenError::KeySource(format!("JWKS {}: {e}", j.url)));
            }
        };
        let keys: Vec<Key> = set
            .keys
            .iter()
            .filter_map(|jwk| {
                let key = DecodingKey::from_jwk(jwk).ok()?;
                (key.family() != jsonwebtoken::AlgorithmFamily::Hmac).then(|| Key {
                    kid: jwk.common.key_id.clone(),
                    key,
                })
            })
            .collect();
        tracing::debug!(url = %j.url, keys = keys.len(), "JWKS fetched");
        let mut c = j.cache.write();
        c.keys = keys;
        c.fetched = Some(Instant::now());
        Ok(true)
    }

    /// Verifies `token` with the configured keys and the JWKS as last fetched (no I/O).
    pub fn verify_cached(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| TokenError::Malformed(e.to_string()))?;
        if header.alg.family() == jsonwebtoken::AlgorithmFamily::Hmac {
            return Err(TokenError::Malformed(format!(
                "algorithm {:?} is not accepted (only RSA, EC and EdDSA signatures)",
                header.alg
            )));
        }
        let validation = self.validation(header.alg);
        let cached = self.jwks.as_ref().map(|j| j.cache.read());
        let published = cached.as_ref().map_or(&[][..], |c| c.keys.as_slice());
        let kid = header.kid.as_deref();
        // A token naming a key is checked with the keys of that kid only (or, when no key has
        // it, with the keys that have no kid); one without a kid with every key of its
        // algorithm's family.
        let named = kid.is_some_and(|want| {
            self.keys
                .iter()
                .chain(published)
                .any(|k| k.kid.as_deref() == Some(want))
        });
        let candidates = self
            .keys
            .iter()
            .chain(published)
            .filter(|k| k.key.family() == header.alg.family())
            .filter(|k| match (kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => !named,
                (None, _) => true,
            });
        let mut last = None;
        for k in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &k.key,
                &validation,
            ) {
                Ok(data) => {
                    self.check_audience(&data.claims)?;
                    return Ok(identity(data.claims));
                }
                Err(e) => {
                    let e = classify(e);
                    if e != TokenError::BadSignature {
                        // The signature verified (or the token is unusable whatever the key).
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| TokenError::UnknownKey(kid.map(str::to_owned))))
    }

    /// The audience rules `jsonwebtoken` cannot express (checked after the signature).
    fn check_audience(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), TokenError> {
        let Audience::NamespaceHost(ns) = &self.audience else {
            return Ok(());
        };
        let ok = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => Audience::accepts_namespace_host(ns, a),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(serde_json::Value::as_str)
                .any(|a| Audience::accepts_namespace_host(ns, a)),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(TokenError::Claims(format!(
                "audience not accepted (must name a host of namespace {ns:?}: {ns}.<domain>)"
            )))
        }
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY_SECONDS;
        v.validate_nbf = true;
        match &self.audience {
            // With no audience configured no token can match (fail closed; `validate` in the
            // contract refuses such a method anyway).
            Audience::OneOf(list) if list.is_empty() => v.set_audience(&[String::new()]),
            Audience::OneOf(list) => v.set_audience(list),
            Audience::NamespaceHost(_) => v.validate_aud = false,
        }
        let mut required = vec!["exp", "aud"];
        if self.event_grid {
            required.extend(["nbf", "sub"]);
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        v
    }
}

fn classify(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => TokenError::BadSignature,
        K::ExpiredSignature => TokenError::Expired,
        K::InvalidAudience => TokenError::Claims("audience not accepted".into()),
        K::InvalidIssuer => TokenError::Claims("issuer not accepted".into()),
        K::ImmatureSignature => TokenError::Claims("token not valid yet (nbf)".into()),
        K::MissingRequiredClaim(c) => TokenError::Claims(format!("missing claim {c:?}")),
        K::InvalidAlgorithm | K::InvalidAlgorithmName => {
            TokenError::Malformed("algorithm does not match the key".into())
        }
        _ => TokenError::Malformed(e.to_string()),
    }
}

fn identity(claims: serde_json::Map<String, serde_json::Value>) -> VerifiedToken {
    let expires_at = claims
        .get("exp")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(now_unix);
    let subject = claims
        .get("sub")
        .and_then(serde_json::Value::as_str)
        .map(str::to_owned);
    let mut attributes = BTreeMap::new();
    for (k, v) in &claims {
        if !NOT_ATTRIBUTES.contains(&k.as_str()) {
            flatten(k, v, 0, &mut attributes);
        }
    }
    VerifiedToken {
        subject,
        expires_at,
        attributes,
        claims,
    }
}

fn flatten(key: &str, v: &serde_json::Value, depth: usize, out: &mut BTreeMap<String, String>) {
    use serde_json::Value as V;
    match v {
        V::String(s) => {
            out.insert(key.to_owned(), s.clone());
        }
        V::Number(n) => {
            out.insert(key.to_owned(), n.to_string());
        }
        V::Bool(b) => {
            out.insert(key.to_owned(), b.to_string());
        }
        V::Object(m) if depth < 4 => {
            for (k, v) in m {
                flatten(&format!("{key}.{k}"), v, depth + 1, out);
            }
        }
        _ => {}
    }
}
