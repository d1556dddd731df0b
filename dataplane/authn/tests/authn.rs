//! Token verification with keys generated here (rcgen) and a JWKS served by wiremock; the custom
//! authentication client against a wiremock server.

use std::collections::BTreeMap;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};
use meridian_authn::{CustomAuthenticator, CustomRequest, TokenError, TokenVerifier};
use meridian_contract::{CustomAuthSettings, TokenSettings};
use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

struct Signer {
    enc: EncodingKey,
    public_pem: String,
    kid: &'static str,
}

fn signer(kid: &'static str) -> Signer {
    let kp = rcgen::KeyPair::generate().expect("P-256 key");
    Signer {
        enc: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).expect("pkcs8"),
        public_pem: kp.public_key_pem(),
        kid,
    }
}

impl Signer {
    fn mint(&self, claims: serde_json::Value, with_kid: bool) -> String {
        let mut h = Header::new(Algorithm::ES256);
        if with_kid {
            h.kid = Some(self.kid.to_owned());
        }
        jsonwebtoken::encode(&h, &claims, &self.enc).expect("sign")
    }
    fn jwk(&self) -> serde_json::Value {
        let mut jwk = Jwk::from_encoding_key(&self.enc, Algorithm::ES256).expect("jwk");
        jwk.common.key_id = Some(self.kid.to_owned());
        serde_json::to_value(jwk).unwrap()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn settings(keys: Vec<String>, jwks: Option<String>) -> TokenSettings {
    TokenSettings {
        audiences: vec!["aio-internal".into()],
        issuer: Some("https://issuer.test".into()),
        keys_pem: keys,
        jwks_url: jwks,
    }
}

fn claims(exp: u64) -> serde_json::Value {
    json!({"sub": "system:serviceaccount:plant:pump-7", "aud": "aio-internal",
           "iss": "https://issuer.test", "exp": exp, "iat": now(),
           "site": "plant-1", "level": 3,
           "kubernetes.io": {"namespace": "plant", "serviceaccount": {"name": "pump-7"}}})
}

#[tokio::test]
async fn configured_key_verifies_and_claims_become_attributes() {
    init();
    let s = signer("k1");
    let v = TokenVerifier::new(&settings(vec![s.public_pem.clone()], None), &[]).unwrap();
    let exp = now() + 600;
    let t = v
        .verify(&s.mint(claims(exp), false))
        .await
        .expect("valid token");
    assert_eq!(
        t.subject.as_deref(),
        Some("system:serviceaccount:plant:pump-7")
    );
    assert_eq!(t.expires_at, exp);
    assert_eq!(t.attributes["site"], "plant-1");
    assert_eq!(t.attributes["level"], "3");
    assert_eq!(t.attributes["kubernetes.io.serviceaccount.name"], "pump-7");
    assert!(!t.attributes.contains_key("exp") && !t.attributes.contains_key("aud"));
}

#[tokio::test]
async fn expired_forged_wrong_audience_and_wrong_issuer_are_refused() {
    init();
    let s = signer("k1");
    let forger = signer("k1");
    let v = TokenVerifier::new(&settings(vec![s.public_pem.clone()], None), &[]).unwrap();
    let expired = s.mint(claims(now() - 60), false);
    assert_eq!(v.verify(&expired).await.unwrap_err(), TokenError::Expired);
    let forged = forger.mint(claims(now() + 600), false);
    assert_eq!(
        v.verify(&forged).await.unwrap_err(),
        TokenError::BadSignature
    );
    let mut c = claims(now() + 600);
    c["aud"] = json!("someone-else");
    assert!(
        matches!(v.verify(&s.mint(c, false)).await, Err(TokenError::Claims(m)) if m.contains("audience"))
    );
    let mut c = claims(now() + 600);
    c["iss"] = json!("https://evil.test");
    assert!(
        matches!(v.verify(&s.mint(c, false)).await, Err(TokenError::Claims(m)) if m.contains("issuer"))
    );
    let mut c = claims(now() + 600);
    c.as_object_mut().unwrap().remove("aud");
    assert!(matches!(
        v.verify(&s.mint(c, false)).await,
        Err(TokenError::Claims(_))
    ));
    // A symmetric (HS256) token is never accepted, whatever its content.
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(now() + 600),
        &EncodingKey::from_secret(s.public_pem.as_bytes()),
    )
    .unwrap();
    assert!(matches!(v.verify(&hs).await, Err(TokenError::Malformed(_))));
    assert!(matches!(
        v.verify("not.a.jwt").await,
        Err(TokenError::Malformed(_))
    ));
}

#[tokio::test]
async fn node_keys_are_used_only_when_the_method_has_none() {
    init();
    let s = signer("k1");
    let other = signer("k2");
    let token = s.mint(claims(now() + 600), false);
    let v =
        TokenVerifier::new(&settings(vec![], None), std::slice::from_ref(&s.public_pem)).unwrap();
    assert!(v.verify(&token).await.is_ok());
    let v = TokenVerifier::new(
        &settings(vec![other.public_pem.clone()], None),
        std::slice::from_ref(&s.public_pem),
    )
    .unwrap();
    assert_eq!(
        v.verify(&token).await.unwrap_err(),
        TokenError::BadSignature
    );
    let v = TokenVerifier::new(&settings(vec![], None), &[]).unwrap();
    assert!(!v.has_key_source());
    assert!(matches!(
        v.verify(&token).await,
        Err(TokenError::UnknownKey(_))
    ));
    assert!(
        TokenVerifier::new(
            &settings(
                vec!["-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----".into()],
                None
            ),
            &[]
        )
        .is_err()
    );
}

#[tokio::test]
async fn jwks_is_fetched_cached_and_refetched_for_a_rotated_key() {
    init();
    let server = MockServer::start().await;
    let old = signer("old");
    let new = signer("new");
    Mock::given(method("GET"))
        .and(path("/keys"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"keys": [old.jwk()]})))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    let url = format!("{}/keys", server.uri());
    let v = TokenVerifier::new(&settings(vec![], Some(url)), &[]).unwrap();
    for _ in 0..3 {
        v.verify(&old.mint(claims(now() + 600), true))
            .await
            .expect("old key verifies");
    }
    // Rotation: the set now has the new key. A token naming it triggers one more fetch, but
    // only after the minimum refresh interval (10 s) — so at first it is an unknown key.
    Mock::given(method("GET"))
        .and(path("/keys"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"keys": [old.jwk(), new.jwk()]})),
        )
        .mount(&server)
        .await;
    let t = new.mint(claims(now() + 600), true);
    assert!(matches!(v.verify(&t).await, Err(TokenError::UnknownKey(Some(k))) if k == "new"));
    let requests = server.received_requests().await.unwrap().len();
    assert_eq!(requests, 1, "the JWKS is not fetched again within 10 s");
    tokio::time::sleep(Duration::from_millis(10_100)).await;
    v.verify(&t)
        .await
        .expect("the new key verifies after a refetch");
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_unreachable_jwks_refuses_every_token() {
    init();
    let s = signer("k");
    let v = TokenVerifier::new(
        &settings(vec![], Some("http://127.0.0.1:9/keys".into())),
        &[],
    )
    .unwrap();
    let e = v
        .verify(&s.mint(claims(now() + 600), true))
        .await
        .unwrap_err();
    assert!(
        matches!(e, TokenError::KeySource(_) | TokenError::UnknownKey(_)),
        "{e:?}"
    );
    assert!(
        TokenVerifier::new(
            &settings(vec![], Some("http://keys.example.com/".into())),
            &[]
        )
        .is_err()
    );
}

fn custom(uri: &str, timeout: u32) -> CustomAuthenticator {
    CustomAuthenticator::new(&CustomAuthSettings {
        endpoint: format!("{uri}/auth"),
        headers: BTreeMap::from([("x-api-key".to_owned(), "s3cret".to_owned())]),
        timeout_seconds: timeout,
        ca_cert_ref: None,
        ca_cert_pem: None,
        client_cert_secret_ref: None,
    })
    .unwrap()
}

fn request() -> CustomRequest {
    CustomRequest {
        event: "connect",
        client_id: "dev-1".into(),
        username: Some("alice".into()),
        password: Some(b"pw".to_vec()),
        protocol_version: 5,
        remote_address: "127.0.0.1:5000".into(),
        listener_port: 1883,
        ..Default::default()
    }
}

#[tokio::test]
async fn custom_server_decides_with_headers_and_connect_facts() {
    init();
    let server = MockServer::start().await;
    Mock::given(method("POST")).and(path("/auth")).and(header("x-api-key", "s3cret"))
        .and(wiremock::matchers::body_partial_json(json!({"clientId": "dev-1", "username": "alice", "password": "cHc=", "event": "connect"})))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": "allow", "attributes": {"floor": "2"}, "expiresAt": 4_000_000_000u64})))
        .mount(&server).await;
    let a = custom(&server.uri(), 2)
        .authenticate(&request())
        .await
        .expect("allowed");
    assert_eq!(a.attributes["floor"], "2");
    assert_eq!(a.expires_at, Some(4_000_000_000));
    let mut other = request();
    other.client_id = "dev-2".into();
    // No mock matches dev-2: wiremock answers 404, which refuses (fail closed).
    assert_eq!(
        custom(&server.uri(), 2)
            .authenticate(&other)
            .await
            .unwrap_err()
            .reason_code,
        0x88
    );
}

#[tokio::test]
async fn custom_denials_statuses_and_timeouts_refuse_with_their_codes() {
    init();
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/auth"))
        .and(wiremock::matchers::body_partial_json(
            json!({"clientId": "deny"}),
        ))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"result": "deny", "reasonCode": 0x8A, "reason": "banned"})),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/auth"))
        .and(wiremock::matchers::body_partial_json(
            json!({"clientId": "weird"}),
        ))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"result": "deny", "reasonCode": 0})),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/auth"))
        .and(wiremock::matchers::body_partial_json(
            json!({"clientId": "unauth"}),
        ))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/auth"))
        .and(wiremock::matchers::body_partial_json(
            json!({"clientId": "slow"}),
        ))
        .respond_with(
            ResponseTemplate::new(200)
                .set_delay(Duration::from_secs(3))
                .set_body_json(json!({"result": "allow"})),
        )
        .mount(&server)
        .await;
    let c = custom(&server.uri(), 1);
    let ask = |id: &str| {
        let mut r = request();
        r.client_id = id.into();
        r
    };
    let d = c.authenticate(&ask("deny")).await.unwrap_err();
    assert_eq!((d.reason_code, d.reason.as_str()), (0x8A, "banned"));
    // A deny may not smuggle in a success code.
    assert_eq!(
        c.authenticate(&ask("weird")).await.unwrap_err().reason_code,
        0x87
    );
    assert_eq!(
        c.authenticate(&ask("unauth"))
            .await
            .unwrap_err()
            .reason_code,
        0x86
    );
    let started = std::time::Instant::now();
    let d = c.authenticate(&ask("slow")).await.unwrap_err();
    assert_eq!(d.reason_code, 0x88);
    assert!(d.reason.contains("did not answer"), "{}", d.reason);
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert!(
        !format!("{:?}", request()).contains("pw"),
        "Debug leaves the password out"
    );
}

#[test]
fn custom_endpoint_must_be_https_unless_loopback() {
    init();
    let mut s = CustomAuthSettings {
        endpoint: "http://auth.example.com/".into(),
        headers: BTreeMap::new(),
        timeout_seconds: 1,
        ca_cert_ref: None,
        ca_cert_pem: None,
        client_cert_secret_ref: None,
    };
    assert!(CustomAuthenticator::new(&s).is_err());
    s.endpoint = "https://auth.example.com/".into();
    assert!(CustomAuthenticator::new(&s).is_ok());
    s.ca_cert_pem = Some("not a pem".into());
    assert!(CustomAuthenticator::new(&s).is_err());
}

/// An Event Grid namespace's custom JWT authentication: keys from issuer certificates (made here
/// with rcgen), the namespace's issuer and host as audience, Event Grid's attribute rules.
#[tokio::test]
async fn event_grid_namespace_tokens_are_checked_against_its_issuer_certificates() {
    use meridian_contract::{CustomJwtAuthentication, IssuerCertificate};
    init();
    let certified = |kid: &'static str| {
        let kp = rcgen::KeyPair::generate().expect("P-256 key");
        let cert = rcgen::CertificateParams::new(vec!["issuer.test".into()])
            .unwrap()
            .self_signed(&kp)
            .unwrap();
        (
            Signer {
                enc: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
                public_pem: kp.public_key_pem(),
                kid,
            },
            cert.pem(),
        )
    };
    let (current, current_cert) = certified("current");
    let (next, next_cert) = certified("next");
    let (stranger, _) = certified("current");
    // The second certificate as bare base64 (the armour stripped), as the resources may carry it.
    let bare: String = next_cert
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let settings = CustomJwtAuthentication {
        token_issuer: "https://idp.test".into(),
        issuer_certificates: vec![
            IssuerCertificate {
                kid: Some("current".into()),
                encoded_certificate: current_cert,
            },
            IssuerCertificate {
                kid: None,
                encoded_certificate: bare,
            },
        ],
    };
    let v = TokenVerifier::for_event_grid_namespace("fleet", &settings).unwrap();
    let n = now();
    let claims = |aud: serde_json::Value| {
        json!({"iss": "https://idp.test", "sub": "dev-9", "aud": aud, "exp": n + 600,
               "nbf": n - 10, "num": 7, "big": 5_000_000_000u64, "ratio": 1.5, "str": "s",
               "list": ["a", "b"], "ints": [1, 2], "obj": {"k": "v"}, "flag": true})
    };
    let ok = v
        .verify(&current.mint(claims(json!("fleet.example.com")), true))
        .await
        .expect("valid token");
    assert_eq!(ok.subject.as_deref(), Some("dev-9"));
    assert_eq!(
        ok.event_grid_attributes(),
        BTreeMap::from([
            ("list".to_string(), json!(["a", "b"])),
            ("num".to_string(), json!(7)),
            ("str".to_string(), json!("s")),
        ]),
        "int32, string and string-array claims only; iss/sub/aud/exp/nbf left out"
    );
    // The rotation certificate, no kid; an array audience with one namespace host; an https URL.
    v.verify(&next.mint(
        claims(json!(["someone-else", "FLEET.eventgrid.example.net"])),
        false,
    ))
    .await
    .expect("second issuer certificate");
    v.verify(&next.mint(claims(json!("https://fleet.example.com/")), false))
        .await
        .expect("https URL audience");

    let refused = |token: String| {
        let v = &v;
        async move { v.verify(&token).await.unwrap_err() }
    };
    let aud = |a: &str| claims(json!(a));
    for (why, token) in [
        (
            "another namespace's host",
            current.mint(aud("fleet2.example.com"), true),
        ),
        ("the bare namespace name", current.mint(aud("fleet"), true)),
        (
            "a key no certificate holds",
            stranger.mint(aud("fleet.example.com"), true),
        ),
        // kid `current` names the first certificate: the second key may not stand in.
        ("the rotation key under the first kid", {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some("current".into());
            jsonwebtoken::encode(&h, &aud("fleet.example.com"), &next.enc).unwrap()
        }),
    ] {
        let e = refused(token).await;
        assert!(
            matches!(e, TokenError::Claims(_) | TokenError::BadSignature),
            "{why}: {e:?}"
        );
    }
    let mut wrong_issuer = aud("fleet.example.com");
    wrong_issuer["iss"] = json!("https://other-idp.test");
    let e = refused(current.mint(wrong_issuer, true)).await;
    assert!(e.to_string().contains("issuer"), "{e}");
    for missing in ["nbf", "sub", "exp"] {
        let mut c = aud("fleet.example.com");
        c.as_object_mut().unwrap().remove(missing);
        let e = refused(current.mint(c, true)).await;
        assert!(
            matches!(e, TokenError::Claims(_)),
            "without {missing}: {e:?}"
        );
    }
    let mut expired = aud("fleet.example.com");
    expired["exp"] = json!(n - 600);
    assert_eq!(
        refused(current.mint(expired, true)).await,
        TokenError::Expired
    );

    // Settings that cannot work are refused when the snapshot is applied.
    let bad = CustomJwtAuthentication {
        token_issuer: "i".into(),
        issuer_certificates: vec![IssuerCertificate {
            kid: None,
            encoded_certificate: "bm90IGEgY2VydGlmaWNhdGU=".into(),
        }],
    };
    let e = TokenVerifier::for_event_grid_namespace("fleet", &bad).unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");
}
