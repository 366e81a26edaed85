//! Hostile-but-authenticated alerts (issue 11): none stops its user, its partition or the worker.
//! Refused at the ingress with the field named, or (when one reaches a worker anyway: a replay, an
//! entry written before a bound existed) final within one run, and the user's next alert runs.

use std::sync::Arc;

use chrono::Utc;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sparky::domain::{parse_alert, Alert, Job};
use sparky::job::{FailureClass, JobStatus};
use sparky::worker::Worker;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::*;
use crate::scripted::Scripted;

async fn all_acked(app: &TestApp) {
    for p in 0..app.config.partitions {
        assert_eq!(
            app.queue.pending_count(p).await.unwrap(),
            0,
            "partition {p}"
        );
    }
}

#[tokio::test]
async fn every_hostile_alert_is_refused_at_the_ingress_naming_the_field() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let now_ms = Utc::now().timestamp_millis();
    let nul = "a\u{0}b";
    let cases: Vec<(&str, Value, Value)> = vec![
        ("strategy", json!(nul), json!({})),
        ("strategy_id", json!(nul), json!({})),
        ("alert_id", json!(nul), json!({})),
        ("symbol", json!("ETH\u{0}USDT"), json!({})),
        ("strategy", json!("x".repeat(257)), json!({})),
        ("position_size_usd", json!("1e28"), json!({})),
        ("position_size_usd", json!("1000000001"), json!({})),
        ("price", json!("1e28"), json!({"order_type": "limit"})),
        ("price", json!("1e-20"), json!({"order_type": "limit"})),
        ("stop_loss_percent", json!("1e28"), json!({})),
        (
            "max_lag_secs",
            json!(100_000_000_000_000_000u64),
            json!({"timestamp": now_ms}),
        ),
        (
            "timestamp",
            json!(100_000_000_000_000_000i64),
            json!({"max_lag_secs": 5}),
        ),
        ("timestamp", json!("+200000-01-01T00:00:00Z"), json!({})),
    ];
    for (field, value, extra) in &cases {
        let mut body = alert(user, &secret, "buy");
        body[*field] = value.clone();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, v) = app.post_webhook(&body).await;
        assert_eq!(status.as_u16(), 400, "{field} = {value}: {v}");
        let named: Vec<&str> = v["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(named, [*field], "{field} = {value}: {v}");
    }
    // An unpaired surrogate cannot be text at all: the body is refused as JSON, with the column.
    let raw = format!(
        r#"{{"secret":"{secret}","user_id":"{user}","exchange":"paper","action":"buy","symbol":"ETHUSDT","position_size_usd":100,"strategy":"a\ud800b"}}"#
    );
    let (status, v) = app.post_raw(raw, &[]).await;
    assert_eq!(status.as_u16(), 400);
    assert_eq!(v["field"], "body", "{v}");
    assert!(v["error"].as_str().unwrap().contains("escape"), "{v}");
    // An Idempotency-Key that is not text is refused, not ignored (its retries would run twice).
    let key = reqwest::header::HeaderValue::from_bytes(b"k\xffey").unwrap();
    let body = alert(user, &secret, "buy").to_string();
    let (status, v) = app.post_raw(body, &[("idempotency-key", key)]).await;
    assert_eq!(status.as_u16(), 400);
    assert_eq!(v["field"], "Idempotency-Key", "{v}");
    assert_eq!(app.queued_entries().await, 0, "nothing was enqueued");

    let next = app.enqueue(&alert(user, &secret, "buy")).await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(next).await.status, JobStatus::Succeeded);
    app.cleanup().await;
}

/// A job as the ingress would have enqueued it, with `tweak` applied afterwards (as an entry
/// written before a bound existed, or edited in Redis).
fn job_with(user: Uuid, secret: &str, tweak: impl FnOnce(&mut Alert)) -> Job {
    let body = alert(user, secret, "buy");
    let mut a = parse_alert(body.as_object().unwrap(), None).unwrap();
    tweak(&mut a);
    Job {
        job_id: Uuid::now_v7(),
        accepted_at: Utc::now(),
        alert: a,
    }
}

#[tokio::test]
async fn hostile_entries_that_reach_a_worker_end_final_and_the_user_goes_on() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let huge = Decimal::from_scientific("1e28").unwrap();
    let hostile = vec![
        (
            "strategy",
            job_with(user, &secret, |a| a.strategy = Some("a\u{0}b".into())),
        ),
        (
            "alert_id",
            job_with(user, &secret, |a| a.alert_id = Some("\u{0}".into())),
        ),
        (
            "position_size_usd",
            job_with(user, &secret, |a| a.position_size_usd = Some(huge)),
        ),
        (
            "max_lag_secs",
            job_with(user, &secret, |a| {
                a.timestamp = Some(Utc::now());
                a.max_lag_secs = Some(100_000_000_000_000_000);
            }),
        ),
    ];
    for (_, job) in &hostile {
        app.queue.enqueue(job).await.unwrap();
    }
    // One of them was begun by an earlier delivery (its row exists): the row says how it ended.
    let (_, begun) = &hostile[2];
    app.store.begin_job(begun, 0, "0-1").await.unwrap();
    let next = job_with(user, &secret, |_| {});
    app.queue.enqueue(&next).await.unwrap();

    run_until_idle(app.worker()).await;

    assert_eq!(app.job(next.job_id).await.status, JobStatus::Succeeded);
    let dlq = app.dlq_records().await;
    for (field, job) in &hostile {
        let rec = dlq
            .iter()
            .find(|r| r["job_id"] == job.job_id.to_string())
            .unwrap_or_else(|| panic!("{field}: no dead-letter record"));
        assert_eq!(rec["status"], "dead", "{field}");
        assert_eq!(rec["error_class"], "invalid", "{field}");
        assert!(rec["error"].contains(field), "{field}: {}", rec["error"]);
    }
    let row = app.job(begun.job_id).await;
    assert_eq!(
        (row.status, row.error_class),
        (JobStatus::Dead, Some(FailureClass::Invalid)),
        "{row:?}"
    );
    all_acked(&app).await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_broker_price_whose_arithmetic_overflows_rejects_the_job_with_the_numbers() {
    let scripted = Scripted::new();
    scripted.set_price("ETHUSDT", Decimal::from_scientific("1e-20").unwrap());
    let job = job_with(Uuid::now_v7(), "s", |a| {
        a.position_size_usd = Some(Decimal::from(1_000_000_000))
    });
    let client = crate::scripted::Client(scripted.clone());
    let out = sparky::executor::execute(
        &client,
        &job,
        false,
        &sparky::executor::RetryPolicy::default(),
    )
    .await;
    assert_eq!(out.status, JobStatus::Rejected, "{out:?}");
    assert_eq!(out.error_class, Some(FailureClass::Permanent));
    let msg = out.message.unwrap();
    assert!(
        msg.contains("cannot size 1000000000 USD of ETHUSDT at 0.00000000000000000001"),
        "{msg}"
    );
    assert!(scripted.orders().is_empty());
}

#[tokio::test]
async fn a_panic_in_one_job_ends_it_dead_and_the_users_next_job_runs() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let scripted = Scripted::new();
    let mut boom = alert(user, &secret, "buy");
    boom["symbol"] = json!("PANICUSDT");
    let boom = app.enqueue(&boom).await;
    let next = app.enqueue(&alert(user, &secret, "buy")).await;

    let worker = Worker::with_exchanges(
        app.config.clone(),
        app.store.clone(),
        app.queue.clone(),
        CancellationToken::new(),
        scripted.factory(),
    );
    run_until_idle(worker).await;

    let job = app.job(boom).await;
    assert_eq!(
        (job.status, job.error_class),
        (JobStatus::Dead, Some(FailureClass::Internal)),
        "{job:?}"
    );
    assert!(
        job.error
            .unwrap()
            .contains("scripted broker reply crashed the client"),
        "the panic's message is kept"
    );
    assert_eq!(app.job(next).await.status, JobStatus::Succeeded);
    assert_eq!(scripted.orders_of("ETHUSDT").len(), 1);
    let dlq = app.dlq_records().await;
    assert!(dlq.iter().any(|r| r["job_id"] == boom.to_string()));
    all_acked(&app).await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_database_that_refuses_a_jobs_outcome_ends_it_dead_and_the_user_goes_on() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    // Postgres refuses this one job's trade with a data error (SQLSTATE class 22), every time.
    for sql in [
        "CREATE FUNCTION refuse_xrp() RETURNS trigger AS $$ BEGIN
           IF NEW.symbol = 'XRPUSDT' THEN RAISE EXCEPTION 'refused by the test' USING ERRCODE = '22023'; END IF;
           RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_xrp BEFORE INSERT ON trades FOR EACH ROW EXECUTE FUNCTION refuse_xrp()",
    ] {
        sqlx::query(sql).execute(&app.store.pool).await.unwrap();
    }
    let mut xrp = alert(user, &secret, "buy");
    xrp["symbol"] = json!("XRPUSDT");
    let refused = app.enqueue(&xrp).await;
    let next = app.enqueue(&alert(user, &secret, "buy")).await;
    let worker = Arc::new(app.worker());
    run_until_idle((*worker).clone()).await;

    let job = app.job(refused).await;
    assert_eq!(
        (job.status, job.error_class),
        (JobStatus::Dead, Some(FailureClass::Database)),
        "{job:?}"
    );
    let error = job.error.unwrap();
    assert!(
        error.contains("refused by the test") && error.contains("it was succeeded"),
        "the database's message and the outcome it refused: {error}"
    );
    assert!(app.trades(user).await.iter().all(|t| t.symbol != "XRPUSDT"));
    assert_eq!(app.job(next).await.status, JobStatus::Succeeded);
    all_acked(&app).await;
    app.cleanup().await;
}
