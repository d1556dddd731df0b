//! Rendering results as markdown tables: the comparison with ratios and targets, and the QoS
//! contract per scenario and broker.

use std::fmt::Write;

use crate::broker::BrokerKind;
use crate::scenario::{Outcome, Scenario, Settings};

/// One scenario's result on one broker: measured, failed, or not run.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) enum Cell {
    Done(Outcome),
    Failed(String),
    NotRun,
}

impl Cell {
    fn outcome(&self) -> Option<&Outcome> {
        match self {
            Cell::Done(o) => Some(o),
            _ => None,
        }
    }
}

/// Results for every scenario, one cell per broker.
#[derive(Debug, Default, serde::Serialize)]
pub(crate) struct Results {
    pub(crate) rows: Vec<Row>,
}

/// One scenario: its key (see [`Scenario::key`]), its label and a cell per broker.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Row {
    pub(crate) key: String,
    pub(crate) label: String,
    pub(crate) meridian: Cell,
    pub(crate) mosquitto: Cell,
}

/// A metric line: name, how to read it from an outcome, how to print it, its target.
type Metric = (
    &'static str,
    fn(&Outcome) -> Option<f64>,
    fn(f64) -> String,
    Target,
);

/// Which way is better for a metric, and the target for it.
#[derive(Clone, Copy)]
enum Target {
    /// Meridian ≥ k × Mosquitto.
    AtLeastTimes(f64),
    /// Meridian ≤ Mosquitto.
    NoWorse,
    /// Meridian ≤ an absolute bound.
    AtMost(f64, &'static str),
    None,
}

pub(crate) fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M/s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k/s", v / 1e3)
    } else {
        format!("{v:.0} /s")
    }
}

fn fmt_us(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

fn fmt_bytes(v: f64) -> String {
    if v >= 1024.0 {
        format!("{:.2} KiB", v / 1024.0)
    } else {
        format!("{v:.0} B")
    }
}

fn cell_text(c: &Cell, v: Option<f64>, f: fn(f64) -> String) -> String {
    match (c, v) {
        (Cell::Done(_), Some(v)) => f(v),
        (Cell::Done(_), None) => "n/a".into(),
        (Cell::Failed(_), _) => "failed".into(),
        (Cell::NotRun, _) => "pending".into(),
    }
}

impl Results {
    /// The comparison table: one line per metric.
    pub(crate) fn comparison(&self) -> String {
        let mut t = String::new();
        t.push_str(
            "| Scenario | Metric | Mosquitto | Meridian | Meridian / Mosquitto | Target | Met |\n",
        );
        t.push_str("|---|---|---:|---:|---:|---|---|\n");
        for Row {
            key,
            label,
            meridian: mer,
            mosquitto: mos,
        } in &self.rows
        {
            let metrics: Vec<Metric> = if key == "idle" {
                vec![
                    (
                        "RSS per connection",
                        |o| o.rss_per_connection,
                        fmt_bytes,
                        Target::AtMost(2048.0, "≤ 2 KiB"),
                    ),
                    ("connect rate", |o| o.connect_rate, fmt_rate, Target::None),
                ]
            } else if key.starts_with("lat-") {
                vec![
                    ("p50", |o| o.latency_us.map(|l| l[0]), fmt_us, Target::None),
                    (
                        "p99",
                        |o| o.latency_us.map(|l| l[1]),
                        fmt_us,
                        Target::NoWorse,
                    ),
                    (
                        "p99.9",
                        |o| o.latency_us.map(|l| l[2]),
                        fmt_us,
                        Target::None,
                    ),
                ]
            } else {
                let m = if key.starts_with("tp-1-") && !key.starts_with("tp-1-1-") {
                    "deliveries/s"
                } else {
                    "msg/s"
                };
                vec![(m, |o| o.rate, fmt_rate, Target::AtLeastTimes(3.0))]
            };
            for (metric, get, f, target) in metrics {
                let a = mer.outcome().and_then(get);
                let b = mos.outcome().and_then(get);
                let ratio = match (a, b) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
                    _ => "–".into(),
                };
                let (target_text, met) = match target {
                    Target::AtLeastTimes(k) => {
                        (format!("≥ {k}×"), a.zip(b).map(|(a, b)| a >= k * b))
                    }
                    Target::NoWorse => ("≤ Mosquitto".to_string(), a.zip(b).map(|(a, b)| a <= b)),
                    Target::AtMost(v, text) => (text.to_string(), a.map(|a| a <= v)),
                    Target::None => (String::new(), None),
                };
                let met = match (met, &target) {
                    (_, Target::None) => "",
                    (Some(true), _) => "yes",
                    (Some(false), _) => "**no**",
                    (None, _) => "–",
                };
                let _ = writeln!(
                    t,
                    "| {label} | {metric} | {} | {} | {ratio} | {target_text} | {met} |",
                    cell_text(mos, b, f),
                    cell_text(mer, a, f),
                );
            }
            // With pooled rounds, how far apart the rounds were: a verdict inside this spread
            // is a tie that one more round could flip.
            let spread = |c: &Cell| {
                let o = c.outcome()?;
                let lo = o.round_p99_us.iter().copied().reduce(f64::min)?;
                let hi = o.round_p99_us.iter().copied().reduce(f64::max)?;
                (o.round_p99_us.len() > 1).then(|| {
                    format!(
                        "{}–{} ({} rounds)",
                        fmt_us(lo),
                        fmt_us(hi),
                        o.round_p99_us.len()
                    )
                })
            };
            if key.starts_with("lat-") && (spread(mer).is_some() || spread(mos).is_some()) {
                let _ = writeln!(
                    t,
                    "| {label} | p99 of each round | {} | {} |  |  |  |",
                    spread(mos).unwrap_or_else(|| "–".into()),
                    spread(mer).unwrap_or_else(|| "–".into()),
                );
            }
        }
        t
    }

    /// The QoS contract table: loss, duplicates, ordering per scenario and broker.
    pub(crate) fn contract(&self) -> String {
        let mut t = String::new();
        t.push_str("| Scenario | Broker | sent | acked | expected | delivered | lost | duplicates | reordered | corrupt | violations | broker-reported drops |\n");
        t.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for Row {
            label,
            meridian: mer,
            mosquitto: mos,
            ..
        } in &self.rows
        {
            for (kind, cell) in [(BrokerKind::Mosquitto, mos), (BrokerKind::Meridian, mer)] {
                match cell {
                    Cell::Done(o) => {
                        if let Some(c) = &o.contract {
                            let _ = writeln!(
                                t,
                                "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                                kind.name(),
                                c.sent,
                                c.acked,
                                c.expected,
                                c.delivered,
                                c.lost,
                                c.duplicates,
                                c.reordered,
                                c.corrupt,
                                if c.violations == 0 {
                                    "0".to_string()
                                } else {
                                    format!("**{}**", c.violations)
                                },
                                c.broker_drops.as_deref().unwrap_or("n/a")
                            );
                        }
                    }
                    Cell::Failed(e) => {
                        let e = e.replace('|', "/").replace('\n', " ");
                        let _ = writeln!(
                            t,
                            "| {label} | {} | failed: {e} | | | | | | | | | |",
                            kind.name()
                        );
                    }
                    Cell::NotRun => {}
                }
            }
        }
        t
    }

    pub(crate) fn total_violations(&self) -> u64 {
        self.rows
            .iter()
            .flat_map(|r| [&r.meridian, &r.mosquitto])
            .filter_map(|c| c.outcome()?.contract.as_ref().map(|c| c.violations))
            .sum()
    }
}

/// The settings line printed above the tables.
pub(crate) fn settings_line(s: &Settings, scenarios: &[Scenario]) -> String {
    format!(
        "payload {} B, {} s per throughput/latency scenario, latency pooled over {} round(s) per broker, QoS 1 window {}, MQTT {}, {} idle connections, scenarios: {}",
        s.payload,
        s.duration.as_secs_f64(),
        s.latency_rounds,
        s.inflight,
        match s.protocol {
            meridian_codec::Protocol::V311 => "3.1.1",
            meridian_codec::Protocol::V5 => "5.0",
        },
        s.idle_connections,
        scenarios
            .iter()
            .map(|x| x.key())
            .collect::<Vec<_>>()
            .join(",")
    )
}
