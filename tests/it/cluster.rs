//! Redis Cluster failover (issue 13): a private 6-node cluster (3 masters, 3 replicas, started by
//! `scripts/redis-cluster`), four worker processes SIGKILLed every few seconds, and the master of
//! a shard SIGKILLed mid-traffic, with `SPARKY_REDIS_WAIT_REPLICAS=1`. Every alert answered 202 runs
//! exactly once and in its user's order; the killed node is started again and rejoins as a replica.
//!
//! The cluster is this test's own (other tests may be running on the shared one), on free ports.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sparky::redis_conn::{parse_cluster_nodes, slot_of};
use uuid::Uuid;

use crate::chaos::{
    aster_user, chaos_worker_env, kill_one_and_replace, nth, pause_2_to_4_s, qty, symbol,
};
use crate::fakes::AsterFake;
use crate::helpers::*;
use crate::ordering::{finished_jobs, wait_finished};
use crate::procs::*;

const LEASE_MS: u64 = 3000;

/// A cluster started by `scripts/redis-cluster` on free ports; stopped when dropped.
pub struct PrivateCluster {
    pub base: u16,
    pub dir: PathBuf,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/redis-cluster")
}

fn free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

impl PrivateCluster {
    pub fn start() -> PrivateCluster {
        let dir = std::env::temp_dir().join(format!("sparky-cluster-{}", Uuid::new_v4().simple()));
        for _ in 0..20 {
            let base: u16 = rand::thread_rng().gen_range(20000..29000);
            // Each node also listens on its bus port (port + 10000).
            if !(base..base + 6).all(|p| free(p) && free(p + 10000)) {
                continue;
            }
            let out = Command::new("bash")
                .arg(script())
                .args(["start", "--base-port", &base.to_string(), "--dir"])
                .arg(&dir)
                .output()
                .expect("bash scripts/redis-cluster");
            if out.status.success() {
                return PrivateCluster { base, dir };
            }
            eprintln!(
                "cluster on {base} did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        panic!("could not start a private Redis Cluster");
    }

    pub fn urls(&self) -> Vec<String> {
        (self.base..self.base + 6)
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The port of the master serving partition `p`'s hash tag, asked of a live node.
    pub fn master_of_partition(&self, p: u32) -> u16 {
        let slot = slot_of(&format!("{{p{p}}}"));
        for port in self.base..self.base + 6 {
            let nodes = parse_cluster_nodes(&self.cli(port, &["cluster", "nodes"]));
            if let Some(m) = nodes
                .iter()
                .find(|n| n.role == "master" && n.is_healthy() && n.serves(slot))
            {
                return m.addr.rsplit_once(':').unwrap().1.parse().unwrap();
            }
        }
        panic!("no node serves partition {p}");
    }

    pub fn kill9(&self, port: u16) {
        let pid = std::fs::read_to_string(self.dir.join(port.to_string()).join("redis.pid"))
            .expect("the node's pid file");
        let st = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap();
        assert!(st.success(), "kill -9 {pid}");
    }

    pub fn restart_node(&self, port: u16) {
        let out = Command::new("bash")
            .arg(script())
            .args([
                "restart-node",
                &port.to_string(),
                "--base-port",
                &self.base.to_string(),
                "--dir",
            ])
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "restart-node: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Whether `port` is a replica again with its link to its master up.
    pub fn is_synced_replica(&self, port: u16) -> bool {
        let info = self.cli(port, &["info", "replication"]);
        info.contains("role:slave") && info.contains("master_link_status:up")
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", "--base-port", &self.base.to_string(), "--dir"])
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `503` answers seen (the failover, a shard without its replica for `WAIT`).
static UNAVAILABLE: AtomicU64 = AtomicU64::new(0);

/// Post until answered 202 or 200 (an `alert_id` makes retries safe); returns the job id of a 202.
/// 503s and 429s are retried.
async fn post_until_accepted(app: &TestApp, body: &Value) -> Option<Uuid> {
    let mut body = body.clone();
    body["alert_id"] = json!(format!(
        "{}-{}",
        body["user_id"].as_str().unwrap(),
        body["position_size_usd"].as_str().unwrap()
    ));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, v) = app.post_webhook(&body).await;
        match status.as_u16() {
            202 => return Some(v["job_id"].as_str().unwrap().parse().unwrap()),
            200 => return None,
            503 => {
                UNAVAILABLE.fetch_add(1, Ordering::Relaxed);
            }
            429 => {}
            other => panic!("unexpected {other}: {v}"),
        }
        assert!(Instant::now() < deadline, "alert never accepted: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_mid_traffic_with_workers_killed_loses_no_accepted_alert_and_keeps_order() {
    let cluster = PrivateCluster::start();
    let (fake, url) = AsterFake::start().await;
    let urls = cluster.urls();
    let app = Arc::new(
        TestApp::spawn_with(|c| {
            c.redis_cluster_urls = urls;
            c.redis_wait_replicas = 1;
            c.redis_wait_timeout = Duration::from_millis(500);
            c.partitions = 8;
            c.secret_cache_ttl = Duration::from_secs(60);
            c.aster_base_url = Some(url.clone());
            c.rate_limit = sparky::queue::RateLimit::NONE;
        })
        .await,
    );
    assert!(app.queue.is_cluster());
    let (n_users, per_user) = (24, 30);
    let mut users = vec![];
    for i in 0..n_users {
        let sym = symbol(i);
        let (u, s) = aster_user(&app, &fake, &sym).await;
        users.push((u, s, sym));
    }
    let env = chaos_worker_env(LEASE_MS, &url);
    let mut workers = vec![];
    for _ in 0..4 {
        workers.push(spawn_worker(&app, &env).await);
    }

    // Each user's alerts in order, users concurrently; the job ids answered 202 are kept.
    let posting = {
        let app = app.clone();
        let users = users.clone();
        tokio::spawn(async move {
            let mut tasks = vec![];
            for (u, s, sym) in users {
                let app = app.clone();
                tasks.push(tokio::spawn(async move {
                    let mut accepted = vec![];
                    for i in 0..per_user {
                        let body = nth(u, &s, &sym, i);
                        accepted.extend(post_until_accepted(&app, &body).await);
                        // Spread the traffic over the run, so the master dies mid-traffic.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    accepted
                }));
            }
            let mut all = vec![];
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        })
    };

    // Kill a worker every 2-4 s; at the first kill, while alerts are still being posted, SIGKILL
    // the master of partition 0 too and, after its replica took over, start it again.
    let total = (n_users * per_user) as i64;
    let (mut kills, mut killed_master) = (0, None);
    let mut restarted = false;
    let started = Instant::now();
    while finished_jobs(&app).await < total {
        assert!(
            started.elapsed() < Duration::from_secs(400),
            "only {} of {total} jobs finished",
            finished_jobs(&app).await
        );
        pause_2_to_4_s().await;
        if killed_master.is_none() {
            assert!(!posting.is_finished(), "the master must die mid-traffic");
            let port = cluster.master_of_partition(0);
            cluster.kill9(port);
            println!(
                "killed master {port} at {:?}, {} jobs finished",
                started.elapsed(),
                finished_jobs(&app).await
            );
            killed_master = Some((port, Instant::now()));
        } else if let Some((port, at)) = killed_master {
            // The replica needs cluster-node-timeout (1 s) and an election to take over; the
            // old master then comes back as its replica (until then WAIT 1 refuses that shard).
            if !restarted && at.elapsed() > Duration::from_secs(4) {
                cluster.restart_node(port);
                restarted = true;
                println!("restarted {port} at {:?}", started.elapsed());
            }
        }
        kill_one_and_replace(&app, &mut workers, &env).await;
        kills += 1;
    }
    let accepted: HashSet<Uuid> = posting.await.unwrap().into_iter().collect();
    wait_finished(&app, total, Duration::from_secs(60)).await;
    let (port, _) = killed_master.expect("the master was killed mid-run");
    assert!(restarted);
    println!(
        "{total} jobs, {} answered 202, {} answers 503 (retried), {kills} worker SIGKILLs, master {port} SIGKILLed, in {:?}",
        accepted.len(),
        UNAVAILABLE.load(Ordering::Relaxed),
        started.elapsed()
    );

    // Every alert answered 202 is a job that succeeded: nothing accepted was lost.
    let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT job_id, status FROM jobs")
        .fetch_all(&app.store.pool)
        .await
        .unwrap();
    assert_eq!(rows.len() as i64, total, "every alert is exactly one job");
    let bad: Vec<_> = rows.iter().filter(|(_, s)| s != "succeeded").collect();
    assert!(bad.is_empty(), "{bad:?}");
    let known: HashSet<Uuid> = rows.iter().map(|(j, _)| *j).collect();
    let lost: Vec<_> = accepted.difference(&known).collect();
    assert!(lost.is_empty(), "accepted (202) but never run: {lost:?}");

    // Exactly once and in order, at the broker and in Sparky's records.
    let orders = fake.orders();
    for (u, _, sym) in &users {
        let mine: Vec<&Value> = orders.iter().filter(|o| o["symbol"] == *sym).collect();
        let mut ids: Vec<&str> = mine
            .iter()
            .map(|o| o["clientOrderId"].as_str().unwrap())
            .collect();
        ids.sort();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n, "{sym}: an order was placed twice");
        let opens: Vec<Decimal> = mine
            .iter()
            .filter(|o| o["clientOrderId"].as_str().unwrap().ends_with('o'))
            .map(|o| o["origQty"].as_str().unwrap().parse().unwrap())
            .collect();
        let want: Vec<Decimal> = (0..per_user).map(qty).collect();
        assert_eq!(opens, want, "{sym}: orders reached the broker out of order");
        let recorded: Vec<Decimal> = app
            .trades(*u)
            .await
            .iter()
            .filter(|t| t.leg == "open")
            .map(|t| t.quantity)
            .collect();
        assert_eq!(recorded, want, "{sym}: Sparky recorded another order");
    }
    for p in 0..app.config.partitions {
        assert_eq!(
            app.queue.pending_count(p).await.unwrap(),
            0,
            "partition {p}"
        );
    }
    // The killed master came back as a replica of the node that took its place.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.is_synced_replica(port) {
        assert!(
            Instant::now() < deadline,
            "node {port} did not rejoin as a replica"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // `sparky status` shows the cluster's nodes, all healthy again.
    let status = sparky::status::collect(&app.queue).await.unwrap();
    assert_eq!(status.redis_mode, "cluster");
    assert_eq!(status.nodes.len(), 6, "{:?}", status.nodes);
    assert_eq!(
        status.nodes.iter().filter(|n| n.role == "master").count(),
        3
    );
    let covered: HashSet<u32> = status
        .nodes
        .iter()
        .filter(|n| n.role == "master")
        .flat_map(|n| n.partitions.clone())
        .collect();
    assert_eq!(covered.len(), 8, "{:?}", status.nodes);
    for w in &mut workers {
        w.kill9();
    }
    match Arc::try_unwrap(app) {
        Ok(app) => app.cleanup().await,
        Err(_) => panic!("the app is still shared"),
    }
}

/// A `redis-server` on a free port with extra arguments (a replica: `--replicaof`).
fn redis_server(args: &[&str]) -> (u16, std::process::Child) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server on PATH");
    (port, child)
}

/// `SPARKY_REDIS_WAIT_REPLICAS=1` on a single Redis with one replica: a 202 while the replica is
/// attached; once it is gone, a 503 that says the alert may or may not have been accepted (the
/// entry is on the master and runs once; the retry with the same `alert_id` is a duplicate).
#[tokio::test]
async fn wait_replicas_on_a_single_redis_answers_202_only_while_a_replica_holds_the_entry() {
    let (mport, mut master) = redis_server(&[]);
    let (_, mut replica) = redis_server(&["--replicaof", "127.0.0.1", &mport.to_string()]);
    let murl = format!("redis://127.0.0.1:{mport}");
    // Wait until the replica is attached (it syncs within a second or so).
    let client = redis::Client::open(murl.as_str()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = client.get_multiplexed_async_connection().await {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            if info.contains("connected_slaves:1") && info.contains("state=online") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the replica did not attach");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let app = TestApp::spawn_with(|c| {
        c.redis_url = murl.clone();
        c.redis_wait_replicas = 1;
        c.redis_wait_timeout = Duration::from_millis(300);
        // No rate limit: an alert without an alert_id is appended by a bare `XADD` (no script),
        // which must wait for the replica just the same.
        c.rate_limit = sparky::queue::RateLimit::NONE;
    })
    .await;
    let (user, secret) = app.paper_user().await;
    let mut body = alert(user, &secret, "buy");
    body["alert_id"] = json!("first");
    let (st, v) = app.post_webhook(&body).await;
    assert_eq!(st.as_u16(), 202, "{v}");
    let bare = alert(user, &secret, "sell");
    let (st, v) = app.post_webhook(&bare).await;
    assert_eq!(st.as_u16(), 202, "{v}");

    let _ = replica.kill();
    let _ = replica.wait();
    body["alert_id"] = json!("second");
    body["action"] = json!("sell");
    let (st, v) = app.post_webhook(&body).await;
    assert_eq!(st.as_u16(), 503, "{v}");
    assert!(v.to_string().contains("may or may not"), "{v}");
    let (st, v) = app.post_webhook(&bare).await;
    assert_eq!(st.as_u16(), 503, "{v}");
    assert!(v.to_string().contains("may or may not"), "{v}");
    // They are on the master: all entries run, once each. (A worker with the wait on could not
    // take a lease now: its renewals need the replica too. This one runs without it.)
    let queue = sparky::queue::Queue::connect(
        &murl,
        &app.config.namespace,
        app.config.partitions,
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    let mut config = app.config.clone();
    config.redis_wait_replicas = 0;
    run_until_idle(sparky::worker::Worker::new(
        config,
        app.store.clone(),
        queue,
        tokio_util::sync::CancellationToken::new(),
    ))
    .await;
    assert_eq!(app.queued_entries().await, 4);
    // (buy, sell, sell, sell: the last two are a same-side repeat and may end skipped)
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE finished_at IS NOT NULL")
        .fetch_one(&app.store.pool)
        .await
        .unwrap();
    assert_eq!(jobs, 4);
    app.cleanup().await;
    let _ = master.kill();
    let _ = master.wait();
}
