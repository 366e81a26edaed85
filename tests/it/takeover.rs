//! Takeovers without spinning, and no reorder when a worker loses a partition and gets it back
//! (issue 11), on one in-process worker whose broker is scripted (orders held at a gate).

use std::future::Future;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::json;
use sparky::job::JobStatus;
use sparky::partition::Phase;
use sparky::queue::GROUP;
use sparky::worker::{RunMode, Worker};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::*;
use crate::scripted::Scripted;

/// Poll `done` until it holds (events, not durations: the bound only stops a broken run).
async fn until<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn scripted_worker(
    app: &TestApp,
    scripted: &std::sync::Arc<Scripted>,
) -> (Worker, CancellationToken) {
    let shutdown = CancellationToken::new();
    let worker = Worker::with_exchanges(
        app.config.clone(),
        app.store.clone(),
        app.queue.clone(),
        shutdown.clone(),
        scripted.factory(),
    );
    (worker, shutdown)
}

/// Place `job`'s open leg at the scripted broker, as an earlier delivery of it did.
async fn place_open(scripted: &std::sync::Arc<Scripted>, job: &sparky::domain::Job) {
    use sparky::exchanges::{client_order_id, Exchange, Leg, OrderRequest};
    let order = OrderRequest {
        symbol: job.alert.symbol.clone(),
        side: sparky::domain::OrderSide::Buy,
        quantity: rust_decimal_macros::dec!(1),
        order_type: sparky::domain::OrderType::Market,
        limit_price: None,
        reduce_only: false,
        leg: Leg::Open,
        client_order_id: client_order_id(job.job_id, Leg::Open),
        on_fill: None,
    };
    crate::scripted::Client(scripted.clone())
        .place_order(&order)
        .await
        .unwrap();
}

/// A scripted worker running until its shutdown token is cancelled.
fn start_scripted_worker(
    app: &TestApp,
    scripted: &std::sync::Arc<Scripted>,
) -> (
    Worker,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let (worker, shutdown) = scripted_worker(app, scripted);
    let run = tokio::spawn({
        let w = worker.clone();
        async move { w.run(RunMode::Forever, Duration::from_secs(30)).await }
    });
    (worker, shutdown, run)
}

async fn status(app: &TestApp, id: Uuid) -> Option<JobStatus> {
    app.store.get_job(id).await.unwrap().map(|j| j.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_reads_its_history_once_and_new_entries_while_an_old_job_runs() {
    let app = TestApp::spawn_with(|c| c.partitions = 1).await;
    let (a, sa) = app.paper_user().await;
    let (b, sb) = app.paper_user().await;
    let scripted = Scripted::new();
    let gate = scripted.gate("SLOWUSDT");

    // A previous owner read A's slow job and B's first job, then died: both pending to it.
    let mut slow = alert(a, &sa, "buy");
    slow["symbol"] = json!("SLOWUSDT");
    let slow = app.enqueue(&slow).await;
    let b1 = app.enqueue(&alert(b, &sb, "buy")).await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("ghost")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(app.queue.keys.stream(0))
        .arg(">")
        .query_async(&mut app.queue.conn())
        .await
        .unwrap();
    assert_eq!(app.queue.pending_count(0).await.unwrap(), 2);

    let (worker, shutdown, run) = start_scripted_worker(&app, &scripted);
    tokio::time::timeout(Duration::from_secs(60), gate.entered.notified())
        .await
        .expect("A's slow order reached the broker");

    // B's claimed job finishes, and a new alert of B is read and runs while A's older job is
    // still held at the broker.
    let b2 = app.enqueue(&alert(b, &sb, "sell")).await;
    until("B's new job succeeded", || async {
        status(&app, b2).await == Some(JobStatus::Succeeded)
    })
    .await;
    assert_eq!(status(&app, b1).await, Some(JobStatus::Succeeded));
    assert_eq!(
        status(&app, slow).await,
        Some(JobStatus::Executing),
        "A's job is still running"
    );
    assert_eq!(worker.partitions().phase(0), Some(Phase::Live));

    // Idle with a job in flight: the read loop blocks in XREADGROUP (one read per block,
    // READ_BLOCK = 1 s here) instead of spinning over its history.
    let before = worker.partitions().reads_done();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reads = worker.partitions().reads_done() - before;
    assert!(
        reads <= 10,
        "{reads} reads while idling for 3 s: the read loop spins"
    );

    gate.release(1);
    until("A's job succeeded", || async {
        status(&app, slow).await == Some(JobStatus::Succeeded)
    })
    .await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(scripted.orders_of("SLOWUSDT").len(), 1);
    assert_eq!(app.queue.pending_count(0).await.unwrap(), 0);
    app.cleanup().await;
}

/// Alert `i` of the order test: alternating buy/sell of ETHUSDT (scripted price 100, step 0.001)
/// for 100 + 10 i USD, so the opened quantity 1 + 0.1 i spells out the order the jobs ran in.
fn nth(user: Uuid, secret: &str, i: usize) -> serde_json::Value {
    let mut body = alert(
        user,
        secret,
        if i.is_multiple_of(2) { "buy" } else { "sell" },
    );
    body["position_size_usd"] = json!(100 + 10 * i);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_and_reacquiring_a_partition_with_jobs_in_flight_keeps_each_users_order() {
    let app = TestApp::spawn_with(|c| {
        c.partitions = 1;
        c.lease_ttl = Duration::from_millis(1500);
        c.exchange_timeout = Duration::from_millis(700);
    })
    .await;
    let (user, secret) = app.paper_user().await;
    let scripted = Scripted::new();
    let gate = scripted.gate("ETHUSDT");
    let mut jobs = vec![];
    for i in 0..4 {
        jobs.push(app.enqueue(&nth(user, &secret, i)).await);
    }
    let (worker, shutdown, run) = start_scripted_worker(&app, &scripted);
    // Job 0 is at the broker; jobs 1-3 are queued behind it in the user's lane.
    tokio::time::timeout(Duration::from_secs(60), gate.entered.notified())
        .await
        .expect("the first order reached the broker");

    // The lease is taken away: the worker loses the partition.
    let lease = app.queue.keys.lease(0);
    let _: () = redis::cmd("SET")
        .arg(&lease)
        .arg("thief")
        .query_async(&mut app.queue.conn())
        .await
        .unwrap();
    until("the worker lost the partition", || async {
        worker.partitions().phase(0).is_none()
    })
    .await;
    // A new alert arrives meanwhile, and the lease is free again.
    jobs.push(app.enqueue(&nth(user, &secret, 4)).await);
    let _: () = redis::cmd("DEL")
        .arg(&lease)
        .query_async(&mut app.queue.conn())
        .await
        .unwrap();
    // Not re-acquired while its entries are still queued or running here (several renewals).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        worker.partitions().phase(0),
        None,
        "re-acquired with entries of the lost ownership still queued"
    );

    gate.release(100);
    for id in &jobs {
        until("every job succeeded", || async {
            status(&app, *id).await == Some(JobStatus::Succeeded)
        })
        .await;
    }
    shutdown.cancel();
    run.await.unwrap().unwrap();

    let opens: Vec<Decimal> = scripted
        .orders_of("ETHUSDT")
        .iter()
        .filter(|o| o.client_order_id.ends_with('o'))
        .map(|o| o.quantity)
        .collect();
    let want: Vec<Decimal> = (0..5).map(|i| Decimal::ONE + Decimal::new(i, 1)).collect();
    assert_eq!(opens, want, "each job once, in the order they arrived");
    app.cleanup().await;
}

#[tokio::test]
async fn no_broker_request_leaves_once_the_partitions_lease_may_have_moved() {
    // A broker that counts the connections it is offered.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn({
        let connections = connections.clone();
        async move {
            while let Ok((_socket, _)) = listener.accept().await {
                connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    let http = reqwest::Client::new();
    let request_time = Duration::from_millis(700);
    let send = || {
        sparky::exchanges::http::send(
            "aster",
            http.get(&url).timeout(Duration::from_millis(200)),
            sparky::exchanges::http::Call::Write,
        )
    };

    // Valid for less than one request's time, and no renewal comes: the request is not sent.
    let fence = sparky::partition::Fence::new(
        tokio::time::Instant::now() + Duration::from_millis(300),
        request_time,
    );
    let refused = fence.scope(send()).await.unwrap_err();
    assert!(refused.to_string().contains("lease"), "{refused}");
    assert!(fence.is_void(), "it waited for the validity to end");
    // Revoked: not sent either.
    let fence = sparky::partition::Fence::new(
        tokio::time::Instant::now() + Duration::from_secs(60),
        request_time,
    );
    fence.revoke();
    assert!(fence.scope(send()).await.is_err());
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 0);

    // Valid: it goes out.
    let fence = sparky::partition::Fence::new(
        tokio::time::Instant::now() + Duration::from_secs(60),
        request_time,
    );
    let _ = fence.scope(send()).await;
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_started_job_redelivered_late_finishes_in_recovery_instead_of_going_stale() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let scripted = Scripted::new();
    // A job accepted two hours ago (far past SPARKY_MAX_SIGNAL_AGE_SECS) whose first delivery
    // started it and placed its order, then died before the commit.
    let mut alert =
        sparky::domain::parse_alert(alert(user, &secret, "buy").as_object().unwrap(), None)
            .unwrap();
    alert.symbol =
        sparky::domain::Symbol::parse("ETHUSDT", sparky::domain::ExchangeKind::Paper).unwrap();
    let job = sparky::domain::Job {
        job_id: Uuid::now_v7(),
        accepted_at: chrono::Utc::now() - chrono::Duration::hours(2),
        alert,
    };
    let (p, _) = app.queue.enqueue(&job).await.unwrap();
    let first = app.store.begin_job(&job, p, "0-1").await.unwrap();
    assert_eq!(
        first,
        sparky::store::Begin::Execute {
            attempt: 1,
            limits: Some(vec![])
        }
    );
    place_open(&scripted, &job).await;

    let (worker, _shutdown) = scripted_worker(&app, &scripted);
    run_until_idle(worker).await;
    let row = app.job(job.job_id).await;
    assert_eq!(row.status, JobStatus::Succeeded, "{row:?}");
    assert_eq!(row.attempts, 2);
    assert_eq!(scripted.orders().len(), 1, "found, not placed again");
    let trades = app.trades(user).await;
    assert_eq!(trades.len(), 1, "the order that exists is recorded");
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_overtaken_by_a_stale_delivery_runs_the_job_again_instead_of_leaving_it() {
    let app = TestApp::spawn_with(|c| c.partitions = 1).await;
    let (user, secret) = app.paper_user().await;
    let scripted = Scripted::new();
    let gate = scripted.gate("ETHUSDT");
    let id = app.enqueue(&alert(user, &secret, "buy")).await;
    let next = app.enqueue(&alert(user, &secret, "close")).await;
    let (_worker, shutdown, run) = start_scripted_worker(&app, &scripted);
    tokio::time::timeout(Duration::from_secs(60), gate.entered.notified())
        .await
        .expect("the order reached the broker");

    // A previous owner's begin, delayed until now, lands: this delivery's commit is superseded
    // although this worker still owns the partition.
    let (job, _) = app.store.job_envelope(id).await.unwrap().unwrap();
    let stale = app.store.begin_job(&job, 0, "0-0").await.unwrap();
    assert_eq!(
        stale,
        sparky::store::Begin::Execute {
            attempt: 2,
            limits: Some(vec![])
        }
    );
    gate.release(100);

    until("the job was run again and recorded", || async {
        status(&app, next).await == Some(JobStatus::Succeeded)
    })
    .await;
    let row = app.job(id).await;
    assert_eq!(row.status, JobStatus::Succeeded, "{row:?}");
    assert_eq!(row.attempts, 3, "run again, in recovery mode");
    let opens = scripted
        .orders_of("ETHUSDT")
        .iter()
        .filter(|o| o.client_order_id.ends_with('o'))
        .count();
    assert_eq!(opens, 1, "the order was found, not placed again");
    assert_eq!(app.trades(user).await.len(), 2, "the open and the close");
    shutdown.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(app.queue.pending_count(0).await.unwrap(), 0);
    app.cleanup().await;
}

#[tokio::test]
async fn a_poison_job_records_the_orders_its_earlier_deliveries_placed_and_sends_nothing() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let scripted = Scripted::new();
    let id = app.enqueue(&alert(user, &secret, "buy")).await;
    // The ingress enqueued it; its row appears when a delivery begins it.
    let p = app.queue.partition_of(&user);
    let entry = app.queue.range(p, 0, i64::MAX).await.unwrap().remove(0);
    let job = entry.job.unwrap();
    assert_eq!(job.job_id, id);
    // Five deliveries started it (each died before its commit); one of them placed the order.
    for _ in 0..app.config.max_deliveries {
        app.store.begin_job(&job, p, &entry.id).await.unwrap();
    }
    place_open(&scripted, &job).await;

    let (worker, _shutdown) = scripted_worker(&app, &scripted);
    run_until_idle(worker).await;
    let row = app.job(id).await;
    assert_eq!(
        (row.status, row.error_class),
        (JobStatus::Dead, Some(sparky::job::FailureClass::Poison)),
        "{row:?}"
    );
    assert!(row
        .error
        .unwrap()
        .contains("found at the broker and recorded"));
    assert_eq!(
        app.trades(user).await.len(),
        1,
        "the order that exists is recorded"
    );
    assert!(app.position(user, "ETHUSDT").await.is_some());
    assert_eq!(scripted.orders().len(), 1, "nothing was sent");
    app.cleanup().await;
}

#[tokio::test]
async fn a_reversal_whose_close_fills_partly_closes_the_rest_before_opening() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let scripted = Scripted::new();
    // Long 1.0 ETHUSDT; the reversal's first close fills only 0.6 (issue 12's example: before, the
    // reversal then sold 1.0 and the account ended short 0.6 while Sparky recorded short 1.0).
    let buy = app.enqueue(&nth(user, &secret, 0)).await;
    run_until_idle(scripted_worker(&app, &scripted).0).await;
    assert_eq!(status(&app, buy).await, Some(JobStatus::Succeeded));
    scripted.partial_closes("ETHUSDT", &[Decimal::new(6, 1)]);
    let sell = app.enqueue(&nth(user, &secret, 1)).await;
    run_until_idle(scripted_worker(&app, &scripted).0).await;

    let row = app.job(sell).await;
    assert_eq!(row.status, JobStatus::Succeeded, "{row:?}");
    let legs: Vec<(String, Decimal)> = app
        .trades(user)
        .await
        .into_iter()
        .filter(|t| t.job_id == sell)
        .map(|t| (t.leg, t.quantity))
        .collect();
    let opened = legs[2].1;
    assert_eq!(
        legs,
        [
            ("close".to_string(), Decimal::new(6, 1)),
            ("close2".to_string(), Decimal::new(4, 1)),
            ("open".to_string(), opened),
        ],
        "the remainder was closed by a second order before the short was opened"
    );
    assert_eq!(
        scripted.position_of("ETHUSDT"),
        Some((sparky::domain::Side::Short, opened)),
        "the account holds exactly the new side"
    );
    let position = app.position(user, "ETHUSDT").await.expect("the short");
    assert_eq!(
        (position.side, position.quantity),
        (sparky::domain::Side::Short, opened)
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_close_that_stays_partial_after_three_orders_opens_nothing_and_records_the_remainder() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let scripted = Scripted::new();
    let buy = app.enqueue(&nth(user, &secret, 0)).await;
    run_until_idle(scripted_worker(&app, &scripted).0).await;
    assert_eq!(status(&app, buy).await, Some(JobStatus::Succeeded));
    // Every close fills half of what is left: 1.0 -> 0.5 -> 0.25 -> 0.125.
    let half = Decimal::new(5, 1);
    scripted.partial_closes("ETHUSDT", &[half, half, half]);
    let sell = app.enqueue(&nth(user, &secret, 1)).await;
    run_until_idle(scripted_worker(&app, &scripted).0).await;

    let row = app.job(sell).await;
    assert_eq!(row.status, JobStatus::Dead, "{row:?}");
    let error = row.error.unwrap();
    assert!(
        error.contains("3 orders filled 0.875") && error.contains("long 0.125 remain open"),
        "{error}"
    );
    let opens = scripted
        .orders_of("ETHUSDT")
        .iter()
        .filter(|o| o.client_order_id.ends_with('o'))
        .count();
    assert_eq!(
        opens, 1,
        "the short side was not opened on top of the remainder"
    );
    let position = app.position(user, "ETHUSDT").await.expect("the remainder");
    assert_eq!(
        (position.side, position.quantity),
        (sparky::domain::Side::Long, Decimal::new(125, 3)),
        "Sparky records what the broker holds"
    );
    // A close alert for the remainder then makes the account flat.
    let close = app.enqueue(&alert(user, &secret, "close")).await;
    run_until_idle(scripted_worker(&app, &scripted).0).await;
    assert_eq!(status(&app, close).await, Some(JobStatus::Succeeded));
    assert_eq!(scripted.position_of("ETHUSDT"), None);
    assert!(app.position(user, "ETHUSDT").await.is_none());
    app.cleanup().await;
}
