//! `meridian broker`: command-line flags (each overriding the config file) and the standalone run
//! loop (start, log listeners, wait for SIGTERM/Ctrl-C, shut down gracefully).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::broker::Broker;
use crate::config::{BrokerConfig, ControlPlaneConfig, FsyncMode, ListenerConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FsyncFlag {
    Always,
    Periodic,
}

/// Flags of `meridian broker`. Anything given here overrides the config file.
#[derive(Debug, Clone, Default, Args)]
pub struct BrokerArgs {
    /// TOML configuration file (see --print-default-config).
    #[arg(long, env = "MERIDIAN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listener URL: mqtt://, mqtts://, ws://host:port/path, wss://... Repeatable.
    /// Default (without a config file): mqtt://127.0.0.1:1883.
    #[arg(long = "listen", env = "MERIDIAN_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// PEM certificate chain for mqtts:// and wss:// listeners.
    #[arg(long, env = "MERIDIAN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for mqtts:// and wss:// listeners.
    #[arg(long, env = "MERIDIAN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates chaining to it.
    #[arg(long, env = "MERIDIAN_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Directory of the durable store; without it nothing survives a restart.
    #[arg(long, env = "MERIDIAN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Admin endpoint (/metrics, /healthz, /readyz). Default: 127.0.0.1:9600.
    #[arg(long, env = "MERIDIAN_ADMIN")]
    pub admin: Option<SocketAddr>,
    /// always: acknowledged = fsynced; periodic: fsync every fsync_interval_ms.
    #[arg(long, value_enum, env = "MERIDIAN_FSYNC")]
    pub fsync: Option<FsyncFlag>,
    /// Accept clients without a username even with a password file.
    #[arg(long)]
    pub allow_anonymous: bool,
    /// `username:$argon2id$...` lines.
    #[arg(long, env = "MERIDIAN_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// ACL rules `allow|deny publish|subscribe|all <filter> [user <name>|client <id>]`.
    #[arg(long, env = "MERIDIAN_ACL_FILE")]
    pub acl_file: Option<PathBuf>,
    /// PEM public key verifying client JWTs of token methods that carry no keys (repeatable).
    #[arg(long = "jwt-key", value_name = "FILE")]
    pub jwt_keys: Vec<PathBuf>,
    /// Control plane base URL (https://host:port): report to it and take snapshots from it.
    /// Needs --broker and --token.
    #[arg(long, env = "MERIDIAN_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// ARM id of the broker resource this node serves.
    #[arg(long = "broker", env = "MERIDIAN_BROKER_ID")]
    pub broker_id: Option<String>,
    /// Node token: bearer towards the control plane, and required on PUT /v1/snapshot.
    #[arg(long, env = "MERIDIAN_NODE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// This node's id in the control plane (default: hostname-adminport).
    #[arg(long, env = "MERIDIAN_NODE_ID")]
    pub node_id: Option<String>,
    /// PEM CA bundle trusted for the control plane's HTTPS certificate.
    #[arg(long, env = "MERIDIAN_CONTROL_PLANE_CA")]
    pub control_plane_ca: Option<PathBuf>,
    /// URL the control plane pushes snapshots to (default: http://ADMIN_ADDRESS).
    #[arg(long, env = "MERIDIAN_NODE_ENDPOINT")]
    pub node_endpoint: Option<String>,
    /// Address that listeners from applied snapshots bind on. Default: 0.0.0.0.
    #[arg(long, env = "MERIDIAN_SNAPSHOT_LISTENER_HOST")]
    pub snapshot_listener_host: Option<String>,
    /// Print the documented default configuration and exit.
    #[arg(long)]
    pub print_default_config: bool,
}

impl BrokerArgs {
    /// The config file (or defaults) with every given flag applied on top.
    pub fn into_config(self) -> anyhow::Result<BrokerConfig> {
        let mut cfg = match &self.config {
            Some(path) => BrokerConfig::from_file(path)?,
            None => BrokerConfig::default(),
        };
        if !self.listen.is_empty() {
            cfg.listeners = self
                .listen
                .iter()
                .map(|url| ListenerConfig::plain(url.clone()))
                .collect();
        }
        if self.tls_cert.is_some() || self.tls_key.is_some() || self.client_ca.is_some() {
            for l in &mut cfg.listeners {
                if l.url.starts_with("mqtts://") || l.url.starts_with("wss://") {
                    l.tls_cert = self.tls_cert.clone().or(l.tls_cert.take());
                    l.tls_key = self.tls_key.clone().or(l.tls_key.take());
                    l.client_ca = self.client_ca.clone().or(l.client_ca.take());
                }
            }
        }
        if let Some(d) = self.data_dir {
            cfg.data_dir = Some(d);
        }
        if let Some(a) = self.admin {
            cfg.admin = Some(a);
        }
        if let Some(f) = self.fsync {
            cfg.fsync = match f {
                FsyncFlag::Always => FsyncMode::Always,
                FsyncFlag::Periodic => FsyncMode::Periodic,
            };
        }
        if self.allow_anonymous {
            cfg.allow_anonymous = true;
        }
        if let Some(p) = self.password_file {
            cfg.password_file = Some(p);
        }
        if let Some(p) = self.acl_file {
            cfg.acl_file = Some(p);
        }
        if !self.jwt_keys.is_empty() {
            cfg.jwt_keys = self.jwt_keys;
        }
        if let Some(h) = self.snapshot_listener_host {
            cfg.snapshot_listener_host = h;
        }
        if let Some(url) = self.control_plane {
            let broker = self
                .broker_id
                .or_else(|| cfg.control_plane.as_ref().map(|c| c.broker.clone()))
                .context("--control-plane needs --broker ARM_ID (the broker this node serves)")?;
            let token = self
                .token
                .or_else(|| cfg.control_plane.as_ref().map(|c| c.token.clone()))
                .context("--control-plane needs --token (or MERIDIAN_NODE_TOKEN)")?;
            let old = cfg.control_plane.take();
            cfg.control_plane = Some(ControlPlaneConfig {
                url,
                broker,
                token,
                node_id: self
                    .node_id
                    .or_else(|| old.as_ref().and_then(|c| c.node_id.clone())),
                ca_file: self
                    .control_plane_ca
                    .or_else(|| old.as_ref().and_then(|c| c.ca_file.clone())),
                endpoint: self
                    .node_endpoint
                    .or_else(|| old.as_ref().and_then(|c| c.endpoint.clone())),
            });
        } else if let Some(cp) = &mut cfg.control_plane {
            // From the config file; flags still override single fields.
            if let Some(b) = self.broker_id {
                cp.broker = b;
            }
            if let Some(t) = self.token {
                cp.token = t;
            }
            if let Some(n) = self.node_id {
                cp.node_id = Some(n);
            }
            if let Some(c) = self.control_plane_ca {
                cp.ca_file = Some(c);
            }
            if let Some(e) = self.node_endpoint {
                cp.endpoint = Some(e);
            }
        } else if self.broker_id.is_some() || self.node_id.is_some() {
            anyhow::bail!("--broker and --node-id need --control-plane URL");
        }
        Ok(cfg)
    }
}

/// Run `meridian broker` until SIGTERM or Ctrl-C.
pub async fn run_cli(args: BrokerArgs) -> anyhow::Result<()> {
    if args.print_default_config {
        print!("{}", BrokerConfig::default_toml());
        return Ok(());
    }
    let cfg = args.into_config()?;
    let durability = match (&cfg.data_dir, cfg.fsync) {
        (None, _) => "no data dir: state is in memory only and lost on exit".to_string(),
        (Some(d), FsyncMode::Always) => format!(
            "data dir {}: fsync always (acknowledged messages are on disk)",
            d.display()
        ),
        (Some(d), FsyncMode::Periodic) => format!(
            "data dir {}: fsync periodic, a crash may lose up to the last {} ms of acknowledged messages",
            d.display(),
            cfg.fsync_interval_ms
        ),
    };
    let node = Broker::start(cfg).await.context("starting the broker")?;
    for (t, a) in node.listener_addrs() {
        tracing::info!("listening ({t:?}) on {a}");
        println!("meridian broker listening ({t:?}) on {a}");
    }
    if let Some(a) = node.admin_addr() {
        println!("admin endpoint on http://{a} (/metrics, /healthz, /readyz)");
    }
    println!("{durability}");
    shutdown_signal().await;
    println!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BrokerArgs,
    }

    #[test]
    fn flags_override_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b.toml");
        std::fs::write(
            &file,
            "fsync = \"always\"\n[limits]\nmax_connections = 7\n[[listeners]]\nurl = \"mqtt://127.0.0.1:1\"\n",
        )
        .unwrap();
        let cli = Cli::try_parse_from([
            "x",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "mqtt://127.0.0.1:0",
            "--listen",
            "ws://127.0.0.1:0/mqtt",
            "--fsync",
            "periodic",
            "--allow-anonymous",
        ])
        .unwrap();
        let cfg = cli.args.into_config().unwrap();
        assert_eq!(cfg.listeners.len(), 2);
        assert_eq!(cfg.listeners[1].url, "ws://127.0.0.1:0/mqtt");
        assert_eq!(cfg.fsync, FsyncMode::Periodic);
        assert!(cfg.allow_anonymous);
        assert_eq!(cfg.limits.max_connections, 7);
    }

    #[test]
    fn control_plane_flags_build_the_agent_config_and_need_broker_and_token() {
        let broker = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.IoTOperations/instances/i/brokers/b";
        let cli = Cli::try_parse_from([
            "x",
            "--control-plane",
            "https://127.0.0.1:8443",
            "--broker",
            broker,
            "--token",
            "sekrit",
            "--node-id",
            "edge-1",
            "--snapshot-listener-host",
            "127.0.0.1",
        ])
        .unwrap();
        let cfg = cli.args.into_config().unwrap();
        assert_eq!(cfg.snapshot_listener_host, "127.0.0.1");
        let cp = cfg.control_plane.expect("control plane");
        assert_eq!(cp.url, "https://127.0.0.1:8443");
        assert_eq!(cp.broker, broker);
        assert_eq!(cp.token, "sekrit");
        assert_eq!(cp.node_id.as_deref(), Some("edge-1"));
        assert!(
            !format!("{cp:?}").contains("sekrit"),
            "Debug redacts the token"
        );

        let no_broker = Cli::try_parse_from(["x", "--control-plane", "https://cp", "--token", "t"])
            .unwrap()
            .args
            .into_config()
            .unwrap_err();
        assert!(no_broker.to_string().contains("--broker"), "{no_broker}");
        let no_token =
            Cli::try_parse_from(["x", "--control-plane", "https://cp", "--broker", broker])
                .unwrap()
                .args
                .into_config()
                .unwrap_err();
        assert!(no_token.to_string().contains("--token"), "{no_token}");
    }

    #[test]
    fn no_flags_give_the_documented_defaults() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.args.into_config().unwrap(), BrokerConfig::default());
    }
}
