//! Per-user order across a pool of real worker processes, with a worker killed (SIGKILL) or
//! stopped (SIGTERM) mid-run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::*;
use crate::procs::*;

const LEASE_MS: u64 = 2000;

/// Users with paper credentials whose orders take 1-5 ms ("a small random latency").
async fn users(app: &TestApp, n: usize) -> Vec<(Uuid, String)> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(app.paper_user_with(json!({"latency_ms": [1, 5]})).await);
    }
    out
}

/// Alert `i` of a user: alternating buy/sell of SOLUSDT (paper price 150, step 0.01) for
/// 150 + 15 i USD, so the opened quantity is exactly 1 + 0.1 i: the order of the open legs at the
/// exchange spells out the order in which the user's jobs ran.
fn nth_alert(user: Uuid, secret: &str, i: usize) -> serde_json::Value {
    json!({"secret": secret, "user_id": user, "exchange": "paper",
           "action": if i.is_multiple_of(2) { "buy" } else { "sell" }, "symbol": "SOLUSDT",
           "position_size_usd": (150 + 15 * i).to_string()})
}

fn expected_qty(i: usize) -> Decimal {
    Decimal::ONE + Decimal::new(i as i64, 1)
}

/// Post an alert until it is accepted, as a careful client would: with an `alert_id`, so a retry
/// after a 503 (whose XADD may have gone through before Redis answered too late) or a 429 can never
/// enqueue it twice.
pub(crate) async fn enqueue_surely(app: &TestApp, body: &serde_json::Value) {
    let mut body = body.clone();
    body["alert_id"] = json!(format!("{}-{}", body["user_id"], body["position_size_usd"]));
    for _ in 0..50 {
        let (status, v) = app.post_webhook(&body).await;
        match status.as_u16() {
            202 | 200 => return,
            429 | 503 => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!("unexpected {other}: {v}"),
        }
    }
    panic!("alert never accepted: {body}");
}

/// Post every user's alerts in order (one user's alerts sequentially, users concurrently).
fn post_all(
    app: &Arc<TestApp>,
    users: &[(Uuid, String)],
    per_user: usize,
) -> tokio::task::JoinHandle<()> {
    let app = app.clone();
    let users = users.to_vec();
    tokio::spawn(async move {
        let mut tasks = vec![];
        for (u, s) in users {
            let app = app.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per_user {
                    enqueue_surely(&app, &nth_alert(u, &s, i)).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    })
}

pub(crate) async fn finished_jobs(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status NOT IN ('queued', 'executing')")
        .fetch_one(&app.store.pool)
        .await
        .unwrap()
}

pub(crate) async fn wait_finished(app: &TestApp, n: i64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let done = finished_jobs(app).await;
        if done >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {n} jobs finished"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every job succeeded; each user's legs are exactly open, (close, open) x (n-1), with the open
/// quantities in ingress order; no leg twice.
async fn assert_exactly_once_in_order(app: &TestApp, users: &[(Uuid, String)], per_user: usize) {
    let bad: Vec<(String, String)> = sqlx::query_as(
        "SELECT job_id::text, status || ': ' || coalesce(error, '') FROM jobs WHERE status <> 'succeeded'",
    )
    .fetch_all(&app.store.pool)
    .await
    .unwrap();
    assert!(bad.is_empty(), "jobs not succeeded: {bad:?}");
    for (u, _) in users {
        let trades = app.trades(*u).await;
        let legs: Vec<&str> = trades.iter().map(|t| t.leg.as_str()).collect();
        let mut expect = vec!["open"];
        for _ in 1..per_user {
            expect.extend(["close", "open"]);
        }
        assert_eq!(legs, expect, "user {u}: legs");
        let opens: Vec<Decimal> = trades
            .iter()
            .filter(|t| t.leg == "open")
            .map(|t| t.quantity)
            .collect();
        let want: Vec<Decimal> = (0..per_user).map(expected_qty).collect();
        assert_eq!(
            opens, want,
            "user {u}: orders reached the exchange out of ingress order"
        );
    }
}

async fn lease_owners(app: &TestApp) -> Vec<Option<String>> {
    let mut c = app.queue.conn();
    let mut out = vec![];
    for p in 0..app.config.partitions {
        let o: Option<String> = redis::cmd("GET")
            .arg(app.queue.keys.lease(p))
            .query_async(&mut c)
            .await
            .unwrap();
        out.push(o);
    }
    out
}

/// A job row's attempts, status, `started_at` and `finished_at`.
type JobTimes = (
    i32,
    String,
    chrono::DateTime<chrono::Utc>,
    Option<chrono::DateTime<chrono::Utc>>,
);

/// The jobs worker `w` (frozen) is running: started according to its log and not finished
/// there, and not final in Postgres (`executing`, or no row yet: a paper job's first delivery
/// writes its start with its commit).
async fn running_jobs_of(app: &TestApp, w: &WorkerProc) -> Vec<uuid::Uuid> {
    let log = std::fs::read_to_string(&w.log).unwrap_or_default();
    let mut started = std::collections::HashSet::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(job), Some(msg)) = (v["span"]["job_id"].as_str(), v["message"].as_str()) else {
            continue;
        };
        let Ok(job) = job.parse::<uuid::Uuid>() else {
            continue;
        };
        if msg.contains("Loading") {
            started.insert(job);
        } else if msg == "job finished" {
            started.remove(&job);
        }
    }
    let started: Vec<uuid::Uuid> = started.into_iter().collect();
    sqlx::query_scalar(
        "SELECT s.job_id FROM unnest($1::uuid[]) s (job_id) LEFT JOIN jobs j USING (job_id)
          WHERE j.job_id IS NULL OR j.status = 'executing'",
    )
    .bind(&started)
    .fetch_all(&app.store.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_one_killed_every_alert_once_and_in_order() {
    let app = Arc::new(
        TestApp::spawn_with(|c| {
            c.partitions = 8;
            c.secret_cache_ttl = Duration::from_secs(60);
        })
        .await,
    );
    let (n_users, per_user) = (200, 20);
    let users = users(&app, n_users).await;
    let env = [
        ("SPARKY_LEASE_TTL_MS", LEASE_MS.to_string()),
        // A lease may not be shorter than the exchange timeout (start-up check).
        (
            "SPARKY_EXCHANGE_TIMEOUT_MS",
            (LEASE_MS * 7 / 15).to_string(),
        ),
        ("SPARKY_WORKER_CONCURRENCY", "8".to_string()),
    ];
    let mut workers = vec![];
    for _ in 0..3 {
        workers.push(spawn_worker(&app, &env).await);
    }
    let victim = workers[0].id().await;
    let posting = post_all(&app, &users, per_user);

    // Kill one worker once a quarter of the jobs are done, at a moment it is running a job: frozen
    // first (SIGSTOP), so what it owns and runs can be read before the SIGKILL.
    let total = (n_users * per_user) as i64;
    wait_finished(&app, total / 4, Duration::from_secs(120)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (owned_before, cut_short) = loop {
        workers[0].freeze();
        let owned: Vec<u32> = lease_owners(&app)
            .await
            .iter()
            .enumerate()
            .filter(|(_, o)| o.as_deref() == Some(&victim))
            .map(|(p, _)| p as u32)
            .collect();
        let running = running_jobs_of(&app, &workers[0]).await;
        if !owned.is_empty() && !running.is_empty() {
            break (owned, running);
        }
        assert!(
            Instant::now() < deadline,
            "never caught the victim running a job (it owns partitions {owned:?})"
        );
        workers[0].resume();
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    workers[0].kill9();
    let killed_at = Instant::now();
    let killed_at_db: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&app.store.pool)
            .await
            .unwrap();
    workers.push(spawn_worker(&app, &env).await);

    // Takeover: every partition owned again, none by the dead worker (so each of the ones it
    // owned was taken over).
    loop {
        let owners = lease_owners(&app).await;
        if owners
            .iter()
            .all(|o| o.is_some() && o.as_deref() != Some(&victim))
        {
            break;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "no takeover of {owned_before:?}: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "takeover of partitions {owned_before:?} after SIGKILL: {:?} (lease TTL {LEASE_MS} ms); {} jobs were cut short",
        killed_at.elapsed(),
        cut_short.len()
    );

    posting.await.unwrap();
    wait_finished(&app, total, Duration::from_secs(300)).await;
    assert_eq!(
        finished_jobs(&app).await,
        total,
        "every alert became exactly one job"
    );
    assert_exactly_once_in_order(&app, &users, per_user).await;
    // Every job the victim was running when it died was either committed by it or taken over and
    // run again by the new owner; none was left behind or marked done unrun. A delivery that
    // started after the kill is the new owner's (a recorded start is `now()` of its statement; a
    // paper first delivery's, written with its commit, the worker's clock when it began); any
    // other record is the victim's own commit, which may land after the SIGKILL: a statement the
    // victim had written to its socket before it froze is still read and run by its Postgres
    // backend, whose `now()` is then later than the kill (seen in CI on a loaded machine, 46 ms
    // later).
    let mut rerun = 0;
    for job_id in &cut_short {
        let row: Option<JobTimes> = sqlx::query_as(
            "SELECT attempts, status, started_at, finished_at FROM jobs WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_optional(&app.store.pool)
        .await
        .unwrap();
        let Some((attempts, status, started_at, finished_at)) = row else {
            panic!("job {job_id}, running on the killed worker, has no row: it was never recorded");
        };
        if started_at > killed_at_db {
            rerun += 1;
        } else {
            assert!(
                status == "succeeded" && finished_at.is_some(),
                "job {job_id}, running on the killed worker, was neither committed by it nor run \
                 again (attempts {attempts}, status {status}, started {started_at}, finished \
                 {finished_at:?}, killed {killed_at_db})"
            );
        }
    }
    println!(
        "of the {} jobs running on the killed worker, {rerun} ran again under the new owner",
        cut_short.len()
    );
    for p in 0..app.config.partitions {
        assert_eq!(
            app.queue.pending_count(p).await.unwrap(),
            0,
            "partition {p} has unacked entries"
        );
    }
    drop(workers);
    Arc::try_unwrap(app).ok().unwrap().cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_mid_run_retries_nothing_and_loses_nothing() {
    let app = Arc::new(TestApp::spawn_with(|c| c.partitions = 8).await);
    let (n_users, per_user) = (60, 10);
    let users = users(&app, n_users).await;
    let env = [
        ("SPARKY_LEASE_TTL_MS", LEASE_MS.to_string()),
        // A lease may not be shorter than the exchange timeout (start-up check).
        (
            "SPARKY_EXCHANGE_TIMEOUT_MS",
            (LEASE_MS * 7 / 15).to_string(),
        ),
        ("SPARKY_WORKER_CONCURRENCY", "4".to_string()),
    ];
    let mut a = spawn_worker(&app, &env).await;
    let b = spawn_worker(&app, &env).await;
    let (_, b_id) = (a.id().await, b.id().await);
    let posting = post_all(&app, &users, per_user);
    let total = (n_users * per_user) as i64;
    wait_finished(&app, total / 3, Duration::from_secs(120)).await;
    let stopped_at = Instant::now();
    let code = a.terminate().await;
    assert_eq!(code, 0, "graceful shutdown exits 0");
    println!("worker stopped gracefully in {:?}", stopped_at.elapsed());

    posting.await.unwrap();
    wait_finished(&app, total, Duration::from_secs(300)).await;
    assert_exactly_once_in_order(&app, &users, per_user).await;
    let retried: Vec<(String, i32)> =
        sqlx::query_as("SELECT job_id::text, attempts FROM jobs WHERE attempts <> 1")
            .fetch_all(&app.store.pool)
            .await
            .unwrap();
    assert!(
        retried.is_empty(),
        "jobs retried after a graceful shutdown: {retried:?}"
    );
    // The remaining worker took over every partition of the stopped one (eventually: it takes
    // a released partition at its next rebalance).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let owners = lease_owners(&app).await;
        if owners.iter().all(|o| o.as_deref() == Some(b_id.as_str())) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the remaining worker {b_id} does not own every partition: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(b);
    Arc::try_unwrap(app).ok().unwrap().cleanup().await;
}
