//! HTTPS for the API: rustls server configs (ring provider, explicitly) from given PEM files, or a
//! local CA plus a localhost server certificate generated with rcgen into the data dir and reused
//! on restart. azure-core only sends bearer tokens over https, so dev mode always uses this.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// TLS setup failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// File I/O.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// PEM parsing.
    #[error("{0}: {1}")]
    Pem(String, rustls_pki_types::pem::Error),
    /// Certificate generation.
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate/key.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Installs ring as the process-wide rustls provider (ignored when one is already installed).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Paths of a generated local CA and server certificate.
#[derive(Debug, Clone)]
pub struct LocalCa {
    /// The CA certificate clients trust (`REQUESTS_CA_BUNDLE`).
    pub ca_cert: PathBuf,
    /// Server certificate chain (server cert then CA).
    pub server_cert: PathBuf,
    /// Server private key.
    pub server_key: PathBuf,
}

/// Creates (or reuses) `dir/tls/{ca.pem, server.pem, server.key}` for localhost and 127.0.0.1.
pub fn ensure_local_ca(dir: &Path) -> Result<LocalCa, TlsError> {
    let tls = dir.join("tls");
    let out = LocalCa {
        ca_cert: tls.join("ca.pem"),
        server_cert: tls.join("server.pem"),
        server_key: tls.join("server.key"),
    };
    if out.ca_cert.exists() && out.server_cert.exists() && out.server_key.exists() {
        return Ok(out);
    }
    let io = |p: &Path, e| TlsError::Io(p.display().to_string(), e);
    std::fs::create_dir_all(&tls).map_err(|e| io(&tls, e))?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Meridian local CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server_cert = params.signed_by(&server_key, &issuer)?;

    std::fs::write(&out.ca_cert, ca_cert.pem()).map_err(|e| io(&out.ca_cert, e))?;
    std::fs::write(
        &out.server_cert,
        format!("{}{}", server_cert.pem(), ca_cert.pem()),
    )
    .map_err(|e| io(&out.server_cert, e))?;
    write_private(&out.server_key, server_key.serialize_pem().as_bytes())
        .map_err(|e| io(&out.server_key, e))?;
    Ok(out)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)?.write_all(bytes)
}

/// A rustls server config from PEM certificate chain and key files (ring provider).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError::Pem(cert.display().to_string(), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(cert.display().to_string(), e))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError::Pem(key.display().to_string(), e))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
