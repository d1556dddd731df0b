//! Listeners and the admin endpoint over loopback with real clients: plain TCP, TLS (rustls, with
//! and without client certificates), WebSocket and WSS (tokio-tungstenite), port conflicts.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use meridian_net::{Accepted, Listener, ListenerSpec, NetError, TlsFiles, Transport, admin};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const WAIT: Duration = Duration::from_secs(5);

/// A throwaway CA, a server certificate for `localhost`/127.0.0.1 and client certificates.
struct Pki {
    dir: tempfile::TempDir,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (ca_der, issuer) = make_ca("Meridian Test CA", &dir.path().join("ca.pem"));
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        Pki {
            dir,
            ca_der,
            issuer,
        }
    }

    fn files(&self, require_client_cert: bool) -> TlsFiles {
        TlsFiles {
            cert: self.dir.path().join("server.pem"),
            key: self.dir.path().join("server.key"),
            client_ca: require_client_cert.then(|| self.dir.path().join("ca.pem")),
            client_cert_optional: false,
        }
    }

    fn client_config(
        &self,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
        };
        Arc::new(config)
    }
}

fn make_ca(
    cn: &str,
    pem_path: &std::path::Path,
) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(pem_path, cert.pem()).unwrap();
    (cert.der().clone(), Issuer::new(params, key))
}

fn client_identity(
    issuer: &Issuer<'static, KeyPair>,
    cn: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, issuer).unwrap();
    let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    (vec![cert.der().clone()], key)
}

async fn bind(url: &str, tls: Option<TlsFiles>) -> Listener {
    Listener::bind(&ListenerSpec::parse(url, tls).unwrap())
        .await
        .unwrap()
}

async fn accept(listener: &mut Listener) -> Accepted {
    timeout(WAIT, listener.accept())
        .await
        .expect("no connection accepted in time")
        .unwrap()
}

async fn tls_connect(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(config)
        .connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp)
        .await
}

/// Echoes what the accepted stream reads until EOF.
fn spawn_echo(mut accepted: Accepted) {
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        loop {
            match accepted.stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    accepted.stream.write_all(&buf[..n]).await.unwrap();
                    accepted.stream.flush().await.unwrap();
                }
            }
        }
    });
}

#[tokio::test]
async fn tcp_echo_round_trips_bytes() {
    let mut listener = bind("mqtt://127.0.0.1:0", None).await;
    assert_ne!(listener.local_addr().port(), 0);
    assert_eq!(listener.spec().transport, Transport::Tcp);
    let mut client = TcpStream::connect(listener.local_addr()).await.unwrap();
    let accepted = accept(&mut listener).await;
    assert_eq!(accepted.transport, Transport::Tcp);
    assert_eq!(accepted.peer, client.local_addr().unwrap());
    assert!(accepted.tls.is_none());
    spawn_echo(accepted);

    client.write_all(b"\x10\x02hello").await.unwrap();
    let mut back = [0u8; 7];
    timeout(WAIT, client.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"\x10\x02hello");
}

#[tokio::test]
async fn taken_port_is_addr_in_use() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap();
    let spec = ListenerSpec::parse(&format!("mqtt://{addr}"), None).unwrap();
    match Listener::bind(&spec).await {
        Err(NetError::AddrInUse { addr: reported }) => assert_eq!(reported, addr),
        Err(e) => panic!("expected AddrInUse, got {e}"),
        Ok(_) => panic!("bound a taken port"),
    }
    match admin::bind(addr).await {
        Err(NetError::AddrInUse { addr: reported }) => assert_eq!(reported, addr),
        Err(e) => panic!("expected AddrInUse, got {e}"),
        Ok(_) => panic!("admin bound a taken port"),
    }
}

#[tokio::test]
async fn tls_handshake_captures_sni_and_round_trips() {
    let pki = Pki::new();
    let mut listener = bind("mqtts://127.0.0.1:0", Some(pki.files(false))).await;
    let mut client = tls_connect(pki.client_config(None), listener.local_addr(), "localhost")
        .await
        .unwrap();
    let accepted = accept(&mut listener).await;
    assert_eq!(accepted.transport, Transport::Tls);
    let info = accepted.tls.clone().expect("TLS info");
    assert_eq!(info.sni.as_deref(), Some("localhost"));
    assert!(info.peer_certificates.is_empty());
    assert_eq!(info.peer_common_name, None);
    spawn_echo(accepted);

    client.write_all(b"over tls").await.unwrap();
    let mut back = [0u8; 8];
    timeout(WAIT, client.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"over tls");
}

#[tokio::test]
async fn bad_certificate_files_fail_at_bind() {
    let pki = Pki::new();
    let mut files = pki.files(false);
    // A certificate file that holds no certificate.
    files.cert = pki.dir.path().join("server.key");
    let spec = ListenerSpec::parse("mqtts://127.0.0.1:0", Some(files)).unwrap();
    match Listener::bind(&spec).await {
        Err(NetError::Tls(msg)) => assert!(msg.contains("server.key"), "{msg}"),
        Err(e) => panic!("expected a TLS error, got {e}"),
        Ok(_) => panic!("bound with an unusable certificate"),
    }
}

/// Under TLS 1.3 the client finishes its side before the server checks the client certificate,
/// so refusal shows as: the server never yields the connection and the client's read fails.
#[tokio::test]
async fn required_client_cert_refuses_client_without_one() {
    let pki = Pki::new();
    let mut listener = bind("mqtts://127.0.0.1:0", Some(pki.files(true))).await;
    let attempt = tls_connect(pki.client_config(None), listener.local_addr(), "localhost").await;
    if let Ok(mut stream) = attempt {
        let _ = stream.write_all(b"x").await;
        let mut buf = [0u8; 1];
        let read = timeout(WAIT, stream.read(&mut buf)).await.unwrap();
        assert!(
            matches!(read, Err(_) | Ok(0)),
            "client without certificate could read: {read:?}"
        );
    }
    assert!(
        timeout(Duration::from_millis(500), listener.accept())
            .await
            .is_err(),
        "listener yielded a connection without client certificate"
    );
}

#[tokio::test]
async fn required_client_cert_from_another_ca_is_refused() {
    let pki = Pki::new();
    let other = tempfile::tempdir().unwrap();
    let (_, other_issuer) = make_ca("Other CA", &other.path().join("ca.pem"));
    let mut listener = bind("mqtts://127.0.0.1:0", Some(pki.files(true))).await;
    let identity = client_identity(&other_issuer, "intruder");
    let attempt = tls_connect(
        pki.client_config(Some(identity)),
        listener.local_addr(),
        "localhost",
    )
    .await;
    if let Ok(mut stream) = attempt {
        let mut buf = [0u8; 1];
        let read = timeout(WAIT, stream.read(&mut buf)).await.unwrap();
        assert!(matches!(read, Err(_) | Ok(0)), "{read:?}");
    }
    assert!(
        timeout(Duration::from_millis(500), listener.accept())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn client_cert_signed_by_ca_is_accepted_and_cn_reported() {
    let pki = Pki::new();
    let mut listener = bind("mqtts://127.0.0.1:0", Some(pki.files(true))).await;
    let identity = client_identity(&pki.issuer, "device-42");
    let leaf = identity.0[0].as_ref().to_vec();
    let mut client = tls_connect(
        pki.client_config(Some(identity)),
        listener.local_addr(),
        "localhost",
    )
    .await
    .unwrap();
    let accepted = accept(&mut listener).await;
    let info = accepted.tls.clone().unwrap();
    assert_eq!(info.peer_common_name.as_deref(), Some("device-42"));
    assert_eq!(info.peer_certificates.first(), Some(&leaf));
    spawn_echo(accepted);
    client.write_all(b"ok").await.unwrap();
    let mut back = [0u8; 2];
    timeout(WAIT, client.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ok");
}

#[tokio::test]
async fn stalled_handshake_does_not_block_others_and_times_out() {
    let pki = Pki::new();
    let spec = ListenerSpec::parse("mqtts://127.0.0.1:0", Some(pki.files(false))).unwrap();
    let mut listener = Listener::bind_with_handshake_timeout(&spec, Duration::from_millis(300))
        .await
        .unwrap();
    // Connects but never sends a ClientHello.
    let mut stalled = TcpStream::connect(listener.local_addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let _good = tls_connect(pki.client_config(None), listener.local_addr(), "localhost")
        .await
        .unwrap();
    let accepted = accept(&mut listener).await;
    assert_ne!(accepted.peer, stalled.local_addr().unwrap());

    // The server gives up on the stalled one: its socket is closed.
    let mut buf = [0u8; 16];
    let read = timeout(WAIT, stalled.read(&mut buf))
        .await
        .expect("stalled socket not closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

fn ws_request(
    url: &str,
    protocol: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    let mut req = url.into_client_request().unwrap();
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    req
}

#[tokio::test]
async fn ws_round_trips_bytes_with_mqtt_subprotocol() {
    let mut listener = bind("ws://127.0.0.1:0", None).await;
    let addr = listener.local_addr();
    let server = tokio::spawn(async move {
        let mut accepted = accept(&mut listener).await;
        assert_eq!(accepted.transport, Transport::Ws);
        // Two client messages: a packet split across them, then two packets in one.
        let mut buf = [0u8; 9];
        accepted.stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"\x30\x03abc\xc0\x00\xd0\x00");
        accepted.stream.write_all(b"\x20\x02").await.unwrap();
        accepted.stream.write_all(b"\x00\x00").await.unwrap();
        accepted.stream.flush().await.unwrap();
        accepted.stream.write_all(b"\xd0\x00").await.unwrap();
        // Close from the client reads as EOF.
        let mut rest = Vec::new();
        accepted.stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    });

    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(
        ws_request(&format!("ws://{addr}/mqtt"), Some("mqttv3.1, mqtt")),
        tcp,
    )
    .await
    .unwrap();
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "mqtt"
    );
    ws.send(Message::binary(b"\x30\x03a".to_vec()))
        .await
        .unwrap();
    ws.send(Message::binary(b"bc".to_vec())).await.unwrap();
    ws.send(Message::Ping(vec![1, 2].into())).await.unwrap();
    ws.send(Message::binary(b"\xc0\x00\xd0\x00".to_vec()))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        match timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Binary(b) => got.extend_from_slice(&b),
            Message::Pong(p) => assert_eq!(&p[..], &[1, 2]),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, b"\x20\x02\x00\x00");
    // Bytes written without an explicit flush still arrive, as over TCP.
    let mut got = Vec::new();
    while got.len() < 2 {
        match timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Binary(b) => got.extend_from_slice(&b),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, b"\xd0\x00");
    ws.close(None).await.unwrap();
    timeout(WAIT, server).await.unwrap().unwrap();
}

#[tokio::test]
async fn ws_wrong_path_is_refused_with_404() {
    let listener = bind("ws://127.0.0.1:0/mqtt", None).await;
    let addr = listener.local_addr();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let err = tokio_tungstenite::client_async(
        ws_request(&format!("ws://{addr}/other"), Some("mqtt")),
        tcp,
    )
    .await
    .unwrap_err();
    match err {
        WsError::Http(resp) => assert_eq!(resp.status(), 404),
        other => panic!("expected HTTP 404, got {other}"),
    }
}

#[tokio::test]
async fn ws_without_mqtt_subprotocol_is_refused_with_400() {
    let mut listener = bind("ws://127.0.0.1:0", None).await;
    let addr = listener.local_addr();
    for protocol in [None, Some("chat")] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let err = tokio_tungstenite::client_async(
            ws_request(&format!("ws://{addr}/mqtt"), protocol),
            tcp,
        )
        .await
        .unwrap_err();
        match err {
            WsError::Http(resp) => assert_eq!(resp.status(), 400, "{protocol:?}"),
            other => panic!("expected HTTP 400 for {protocol:?}, got {other}"),
        }
    }
    assert!(
        timeout(Duration::from_millis(300), listener.accept())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn ws_text_frame_is_a_read_error() {
    let mut listener = bind("ws://127.0.0.1:0", None).await;
    let addr = listener.local_addr();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(
        ws_request(&format!("ws://{addr}/mqtt"), Some("mqtt")),
        tcp,
    )
    .await
    .unwrap();
    let mut accepted = accept(&mut listener).await;
    ws.send(Message::text("not mqtt")).await.unwrap();
    let mut buf = [0u8; 8];
    let err = timeout(WAIT, accepted.stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains("MQTT-6.0.0-1"), "{err}");
}

#[tokio::test]
async fn wss_round_trips_bytes_and_reports_tls_info() {
    let pki = Pki::new();
    let mut listener = bind("wss://127.0.0.1:0/ws", Some(pki.files(false))).await;
    let addr = listener.local_addr();
    let tls = tls_connect(pki.client_config(None), addr, "localhost")
        .await
        .unwrap();
    let client = tokio::spawn(async move {
        let (mut ws, _) = tokio_tungstenite::client_async(
            ws_request(&format!("wss://localhost:{}/ws", addr.port()), Some("mqtt")),
            tls,
        )
        .await
        .unwrap();
        ws.send(Message::binary(b"secure".to_vec())).await.unwrap();
        match timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Binary(b) => assert_eq!(&b[..], b"secure"),
            other => panic!("unexpected {other:?}"),
        }
    });
    let accepted = accept(&mut listener).await;
    assert_eq!(accepted.transport, Transport::Wss);
    assert_eq!(
        accepted.tls.as_ref().unwrap().sni.as_deref(),
        Some("localhost")
    );
    spawn_echo(accepted);
    timeout(WAIT, client).await.unwrap().unwrap();
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    timeout(WAIT, tcp.read_to_string(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), body.to_owned())
}

#[tokio::test]
async fn admin_serves_metrics_health_and_readiness() {
    let listener = admin::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ready = Arc::new(AtomicBool::new(false));
    let render: admin::Render = Arc::new(|| "meridian_up 1\n".to_owned());
    tokio::spawn(admin::serve(listener, render, ready.clone()));

    let (status, head, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert_eq!(body, "meridian_up 1\n");

    let (status, _, body) = http_get(addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok"));

    assert_eq!(http_get(addr, "/readyz").await.0, 503);
    ready.store(true, Ordering::Release);
    assert_eq!(http_get(addr, "/readyz").await.0, 200);

    assert_eq!(http_get(addr, "/nope").await.0, 404);
}

#[tokio::test]
async fn admin_shuts_down_gracefully() {
    let listener = admin::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(admin::serve_with_shutdown(
        listener,
        Arc::new(String::new),
        Arc::new(AtomicBool::new(true)),
        async {
            let _ = stopped.await;
        },
    ));
    assert_eq!(http_get(addr, "/readyz").await.0, 200);
    stop.send(()).unwrap();
    timeout(WAIT, server).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn ws_large_writes_split_into_messages_and_reassemble() {
    let mut listener = bind("ws://127.0.0.1:0", None).await;
    let addr = listener.local_addr();
    let payload: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
    let expected = payload.clone();
    let server = tokio::spawn(async move {
        let mut accepted = accept(&mut listener).await;
        // One 200 KiB client message arrives intact through small reads.
        let mut got = vec![0u8; expected.len()];
        accepted.stream.read_exact(&mut got).await.unwrap();
        assert!(got == expected, "inbound bytes differ");
        accepted.stream.write_all(&expected).await.unwrap();
        accepted.stream.flush().await.unwrap();
        let mut rest = Vec::new();
        accepted.stream.read_to_end(&mut rest).await.unwrap();
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(
        ws_request(&format!("ws://{addr}/mqtt"), Some("mqtt")),
        tcp,
    )
    .await
    .unwrap();
    ws.send(Message::binary(payload.clone())).await.unwrap();
    let (mut got, mut messages) = (Vec::new(), 0);
    while got.len() < payload.len() {
        match timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap() {
            Message::Binary(b) => {
                messages += 1;
                got.extend_from_slice(&b);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(got == payload, "outbound bytes differ");
    assert!(messages > 1, "a 200 KiB write should span several messages");
    ws.close(None).await.unwrap();
    timeout(WAIT, server).await.unwrap().unwrap();
}
