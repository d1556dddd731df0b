//! [`RedbStore`]: the embedded [`SessionStore`] on one redb file, with a dedicated writer thread
//! that group-commits whatever batches are waiting.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use tokio::sync::oneshot;

use crate::{Commit, FsyncPolicy, Op, SessionStore, Snapshot, StoreError, StoreStats};

const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const INBOUND_QOS2: TableDefinition<(&str, u16), ()> = TableDefinition::new("inbound_qos2");
const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");

/// The store's file inside the data directory.
pub const FILE_NAME: &str = "meridian.redb";

/// Most batches folded into one transaction. Bounds the latency a huge burst adds to the first
/// submitter of a group; the rest simply go into the next group.
const MAX_GROUP: usize = 4096;

type Reply = oneshot::Sender<Result<(), StoreError>>;

enum Request {
    Batch { ops: Vec<Op>, done: Reply },
    Flush { done: Reply },
}

#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    ops: AtomicU64,
    transactions: AtomicU64,
    fsyncs: AtomicU64,
    failed: AtomicU64,
}

/// The embedded default: one redb file in the data directory, written by a dedicated thread that
/// group-commits whatever batches are waiting.
///
/// Under [`FsyncPolicy::Always`] every group is committed with `Durability::Immediate` (fsync)
/// before its futures resolve. Under [`FsyncPolicy::Periodic`] groups are committed with
/// `Durability::None` (written to the page cache, visible to readers, not fsynced) and the futures
/// resolve at once; a durable commit follows at most `interval` after the first non-durable one, so
/// a crash loses at most about `interval` of acknowledged batches. [`SessionStore::flush`] and
/// dropping the store make everything durable.
pub struct RedbStore {
    db: Arc<Database>,
    policy: FsyncPolicy,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    location: String,
}

impl RedbStore {
    /// Open (or create) `<dir>/meridian.redb`, creating `dir` if needed.
    pub fn open(dir: &Path, policy: FsyncPolicy) -> Result<RedbStore, StoreError> {
        let path = dir.join(FILE_NAME);
        let location = path.display().to_string();
        let open_err = |message: String| StoreError::Open {
            path: location.clone(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(format!("create directory: {e}")))?;
        let logged_path = location.clone();
        let db = Database::builder()
            .set_repair_callback(move |session| {
                // After an unclean shutdown redb walks the file to rebuild its allocator state
                // before opening; on a large store that takes a while, so say what is happening.
                tracing::info!(
                    store = %logged_path,
                    progress = format!("{:.0}%", session.progress() * 100.0),
                    "repairing store after unclean shutdown"
                );
            })
            .create(&path)
            .map_err(|e| open_err(e.to_string()))?;
        Self::start(db, policy, location)
    }

    /// No data directory: same behaviour, nothing survives the process.
    pub fn in_memory() -> RedbStore {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("redb in-memory database");
        // Immediate commits on the memory backend cost no fsync, so `Always` is the honest policy.
        Self::start(db, FsyncPolicy::Always, "<memory>".to_owned())
            .expect("redb in-memory database tables")
    }

    /// Counters for metrics (batches, ops, transactions, fsyncs).
    pub fn stats(&self) -> StoreStats {
        let c = &self.counters;
        StoreStats {
            batches_committed: c.batches.load(Ordering::Relaxed),
            ops_committed: c.ops.load(Ordering::Relaxed),
            transactions: c.transactions.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            batches_failed: c.failed.load(Ordering::Relaxed),
        }
    }

    /// Where the data lives (`<memory>` for [`RedbStore::in_memory`]), for logs.
    pub fn location(&self) -> &str {
        &self.location
    }

    fn start(db: Database, policy: FsyncPolicy, location: String) -> Result<RedbStore, StoreError> {
        // Create the tables up front so readers never meet a missing table.
        let init = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(SESSIONS)?;
            txn.open_table(MESSAGES)?;
            txn.open_table(INBOUND_QOS2)?;
            txn.open_table(RETAINED)?;
            txn.commit()?;
            Ok(())
        };
        init().map_err(|e| StoreError::Open {
            path: location.clone(),
            message: e.to_string(),
        })?;

        let db = Arc::new(db);
        let counters = Arc::new(Counters::default());
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            policy,
            counters: counters.clone(),
            unsynced_since: None,
        };
        let handle = std::thread::Builder::new()
            .name("meridian-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Open {
                path: location.clone(),
                message: format!("spawn writer thread: {e}"),
            })?;
        Ok(RedbStore {
            db,
            policy,
            requests: Some(tx),
            writer: Some(handle),
            counters,
            location,
        })
    }

    fn enqueue(&self, make: impl FnOnce(Reply) -> Request) -> Commit {
        let (done, wait) = oneshot::channel();
        // Sending here (not when the future is first polled) is what makes submit order the
        // apply order.
        let sent = self
            .requests
            .as_ref()
            .is_some_and(|tx| tx.send(make(done)).is_ok());
        Box::pin(async move {
            if !sent {
                return Err(StoreError::Closed);
            }
            wait.await.unwrap_or(Err(StoreError::Closed))
        })
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued, make it durable and exit;
        // joining releases the file lock before a reopen in the same process.
        self.requests.take();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(store = %self.location, "store writer thread panicked");
        }
    }
}

impl SessionStore for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        read_snapshot(&self.db).map_err(|e| StoreError::Read(e.to_string()))
    }

    fn submit(&self, batch: Vec<Op>) -> Commit {
        self.enqueue(|done| Request::Batch { ops: batch, done })
    }

    fn flush(&self) -> Commit {
        self.enqueue(|done| Request::Flush { done })
    }

    fn policy(&self) -> FsyncPolicy {
        self.policy
    }

    fn stats(&self) -> StoreStats {
        RedbStore::stats(self)
    }
}

fn read_snapshot(db: &Database) -> Result<Snapshot, redb::Error> {
    let txn = db.begin_read()?;
    let mut snap = Snapshot::default();
    for entry in txn.open_table(SESSIONS)?.iter()? {
        let (k, v) = entry?;
        snap.sessions
            .insert(k.value().to_owned(), v.value().to_vec());
    }
    // Keys sort by (client, seq), so each client's messages arrive in seq order.
    for entry in txn.open_table(MESSAGES)?.iter()? {
        let (k, v) = entry?;
        let (client, seq) = k.value();
        snap.messages
            .entry(client.to_owned())
            .or_default()
            .push((seq, v.value().to_vec()));
    }
    for entry in txn.open_table(INBOUND_QOS2)?.iter()? {
        let (k, _) = entry?;
        let (client, packet_id) = k.value();
        snap.inbound_qos2
            .entry(client.to_owned())
            .or_default()
            .push(packet_id);
    }
    for entry in txn.open_table(RETAINED)?.iter()? {
        let (k, v) = entry?;
        snap.retained
            .insert(k.value().to_owned(), v.value().to_vec());
    }
    Ok(snap)
}

/// Applies batches, in order, inside an open write transaction. The tables are opened once per
/// transaction rather than per batch: a group can hold thousands of one-op batches.
fn apply<'a>(
    txn: &WriteTransaction,
    batches: impl Iterator<Item = &'a [Op]>,
) -> Result<(), redb::Error> {
    let mut sessions = txn.open_table(SESSIONS)?;
    let mut messages = txn.open_table(MESSAGES)?;
    let mut qos2 = txn.open_table(INBOUND_QOS2)?;
    let mut retained = txn.open_table(RETAINED)?;
    for op in batches.flatten() {
        match op {
            Op::PutSession { client, value } => {
                sessions.insert(client.as_str(), value.as_slice())?;
            }
            Op::DeleteSession { client } => {
                let c = client.as_str();
                sessions.remove(c)?;
                messages.retain_in((c, 0u64)..=(c, u64::MAX), |_, _| false)?;
                qos2.retain_in((c, 0u16)..=(c, u16::MAX), |_, _| false)?;
            }
            Op::PutMessage { client, seq, value } => {
                messages.insert((client.as_str(), *seq), value.as_slice())?;
            }
            Op::DeleteMessage { client, seq } => {
                messages.remove((client.as_str(), *seq))?;
            }
            Op::PutInboundQos2 { client, packet_id } => {
                qos2.insert((client.as_str(), *packet_id), ())?;
            }
            Op::DeleteInboundQos2 { client, packet_id } => {
                qos2.remove((client.as_str(), *packet_id))?;
            }
            Op::PutRetained { topic, value } => {
                retained.insert(topic.as_str(), value.as_slice())?;
            }
            Op::DeleteRetained { topic } => {
                retained.remove(topic.as_str())?;
            }
        }
    }
    Ok(())
}

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    policy: FsyncPolicy,
    counters: Arc<Counters>,
    /// When the oldest non-durable commit happened (only under `Periodic`).
    unsynced_since: Option<Instant>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        loop {
            let first = match self.sync_deadline() {
                None => match rx.recv() {
                    Ok(r) => r,
                    Err(mpsc::RecvError) => break,
                },
                Some(deadline) => {
                    let wait = deadline.saturating_duration_since(Instant::now());
                    match rx.recv_timeout(wait) {
                        Ok(r) => r,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            // Failure is logged; the next deadline retries.
                            let _ = self.sync_now();
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            self.process(group);
        }
        // The store was dropped: whatever was acknowledged becomes durable before the file closes.
        if self.unsynced_since.is_some() {
            let _ = self.sync_now();
        }
    }

    /// When the pending non-durable commits must be made durable, if there are any.
    fn sync_deadline(&self) -> Option<Instant> {
        match (self.policy, self.unsynced_since) {
            (FsyncPolicy::Periodic(interval), Some(since)) => Some(since + interval),
            _ => None,
        }
    }

    /// An empty durable commit: redb persists every earlier non-durable commit with it.
    fn sync_now(&mut self) -> Result<(), StoreError> {
        let result = (|| -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            txn.commit()?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.counters.transactions.fetch_add(1, Ordering::Relaxed);
                self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.unsynced_since = None;
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "store: durable commit failed");
                Err(StoreError::Write(e.to_string()))
            }
        }
    }

    fn process(&mut self, group: Vec<Request>) {
        let mut batches: Vec<(Vec<Op>, Reply)> = Vec::with_capacity(group.len());
        let mut flushes: Vec<Reply> = Vec::new();
        for req in group {
            match req {
                Request::Batch { ops, done } => batches.push((ops, done)),
                Request::Flush { done } => flushes.push(done),
            }
        }
        // A flush in the group only needs the batches submitted before it; committing the whole
        // group durably covers them.
        let durable = match self.policy {
            FsyncPolicy::Always => true,
            FsyncPolicy::Periodic(_) => {
                !flushes.is_empty() || self.sync_deadline().is_some_and(|d| Instant::now() >= d)
            }
        };

        let mut flush_result = Ok(());
        if batches.is_empty() {
            if durable && self.unsynced_since.is_some() {
                flush_result = self.sync_now();
            }
        } else {
            let group_result = self.commit(batches.iter().map(|(ops, _)| ops.as_slice()), durable);
            match group_result {
                Ok(()) => {
                    for (ops, done) in batches {
                        self.counted_ok(ops.len());
                        let _ = done.send(Ok(()));
                    }
                }
                Err(e) if batches.len() == 1 => {
                    let (_, done) = batches.pop().expect("one batch");
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "store: batch rejected");
                    let _ = done.send(Err(StoreError::Write(e.to_string())));
                }
                Err(e) => {
                    // Nothing of the group was committed. Retry each batch alone so one bad batch
                    // (e.g. a value over redb's size limit) fails only its own submitter.
                    tracing::warn!(error = %e, "store: group commit failed, retrying batches one by one");
                    for (ops, done) in batches {
                        match self.commit(std::iter::once(ops.as_slice()), durable) {
                            Ok(()) => {
                                self.counted_ok(ops.len());
                                let _ = done.send(Ok(()));
                            }
                            Err(e) => {
                                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(error = %e, "store: batch rejected");
                                let _ = done.send(Err(StoreError::Write(e.to_string())));
                            }
                        }
                    }
                }
            }
            if durable && self.unsynced_since.is_some() {
                // A failed durable group left earlier non-durable commits unsynced.
                flush_result = self.sync_now();
            }
        }
        for done in flushes {
            let _ = done.send(match &flush_result {
                Ok(()) => Ok(()),
                Err(e) => Err(StoreError::Write(e.to_string())),
            });
        }
    }

    fn counted_ok(&self, ops: usize) {
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.counters.ops.fetch_add(ops as u64, Ordering::Relaxed);
    }

    /// One write transaction over `batches`, in order; all or nothing.
    fn commit<'a>(
        &mut self,
        batches: impl Iterator<Item = &'a [Op]>,
        durable: bool,
    ) -> Result<(), redb::Error> {
        let mut txn = self.db.begin_write()?;
        if !durable {
            txn.set_durability(Durability::None)?;
        }
        apply(&txn, batches)?;
        txn.commit()?;
        self.counters.transactions.fetch_add(1, Ordering::Relaxed);
        if durable {
            self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.unsynced_since = None;
        } else if self.unsynced_since.is_none() {
            self.unsynced_since = Some(Instant::now());
        }
        Ok(())
    }
}
