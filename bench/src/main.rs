//! `meridian-bench`: our own MQTT load generator, comparing Meridian with Mosquitto side by side.
//!
//! `compare` starts each broker itself on a free loopback port (a fresh broker per scenario, so
//! one scenario's leftovers never slow the next), runs the issue-2 suite against both and prints
//! markdown tables with ratios, targets and the QoS contract check. `run` drives the same
//! scenarios against a broker that is already running.

mod authz;
mod broker;
mod client;
mod report;
mod scenario;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use meridian_codec::Protocol;

use broker::{BrokerKind, BrokerPaths, RunningBroker};
use report::{Cell, Results, Row};
use scenario::{Runner, Scenario, Settings};

#[derive(Parser)]
#[command(about = "Load generator comparing Meridian with Mosquitto")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start Meridian and Mosquitto, run every scenario against both, print the comparison.
    Compare(CompareArgs),
    /// Run the scenarios against an already running broker.
    Run(RunArgs),
    /// Authorization on the hot path: throughput with authorization off, with 1,000 IoT
    /// Operations rules and with an Event Grid namespace of 1,000 bindings, on snapshot
    /// listeners pushed to a `meridian broker` node this command starts (docs/benchmarks.md).
    Authz(authz::AuthzArgs),
}

#[derive(Args, Clone)]
struct Common {
    /// Payload size in bytes (at least 20: publisher, sequence and timestamp).
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Seconds of publishing per throughput and latency scenario.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// QoS 1 publisher window (unacknowledged messages per publisher).
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// MQTT protocol version for bench clients: 4 (3.1.1) or 5.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(4..=5))]
    protocol: u8,
    /// Total publish rate of the latency scenarios.
    #[arg(long, default_value_t = 10_000)]
    latency_rate: u64,
    /// Rounds of each latency scenario per broker (`compare`: interleaved across the brokers,
    /// each on a fresh broker; `run`: back to back), pooled into one histogram per broker.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    latency_rounds: u32,
    /// Connections in the idle scenario.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Connection attempts in flight at once in the idle scenario.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Maximum seconds to wait for in-transit messages after publishing stops.
    #[arg(long, default_value_t = 30.0)]
    drain_timeout: f64,
    /// Comma-separated scenario keys (default: all). Keys: tp-1-1-q0, tp-1-1-q1, tp-100-1-q0,
    /// tp-100-1-q1, tp-1-100-q0, lat-q0, lat-q1, idle; any tp-P-S-qN is accepted.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Also write the markdown tables to this file.
    #[arg(long)]
    markdown_out: Option<PathBuf>,
    /// Also write the raw results as JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

#[derive(Args)]
struct CompareArgs {
    #[command(flatten)]
    common: Common,
    /// The Meridian binary (default: `meridian` next to this executable, else target/release).
    #[arg(long, env = "MERIDIAN_BIN")]
    meridian_bin: Option<PathBuf>,
    /// The Mosquitto binary.
    #[arg(long, default_value = "mosquitto")]
    mosquitto_bin: PathBuf,
    /// Extra argument for `meridian broker` (repeatable), e.g. `--meridian-arg=--fsync=periodic`.
    #[arg(long, allow_hyphen_values = true)]
    meridian_arg: Vec<String>,
    /// Mosquitto `max_inflight_messages`, its outgoing QoS 1 window (kept equal to ours).
    #[arg(long, default_value_t = 100)]
    mosquitto_inflight: u32,
    /// Per-session queue limit for both brokers (QoS 1/2 messages beyond the in-flight window).
    #[arg(long, default_value_t = 10_000_000)]
    queue_limit: u64,
    /// Brokers to run (comma-separated): meridian, mosquitto.
    #[arg(long, value_delimiter = ',', default_value = "mosquitto,meridian")]
    brokers: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// host:port of the broker.
    #[arg(long)]
    addr: String,
    /// The broker's pid, for the idle scenario's RSS measurement.
    #[arg(long)]
    pid: Option<u32>,
}

fn settings(c: &Common) -> Settings {
    Settings {
        payload: c.payload.max(20),
        duration: Duration::from_secs_f64(c.duration),
        inflight: c.inflight.max(1),
        protocol: if c.protocol == 5 {
            Protocol::V5
        } else {
            Protocol::V311
        },
        latency_rate: c.latency_rate,
        latency_rounds: c.latency_rounds,
        idle_connections: c.idle_connections,
        connect_concurrency: c.connect_concurrency,
        drain_timeout: Duration::from_secs_f64(c.drain_timeout),
    }
}

fn parse_scenarios(keys: &[String]) -> anyhow::Result<Vec<Scenario>> {
    if keys.is_empty() {
        return Ok(Scenario::suite());
    }
    keys.iter()
        .map(|k| {
            let k = k.trim();
            let q = |s: &str| match s {
                "q0" => Ok(meridian_codec::QoS::AtMostOnce),
                "q1" => Ok(meridian_codec::QoS::AtLeastOnce),
                _ => bail!("bad QoS in scenario {k} (q0 or q1)"),
            };
            let parts: Vec<&str> = k.split('-').collect();
            match parts.as_slice() {
                ["idle"] => Ok(Scenario::Idle),
                ["lat", qos] => Ok(Scenario::Latency { qos: q(qos)? }),
                ["tp", p, s, qos] => Ok(Scenario::Throughput {
                    publishers: p.parse().context("publishers")?,
                    subscribers: s.parse().context("subscribers")?,
                    qos: q(qos)?,
                }),
                _ => bail!("unknown scenario {k}"),
            }
        })
        .collect()
}

/// 10,000 idle connections need more descriptors than the usual soft limit of 1024; children
/// (the brokers) inherit the raised limit.
fn raise_fd_limit(need: u64) {
    match rlimit::increase_nofile_limit(need) {
        Ok(n) if n < need => eprintln!(
            "warning: open-file limit is {n}, below the {need} the idle scenario needs (raise the hard limit)"
        ),
        Ok(_) => {}
        Err(e) => eprintln!("warning: could not raise the open-file limit: {e}"),
    }
}

fn default_meridian_bin() -> PathBuf {
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        let sibling = dir.join("meridian");
        if sibling.exists() {
            return sibling;
        }
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/meridian")
}

fn timeout_for(s: &Settings) -> Duration {
    s.duration + s.drain_timeout * 2 + Duration::from_secs(120)
}

fn print_results(
    results: &Results,
    s: &Settings,
    scenarios: &[Scenario],
    c: &Common,
) -> anyhow::Result<()> {
    let md = format!(
        "Settings: {}\n\n{}\nQoS contract (violations: QoS 1 loss of acknowledged messages, QoS 0 duplicates, reordering, corrupt payloads):\n\n{}\nTotal contract violations: {}\n",
        report::settings_line(s, scenarios),
        results.comparison(),
        results.contract(),
        results.total_violations()
    );
    println!("\n{md}");
    if let Some(p) = &c.markdown_out {
        std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &c.json_out {
        std::fs::write(p, serde_json::to_string_pretty(results)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

async fn compare(
    a: CompareArgs,
    subscriber_runtime: tokio::runtime::Handle,
) -> anyhow::Result<u64> {
    let s = settings(&a.common);
    let scenarios = parse_scenarios(&a.common.scenarios)?;
    raise_fd_limit(s.idle_connections as u64 + 1024);
    let paths = BrokerPaths {
        meridian: a.meridian_bin.clone().unwrap_or_else(default_meridian_bin),
        mosquitto: a.mosquitto_bin.clone(),
        meridian_args: a.meridian_arg.clone(),
        mosquitto_inflight: a.mosquitto_inflight,
        queue_limit: a.queue_limit,
    };
    let mut kinds = Vec::new();
    for b in &a.brokers {
        match b.trim() {
            "meridian" => kinds.push(BrokerKind::Meridian),
            "mosquitto" => kinds.push(BrokerKind::Mosquitto),
            other => bail!("unknown broker {other} (meridian or mosquitto)"),
        }
    }
    eprintln!("meridian: {}", paths.meridian.display());
    eprintln!("mosquitto: {}", paths.mosquitto.display());
    eprintln!("{}", report::settings_line(&s, &scenarios));

    let mut results = Results::default();
    // A broker that cannot start is not retried for every scenario: its column stays "pending".
    let mut unavailable: Vec<BrokerKind> = Vec::new();
    for sc in &scenarios {
        let label = sc.label(&s);
        let mut row = Row {
            key: sc.key(),
            label: label.clone(),
            meridian: Cell::NotRun,
            mosquitto: Cell::NotRun,
        };
        // Latency scenarios run in interleaved rounds (Mosquitto, Meridian, Mosquitto, ...), each
        // on a fresh broker, pooled per broker: a noisy stretch of time hits both, not one.
        let rounds = sc.rounds(&s);
        for round in 1..=rounds {
            for &kind in &kinds {
                if unavailable.contains(&kind) {
                    continue;
                }
                eprintln!(
                    "== {label} on {}{} ==",
                    kind.name(),
                    round_tag(round, rounds)
                );
                let cell = match RunningBroker::start(kind, &paths) {
                    Err(e) => {
                        eprintln!("  {} unavailable: {e:#}", kind.name());
                        unavailable.push(kind);
                        Cell::NotRun
                    }
                    Ok(mut b) => {
                        let runner = Runner::new(
                            b.addr.clone(),
                            s.clone(),
                            format!("{} {}", b.kind.name(), sc.key()),
                            subscriber_runtime.clone(),
                        );
                        let r =
                            tokio::time::timeout(timeout_for(&s), runner.run(*sc, Some(b.pid())))
                                .await;
                        let alive = b.alive();
                        match r {
                            Ok(Ok(mut o)) if alive => {
                                if let (Some(admin), Some(c)) = (&b.admin, o.contract.as_mut()) {
                                    c.broker_drops = broker::meridian_drops(admin)
                                        .map_err(|e| eprintln!("  (no metrics: {e:#})"))
                                        .ok();
                                }
                                Cell::Done(o)
                            }
                            Ok(Ok(_)) => Cell::Failed("broker died during the scenario".into()),
                            Ok(Err(e)) => Cell::Failed(format!(
                                "{e:#}{}",
                                if alive { "" } else { " (broker died)" }
                            )),
                            Err(_) => Cell::Failed("scenario timed out".into()),
                        }
                    }
                };
                match &cell {
                    Cell::Done(o) => eprintln!("  result: {}", one_line(o)),
                    Cell::Failed(e) => eprintln!("  FAILED: {e}"),
                    Cell::NotRun => {}
                }
                let slot = match kind {
                    BrokerKind::Meridian => &mut row.meridian,
                    BrokerKind::Mosquitto => &mut row.mosquitto,
                };
                pool_cell(slot, cell);
                // Sockets from the previous run linger in TIME_WAIT; a short pause keeps runs apart.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        results.rows.push(row);
    }
    print_results(&results, &s, &scenarios, &a.common)?;
    Ok(results.total_violations())
}

fn round_tag(round: u32, rounds: u32) -> String {
    if rounds > 1 {
        format!(" (round {round}/{rounds})")
    } else {
        String::new()
    }
}

/// Pool one round's result into the broker's cell: a failed round fails the cell.
fn pool_cell(slot: &mut Cell, round: Cell) {
    let current = std::mem::replace(slot, Cell::NotRun);
    *slot = match (current, round) {
        (Cell::NotRun, r) => r,
        (c, Cell::NotRun) => c,
        (Cell::Failed(e), _) => Cell::Failed(e),
        (Cell::Done(_), Cell::Failed(e)) => Cell::Failed(format!("a later round failed: {e}")),
        (Cell::Done(mut a), Cell::Done(b)) => match a.pool(b) {
            Ok(()) => Cell::Done(a),
            Err(e) => Cell::Failed(format!("pooling rounds: {e:#}")),
        },
    };
}

fn one_line(o: &scenario::Outcome) -> String {
    let mut parts = Vec::new();
    if let Some(r) = o.rate {
        parts.push(format!("{r:.0} msg/s"));
    }
    if let Some([a, b, c]) = o.latency_us {
        parts.push(format!("p50 {a} µs p99 {b} µs p99.9 {c} µs"));
    }
    if let Some(r) = o.rss_per_connection {
        parts.push(format!("{r:.0} B RSS/connection"));
    }
    if let Some(r) = o.connect_rate {
        parts.push(format!("{r:.0} connects/s"));
    }
    if let Some(c) = &o.contract {
        parts.push(format!(
            "sent {} acked {} delivered {} lost {} dup {} reordered {} violations {}",
            c.sent, c.acked, c.delivered, c.lost, c.duplicates, c.reordered, c.violations
        ));
    }
    parts.join(", ")
}

async fn run(a: RunArgs, subscriber_runtime: tokio::runtime::Handle) -> anyhow::Result<u64> {
    let s = settings(&a.common);
    let scenarios = parse_scenarios(&a.common.scenarios)?;
    raise_fd_limit(s.idle_connections as u64 + 1024);
    let mut results = Results::default();
    for sc in &scenarios {
        let label = sc.label(&s);
        eprintln!("== {label} on {} ==", a.addr);
        let runner = Runner::new(
            a.addr.clone(),
            s.clone(),
            sc.key(),
            subscriber_runtime.clone(),
        );
        let rounds = sc.rounds(&s);
        let mut cell = Cell::NotRun;
        for round in 1..=rounds {
            if rounds > 1 {
                eprintln!("  round {round}/{rounds}");
            }
            let r = match tokio::time::timeout(timeout_for(&s), runner.run(*sc, a.pid)).await {
                Ok(Ok(o)) => {
                    eprintln!("  result: {}", one_line(&o));
                    Cell::Done(o)
                }
                Ok(Err(e)) => Cell::Failed(format!("{e:#}")),
                Err(_) => Cell::Failed("scenario timed out".into()),
            };
            pool_cell(&mut cell, r);
        }
        // `run` has one broker; it is shown in the Meridian column.
        results.rows.push(Row {
            key: sc.key(),
            label,
            meridian: cell,
            mosquitto: Cell::NotRun,
        });
    }
    print_results(&results, &s, &scenarios, &a.common)?;
    Ok(results.total_violations())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Publishers and connection setup on the main runtime; subscribers on a second one (its own
    // OS thread) so the OS, not tokio's scheduler, shares the CPU between the two sides.
    let subscribers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-subscribers")
        .enable_all()
        .build()?;
    let main_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let handle = subscribers.handle().clone();
    let (violations, authz_failed) = main_rt.block_on(async move {
        anyhow::Ok(match cli.command {
            Command::Compare(a) => (compare(a, handle).await?, false),
            Command::Run(a) => (run(a, handle).await?, false),
            Command::Authz(a) => (0, !authz::authz(a, handle).await?),
        })
    })?;
    subscribers.shutdown_background();
    main_rt.shutdown_background();
    if authz_failed {
        eprintln!("authorization benchmark: FAIL (see the table)");
        std::process::exit(1);
    }
    if violations > 0 {
        eprintln!("{violations} QoS contract violations");
        std::process::exit(2);
    }
    Ok(())
}
