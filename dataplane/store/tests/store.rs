//! RedbStore behaviour through the public API: persistence across reopen, cascades, ordering,
//! group commit and the periodic fsync policy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use meridian_store::{FsyncPolicy, Op, RedbStore, SessionStore, Snapshot, StoreError};

fn put_msg(client: &str, seq: u64, value: &[u8]) -> Op {
    Op::PutMessage {
        client: client.into(),
        seq,
        value: value.to_vec(),
    }
}

#[tokio::test]
async fn every_op_round_trips_through_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RedbStore::open(dir.path(), FsyncPolicy::Always).unwrap();
        store
            .submit(vec![
                Op::PutSession {
                    client: "a".into(),
                    value: b"sess-a".to_vec(),
                },
                Op::PutSession {
                    client: "b".into(),
                    value: b"sess-b".to_vec(),
                },
                put_msg("a", 1, b"m1"),
                put_msg("a", 2, b"m2"),
                put_msg("a", 3, b"m3"),
                put_msg("b", 7, b"b7"),
                Op::PutInboundQos2 {
                    client: "a".into(),
                    packet_id: 10,
                },
                Op::PutInboundQos2 {
                    client: "a".into(),
                    packet_id: 11,
                },
                Op::PutRetained {
                    topic: "t/1".into(),
                    value: b"r1".to_vec(),
                },
                Op::PutRetained {
                    topic: "t/2".into(),
                    value: b"r2".to_vec(),
                },
            ])
            .await
            .unwrap();
        store
            .submit(vec![
                Op::DeleteMessage {
                    client: "a".into(),
                    seq: 2,
                },
                Op::DeleteInboundQos2 {
                    client: "a".into(),
                    packet_id: 10,
                },
                Op::DeleteRetained {
                    topic: "t/1".into(),
                },
                // Replacing a session value keeps only the newest.
                Op::PutSession {
                    client: "b".into(),
                    value: b"sess-b2".to_vec(),
                },
            ])
            .await
            .unwrap();
    }
    let store = RedbStore::open(dir.path(), FsyncPolicy::Always).unwrap();
    let snap = store.load().unwrap();
    let expected = Snapshot {
        sessions: BTreeMap::from([
            ("a".into(), b"sess-a".to_vec()),
            ("b".into(), b"sess-b2".to_vec()),
        ]),
        messages: BTreeMap::from([
            ("a".into(), vec![(1, b"m1".to_vec()), (3, b"m3".to_vec())]),
            ("b".into(), vec![(7, b"b7".to_vec())]),
        ]),
        inbound_qos2: BTreeMap::from([("a".into(), vec![11])]),
        retained: BTreeMap::from([("t/2".into(), b"r2".to_vec())]),
    };
    assert_eq!(snap, expected);
    assert!(dir.path().join(meridian_store::FILE_NAME).exists());
}

#[tokio::test]
async fn delete_session_cascades_to_its_messages_and_qos2_ids_only() {
    let store = RedbStore::in_memory();
    let mut ops = Vec::new();
    // "a" and "ab" share a prefix: the cascade must not reach into the longer client id.
    for client in ["a", "ab", "b"] {
        ops.push(Op::PutSession {
            client: client.into(),
            value: vec![1],
        });
        ops.push(put_msg(client, 0, b"x"));
        ops.push(put_msg(client, u64::MAX, b"y"));
        ops.push(Op::PutInboundQos2 {
            client: client.into(),
            packet_id: 1,
        });
        ops.push(Op::PutInboundQos2 {
            client: client.into(),
            packet_id: u16::MAX,
        });
    }
    store.submit(ops).await.unwrap();
    store
        .submit(vec![Op::DeleteSession { client: "a".into() }])
        .await
        .unwrap();
    let snap = store.load().unwrap();
    assert_eq!(snap.sessions.keys().collect::<Vec<_>>(), vec!["ab", "b"]);
    assert_eq!(snap.messages.keys().collect::<Vec<_>>(), vec!["ab", "b"]);
    assert_eq!(
        snap.inbound_qos2.keys().collect::<Vec<_>>(),
        vec!["ab", "b"]
    );
    assert_eq!(snap.messages["ab"].len(), 2);
    assert_eq!(snap.inbound_qos2["b"], vec![1, u16::MAX]);
}

#[tokio::test]
async fn batches_apply_in_submit_order_and_ops_in_batch_order() {
    let store = RedbStore::in_memory();
    // Submit everything before awaiting anything, so many batches land in the same group.
    let mut commits = Vec::new();
    for i in 0..200u32 {
        commits.push(store.submit(vec![Op::PutRetained {
            topic: "last".into(),
            value: i.to_be_bytes().to_vec(),
        }]));
    }
    commits.push(store.submit(vec![
        put_msg("c", 1, b"gone"),
        Op::DeleteMessage {
            client: "c".into(),
            seq: 1,
        },
        put_msg("c", 2, b"first"),
        put_msg("c", 2, b"second"),
    ]));
    for c in commits {
        c.await.unwrap();
    }
    let snap = store.load().unwrap();
    assert_eq!(snap.retained["last"], 199u32.to_be_bytes().to_vec());
    assert_eq!(snap.messages["c"], vec![(2, b"second".to_vec())]);
}

#[tokio::test]
async fn messages_load_in_seq_order_not_insert_order() {
    let store = RedbStore::in_memory();
    store
        .submit(vec![
            put_msg("c", 300, b"3"),
            put_msg("c", 1, b"1"),
            put_msg("c", 20, b"2"),
        ])
        .await
        .unwrap();
    let seqs: Vec<u64> = store.load().unwrap().messages["c"]
        .iter()
        .map(|(s, _)| *s)
        .collect();
    assert_eq!(seqs, vec![1, 20, 300]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_serves_50_concurrent_submitters_with_fewer_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RedbStore::open(dir.path(), FsyncPolicy::Always).unwrap());
    let before = store.stats();
    const SUBMITTERS: u64 = 50;
    const PER: u64 = 20;
    let mut tasks = Vec::new();
    for s in 0..SUBMITTERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for seq in 0..PER {
                store
                    .submit(vec![put_msg(&format!("c{s}"), seq, b"payload")])
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = store.stats();
    let batches = stats.batches_committed - before.batches_committed;
    let fsyncs = stats.fsyncs - before.fsyncs;
    assert_eq!(batches, SUBMITTERS * PER);
    assert_eq!(stats.ops_committed, SUBMITTERS * PER);
    assert!(
        fsyncs < batches,
        "group commit should share fsyncs: {fsyncs} fsyncs for {batches} batches"
    );
    let snap = store.load().unwrap();
    assert_eq!(snap.messages.len() as u64, SUBMITTERS);
    assert!(snap.messages.values().all(|m| m.len() as u64 == PER));
}

#[tokio::test]
async fn periodic_policy_acknowledges_before_fsync_and_syncs_within_interval() {
    let dir = tempfile::tempdir().unwrap();
    let interval = Duration::from_secs(1);
    let store = RedbStore::open(dir.path(), FsyncPolicy::Periodic(interval)).unwrap();
    let before = store.stats();
    let start = std::time::Instant::now();
    for seq in 0..10 {
        store.submit(vec![put_msg("p", seq, b"v")]).await.unwrap();
    }
    let acked = store.stats();
    assert!(start.elapsed() < interval, "test machine too slow to judge");
    assert_eq!(acked.batches_committed - before.batches_committed, 10);
    assert_eq!(
        acked.fsyncs, before.fsyncs,
        "no fsync before the interval ends"
    );
    // Written data is visible to readers right away.
    assert_eq!(store.load().unwrap().messages["p"].len(), 10);

    // The durable commit follows within the interval (plus scheduling slack).
    let deadline = start + interval * 4;
    while store.stats().fsyncs == acked.fsyncs {
        assert!(
            std::time::Instant::now() < deadline,
            "interval passed without fsync"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.stats().fsyncs, acked.fsyncs + 1);
    assert_eq!(store.policy().loss_window(), interval);
}

#[tokio::test]
async fn flush_makes_periodic_writes_durable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        RedbStore::open(dir.path(), FsyncPolicy::Periodic(Duration::from_secs(3600))).unwrap();
    store
        .submit(vec![Op::PutRetained {
            topic: "t".into(),
            value: b"v".to_vec(),
        }])
        .await
        .unwrap();
    let before = store.stats();
    store.flush().await.unwrap();
    assert_eq!(store.stats().fsyncs, before.fsyncs + 1);
    // Nothing is pending any more: a second flush needs no fsync.
    store.flush().await.unwrap();
    assert_eq!(store.stats().fsyncs, before.fsyncs + 1);
    drop(store);
    let store = RedbStore::open(dir.path(), FsyncPolicy::Always).unwrap();
    assert_eq!(store.load().unwrap().retained["t"], b"v".to_vec());
}

#[tokio::test]
async fn second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = RedbStore::open(dir.path(), FsyncPolicy::Always).unwrap();
    match RedbStore::open(dir.path(), FsyncPolicy::Always) {
        Err(StoreError::Open { path, message }) => {
            assert!(path.ends_with("meridian.redb"), "{path}");
            assert!(!message.is_empty());
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("second open of a locked store succeeded"),
    }
}

#[tokio::test]
async fn in_memory_store_behaves_like_the_file_store() {
    let store = RedbStore::in_memory();
    assert_eq!(store.policy(), FsyncPolicy::Always);
    assert_eq!(store.load().unwrap(), Snapshot::default());
    store
        .submit(vec![Op::PutSession {
            client: "m".into(),
            value: b"s".to_vec(),
        }])
        .await
        .unwrap();
    store.flush().await.unwrap();
    assert_eq!(store.load().unwrap().sessions["m"], b"s".to_vec());
    assert_eq!(store.location(), "<memory>");
}
