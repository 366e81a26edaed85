//! Failures and replay on real services: stale backlogs, idempotency, Postgres going away mid-run,
//! replay of rejected jobs.

use std::time::{Duration, Instant};

use redis::streams::{StreamInfoGroupsReply, StreamRangeReply};
use serde_json::json;
use sparky::replay::{self, Decision, Options, Selector};
use sparky::worker::RunMode;
use tokio_util::sync::CancellationToken;

use crate::faults::Proxy;
use crate::helpers::*;

fn opts(dry_run: bool, allow_stale: bool) -> Options {
    Options {
        dry_run,
        allow_stale,
        max_signal_age: Duration::from_secs(60),
    }
}

fn opts_aged(dry_run: bool, allow_stale: bool, max_age: Duration) -> Options {
    Options {
        max_signal_age: max_age,
        ..opts(dry_run, allow_stale)
    }
}

/// Enqueue `body` as the ingress would, but as a job accepted `age` ago (a backlog, without
/// waiting for it to age).
async fn enqueue_aged(app: &TestApp, body: &serde_json::Value, age: Duration) -> uuid::Uuid {
    let alert = sparky::domain::parse_alert(body.as_object().unwrap(), None).expect("valid alert");
    let job = sparky::domain::Job {
        job_id: uuid::Uuid::now_v7(),
        accepted_at: chrono::Utc::now() - chrono::Duration::from_std(age).unwrap(),
        alert,
    };
    let (_, queued) = app.queue.enqueue(&job).await.unwrap();
    assert!(
        matches!(queued, sparky::queue::Enqueued::Queued { .. }),
        "{queued:?}"
    );
    job.job_id
}

#[tokio::test]
async fn a_stale_backlog_goes_dead_and_replay_with_the_override_executes_it_once() {
    // The default limit: 60 s.
    let app = TestApp::spawn().await;
    let max_age = app.config.max_signal_age;
    let (user, secret) = app.paper_user().await;
    // Accepted twice the limit ago: the backlog a worker finds after an outage.
    let id = enqueue_aged(&app, &alert(user, &secret, "buy"), max_age * 2).await;
    // A lagging alert, accepted just now: its own timestamp + max_lag_secs is already past.
    let mut lagging = alert(user, &secret, "sell");
    lagging["timestamp"] = json!(chrono::Utc::now().timestamp_millis() - 120_000);
    lagging["max_lag_secs"] = json!(30);
    let lag_id = app.enqueue(&lagging).await;
    app.run_worker_until_idle().await;
    for j in [id, lag_id] {
        let job = app.job(j).await;
        assert_eq!(
            (job.status, job.error_class),
            (
                sparky::job::JobStatus::Dead,
                Some(sparky::job::FailureClass::Stale)
            ),
            "{job:?}"
        );
    }
    assert!(app
        .job(lag_id)
        .await
        .error
        .unwrap()
        .contains("max_lag_secs=30"));
    assert!(app.trades(user).await.is_empty());

    // The DLQ lists it; a replay without the override refuses; a dry run changes nothing.
    let failed = app
        .store
        .failed_jobs(Some(user), None, None, 10)
        .await
        .unwrap();
    assert_eq!(failed.len(), 2);
    let items = replay::replay(
        &app.store,
        &app.queue,
        &[id],
        &opts_aged(false, false, max_age),
    )
    .await
    .unwrap();
    assert_eq!(items[0].decision, Decision::WouldBeStale, "{items:?}");
    let items = replay::replay(
        &app.store,
        &app.queue,
        &[id],
        &opts_aged(true, true, max_age),
    )
    .await
    .unwrap();
    assert_eq!(items[0].decision, Decision::Replayed);
    assert_eq!(
        app.job(id).await.status,
        sparky::job::JobStatus::Dead,
        "dry run changed nothing"
    );

    // With the override it runs, once; replaying it again does nothing.
    let items = replay::replay(
        &app.store,
        &app.queue,
        &[id],
        &opts_aged(false, true, max_age),
    )
    .await
    .unwrap();
    assert_eq!(items[0].decision, Decision::Replayed, "{items:?}");
    app.run_worker_until_idle().await;
    assert_eq!(app.job(id).await.status, sparky::job::JobStatus::Succeeded);
    let trades = app.trades(user).await;
    assert_eq!(trades.len(), 1);
    assert_eq!(trades[0].job_id, id);
    let items = replay::replay(
        &app.store,
        &app.queue,
        &[id],
        &opts_aged(false, true, max_age),
    )
    .await
    .unwrap();
    assert_eq!(items[0].decision, Decision::NotFailed);
    app.run_worker_until_idle().await;
    assert_eq!(app.trades(user).await.len(), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn a_rejected_job_is_replayed_once_after_the_cause_is_fixed() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.create_user().await; // no credentials yet: the cause
    let first = app.enqueue(&alert(user, &secret, "buy")).await;
    let second = app.enqueue(&alert(user, &secret, "close")).await;
    app.run_worker_until_idle().await;
    let job = app.job(first).await;
    assert_eq!(job.status, sparky::job::JobStatus::Rejected);
    assert!(job
        .error
        .as_deref()
        .unwrap()
        .contains("no paper credentials"));
    // The dead-letter stream has it, with the attempt history and the entry id.
    let dl = app.dlq_record_of(first).await;
    assert_eq!(
        (dl["status"].as_str(), dl["error_class"].as_str()),
        ("rejected", "credentials"),
        "{dl:?}"
    );
    assert!(dl["error"].contains("no paper credentials"), "{dl:?}");
    assert_eq!(dl["entry_id"], job.entry_id, "{dl:?}");
    assert_eq!(dl["partition"], job.partition.to_string(), "{dl:?}");
    let history: Vec<serde_json::Value> =
        serde_json::from_str(&dl["history"]).expect("the history is a JSON array");
    assert_eq!(history.len(), 1, "one failed attempt: {history:?}");
    assert_eq!(history[0]["class"], "credentials", "{history:?}");
    assert!(
        history[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no paper credentials")),
        "{history:?}"
    );
    assert!(
        history[0]["at"]
            .as_str()
            .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()),
        "{history:?}"
    );

    app.set_credentials(user, "paper", "fixed").await;
    // Replay by user: the user's failed jobs, oldest first (so their order holds).
    let ids = replay::select(&app.store, &app.queue, &Selector::User(user))
        .await
        .unwrap();
    assert_eq!(ids, vec![first, second]);
    let items = replay::replay(&app.store, &app.queue, &ids, &opts(false, false))
        .await
        .unwrap();
    assert!(
        items.iter().all(|i| i.decision == Decision::Replayed),
        "{items:?}"
    );
    app.run_worker_until_idle().await;
    assert_eq!(
        app.job(first).await.status,
        sparky::job::JobStatus::Succeeded
    );
    assert_eq!(
        app.job(second).await.status,
        sparky::job::JobStatus::Succeeded
    );
    let legs: Vec<String> = app.trades(user).await.into_iter().map(|t| t.leg).collect();
    assert_eq!(legs, ["open", "close"], "buy then close, in order");

    // Replaying again, by id or by time range from the streams, does nothing.
    let since = chrono::Utc::now() - chrono::Duration::minutes(5);
    let ids = replay::select(
        &app.store,
        &app.queue,
        &Selector::Range {
            since,
            until: chrono::Utc::now(),
        },
    )
    .await
    .unwrap();
    assert!(ids.contains(&first) && ids.contains(&second));
    let items = replay::replay(&app.store, &app.queue, &ids, &opts(false, false))
        .await
        .unwrap();
    assert!(
        items.iter().all(|i| i.decision == Decision::NotFailed),
        "{items:?}"
    );
    app.run_worker_until_idle().await;
    assert_eq!(app.trades(user).await.len(), 2);
    app.cleanup().await;
}

#[tokio::test]
async fn the_same_alert_id_twice_and_ten_times_concurrently_is_one_job_and_one_order() {
    let app = TestApp::spawn().await;
    let (user, secret) = app.paper_user().await;
    let mut body = alert(user, &secret, "buy");
    body["alert_id"] = json!("tv-alert-42");
    let (s1, v1) = app.post_webhook(&body).await;
    let (s2, v2) = app.post_webhook(&body).await;
    assert_eq!((s1.as_u16(), s2.as_u16()), (202, 200));
    assert_eq!(v1["job_id"], v2["job_id"]);

    let mut other = alert(user, &secret, "close");
    other["alert_id"] = json!("tv-alert-43");
    let answers = futures_join(&app, &other, 10).await;
    let ids: std::collections::HashSet<String> = answers
        .iter()
        .map(|(_, v)| v["job_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "one job id for ten concurrent deliveries: {answers:?}"
    );
    assert_eq!(answers.iter().filter(|(s, _)| *s == 202).count(), 1);
    assert_eq!(answers.iter().filter(|(s, _)| *s == 200).count(), 9);

    assert_eq!(app.queued_entries().await, 2);
    app.run_worker_until_idle().await;
    let trades = app.trades(user).await;
    assert_eq!(trades.len(), 2, "one buy, one close: {trades:?}");
    app.cleanup().await;
}

async fn futures_join(
    app: &TestApp,
    body: &serde_json::Value,
    n: usize,
) -> Vec<(u16, serde_json::Value)> {
    let mut tasks = vec![];
    for _ in 0..n {
        let (http, url, body) = (app.http.clone(), app.url("/webhook"), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }));
    }
    let mut out = vec![];
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Entries acked in the namespace: read by the group and no longer pending.
async fn acked(app: &TestApp) -> u64 {
    let mut n = 0;
    let mut c = app.queue.conn();
    for p in 0..app.config.partitions {
        let info: StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(app.queue.keys.stream(p))
            .query_async(&mut c)
            .await
            .unwrap();
        let g = info
            .groups
            .iter()
            .find(|g| g.name == sparky::queue::GROUP)
            .expect("the workers group");
        // Delivered: every entry up to the group's last delivered id (entries-read is nil until
        // a group has read something, so count them; nothing is trimmed in these tests).
        let delivered = if g.last_delivered_id == "0-0" {
            0
        } else {
            let r: StreamRangeReply = redis::cmd("XRANGE")
                .arg(app.queue.keys.stream(p))
                .arg("-")
                .arg(&g.last_delivered_id)
                .query_async(&mut c)
                .await
                .unwrap();
            r.ids.len() as u64
        };
        n += delivered - g.pending as u64;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_going_away_mid_run_loses_and_acks_nothing() {
    let url = admin_database_url();
    let port: u16 = url
        .rsplit_once(':')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let proxy = Proxy::start(("127.0.0.1".into(), port)).await;
    let app = TestApp::spawn().await;
    let mut user_ids = vec![];
    for _ in 0..5 {
        user_ids.push(app.paper_user_with(json!({"latency_ms": 30})).await);
    }
    let direct = app.store.clone();
    let per_user = 8;
    for i in 0..per_user {
        for (u, s) in &user_ids {
            app.enqueue(&alert(*u, s, if i % 2 == 0 { "buy" } else { "close" }))
                .await;
        }
    }
    let total = (user_ids.len() * per_user) as i64;
    // A worker whose Postgres goes through the proxy.
    let mut config = app.config.clone();
    config.database_url = format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        proxy.port,
        app.config.database_url.rsplit('/').next().unwrap()
    );
    let store = sparky::store::Store::connect(&config.database_url, 4)
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let worker = sparky::worker::Worker::new(config, store, app.queue.clone(), shutdown.clone());
    let run =
        tokio::spawn(async move { worker.run(RunMode::Forever, Duration::from_secs(10)).await });

    let finished = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE status = 'succeeded'")
            .fetch_one(&direct.pool)
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while finished().await < 5 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.cut();
    let at_cut = finished().await;
    // Down until the worker has been refused a few times (it keeps trying to reach Postgres).
    let refused = || proxy.refused.load(std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while refused() < 3 {
        assert!(
            Instant::now() < deadline,
            "the worker stopped trying to reach Postgres ({} refused connections)",
            refused()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Down: nothing acked beyond what was committed, nothing finished.
    let done_during = finished().await;
    assert!(done_during < total, "the outage should leave work undone");
    assert!(
        acked(&app).await <= done_during as u64,
        "an entry was acked without its commit"
    );
    println!(
        "outage: {at_cut} jobs done at the cut, {done_during} after {} refused connections",
        refused()
    );

    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(60);
    while finished().await < total {
        assert!(
            Instant::now() < deadline,
            "did not recover: {} of {total}",
            finished().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(acked(&app).await, total as u64);
    for (u, _) in &user_ids {
        let legs: Vec<String> = app.trades(*u).await.into_iter().map(|t| t.leg).collect();
        let expect: Vec<&str> = (0..per_user)
            .map(|i| if i % 2 == 0 { "open" } else { "close" })
            .collect();
        assert_eq!(legs, expect, "every job once, in order");
    }
    app.cleanup().await;
}

/// Append `job` to partition 0's stream as an entry with the id `{ms}-{seq}` (an entry accepted at
/// that time, as far as retention goes).
async fn add_entry_at(app: &TestApp, ms: i64, seq: u64, job: &serde_json::Value) {
    let _: String = redis::cmd("XADD")
        .arg(app.queue.keys.stream(0))
        .arg(format!("{ms}-{seq}"))
        .arg("job")
        .arg(job.to_string())
        .query_async(&mut app.queue.conn())
        .await
        .unwrap();
}

#[tokio::test]
async fn streams_are_trimmed_by_age_but_never_past_unacked_entries() {
    let app = TestApp::spawn_with(|c| c.partitions = 1).await;
    let (user, secret) = app.paper_user().await;
    let job = |action: &str| {
        let alert =
            sparky::domain::parse_alert(alert(user, &secret, action).as_object().unwrap(), None)
                .unwrap();
        serde_json::to_value(sparky::domain::Job {
            job_id: uuid::Uuid::now_v7(),
            accepted_at: chrono::Utc::now(),
            alert,
        })
        .unwrap()
    };
    // Three entries that reached the stream ten minutes ago (their ids say so).
    let old = chrono::Utc::now().timestamp_millis() - 600_000;
    for seq in 0..3 {
        add_entry_at(&app, old, seq, &job("buy")).await;
    }
    // Nothing read yet: nothing may be trimmed, whatever the retention.
    assert_eq!(app.queue.trim(0, Duration::ZERO).await.unwrap(), 0);
    app.run_worker_until_idle().await;
    add_entry_at(&app, old, 3, &job("close")).await; // as old, but unread
                                                     // A retention longer than their age keeps them.
    assert_eq!(
        app.queue.trim(0, Duration::from_secs(3600)).await.unwrap(),
        0
    );
    assert_eq!(
        app.queue.trim(0, Duration::from_secs(60)).await.unwrap(),
        3,
        "the three acked entries go"
    );
    assert_eq!(
        app.queue.stream_len(0).await.unwrap(),
        1,
        "the unread one stays"
    );
    // Read but not acked (a worker is on it, or died on it): it stays too.
    let mut conn = app
        .queue
        .blocking_conn(Duration::from_millis(100))
        .await
        .unwrap();
    let read = app
        .queue
        .read(
            &mut conn,
            "slow-worker",
            &[(0, ">".to_string())],
            10,
            Duration::from_millis(100),
        )
        .await
        .unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(app.queue.trim(0, Duration::ZERO).await.unwrap(), 0);
    assert_eq!(app.queue.stream_len(0).await.unwrap(), 1);
    app.cleanup().await;
}
