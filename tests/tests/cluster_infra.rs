//! The clusters of `scripts/cluster` work and fail over, seen through plain clients (lapin, the
//! redis crate), before any of our code runs on them: a quorum queue outlives the node that led
//! it; the sentinels promote a replica when the master is killed; a Redis Cluster hands a killed
//! master's slots to its replica. Each test puts the killed node back at the end, so the next
//! user finds the cluster whole (if a test fails first, the next `up()` starts it again).
//!
//! Each cluster starts once per run and is reused (a RabbitMQ cluster takes 30-60 s to boot);
//! every wait has a deadline, and the whole file is bounded by [`FILE_BOUND`].

use std::collections::BTreeSet;
use std::time::Duration;

use celery_tests::cluster::{self, Rabbit, RedisCluster, Sentinel};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use redis::AsyncCommands;
use tokio::task::block_in_place;

/// The whole file, cluster boots included, on a loaded CI machine.
const FILE_BOUND: Duration = Duration::from_secs(600);
/// How long a failover may take: RabbitMQ elects a new quorum queue leader in a few seconds,
/// Sentinel promotes after `down-after-milliseconds` (2 s) plus an election, Redis Cluster after
/// `cluster-node-timeout` (2 s) plus an election.
const FAILOVER: Duration = Duration::from_secs(60);
/// Messages or keys per test.
const N: usize = 50;

fn unique(tag: &str) -> String {
    format!("{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

async fn amqp(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default()).await.unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_quorum_queue_outlives_the_node_that_led_it() {
    cluster::bound_run_time("cluster_infra", FILE_BOUND);
    let Some(rabbit) = block_in_place(Rabbit::up) else { return };
    let queue = unique("cluster-infra");
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));

    let first = amqp(rabbit.url(0)).await;
    let ch = first.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args.clone())
        .await
        .expect("declare the quorum queue on node 1");
    // A quorum queue on all 3 nodes, led by the node it was declared on (RabbitMQ's default
    // `client-local` leader locator): killing node 1 kills the leader.
    let members = block_in_place(|| rabbit.quorum_members(0, &queue));
    assert_eq!(members.len(), 3, "members of {queue}: {members:?}");
    assert!(members.contains(&(0, "leader".to_owned())), "node 1 leads {queue}: {members:?}");

    let sent: BTreeSet<String> = (0..N).map(|i| format!("message {i}")).collect();
    for body in &sent {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "the cluster confirmed {body}: {confirm:?}");
    }

    block_in_place(|| rabbit.kill_node(0));
    let killed = std::time::Instant::now();
    assert!(!block_in_place(|| rabbit.node_running(0)), "node 1 is gone");
    let end = tokio::time::Instant::now() + FAILOVER;
    while first.status().connected() && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!first.status().connected(), "the client saw its connection to node 1 die");

    let leader = block_in_place(|| rabbit.wait_quorum_leader(1, &queue, 0, FAILOVER));
    assert!(leader.is_some(), "a node other than node 1 leads {queue} within {FAILOVER:?}");
    eprintln!("rabbitmq: a new leader for {queue} seen {:.1?} after the kill", killed.elapsed());

    let second = amqp(rabbit.url(1)).await;
    let ch = second.create_channel().await.expect("channel");
    let declared = ch
        .queue_declare(queue.as_str().into(), QueueDeclareOptions { passive: true, ..Default::default() }, args)
        .await
        .expect("the queue is there on node 2");
    assert_eq!(declared.message_count() as usize, N, "every confirmed message is in the queue");
    let mut received = BTreeSet::new();
    let end = tokio::time::Instant::now() + FAILOVER;
    while received.len() < N && tokio::time::Instant::now() < end {
        match ch.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.expect("basic.get") {
            Some(m) => {
                received.insert(String::from_utf8_lossy(&m.delivery.data).into_owned());
                m.delivery.ack(BasicAckOptions::default()).await.expect("ack");
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(received, sent, "node 2 hands out every message node 1 confirmed");
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.expect("delete the queue");
    let _ = second.close(200, "done".into()).await;

    block_in_place(|| rabbit.restart_node(0));
    assert!(block_in_place(|| rabbit.node_running(0)), "node 1 is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_promotes_a_replica_when_the_master_dies() {
    cluster::bound_run_time("cluster_infra", FILE_BOUND);
    let Some(sentinel) = block_in_place(Sentinel::up) else { return };
    let old = sentinel.current_master().expect("the sentinels agree on a master");
    let key = unique("cluster-infra");

    let mut master = sentinel.node_conn(old).expect("the master answers");
    let _: () = redis::cmd("SET").arg(&key).arg("before").query(&mut master).expect("SET on the master");
    // Replication is asynchronous: only a write that the replicas acknowledged (WAIT) is sure to
    // outlive the master.
    let acked: usize = redis::cmd("WAIT").arg(2).arg(5000).query(&mut master).expect("WAIT");
    assert_eq!(acked, 2, "both replicas acknowledged the write");

    // The redis crate's Sentinel client finds the master from the sentinels' addresses alone.
    let sentinel_urls: Vec<String> = sentinel.sentinels().iter().map(|s| s.url.clone()).collect();
    let mut client = redis::sentinel::SentinelClient::build(
        sentinel_urls.clone(),
        sentinel.master_name(),
        None,
        redis::sentinel::SentinelServerType::Master,
    )
    .expect("SentinelClient");
    let mut conn = client.get_async_connection().await.expect("a connection to the master through the sentinels");
    assert_eq!(conn.get::<_, Option<String>>(&key).await.expect("GET"), Some("before".to_owned()));

    block_in_place(|| sentinel.kill_node(old));
    let killed = std::time::Instant::now();
    let new = block_in_place(|| sentinel.wait_new_master(old, FAILOVER));
    let new = new.unwrap_or_else(|| panic!("the sentinels promoted a replica of node {} within {FAILOVER:?}", old + 1));
    assert_ne!(new, old);
    eprintln!("sentinel: node {} promoted {:.1?} after the kill", new + 1, killed.elapsed());
    for j in 0..3 {
        assert_eq!(sentinel.master_by(j), Some(new), "sentinel {} names the new master", j + 1);
    }
    let mut promoted = sentinel.node_conn(new).expect("the new master answers");
    let value: Option<String> = redis::cmd("GET").arg(&key).query(&mut promoted).expect("GET on the new master");
    assert_eq!(value.as_deref(), Some("before"), "the acknowledged write outlived the old master");

    // The old connection is dead; a new one through the sentinels reaches the new master and
    // takes writes.
    assert!(conn.get::<_, Option<String>>(&key).await.is_err(), "the connection to the killed master fails");
    let mut conn = client.get_async_connection().await.expect("a connection to the new master through the sentinels");
    let _: () = conn.set(&key, "after").await.expect("SET through the sentinels after the failover");
    let value: Option<String> = redis::cmd("GET").arg(&key).query(&mut promoted).expect("GET");
    assert_eq!(value.as_deref(), Some("after"), "the write went to the new master");

    block_in_place(|| sentinel.restart_node(old));
    assert_eq!(sentinel.role(old).as_deref(), Some("slave"), "the old master came back as a replica");
    assert_eq!(sentinel.current_master(), Some(new), "and the sentinels still name the new master");
    let _: () = conn.del(&key).await.expect("DEL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_replica_takes_over_a_killed_master() {
    cluster::bound_run_time("cluster_infra", FILE_BOUND);
    let Some(rc) = block_in_place(RedisCluster::up) else { return };
    let masters = rc.masters();
    assert_eq!(masters.len(), 3, "3 masters serve the slots: {masters:?}");

    // Keys over many slots, so that every master holds some.
    let prefix = unique("cluster-infra");
    let keys: Vec<String> = (0..N).map(|i| format!("{prefix}:{i}")).collect();
    let by_master: BTreeSet<usize> = keys.iter().filter_map(|k| rc.master_of_slot(rc.slot_of(k))).collect();
    assert_eq!(by_master.len(), 3, "the keys land on every master");

    let client = redis::cluster::ClusterClient::new(rc.initial_nodes()).expect("ClusterClient");
    let mut conn = client.get_async_connection().await.expect("cluster connection");
    for k in &keys {
        let _: () = conn.set(k, k).await.expect("SET through the cluster client");
    }

    let victim_key = &keys[0];
    let slot = rc.slot_of(victim_key);
    let victim = rc.master_of_slot(slot).expect("a master serves the slot");
    let replicas = rc.replicas_of(victim);
    assert_eq!(replicas.len(), 1, "node {} has one replica: {replicas:?}", victim + 1);
    // Replication is asynchronous: wait until the replica holds every key of its master.
    let mut replica = rc.node_conn(replicas[0]).expect("the replica answers");
    let _: () = redis::cmd("READONLY").query(&mut replica).expect("READONLY");
    let mine: Vec<&String> = keys.iter().filter(|k| rc.master_of_slot(rc.slot_of(k)) == Some(victim)).collect();
    assert!(
        celery_tests::wait_until(Duration::from_secs(10), || mine.iter().all(|k| redis::cmd("GET")
            .arg(*k)
            .query::<Option<String>>(&mut replica)
            .ok()
            .flatten()
            .as_ref()
            == Some(*k))),
        "the replica has its master's keys"
    );

    block_in_place(|| rc.kill_node(victim));
    let killed = std::time::Instant::now();
    let new = block_in_place(|| rc.wait_slot_moved(slot, victim, FAILOVER));
    assert_eq!(new, Some(replicas[0]), "the replica of node {} took over its slots within {FAILOVER:?}", victim + 1);
    eprintln!("redis-cluster: node {} took over {:.1?} after the kill", replicas[0] + 1, killed.elapsed());

    // The cluster client follows the move (MOVED, or a refresh of the slot map after the
    // connection error) without a new client: every key reads back, and new writes land.
    let end = tokio::time::Instant::now() + FAILOVER;
    let mut missing = keys.clone();
    while !missing.is_empty() && tokio::time::Instant::now() < end {
        let mut still = Vec::new();
        for k in missing {
            match conn.get::<_, Option<String>>(&k).await {
                Ok(Some(v)) if v == k => {}
                _ => still.push(k),
            }
        }
        missing = still;
        if !missing.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(missing.is_empty(), "keys not read back after the failover: {missing:?}");
    eprintln!("redis-cluster: every key read back through the same client {:.1?} after the kill", killed.elapsed());
    let _: () = conn.set(victim_key, "after").await.expect("SET to the moved slot");
    assert_eq!(conn.get::<_, Option<String>>(victim_key).await.expect("GET").as_deref(), Some("after"));

    block_in_place(|| rc.restart_node(victim));
    assert_eq!(rc.replicas_of(replicas[0]), vec![victim], "the old master came back as a replica");
    for k in &keys {
        let _: () = conn.del(k).await.expect("DEL");
    }
}
