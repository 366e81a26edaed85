//! Chaos (issue 11): four worker processes, one SIGKILLed every 2-4 s and replaced, a 2 s lease,
//! broker 5xx replies and 503-after-accept answers injected into the order route, and hostile
//! alerts among the traffic. Every alert runs exactly once and in its user's order, at the broker
//! as in Sparky's records, and every hostile alert is refused or final while its user goes on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sparky::domain::{parse_alert, Job};
use uuid::Uuid;

use crate::fakes::{store_credentials, AsterFake, Fault, ASTER_KEY, ASTER_SECRET};
use crate::helpers::*;
use crate::ordering::{enqueue_surely, finished_jobs, wait_finished};
use crate::procs::*;

const ORDER: &str = "POST /fapi/v1/order";
const LEASE_MS: u64 = 2000;

/// The environment of the chaos tests' worker processes: a lease of `lease_ms`, broker calls cut
/// off well inside it, 8 lanes, the Aster fake at `aster_url`, and a poison limit of 50 (a job in
/// flight when its worker is killed is redelivered; with a kill every 2-4 s a few jobs see several
/// kills, and they must not be taken for poison), and a broker retry budget of 20 retries within
/// 120 s instead of 5 within 30 s. The tests are about exactly-once and order under kills and
/// faults, not about the budget (which a deployment sets): on a loaded 2-core CI machine
/// the fake's answers, running alongside 4 debug-build workers and Postgres, sometimes miss the
/// cut-off several times in a row on top of the injected 502s, and a job that exhausted the
/// default budget ended `dead` ("gave up after 6 attempts"), its user's next alert `skipped`.
pub(crate) fn chaos_worker_env(lease_ms: u64, aster_url: &str) -> [(&'static str, String); 7] {
    [
        ("SPARKY_LEASE_TTL_MS", lease_ms.to_string()),
        (
            "SPARKY_EXCHANGE_TIMEOUT_MS",
            (lease_ms * 7 / 15).to_string(),
        ),
        ("SPARKY_WORKER_CONCURRENCY", "8".to_string()),
        ("ASTER_BASE_URL", aster_url.to_string()),
        ("SPARKY_MAX_DELIVERIES", "50".to_string()),
        ("SPARKY_EXCHANGE_RETRIES", "20".to_string()),
        ("SPARKY_EXCHANGE_RETRY_MAX_SECS", "120".to_string()),
    ]
}

/// The chaos tests' rhythm: a random pause of 2-4 s between kills.
pub(crate) async fn pause_2_to_4_s() {
    let pause = rand::thread_rng().gen_range(2000..4000);
    tokio::time::sleep(Duration::from_millis(pause)).await;
}

/// SIGKILL one of `workers` at random and start a new one in its place.
pub(crate) async fn kill_one_and_replace(
    app: &TestApp,
    workers: &mut [WorkerProc],
    env: &[(&str, String)],
) {
    let victim = rand::thread_rng().gen_range(0..workers.len());
    workers[victim].kill9();
    workers[victim] = spawn_worker(app, env).await;
}

pub(crate) fn symbol(i: usize) -> String {
    format!("U{i}USDT")
}

/// Alert `i` of a user: alternating buy/sell of the user's own symbol (price 150) for 150 + 15 i
/// USD: the opened quantity 1 + 0.1 i spells out the order in which the jobs ran.
pub(crate) fn nth(user: Uuid, secret: &str, sym: &str, i: usize) -> Value {
    json!({"secret": secret, "user_id": user, "exchange": "aster", "symbol": sym,
           "action": if i.is_multiple_of(2) { "buy" } else { "sell" },
           "position_size_usd": (150 + 15 * i).to_string()})
}

pub(crate) fn qty(i: usize) -> Decimal {
    Decimal::ONE + Decimal::new(i as i64, 1)
}

pub(crate) async fn aster_user(app: &TestApp, fake: &AsterFake, sym: &str) -> (Uuid, String) {
    let (u, s) = app.create_user().await;
    store_credentials(app, u, "aster", ASTER_KEY, ASTER_SECRET, None, json!({})).await;
    fake.add_market_like_sol(sym);
    (u, s)
}

/// Hostile alerts of one user: refused at the ingress, or (written past it) final, and the user's
/// next alert succeeds within 60 s of being accepted, kills and all (a liveness bound: locally it
/// takes about 3 s, but the alert queues behind its partition's backlog, injected broker faults
/// and lease hand-overs, on a 2-core CI machine that also runs Postgres, Redis and 4 workers).
async fn hostile_user_goes_on(app: &TestApp, user: Uuid, secret: &str, sym: &str) {
    let mut nul = nth(user, secret, sym, 0);
    nul["strategy"] = json!("a\u{0}b");
    // Under this load the ingress may not read the new user's secret or strategy within its 2 s
    // bounds: that is a 503 with Retry-After and nothing accepted, which a client retries.
    assert_eq!(
        app.post_webhook_honouring_retry_after(&nul)
            .await
            .0
            .as_u16(),
        400
    );
    for tweak in [
        |a: &mut sparky::domain::Alert| a.strategy = Some("a\u{0}b".into()),
        |a: &mut sparky::domain::Alert| {
            a.position_size_usd = Some(Decimal::from_scientific("1e28").unwrap())
        },
    ] {
        let mut alert = parse_alert(nth(user, secret, sym, 0).as_object().unwrap(), None).unwrap();
        tweak(&mut alert);
        let job = Job {
            job_id: Uuid::now_v7(),
            accepted_at: chrono::Utc::now(),
            alert,
        };
        app.queue.enqueue(&job).await.unwrap();
    }
    let next = app.enqueue(&nth(user, secret, sym, 0)).await;
    let accepted = Instant::now();
    loop {
        let job = app.store.get_job(next).await.unwrap();
        if job.as_ref().is_some_and(|j| j.status.is_final()) {
            assert_eq!(
                job.unwrap().status,
                sparky::job::JobStatus::Succeeded,
                "the user's next alert"
            );
            println!(
                "hostile user's next alert final after {:?}",
                accepted.elapsed()
            );
            return;
        }
        assert!(
            accepted.elapsed() < Duration::from_secs(60),
            "the hostile user's next alert was not final within 60 s: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_workers_killed_every_few_seconds_with_broker_faults_run_every_alert_once_in_order() {
    let (fake, url) = AsterFake::start().await;
    let app = Arc::new(
        TestApp::spawn_with(|c| {
            c.partitions = 8;
            c.secret_cache_ttl = Duration::from_secs(60);
            c.aster_base_url = Some(url.clone());
            c.rate_limit = sparky::queue::RateLimit::NONE;
        })
        .await,
    );
    let (n_users, per_user) = (80, 36);
    let mut users = vec![];
    for i in 0..n_users {
        let sym = symbol(i);
        let (u, s) = aster_user(&app, &fake, &sym).await;
        users.push((u, s, sym));
    }
    // One order in five fails: a 502 before doing anything, or a 503 after the order was placed.
    {
        let mut rng = rand::thread_rng();
        for _ in 0..(n_users * per_user * 3) {
            let fault = match rng.gen_range(0..10) {
                0 => Fault::Reply(502, json!({"code": -1001, "msg": "Bad gateway"}), vec![]),
                1 => Fault::AfterDoing(
                    503,
                    json!({"code": -1007, "msg": "Timeout waiting for response from backend server. Send status unknown; execution status unknown."}),
                ),
                _ => Fault::Pass,
            };
            fake.core.inject(ORDER, fault);
        }
    }
    let env = chaos_worker_env(LEASE_MS, &url);
    let mut workers = vec![];
    for _ in 0..4 {
        workers.push(spawn_worker(&app, &env).await);
    }

    let posting = {
        let app = app.clone();
        let users = users.clone();
        tokio::spawn(async move {
            let mut tasks = vec![];
            for (u, s, sym) in users {
                let app = app.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..per_user {
                        enqueue_surely(&app, &nth(u, &s, &sym, i)).await;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        })
    };
    let (hu, hs) = aster_user(&app, &fake, "HOSTILEUSDT").await;
    let hostile = {
        let app = app.clone();
        tokio::spawn(async move { hostile_user_goes_on(&app, hu, &hs, "HOSTILEUSDT").await })
    };

    // Kill a random worker every 2-4 s and start a new one, until every job is final.
    let total = (n_users * per_user) as i64 + 1;
    let mut kills = 0;
    let started = Instant::now();
    while finished_jobs(&app).await < total {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "only {} of {total} jobs finished",
            finished_jobs(&app).await
        );
        pause_2_to_4_s().await;
        kill_one_and_replace(&app, &mut workers, &env).await;
        kills += 1;
    }
    posting.await.unwrap();
    hostile.await.unwrap();
    wait_finished(&app, total, Duration::from_secs(60)).await;
    println!(
        "{total} jobs under {kills} SIGKILLs in {:?}",
        started.elapsed()
    );

    let not_succeeded: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT status, error FROM jobs WHERE status <> 'succeeded'")
            .fetch_all(&app.store.pool)
            .await
            .unwrap();
    assert!(not_succeeded.is_empty(), "{not_succeeded:?}");
    assert_eq!(
        finished_jobs(&app).await,
        total,
        "every alert is exactly one job"
    );

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
        assert_eq!(
            ids.len(),
            n,
            "{sym}: an order was placed twice at the broker"
        );
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
    for w in &mut workers {
        w.kill9();
    }
    match Arc::try_unwrap(app) {
        Ok(app) => app.cleanup().await,
        Err(_) => panic!("the app is still shared"),
    }
}
