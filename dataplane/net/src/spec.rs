//! Parsing listener URLs (`mqtt://`, `mqtts://`, `ws://`, `wss://`) into [`ListenerSpec`].

use std::net::{SocketAddr, ToSocketAddrs};

use crate::{ListenerSpec, NetError, TlsFiles, Transport};

/// The WebSocket path when the URL names none.
pub const DEFAULT_WS_PATH: &str = "/mqtt";

impl ListenerSpec {
    /// Parse a listener URL; `tls` is required for `mqtts`/`wss` (and ignored for plain ones).
    pub fn parse(url: &str, tls: Option<TlsFiles>) -> Result<ListenerSpec, NetError> {
        let invalid = |reason: String| NetError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            invalid("expected scheme://host:port with scheme mqtt, mqtts, ws or wss".into())
        })?;
        let transport = match scheme.to_ascii_lowercase().as_str() {
            "mqtt" => Transport::Tcp,
            "mqtts" => Transport::Tls,
            "ws" => Transport::Ws,
            "wss" => Transport::Wss,
            other => {
                return Err(invalid(format!(
                    "unknown scheme {other:?}; expected mqtt, mqtts, ws or wss"
                )));
            }
        };
        if rest.contains(['?', '#']) {
            return Err(invalid(
                "query strings and fragments are not supported".into(),
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(invalid(
                "user information in the URL is not supported".into(),
            ));
        }
        let ws_path = if transport.is_websocket() {
            if path.is_empty() {
                DEFAULT_WS_PATH.to_owned()
            } else {
                path.to_owned()
            }
        } else {
            if !path.is_empty() && path != "/" {
                return Err(invalid(format!(
                    "a path ({path}) only applies to ws:// and wss:// listeners"
                )));
            }
            DEFAULT_WS_PATH.to_owned()
        };
        let addr = parse_authority(authority).map_err(invalid)?;

        let tls = if transport.is_tls() {
            let files = tls.ok_or_else(|| {
                invalid(format!(
                    "{scheme}:// needs a TLS certificate and key (PEM files)"
                ))
            })?;
            check_file("TLS certificate", &files.cert).map_err(invalid)?;
            check_file("TLS private key", &files.key).map_err(invalid)?;
            if let Some(ca) = &files.client_ca {
                check_file("client CA bundle", ca).map_err(invalid)?;
            }
            Some(files)
        } else {
            None
        };
        Ok(ListenerSpec {
            transport,
            addr,
            ws_path,
            tls,
        })
    }
}

fn check_file(what: &str, path: &std::path::Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{what} {} is not a file", path.display())),
        Err(e) => Err(format!("{what} {}: {e}", path.display())),
    }
}

/// `host:port`, `[v6]:port`; host names are resolved (first address wins).
fn parse_authority(authority: &str) -> Result<SocketAddr, String> {
    if authority.is_empty() {
        return Err("missing host and port (e.g. 0.0.0.0:1883)".into());
    }
    if let Ok(addr) = authority.parse::<SocketAddr>() {
        return Ok(addr);
    }
    // Split off the port after the last ':' that is outside an IPv6 bracket.
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], &authority[i + 1..]),
        _ => {
            return Err(format!(
                "missing port in {authority:?} (e.g. {authority}:1883)"
            ));
        }
    };
    if port.is_empty() {
        return Err(format!("missing port in {authority:?}"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("invalid port {port:?} (expected 0-65535)"))?;
    if host.is_empty() {
        return Err("missing host (use 0.0.0.0 for all interfaces)".into());
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve host {host:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("host {host:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn reason(r: Result<ListenerSpec, NetError>) -> String {
        match r {
            Err(NetError::InvalidUrl { reason, .. }) => reason,
            other => panic!("expected InvalidUrl, got {other:?}"),
        }
    }

    #[test]
    fn parses_plain_tcp() {
        let s = ListenerSpec::parse("mqtt://127.0.0.1:1883", None).unwrap();
        assert_eq!(s.transport, Transport::Tcp);
        assert_eq!(s.addr, "127.0.0.1:1883".parse().unwrap());
        assert!(s.tls.is_none());
    }

    #[test]
    fn parses_ipv6_and_localhost() {
        let s = ListenerSpec::parse("mqtt://[::1]:1883", None).unwrap();
        assert_eq!(s.addr, "[::1]:1883".parse().unwrap());
        let s = ListenerSpec::parse("ws://localhost:8080", None).unwrap();
        assert_eq!(s.addr.port(), 8080);
        assert!(s.addr.ip().is_loopback());
    }

    #[test]
    fn websocket_path_defaults_to_mqtt_and_can_be_set() {
        let s = ListenerSpec::parse("ws://0.0.0.0:8080", None).unwrap();
        assert_eq!((s.transport, s.ws_path.as_str()), (Transport::Ws, "/mqtt"));
        let s = ListenerSpec::parse("ws://0.0.0.0:8080/broker/ws", None).unwrap();
        assert_eq!(s.ws_path, "/broker/ws");
    }

    #[test]
    fn rejects_unknown_scheme() {
        let r = reason(ListenerSpec::parse("http://0.0.0.0:80", None));
        assert!(r.contains("unknown scheme \"http\""), "{r}");
        let r = reason(ListenerSpec::parse("0.0.0.0:1883", None));
        assert!(r.contains("scheme"), "{r}");
    }

    #[test]
    fn rejects_missing_or_bad_port() {
        let r = reason(ListenerSpec::parse("mqtt://127.0.0.1", None));
        assert!(r.contains("missing port"), "{r}");
        let r = reason(ListenerSpec::parse("mqtt://127.0.0.1:", None));
        assert!(r.contains("missing port"), "{r}");
        let r = reason(ListenerSpec::parse("mqtt://127.0.0.1:99999", None));
        assert!(r.contains("invalid port"), "{r}");
        let r = reason(ListenerSpec::parse("ws://[::1]/mqtt", None));
        assert!(r.contains("missing port"), "{r}");
    }

    #[test]
    fn rejects_path_on_plain_mqtt() {
        let r = reason(ListenerSpec::parse("mqtt://127.0.0.1:1883/x", None));
        assert!(r.contains("only applies to ws"), "{r}");
    }

    #[test]
    fn tls_schemes_require_existing_files() {
        let r = reason(ListenerSpec::parse("mqtts://127.0.0.1:8883", None));
        assert!(r.contains("needs a TLS certificate and key"), "{r}");

        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, "x").unwrap();
        let files = |client_ca: Option<PathBuf>| TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca,
            client_cert_optional: false,
        };
        let r = reason(ListenerSpec::parse(
            "wss://127.0.0.1:8443",
            Some(files(None)),
        ));
        assert!(
            r.contains("TLS private key") && r.contains("key.pem"),
            "{r}"
        );

        std::fs::write(&key, "x").unwrap();
        let s = ListenerSpec::parse("wss://127.0.0.1:8443", Some(files(None))).unwrap();
        assert_eq!(s.transport, Transport::Wss);
        assert_eq!(s.tls, Some(files(None)));

        let missing_ca = dir.path().join("ca.pem");
        let r = reason(ListenerSpec::parse(
            "mqtts://127.0.0.1:8883",
            Some(files(Some(missing_ca))),
        ));
        assert!(r.contains("client CA bundle"), "{r}");
    }

    #[test]
    fn plain_schemes_drop_tls_files() {
        let files = TlsFiles {
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/k.pem".into(),
            client_ca: None,
            client_cert_optional: false,
        };
        let s = ListenerSpec::parse("mqtt://127.0.0.1:1883", Some(files)).unwrap();
        assert!(s.tls.is_none());
    }
}
