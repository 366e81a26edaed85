//! Operations: the Prometheus metrics a run leaves behind, `sparky status --json` during a run with a
//! backlog, the ingress shutting down during a burst (and its drain timeout), and the JSON log lines
//! of a job.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sparky::ingress::AppState;
use sparky::queue::RateLimit;
use sparky::worker::{RunMode, Worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::fakes::*;
use crate::helpers::*;

const ORDER: &str = "POST /fapi/v1/order";

async fn scrape(addr: SocketAddr) -> String {
    let r = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain"), "{ct}");
    r.text().await.unwrap()
}

/// Serve the worker's health/metrics router on port 0.
async fn serve_worker_health(worker: &Worker) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = worker.health_router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_webhooks_jobs_exchange_calls_retries_and_the_credential_cache() {
    let (fake, url) = AsterFake::start().await;
    let app = TestApp::spawn_with(|c| {
        c.aster_base_url = Some(url.clone());
        c.rate_limit = RateLimit::NONE;
    })
    .await;
    let ns = app.config.namespace.clone();
    let (paper, paper_secret) = app.paper_user().await;
    let (aster, aster_secret) = app.create_user().await;
    store_credentials(
        &app,
        aster,
        "aster",
        ASTER_KEY,
        ASTER_SECRET,
        None,
        json!({}),
    )
    .await;
    let (nocreds, nocreds_secret) = app.create_user().await;

    // Webhooks: 5 queued, 1 duplicate, 1 unauthorized, 1 invalid.
    let mut first = alert(paper, &paper_secret, "buy");
    first["alert_id"] = json!("tv-1");
    app.enqueue(&first).await;
    let (status, _) = app.post_webhook(&first).await;
    assert_eq!(status, 200, "duplicate");
    app.enqueue(&alert(paper, &paper_secret, "buy")).await; // skipped: already long
    app.enqueue(&alert(paper, &paper_secret, "close")).await;
    app.enqueue(&alert(nocreds, &nocreds_secret, "buy")).await; // rejected: no credentials
    fake.core.inject(
        ORDER,
        Fault::Reply(500, json!({"code": -1001, "msg": "Internal error"}), vec![]),
    );
    app.enqueue(&webhook(
        aster,
        &aster_secret,
        "aster",
        "buy",
        "ETHUSDT",
        100,
    ))
    .await; // succeeds after one retry
    let (status, _) = app
        .post_webhook(&alert(paper, "sk_wrong_secret", "buy"))
        .await;
    assert_eq!(status, 401);
    let mut invalid = alert(paper, &paper_secret, "buy");
    invalid.as_object_mut().unwrap().remove("symbol");
    let (status, _) = app.post_webhook(&invalid).await;
    assert_eq!(status, 400);

    let worker = app.worker();
    let worker_addr = serve_worker_health(&worker).await;
    tokio::time::timeout(
        Duration::from_secs(60),
        worker.run(RunMode::UntilIdle, Duration::from_secs(30)),
    )
    .await
    .expect("drained")
    .unwrap();
    worker
        .record_partition_metrics(&(0..app.config.partitions).collect::<Vec<_>>())
        .await
        .unwrap();
    worker.record_start_metrics();

    // The worker's endpoint and the ingress's render the same process-wide recorder.
    let text = scrape(worker_addr).await;
    let ingress_text = scrape(app.addr).await;
    let m = |name: &str, want: &[(&str, &str)]| metric(&text, &ns, name, want);
    assert_eq!(
        metric(
            &ingress_text,
            &ns,
            "sparky_webhooks_accepted_total",
            &[("status", "queued")]
        ),
        5.0
    );

    // Ingress.
    assert_eq!(
        m("sparky_webhooks_accepted_total", &[("status", "queued")]),
        5.0
    );
    assert_eq!(
        m("sparky_webhooks_accepted_total", &[("status", "duplicate")]),
        1.0
    );
    assert_eq!(
        m(
            "sparky_webhooks_rejected_total",
            &[("reason", "unauthorized")]
        ),
        1.0
    );
    assert_eq!(
        m("sparky_webhooks_rejected_total", &[("reason", "invalid")]),
        1.0
    );
    assert_eq!(
        m(
            "sparky_ingress_request_duration_seconds_count",
            &[("route", "/webhook")]
        ),
        8.0
    );
    assert_eq!(
        m(
            "sparky_ingress_request_duration_seconds_count",
            &[("route", "/webhook"), ("status", "202")]
        ),
        5.0
    );
    assert!(
        m(
            "sparky_ingress_request_duration_seconds_bucket",
            &[("route", "/webhook"), ("le", "+Inf")]
        ) == 8.0,
        "a histogram with buckets:\n{text}"
    );

    // Job starts: the Aster job's, recorded before it ran (its retry is inside the job: one
    // start). The four paper jobs are first deliveries: each start is written with its commit.
    assert_eq!(m("sparky_job_starts_total", &[]), 1.0);
    assert_eq!(m("sparky_job_start_statements_total", &[]), 1.0);
    assert_eq!(m("sparky_job_starts_alone_total", &[]), 0.0);

    // Where each job's time went: every phase once per job, by exchange (a paper job's start is
    // part of its commit); the Aster job's
    // execution holds its retry's back-off, so it took longer than its commit.
    let phase = |suffix: &str, exchange: &str, phase: &str| {
        m(
            &format!("sparky_job_phase_seconds_{suffix}"),
            &[("exchange", exchange), ("phase", phase)],
        )
    };
    for p in ["waiting", "start", "execute", "commit", "settle"] {
        let paper = if p == "start" { 0.0 } else { 4.0 };
        assert_eq!(phase("count", "paper", p), paper, "{p}:\n{text}");
        assert_eq!(phase("count", "aster", p), 1.0, "{p}:\n{text}");
    }
    assert!(
        phase("sum", "aster", "execute") > phase("sum", "aster", "commit"),
        "{text}"
    );

    // Jobs.
    let finished = |status: &str, exchange: &str| {
        m(
            "sparky_jobs_finished_total",
            &[("status", status), ("exchange", exchange)],
        )
    };
    assert_eq!(finished("succeeded", "paper"), 2.0);
    assert_eq!(finished("skipped", "paper"), 1.0);
    assert_eq!(finished("rejected", "paper"), 1.0);
    assert_eq!(finished("succeeded", "aster"), 1.0);
    assert_eq!(
        m(
            "sparky_job_duration_seconds_count",
            &[("exchange", "paper")]
        ),
        4.0
    );
    // Acceptance to the first acknowledged order: the paper buy and close, the aster buy.
    assert_eq!(
        m(
            "sparky_accept_to_order_seconds_count",
            &[("exchange", "paper")]
        ),
        2.0
    );
    assert_eq!(
        m(
            "sparky_accept_to_order_seconds_count",
            &[("exchange", "aster")]
        ),
        1.0
    );

    // Exchange calls, at the executor boundary.
    let calls = |exchange: &str, op: &str, outcome: &str| {
        m(
            "sparky_exchange_request_duration_seconds_count",
            &[("exchange", exchange), ("op", op), ("outcome", outcome)],
        )
    };
    assert_eq!(calls("paper", "place_order", "ok"), 1.0);
    assert_eq!(calls("paper", "close_position", "ok"), 1.0);
    assert_eq!(calls("aster", "place_order", "transient"), 1.0);
    assert_eq!(calls("aster", "place_order", "ok"), 1.0);
    assert!(calls("aster", "find_order", "ok") >= 1.0, "looked up first");
    assert_eq!(
        m("sparky_exchange_retries_total", &[("exchange", "aster")]),
        1.0
    );
    assert_eq!(
        m("sparky_exchange_retries_total", &[("exchange", "paper")]),
        0.0
    );

    // Dead letters, partitions, credential cache.
    assert_eq!(
        m(
            "sparky_dead_letters_total",
            &[("status", "rejected"), ("error_class", "credentials")]
        ),
        1.0
    );
    assert_eq!(m("sparky_dead_letter_size", &[]), 1.0);
    assert_eq!(m("sparky_partition_lag", &[]), 0.0);
    assert_eq!(m("sparky_partition_pending", &[]), 0.0);
    assert_eq!(m("sparky_partitions_owned", &[]), 0.0, "released on exit");
    // paper: miss, hit, hit; no credentials: miss; aster: miss.
    assert_eq!(m("sparky_credential_cache_hits_total", &[]), 2.0);
    assert_eq!(m("sparky_credential_cache_misses_total", &[]), 3.0);

    // Bounded labels only: no user ids, job ids or secrets.
    for u in [paper, aster, nocreds] {
        assert!(!text.contains(&u.to_string()), "a user id in /metrics");
    }
    for s in [&paper_secret, &aster_secret, &nocreds_secret] {
        assert!(!text.contains(s.as_str()), "a secret in /metrics");
    }
    assert!(!text.contains(ASTER_KEY));
    app.cleanup().await;
}

/// `sparky status --json` (the real binary) against the test's namespace. `SPARKY_PARTITIONS` is
/// left unset on purpose: status uses the count recorded in Redis.
async fn status(app: &TestApp, json: bool) -> String {
    let dir = std::env::temp_dir();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sparky"));
    cmd.current_dir(&dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &app.config.database_url)
        .env("REDIS_URL", &app.config.redis_url)
        .env("SPARKY_NAMESPACE", &app.config.namespace)
        .arg("status");
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().await.unwrap();
    assert!(
        out.status.success(),
        "sparky status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn status_json(app: &TestApp) -> Value {
    serde_json::from_str(&status(app, true).await).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sparky_status_json_shows_the_backlog_owners_and_workers_during_a_run() {
    let app = TestApp::spawn_with(|c| c.rate_limit = RateLimit::NONE).await;
    let parts = app.config.partitions;
    let mut users = vec![];
    for _ in 0..3 {
        users.push(app.paper_user_with(json!({"latency_ms": 150})).await);
    }
    for i in 0..8 {
        for (u, s) in &users {
            let action = if i % 2 == 0 { "buy" } else { "close" };
            app.enqueue(&alert(*u, s, action)).await;
        }
    }
    let total = 24u64;

    // No worker yet: everything is lag, nobody owns anything.
    let s = status_json(&app).await;
    assert_eq!(s["partitions"].as_array().unwrap().len(), parts as usize);
    assert_eq!(s["total_lag"], total, "{s}");
    assert_eq!(s["total_pending"], 0);
    assert_eq!(s["workers"].as_array().unwrap().len(), 0);
    assert!(s["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["owner"].is_null()));
    assert_eq!(s["dead_letter_size"], 0);

    // A worker drains it, one user's jobs at a time (150 ms each): ~1.2 s.
    let shutdown = CancellationToken::new();
    let worker = Worker::new(
        app.config.clone(),
        app.store.clone(),
        app.queue.clone(),
        shutdown.clone(),
    );
    let w = worker.clone();
    let run = tokio::spawn(async move { w.run(RunMode::Forever, Duration::from_secs(30)).await });

    // During the run: the worker is alive, owns every partition, and the backlog is pending on
    // the users' partitions, with an age.
    let deadline = Instant::now() + Duration::from_secs(20);
    let during = loop {
        let s = status_json(&app).await;
        let owned_all = s["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["owner"] == worker.consumer.as_str());
        let backlog = s["total_pending"].as_u64().unwrap() + s["total_lag"].as_u64().unwrap();
        if owned_all && s["total_pending"].as_u64().unwrap() > 0 {
            assert!(backlog <= total, "{s}");
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "never saw the worker with a backlog: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let workers = during["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{during}");
    assert_eq!(workers[0]["id"], worker.consumer.as_str());
    assert_eq!(
        workers[0]["partitions"],
        json!((0..parts).collect::<Vec<_>>())
    );
    assert!(workers[0]["heartbeat_expires_in_ms"].as_u64().unwrap() > 0);
    for p in during["partitions"].as_array().unwrap() {
        if p["pending"].as_u64().unwrap() > 0 {
            assert!(p["oldest_pending_age_secs"].as_f64().unwrap() > 0.0, "{p}");
        } else {
            assert!(p["oldest_pending_age_secs"].is_null(), "{p}");
        }
    }
    // The worker's gauges agree that there is a backlog.
    worker
        .record_partition_metrics(&(0..parts).collect::<Vec<_>>())
        .await
        .unwrap();
    let addr = serve_worker_health(&worker).await;
    let text = scrape(addr).await;
    let ns = &app.config.namespace;
    assert!(metric(&text, ns, "sparky_partition_pending", &[]) > 0.0);
    assert_eq!(
        metric(&text, ns, "sparky_partitions_owned", &[]),
        parts as f64
    );
    assert_eq!(
        metric(&text, ns, "sparky_partitions_assigned", &[]),
        parts as f64
    );
    // The human table says the same.
    let table = status(&app, false).await;
    assert!(table.contains("1 workers alive"), "{table}");
    assert!(table.contains(&worker.consumer), "{table}");
    assert!(table.contains("oldest pending"), "{table}");

    // Drained: nothing pending or unread, every entry still in the streams.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status_json(&app).await;
        if s["total_pending"] == 0 && s["total_lag"] == 0 {
            let len: u64 = s["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["length"].as_u64().unwrap())
                .sum();
            assert_eq!(len, total);
            break;
        }
        assert!(Instant::now() < deadline, "not drained: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    run.await.unwrap().unwrap();
    // Stopped: it left the member set and released its leases.
    let s = status_json(&app).await;
    assert_eq!(s["workers"].as_array().unwrap().len(), 0, "{s}");
    assert!(s["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["owner"].is_null()));
    app.cleanup().await;
}

/// Every stream entry of the test as (alert_id, job_id).
async fn stream_jobs(app: &TestApp) -> HashMap<String, Uuid> {
    let mut out = HashMap::new();
    for p in 0..app.config.partitions {
        for e in app.queue.range(p, 0, i64::MAX).await.unwrap() {
            let job = e.job.unwrap();
            out.insert(job.alert.alert_id.clone().unwrap(), job.job_id);
        }
    }
    out
}

async fn spawn_own_ingress(
    app: &TestApp,
    drain: Duration,
) -> (
    SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let mut state = AppState::new(&app.config, app.store.clone(), app.queue.clone());
    state.drain_timeout = drain;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(sparky::ingress::serve(state, listener, shutdown.clone()));
    (addr, shutdown, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingress_shutdown_during_a_burst_answers_or_refuses_every_request_and_202s_only_what_is_in_redis(
) {
    let app = TestApp::spawn_with(|c| c.rate_limit = RateLimit::NONE).await;
    let (user, secret) = app.paper_user().await;
    let (addr, shutdown, server) = spawn_own_ingress(&app, Duration::from_secs(10)).await;

    // 16 senders; half reuse keep-alive connections, half open a new connection per request.
    type Outcome = (String, Result<(u16, Value), String>);
    let results: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = vec![];
    for t in 0..16 {
        let (results, stop, secret) = (results.clone(), stop.clone(), secret.clone());
        tasks.push(tokio::spawn(async move {
            let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(20));
            if t % 2 == 1 {
                builder = builder.pool_max_idle_per_host(0);
            }
            let client = builder.build().unwrap();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let alert_id = format!("burst-{t}-{n}");
                let mut body = alert(user, &secret, if n % 2 == 0 { "close" } else { "buy" });
                body["alert_id"] = json!(alert_id);
                let r = client
                    .post(format!("http://{addr}/webhook"))
                    .json(&body)
                    .send()
                    .await;
                let outcome = match r {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        match r.json::<Value>().await {
                            Ok(v) => Ok((status, v)),
                            Err(e) => Err(format!("answer cut off: {e}")),
                        }
                    }
                    Err(e) => Err(format!("{e:?}")),
                };
                let refused = outcome.is_err();
                results.lock().unwrap().push((alert_id, outcome));
                if refused {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    // Let the burst run, then shut down in the middle of it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while results.lock().unwrap().len() < 200 {
        assert!(Instant::now() < deadline, "the burst did not get going");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    let t0 = Instant::now();
    server.await.unwrap().unwrap();
    let stopped_in = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        stopped_in < Duration::from_secs(10),
        "drained in {stopped_in:?}"
    );

    let results = results.lock().unwrap().clone();
    let in_redis = stream_jobs(&app).await;
    let mut accepted = 0;
    let mut refused = 0;
    for (alert_id, outcome) in &results {
        match outcome {
            Ok((202, v)) => {
                accepted += 1;
                let job_id: Uuid = v["job_id"].as_str().unwrap().parse().unwrap();
                assert_eq!(
                    in_redis.get(alert_id),
                    Some(&job_id),
                    "202 for {alert_id} but its job is not in Redis"
                );
            }
            Ok((status, v)) => panic!("{alert_id}: unexpected answer {status} {v}"),
            Err(e) => {
                refused += 1;
                assert!(
                    !in_redis.contains_key(alert_id),
                    "{alert_id} was enqueued but its sender got no answer: {e}"
                );
            }
        }
    }
    assert_eq!(
        in_redis.len(),
        accepted,
        "every job in Redis was answered 202"
    );
    assert!(
        accepted >= 200 && refused > 0,
        "{accepted} accepted, {refused} refused"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
    app.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_shutdown_finishes_a_request_in_flight_and_gives_up_on_a_stuck_one_after_the_drain_timeout(
) {
    let app = TestApp::spawn_with(|c| c.rate_limit = RateLimit::NONE).await;
    let (user, secret) = app.paper_user().await;
    let drain = Duration::from_millis(1500);
    let (addr, shutdown, server) = spawn_own_ingress(&app, drain).await;

    // `Expect: 100-continue`: the server answers `100 Continue` once the handler starts reading
    // the body, so the test knows each request is in flight (no sleep standing for it).
    let head = |len: usize| {
        format!(
            "POST /webhook HTTP/1.1\r\nHost: sparky\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    let mut body = alert(user, &secret, "buy");
    body["alert_id"] = json!("slow");
    let body = serde_json::to_vec(&body).unwrap();
    // A: its body is still arriving when the shutdown starts.
    let mut a = tokio::net::TcpStream::connect(addr).await.unwrap();
    a.write_all(head(body.len()).as_bytes()).await.unwrap();
    read_continue(&mut a).await;
    a.write_all(&body[..10]).await.unwrap();
    // B: stuck for good half-way through its body.
    let mut b = tokio::net::TcpStream::connect(addr).await.unwrap();
    b.write_all(head(body.len()).as_bytes()).await.unwrap();
    read_continue(&mut b).await;
    b.write_all(&body[..10]).await.unwrap();

    let t0 = Instant::now(); // before the shutdown: the drain cannot have started earlier
    shutdown.cancel();
    // The shutdown has begun once the listener is closed: only then does A's body arrive.
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(probe) = tokio::net::TcpStream::connect(addr).await {
        drop(probe);
        assert!(Instant::now() < deadline, "the listener was never closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.write_all(&body[10..]).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), a.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");

    // B never completes, yet serve returns: it gave up on B after the drain timeout (and not
    // before it: t0 was taken before the shutdown began, so this bound cannot flake).
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("serve never returned while a request was stuck")
        .unwrap()
        .unwrap();
    let took = t0.elapsed();
    assert!(
        took >= drain,
        "serve returned {took:?} after the shutdown began, before the drain timeout {drain:?}"
    );
    let jobs = stream_jobs(&app).await;
    assert_eq!(jobs.len(), 1);
    assert!(jobs.contains_key("slow"));
    drop(b);
    app.cleanup().await;
}

/// Read the interim `100 Continue` answer to a request sent with `Expect: 100-continue`.
async fn read_continue(c: &mut tokio::net::TcpStream) {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), c.read(&mut byte))
            .await
            .expect("no 100 Continue")
            .unwrap();
        assert!(
            n == 1,
            "connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 100"), "{text}");
}

#[derive(Clone)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Current-thread runtime: the thread-local JSON subscriber sees every task of the run.
#[tokio::test]
async fn json_log_lines_of_a_job_carry_job_user_exchange_and_partition() {
    let (fake, _, app, user, secret) = aster_app().await;
    // A retry makes the executor log inside the job too.
    fake.core.inject(
        ORDER,
        Fault::Reply(500, json!({"code": -1001, "msg": "Internal error"}), vec![]),
    );
    let id = app
        .enqueue(&webhook(user, &secret, "aster", "buy", "ETHUSDT", 100))
        .await;

    let buf = Arc::new(Mutex::new(Vec::new()));
    let w = Buf(buf.clone());
    let subscriber = sparky::telemetry::json_subscriber("info,sqlx=warn", move || w.clone());
    let guard = tracing::subscriber::set_default(subscriber);
    app.run_worker_until_idle().await;
    drop(guard);
    assert_eq!(app.job(id).await.status, sparky::job::JobStatus::Succeeded);

    let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| {
            // One `message` key per object: an event field of that name would shadow the text.
            assert_eq!(l.matches("\"message\":").count(), 1, "{l}");
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
        })
        .collect();
    let job_code = [
        "sparky::executor",
        "sparky::exchanges",
        "sparky::credentials",
    ];
    let job_messages = [
        "Loading aster credentials",
        "Loaded aster credentials",
        "Created aster executor",
        "exchange call failed; retrying",
        "job finished",
    ];
    let of_the_job: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            let target = l["target"].as_str().unwrap_or("");
            let message = l["message"].as_str().unwrap_or("");
            job_code.iter().any(|t| target.starts_with(t))
                || job_messages.iter().any(|m| message.contains(m))
        })
        .collect();
    for m in job_messages {
        assert!(
            of_the_job
                .iter()
                .any(|l| l["message"].as_str().unwrap().contains(m)),
            "no `{m}` line in:\n{text}"
        );
    }
    let partition = sparky::queue::partition_of(&user, app.config.partitions);
    for l in &of_the_job {
        let span = &l["span"];
        assert_eq!(span["job_id"], id.to_string(), "{l}");
        assert_eq!(span["user_id"], user.to_string(), "{l}");
        assert_eq!(span["exchange"], "aster", "{l}");
        assert_eq!(span["partition"], partition, "{l}");
        assert!(l["level"].is_string() && l["timestamp"].is_string(), "{l}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn start_up_warns_about_a_redis_that_can_lose_jobs() {
    // A private Redis without persistence (helpers start it with no AOF and no RDB).
    let redis = PrivateRedis::start().await;
    let queue = sparky::queue::Queue::connect(&redis.url(), "warn", 1, Duration::from_secs(1))
        .await
        .unwrap();
    let w = queue.durability_warnings().await;
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("no persistence"), "{w:?}");

    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("allkeys-lru")
        .query_async(&mut queue.conn())
        .await
        .unwrap();
    // RDB snapshots only (none falls due within the test, so nothing is written to disk).
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("save")
        .arg("3600 1")
        .query_async(&mut queue.conn())
        .await
        .unwrap();
    let w = queue.durability_warnings().await;
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].contains("allkeys-lru") && w[0].contains("noeviction"),
        "{w:?}"
    );
    assert!(w[1].contains("no AOF"), "{w:?}");
}

#[tokio::test]
async fn a_worker_refuses_a_lease_whose_window_is_shorter_than_one_request() {
    let app = TestApp::spawn().await;
    let timing = |lease_ms: u64, timeout_ms: u64| sparky::config::Config {
        lease_ttl: Duration::from_millis(lease_ms),
        exchange_timeout: Duration::from_millis(timeout_ms),
        ..app.config.clone()
    };
    // 0.8 x 2000 - 2000 / 3 = 933 ms of room for one request after the last renewal.
    assert!(timing(2000, 933).check_worker_timing().is_ok());
    let refused = timing(2000, 934)
        .check_worker_timing()
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("is 933 ms, less than SPARKY_EXCHANGE_TIMEOUT_MS=934 ms"),
        "{refused}"
    );
    assert!(
        app.config.check_worker_timing().is_ok()
            && sparky::config::Config::default()
                .check_worker_timing()
                .is_ok(),
        "the defaults satisfy the rule"
    );
    let config = timing(2000, 10_000);
    let err = Worker::connect(config, CancellationToken::new())
        .await
        .err()
        .expect("refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("SPARKY_LEASE_TTL_MS") && msg.contains("SPARKY_EXCHANGE_TIMEOUT_MS"),
        "{msg}"
    );
    app.cleanup().await;
}
