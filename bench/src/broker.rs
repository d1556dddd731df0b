//! Starting and stopping the brokers under test: Meridian from its release binary, Mosquitto from
//! a generated configuration. Each runs as a direct child (no shell) so its pid is the broker's and
//! `/proc/<pid>/status` gives the broker's own memory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Which broker a result belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum BrokerKind {
    Meridian,
    Mosquitto,
}

impl BrokerKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            BrokerKind::Meridian => "meridian",
            BrokerKind::Mosquitto => "mosquitto",
        }
    }
}

/// How to launch each broker.
#[derive(Debug, Clone)]
pub(crate) struct BrokerPaths {
    pub(crate) meridian: PathBuf,
    pub(crate) mosquitto: PathBuf,
    /// Extra arguments for `meridian broker` (e.g. `--fsync periodic`).
    pub(crate) meridian_args: Vec<String>,
    /// Mosquitto `max_inflight_messages` (outgoing QoS 1/2 window per client).
    pub(crate) mosquitto_inflight: u32,
}

/// A running broker; killed on drop.
pub(crate) struct RunningBroker {
    pub(crate) kind: BrokerKind,
    pub(crate) addr: String,
    child: Child,
    // Keeps the data dir / config alive for the broker's lifetime.
    _dir: tempfile::TempDir,
}

/// A port that was free a moment ago on loopback. The tiny race with other processes is accepted:
/// the broker fails loudly if it lost it, and the caller retries.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl RunningBroker {
    pub(crate) fn start(kind: BrokerKind, paths: &BrokerPaths) -> anyhow::Result<RunningBroker> {
        let mut last_err = None;
        for _ in 0..3 {
            match Self::start_once(kind, paths) {
                Ok(b) => return Ok(b),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn start_once(kind: BrokerKind, paths: &BrokerPaths) -> anyhow::Result<RunningBroker> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("meridian-bench-{}-", kind.name()))
            .tempdir()?;
        let port = free_port()?;
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(dir.path().join("broker.log"))?;
        let mut cmd = match kind {
            BrokerKind::Meridian => {
                let admin = free_port()?;
                let data = dir.path().join("data");
                std::fs::create_dir_all(&data)?;
                let mut c = Command::new(&paths.meridian);
                c.arg("broker")
                    .arg("--listen")
                    .arg(format!("mqtt://{addr}"))
                    .arg("--allow-anonymous")
                    .arg("--data-dir")
                    .arg(&data)
                    .arg("--admin")
                    .arg(format!("127.0.0.1:{admin}"))
                    .args(&paths.meridian_args);
                c
            }
            BrokerKind::Mosquitto => {
                let conf = dir.path().join("mosquitto.conf");
                std::fs::write(
                    &conf,
                    mosquitto_config(port, paths.mosquitto_inflight, dir.path()),
                )?;
                let mut c = Command::new(&paths.mosquitto);
                c.arg("-c").arg(&conf);
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "starting {} ({})",
                kind.name(),
                match kind {
                    BrokerKind::Meridian => paths.meridian.display(),
                    BrokerKind::Mosquitto => paths.mosquitto.display(),
                }
            )
        })?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                let log =
                    std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default();
                bail!(
                    "{} exited at start ({status}): {}",
                    kind.name(),
                    tail(&log, 1500)
                );
            }
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not listen on {addr} within 20 s", kind.name());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(RunningBroker {
            kind,
            addr,
            child,
            _dir: dir,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the broker process is still alive (a crash mid-scenario is reported, not hidden).
    pub(crate) fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Mosquitto as people run it, with changes so the scenarios measure the broker rather than its
/// default safety valves: the per-client queue (default 1000 messages, beyond which Mosquitto
/// silently drops QoS 1 even for online clients) is raised, persistence is off, and
/// TCP_NODELAY is on (without it Nagle's algorithm meets the subscriber's delayed ACKs and QoS 0
/// latency is ~10x worse, which would flatter Meridian). `user root` keeps it able to write
/// its log in our root-owned temp dir.
fn mosquitto_config(port: u16, inflight: u32, dir: &Path) -> String {
    format!(
        "# generated by meridian-bench\n\
         listener {port} 127.0.0.1\n\
         user root\n\
         allow_anonymous true\n\
         set_tcp_nodelay true\n\
         persistence false\n\
         max_connections -1\n\
         max_inflight_messages {inflight}\n\
         max_queued_messages 10000000\n\
         max_queued_bytes 0\n\
         log_dest file {}/mosquitto.log\n\
         log_type error\n\
         log_type warning\n",
        dir.display()
    )
}

/// Resident set size in bytes (VmRSS from /proc).
pub(crate) fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kb: u64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .context("parsing VmRSS")?;
            return Ok(kb * 1024);
        }
    }
    bail!("no VmRSS in /proc/{pid}/status")
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let mut i = start;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}
