//! The NATS plumbing against real servers: a list of servers to connect to, and `--replicas`
//! (streams, the request-state bucket and the durable consumers) on a 3-node cluster and on a
//! single server that must refuse it.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tokio_util::sync::CancellationToken;

use evgrid_common::config::NatsAuth;
use evgrid_common::nats::{self, consumer};
use evgrid_common::streams::{self, EnsureError, Retention};
use evgrid_test_support::{NatsCluster, NatsServer, eventually};

mod auth;

/// Every stream evgrid defines, and the bucket's own stream.
fn all_streams() -> Vec<String> {
    let mut names: Vec<String> = streams::stream_configs(&Retention::default())
        .into_iter()
        .map(|c| c.name)
        .collect();
    names.push(format!("KV_{}", streams::REQUEST_STATE_BUCKET));
    names
}

/// The durable consumers evgrid creates, as the services ask for them.
async fn ensure_consumers(js: &jetstream::Context, replicas: usize) {
    consumer::ensure(
        js,
        streams::REQUESTS,
        &streams::dispatcher_consumer(100, replicas),
    )
    .await
    .unwrap();
    consumer::ensure(
        js,
        streams::DISPATCH,
        &streams::substation_consumer("s1", replicas),
    )
    .await
    .unwrap();
}

/// Replicas of every stream and consumer, read back from the server: (configured, peers that
/// hold a copy). An error while a stream or consumer moves its copies (its leader changes).
async fn replicas_on_server(
    js: &jetstream::Context,
) -> Result<Vec<(String, usize, usize)>, async_nats::Error> {
    let mut out = Vec::new();
    for name in all_streams() {
        let mut stream = js.get_stream(&name).await?;
        let info = stream.info().await?;
        let peers = info.cluster.as_ref().map_or(0, |c| c.replicas.len()) + 1;
        out.push((name.clone(), info.config.num_replicas, peers));
    }
    for (stream, name) in [
        (streams::REQUESTS, streams::DISPATCHER_CONSUMER.to_owned()),
        (streams::DISPATCH, streams::substation_consumer_name("s1")),
    ] {
        let stream = js.get_stream_no_info(stream).await?;
        let mut c: jetstream::consumer::PullConsumer = stream.get_consumer(&name).await?;
        let info = c.info().await?;
        let peers = info.cluster.as_ref().map_or(0, |c| c.replicas.len()) + 1;
        out.push((name, info.config.num_replicas, peers));
    }
    Ok(out)
}

/// What every service does at start: [`streams::ensure_until_done`], retried while a young
/// cluster's meta leader has not heard from every peer yet ("no suitable peers for placement,
/// peer offline"), bounded here.
async fn ensure(js: &jetstream::Context, replicas: usize) -> async_nats::jetstream::kv::Store {
    let stop = CancellationToken::new();
    let retention = Retention::with_replicas(replicas);
    tokio::time::timeout(
        Duration::from_secs(30),
        streams::ensure_until_done(js, &retention, true, &stop),
    )
    .await
    .expect("streams in place within 30 s")
    .unwrap()
    .expect("not stopped")
}

async fn connect(urls: &str) -> nats::Nats {
    let stop = CancellationToken::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        nats::connect(urls, &NatsAuth::default(), "evgrid-test", &stop),
    )
    .await
    .expect("connected within 20 s")
    .unwrap()
}

#[tokio::test]
async fn replicas_3_on_a_cluster_gives_r3_streams_bucket_and_consumers() {
    let cluster = NatsCluster::start(3).unwrap();
    let nats = connect(&cluster.urls()).await;
    ensure(&nats.js, 3).await;
    ensure_consumers(&nats.js, 3).await;
    for (name, configured, peers) in replicas_on_server(&nats.js).await.unwrap() {
        assert_eq!((configured, peers), (3, 3), "{name}");
    }
}

#[tokio::test]
async fn changing_replicas_from_1_to_3_rolls_forward_keeping_the_data() {
    let cluster = NatsCluster::start(3).unwrap();
    let nats = connect(&cluster.urls()).await;
    let kv = ensure(&nats.js, 1).await;
    ensure_consumers(&nats.js, 1).await;
    for (name, configured, peers) in replicas_on_server(&nats.js).await.unwrap() {
        assert_eq!((configured, peers), (1, 1), "{name}");
    }
    kv.put("r1", "queued".into()).await.unwrap();
    nats.js
        .publish("ev.requests", "{}".into())
        .await
        .unwrap()
        .await
        .unwrap();

    // What a service started with --replicas 3 does at start.
    let kv = ensure(&nats.js, 3).await;
    ensure_consumers(&nats.js, 3).await;
    // The server reports the new count at once; the copies catch up in the background.
    let js = nats.js.clone();
    eventually(Duration::from_secs(20), Duration::from_millis(200), || {
        let js = js.clone();
        async move {
            replicas_on_server(&js)
                .await
                .ok()?
                .iter()
                .all(|(_, configured, peers)| (*configured, *peers) == (3, 3))
                .then_some(())
        }
    })
    .await
    .unwrap();
    assert_eq!(kv.get("r1").await.unwrap().as_deref(), Some(&b"queued"[..]));
    let mut requests = nats.js.get_stream(streams::REQUESTS).await.unwrap();
    assert_eq!(requests.info().await.unwrap().state.messages, 1);
    let stream = nats.js.get_stream_no_info(streams::REQUESTS).await.unwrap();
    let mut dispatcher: jetstream::consumer::PullConsumer = stream
        .get_consumer(streams::DISPATCHER_CONSUMER)
        .await
        .unwrap();
    assert_eq!(dispatcher.info().await.unwrap().num_pending, 1);
}

#[tokio::test]
async fn a_single_server_refuses_replicas_3_with_one_clear_line_and_no_retries() {
    let server = NatsServer::start().unwrap();
    let nats = connect(server.url()).await;
    let stop = CancellationToken::new();
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        streams::ensure_until_done(&nats.js, &Retention::with_replicas(3), true, &stop),
    )
    .await
    .expect("a refusal is not retried")
    .unwrap_err();
    assert!(err.is_permanent());
    assert!(matches!(
        err,
        EnsureError::ReplicasRefused { replicas: 3, .. }
    ));
    let line = err.to_string();
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.starts_with("asked for 3 replicas of stream EV_REQUESTS, but the server refused: "),
        "{line}"
    );
    // The server's own words are part of the line.
    assert!(line.contains("non-clustered"), "{line}");
    // R1 still works on that server.
    streams::ensure(&nats.js, &Retention::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn a_list_of_servers_connects_to_any_and_reconnects_to_another() {
    let mut cluster = NatsCluster::start(3).unwrap();
    // A dead server first in the list: the client moves on to the others.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let urls = format!("nats://127.0.0.1:{dead}, {}", cluster.urls());
    let nats = connect(&urls).await;
    ensure(&nats.js, 3).await;
    let first = nats.client.server_info().server_name;
    let node = (0..3).find(|&i| cluster.name(i) == first).unwrap();

    let mut connection = nats.connection();
    cluster.kill(node);
    connection.wait_for(|c| !*c).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), connection.wait_for(|c| *c))
        .await
        .expect("reconnected within 20 s")
        .unwrap();
    assert_ne!(nats.client.server_info().server_name, first);
    // And JetStream answers there: R3 survives the node.
    let ack = eventually(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            nats.js
                .publish("ev.requests", "{}".into())
                .await
                .ok()?
                .await
                .ok()
        },
    )
    .await
    .unwrap();
    assert_eq!(ack.stream, streams::REQUESTS);
}

#[tokio::test]
async fn a_replicated_bucket_reads_every_acknowledged_write_back_from_any_node() {
    let cluster = NatsCluster::start(3).unwrap();
    let writer = connect(&cluster.url(0)).await;
    let kv = ensure(&writer.js, 3).await;
    // The reader sits on another node: a direct get there may be answered by a follower that
    // has not applied the write yet.
    let reader = connect(&cluster.url(2)).await;
    let read_kv = reader
        .js
        .get_key_value(streams::REQUEST_STATE_BUCKET)
        .await
        .unwrap();
    for i in 0..300 {
        let key = format!("r{i}");
        let created = kv.create(&key, "queued".into()).await.unwrap();
        let updated = update_retrying_busy(&kv, &key, created).await;
        let entry = streams::read_latest(&read_kv, &key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{key}: acknowledged, then not found"));
        assert_eq!(
            (entry.revision, entry.value.as_ref(), entry.operation),
            (updated, b"dispatched".as_ref(), kv::Operation::Put),
            "{key}"
        );
    }
    kv.delete("r0").await.unwrap();
    let deleted = streams::read_latest(&read_kv, "r0").await.unwrap().unwrap();
    assert_eq!(deleted.operation, kv::Operation::Delete);
    assert!(
        streams::read_latest(&read_kv, "never-written")
            .await
            .unwrap()
            .is_none()
    );
}

/// A compare-and-set that an R3 stream leader may refuse with error 10164 ("wrong last
/// sequence", without one) while an earlier write to the key is still being replicated, even
/// with the right revision (nats-server#7281; async-nats reports it as `Other`). The services
/// publish such a write again, so the test does too, a bounded number of times.
async fn update_retrying_busy(kv: &kv::Store, key: &str, revision: u64) -> u64 {
    for _ in 0..50 {
        match kv.update(key, "dispatched".into(), revision).await {
            Ok(updated) => return updated,
            Err(e) if format!("{e:?}").contains("10164") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{key}: {e:?}"),
        }
    }
    panic!("{key}: refused as busy 50 times");
}

/// Every stream is bounded (issue #11, docs/security.md), and a definition from before the
/// bounds rolls forward on a server that already has it, keeping its messages. Attack 5 at the
/// door: ~1 MiB of junk on `ev.requests` is refused by the server, never stored.
#[tokio::test]
async fn streams_are_bounded_and_the_bounds_roll_forward_onto_existing_streams() {
    let server = NatsServer::start().unwrap();
    let nats = connect(server.url()).await;
    // As an older evgrid created them: no size, message size or discard policy.
    let r = Retention::default();
    for config in streams::stream_configs(&r) {
        let unbounded = jetstream::stream::Config {
            max_bytes: -1,
            max_message_size: -1,
            max_messages: -1,
            max_age: Duration::ZERO,
            discard: jetstream::stream::DiscardPolicy::Old,
            ..config
        };
        nats.js.create_stream(unbounded).await.unwrap();
    }
    nats.js
        .publish("ev.limits.s1", r#"{"capacity_kw": 80}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();

    ensure(&nats.js, 1).await;
    for want in streams::stream_configs(&r) {
        let mut stream = nats.js.get_stream(&want.name).await.unwrap();
        let have = stream.info().await.unwrap().config.clone();
        assert_eq!(
            (
                have.max_bytes,
                have.max_message_size,
                have.max_messages,
                have.max_age,
                have.discard
            ),
            (
                want.max_bytes,
                want.max_message_size,
                // 0 (unset) reads back as the server's "unlimited", -1.
                if want.max_messages > 0 {
                    want.max_messages
                } else {
                    -1
                },
                want.max_age,
                want.discard
            ),
            "{}",
            want.name
        );
    }
    let mut limits = nats.js.get_stream(streams::LIMITS).await.unwrap();
    assert_eq!(limits.info().await.unwrap().state.messages, 1, "kept");
    let mut bucket = nats
        .js
        .get_stream(format!("KV_{}", streams::REQUEST_STATE_BUCKET))
        .await
        .unwrap();
    let bucket = bucket.info().await.unwrap().config.clone();
    assert!(bucket.max_bytes > 0 && bucket.max_message_size > 0);

    let junk = vec![b'x'; 1000 * 1024];
    let refused = nats
        .js
        .publish("ev.requests", junk.into())
        .await
        .unwrap()
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let mut requests = nats.js.get_stream(streams::REQUESTS).await.unwrap();
    assert_eq!(requests.info().await.unwrap().state.messages, 0);
}

#[tokio::test]
async fn the_last_message_of_every_subject_is_read_while_new_ones_replace_them() {
    // A stream keeping one message per subject, written to all the time, as heartbeats are: a
    // message stored during the read replaces one not read yet, and every subject must still
    // come out (the replay of a grid read a substation's capacity this way).
    let server = NatsServer::start().unwrap();
    let js = jetstream::new(server.client().await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: "BEATS".into(),
        subjects: vec!["beat.>".into()],
        max_messages_per_subject: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let subjects = ["beat.a", "beat.b", "beat.c"];
    for s in subjects {
        js.publish(s, "0".into()).await.unwrap().await.unwrap();
    }
    let stop = CancellationToken::new();
    let writer = {
        let (js, stop) = (js.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0_u64;
            while !stop.is_cancelled() {
                n += 1;
                let s = subjects[(n % 3) as usize];
                js.publish(s, n.to_string().into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        })
    };
    for _ in 0..20 {
        let read = nats::read::read_last_per_subject(&js, "BEATS", "beat.>")
            .await
            .unwrap();
        let mut seen: Vec<&str> = read.iter().map(|m| m.subject.as_str()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, subjects, "{read:?}");
    }
    stop.cancel();
    writer.await.unwrap();
}
