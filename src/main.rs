//! `meridian`: one binary for the whole platform. This file only parses arguments and wires the
//! crates together; behaviour lives in `meridian-broker` (data plane) and `meridian-api` (control
//! plane).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "meridian",
    version,
    about = "Self-hostable MQTT platform: broker node + ARM-style control plane"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything in one process: a broker node and the control plane (HTTPS, SQLite) under one
    /// data dir, with a printed Owner token.
    Dev(DevArgs),
    /// A standalone MQTT broker node.
    Broker(meridian_broker::BrokerArgs),
    /// The control plane (ARM-style resource provider).
    Api(meridian_api::ApiArgs),
    /// Mint a bearer token for the control plane.
    Token(meridian_api::TokenArgs),
    /// Deploy an ARM-style template through a running control plane.
    Apply(meridian_api::deployments::cli::ApplyArgs),
    /// Print the control plane's OpenAPI document.
    Openapi,
    /// Authorization tools.
    #[command(subcommand)]
    Authz(AuthzCommand),
}

#[derive(Debug, Subcommand)]
enum AuthzCommand {
    /// May client C publish/subscribe/connect on broker B, and which rule or binding decides?
    /// Exit status: 0 allowed, 1 denied, 2 error.
    Explain(meridian_api::explain::ExplainArgs),
}

#[derive(Debug, clap::Args)]
struct DevArgs {
    /// Where the broker store, the SQLite database, the JWT secret and the local CA live.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// MQTT listener of the broker node.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    mqtt_listen: String,
    /// Broker admin endpoint (/metrics, /healthz, /readyz).
    #[arg(long, default_value = "127.0.0.1:9600")]
    broker_admin: SocketAddr,
    /// HTTPS address of the control plane.
    #[arg(long, default_value = "127.0.0.1:8443")]
    api_listen: SocketAddr,
    /// Subscription the printed Owner token is scoped to.
    #[arg(long, default_value = "00000000-0000-0000-0000-000000000000")]
    subscription: String,
    /// ARM id of the broker resource the in-process node serves (default: instance `dev`,
    /// broker `default` in resource group `rg` of --subscription). Its listeners,
    /// authentications and authorizations are applied live to the node, bound on 127.0.0.1.
    #[arg(long)]
    broker_id: Option<String>,
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("MERIDIAN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("MERIDIAN_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    // The workspace's one rustls crypto provider, installed before any TLS config is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Command::Token(args) = cli.command {
        return meridian_api::run_token(args);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Dev(args) => dev(args).await,
            Command::Broker(args) => meridian_broker::run_cli(args).await,
            Command::Api(args) => meridian_api::run_api(args).await,
            Command::Apply(args) => {
                let result = meridian_api::deployments::cli::run_apply(&args).await?;
                println!("{}", serde_json::to_string_pretty(&result)?);
                Ok(())
            }
            Command::Authz(AuthzCommand::Explain(args)) => {
                match meridian_api::explain::run_explain(&args).await {
                    Ok(answer) => {
                        if args.json {
                            println!("{}", serde_json::to_string_pretty(&answer)?);
                        } else {
                            print!("{}", meridian_api::explain::render_explanation(&answer));
                        }
                        let allowed = answer["allowed"].as_bool().unwrap_or(false);
                        std::process::exit(if allowed { 0 } else { 1 });
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        std::process::exit(2);
                    }
                }
            }
            Command::Openapi => {
                println!("{}", meridian_api::openapi::current_json());
                Ok(())
            }
            Command::Token(_) => unreachable!("handled above"),
        }
    });
    if let Err(e) = &result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let broker_args = meridian_broker::BrokerArgs {
        listen: vec![args.mqtt_listen.clone()],
        data_dir: Some(args.data_dir.join("broker")),
        admin: Some(args.broker_admin),
        allow_anonymous: true,
        // Ports from broker listener resources: local only, like everything `dev` opens.
        snapshot_listener_host: Some("127.0.0.1".into()),
        ..Default::default()
    };
    let broker = meridian_broker::Broker::start(broker_args.into_config()?)
        .await
        .context("starting the broker node (change --mqtt-listen / --broker-admin)")?;

    let mut api_args = meridian_api::ApiArgs::for_data_dir(args.data_dir.join("api"));
    api_args.listen = args.api_listen;
    api_args.tls_self_signed = true;
    let api = meridian_api::start(api_args)
        .await
        .context("starting the control plane (change --api-listen)")?;
    let scope = format!("/subscriptions/{}", args.subscription);
    let token = api.token(meridian_api::auth::Role::Owner, &scope)?;
    // The same contract as remote nodes, in-process: the control plane pushes the broker's
    // snapshots to this node through `SnapshotSink` (no HTTP, no node token).
    let broker_id = args.broker_id.clone().unwrap_or_else(|| {
        format!(
            "/subscriptions/{}/resourceGroups/rg/providers/Microsoft.IoTOperations/instances/dev/brokers/default",
            args.subscription
        )
    });
    api.nodes
        .register_local("dev", &broker_id, std::sync::Arc::new(broker.handle()))
        .with_context(|| format!("--broker-id {broker_id}"))?;

    println!("Meridian dev is running (Ctrl-C to stop)");
    for (transport, addr) in broker.listener_addrs() {
        println!("  MQTT ({transport:?}):     {addr}");
    }
    if let Some(admin) = broker.admin_addr() {
        println!("  broker admin:    http://{admin}/metrics  /healthz  /readyz");
    }
    println!("  control plane:   {}", api.base_url);
    println!("  API docs:        {}/docs", api.base_url);
    if let Some(ca) = &api.ca_path {
        println!(
            "  CA certificate:  {}   (REQUESTS_CA_BUNDLE / curl --cacert)",
            ca.display()
        );
    }
    println!("  subscription:    {}", args.subscription);
    println!("  broker resource: {broker_id}   (node \"dev\", in-process)");
    println!("  Owner token:     {token}");
    println!(
        "  try: curl --cacert {} -H \"Authorization: Bearer $TOKEN\" '{}/subscriptions/{}/resourceGroups/rg/providers/Microsoft.EventGrid/namespaces?api-version=2025-02-15'",
        api.ca_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        api.base_url,
        args.subscription
    );
    wait_for_shutdown().await;
    println!("shutting down");
    api.shutdown().await;
    broker.shutdown().await;
    Ok(())
}

async fn wait_for_shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
