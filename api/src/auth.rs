//! Access control: bearer JWT verification and ARM-style role checks.
//!
//! Tokens are verified with jsonwebtoken (HS256 secret, RS256/ES256 PEM public keys, or keys from
//! a JWKS URL fetched at start); issuer, audience and expiry are always checked. Roles come from
//! the token's `roles` claim (`[{"role":"Owner","scope":"/subscriptions/…"}]`) and from
//! `Microsoft.Authorization/roleAssignments` resources whose `principalId` is the token's subject.
//! Reader may GET; Contributor may also write; Owner may also manage role assignments.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::JwkSet};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    engine::registry::{NameRule, ResourceTypeDecl, ValidationError},
    error::ApiError,
};

/// A built-in role, ordered by power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
pub enum Role {
    /// GET only.
    Reader,
    /// Reads and writes resources.
    Contributor,
    /// Writes and manages role assignments.
    Owner,
}

impl Role {
    /// Parses `Owner`, a role definition GUID or a `…/roleDefinitions/{guid-or-name}` id.
    pub fn parse(s: &str) -> Option<Self> {
        let last = s.rsplit('/').next().unwrap_or(s);
        match last.to_ascii_lowercase().as_str() {
            "reader" | "acdd72a7-3385-48ef-bd42-f606fba81ae7" => Some(Self::Reader),
            "contributor" | "b24988ac-6180-42a0-ab88-20f7382dd24c" => Some(Self::Contributor),
            "owner" | "8e3af657-a8ff-443c-a75c-2fe8c4bcb635" => Some(Self::Owner),
            _ => None,
        }
    }
}

/// One role grant at a scope (`/subscriptions/{s}` or `/subscriptions/{s}/resourceGroups/{rg}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleGrant {
    /// The role.
    pub role: Role,
    /// The scope it applies to.
    pub scope: String,
}

impl RoleGrant {
    /// Does this grant cover `subscription` / `resource_group`?
    pub fn covers(&self, subscription: &str, resource_group: Option<&str>) -> bool {
        let segs: Vec<&str> = self.scope.trim_matches('/').split('/').collect();
        match segs.as_slice() {
            ["subscriptions", s] => s.eq_ignore_ascii_case(subscription),
            ["subscriptions", s, rgs, rg] if rgs.eq_ignore_ascii_case("resourceGroups") => {
                s.eq_ignore_ascii_case(subscription)
                    && resource_group.is_some_and(|r| r.eq_ignore_ascii_case(rg))
            }
            _ => false,
        }
    }
}

/// The claims Meridian reads and mints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Subject (principal id).
    pub sub: String,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
    /// Issued at.
    #[serde(default)]
    pub iat: u64,
    /// Role grants carried by the token.
    #[serde(default)]
    pub roles: Vec<RoleGrant>,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Token subject.
    pub subject: String,
    /// Grants from the token.
    pub grants: Vec<RoleGrant>,
}

/// Token verification settings.
#[derive(Clone)]
pub struct Authenticator {
    keys: Vec<(Algorithm, DecodingKey, Option<String>)>,
    issuer: String,
    audience: String,
    hs_secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// Errors building an [`Authenticator`] or minting a token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A key could not be parsed.
    #[error("invalid key {0}: {1}")]
    Key(String, jsonwebtoken::errors::Error),
    /// Key file I/O.
    #[error("reading {0}: {1}")]
    Io(String, std::io::Error),
    /// JWKS fetch failed.
    #[error("fetching JWKS {0}: {1}")]
    Jwks(String, String),
    /// Signing failed.
    #[error("signing: {0}")]
    Sign(jsonwebtoken::errors::Error),
    /// No HS256 secret to mint with.
    #[error("no HS256 secret configured; tokens can only be minted with the shared secret")]
    NoSecret,
}

impl Authenticator {
    /// Verifies tokens for `issuer` / `audience`, with no keys yet.
    pub fn new(issuer: &str, audience: &str) -> Self {
        Self {
            keys: Vec::new(),
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            hs_secret: None,
        }
    }

    /// Accepts HS256 tokens signed with `secret` (and lets [`Self::mint`] sign with it).
    pub fn with_hs256_secret(mut self, secret: &[u8]) -> Self {
        self.keys
            .push((Algorithm::HS256, DecodingKey::from_secret(secret), None));
        self.hs_secret = Some(secret.to_vec());
        self
    }

    /// Accepts RS256 or ES256 tokens verified with a PEM public key (algorithm from the key).
    pub fn with_public_key_pem(mut self, pem: &[u8]) -> Result<Self, AuthError> {
        let text = String::from_utf8_lossy(pem);
        if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
            self.keys.push((Algorithm::RS256, k, None));
        } else {
            let k = DecodingKey::from_ec_pem(pem)
                .map_err(|e| AuthError::Key(text.lines().next().unwrap_or("").into(), e))?;
            self.keys.push((Algorithm::ES256, k, None));
        }
        Ok(self)
    }

    /// Adds the RS256/ES256 keys of a JWKS document.
    pub fn with_jwks(mut self, jwks: &JwkSet) -> Result<Self, AuthError> {
        for jwk in &jwks.keys {
            let alg = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                _ => continue,
            };
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|e| AuthError::Key(format!("{:?}", jwk.common.key_id), e))?;
            self.keys.push((alg, key, jwk.common.key_id.clone()));
        }
        Ok(self)
    }

    /// Fetches a JWKS URL and adds its keys.
    pub async fn with_jwks_url(self, url: &str) -> Result<Self, AuthError> {
        crate::tls::install_crypto_provider();
        let fetch = async {
            let set: JwkSet = reqwest::get(url)
                .await
                .map_err(|e| e.to_string())?
                .error_for_status()
                .map_err(|e| e.to_string())?
                .json()
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(set)
        };
        let set = fetch.await.map_err(|e| AuthError::Jwks(url.into(), e))?;
        self.with_jwks(&set)
    }

    /// Verifies a bearer token.
    pub fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let invalid = |m: String| ApiError::unauthorized("InvalidAuthenticationToken", m);
        // jsonwebtoken has no `none` algorithm: such headers fail here, before any key is tried.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| invalid(format!("The access token is malformed: {e}.")))?;
        let mut last = None;
        for (alg, key, kid) in &self.keys {
            if *alg != header.alg {
                continue;
            }
            if let (Some(want), Some(have)) = (&header.kid, kid)
                && want != have
            {
                continue;
            }
            let mut v = Validation::new(*alg);
            v.set_issuer(&[&self.issuer]);
            v.set_audience(&[&self.audience]);
            v.leeway = 30;
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            match jsonwebtoken::decode::<Claims>(token, key, &v) {
                Ok(data) => {
                    return Ok(Principal {
                        subject: data.claims.sub,
                        grants: data.claims.roles,
                    });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last.map(|e| e.into_kind()) {
            Some(jsonwebtoken::errors::ErrorKind::ExpiredSignature) => ApiError::unauthorized(
                "ExpiredAuthenticationToken",
                "The access token has expired.",
            ),
            Some(jsonwebtoken::errors::ErrorKind::InvalidAudience) => {
                invalid("The access token has an invalid audience.".into())
            }
            Some(jsonwebtoken::errors::ErrorKind::InvalidIssuer) => {
                invalid("The access token has an invalid issuer.".into())
            }
            Some(_) => invalid("The access token signature or claims are invalid.".into()),
            None => invalid(format!(
                "The access token's algorithm {:?} is not accepted.",
                header.alg
            )),
        })
    }

    /// Mints an HS256 token for `subject` with `grants`, valid for `ttl`.
    pub fn mint(
        &self,
        subject: &str,
        grants: Vec<RoleGrant>,
        ttl: std::time::Duration,
    ) -> Result<String, AuthError> {
        let secret = self.hs_secret.as_ref().ok_or(AuthError::NoSecret)?;
        mint_hs256(secret, &self.issuer, &self.audience, subject, grants, ttl)
    }
}

/// Mints an HS256 token.
pub fn mint_hs256(
    secret: &[u8],
    issuer: &str,
    audience: &str,
    subject: &str,
    grants: Vec<RoleGrant>,
    ttl: std::time::Duration,
) -> Result<String, AuthError> {
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    let claims = Claims {
        sub: subject.to_owned(),
        iss: issuer.to_owned(),
        aud: audience.to_owned(),
        exp: now + ttl.as_secs(),
        iat: now,
        roles: grants,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(AuthError::Sign)
}

/// Reads the HS256 secret from `data_dir/jwt-secret`, generating it (mode 0600) on first use.
pub fn load_or_create_secret(data_dir: &Path) -> Result<Vec<u8>, AuthError> {
    let path = data_dir.join("jwt-secret");
    let io = |e| AuthError::Io(path.display().to_string(), e);
    match std::fs::read_to_string(&path) {
        Ok(s) => return Ok(s.trim().as_bytes().to_vec()),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        Err(_) => {}
    }
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let bytes: [u8; 32] = rand::random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    let mut f = opts.open(&path).map_err(io)?;
    f.write_all(secret.as_bytes()).map_err(io)?;
    Ok(secret.into_bytes())
}

/// `properties` of a role assignment.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoleAssignmentProperties {
    /// `Owner` / `Contributor` / `Reader`, or an ARM role definition id ending in its GUID.
    pub role_definition_id: String,
    /// The token subject the role is granted to.
    pub principal_id: String,
    /// `User`, `Group`, `ServicePrincipal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal_type: Option<String>,
    /// Read-only: the scope, derived from the id.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

fn check_role_assignment(p: &RoleAssignmentProperties) -> Result<(), ValidationError> {
    if Role::parse(&p.role_definition_id).is_none() {
        return Err(ValidationError::new(
            "properties.roleDefinitionId",
            "unknown role: use Owner, Contributor, Reader or their role definition ids",
        ));
    }
    if p.principal_id.is_empty() {
        return Err(ValidationError::new(
            "properties.principalId",
            "principalId must not be empty",
        ));
    }
    Ok(())
}

/// The built-in `Microsoft.Authorization/roleAssignments` type (subscription or group scope).
pub fn role_assignment_type() -> ResourceTypeDecl {
    ResourceTypeDecl::new::<RoleAssignmentProperties>(
        crate::engine::AUTHORIZATION_NAMESPACE,
        &["roleAssignments"],
    )
    .api_versions(&["2022-04-01"])
    .name_rule(NameRule::new(r"^[A-Za-z0-9-]+$", 1, 64))
    .lro(false, false)
    .provisioning_state(false)
    .list_by_subscription(true)
    .list_by_resource_group(true)
    .validate(check_role_assignment)
    .description("Grants a role (Owner, Contributor, Reader) to a principal at a scope.")
    .build()
}
