//! X.509 identity helpers, pure functions over DER bytes: what a client certificate says (subject,
//! SANs, thumbprints), the Event Grid validation schemes that tie it to an authentication name,
//! and the IoT Operations `authorizationAttributes` that map certificate subjects to attributes.
//!
//! Chain and signature verification is not here: the TLS layer (rustls with the trusted CA
//! bundle) has already done it when these helpers run.
//!
//! Matching rules (from the Event Grid client and certificate-authentication docs, where the
//! authentication name is compared case-insensitively during authentication):
//! - `SubjectMatchesAuthenticationName`: a subject common name equals the authentication name, or
//!   the authentication name is a distinguished name (`CN=a, O=b`) with exactly the subject's
//!   attributes (in any order, spaces around `=` and `,` ignored).
//! - `Dns`/`Uri`/`Email`: some SAN entry of that kind equals the authentication name.
//! - `Ip`: the authentication name parses as an IP address equal to a SAN IP entry.
//! - `ThumbprintMatch`: a listed thumbprint equals the certificate's SHA-1 (40 hex digits) or
//!   SHA-256 (64 hex digits) fingerprint; `:` and spaces are ignored, hex case too.
//!
//! All string comparisons ignore ASCII case only.
//!
//! `authorizationAttributes` (IoT Operations X.509 authentication docs): each entry names a
//! subject such as `CN = Contoso Intermediate CA`; matching starts at the leaf and walks up the
//! chain, and the first certificate that matches an entry decides (one entry's attributes only).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use x509_parser::extensions::GeneralName;
use x509_parser::objects::{oid_registry, oid2abbrev};
use x509_parser::prelude::{FromDer, X509Certificate, X509Name};

use crate::error::PolicyError;

/// A certificate that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    #[error("not a DER X.509 certificate: {0}")]
    Parse(String),
    #[error("trailing bytes after the certificate")]
    Trailing,
}

/// What a certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateIdentity {
    /// The subject as `CN=a, O=b` (RFC 4514 order: last RDN first).
    pub subject: String,
    /// Subject attributes as (short type, value), in certificate (DER) order.
    pub subject_attributes: Vec<(String, String)>,
    pub common_names: Vec<String>,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub emails: Vec<String>,
    /// Uppercase hex, no separators.
    pub sha1_thumbprint: String,
    pub sha256_thumbprint: String,
}

fn hex_upper(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn name_attributes(name: &X509Name<'_>) -> Vec<(String, String)> {
    name.iter_attributes()
        .map(|attr| {
            let ty = oid2abbrev(attr.attr_type(), oid_registry())
                .map(str::to_string)
                .unwrap_or_else(|_| attr.attr_type().to_id_string());
            let value = attr
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|_| hex_upper(attr.attr_value().data));
            (ty, value)
        })
        .collect()
}

/// Reads the identity facts of a DER certificate.
pub fn identity_from_der(der: &[u8]) -> Result<CertificateIdentity, CertificateError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CertificateError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertificateError::Trailing);
    }
    let subject_attributes = name_attributes(cert.subject());
    let subject = subject_attributes
        .iter()
        .rev()
        .map(|(t, v)| format!("{t}={v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let common_names = cert
        .subject()
        .iter_common_name()
        .filter_map(|a| a.as_str().ok().map(str::to_string))
        .collect();
    let mut identity = CertificateIdentity {
        subject,
        subject_attributes,
        common_names,
        dns_names: Vec::new(),
        uris: Vec::new(),
        ip_addresses: Vec::new(),
        emails: Vec::new(),
        sha1_thumbprint: hex_upper(
            ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref(),
        ),
        sha256_thumbprint: hex_upper(ring::digest::digest(&ring::digest::SHA256, der).as_ref()),
    };
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertificateError::Parse(e.to_string()))?;
    if let Some(san) = san {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(s) => identity.dns_names.push(s.to_string()),
                GeneralName::URI(s) => identity.uris.push(s.to_string()),
                GeneralName::RFC822Name(s) => identity.emails.push(s.to_string()),
                GeneralName::IPAddress(bytes) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                        identity.ip_addresses.push(IpAddr::from(v4));
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                        identity.ip_addresses.push(IpAddr::from(v6));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(identity)
}

/// `ClientCertificateValidationScheme` of an Event Grid client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValidationScheme {
    #[default]
    SubjectMatchesAuthenticationName,
    DnsMatchesAuthenticationName,
    UriMatchesAuthenticationName,
    IpMatchesAuthenticationName,
    EmailMatchesAuthenticationName,
    ThumbprintMatch,
}

/// `ClientCertificateAuthentication` of an Event Grid client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertificateAuthentication {
    #[serde(default)]
    pub validation_scheme: ValidationScheme,
    #[serde(default)]
    pub allowed_thumbprints: Vec<String>,
}

/// Why a certificate does not identify the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{scheme:?}: {message}")]
pub struct CertificateMismatch {
    pub scheme: ValidationScheme,
    pub message: String,
}

/// Parses `CN = a, OU = b` / `CN=a,OU=b` into (uppercased type, value) pairs.
fn parse_dn(text: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    for part in text.split(',') {
        let (ty, value) = part.split_once('=')?;
        let ty = ty.trim();
        let value = value.trim();
        if ty.is_empty() {
            return None;
        }
        pairs.push((ty.to_ascii_uppercase(), value.to_string()));
    }
    Some(pairs)
}

/// Same attributes, any order; types ignore case, values compare with `value_eq`.
fn same_dn(
    config: &[(String, String)],
    cert: &[(String, String)],
    value_eq: fn(&str, &str) -> bool,
) -> bool {
    if config.len() != cert.len() {
        return false;
    }
    let mut used = vec![false; cert.len()];
    config.iter().all(|(ty, value)| {
        let found = cert.iter().enumerate().position(|(i, (cty, cvalue))| {
            !used[i] && cty.eq_ignore_ascii_case(ty) && value_eq(cvalue, value)
        });
        match found {
            Some(i) => {
                used[i] = true;
                true
            }
            None => false,
        }
    })
}

fn caseless(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

fn exact(a: &str, b: &str) -> bool {
    a == b
}

fn normalize_thumbprint(t: &str) -> String {
    t.chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect()
}

/// Checks a certificate against an Event Grid client's validation scheme and authentication name.
pub fn validate_client_certificate(
    identity: &CertificateIdentity,
    settings: &ClientCertificateAuthentication,
    authentication_name: &str,
) -> Result<(), CertificateMismatch> {
    let scheme = settings.validation_scheme;
    let fail = |message: String| Err(CertificateMismatch { scheme, message });
    let any = |items: &[String]| {
        items
            .iter()
            .any(|s| s.eq_ignore_ascii_case(authentication_name))
    };
    match scheme {
        ValidationScheme::SubjectMatchesAuthenticationName => {
            if any(&identity.common_names) {
                return Ok(());
            }
            if authentication_name.contains('=')
                && let Some(dn) = parse_dn(authentication_name)
                && same_dn(&dn, &identity.subject_attributes, caseless)
            {
                return Ok(());
            }
            fail(format!(
                "subject {:?} does not match {authentication_name:?}",
                identity.subject
            ))
        }
        ValidationScheme::DnsMatchesAuthenticationName => {
            if any(&identity.dns_names) {
                Ok(())
            } else {
                fail(format!("no DNS SAN equals {authentication_name:?}"))
            }
        }
        ValidationScheme::UriMatchesAuthenticationName => {
            if any(&identity.uris) {
                Ok(())
            } else {
                fail(format!("no URI SAN equals {authentication_name:?}"))
            }
        }
        ValidationScheme::EmailMatchesAuthenticationName => {
            if any(&identity.emails) {
                Ok(())
            } else {
                fail(format!("no email SAN equals {authentication_name:?}"))
            }
        }
        ValidationScheme::IpMatchesAuthenticationName => {
            match authentication_name.trim().parse::<IpAddr>() {
                Ok(ip) if identity.ip_addresses.contains(&ip) => Ok(()),
                Ok(_) => fail(format!("no IP SAN equals {authentication_name:?}")),
                Err(_) => fail(format!(
                    "authentication name {authentication_name:?} is not an IP address"
                )),
            }
        }
        ValidationScheme::ThumbprintMatch => {
            if settings.allowed_thumbprints.is_empty() {
                return fail("no allowedThumbprints configured".into());
            }
            let ok = settings.allowed_thumbprints.iter().any(|t| {
                let t = normalize_thumbprint(t);
                (t.len() == 40 && t == identity.sha1_thumbprint)
                    || (t.len() == 64 && t == identity.sha256_thumbprint)
            });
            if ok {
                Ok(())
            } else {
                fail("the certificate thumbprint is not in allowedThumbprints".into())
            }
        }
    }
}

/// `AlternativeAuthenticationNameSource` of an Event Grid namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthenticationNameSource {
    ClientCertificateSubject,
    ClientCertificateDns,
    ClientCertificateUri,
    ClientCertificateIp,
    ClientCertificateEmail,
}

/// The authentication name a certificate offers when the CONNECT carries none: the first source
/// (in the namespace's configured order) whose certificate field is present. For the subject this
/// is the first common name.
pub fn authentication_name_from_certificate(
    identity: &CertificateIdentity,
    sources: &[AuthenticationNameSource],
) -> Option<String> {
    sources.iter().find_map(|source| match source {
        AuthenticationNameSource::ClientCertificateSubject => {
            identity.common_names.first().cloned()
        }
        AuthenticationNameSource::ClientCertificateDns => identity.dns_names.first().cloned(),
        AuthenticationNameSource::ClientCertificateUri => identity.uris.first().cloned(),
        AuthenticationNameSource::ClientCertificateIp => {
            identity.ip_addresses.first().map(IpAddr::to_string)
        }
        AuthenticationNameSource::ClientCertificateEmail => identity.emails.first().cloned(),
    })
}

/// One `authorizationAttributes` entry (`BrokerAuthenticatorMethodX509Attributes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct X509AttributeRule {
    pub subject: String,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct AttributeEntry {
    name: String,
    subject: Vec<(String, String)>,
    attributes: BTreeMap<String, String>,
}

/// Compiled `authorizationAttributes`: subject → attributes.
#[derive(Debug, Clone, Default)]
pub struct AuthorizationAttributes {
    entries: Vec<AttributeEntry>,
}

/// The attributes a certificate chain earned, and which entry granted them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeMatch<'a> {
    pub entry: &'a str,
    /// Index in the chain (0 = leaf).
    pub certificate: usize,
    pub attributes: &'a BTreeMap<String, String>,
}

impl AuthorizationAttributes {
    /// Compiles the map of an X.509 authentication method; entries are tried in name order.
    pub fn compile(
        map: &BTreeMap<String, X509AttributeRule>,
    ) -> Result<AuthorizationAttributes, PolicyError> {
        let mut entries = Vec::new();
        for (name, rule) in map {
            let Some(dn) = parse_dn(&rule.subject) else {
                return Err(PolicyError::Invalid {
                    location: format!("authorizationAttributes {name:?}"),
                    message: format!(
                        "subject {:?} is not a distinguished name like \"CN = name, O = org\"",
                        rule.subject
                    ),
                });
            };
            entries.push(AttributeEntry {
                name: name.clone(),
                subject: dn,
                attributes: rule.attributes.clone(),
            });
        }
        Ok(AuthorizationAttributes { entries })
    }

    /// Walks the chain from the leaf (index 0) up; the first certificate whose subject equals an
    /// entry's subject (attribute values compared exactly) decides.
    pub fn for_chain(&self, chain: &[CertificateIdentity]) -> Option<AttributeMatch<'_>> {
        chain.iter().enumerate().find_map(|(i, cert)| {
            self.entries
                .iter()
                .find(|e| same_dn(&e.subject, &cert.subject_attributes, exact))
                .map(|e| AttributeMatch {
                    entry: &e.name,
                    certificate: i,
                    attributes: &e.attributes,
                })
        })
    }
}
