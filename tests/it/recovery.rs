//! Failures against a real exchange client (the Aster fake of `exchanges.rs`): a broker failing for
//! a while, a permanent rejection replayed after the fix, and a worker killed between the broker's
//! acceptance and the commit.

use std::time::{Duration, Instant};

use serde_json::json;
use sparky::exchanges::{client_order_id, Leg};
use sparky::replay::{self, Decision, Options};

use crate::fakes::*;
use crate::helpers::{captured_logs, TestApp};
use crate::procs::spawn_worker;

const ORDER: &str = "POST /fapi/v1/order";

fn opts() -> Options {
    Options {
        dry_run: false,
        allow_stale: false,
        max_signal_age: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn a_broker_failing_with_5xx_then_recovering_gives_one_order_and_keeps_the_users_order() {
    let (fake, _, app, user, secret) = aster_app().await;
    for _ in 0..3 {
        fake.core.inject(
            ORDER,
            Fault::Reply(502, json!({"code": -1001, "msg": "Bad gateway"}), vec![]),
        );
    }
    let buy = app
        .enqueue(&webhook(user, &secret, "aster", "buy", "ETHUSDT", 100))
        .await;
    let close = app
        .enqueue(&webhook(user, &secret, "aster", "close", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;

    let job = app.job(buy).await;
    assert_eq!(
        (job.status.as_str(), job.attempts),
        ("succeeded", 1),
        "{job:?}"
    );
    assert_eq!(
        fake.orders_with(&client_order_id(buy, Leg::Open)),
        1,
        "exactly one order"
    );
    assert_eq!(
        app.job(close).await.status,
        sparky::job::JobStatus::Succeeded
    );
    // The user's next job reached the broker only after the retried one went through.
    let order_ids: Vec<String> = fake
        .orders()
        .iter()
        .map(|o| o["clientOrderId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        order_ids,
        vec![
            client_order_id(buy, Leg::Open),
            client_order_id(close, Leg::Close)
        ]
    );
    // Every failed attempt is in the job's history.
    let history: serde_json::Value =
        sqlx::query_scalar("SELECT history FROM jobs WHERE job_id = $1")
            .bind(buy)
            .fetch_one(&app.store.pool)
            .await
            .unwrap();
    let failures = history.as_array().unwrap();
    assert_eq!(failures.len(), 3, "{history}");
    assert!(
        failures.iter().all(|h| h["class"] == "transient"),
        "{history}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_permanent_rejection_is_dead_lettered_and_replayed_once_after_the_fix() {
    let (fake, _, app, user, secret) = aster_app().await;
    fake.st.lock().unwrap().margin_limit = Some(rust_decimal_macros::dec!(10));
    let id = app
        .enqueue(&webhook(user, &secret, "aster", "buy", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(id).await;
    assert_eq!(job.status, sparky::job::JobStatus::Rejected);
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("Margin is insufficient."),
        "{job:?}"
    );
    assert_eq!(fake.orders().len(), 0);
    let dl = app.dlq_record_of(id).await;
    assert_eq!(dl["status"], "rejected", "{dl:?}");
    assert!(dl["error"].contains("Margin is insufficient."), "{dl:?}");

    // The broker is told to accept; the operator replays the job.
    fake.st.lock().unwrap().margin_limit = None;
    let items = replay::replay(&app.store, &app.queue, &[id], &opts())
        .await
        .unwrap();
    assert_eq!(items[0].decision, Decision::Replayed, "{items:?}");
    app.run_worker_until_idle().await;
    assert_eq!(app.job(id).await.status, sparky::job::JobStatus::Succeeded);
    assert_eq!(fake.orders_with(&client_order_id(id, Leg::Open)), 1);

    // Replaying it again does nothing.
    let items = replay::replay(&app.store, &app.queue, &[id], &opts())
        .await
        .unwrap();
    assert_eq!(items[0].decision, Decision::NotFailed);
    app.run_worker_until_idle().await;
    assert_eq!(fake.orders().len(), 1);
    assert_eq!(app.trades(user).await.len(), 1);
    app.cleanup().await;
}

/// The environment of a worker process on the fake at `url`: a short lease, and an exchange
/// timeout within it (a lease may not be shorter: start-up check).
fn worker_env(url: &str) -> [(&'static str, String); 3] {
    [
        ("SPARKY_LEASE_TTL_MS", "1500".to_string()),
        ("SPARKY_EXCHANGE_TIMEOUT_MS", "700".to_string()),
        ("ASTER_BASE_URL", url.to_string()),
    ]
}

/// Enqueue `body` for a worker process whose broker takes the next order and then does not
/// answer, and kill the worker (SIGKILL) once the broker has the job's `leg`: a delivery that died
/// between the broker and its commit. The job's id.
async fn killed_after_the_broker_took(
    app: &TestApp,
    fake: &AsterFake,
    url: &str,
    body: &serde_json::Value,
    leg: Leg,
) -> uuid::Uuid {
    fake.core
        .inject(ORDER, Fault::HangAfterDoing(Duration::from_secs(30)));
    let mut first = spawn_worker(app, &worker_env(url)).await;
    let id = app.enqueue(body).await;
    let coid = client_order_id(id, leg);
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.orders_with(&coid) == 0 {
        assert!(Instant::now() < deadline, "{coid} never reached the broker");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill9();
    id
}

/// The job `id`'s one trade is its close, sent once: the buy-back of the ETH short (a buy, with
/// the PnL the short's recorded entry gives), and the position is gone.
async fn recorded_as_the_shorts_buy_back(
    app: &TestApp,
    fake: &AsterFake,
    user: uuid::Uuid,
    id: uuid::Uuid,
) {
    let close = client_order_id(id, Leg::Close);
    assert_eq!(fake.orders_with(&close), 1, "the close was sent once");
    let trades: Vec<_> = app
        .trades(user)
        .await
        .into_iter()
        .filter(|t| t.job_id == id)
        .collect();
    assert_eq!(trades.len(), 1, "{trades:?}");
    assert_eq!(trades[0].client_order_id, close);
    assert_eq!(
        trades[0].side, "buy",
        "a short's close is a buy: {trades:?}"
    );
    let pnl: Option<rust_decimal::Decimal> =
        sqlx::query_scalar("SELECT pnl FROM trades WHERE job_id = $1")
            .bind(id)
            .fetch_one(&app.store.pool)
            .await
            .unwrap();
    assert!(
        pnl.is_some(),
        "the short's recorded entry gives the close its PnL"
    );
    assert!(app.position(user, "ETHUSDT").await.is_none());
}

/// An ETH short of `user`, run to the end.
async fn short_eth(app: &TestApp, fake: &AsterFake, user: uuid::Uuid, secret: &str) {
    let short = app
        .run_one(&webhook(user, secret, "aster", "sell", "ETHUSDT", 100))
        .await;
    assert_eq!(short.status, sparky::job::JobStatus::Succeeded, "{short:?}");
    assert!(fake.position("ETHUSDT") < rust_decimal::Decimal::ZERO);
}

/// The job's row once it is no longer `executing` (at most 60 s).
async fn final_row(app: &TestApp, id: uuid::Uuid) -> sparky::store::JobRow {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = app.job(id).await;
        if job.status != sparky::job::JobStatus::Executing {
            return job;
        }
        assert!(Instant::now() < deadline, "the redelivery did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_after_the_broker_accepted_but_before_the_commit_places_no_second_order() {
    let (fake, url, app, user, secret) = aster_app().await;
    let buy = webhook(user, &secret, "aster", "buy", "ETHUSDT", 100);
    let id = killed_after_the_broker_took(&app, &fake, &url, &buy, Leg::Open).await;
    let coid = client_order_id(id, Leg::Open);
    assert_eq!(
        app.job(id).await.status,
        sparky::job::JobStatus::Executing,
        "killed before the commit"
    );
    // A kill switch set meanwhile does not stop the redelivery from recording the order the
    // broker already has (it is finishing the job, not placing a new one).
    sqlx::query("INSERT INTO risk_limits (user_id, kill_switch) VALUES ($1, true)")
        .bind(user)
        .execute(&app.store.pool)
        .await
        .unwrap();

    let _second = spawn_worker(&app, &worker_env(&url)).await;
    let job = final_row(&app, id).await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded, "{job:?}");
    assert_eq!(job.attempts, 2, "redelivered once");
    assert_eq!(
        fake.orders_with(&coid),
        1,
        "the lookup found the order: exactly one exists"
    );
    let trades = app.trades(user).await;
    assert_eq!(trades.len(), 1);
    assert_eq!(trades[0].client_order_id, coid);
    app.cleanup().await;
}

/// A reversal a kill switch blocks still closes the old side. A delivery of it killed after the
/// broker took that close, before the commit, is redelivered: its open was never placed, so it is
/// checked and blocked again; the close it sent is found by its client order id and recorded once
/// (a buy's close of a short), the position flat; nothing is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_reversal_killed_after_its_close_is_blocked_again_and_records_the_close() {
    let (fake, url, app, user, secret) = aster_app().await;
    short_eth(&app, &fake, user, &secret).await;
    sqlx::query("INSERT INTO risk_limits (user_id, kill_switch) VALUES ($1, true)")
        .bind(user)
        .execute(&app.store.pool)
        .await
        .unwrap();
    let buy = webhook(user, &secret, "aster", "buy", "ETHUSDT", 100);
    let id = killed_after_the_broker_took(&app, &fake, &url, &buy, Leg::Close).await;
    assert_eq!(fake.position("ETHUSDT"), rust_decimal::Decimal::ZERO);

    let _second = spawn_worker(&app, &worker_env(&url)).await;
    let job = final_row(&app, id).await;
    assert_eq!(job.status, sparky::job::JobStatus::Blocked, "{job:?}");
    assert_eq!(job.attempts, 2, "redelivered once");
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("closed the short position"),
        "{job:?}"
    );
    assert_eq!(
        fake.orders_with(&client_order_id(id, Leg::Open)),
        0,
        "nothing opened"
    );
    recorded_as_the_shorts_buy_back(&app, &fake, user, id).await;
    app.cleanup().await;
}

/// A close killed after the broker took it: the redelivery finds the broker flat and the close
/// there, and records it as what it was, the buy-back of the recorded short (not a long's sell),
/// with the realized PnL from the recorded entry; the close was sent once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_close_of_a_short_killed_after_the_broker_took_it_is_recorded_as_the_shorts_buy_back() {
    let (fake, url, app, user, secret) = aster_app().await;
    short_eth(&app, &fake, user, &secret).await;
    let close = webhook(user, &secret, "aster", "close", "ETHUSDT", 100);
    let id = killed_after_the_broker_took(&app, &fake, &url, &close, Leg::Close).await;
    assert_eq!(fake.position("ETHUSDT"), rust_decimal::Decimal::ZERO);

    let _second = spawn_worker(&app, &worker_env(&url)).await;
    let job = final_row(&app, id).await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded, "{job:?}");
    assert_eq!(job.attempts, 2, "redelivered once");
    recorded_as_the_shorts_buy_back(&app, &fake, user, id).await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_worker_that_lost_the_lease_stops_retrying_and_records_nothing() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    for _ in 0..20 {
        fake.core.inject(
            ORDER,
            Fault::Reply(502, json!({"code": -1001, "msg": "Bad gateway"}), vec![]),
        );
    }
    let j = job(
        sparky::domain::ExchangeKind::Aster,
        sparky::domain::Action::Buy,
        "ETHUSDT",
        rust_decimal_macros::dec!(100),
    );
    let policy = sparky::executor::RetryPolicy {
        max_retries: 20,
        max_total: Duration::from_secs(30),
        min_delay: Duration::from_millis(200),
        max_delay: Duration::from_millis(200),
    };
    let lost = sparky::partition::Fence::unbounded();
    let run = sparky::executor::execute_until(&ex, &j, false, None, &policy, &lost);
    let cancel = async {
        while fake.core.seen(ORDER).is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lost.revoke();
    };
    let (outcome, _) = tokio::join!(run, cancel);
    assert!(
        outcome.is_none(),
        "abandoned, nothing to record: {outcome:?}"
    );
    assert_eq!(
        fake.core.seen(ORDER).len(),
        1,
        "no attempt after the lease was lost"
    );
    assert!(fake.orders().is_empty());
}

/// Wait until `done` holds, checking every 20 ms; fail with `what` after a minute (a deadline for
/// liveness on a loaded machine, not a measure of speed).
async fn eventually<F, Fut>(what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The worker's own lease-loss path, end to end: a real worker retries a job against a failing
/// broker, its partition's lease is taken by someone else in Redis, and the worker must stop,
/// record nothing, ack nothing and leave the lease alone; the partition's next owner finishes the
/// job, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_lease_is_taken_records_nothing_and_the_next_owner_finishes_the_job() {
    let (fake, _, app, user, secret) = aster_app().await;
    // The broker fails every order for now: the job stays in its retry loop.
    for _ in 0..1000 {
        fake.core.inject(
            ORDER,
            Fault::Reply(502, json!({"code": -1001, "msg": "Bad gateway"}), vec![]),
        );
    }
    let mut config = app.config.clone();
    config.lease_ttl = Duration::from_millis(1500);
    // The start-up rule: 0.8 x 1500 - 1500 / 3 = 700 ms of room for one request.
    config.exchange_timeout = Duration::from_millis(700);
    config.exchange_retries = 1000;
    config.exchange_retry_max = Duration::from_secs(600);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = sparky::worker::Worker::new(
        config,
        app.store.clone(),
        app.queue.clone(),
        shutdown.clone(),
    );
    let consumer = worker.consumer.clone();
    let run = tokio::spawn(async move {
        worker
            .run(sparky::worker::RunMode::Forever, Duration::from_secs(30))
            .await
    });

    let id = app
        .enqueue(&webhook(user, &secret, "aster", "buy", "ETHUSDT", 100))
        .await;
    eventually("the order never reached the broker", || async {
        !fake.core.seen(ORDER).is_empty()
    })
    .await;
    let job = app.job(id).await;
    let p = job.partition as u32;
    let lease = app.queue.keys.lease(p);
    assert_eq!(
        app.queue.lease_owner(p).await.unwrap().as_deref(),
        Some(consumer.as_str())
    );

    // Someone else holds the partition now (as after an expiry and a takeover).
    let _: () = redis::cmd("SET")
        .arg(&lease)
        .arg("thief")
        .arg("PX")
        .arg(600_000)
        .query_async(&mut app.queue.conn())
        .await
        .unwrap();
    let gave_up = "lease lost; leaving the job to the partition's next owner";
    let job_id = id.to_string();
    eventually(
        "the worker neither gave the job up nor recorded it after losing the lease",
        || async {
            let logged = captured_logs()
                .lines()
                .any(|l| l.contains(&job_id) && l.contains(gave_up));
            logged || app.job(id).await.status != sparky::job::JobStatus::Executing
        },
    )
    .await;
    let attempts_at_loss = fake.core.seen(ORDER).len();

    // Nothing recorded, nothing acked: the entry waits for the partition's next owner.
    let job = app.job(id).await;
    assert_eq!(
        (job.status.as_str(), job.attempts),
        ("executing", 1),
        "a delivery that lost its lease recorded an outcome: {job:?}"
    );
    assert!(app.trades(user).await.is_empty());
    assert!(app.dlq_records().await.is_empty());
    assert_eq!(
        app.pending_entries(p).await,
        vec![(job.entry_id.clone(), consumer.clone())],
        "the entry stays pending"
    );

    // Stopped, it made no further attempt and did not release a lease that is not its own.
    shutdown.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(fake.core.seen(ORDER).len(), attempts_at_loss);
    assert_eq!(
        app.queue.lease_owner(p).await.unwrap().as_deref(),
        Some("thief")
    );
    assert_eq!(app.job(id).await.status, sparky::job::JobStatus::Executing);

    // The next owner (the lease is free again, the broker is back) finishes it, once.
    let _: () = redis::cmd("DEL")
        .arg(&lease)
        .query_async(&mut app.queue.conn())
        .await
        .unwrap();
    fake.core.clear_faults();
    app.run_worker_until_idle().await;
    let job = app.job(id).await;
    assert_eq!(
        (job.status.as_str(), job.attempts),
        ("succeeded", 2),
        "{job:?}"
    );
    assert_eq!(fake.orders_with(&client_order_id(id, Leg::Open)), 1);
    assert_eq!(app.trades(user).await.len(), 1);
    assert!(app.pending_entries(p).await.is_empty());
    app.cleanup().await;
}
