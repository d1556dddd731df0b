//! Durable broker state behind one trait: persistent sessions, their queued and in-flight QoS 1/2
//! messages, inbound QoS 2 state and retained messages. Values are opaque bytes (the broker encodes
//! them); this crate owns durability, ordering and group commit.
//!
//! API CONTRACT (stubs; the implementation keeps these signatures, additions are fine).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// A commit future resolves only after the batch is on disk (fsync). Concurrent submitters share
    /// one fsync (group commit).
    Always,
    /// Batches are written at once but fsynced at most every `interval`; a crash loses at most that
    /// window.
    Periodic(Duration),
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
    #[error("store is closed")]
    Closed,
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
}

/// The embedded default: one redb file in the data directory, written by a dedicated thread that
/// group-commits whatever batches are waiting.
pub struct RedbStore {
    _private: (),
}

impl RedbStore {
    pub fn open(_dir: &Path, _policy: FsyncPolicy) -> Result<RedbStore, StoreError> {
        unimplemented!("store: RedbStore::open")
    }
    /// No data directory: same behaviour, nothing survives the process.
    pub fn in_memory() -> RedbStore {
        unimplemented!("store: RedbStore::in_memory")
    }
}

impl SessionStore for RedbStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        unimplemented!()
    }
    fn submit(&self, _batch: Vec<Op>) -> Commit {
        unimplemented!()
    }
    fn flush(&self) -> Commit {
        unimplemented!()
    }
    fn policy(&self) -> FsyncPolicy {
        unimplemented!()
    }
}
