//! The real server: HTTPS with a generated local CA, port 0, a taken port, token minting.

use meridian_api::{ApiArgs, auth::Role, cli::start};

#[tokio::test]
async fn https_with_generated_ca_serves_arm_requests_to_a_trusting_client() {
    meridian_api::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let mut args = ApiArgs::for_data_dir(dir.path().to_path_buf());
    args.tls_self_signed = true;
    let api = start(args.clone()).await.unwrap();
    assert!(api.base_url.starts_with("https://127.0.0.1:"));
    let ca = api.ca_path.clone().expect("CA path printed for clients");
    let ca_pem = std::fs::read(&ca).unwrap();
    let token = api.token(Role::Owner, "/subscriptions/s1").unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
        .build()
        .unwrap();
    let url = format!(
        "https://localhost:{}/subscriptions/s1/resourceGroups/rg/providers/Microsoft.EventGrid/namespaces/ns1?api-version=2025-02-15",
        api.addr.port()
    );
    let res = client
        .put(&url)
        .bearer_auth(&token)
        .json(&serde_json::json!({"location": "local", "properties": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert!(res.headers().contains_key("azure-asyncoperation"));
    // An untrusting client fails the handshake.
    let plain = reqwest::Client::new();
    assert!(plain.get(&url).bearer_auth(&token).send().await.is_err());
    let secret_mode = std::fs::metadata(dir.path().join("jwt-secret")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(secret_mode.permissions().mode() & 0o777, 0o600);

    // A taken port names --listen.
    let mut again = args.clone();
    again.listen = api.addr;
    let err = start(again).await.unwrap_err().to_string();
    assert!(err.contains("--listen"), "{err}");
    api.shutdown().await;

    // Restart reuses the CA and the secret: the old token still works.
    let api = start(args).await.unwrap();
    assert_eq!(
        std::fs::read(api.ca_path.as_ref().unwrap()).unwrap(),
        ca_pem
    );
    let url = url.replace(
        &format!(
            ":{}/",
            url.split(':').nth(2).unwrap().split('/').next().unwrap()
        ),
        &format!(":{}/", api.addr.port()),
    );
    let res = client.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 200, "data and secret survive a restart");
    api.shutdown().await;
}
