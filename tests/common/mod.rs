//! Fixtures for binary-level end-to-end tests: start `meridian` as a real child process on free
//! loopback ports and wait until it accepts connections.
#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port that was free a moment ago (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn meridian() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
}

/// A broker node run as a child process; killed (SIGKILL) on drop.
pub struct BrokerProcess {
    pub child: Child,
    pub mqtt_port: u16,
    pub admin_port: u16,
}

impl BrokerProcess {
    pub fn start(data_dir: &Path, extra: &[&str]) -> BrokerProcess {
        let mqtt_port = free_port();
        let admin_port = free_port();
        let mut cmd = meridian();
        cmd.arg("broker")
            .arg("--listen")
            .arg(format!("mqtt://127.0.0.1:{mqtt_port}"))
            .arg("--admin")
            .arg(format!("127.0.0.1:{admin_port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--allow-anonymous")
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().expect("spawn meridian broker");
        let broker = BrokerProcess {
            child,
            mqtt_port,
            admin_port,
        };
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], mqtt_port)),
            Duration::from_secs(20),
        );
        broker
    }

    /// `kill -9`: no shutdown hook runs, nothing is flushed.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL broker");
        self.child.wait().unwrap();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {addr} after {timeout:?}");
}
