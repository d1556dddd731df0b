//! Crash test: no acknowledged batch is lost across SIGKILL under `FsyncPolicy::Always`.
//!
//! The one test plays two roles. Run normally, it is the parent: it re-executes this test binary,
//! filtered to this same test, with `CRASH_CHILD_DIR` set, reads the child's acknowledgements from
//! its stdout, kills it with SIGKILL mid-stream, reopens the store and checks every acknowledged
//! message is there. As the child it submits batches from several tasks and prints
//! `ACK client seq` only after the batch's commit resolved. (A normal libtest binary, so both
//! `cargo test` and `cargo nextest` run it.)

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use meridian_store::{FsyncPolicy, Op, RedbStore, SessionStore};

const CHILD_ENV: &str = "CRASH_CHILD_DIR";
const SUBMITTERS: usize = 8;
/// Acknowledgements the parent waits for before it kills the child.
const KILL_AFTER: usize = 400;

/// Marks acknowledgement lines among whatever else the test harness prints.
const ACK: &str = "ACK ";

#[test]
fn kill_9_loses_no_acknowledged_batch() {
    match std::env::var_os(CHILD_ENV) {
        Some(dir) => child(Path::new(&dir)),
        None => parent(),
    }
}

fn child(dir: &Path) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = std::sync::Arc::new(RedbStore::open(dir, FsyncPolicy::Always).unwrap());
        let mut tasks = Vec::new();
        for s in 0..SUBMITTERS {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let client = format!("c{s}");
                for seq in 0u64.. {
                    store
                        .submit(vec![Op::PutMessage {
                            client: client.clone(),
                            seq,
                            value: vec![7; 256],
                        }])
                        .await
                        .unwrap();
                    // Printed only now: this line is the acknowledgement the parent relies on.
                    println!("{ACK}{client} {seq}");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

fn parent() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "kill_9_loses_no_acknowledged_batch",
            "--exact",
            "--nocapture",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut text = String::new();
    let mut lines = 0;
    let mut line = String::new();
    while lines < KILL_AFTER {
        line.clear();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "child exited early after {lines} acknowledgements");
        if line.starts_with(ACK) {
            lines += 1;
        }
        text.push_str(&line);
    }
    child.kill().unwrap(); // SIGKILL on Unix
    // Lines already in the pipe were acknowledged before the kill too.
    out.read_to_string(&mut text).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "child should have died from SIGKILL");

    let mut acked: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for line in text.split_inclusive('\n') {
        // A line cut off by the kill was never completely printed; it acknowledges nothing.
        let Some(line) = line.strip_suffix('\n') else {
            continue;
        };
        let Some(ack) = line.strip_prefix(ACK) else {
            continue;
        };
        let (client, seq) = ack.split_once(' ').expect("line format");
        acked
            .entry(client.to_owned())
            .or_default()
            .insert(seq.parse().unwrap());
    }
    let total: usize = acked.values().map(BTreeSet::len).sum();
    assert!(total >= KILL_AFTER);

    let store = RedbStore::open(dir.path(), FsyncPolicy::Always).unwrap();
    let snap = store.load().unwrap();
    for (client, seqs) in &acked {
        let stored: Vec<u64> = snap
            .messages
            .get(client)
            .map(|m| m.iter().map(|(s, _)| *s).collect())
            .unwrap_or_default();
        for seq in seqs {
            assert!(
                stored.binary_search(seq).is_ok(),
                "acknowledged {client} {seq} lost after kill -9 (stored up to {:?})",
                stored.last()
            );
        }
        // Each submitter awaited every batch before the next, so what survived is a prefix.
        assert!(
            stored.iter().enumerate().all(|(i, s)| *s == i as u64),
            "{client}: stored seqs are not a contiguous prefix"
        );
    }
    eprintln!(
        "crash test: {total} acknowledged, {} stored",
        snap.messages.values().map(Vec::len).sum::<usize>()
    );
}
