//! rustls server configuration from PEM files (ring provider, explicit) and the [`TlsInfo`] a
//! handshake leaves behind.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::{ServerConfig, ServerConnection, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{NetError, TlsFiles, TlsInfo};

/// Builds the server configuration for a TLS listener: certificate chain and key from PEM, and when
/// `client_ca` is set, a verifier that requires a client certificate chaining to those CAs (or,
/// with `client_cert_optional`, checks one only when the client presents it).
///
/// The provider is passed explicitly (ring) rather than taken from the process default, so TLS
/// setup never depends on which crates happened to install one.
pub fn server_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>, NetError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = load_certs(&files.cert)?;
    if certs.is_empty() {
        return Err(NetError::Tls(format!(
            "no certificate found in {}",
            files.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| NetError::Tls(format!("private key {}: {e}", files.key.display())))?;

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| NetError::Tls(format!("client CA {}: {e}", ca.display())))?;
            }
            if roots.is_empty() {
                return Err(NetError::Tls(format!(
                    "no CA certificate found in {}",
                    ca.display()
                )));
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            if files.client_cert_optional {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| NetError::Tls(format!("client CA {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        NetError::Tls(format!(
            "certificate {} / key {}: {e}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NetError> {
    CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| NetError::Tls(format!("certificates {}: {e}", path.display())))
}

/// What the finished handshake tells about the client.
pub(crate) fn tls_info(conn: &ServerConnection) -> TlsInfo {
    let peer_certificates: Vec<Vec<u8>> = conn
        .peer_certificates()
        .map(|chain| chain.iter().map(|c| c.as_ref().to_vec()).collect())
        .unwrap_or_default();
    let peer_common_name = peer_certificates.first().and_then(|der| common_name(der));
    TlsInfo {
        sni: conn.server_name().map(str::to_owned),
        peer_certificates,
        peer_common_name,
    }
}

/// The subject CN of a DER certificate, if it parses and has one.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
}
