//! Command-line surface for the `meridian` binary: `meridian api` ([`ApiArgs`], [`run_api`]) and
//! `meridian token` ([`TokenArgs`], [`run_token`]), plus [`start`] for `meridian dev` and tests.
//!
//! `meridian api` provisions through broker nodes ([`crate::nodes::NodeProvisioner`]): nodes
//! register on `/meridian/nodes/{nodeId}`, and [`RunningApi::nodes`] lets an in-process caller
//! (`meridian dev`) register a local node.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::Args;

use crate::{
    auth::{Authenticator, Role, RoleGrant, load_or_create_secret},
    engine::{Engine, Provisioner},
    http::{ApiMetrics, AppState, OverTls, app_with_nodes},
    nodes::{NodeConfig, NodeProvisioner, NodeRegistry},
    store::{PostgresStore, SqliteStore, Store},
    tls,
};

/// Default token issuer.
pub const DEFAULT_ISSUER: &str = "meridian";
/// Default token audience.
pub const DEFAULT_AUDIENCE: &str = "meridian-api";

/// `meridian api`: the control plane.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Postgres URL; without it the API uses SQLite in the data dir.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Directory for the SQLite database, the JWT secret and generated certificates.
    #[arg(long, default_value = "meridian-data")]
    pub data_dir: PathBuf,
    /// PEM certificate chain to serve HTTPS with (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve HTTPS with a local CA and server certificate generated in the data dir.
    #[arg(long, conflicts_with = "tls_cert")]
    pub tls_self_signed: bool,
    /// HS256 secret for bearer tokens (default: generated into DATA_DIR/jwt-secret).
    #[arg(long, env = "MERIDIAN_JWT_SECRET")]
    pub jwt_secret: Option<String>,
    /// Expected token issuer (`iss`).
    #[arg(long, default_value = DEFAULT_ISSUER)]
    pub jwt_issuer: String,
    /// Expected token audience (`aud`).
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    pub jwt_audience: String,
    /// PEM public keys (RS256 or ES256) accepted for tokens; repeatable.
    #[arg(long)]
    pub jwt_public_key: Vec<PathBuf>,
    /// JWKS URL whose keys are accepted (fetched at start).
    #[arg(long)]
    pub jwks_url: Option<String>,
    /// How often broker nodes report ("5s", "500ms", "2m"; a bare number is seconds). Nodes
    /// are told in every answer (whole seconds, at least 1).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub node_report_interval: Duration,
    /// A node silent for this long is Unhealthy and no longer holds up provisioning
    /// (default: 3 × --node-report-interval).
    #[arg(long, value_parser = parse_duration)]
    pub node_timeout: Option<Duration>,
    /// Provisioning that waits longer than this for live nodes fails.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub provision_timeout: Duration,
}

/// Parses `500ms`, `5s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (try 500ms, 5s or 2m)"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("'{s}': unknown unit (use ms, s or m)")),
    }
}

impl ApiArgs {
    /// Defaults with `data_dir`, listening on an ephemeral loopback port (for `dev` and tests).
    pub fn for_data_dir(data_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            database_url: None,
            data_dir,
            tls_cert: None,
            tls_key: None,
            tls_self_signed: false,
            jwt_secret: None,
            jwt_issuer: DEFAULT_ISSUER.to_owned(),
            jwt_audience: DEFAULT_AUDIENCE.to_owned(),
            jwt_public_key: Vec::new(),
            jwks_url: None,
            node_report_interval: Duration::from_secs(5),
            node_timeout: None,
            provision_timeout: Duration::from_secs(300),
        }
    }

    /// The node timing these arguments describe.
    pub fn node_config(&self) -> NodeConfig {
        let mut c = NodeConfig::with_report_interval(self.node_report_interval);
        if let Some(t) = self.node_timeout {
            c.unhealthy_after = t;
        }
        c.provision_timeout = self.provision_timeout;
        c
    }
}

/// `meridian token`: mint a bearer token with the configured HS256 secret.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Role to grant: Owner, Contributor or Reader.
    #[arg(long, default_value = "Owner")]
    pub role: String,
    /// Scope: /subscriptions/{s} or /subscriptions/{s}/resourceGroups/{rg}.
    #[arg(long)]
    pub scope: String,
    /// Token subject (principal id).
    #[arg(long, default_value = "admin")]
    pub subject: String,
    /// Data dir holding the secret (same as the API's).
    #[arg(long, default_value = "meridian-data")]
    pub data_dir: PathBuf,
    /// HS256 secret (instead of the data dir's).
    #[arg(long, env = "MERIDIAN_JWT_SECRET")]
    pub jwt_secret: Option<String>,
    /// Issuer.
    #[arg(long, default_value = DEFAULT_ISSUER)]
    pub jwt_issuer: String,
    /// Audience.
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    pub jwt_audience: String,
    /// Lifetime in hours.
    #[arg(long, default_value_t = 24)]
    pub hours: u64,
}

/// A running API server.
#[derive(Debug)]
pub struct RunningApi {
    /// Bound address.
    pub addr: SocketAddr,
    /// `https://127.0.0.1:PORT` or `http://…`.
    pub base_url: String,
    /// CA certificate to trust when the server uses a generated certificate.
    pub ca_path: Option<PathBuf>,
    /// The engine (for in-process callers such as deployments).
    pub engine: Engine,
    /// The verifier (mints tokens when an HS256 secret is configured).
    pub auth: Arc<Authenticator>,
    /// The broker nodes and the pusher. `meridian dev` registers its in-process node here with
    /// [`NodeRegistry::register_local`].
    pub nodes: NodeRegistry,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningApi {
    /// Mints an HS256 token granting `role` at `scope` (24 h).
    pub fn token(&self, role: Role, scope: &str) -> anyhow::Result<String> {
        Ok(self.auth.mint(
            "admin",
            vec![RoleGrant {
                role,
                scope: scope.to_owned(),
            }],
            Duration::from_secs(24 * 3600),
        )?)
    }

    /// Stops accepting connections and waits for the accept loop to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Waits until the server stops (it only stops on shutdown or a fatal accept error).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Opens the store named by `args` (Postgres URL or SQLite in the data dir).
pub async fn open_store(args: &ApiArgs) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match &args.database_url {
        Some(url) if url.starts_with("postgres") => Arc::new(PostgresStore::connect(url).await?),
        Some(url) => Arc::new(SqliteStore::open_url(url).await?),
        None => {
            std::fs::create_dir_all(&args.data_dir)?;
            Arc::new(SqliteStore::open(&args.data_dir.join("meridian.db")).await?)
        }
    })
}

/// Builds the verifier described by `args`.
pub async fn authenticator(args: &ApiArgs) -> anyhow::Result<Authenticator> {
    let secret = match &args.jwt_secret {
        Some(s) => s.as_bytes().to_vec(),
        None => load_or_create_secret(&args.data_dir)?,
    };
    let mut auth =
        Authenticator::new(&args.jwt_issuer, &args.jwt_audience).with_hs256_secret(&secret);
    for path in &args.jwt_public_key {
        auth = auth.with_public_key_pem(&std::fs::read(path)?)?;
    }
    if let Some(url) = &args.jwks_url {
        auth = auth.with_jwks_url(url).await?;
    }
    Ok(auth)
}

/// Starts the API with the default types, provisioning through broker nodes
/// ([`NodeProvisioner`]).
pub async fn start(args: ApiArgs) -> anyhow::Result<RunningApi> {
    start_with(args, crate::resources::all_types(), None).await
}

/// Starts the API with explicit types and provisioner (`None` = [`NodeProvisioner`] over the
/// server's [`NodeRegistry`]). The node routes are served either way.
pub async fn start_with(
    args: ApiArgs,
    types: Vec<crate::engine::registry::ResourceTypeDecl>,
    provisioner: Option<Arc<dyn Provisioner>>,
) -> anyhow::Result<RunningApi> {
    tls::install_crypto_provider();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {}: cannot bind: {e}", args.listen))?;
    let addr = listener.local_addr()?;
    let store = open_store(&args).await?;
    let auth = Arc::new(authenticator(&args).await?);
    let nodes = NodeRegistry::new(store.clone(), args.node_config());
    let provisioner = provisioner.unwrap_or_else(|| Arc::new(NodeProvisioner::new(nodes.clone())));
    let engine = Engine::new(store, types, provisioner);
    let openapi = Arc::new(crate::openapi::document(engine.registry()));
    let state = AppState {
        engine: engine.clone(),
        auth: auth.clone(),
        metrics: Arc::new(ApiMetrics::new()),
        openapi,
    };
    let (tls_config, ca_path) = match (&args.tls_cert, &args.tls_key, args.tls_self_signed) {
        (Some(c), Some(k), _) => (Some(tls::server_config(c, k)?), None),
        (_, _, true) => {
            let ca = tls::ensure_local_ca(&args.data_dir)?;
            (
                Some(tls::server_config(&ca.server_cert, &ca.server_key)?),
                Some(ca.ca_cert),
            )
        }
        _ => (None, None),
    };
    let base_url = format!(
        "{}://{addr}",
        if tls_config.is_some() {
            "https"
        } else {
            "http"
        }
    );
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let router = app_with_nodes(state, nodes.clone());
    let task = tokio::spawn(serve(listener, router, tls_config, rx));
    Ok(RunningApi {
        addr,
        base_url,
        ca_path,
        engine,
        auth,
        nodes,
        shutdown,
        task,
    })
}

async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tls_config: Option<Arc<rustls::ServerConfig>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tls_config.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let router = router.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let over_tls = acceptor.is_some();
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(OverTls(over_tls));
                    let mut router = router.clone();
                    async move {
                        use tower::Service;
                        router.call(req.map(axum::body::Body::new)).await
                    }
                },
            );
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let result = match acceptor {
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => {
                        builder
                            .serve_connection_with_upgrades(
                                hyper_util::rt::TokioIo::new(tls),
                                service,
                            )
                            .await
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                },
                None => {
                    builder
                        .serve_connection_with_upgrades(
                            hyper_util::rt::TokioIo::new(stream),
                            service,
                        )
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// `meridian api`: runs until Ctrl-C.
pub async fn run_api(args: ApiArgs) -> anyhow::Result<()> {
    let running = start(args).await?;
    println!("meridian api listening on {}", running.base_url);
    if let Some(ca) = &running.ca_path {
        println!("CA certificate (REQUESTS_CA_BUNDLE): {}", ca.display());
    }
    tokio::signal::ctrl_c().await?;
    running.shutdown().await;
    Ok(())
}

/// `meridian token`: prints a bearer token.
pub fn run_token(args: TokenArgs) -> anyhow::Result<()> {
    let role = Role::parse(&args.role)
        .ok_or_else(|| anyhow::anyhow!("--role must be Owner, Contributor or Reader"))?;
    let grant = RoleGrant {
        role,
        scope: args.scope.clone(),
    };
    if !grant.covers(
        grant
            .scope
            .trim_matches('/')
            .split('/')
            .nth(1)
            .unwrap_or(""),
        grant.scope.trim_matches('/').split('/').nth(3),
    ) {
        anyhow::bail!(
            "--scope must be /subscriptions/{{s}} or /subscriptions/{{s}}/resourceGroups/{{rg}}"
        );
    }
    let secret = match &args.jwt_secret {
        Some(s) => s.as_bytes().to_vec(),
        None => load_or_create_secret(&args.data_dir)?,
    };
    let token = crate::auth::mint_hs256(
        &secret,
        &args.jwt_issuer,
        &args.jwt_audience,
        &args.subject,
        vec![grant],
        Duration::from_secs(args.hours * 3600),
    )?;
    println!("{token}");
    Ok(())
}
