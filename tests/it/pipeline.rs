//! webhook -> Redis Stream -> worker -> paper exchange -> Postgres, end to end.

use rust_decimal_macros::dec;
use serde_json::json;
use sparky::domain::Side;
use sparky::queue::GROUP;
use sparky::store::Begin;

use crate::helpers::*;

#[tokio::test]
async fn webhook_becomes_a_filled_paper_trade_and_a_position() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;

    let job_id = app.enqueue(&alert(user, &secret, "buy")).await;
    app.run_worker_until_idle().await;

    let job = app.job(job_id).await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded, "{job:?}");
    assert_eq!(job.user_id, user);
    assert_eq!(job.attempts, 1);
    let trades = app.trades(user).await;
    assert_eq!(trades.len(), 1, "{trades:?}");
    let t = &trades[0];
    assert_eq!((t.leg.as_str(), t.side.as_str()), ("open", "buy"));
    // 100 USD at the paper price 3000 = 0.0333.. rounded down to the 0.001 step
    assert_eq!(t.quantity, dec!(0.033));
    assert_eq!(t.price, Some(dec!(3000)));
    assert_eq!(t.symbol, "ETHUSDT");
    assert_eq!(t.client_order_id.len(), 35);
    let p = app.position(user, "ETHUSDT").await.expect("position");
    assert_eq!(
        (p.side, p.quantity, p.entry_price),
        (Side::Long, dec!(0.033), dec!(3000))
    );

    // The entry was acked: nothing pending (that the ack waits for the commit is
    // an_entry_is_acked_only_after_its_commit).
    for part in 0..app.config.partitions {
        assert_eq!(app.queue.pending_count(part).await.unwrap(), 0);
    }

    // The job's status is visible to its owner through the API, and to no one else.
    let r = app
        .http
        .get(app.url(&format!("/v1/jobs/{job_id}")))
        .header("X-Sparky-Secret", &secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["status"], "succeeded");
    assert_eq!(
        v["orders"][0]["exchange_order_id"],
        format!("paper-{}", t.client_order_id)
    );
    let (_, other_secret) = app.paper_user().await;
    let r = app
        .http
        .get(app.url(&format!("/v1/jobs/{job_id}")))
        .header("X-Sparky-Secret", &other_secret)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The three log lines of the original system, inside the job's span.
    let logs = captured_logs();
    let job_lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(&job_id.to_string()))
        .collect();
    for needle in [
        format!("Loading paper credentials for user {user}"),
        "Loaded paper credentials for user (label: Main Account)".to_string(),
        format!("Created paper executor for user {user}"),
    ] {
        assert!(
            job_lines
                .iter()
                .any(|l| l.contains(&needle) && l.contains(&user.to_string())),
            "no log line with job_id and user_id containing {needle:?} in:\n{}",
            job_lines.join("\n")
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn buy_skip_reverse_close_skip() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let step = |action: &'static str| {
        let app = &app;
        let body = alert(user, &secret, action);
        async move {
            let id = app.enqueue(&body).await;
            app.run_worker_until_idle().await;
            (
                app.job(id).await,
                app.store.trades_of_job(id).await.unwrap(),
            )
        }
    };

    let (job, trades) = step("buy").await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded);
    assert_eq!(trades.len(), 1);
    let p = app.position(user, "ETHUSDT").await.unwrap();
    assert_eq!((p.side, p.quantity), (Side::Long, dec!(0.033)));

    let (job, trades) = step("buy").await;
    assert_eq!(
        job.status,
        sparky::job::JobStatus::Skipped,
        "same side is skipped"
    );
    assert!(job.error.unwrap().contains("already long"));
    assert!(trades.is_empty());
    let p = app.position(user, "ETHUSDT").await.unwrap();
    assert_eq!((p.side, p.quantity), (Side::Long, dec!(0.033)));

    let (job, trades) = step("sell").await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded, "{job:?}");
    let legs: Vec<(&str, &str, _)> = trades
        .iter()
        .map(|t| (t.leg.as_str(), t.side.as_str(), t.quantity))
        .collect();
    assert_eq!(
        legs,
        vec![
            ("close", "sell", dec!(0.033)),
            ("open", "sell", dec!(0.033))
        ],
        "reversal: close first, then open"
    );
    let p = app.position(user, "ETHUSDT").await.unwrap();
    assert_eq!((p.side, p.quantity), (Side::Short, dec!(0.033)));

    let (job, trades) = step("close").await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded);
    assert_eq!(trades.len(), 1);
    assert_eq!(
        (trades[0].leg.as_str(), trades[0].side.as_str()),
        ("close", "buy")
    );
    assert!(app.position(user, "ETHUSDT").await.is_none());

    let (job, trades) = step("close").await;
    assert_eq!(job.status, sparky::job::JobStatus::Skipped);
    assert!(trades.is_empty());
    assert!(app.position(user, "ETHUSDT").await.is_none());

    assert_eq!(app.trades(user).await.len(), 4);
    app.cleanup().await;
}

#[tokio::test]
async fn too_small_orders_are_rejected_with_the_numbers_and_dead_lettered() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let mut body = alert(user, &secret, "buy");
    body["position_size_usd"] = json!("2"); // 2 USD of ETH at 3000 rounds down to 0
    let id = app.enqueue(&body).await;
    app.run_worker_until_idle().await;
    let job = app.job(id).await;
    assert_eq!(job.status, sparky::job::JobStatus::Rejected);
    let err = job.error.unwrap();
    assert!(
        err.contains("2 USD at 3000") && err.contains("minimum quantity 0.001"),
        "{err}"
    );
    assert!(app.trades(user).await.is_empty());
    assert!(app.position(user, "ETHUSDT").await.is_none());
    assert_eq!(app.dlq_records().await.len(), 1);
    let dl = app.dlq_record_of(id).await;
    assert_eq!(dl["status"], "rejected");
    assert!(dl["error"].contains("minimum quantity 0.001"), "{dl:?}");

    // A user without credentials for the exchange: rejected, saying so.
    let (bare, bare_secret) = app.create_user().await;
    let id = app.enqueue(&alert(bare, &bare_secret, "buy")).await;
    app.run_worker_until_idle().await;
    let job = app.job(id).await;
    assert_eq!(job.status, sparky::job::JobStatus::Rejected);
    assert!(job.error.unwrap().contains("no paper credentials"));
    app.cleanup().await;
}

#[tokio::test]
async fn a_redelivered_finished_entry_does_not_execute_again() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let id = app.enqueue(&alert(user, &secret, "buy")).await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(id).await.status, sparky::job::JobStatus::Succeeded);

    // Rewind every consumer group: the same stream entries are delivered again.
    let mut c = app.queue.conn();
    for p in 0..app.config.partitions {
        let _: () = redis::cmd("XGROUP")
            .arg("SETID")
            .arg(app.queue.keys.stream(p))
            .arg(GROUP)
            .arg("0")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    app.run_worker_until_idle().await;
    let job = app.job(id).await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded);
    assert_eq!(job.attempts, 1, "not executed a second time");
    assert_eq!(app.trades(user).await.len(), 1);
    for p in 0..app.config.partitions {
        assert_eq!(
            app.queue.pending_count(p).await.unwrap(),
            0,
            "redelivery was acked"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn an_entry_left_pending_by_a_crashed_worker_runs_once_on_redelivery() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let id = app.enqueue(&alert(user, &secret, "buy")).await;

    // A worker read the entry and recorded the start, then died before committing or acking.
    let entries = read_as(&app, "crashed-worker").await;
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    let job = e.job.as_ref().unwrap();
    assert_eq!(
        app.store.begin_job(job, e.partition, &e.id).await.unwrap(),
        Begin::Execute {
            attempt: 1,
            limits: Some(vec![])
        }
    );
    assert_eq!(app.queue.pending_count(e.partition).await.unwrap(), 1);

    app.run_worker_until_idle().await;
    let row = app.job(id).await;
    assert_eq!(row.status, sparky::job::JobStatus::Succeeded);
    assert_eq!(row.attempts, 2);
    assert_eq!(app.trades(user).await.len(), 1, "exactly one order");
    assert_eq!(app.queue.pending_count(e.partition).await.unwrap(), 0);
    app.cleanup().await;
}

#[tokio::test]
async fn users_orders_follow_the_ingress_order() {
    let app = TestApp::spawn().await;
    let mut users = vec![];
    for _ in 0..5 {
        users.push(app.paper_user().await);
    }
    // Interleave buy/close/sell/close per user; each must see its own sequence in order.
    let actions = ["buy", "close", "sell", "close", "buy"];
    let mut ids = vec![];
    for a in actions {
        for (u, s) in &users {
            ids.push((*u, app.enqueue(&alert(*u, s, a)).await));
        }
    }
    app.run_worker_until_idle().await;
    for (u, _) in &users {
        let legs: Vec<(String, String)> = app
            .trades(*u)
            .await
            .into_iter()
            .map(|t| (t.leg, t.side))
            .collect();
        let expect: Vec<(String, String)> = [
            ("open", "buy"),
            ("close", "sell"),
            ("open", "sell"),
            ("close", "buy"),
            ("open", "buy"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(legs, expect, "user {u}");
        assert_eq!(app.position(*u, "ETHUSDT").await.unwrap().side, Side::Long);
    }
    for (_, id) in ids {
        assert_eq!(app.job(id).await.status, sparky::job::JobStatus::Succeeded);
    }
    app.cleanup().await;
}

#[tokio::test]
async fn binaries_refuse_an_unmigrated_database() {
    let (_db, url) = fresh_database().await;
    let config = sparky::config::Config {
        database_url: url,
        namespace: format!("t{}", uuid::Uuid::new_v4().simple()),
        ..sparky::config::Config::default()
    };
    let err = sparky::ingress::connect(&config)
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{err:#}").contains("run `sparky migrate`"),
        "{err:#}"
    );
    let err = sparky::worker::Worker::connect(config, Default::default())
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("not migrated"), "{err:#}");
}

#[tokio::test]
async fn a_different_partition_count_is_refused() {
    let app = TestApp::spawn().await;
    let other = sparky::queue::Queue::connect(
        app.config.redis_target(),
        &app.config.namespace,
        app.config.partitions + 1,
        std::time::Duration::from_secs(1),
    )
    .await
    .unwrap();
    let err = other.check_partitions().await.unwrap_err().to_string();
    assert!(
        err.contains("SPARKY_PARTITIONS=5") && err.contains("set up with 4"),
        "{err}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn only_the_latest_delivery_may_record_a_jobs_outcome() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let (e, job) = enqueue_and_read_a_buy(&app, user, &secret).await;
    // Two deliveries started (the first worker lost the partition, another took it over).
    assert_eq!(
        app.store.begin_job(&job, e.partition, &e.id).await.unwrap(),
        Begin::Execute {
            attempt: 1,
            limits: Some(vec![])
        }
    );
    assert_eq!(
        app.store.begin_job(&job, e.partition, &e.id).await.unwrap(),
        Begin::Execute {
            attempt: 2,
            limits: Some(vec![])
        }
    );
    let outcome = sparky::executor::Outcome::new(sparky::executor::JobStatus::Skipped, "test");
    let late = app.store.finish_job(&job, &outcome, 1).await;
    assert!(
        matches!(late, Err(sparky::store::StoreError::Superseded(_))),
        "{late:?}"
    );
    assert_eq!(
        app.job(job.job_id).await.status,
        sparky::job::JobStatus::Executing,
        "the late delivery wrote nothing"
    );
    app.store.finish_job(&job, &outcome, 2).await.unwrap();
    assert_eq!(
        app.job(job.job_id).await.status,
        sparky::job::JobStatus::Skipped
    );
    app.cleanup().await;
}

/// Enqueue a buy and read its entry as a worker would (not processed): the entry and its job.
async fn enqueue_and_read_a_buy(
    app: &TestApp,
    user: uuid::Uuid,
    secret: &str,
) -> (sparky::queue::Entry, sparky::domain::Job) {
    app.enqueue(&alert(user, secret, "buy")).await;
    let e = read_as(app, "w").await.remove(0);
    let job = e.job.clone().unwrap();
    (e, job)
}

/// Read the partition streams once as consumer `name` (as a worker would), without processing.
async fn read_as(app: &TestApp, name: &str) -> Vec<sparky::queue::Entry> {
    let mut conn = app
        .queue
        .blocking_conn(std::time::Duration::from_millis(100))
        .await
        .unwrap();
    let cursors: Vec<(u32, String)> = (0..app.config.partitions)
        .map(|p| (p, ">".into()))
        .collect();
    app.queue
        .read(
            &mut conn,
            name,
            &cursors,
            10,
            std::time::Duration::from_millis(100),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn a_failed_job_redelivered_after_its_commit_still_reaches_the_dead_letter_stream() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.create_user().await; // no credentials: the job is rejected
    let id = app.enqueue(&alert(user, &secret, "buy")).await;
    // A worker read it, committed `rejected`, and died before the dead-letter XADD and the ack.
    let e = read_as(&app, "crashed-worker").await.remove(0);
    let job = e.job.clone().unwrap();
    let Begin::Execute { attempt, .. } =
        app.store.begin_job(&job, e.partition, &e.id).await.unwrap()
    else {
        panic!("fresh job");
    };
    let outcome = sparky::executor::Outcome::failed(
        sparky::executor::JobStatus::Rejected,
        sparky::job::FailureClass::Credentials,
        "no paper credentials",
    );
    app.store.finish_job(&job, &outcome, attempt).await.unwrap();
    assert!(app.dlq_records().await.is_empty());

    app.run_worker_until_idle().await;
    let dl = app.dlq_record_of(id).await;
    assert_eq!(
        (dl["status"].as_str(), dl["error_class"].as_str()),
        ("rejected", "credentials"),
        "{dl:?}"
    );
    assert!(dl["error"].contains("no paper credentials"), "{dl:?}");
    assert_eq!(dl["entry_id"], e.id, "{dl:?}");
    assert_eq!(
        app.queue.pending_count(e.partition).await.unwrap(),
        0,
        "acked"
    );
    assert_eq!(app.job(id).await.attempts, 1, "not executed again");
    app.cleanup().await;
}

/// How many times the job's final UPDATE was refused by the trigger of
/// [`an_entry_is_acked_only_after_its_commit`] (a sequence: it counts even in rolled-back
/// transactions).
async fn refused_commits(app: &TestApp) -> i64 {
    let (last, called): (i64, bool) =
        sqlx::query_as("SELECT last_value, is_called FROM refused_commits")
            .fetch_one(&app.store.pool)
            .await
            .unwrap();
    if called {
        last
    } else {
        0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_is_acked_only_after_its_commit() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    // In this test's own database: the job's commit fails, as it would with Postgres refusing
    // connections (SQLSTATE 57P03, so the worker waits it out rather than recording the job as
    // dead). A paper job's first delivery commits by inserting its row in its final state; a
    // delivery whose start was recorded, by updating it.
    sqlx::raw_sql(
        r#"
        CREATE SEQUENCE refused_commits;
        CREATE FUNCTION refuse_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          PERFORM nextval('refused_commits');
          RAISE EXCEPTION 'test: the commit is refused' USING ERRCODE = '57P03';
        END $$;
        CREATE TRIGGER refuse_commit BEFORE INSERT OR UPDATE ON jobs FOR EACH ROW
          WHEN (NEW.status NOT IN ('queued', 'executing')) EXECUTE FUNCTION refuse_commit();
        "#,
    )
    .execute(&app.store.pool)
    .await
    .unwrap();

    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = sparky::worker::Worker::new(
        app.config.clone(),
        app.store.clone(),
        app.queue.clone(),
        shutdown.clone(),
    );
    let consumer = worker.consumer.clone();
    let run = tokio::spawn(async move {
        worker
            .run(
                sparky::worker::RunMode::Forever,
                std::time::Duration::from_secs(30),
            )
            .await
    });
    let id = app.enqueue(&alert(user, &secret, "buy")).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while refused_commits(&app).await < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never tried to commit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The job ran (its paper order was the commit) but its commit failed twice: the entry is
    // still pending, for this worker, and nothing is recorded (not even its start, which a first
    // paper delivery writes with its commit).
    assert_eq!(app.store.get_job(id).await.unwrap(), None);
    assert!(app.trades(user).await.is_empty());
    let p = app.queue.partition_of(&user);
    let pending = app.pending_entries(p).await;
    assert_eq!(
        pending.iter().map(|(_, c)| c).collect::<Vec<_>>(),
        vec![&consumer],
        "the entry was acked before its job's outcome was committed"
    );

    // Postgres takes commits again: the same delivery commits, then acks.
    sqlx::raw_sql("DROP TRIGGER refuse_commit ON jobs")
        .execute(&app.store.pool)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !app.pending_entries(p).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the entry was never acked after the commit went through"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let job = app.job(id).await;
    assert_eq!(
        (job.status.as_str(), job.attempts, &job.entry_id),
        ("succeeded", 1, &pending[0].0),
        "{job:?}"
    );
    assert_eq!(app.trades(user).await.len(), 1);
    shutdown.cancel();
    run.await.unwrap().unwrap();
    app.cleanup().await;
}

/// A full outcome of a buy: its open fill, a stop-loss left resting, an earlier order cancelled,
/// the new position.
fn full_outcome(job: &sparky::domain::Job, cancelled: &str) -> sparky::executor::Outcome {
    use sparky::exchanges::{Leg, RestingOrder};
    use sparky::executor::{Fill, Outcome, PositionChange};
    let id = job.job_id.simple().to_string();
    Outcome {
        fills: vec![Fill {
            leg: Leg::Open,
            side: sparky::domain::OrderSide::Buy,
            quantity: dec!(0.5),
            price: Some(dec!(3000)),
            client_order_id: format!("{id}o"),
            exchange_order_id: Some("x1".into()),
            status: sparky::job::FillState::Filled,
            pnl: None,
            exit_reason: None,
            fee: Some(dec!(0.25)),
            of_job: None,
        }],
        resting: vec![RestingOrder {
            leg: Leg::StopLoss,
            client_order_id: format!("{id}s"),
            exchange_order_id: Some("x2".into()),
            side: sparky::domain::OrderSide::Sell,
            quantity: dec!(0.5),
            price: Some(dec!(2900)),
        }],
        cancelled: vec![cancelled.to_string()],
        position: PositionChange::Open {
            side: Side::Long,
            quantity: dec!(0.5),
            entry_price: dec!(3000),
            stop_loss_price: Some(dec!(2900)),
            take_profit_price: None,
        },
        environment: sparky::domain::CredentialEnv::Sandbox,
        ..sparky::executor::Outcome::new(sparky::executor::JobStatus::Succeeded, "")
    }
}

/// (client order id, state, quantity) of the `broker_orders` rows of a user, by id.
async fn broker_orders(
    app: &TestApp,
    user: uuid::Uuid,
) -> Vec<(String, String, rust_decimal::Decimal)> {
    sqlx::query_as(
        "SELECT client_order_id, state, quantity FROM broker_orders WHERE user_id = $1 ORDER BY client_order_id",
    )
    .bind(user)
    .fetch_all(&app.store.pool)
    .await
    .unwrap()
}

/// (events, deliveries) in the notification outbox for a job.
async fn outbox_of(app: &TestApp, job: uuid::Uuid) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM notification_outbox WHERE job_id = $1),
                (SELECT count(*) FROM notification_deliveries d JOIN notification_outbox o USING (event_id) WHERE o.job_id = $1)",
    )
    .bind(job)
    .fetch_one(&app.store.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_superseded_commit_writes_no_part_of_its_outcome_and_the_latest_writes_all_of_it() {
    // (Superseded: a fenced commit of an earlier attempt, and a commit without a recorded start.)
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    crate::notify::add_webhook(
        &app,
        user,
        "http://127.0.0.1:9/hook".into(),
        vec![sparky::notify::EventKind::Filled],
    )
    .await;
    // An order an earlier job left resting, which this job cancels.
    app.enqueue(&alert(user, &secret, "buy")).await;
    app.enqueue(&alert(user, &secret, "buy")).await;
    let mut entries = read_as(&app, "w").await;
    let (e1, e2) = (entries.remove(0), entries.remove(0));
    let (earlier, job) = (e1.job.clone().unwrap(), e2.job.clone().unwrap());
    app.store
        .begin_job(&earlier, e1.partition, &e1.id)
        .await
        .unwrap();
    let mut first = full_outcome(&earlier, "none");
    first.fills.clear();
    first.position = sparky::executor::PositionChange::Unchanged;
    app.store.finish_job(&earlier, &first, 1).await.unwrap();
    let earlier_stop = format!("{}s", earlier.job_id.simple());

    app.store
        .begin_job(&job, e2.partition, &e2.id)
        .await
        .unwrap();
    app.store
        .begin_job(&job, e2.partition, &e2.id)
        .await
        .unwrap();
    let outcome = full_outcome(&job, &earlier_stop);
    let late = app.store.finish_job(&job, &outcome, 1).await;
    assert!(
        matches!(late, Err(sparky::store::StoreError::Superseded(_))),
        "{late:?}"
    );
    // Nor does a commit without a recorded start (a paper job's first delivery's) that finds the
    // job's row: its insert matches nothing, and every part depends on it.
    let first = sparky::store::FirstStart {
        partition: e2.partition,
        entry_id: &e2.id,
        running_for: std::time::Duration::from_millis(1),
    };
    let unexpected = app.store.finish_first(&job, &outcome, &first).await;
    assert!(
        matches!(unexpected, Err(sparky::store::StoreError::Superseded(_))),
        "{unexpected:?}"
    );
    assert_eq!(
        app.job(job.job_id).await.status,
        sparky::job::JobStatus::Executing
    );
    assert!(app.trades(user).await.is_empty());
    assert_eq!(app.position(user, "ETHUSDT").await, None);
    assert_eq!(
        broker_orders(&app, user).await,
        vec![(earlier_stop.clone(), "open".into(), dec!(0.5))],
        "neither the cancel nor the new stop was written"
    );
    assert_eq!(outbox_of(&app, job.job_id).await, (0, 0));

    app.store.finish_job(&job, &outcome, 2).await.unwrap();
    assert_eq!(
        app.job(job.job_id).await.status,
        sparky::job::JobStatus::Succeeded
    );
    let trades = app.trades(user).await;
    assert_eq!(trades.len(), 1, "{trades:?}");
    assert_eq!(
        (trades[0].job_id, trades[0].quantity),
        (job.job_id, dec!(0.5))
    );
    let p = app.position(user, "ETHUSDT").await.expect("the position");
    assert_eq!(
        (p.side, p.quantity, p.environment, p.stop_loss_price),
        (
            Side::Long,
            dec!(0.5),
            sparky::domain::CredentialEnv::Sandbox,
            Some(dec!(2900))
        )
    );
    let mut expected = vec![
        (earlier_stop, "cancelled".to_string(), dec!(0.5)),
        (
            format!("{}s", job.job_id.simple()),
            "open".into(),
            dec!(0.5),
        ),
    ];
    expected.sort();
    assert_eq!(broker_orders(&app, user).await, expected);
    assert_eq!(
        outbox_of(&app, job.job_id).await,
        (1, 1),
        "one event, one delivery"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_commit_writes_each_row_once_as_statements_in_sequence_did() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let (e, job) = enqueue_and_read_a_buy(&app, user, &secret).await;
    app.store.begin_job(&job, e.partition, &e.id).await.unwrap();
    let stop = format!("{}s", job.job_id.simple());
    let mut outcome = full_outcome(&job, &stop); // cancelled and left resting: it ends resting
    let mut second_fill = outcome.fills[0].clone();
    second_fill.quantity = dec!(9); // the same leg again: the first one is the trade
    outcome.fills.push(second_fill);
    let mut restated = outcome.resting[0].clone();
    restated.quantity = dec!(0.4); // the same order left twice: its last state is kept
    outcome.resting.push(restated);
    app.store.finish_job(&job, &outcome, 1).await.unwrap();
    let trades = app.trades(user).await;
    assert_eq!(trades.len(), 1, "{trades:?}");
    assert_eq!(trades[0].quantity, dec!(0.5));
    assert_eq!(
        broker_orders(&app, user).await,
        vec![(stop, "open".into(), dec!(0.4))]
    );
    app.cleanup().await;
}

/// The commit of a job that succeeds updates its row in place (a HOT update: no index gets a new
/// entry): no index on `jobs` may cover a column that commit changes, in its key or its predicate
/// (issue 17). The columns are those `store::commit::finish` sets.
#[tokio::test]
async fn no_index_on_jobs_covers_a_column_a_successful_commit_changes() {
    let app = TestApp::spawn().await;
    let changed = [
        "status",
        "error_class",
        "error",
        "history",
        "finished_at",
        "updated_at",
    ];
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.indexrelid::regclass::text, a.attname::text
           FROM pg_index i
           JOIN pg_attribute a ON a.attrelid = i.indrelid
          WHERE i.indrelid = 'jobs'::regclass AND a.attnum > 0
            AND (a.attnum = ANY(i.indkey)
                 OR pg_get_expr(i.indpred, i.indrelid) ~ ('\\m' || a.attname || '\\M'))",
    )
    .fetch_all(&app.store.pool)
    .await
    .unwrap();
    assert!(
        columns
            .iter()
            .any(|(i, c)| i == "jobs_failed" && c == "failed"),
        "{columns:?}"
    );
    let blocking: Vec<_> = columns
        .iter()
        .filter(|(_, c)| changed.contains(&c.as_str()))
        .collect();
    assert!(
        blocking.is_empty(),
        "indexes that make the commit's update non-HOT: {blocking:?}"
    );
    app.cleanup().await;
}

/// Inside a hold (`Holds::run`, a paper job's scope) every statement runs on one
/// connection; a statement that fails gives it back, and the next one runs (on a connection that
/// is not in a failed state); outside the scope statements take connections from the pool.
#[tokio::test]
async fn a_held_connection_serves_every_statement_of_its_scope_and_is_given_back_on_an_error() {
    let app = TestApp::spawn().await;
    let store = &app.store;
    sparky::store::Holds::new(1)
        .run(async {
            let first = store.backend_pid().await.unwrap();
            let other = store.clone();
            // Another task's statements meanwhile do not take it.
            let elsewhere = tokio::spawn(async move { other.backend_pid().await.unwrap() });
            assert_ne!(
                elsewhere.await.unwrap(),
                first,
                "the held connection is this task's"
            );
            let (user, _) = app.paper_user().await;
            let job = uuid::Uuid::now_v7();
            assert!(store.get_job(job).await.unwrap().is_none());
            assert_eq!(store.backend_pid().await.unwrap(), first);
            // An error: a store error comes back and the next statement runs.
            let bad = sparky::domain::Account {
                user_id: user,
                exchange: sparky::domain::ExchangeKind::Paper,
                environment: sparky::domain::CredentialEnv::Production,
            };
            sqlx::query("ALTER TABLE positions RENAME TO positions_gone")
                .execute(&app.store.pool)
                .await
                .unwrap();
            assert!(store.position(&bad, "ETHUSDT").await.is_err());
            sqlx::query("ALTER TABLE positions_gone RENAME TO positions")
                .execute(&app.store.pool)
                .await
                .unwrap();
            assert!(store.position(&bad, "ETHUSDT").await.unwrap().is_none());
            let again = store.backend_pid().await.unwrap();
            assert_eq!(store.backend_pid().await.unwrap(), again);
        })
        .await;
    app.cleanup().await;
}

/// A worker's holds keep a connection from one job to the next (no release ping between paper
/// jobs) and only between statements that ended well: a failed or cancelled statement drops it,
/// and the next job of that hold takes a fresh one. Beyond the holds, a job runs unheld.
#[tokio::test]
async fn a_hold_keeps_its_connection_between_jobs_until_a_statement_fails_or_is_cancelled() {
    let app = TestApp::spawn().await;
    let store = &app.store;
    let long = std::time::Duration::from_secs(60);
    let holds = std::sync::Arc::new(sparky::store::Holds::with_limits(1, long, long));
    assert_eq!(holds.kept(), 0, "a hold starts without a connection");
    let first = holds.run(store.backend_pid()).await.unwrap();
    assert_eq!(
        holds.kept(),
        1,
        "the connection stays in the hold after its job"
    );
    let second = holds.run(store.backend_pid()).await.unwrap();
    assert_eq!(second, first, "the next job runs on the kept connection");

    // While the only hold is taken, another lane's job runs unheld (on the pool's connections).
    let (inside, outside) = holds
        .run(async {
            let inside = store.backend_pid().await.unwrap();
            let (other, s) = (holds.clone(), store.clone());
            let outside = tokio::spawn(async move { other.run(s.backend_pid()).await.unwrap() });
            (inside, outside.await.unwrap())
        })
        .await;
    assert_eq!(inside, first);
    assert_ne!(outside, first, "a job beyond the holds does not share one");

    // A failed statement gives the connection back to the pool: the hold is empty.
    let (user, _) = app.paper_user().await;
    let account = sparky::domain::Account {
        user_id: user,
        exchange: sparky::domain::ExchangeKind::Paper,
        environment: sparky::domain::CredentialEnv::Production,
    };
    sqlx::query("ALTER TABLE positions RENAME TO positions_gone")
        .execute(&store.pool)
        .await
        .unwrap();
    let failed = holds.run(store.position(&account, "ETHUSDT")).await;
    sqlx::query("ALTER TABLE positions_gone RENAME TO positions")
        .execute(&store.pool)
        .await
        .unwrap();
    assert!(failed.is_err());
    assert_eq!(
        holds.kept(),
        0,
        "a failed statement's connection is not kept"
    );
    assert!(holds
        .run(store.position(&account, "ETHUSDT"))
        .await
        .unwrap()
        .is_none());
    assert_eq!(holds.kept(), 1);

    // A statement cancelled mid-way (its job dropped while it waits on a lock) is not kept
    // either, and the next job runs.
    let mut locker = store.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE positions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let waiting = holds.run(store.position(&account, "ETHUSDT"));
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), waiting)
            .await
            .is_err(),
        "the read waits on the lock until it is cancelled"
    );
    locker.rollback().await.unwrap();
    assert_eq!(
        holds.kept(),
        0,
        "a cancelled statement's connection is not kept"
    );
    holds.run(store.backend_pid()).await.unwrap();
    assert_eq!(holds.kept(), 1);
    drop(holds);
    app.cleanup().await;
}

/// A kept connection goes back to the pool once idle for the holds' idle limit (the sweep, with
/// no job to take the hold), or when its job ends after the held limit: a worker with nothing to
/// run keeps none, so closing the pool waits for no hold.
#[tokio::test]
async fn a_hold_gives_its_connection_back_when_idle_or_held_too_long() {
    use std::time::Duration;
    let app = TestApp::spawn().await;
    let store = &app.store;
    let idle =
        sparky::store::Holds::with_limits(2, Duration::from_millis(200), Duration::from_secs(60));
    idle.run(store.backend_pid()).await.unwrap();
    assert_eq!(idle.kept(), 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(idle.kept(), 0, "the idle connection went back to the pool");

    let held = sparky::store::Holds::with_limits(2, Duration::from_secs(60), Duration::ZERO);
    held.run(store.backend_pid()).await.unwrap();
    assert_eq!(
        held.kept(),
        0,
        "held longer than the limit: back when its job ends"
    );
    // Holds still alive here: the cleanup's pool close does not wait for them.
    app.cleanup().await;
}
