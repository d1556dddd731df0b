//! The `meridian` command line as an operator meets it: documented defaults, clear errors.

mod common;

use std::net::TcpListener;

use common::meridian;

#[test]
fn broker_print_default_config_is_valid_toml() {
    let out = meridian()
        .args(["broker", "--print-default-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let parsed: toml::Value = toml::from_str(&text).expect("default config parses as TOML");
    assert!(
        parsed.as_table().is_some_and(|t| !t.is_empty()),
        "empty default config"
    );
    assert!(
        text.contains('#'),
        "default config is documented with comments"
    );
}

#[test]
fn broker_taken_port_names_the_flag() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = meridian()
        .args(["broker", "--allow-anonymous", "--admin", "127.0.0.1:0"])
        .arg("--listen")
        .arg(format!("mqtt://127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success(), "broker started on a taken port");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--listen"),
        "error does not name --listen: {err}"
    );
    assert!(
        err.contains(&port.to_string()),
        "error does not name the port: {err}"
    );
}

#[test]
fn broker_taken_admin_port_names_the_flag() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let out = meridian()
        .args([
            "broker",
            "--allow-anonymous",
            "--listen",
            "mqtt://127.0.0.1:0",
        ])
        .arg("--admin")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "broker started with a taken admin port"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--admin"),
        "error does not name --admin: {err}"
    );
}
