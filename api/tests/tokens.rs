//! Token verification with asymmetric keys: ES256 and RS256 via PEM public keys, ES256 via a JWKS URL.

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use meridian_api::auth::Authenticator;
use serde_json::json;

fn es256_key() -> (rcgen::KeyPair, EncodingKey) {
    let key = rcgen::KeyPair::generate().unwrap();
    let enc = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    (key, enc)
}

fn sign(enc: &EncodingKey, kid: Option<&str>, aud: &str) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(str::to_owned);
    let claims = json!({"sub": "svc", "iss": "meridian", "aud": aud,
        "exp": chrono::Utc::now().timestamp() + 600,
        "roles": [{"role": "Reader", "scope": "/subscriptions/s"}]});
    jsonwebtoken::encode(&header, &claims, enc).unwrap()
}

#[test]
fn es256_public_key_pem_verifies_and_other_keys_do_not() {
    let (key, enc) = es256_key();
    let auth = Authenticator::new("meridian", "meridian-api")
        .with_public_key_pem(key.public_key_pem().as_bytes())
        .unwrap();
    let p = auth.verify(&sign(&enc, None, "meridian-api")).unwrap();
    assert_eq!(p.subject, "svc");
    assert_eq!(p.grants.len(), 1);
    let (_, other) = es256_key();
    let err = auth
        .verify(&sign(&other, None, "meridian-api"))
        .unwrap_err();
    assert_eq!(err.status, 401);
    let err = auth.verify(&sign(&enc, None, "elsewhere")).unwrap_err();
    assert_eq!(err.detail.code, "InvalidAuthenticationToken");
}

#[tokio::test]
async fn jwks_url_keys_verify_by_kid() {
    meridian_api::tls::install_crypto_provider();
    let (key, enc) = es256_key();
    let raw = key.public_key_raw();
    assert_eq!(raw.len(), 65, "uncompressed P-256 point");
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig", "alg": "ES256",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..])}]});
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::path("/jwks"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(jwks))
        .mount(&server)
        .await;
    let auth = Authenticator::new("meridian", "meridian-api")
        .with_jwks_url(&format!("{}/jwks", server.uri()))
        .await
        .unwrap();
    assert_eq!(
        auth.verify(&sign(&enc, Some("k1"), "meridian-api"))
            .unwrap()
            .subject,
        "svc"
    );
    assert!(
        auth.verify(&sign(&enc, Some("other-kid"), "meridian-api"))
            .is_err()
    );
    // An HS256 token is refused when no secret is configured (no algorithm confusion).
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "x", "iss": "meridian", "aud": "meridian-api", "exp": chrono::Utc::now().timestamp() + 600}),
        &EncodingKey::from_secret(key.public_key_pem().as_bytes()),
    )
    .unwrap();
    assert_eq!(auth.verify(&hs).unwrap_err().status, 401);
}

/// RS256 with keys from the `openssl` CLI (installed by tests/setup.sh; rcgen with ring cannot
/// generate RSA keys).
#[test]
fn rs256_public_key_pem_verifies_and_other_keys_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let rsa_key = |name: &str| {
        let private = dir.path().join(format!("{name}.pem"));
        let public = dir.path().join(format!("{name}.pub.pem"));
        let ok = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&private)
            .status()
            .expect("openssl CLI")
            .success();
        assert!(ok, "openssl genpkey failed");
        let ok = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .status()
            .unwrap()
            .success();
        assert!(ok, "openssl pkey -pubout failed");
        (
            std::fs::read(private).unwrap(),
            std::fs::read(public).unwrap(),
        )
    };
    let (private, public) = rsa_key("a");
    let (other_private, _) = rsa_key("b");
    let auth = Authenticator::new("meridian", "meridian-api")
        .with_public_key_pem(&public)
        .unwrap();
    let sign_rs = |pem: &[u8]| {
        let claims = json!({"sub": "rsa-svc", "iss": "meridian", "aud": "meridian-api",
            "exp": chrono::Utc::now().timestamp() + 600,
            "roles": [{"role": "Reader", "scope": "/subscriptions/s"}]});
        jsonwebtoken::encode(
            &Header::new(Algorithm::RS256),
            &claims,
            &EncodingKey::from_rsa_pem(pem).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(auth.verify(&sign_rs(&private)).unwrap().subject, "rsa-svc");
    assert_eq!(
        auth.verify(&sign_rs(&other_private)).unwrap_err().status,
        401
    );
}
