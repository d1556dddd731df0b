//! Durable broker state behind one trait: persistent sessions, their queued and in-flight QoS 1/2
//! messages, inbound QoS 2 state and retained messages. Values are opaque bytes (the broker encodes
//! them); this crate owns durability, ordering and group commit.
//!
//! # Why redb
//!
//! The embedded implementation, [`RedbStore`], keeps everything in one [redb](https://docs.rs/redb)
//! file, `<data dir>/meridian.redb`. Facts that decided it:
//!
//! - **Pure Rust**: no C/C++ library to build or link (RocksDB, via `librocksdb-sys`, is a C++
//!   build that also needs libclang for its bindings), so the broker stays one self-contained binary.
//! - **ACID with crash safety**: redb stores copy-on-write B-trees. A commit writes new pages and then
//!   switches a checksummed commit slot in the header, so after a crash (`kill -9`, power loss) the
//!   file opens at the last completed commit, never a torn one. There is no separate WAL to replay.
//! - **Single file** in the data directory: easy to back up, move and delete.
//! - **Stable file format**: its README states the format is stable with a reasonable effort to
//!   provide an upgrade path on change (redb 2.6 shipped `Database::upgrade()` for v2 → v3). By
//!   contrast, sled's last non-alpha release is 0.34.7 (2021) and its 1.0 line is still alpha.
//! - **Group commit maps directly onto its model**: one write transaction per group of batches, and
//!   a per-transaction durability level (`Durability::Immediate` fsyncs; `Durability::None` does not
//!   and becomes durable with the next immediate commit). That gives `--fsync always` with one fsync
//!   shared by many submitters and `--fsync periodic` without a second mechanism.
//! - Versus `fjall` (a pure-Rust LSM tree that also builds here): an LSM pays off for write volumes
//!   far beyond RAM, at the cost of background compaction; broker state is small, read once at start
//!   and written as short batches that must be atomic across four tables, which redb's multi-table
//!   transactions give directly.
//!
//! # Layout
//!
//! Four tables: `sessions` (client → bytes), `messages` ((client, seq) → bytes, so one client's
//! messages are one contiguous key range in `seq` order), `inbound_qos2` ((client, packet id) → ())
//! and `retained` (topic → bytes).
//!
//! # Recovery
//!
//! After an unclean shutdown redb repairs the file on open (it walks the trees to rebuild its
//! allocator state; the time grows with the file size) and reports progress, which
//! [`RedbStore::open`] logs. Commits stay one-phase (one fsync each); redb's "quick repair" mode
//! would make recovery instant at the cost of a second fsync per commit.
//!
//! # Threading
//!
//! A dedicated writer thread owns all writes. [`SessionStore::submit`] enqueues a batch and returns a
//! [`Commit`] future. The writer drains every batch that is waiting, applies them in submit order in
//! ONE write transaction and commits once, then resolves all of their futures.

mod redb_store;

pub use redb_store::{FILE_NAME, RedbStore};

use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// A commit future resolves only after the batch is on disk (fsync). Concurrent submitters share
    /// one fsync (group commit).
    Always,
    /// Batches are written at once (visible to [`SessionStore::load`] in this process) but fsynced at
    /// most every `interval`; a crash of the process or machine loses at most the batches committed
    /// in the last `interval` (plus the time of one write), even though their futures resolved.
    Periodic(Duration),
}

impl FsyncPolicy {
    /// How long acknowledged batches may sit unsynced (zero for `Always`); for the start-up log.
    pub fn loss_window(&self) -> Duration {
        match self {
            FsyncPolicy::Always => Duration::ZERO,
            FsyncPolicy::Periodic(interval) => *interval,
        }
    }
}

/// One durable change. Keys: `client` is the MQTT client identifier; `seq` a per-session sequence
/// number chosen by the broker (monotonic within a session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    PutSession {
        client: String,
        value: Vec<u8>,
    },
    /// Deletes the session, its messages and its inbound QoS 2 state.
    DeleteSession {
        client: String,
    },
    PutMessage {
        client: String,
        seq: u64,
        value: Vec<u8>,
    },
    DeleteMessage {
        client: String,
        seq: u64,
    },
    PutInboundQos2 {
        client: String,
        packet_id: u16,
    },
    DeleteInboundQos2 {
        client: String,
        packet_id: u16,
    },
    PutRetained {
        topic: String,
        value: Vec<u8>,
    },
    DeleteRetained {
        topic: String,
    },
}

/// Everything stored, read once at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub sessions: BTreeMap<String, Vec<u8>>,
    /// Per client, messages in `seq` order.
    pub messages: BTreeMap<String, Vec<(u64, Vec<u8>)>>,
    pub inbound_qos2: BTreeMap<String, Vec<u16>>,
    pub retained: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {path}: {message}")]
    Open { path: String, message: String },
    #[error("store write failed: {0}")]
    Write(String),
    #[error("store read failed: {0}")]
    Read(String),
    #[error("store is closed")]
    Closed,
}

/// Counters for metrics export; monotonic since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Batches written successfully (their futures resolved `Ok`).
    pub batches_committed: u64,
    /// Ops inside those batches.
    pub ops_committed: u64,
    /// Write transactions committed (one per group, durable or not).
    pub transactions: u64,
    /// Durable commits, each ending in an fsync of the file.
    pub fsyncs: u64,
    /// Batches rejected with an error.
    pub batches_failed: u64,
}

/// A pending commit: resolves when the batch is durable under the store's [`FsyncPolicy`].
pub type Commit =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;

/// The storage seam the broker uses (a clustered implementation can replace the embedded one).
pub trait SessionStore: Send + Sync + 'static {
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Queue a batch; ops in one batch are applied atomically and in order; batches in submit order.
    fn submit(&self, batch: Vec<Op>) -> Commit;
    /// Make everything submitted so far durable (used on graceful shutdown).
    fn flush(&self) -> Commit;
    fn policy(&self) -> FsyncPolicy;
    /// Counters for metrics; implementations without them report zeros.
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
}
