//! The benchmark scenarios and the QoS contract check.
//!
//! Every message carries `[publisher u32][sequence u64][send time ns u64]` at the front of its
//! payload. Subscribers use it to count loss, duplicates and reordering per publisher (the QoS
//! contract) and to measure end-to-end latency; bench publishers and subscribers live in one
//! process, so the send time and receive time share one monotonic clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use meridian_codec::{Packet, Protocol, QoS};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::client::{
    Client, ClientOptions, PacketReader, PacketWriter, TlsClient, puback, publish,
};

const HEADER: usize = 20;

/// Knobs shared by every scenario.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) payload: usize,
    /// How long publishers publish in the throughput and latency scenarios.
    pub(crate) duration: Duration,
    /// QoS 1 publisher window (messages awaiting PUBACK), capped by the broker's Receive Maximum.
    pub(crate) inflight: u16,
    pub(crate) protocol: Protocol,
    pub(crate) latency_rate: u64,
    /// `compare`: rounds of each latency scenario per broker, interleaved across brokers and
    /// pooled into one histogram (see [`Outcome::pool`]).
    pub(crate) latency_rounds: u32,
    pub(crate) idle_connections: usize,
    pub(crate) connect_concurrency: usize,
    /// Upper bound on the wait for in-transit messages after publishing stops.
    pub(crate) drain_timeout: Duration,
}

/// One scenario of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    /// `publishers` → `subscribers` at maximum rate (1→1, 100→1, 1→100).
    Throughput {
        publishers: usize,
        subscribers: usize,
        qos: QoS,
    },
    /// 1→1 at a fixed rate, reporting end-to-end latency percentiles.
    Latency { qos: QoS },
    /// Many idle connections: broker memory per connection and connect rate.
    Idle,
}

impl Scenario {
    /// How many rounds a comparison runs of this scenario per broker: latency scenarios are
    /// repeated (`--latency-rounds`) and pooled, the others run once.
    pub(crate) fn rounds(&self, s: &Settings) -> u32 {
        match self {
            Scenario::Latency { .. } => s.latency_rounds.max(1),
            _ => 1,
        }
    }

    pub(crate) fn key(&self) -> String {
        match self {
            Scenario::Throughput {
                publishers,
                subscribers,
                qos,
            } => format!("tp-{publishers}-{subscribers}-q{}", *qos as u8),
            Scenario::Latency { qos } => format!("lat-q{}", *qos as u8),
            Scenario::Idle => "idle".to_string(),
        }
    }

    pub(crate) fn label(&self, s: &Settings) -> String {
        match self {
            Scenario::Throughput {
                publishers,
                subscribers,
                qos,
            } => format!("{publishers}→{subscribers} QoS {}", *qos as u8),
            Scenario::Latency { qos } => {
                format!("latency @ {} msg/s QoS {}", s.latency_rate, *qos as u8)
            }
            Scenario::Idle => format!("{} idle connections", s.idle_connections),
        }
    }

    /// The default suite from issue 2.
    pub(crate) fn suite() -> Vec<Scenario> {
        use QoS::{AtLeastOnce as Q1, AtMostOnce as Q0};
        let tp = |publishers, subscribers, qos| Scenario::Throughput {
            publishers,
            subscribers,
            qos,
        };
        vec![
            tp(1, 1, Q0),
            tp(1, 1, Q1),
            tp(100, 1, Q0),
            tp(100, 1, Q1),
            tp(1, 100, Q0),
            Scenario::Latency { qos: Q0 },
            Scenario::Latency { qos: Q1 },
            Scenario::Idle,
        ]
    }
}

/// Loss, duplicates and ordering, summed over all subscribers of a scenario.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Contract {
    pub(crate) qos: u8,
    /// Messages written by publishers.
    pub(crate) sent: u64,
    /// QoS 1: messages the broker acknowledged (PUBACK). QoS 0: equal to `sent`.
    pub(crate) acked: u64,
    /// Deliveries the contract requires (acked × subscribers at QoS 1), or hopes for at QoS 0.
    pub(crate) expected: u64,
    /// Distinct messages delivered (over all subscribers).
    pub(crate) delivered: u64,
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    pub(crate) reordered: u64,
    /// Payloads that do not decode to a message we sent (corruption) or arrive at a wrong QoS.
    pub(crate) corrupt: u64,
    /// Losses at QoS 1, duplicates at QoS 0, reordering and corruption: what MQTT forbids.
    pub(crate) violations: u64,
    /// The broker's own drop counters when it exposes them (Meridian's /metrics).
    pub(crate) broker_drops: Option<String>,
}

/// What one scenario measured on one broker.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub(crate) struct Outcome {
    /// Delivered messages per second (deliveries over all subscribers).
    pub(crate) rate: Option<f64>,
    /// Latency percentiles in microseconds: p50, p99, p99.9.
    pub(crate) latency_us: Option<[f64; 3]>,
    pub(crate) rss_per_connection: Option<f64>,
    pub(crate) connect_rate: Option<f64>,
    pub(crate) contract: Option<Contract>,
    /// Runs pooled into this outcome (1 unless [`Outcome::pool`] added more).
    pub(crate) rounds: u32,
    /// Each pooled round's own p99 (µs), to show how far one round's verdict would move.
    pub(crate) round_p99_us: Vec<f64>,
    /// The latency samples behind `latency_us`, kept so rounds can be pooled.
    #[serde(skip)]
    pub(crate) latency_hist: Option<Box<Histogram<u64>>>,
}

impl Outcome {
    /// Add another run of the same scenario on the same broker: latency percentiles are
    /// recomputed from the pooled samples (not averaged), contract counts are summed, rates
    /// averaged. Pooling interleaved rounds keeps one noisy stretch of time from deciding a
    /// latency comparison on its own.
    pub(crate) fn pool(&mut self, other: Outcome) -> anyhow::Result<()> {
        match (self.latency_hist.as_mut(), other.latency_hist) {
            (Some(h), Some(o)) => {
                h.add(&*o)?;
                self.latency_us = Some(percentiles(h));
            }
            (None, Some(o)) => {
                self.latency_us = Some(percentiles(&o));
                self.latency_hist = Some(o);
            }
            _ => {}
        }
        let n = f64::from(self.rounds.max(1));
        self.rate = match (self.rate, other.rate) {
            (Some(a), Some(b)) => Some((a * n + b) / (n + 1.0)),
            (a, b) => a.or(b),
        };
        match (self.contract.as_mut(), other.contract) {
            (Some(c), Some(o)) => {
                c.sent += o.sent;
                c.acked += o.acked;
                c.expected += o.expected;
                c.delivered += o.delivered;
                c.lost += o.lost;
                c.duplicates += o.duplicates;
                c.reordered += o.reordered;
                c.corrupt += o.corrupt;
                c.violations += o.violations;
                c.broker_drops = match (c.broker_drops.take(), o.broker_drops) {
                    (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                    (a, b) => a.or(b),
                };
            }
            (None, Some(o)) => self.contract = Some(o),
            _ => {}
        }
        self.round_p99_us.extend(other.round_p99_us);
        self.rounds = self.rounds.max(1) + other.rounds.max(1);
        Ok(())
    }
}

/// p50, p99 and p99.9 of a latency histogram, in microseconds.
fn percentiles(h: &Histogram<u64>) -> [f64; 3] {
    [
        h.value_at_quantile(0.50) as f64,
        h.value_at_quantile(0.99) as f64,
        h.value_at_quantile(0.999) as f64,
    ]
}

/// Per-publisher receive bookkeeping in one subscriber.
#[derive(Debug, Default, Clone)]
struct Seen {
    bits: Vec<u64>,
    last: Option<u64>,
    distinct: u64,
    duplicates: u64,
    reordered: u64,
}

impl Seen {
    fn record(&mut self, seq: u64) {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.bits.len() {
            self.bits.resize((w + 1).max(self.bits.len() * 2), 0);
        }
        if self.bits[w] & (1 << b) != 0 {
            self.duplicates += 1;
            return;
        }
        self.bits[w] |= 1 << b;
        self.distinct += 1;
        if let Some(last) = self.last
            && seq < last
        {
            self.reordered += 1;
        }
        self.last = Some(self.last.map_or(seq, |l| l.max(seq)));
    }

    fn has(&self, seq: u64) -> bool {
        let w = (seq / 64) as usize;
        w < self.bits.len() && self.bits[w] & (1 << (seq % 64)) != 0
    }
}

/// What a subscriber hands back when it stops.
struct SubscriberReport {
    seen: Vec<Seen>,
    corrupt: u64,
    last_delivery: Option<Instant>,
    histogram: Histogram<u64>,
}

/// What a publisher hands back.
struct PublisherReport {
    id: u32,
    sent: u64,
    /// QoS 1: bitmap of acknowledged sequence numbers.
    acked: Option<Seen>,
    // Kept open until the scenario ends so closing never races the broker reading our last bytes.
    _writer: PacketWriter,
    _reader: Option<PacketReader>,
}

fn payload(buf: &mut BytesMut, size: usize, publisher: u32, seq: u64, epoch: Instant) -> Bytes {
    buf.reserve(size);
    buf.put_u32(publisher);
    buf.put_u64(seq);
    buf.put_u64(epoch.elapsed().as_nanos() as u64);
    buf.put_bytes(0, size.saturating_sub(HEADER));
    buf.split().freeze()
}

fn packet_id(seq: u64) -> u16 {
    (seq % 65_535) as u16 + 1
}

/// Runs scenarios against one broker address.
pub(crate) struct Runner {
    pub(crate) addr: String,
    pub(crate) settings: Settings,
    pub(crate) label: String,
    /// Where subscriber tasks run (a runtime of their own, see [`Runner::flow`]).
    pub(crate) subscriber_runtime: tokio::runtime::Handle,
    /// CONNECT username of every bench client (`None`: no username).
    pub(crate) username: Option<String>,
    /// TLS for every bench client (`None`: plain TCP).
    pub(crate) tls: Option<TlsClient>,
    /// One topic for everyone (`bench/{key}`), or a topic level per publisher.
    pub(crate) topics: TopicLayout,
}

/// A publisher's topic from its client id.
type TopicOf = Box<dyn Fn(&str) -> String + Send + Sync>;

/// Which topics a flow publishes to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum TopicLayout {
    /// Every publisher on `bench/{key}`; subscribers subscribe to exactly that.
    #[default]
    Shared,
    /// Publisher `p` on `bench/{key}/{its client id}`; subscribers on `bench/{key}/+` (lets an
    /// authorization rule grant `bench/+/{principal.clientId}`).
    PerClientId,
    /// Every publisher on `bench/{key}/{this}`; subscribers on `bench/{key}/+` (an Event Grid
    /// template `bench/+/${client.authenticationName}` when this is the authentication name).
    Suffix(String),
}

impl Runner {
    /// A runner with the default client settings (no username, plain TCP, one shared topic).
    pub(crate) fn new(
        addr: String,
        settings: Settings,
        label: String,
        subscriber_runtime: tokio::runtime::Handle,
    ) -> Runner {
        Runner {
            addr,
            settings,
            label,
            subscriber_runtime,
            username: None,
            tls: None,
            topics: TopicLayout::Shared,
        }
    }
}

impl Runner {
    fn opts(&self, id: String) -> ClientOptions {
        ClientOptions {
            client_id: id,
            protocol: self.settings.protocol,
            keep_alive: 300,
            buffer: 64 * 1024,
            username: self.username.clone(),
            tls: self.tls.clone(),
        }
    }

    pub(crate) async fn run(
        &self,
        scenario: Scenario,
        broker_pid: Option<u32>,
    ) -> anyhow::Result<Outcome> {
        match scenario {
            Scenario::Throughput {
                publishers,
                subscribers,
                qos,
            } => {
                self.flow(&scenario, publishers, subscribers, qos, None)
                    .await
            }
            Scenario::Latency { qos } => {
                self.flow(&scenario, 1, 1, qos, Some(self.settings.latency_rate))
                    .await
            }
            Scenario::Idle => self.idle(broker_pid).await,
        }
    }

    /// Publishers → subscribers on one topic, at full speed (`rate` None) or a fixed total rate.
    async fn flow(
        &self,
        scenario: &Scenario,
        publishers: usize,
        subscribers: usize,
        qos: QoS,
        rate: Option<u64>,
    ) -> anyhow::Result<Outcome> {
        let s = &self.settings;
        let key = scenario.key();
        let (topic, pub_topic): (String, TopicOf) = match &self.topics {
            TopicLayout::Shared => {
                let t = format!("bench/{key}");
                (t.clone(), Box::new(move |_| t.clone()))
            }
            TopicLayout::PerClientId => {
                let k = key.clone();
                (
                    format!("bench/{key}/+"),
                    Box::new(move |id| format!("bench/{k}/{id}")),
                )
            }
            TopicLayout::Suffix(sfx) => {
                let t = format!("bench/{key}/{sfx}");
                (format!("bench/{key}/+"), Box::new(move |_| t.clone()))
            }
        };
        let epoch = Instant::now();
        let delivered = Arc::new(AtomicU64::new(0));
        let (stop_tx, stop_rx) = watch::channel(false);

        // Subscribers first, all subscribed before anyone publishes.
        let mut subs = JoinSet::new();
        // Subscribers live on their own runtime thread: a publisher that never meets backpressure
        // (a broker that accepts and drops) must not starve the side that measures delivery.
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(subscribers.max(1));
        for i in 0..subscribers {
            let addr = self.addr.clone();
            let opts = self.opts(format!("mb-{key}-s{i}"));
            let topic = topic.clone();
            let delivered = delivered.clone();
            let stop = stop_rx.clone();
            let ready = ready_tx.clone();
            let payload_size = s.payload.max(HEADER);
            subs.spawn_on(
                async move {
                    let mut c = match Client::connect(&addr, &opts).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready.send(Err(format!("{e:#}"))).await;
                            return Err(e);
                        }
                    };
                    if let Err(e) = c.subscribe(&topic, qos).await {
                        let _ = ready.send(Err(format!("{e:#}"))).await;
                        return Err(e);
                    }
                    let _ = ready.send(Ok(())).await;
                    subscriber(c, publishers, qos, payload_size, epoch, delivered, stop).await
                },
                &self.subscriber_runtime,
            );
        }
        drop(ready_tx);
        for _ in 0..subscribers {
            match ready_rx.recv().await {
                Some(Ok(())) => {}
                Some(Err(e)) => bail!("subscriber setup failed: {e}"),
                None => bail!("subscriber task ended before subscribing"),
            }
        }

        let mut pub_clients = Vec::with_capacity(publishers);
        for i in 0..publishers {
            let id = format!("mb-{key}-p{i}");
            let c = Client::connect(&self.addr, &self.opts(id.clone())).await?;
            pub_clients.push((c, pub_topic(&id)));
        }
        let start = Instant::now();
        let end = start + s.duration;
        let mut pubs = JoinSet::new();
        for (i, (c, topic)) in pub_clients.into_iter().enumerate() {
            let per_pub_rate = rate.map(|r| (r as f64 / publishers as f64).max(1.0));
            let window = s.inflight.min(c.server_receive_maximum).max(1);
            pubs.spawn(publisher(
                c,
                i as u32,
                topic,
                qos,
                s.payload.max(HEADER),
                epoch,
                end,
                per_pub_rate,
                window,
                s.drain_timeout,
            ));
        }

        // Progress while publishing.
        let progress = {
            let delivered = delivered.clone();
            let label = self.label.clone();
            tokio::spawn(async move {
                let mut t = tokio::time::interval(Duration::from_secs(1));
                t.tick().await;
                let mut prev = 0;
                loop {
                    t.tick().await;
                    let d = delivered.load(Ordering::Relaxed);
                    eprintln!("  [{label}] delivered {d} (+{}/s)", d - prev);
                    prev = d;
                }
            })
        };

        let mut reports = Vec::with_capacity(publishers);
        while let Some(r) = pubs.join_next().await {
            reports.push(r.context("publisher task panicked")??);
        }
        // Tasks finish in any order; subscribers index their bookkeeping by publisher id.
        reports.sort_by_key(|r| r.id);
        let sent: u64 = reports.iter().map(|r| r.sent).sum();
        let acked: u64 = match qos {
            QoS::AtMostOnce => sent,
            _ => reports
                .iter()
                .map(|r| r.acked.as_ref().map_or(0, |a| a.distinct))
                .sum(),
        };
        let want = sent * subscribers as u64;

        // Drain: wait until every sent message arrived everywhere, or deliveries stall.
        let stall = if qos == QoS::AtMostOnce {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(3)
        };
        let drain_end = Instant::now() + s.drain_timeout;
        let mut last = delivered.load(Ordering::Relaxed);
        let mut last_change = Instant::now();
        while Instant::now() < drain_end {
            let d = delivered.load(Ordering::Relaxed);
            if d >= want {
                break;
            }
            if d != last {
                last = d;
                last_change = Instant::now();
            } else if last_change.elapsed() > stall {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        progress.abort();
        let _ = stop_tx.send(true);

        let mut sub_reports = Vec::with_capacity(subscribers);
        while let Some(r) = subs.join_next().await {
            sub_reports.push(r.context("subscriber task panicked")??);
        }

        let mut contract = Contract {
            qos: qos as u8,
            sent,
            acked,
            expected: acked * subscribers as u64,
            ..Contract::default()
        };
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut last_delivery = None::<Instant>;
        for sr in &sub_reports {
            contract.corrupt += sr.corrupt;
            hist.add(&sr.histogram)?;
            last_delivery = last_delivery.max(sr.last_delivery);
            for (p, pr) in reports.iter().enumerate() {
                let seen = &sr.seen[p];
                contract.delivered += seen.distinct;
                contract.duplicates += seen.duplicates;
                contract.reordered += seen.reordered;
                contract.lost += match &pr.acked {
                    // QoS 1: every acknowledged message must arrive.
                    Some(acked) => (0..pr.sent)
                        .filter(|&q| acked.has(q) && !seen.has(q))
                        .count() as u64,
                    None => pr.sent.saturating_sub(seen.distinct),
                };
            }
        }
        contract.violations = contract.reordered + contract.corrupt;
        match qos {
            QoS::AtMostOnce => contract.violations += contract.duplicates,
            _ => contract.violations += contract.lost,
        }

        let elapsed = last_delivery
            .map(|t| t.saturating_duration_since(start))
            .unwrap_or_default()
            .as_secs_f64();
        let mut out = Outcome {
            rate: (elapsed > 0.0).then(|| contract.delivered as f64 / elapsed),
            contract: Some(contract),
            rounds: 1,
            ..Outcome::default()
        };
        if rate.is_some() {
            if hist.is_empty() {
                bail!("no message delivered, no latency");
            }
            out.latency_us = Some(percentiles(&hist));
            out.round_p99_us = vec![hist.value_at_quantile(0.99) as f64];
            out.latency_hist = Some(Box::new(hist));
        }
        Ok(out)
    }

    /// Open many connections that then sit idle; measure broker RSS growth and connect rate.
    async fn idle(&self, broker_pid: Option<u32>) -> anyhow::Result<Outcome> {
        let s = &self.settings;
        let n = s.idle_connections;
        let before = broker_pid.map(crate::broker::rss_bytes).transpose()?;
        let gate = Arc::new(Semaphore::new(s.connect_concurrency.max(1)));
        let failed = Arc::new(AtomicBool::new(false));
        let mut set = JoinSet::new();
        let start = Instant::now();
        for i in 0..n {
            let permit = gate.clone().acquire_owned().await?;
            if failed.load(Ordering::Relaxed) {
                break;
            }
            let mut o = self.opts(format!("mb-idle-{i}"));
            o.buffer = 64;
            let addr = self.addr.clone();
            let failed = failed.clone();
            set.spawn(async move {
                let r = Client::connect(&addr, &o).await;
                if r.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                drop(permit);
                r
            });
            if (i + 1) % 2000 == 0 {
                eprintln!("  [{}] {} connections opened", self.label, i + 1);
            }
        }
        let mut clients = Vec::with_capacity(n);
        let mut first_err = None;
        while let Some(r) = set.join_next().await {
            match r? {
                Ok(c) => clients.push(c),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        if let Some(e) = first_err {
            return Err(e.context(format!(
                "only {} of {n} idle connections succeeded",
                clients.len()
            )));
        }
        // Let the broker finish per-connection setup (lazy buffers, timers) before measuring.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = broker_pid.map(crate::broker::rss_bytes).transpose()?;
        eprintln!(
            "  [{}] {} connections in {:.2} s",
            self.label,
            clients.len(),
            elapsed
        );
        let per = match (before, after) {
            (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / clients.len() as f64),
            _ => None,
        };
        drop(clients);
        Ok(Outcome {
            rss_per_connection: per,
            connect_rate: Some(n as f64 / elapsed),
            rounds: 1,
            ..Outcome::default()
        })
    }
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    client: Client,
    id: u32,
    topic: String,
    qos: QoS,
    size: usize,
    epoch: Instant,
    end: Instant,
    rate: Option<f64>,
    window: u16,
    drain_timeout: Duration,
) -> anyhow::Result<PublisherReport> {
    let Client {
        reader: mut rd,
        writer: mut wr,
        ..
    } = client;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let start = Instant::now();
    let mut seq: u64 = 0;
    const BATCH: u64 = 32;
    // Only a publisher with a fixed rate is paced; the others publish as fast as they can.
    let mut pacer: Option<Pacer> = None;

    if qos == QoS::AtMostOnce {
        while Instant::now() < end {
            let due = match rate {
                Some(r) => {
                    pacer
                        .get_or_insert_with(|| Pacer::start(start, r))
                        .tick()
                        .await;
                    (start.elapsed().as_secs_f64() * r) as u64
                }
                None => seq + BATCH,
            };
            while seq < due {
                wr.push(&publish(
                    &topic,
                    qos,
                    0,
                    payload(&mut buf, size, id, seq, epoch),
                ))?;
                seq += 1;
            }
            wr.flush().await?;
            // A broker that never pushes back would otherwise let this loop monopolise a worker.
            tokio::task::yield_now().await;
        }
        return Ok(PublisherReport {
            id,
            sent: seq,
            acked: None,
            _writer: wr,
            _reader: Some(rd),
        });
    }

    // QoS 1: a window of `window` unacknowledged messages; a reader task returns permits.
    let permits = Arc::new(Semaphore::new(window as usize));
    let slots: Arc<Vec<AtomicU64>> = Arc::new((0..=65_535).map(|_| AtomicU64::new(0)).collect());
    let sent_total = Arc::new(AtomicU64::new(u64::MAX));
    let acker = {
        let permits = permits.clone();
        let slots = slots.clone();
        let sent_total = sent_total.clone();
        tokio::spawn(async move {
            let mut acked = Seen::default();
            let mut batch = Vec::new();
            let mut deadline: Option<Instant> = None;
            loop {
                let total = sent_total.load(Ordering::Acquire);
                if total != u64::MAX {
                    if acked.distinct >= total {
                        break;
                    }
                    let d = *deadline.get_or_insert_with(|| Instant::now() + drain_timeout);
                    if Instant::now() > d {
                        break;
                    }
                }
                tokio::select! {
                    more = rd.next_batch(&mut batch) => {
                        if !more? { break; }
                        for p in batch.drain(..) {
                            if let Packet::PubAck(a) = p {
                                let seq = slots[a.packet_id as usize].load(Ordering::Acquire);
                                acked.record(seq);
                                permits.add_permits(1);
                            }
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
            anyhow::Ok((acked, rd))
        })
    };
    while Instant::now() < end {
        let due = match rate {
            Some(r) => {
                pacer
                    .get_or_insert_with(|| Pacer::start(start, r))
                    .tick()
                    .await;
                (start.elapsed().as_secs_f64() * r) as u64
            }
            None => seq + BATCH,
        };
        while seq < due {
            // Wait for a slot only when nothing is queued to write, otherwise flush first so
            // the broker sees (and acknowledges) what we hold.
            let permit = match permits.try_acquire() {
                Ok(p) => p,
                Err(_) => {
                    wr.flush().await?;
                    tokio::select! {
                        p = permits.acquire() => p?,
                        _ = tokio::time::sleep_until(end.into()) => break,
                    }
                }
            };
            permit.forget();
            let pid = packet_id(seq);
            slots[pid as usize].store(seq, Ordering::Release);
            wr.push(&publish(
                &topic,
                qos,
                pid,
                payload(&mut buf, size, id, seq, epoch),
            ))?;
            seq += 1;
            if wr.pending() > 32 * 1024 {
                wr.flush().await?;
            }
        }
        wr.flush().await?;
        tokio::task::yield_now().await;
    }
    sent_total.store(seq, Ordering::Release);
    let (acked, rd) = acker.await.context("ack reader panicked")??;
    Ok(PublisherReport {
        id,
        sent: seq,
        acked: Some(acked),
        _writer: wr,
        _reader: Some(rd),
    })
}

async fn subscriber(
    client: Client,
    publishers: usize,
    sub_qos: QoS,
    payload_size: usize,
    epoch: Instant,
    delivered: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<SubscriberReport> {
    let Client {
        reader: mut rd,
        writer: mut wr,
        ..
    } = client;
    let mut seen = vec![Seen::default(); publishers];
    let mut corrupt = 0;
    let mut last_delivery = None;
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            more = rd.next_batch(&mut batch) => {
                if !more? {
                    bail!("broker closed a subscriber connection");
                }
                let now = Instant::now();
                let now_ns = now.duration_since(epoch).as_nanos() as u64;
                let mut n = 0;
                for p in batch.drain(..) {
                    let Packet::Publish(m) = p else { continue };
                    if m.qos == QoS::AtLeastOnce {
                        wr.push(&puback(m.packet_id))?;
                    }
                    let b = &m.payload;
                    if b.len() != payload_size || m.qos != sub_qos {
                        corrupt += 1;
                        continue;
                    }
                    let p = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes")) as usize;
                    let seq = u64::from_be_bytes(b[4..12].try_into().expect("8 bytes"));
                    let sent_ns = u64::from_be_bytes(b[12..20].try_into().expect("8 bytes"));
                    if p >= publishers {
                        corrupt += 1;
                        continue;
                    }
                    seen[p].record(seq);
                    let us = now_ns.saturating_sub(sent_ns) / 1000;
                    histogram.saturating_record(us.max(1));
                    n += 1;
                }
                if n > 0 {
                    last_delivery = Some(now);
                    delivered.fetch_add(n, Ordering::Relaxed);
                }
                wr.flush().await?;
            }
            _ = stop.changed() => break,
        }
    }
    Ok(SubscriberReport {
        seen,
        corrupt,
        last_delivery,
        histogram,
    })
}

/// Wakes a fixed-rate publisher when its next message is due. tokio's timer has millisecond
/// granularity: a publisher sleeping on it sends a 10,000 msg/s stream as bursts of ten or more
/// messages in one write every millisecond, which measures burst latency, not the latency of a
/// steady stream. An OS thread sleeping to each due instant spaces messages to within the
/// kernel's timer slack (~50 µs by default); the publisher then sends what is due by then.
struct Pacer {
    notify: Arc<tokio::sync::Notify>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pacer {
    fn start(start: Instant, rate: f64) -> Self {
        let notify = Arc::new(tokio::sync::Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (notify, stop) = (notify.clone(), stop.clone());
            std::thread::Builder::new()
                .name("bench-pacer".into())
                .spawn(move || {
                    let mut next: u64 = 1;
                    while !stop.load(Ordering::Relaxed) {
                        let due = start + Duration::from_secs_f64(next as f64 / rate);
                        let now = Instant::now();
                        if due > now {
                            std::thread::sleep(due - now);
                        }
                        // One stored permit at most: ticks missed while the publisher was
                        // busy coalesce, and the publisher catches up by the clock.
                        notify.notify_one();
                        let behind = (start.elapsed().as_secs_f64() * rate) as u64;
                        next = (next + 1).max(behind + 1);
                    }
                })
                .expect("spawn the pacer thread")
        };
        Pacer {
            notify,
            stop,
            thread: Some(thread),
        }
    }

    async fn tick(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency_round(samples: impl IntoIterator<Item = u64>, sent: u64, lost: u64) -> Outcome {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in samples {
            h.record(v).unwrap();
        }
        Outcome {
            rate: Some(10_000.0),
            latency_us: Some(percentiles(&h)),
            round_p99_us: vec![h.value_at_quantile(0.99) as f64],
            latency_hist: Some(Box::new(h)),
            contract: Some(Contract {
                qos: 1,
                sent,
                acked: sent,
                lost,
                violations: lost,
                broker_drops: Some(format!("round of {sent}")),
                ..Contract::default()
            }),
            rounds: 1,
            ..Outcome::default()
        }
    }

    #[test]
    fn pooled_rounds_take_percentiles_of_all_samples_and_sum_the_contract() {
        // Round 1 is quiet (all 100 µs); round 2 has a slow 3% (5 ms). Averaging the two
        // rounds' p99 would give ~2.5 ms; pooled, 1.5% of all samples are slow, so p99 is 5 ms,
        // and p50 stays 100 µs.
        let mut a = latency_round(std::iter::repeat_n(100, 1000), 1000, 0);
        let b = latency_round(
            std::iter::repeat_n(100, 970).chain(std::iter::repeat_n(5000, 30)),
            1000,
            2,
        );
        a.pool(b).unwrap();
        let [p50, p99, p999] = a.latency_us.unwrap();
        assert_eq!(p50, 100.0);
        assert!((4990.0..=5010.0).contains(&p99), "pooled p99 {p99}");
        assert!((4990.0..=5010.0).contains(&p999), "pooled p99.9 {p999}");
        assert_eq!(a.latency_hist.as_ref().unwrap().len(), 2000);
        let c = a.contract.as_ref().unwrap();
        assert_eq!((c.sent, c.acked, c.lost, c.violations), (2000, 2000, 2, 2));
        assert_eq!(
            c.broker_drops.as_deref(),
            Some("round of 1000; round of 1000")
        );
        assert_eq!(a.rounds, 2);
        assert_eq!(a.round_p99_us.len(), 2);
        assert_eq!(a.round_p99_us[0], 100.0);
        assert!((4990.0..=5010.0).contains(&a.round_p99_us[1]));

        // A third quiet round dilutes the slow samples to 0.75%: p99 falls back.
        a.pool(latency_round(std::iter::repeat_n(100, 2000), 2000, 0))
            .unwrap();
        assert_eq!(a.latency_us.unwrap()[1], 100.0);
        assert_eq!(a.rounds, 3);
    }

    #[test]
    fn seen_counts_duplicates_and_reordering() {
        let mut s = Seen::default();
        for q in [0, 1, 2, 2, 5, 3, 4, 200] {
            s.record(q);
        }
        assert_eq!(s.distinct, 7);
        assert_eq!(s.duplicates, 1);
        assert_eq!(s.reordered, 2, "3 and 4 arrived after 5");
        assert!(s.has(200) && !s.has(6) && !s.has(10_000));
    }

    #[test]
    fn payload_carries_publisher_sequence_and_time() {
        let epoch = Instant::now();
        let mut buf = BytesMut::new();
        let p = payload(&mut buf, 256, 7, 42, epoch);
        assert_eq!(p.len(), 256);
        assert_eq!(u32::from_be_bytes(p[0..4].try_into().unwrap()), 7);
        assert_eq!(u64::from_be_bytes(p[4..12].try_into().unwrap()), 42);
    }

    #[test]
    fn packet_ids_skip_zero_and_wrap() {
        assert_eq!(packet_id(0), 1);
        assert_eq!(packet_id(65_534), 65_535);
        assert_eq!(packet_id(65_535), 1);
    }
}
