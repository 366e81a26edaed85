//! Notifications (issue 15): the outbox is written with the job's outcome, the dispatcher delivers
//! to a local sink with a valid Standard Webhooks signature, retries after a failure, loses nothing
//! when it is killed mid-delivery, and the chat formats and event filters hold.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::Router;
use serde_json::Value;
use sparky::notify::channel::{self, ChannelKind, NewChannel};
use sparky::notify::dispatch::{Dispatcher, DispatcherConfig};
use sparky::notify::EventKind;
use sparky::secrets::{MasterKey, SecretString};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::helpers::*;

/// What the sink does with the next request.
#[derive(Clone, Copy, Debug)]
enum Reply {
    Status(u16),
    /// Never answer (the sender is cut off mid-request).
    Hang,
}

/// One request the sink received.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Clone, Default)]
struct Sink {
    script: Arc<Mutex<VecDeque<Reply>>>,
    got: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
}

impl Sink {
    async fn start(script: &[Reply]) -> (Sink, SocketAddr) {
        let sink = Sink::default();
        sink.script.lock().unwrap().extend(script.iter().copied());
        async fn handle(
            State(s): State<Sink>,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> StatusCode {
            let reply = s
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or(Reply::Status(200));
            s.got.lock().unwrap().push(Received {
                path: uri.path().to_string(),
                headers,
                body,
            });
            s.arrived.notify_one();
            match reply {
                Reply::Status(c) => StatusCode::from_u16(c).unwrap(),
                Reply::Hang => std::future::pending().await,
            }
        }
        let app = Router::new().fallback(handle).with_state(sink.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (sink, addr)
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

fn fast(telegram: Option<String>) -> DispatcherConfig {
    DispatcherConfig {
        lease: Duration::from_secs(1),
        idle_wait: Duration::from_millis(10),
        min_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        request_timeout: Duration::from_secs(30),
        telegram_base_url: telegram.unwrap_or_else(|| "http://127.0.0.1:1".into()),
        ..DispatcherConfig::default()
    }
}

async fn app_with_key() -> TestApp {
    TestApp::spawn_with(|c| {
        c.master_key = Some(MasterKey::from_base64(&MasterKey::generate_base64()).unwrap());
        c.rate_limit = sparky::queue::RateLimit::NONE;
    })
    .await
}

fn dispatcher(app: &TestApp, config: DispatcherConfig) -> Arc<Dispatcher> {
    Arc::new(
        Dispatcher::new(
            app.store.sibling(2, Duration::from_secs(5)),
            app.config.master_key.iter().cloned().collect(),
            config,
        )
        .with_metrics(sparky::metrics::Metrics::new(&app.config.namespace)),
    )
}

/// The value of `sparky_notification_attempts_total{outcome}` in `ns`.
fn attempts_metric(ns: &str, outcome: &str) -> f64 {
    sparky::metrics::samples(&sparky::metrics::render(), ns)
        .into_iter()
        .filter(|(n, labels, _)| {
            n == "sparky_notification_attempts_total"
                && labels.iter().any(|(k, v)| k == "outcome" && v == outcome)
        })
        .map(|(_, _, v)| v)
        .sum()
}

pub(crate) async fn add_webhook(
    app: &TestApp,
    user: Uuid,
    url: String,
    events: Vec<EventKind>,
) -> (Uuid, SecretString) {
    let (info, secret) = channel::add(
        &app.store,
        app.config.master_key.as_ref(),
        user,
        NewChannel {
            kind: ChannelKind::Webhook,
            destination: SecretString::new(url),
            secret: None,
            events,
            label: Some("sink".into()),
        },
    )
    .await
    .unwrap();
    (info.channel_id, secret.expect("a generated whsec_ secret"))
}

/// (status, attempts) of every delivery, oldest first.
async fn deliveries(app: &TestApp) -> Vec<(String, i32)> {
    sqlx::query_as("SELECT status, attempts FROM notification_deliveries ORDER BY delivery_id")
        .fetch_all(&app.store.pool)
        .await
        .unwrap()
}

/// Run `d` round after round until no delivery is pending (bounded: a broken dispatcher fails the
/// test instead of hanging it).
async fn dispatch_until_settled(app: &TestApp, d: &Dispatcher) {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            d.run_once().await.unwrap();
            if deliveries(app).await.iter().all(|(s, _)| s != "pending") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every delivery settled within 60 s");
}

fn verify(secret: &SecretString, r: &Received) -> bool {
    let h = |k: &str| r.headers[k].to_str().unwrap().to_string();
    sparky::notify::format::verify(
        secret.expose(),
        &h("webhook-id"),
        h("webhook-timestamp").parse().unwrap(),
        &r.body,
        &h("webhook-signature"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_notification_reaches_the_sink_and_is_retried_after_it_failed() {
    let app = app_with_key().await;
    let (sink, addr) = Sink::start(&[Reply::Status(500)]).await;
    let (user, secret) = app.paper_user().await;
    let url = format!("http://{addr}/hooks/sparky");
    let (channel_id, whsec) = add_webhook(&app, user, url.clone(), vec![EventKind::Filled]).await;
    // The URL and the signing secret are sealed at rest.
    let (dest, sealed): (String, String) = sqlx::query_as(
        "SELECT destination, secret FROM notification_channels WHERE channel_id = $1",
    )
    .bind(channel_id)
    .fetch_one(&app.store.pool)
    .await
    .unwrap();
    assert!(dest.starts_with("enc:v1:") && sealed.starts_with("enc:v1:"));
    assert!(!dest.contains(&addr.to_string()) && !sealed.contains(whsec.expose()));

    let buy = app.enqueue(&alert(user, &secret, "buy")).await;
    let skipped = app.enqueue(&alert(user, &secret, "buy")).await; // same side: skipped, no event
    app.run_worker_until_idle().await;
    assert_eq!(app.job(buy).await.status.as_str(), "succeeded");
    assert_eq!(app.job(skipped).await.status.as_str(), "skipped");
    // The event was committed with the outcome: one, for the fill.
    let events: Vec<(String, Uuid)> =
        sqlx::query_as("SELECT kind, job_id FROM notification_outbox")
            .fetch_all(&app.store.pool)
            .await
            .unwrap();
    assert_eq!(events, [("filled".to_string(), buy)]);
    assert!(
        sink.received().is_empty(),
        "nothing is sent from the trading path"
    );

    let d = dispatcher(&app, fast(None));
    dispatch_until_settled(&app, &d).await;
    assert_eq!(deliveries(&app).await, [("delivered".to_string(), 2)]);
    let got = sink.received();
    assert_eq!(got.len(), 2, "the 500, then the retry");
    for r in &got {
        assert_eq!(r.path, "/hooks/sparky");
        assert!(verify(&whsec, r), "a valid Standard Webhooks signature");
        assert_eq!(r.headers["content-type"], "application/json");
    }
    assert_eq!(
        got[0].headers["webhook-id"], got[1].headers["webhook-id"],
        "a retry carries the same id (receivers deduplicate on it)"
    );
    let body: Value = serde_json::from_slice(&got[1].body).unwrap();
    assert_eq!(body["type"], "filled");
    assert_eq!(body["user_id"], user.to_string());
    assert_eq!(body["data"]["job_id"], buy.to_string());
    assert_eq!(body["data"]["symbol"], "ETHUSDT");
    assert_eq!(body["data"]["fills"][0]["leg"], "open");
    assert_eq!(
        body["event_id"],
        got[1].headers["webhook-id"].to_str().unwrap()
    );
    // A tampered body does not verify.
    let mut tampered = got[1].clone();
    tampered.body = Bytes::from(String::from_utf8_lossy(&got[1].body).replace("filled", "dead"));
    assert!(!verify(&whsec, &tampered));
    // The delivery log: the failure and the success.
    let log: Vec<(i32, bool, Option<i32>)> =
        sqlx::query_as("SELECT attempt, ok, http_status FROM notification_attempts ORDER BY id")
            .fetch_all(&app.store.pool)
            .await
            .unwrap();
    assert_eq!(log, [(1, false, Some(500)), (2, true, Some(200))]);
    // Retention: a settled event goes with its deliveries and log; younger ones stay.
    assert_eq!(d.purge().await.unwrap(), 0, "within the retention");
    let purger = dispatcher(
        &app,
        DispatcherConfig {
            retention: Duration::ZERO,
            ..fast(None)
        },
    );
    assert_eq!(purger.purge().await.unwrap(), 1);
    assert!(deliveries(&app).await.is_empty());
    let ns = &app.config.namespace;
    assert_eq!(
        (
            attempts_metric(ns, "retry"),
            attempts_metric(ns, "delivered")
        ),
        (1.0, 1.0)
    );
    // Neither the URL's secret parts nor the signing secret were logged.
    let logs = captured_logs();
    assert!(!logs.contains(whsec.expose()));
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_notification_is_lost_when_the_dispatcher_dies_mid_delivery() {
    let app = app_with_key().await;
    let (sink, addr) = Sink::start(&[Reply::Hang]).await;
    let (user, secret) = app.create_user().await; // no credentials: the job is rejected
    let (_, whsec) = add_webhook(
        &app,
        user,
        format!("http://{addr}/h"),
        EventKind::ALL.to_vec(),
    )
    .await;
    let (quiet, quiet_secret) = app.create_user().await; // no channels: no outbox row
    let job = app.enqueue(&alert(user, &secret, "buy")).await;
    app.enqueue(&alert(quiet, &quiet_secret, "buy")).await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(job).await.status.as_str(), "rejected");
    let kinds: Vec<String> = sqlx::query_scalar("SELECT kind FROM notification_outbox")
        .fetch_all(&app.store.pool)
        .await
        .unwrap();
    assert_eq!(kinds, ["rejected"]);

    // The first dispatcher claims the delivery and is killed while the sink holds the request.
    let first = dispatcher(&app, fast(None));
    let arrived = sink.arrived.notified();
    let task = tokio::spawn({
        let d = first.clone();
        async move { d.run_once().await }
    });
    arrived.await;
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let (status, owner): (String, Option<String>) =
        sqlx::query_as("SELECT status, lease_owner FROM notification_deliveries")
            .fetch_one(&app.store.pool)
            .await
            .unwrap();
    assert_eq!(status, "pending");
    assert!(owner.is_some(), "still leased by the dead dispatcher");

    // Retention never takes an event that is still to be delivered.
    let purger = dispatcher(
        &app,
        DispatcherConfig {
            retention: Duration::ZERO,
            ..fast(None)
        },
    );
    assert_eq!(purger.purge().await.unwrap(), 0);

    // Another dispatcher (another worker process) takes it once the lease has expired.
    let second = dispatcher(&app, fast(None));
    dispatch_until_settled(&app, &second).await;
    assert_eq!(deliveries(&app).await, [("delivered".to_string(), 2)]);
    let got = sink.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].headers["webhook-id"], got[1].headers["webhook-id"]);
    assert!(verify(&whsec, &got[1]));
    let body: Value = serde_json::from_slice(&got[1].body).unwrap();
    assert_eq!(body["type"], "rejected");
    assert_eq!(body["data"]["error_class"], "credentials");
    // Only the attempt that finished is in the log (the killed one never recorded).
    let log: Vec<(i32, bool)> =
        sqlx::query_as("SELECT attempt, ok FROM notification_attempts ORDER BY id")
            .fetch_all(&app.store.pool)
            .await
            .unwrap();
    assert_eq!(log, [(2, true)]);
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discord_slack_and_telegram_get_their_formats_and_filters_hold() {
    let app = app_with_key().await;
    let (sink, addr) = Sink::start(&[]).await;
    let (user, secret) = app.create_user().await; // no credentials: rejected
    let add = |kind, dest: String, secret: Option<&str>, events: Vec<EventKind>| {
        let store = app.store.clone();
        let key = app.config.master_key.clone();
        let secret = secret.map(SecretString::new);
        async move {
            channel::add(
                &store,
                key.as_ref(),
                user,
                NewChannel {
                    kind,
                    destination: SecretString::new(dest),
                    secret,
                    events,
                    label: None,
                },
            )
            .await
            .unwrap()
            .0
        }
    };
    add(
        ChannelKind::Discord,
        format!("http://{addr}/discord"),
        None,
        vec![EventKind::Rejected],
    )
    .await;
    add(
        ChannelKind::Slack,
        format!("http://{addr}/slack"),
        None,
        vec![EventKind::Rejected],
    )
    .await;
    add(
        ChannelKind::Telegram,
        "-100123".into(),
        Some("123:bot-token"),
        vec![EventKind::Rejected],
    )
    .await;
    // This one only wants fills: it gets nothing.
    add(
        ChannelKind::Slack,
        format!("http://{addr}/fills-only"),
        None,
        vec![EventKind::Filled],
    )
    .await;
    let listed = channel::list(&app.store, user).await.unwrap();
    assert_eq!(listed.len(), 4);
    assert!(listed
        .iter()
        .all(|c| !c.display.contains("discord/") && !c.display.contains("bot-token")));

    let job = app.enqueue(&alert(user, &secret, "buy")).await;
    app.run_worker_until_idle().await;
    let d = dispatcher(&app, fast(Some(format!("http://{addr}"))));
    dispatch_until_settled(&app, &d).await;
    let mut got: Vec<(String, Value)> = sink
        .received()
        .iter()
        .map(|r| (r.path.clone(), serde_json::from_slice(&r.body).unwrap()))
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let paths: Vec<&str> = got.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        ["/bot123:bot-token/sendMessage", "/discord", "/slack"]
    );
    let text = got[1].1["content"].as_str().unwrap();
    assert!(
        text.contains("rejected") && text.contains(&job.to_string()),
        "{text}"
    );
    assert!(got[2].1["text"].as_str().unwrap().contains("rejected"));
    assert_eq!(got[0].1["chat_id"], "-100123");
    assert!(got[0].1["text"].as_str().unwrap().contains("ETHUSDT"));
    app.cleanup().await;
}

#[tokio::test]
async fn notify_cli_adds_lists_and_removes_channels_and_names_bad_flags() {
    use clap::Parser;
    use sparky::cli::{run, Cli};
    let app = app_with_key().await;
    let (user, _) = app.create_user().await;
    let cli = |args: &[&str]| {
        let mut v = vec!["sparky"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
    };
    let u = user.to_string();
    run(
        cli(&[
            "notify",
            "add",
            "--user",
            &u,
            "--kind",
            "webhook",
            "--url",
            "http://127.0.0.1:9/x",
            "--events",
            "dead,blocked",
        ]),
        app.config.clone(),
    )
    .await
    .unwrap();
    let chans = channel::list(&app.store, user).await.unwrap();
    assert_eq!(chans.len(), 1);
    assert_eq!(chans[0].events, [EventKind::Dead, EventKind::Blocked]);
    for (args, flag) in [
        (
            vec!["--kind", "webhook", "--url", "http://example.com/x"],
            "--url",
        ),
        (
            vec!["--kind", "pager", "--url", "https://example.com/x"],
            "--kind",
        ),
        (
            vec![
                "--kind",
                "slack",
                "--url",
                "https://example.com/x",
                "--events",
                "boom",
            ],
            "--events",
        ),
        (vec!["--kind", "telegram", "--chat-id", "42"], "--bot-token"),
        (
            vec![
                "--kind",
                "webhook",
                "--url",
                "https://example.com/x",
                "--secret",
                "nope",
            ],
            "--secret",
        ),
    ] {
        let mut a = vec!["notify", "add", "--user", &u];
        a.extend(args.iter().copied());
        let e = run(cli(&a), app.config.clone()).await.unwrap_err();
        assert!(e.to_string().starts_with(flag), "{a:?}: {e}");
    }
    let c = chans[0].channel_id.to_string();
    run(
        cli(&["notify", "remove", "--user", &u, "--channel", &c]),
        app.config.clone(),
    )
    .await
    .unwrap();
    assert!(channel::list(&app.store, user).await.unwrap().is_empty());
    let e = run(
        cli(&["notify", "remove", "--user", &u, "--channel", &c]),
        app.config.clone(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().starts_with("--channel"), "{e}");

    // `notify test` sends now and says what the channel answered.
    let (sink, addr) = Sink::start(&[Reply::Status(200), Reply::Status(503)]).await;
    let (c, whsec) = add_webhook(
        &app,
        user,
        format!("http://{addr}/t"),
        vec![EventKind::Dead],
    )
    .await;
    let c = c.to_string();
    run(
        cli(&["notify", "test", "--user", &u, "--channel", &c]),
        app.config.clone(),
    )
    .await
    .unwrap();
    let got = sink.received();
    assert_eq!(got.len(), 1);
    assert!(verify(&whsec, &got[0]));
    let e = run(
        cli(&["notify", "test", "--user", &u, "--channel", &c]),
        app.config.clone(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("503"), "{e}");

    // Tokens: created for an existing user only; revoke names what it did not find.
    let e = run(
        cli(&[
            "user",
            "token",
            "create",
            "--user",
            &Uuid::now_v7().to_string(),
        ]),
        app.config.clone(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().starts_with("--user"), "{e}");
    run(
        cli(&["user", "token", "create", "--user", &u, "--json"]),
        app.config.clone(),
    )
    .await
    .unwrap();
    run(
        cli(&["user", "token", "revoke", "--user", &u, "--all"]),
        app.config.clone(),
    )
    .await
    .unwrap();
    assert!(run(
        cli(&["user", "token", "revoke", "--user", &u, "--all"]),
        app.config.clone()
    )
    .await
    .is_err());
    app.cleanup().await;
}

#[tokio::test]
async fn a_job_ended_outside_its_commit_still_writes_its_event_in_the_same_transaction() {
    use sparky::executor::Outcome;
    use sparky::job::{FailureClass, JobStatus};
    let app = app_with_key().await;
    let (user, secret) = app.create_user().await;
    add_webhook(
        &app,
        user,
        "http://127.0.0.1:9/x".into(),
        vec![EventKind::Dead],
    )
    .await;
    let body = alert(user, &secret, "buy");
    let job = sparky::domain::Job {
        job_id: Uuid::now_v7(),
        accepted_at: chrono::Utc::now(),
        alert: sparky::domain::parse_alert(body.as_object().unwrap(), None).unwrap(),
    };
    app.store.begin_job(&job, 0, "0-1").await.unwrap();
    let dead = Outcome::failed(
        JobStatus::Dead,
        FailureClass::Internal,
        "a panic around the job",
    );
    assert!(app.store.mark_failed(job.job_id, &dead).await.unwrap());
    // Again: the row is final, nothing is written twice.
    assert!(!app.store.mark_failed(job.job_id, &dead).await.unwrap());
    let events: Vec<(String, Uuid, Value)> =
        sqlx::query_as("SELECT kind, job_id, payload FROM notification_outbox")
            .fetch_all(&app.store.pool)
            .await
            .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].0.as_str(), events[0].1), ("dead", job.job_id));
    assert_eq!(events[0].2["data"]["error_class"], "internal");
    assert_eq!(deliveries(&app).await, [("pending".to_string(), 0)]);
    app.cleanup().await;
}
