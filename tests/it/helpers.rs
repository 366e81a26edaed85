//! Test harness: every test gets its own Postgres database (created and migrated here) and its own
//! Redis key namespace, a real ingress on port 0, and a real worker it can run until the queue is
//! empty. `REDIS_URL` / `DATABASE_URL` point at the servers (defaults: the local ones).

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::streams::{StreamPendingCountReply, StreamRangeReply};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sparky::config::Config;
use sparky::ingress::AppState;
use sparky::queue::Queue;
use sparky::secrets::{generate_webhook_secret, hash_webhook_secret};
use sparky::store::{CredentialRow, JobRow, PositionRow, Store, TradeRow};
use sparky::worker::{RunMode, Worker};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `SPARKY_TEST_REDIS_CLUSTER` (comma-separated seed nodes, as `REDIS_CLUSTER_URLS`): when set,
/// every [`TestApp`] runs on that Redis Cluster instead of `REDIS_URL` (`scripts/test` runs the
/// pipeline, ordering, failures and security modules a second time this way).
pub fn test_cluster_urls() -> Vec<String> {
    std::env::var("SPARKY_TEST_REDIS_CLUSTER")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

pub fn admin_database_url() -> String {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/sparky".into());
    match url.rfind('/') {
        Some(i) => format!("{}/postgres", &url[..i]),
        None => url,
    }
}

/// Everything the tests log, for assertions about log lines (and about secrets never appearing).
pub static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = LogWriter(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info,sqlx=warn")
            .with_ansi(false)
            .compact()
            .with_writer(move || w.clone())
            .try_init();
        buf
    });
}

/// The captured log text so far.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.get().unwrap().lock().unwrap()).into_owned()
}

/// A fresh database (not migrated), dropped when the returned guard is.
/// Names carry a unix timestamp so leftovers of crashed runs (a guard never dropped: the process
/// was killed) older than an hour are dropped by the next run.
pub async fn fresh_database() -> (Cleanup, String) {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    let admin = Store::connect(&admin_database_url(), 2)
        .await
        .expect("connect to Postgres (is it running? scripts/test starts it)");
    let now = chrono::Utc::now().timestamp();
    SWEPT
        .get_or_init(|| async {
            let names: Vec<String> = sqlx::query_scalar(
                "SELECT datname FROM pg_database WHERE datname LIKE 'sparky_test_%'",
            )
            .fetch_all(&admin.pool)
            .await
            .unwrap_or_default();
            for n in names {
                let ts: i64 = n
                    .split('_')
                    .nth(2)
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                if now - ts > 3600 {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"))
                        .execute(&admin.pool)
                        .await;
                }
            }
        })
        .await;
    let name = format!(
        "sparky_test_{now}_{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin.pool)
        .await
        .expect("create test database");
    admin.pool.close().await;
    let url = format!(
        "{}/{name}",
        admin_database_url().rsplit_once('/').unwrap().0
    );
    let guard = Cleanup {
        db_name: Some(name),
        redis: None,
        shutdown: None,
    };
    (guard, url)
}

/// What a test owns outside its process: its database and its Redis key namespace (and the
/// in-process ingress it started). Dropped at the end of the test, whether it passed or panicked,
/// it drops the database and deletes the namespace's keys, so a failing test leaks nothing.
/// [`TestApp::cleanup`] does the same without blocking a runtime thread.
pub struct Cleanup {
    db_name: Option<String>,
    /// (where Redis is, namespace)
    redis: Option<(sparky::redis_conn::RedisTarget, String)>,
    shutdown: Option<CancellationToken>,
}

impl Cleanup {
    /// Clean up now (idempotent: the guard is empty afterwards).
    pub async fn run(&mut self) {
        if let Some(s) = self.shutdown.take() {
            s.cancel();
        }
        let (db, redis) = (self.db_name.take(), self.redis.take());
        // Bounded: a test whose Redis was stopped on purpose must not hang its clean-up.
        let _ = tokio::time::timeout(Duration::from_secs(30), clean(db, redis)).await;
    }
}

async fn clean(
    db_name: Option<String>,
    namespace: Option<(sparky::redis_conn::RedisTarget, String)>,
) {
    if let Some(name) = db_name {
        if let Ok(admin) = Store::connect(&admin_database_url(), 1).await {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&admin.pool)
                .await;
            admin.pool.close().await;
        }
    }
    if let Some((target, ns)) = namespace {
        let Ok(client) = sparky::redis_conn::RedisClient::open(&target, Duration::from_secs(5))
        else {
            return;
        };
        let Ok(mut c) = client.dedicated(Duration::from_secs(5)).await else {
            return;
        };
        // KEYS goes to every master of a cluster, and DEL splits its keys by slot there.
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{ns}:*"))
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut c).await;
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            s.cancel();
        }
        let (db, redis) = (self.db_name.take(), self.redis.take());
        if db.is_none() && redis.is_none() {
            return;
        }
        // Drop cannot await, and it usually runs on a runtime thread (or while a test unwinds):
        // clean up on a thread of its own, with a runtime of its own, and wait for it.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(30), clean(db, redis)).await;
                });
            }
        })
        .join();
    }
}

pub struct TestApp {
    pub config: Config,
    pub store: Store,
    pub queue: Queue,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    /// Drops the database and the namespace's keys when the app is dropped.
    guard: Cleanup,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(|_| {}).await
    }

    /// Spawn with a tweaked config (e.g. another Redis).
    pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
        init_logs();
        let (mut guard, database_url) = fresh_database().await;
        let mut config = Config {
            database_url,
            redis_url: redis_url(),
            redis_cluster_urls: test_cluster_urls(),
            namespace: format!("t{}", Uuid::new_v4().simple()),
            partitions: 4,
            worker_concurrency: 8,
            ..Config::default()
        };
        tweak(&mut config);
        if config.redis_url != redis_url() {
            // A test that points at a Redis of its own (a private one it stops) means that one.
            config.redis_cluster_urls.clear();
        }
        guard.redis = Some((config.redis_target(), config.namespace.clone()));
        let store = Store::connect(&config.database_url, 8).await.unwrap();
        store.migrate().await.unwrap();
        let queue = Queue::from_config(&config, Duration::from_millis(1000))
            .await
            .expect("connect to Redis (is it running? scripts/test starts it)");
        queue.check_partitions().await.unwrap();
        queue.ensure_groups().await.unwrap();
        let shutdown = CancellationToken::new();
        guard.shutdown = Some(shutdown.clone());
        let addr = spawn_ingress(&config, store.clone(), queue.clone(), shutdown.clone()).await;
        TestApp {
            config,
            store,
            queue,
            addr,
            http: reqwest::Client::new(),
            shutdown,
            guard,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A user with a webhook secret (as `sparky user create` makes one).
    pub async fn create_user(&self) -> (Uuid, String) {
        let user = Uuid::now_v7();
        let secret = generate_webhook_secret();
        self.store
            .create_user(user, Some("test"), &hash_webhook_secret(secret.expose()))
            .await
            .unwrap();
        (user, secret.expose().to_string())
    }

    /// Paper credentials for `user`, encrypted like the CLI would when a master key is configured.
    pub async fn set_credentials(&self, user: Uuid, exchange: &str, label: &str) {
        let mut row = CredentialRow {
            user_id: user,
            exchange: exchange.into(),
            api_key: format!("key-{user}"),
            api_secret: format!("secret-{user}"),
            account_id: None,
            environment: "production".into(),
            extra_config: json!({}),
            label: Some(label.into()),
        };
        sparky::credentials::seal_row(&mut row, self.config.master_key.as_ref());
        self.store.upsert_credentials(&row).await.unwrap();
    }

    /// A user with paper credentials whose `extra_config` is `extra` (e.g. `{"latency_ms": 5}`).
    pub async fn paper_user_with(&self, extra: Value) -> (Uuid, String) {
        let (u, s) = self.create_user().await;
        let row = CredentialRow {
            user_id: u,
            exchange: "paper".into(),
            api_key: "k".into(),
            api_secret: "s".into(),
            account_id: None,
            environment: "production".into(),
            extra_config: extra,
            label: None,
        };
        self.store.upsert_credentials(&row).await.unwrap();
        (u, s)
    }

    /// Every record of the dead-letter stream, oldest first, as field -> value.
    pub async fn dlq_records(&self) -> Vec<HashMap<String, String>> {
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(self.queue.keys.dlq())
            .arg("-")
            .arg("+")
            .query_async(&mut self.queue.conn())
            .await
            .unwrap();
        reply
            .ids
            .into_iter()
            .map(|e| {
                e.map
                    .into_iter()
                    .map(|(k, v)| {
                        let v: String = redis::from_redis_value(v).expect("a text field");
                        (k, v)
                    })
                    .collect()
            })
            .collect()
    }

    /// The dead-letter record of `job`; panics unless there is exactly one.
    pub async fn dlq_record_of(&self, job: Uuid) -> HashMap<String, String> {
        let all = self.dlq_records().await;
        let mine: Vec<_> = all
            .iter()
            .filter(|r| r.get("job_id").map(String::as_str) == Some(job.to_string().as_str()))
            .collect();
        assert_eq!(mine.len(), 1, "dead-letter records of {job}: {all:?}");
        mine[0].clone()
    }

    /// The entries of partition `p` that were delivered and not acked: (entry id, consumer).
    pub async fn pending_entries(&self, p: u32) -> Vec<(String, String)> {
        let reply: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(self.queue.keys.stream(p))
            .arg(sparky::queue::GROUP)
            .arg("-")
            .arg("+")
            .arg(10_000)
            .query_async(&mut self.queue.conn())
            .await
            .unwrap();
        reply.ids.into_iter().map(|i| (i.id, i.consumer)).collect()
    }

    /// A user with paper credentials.
    pub async fn paper_user(&self) -> (Uuid, String) {
        let (u, s) = self.create_user().await;
        self.set_credentials(u, "paper", "Main Account").await;
        (u, s)
    }

    pub async fn post_webhook(&self, body: &Value) -> (StatusCode, Value) {
        let (status, _, answer) = self.post_webhook_answer(body).await;
        (status, answer)
    }

    /// Post `body`: the status, the `Retry-After` seconds if any, and the JSON answer.
    pub async fn post_webhook_answer(&self, body: &Value) -> (StatusCode, Option<u64>, Value) {
        let r = self
            .http
            .post(self.url("/webhook"))
            .json(body)
            .send()
            .await
            .unwrap();
        let retry_after = r
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        (
            r.status(),
            retry_after,
            r.json().await.unwrap_or(Value::Null),
        )
    }

    /// Post `body` as a well-behaved client does under load: a `503` with `Retry-After` (a look-up
    /// of the secret or the strategy did not answer in time; nothing was accepted) is retried after
    /// the announced pause, for up to 60 s. Any other answer is returned.
    pub async fn post_webhook_honouring_retry_after(&self, body: &Value) -> (StatusCode, Value) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            match self.post_webhook_answer(body).await {
                (StatusCode::SERVICE_UNAVAILABLE, Some(secs), _)
                    if std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_secs(secs)).await
                }
                (status, _, answer) => return (status, answer),
            }
        }
    }

    /// Post `body` as it is (any bytes, declared JSON) with extra `headers`.
    pub async fn post_raw(
        &self,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, reqwest::header::HeaderValue)],
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .post(self.url("/webhook"))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, v.clone());
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Post `body` (as a client does: see [`TestApp::post_webhook_honouring_retry_after`]) and
    /// return the accepted job's id; anything but `202` fails the test.
    pub async fn enqueue(&self, body: &Value) -> Uuid {
        let (status, v) = self.post_webhook_honouring_retry_after(body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{v}");
        v["job_id"].as_str().unwrap().parse().unwrap()
    }

    pub fn worker(&self) -> Worker {
        Worker::new(
            self.config.clone(),
            self.store.clone(),
            self.queue.clone(),
            CancellationToken::new(),
        )
    }

    /// Run a worker until every partition is empty and nothing is in flight.
    pub async fn run_worker_until_idle(&self) {
        run_until_idle(self.worker()).await
    }

    /// Enqueue `body` (as the ingress would), run a worker until idle, and read the job's row.
    pub async fn run_one(&self, body: &Value) -> JobRow {
        let id = self.enqueue(body).await;
        self.run_worker_until_idle().await;
        self.job(id).await
    }

    /// [`TestApp::run_one`], asserting the job ended `status`: its id.
    pub async fn run_expecting(&self, body: &Value, status: sparky::job::JobStatus) -> Uuid {
        let row = self.run_one(body).await;
        assert_eq!(row.status, status, "{row:?}");
        row.job_id
    }

    pub async fn job(&self, id: Uuid) -> JobRow {
        self.store.get_job(id).await.unwrap().expect("job row")
    }

    pub async fn trades(&self, user: Uuid) -> Vec<TradeRow> {
        self.store.trades_of_user(user).await.unwrap()
    }

    /// The user's position in `symbol`, on whichever account holds one (a test that opens the
    /// same symbol on two accounts asks [`Store::position`] for the account).
    pub async fn position(&self, user: Uuid, symbol: &str) -> Option<PositionRow> {
        let mut rows: Vec<PositionRow> = self
            .store
            .positions_of_user(user)
            .await
            .unwrap()
            .into_iter()
            .filter(|p| p.symbol == symbol)
            .collect();
        assert!(
            rows.len() <= 1,
            "{symbol} is open on several accounts: {rows:?}"
        );
        rows.pop()
    }

    /// Entries in all partition streams (acked or not).
    /// The ingress's `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn queued_entries(&self) -> u64 {
        let mut n = 0;
        for p in 0..self.config.partitions {
            n += self.queue.stream_len(p).await.unwrap();
        }
        n
    }

    /// Drop the database and the Redis keys of this test now (dropping the app does the same; this
    /// does it without blocking a runtime thread).
    pub async fn cleanup(mut self) {
        self.shutdown.cancel();
        self.store.pool.close().await;
        self.guard.run().await;
    }
}

/// Another ingress process in effect: its own state (secret cache, Redis connection, failure notes)
/// on its own port, over the same database and Redis namespace as `config` says.
pub async fn spawn_ingress(
    config: &Config,
    store: Store,
    queue: Queue,
    shutdown: CancellationToken,
) -> SocketAddr {
    let state = AppState::new(config, store, queue);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(sparky::ingress::serve(state, listener, shutdown));
    addr
}

/// A valid alert for `user` (paper exchange).
pub fn alert(user: Uuid, secret: &str, action: &str) -> Value {
    json!({
        "secret": secret,
        "user_id": user,
        "exchange": "paper",
        "action": action,
        "symbol": "BINANCE:ETHUSDT",
        "order_type": "market",
        "position_size_usd": 100
    })
}

/// A private `redis-server` on a free port (for tests that stop Redis).
pub struct PrivateRedis {
    pub port: u16,
    child: std::process::Child,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return PrivateRedis { port, child };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("private redis-server did not start");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Run `worker` until every partition is empty and nothing is in flight (a wedged lane never is).
pub async fn run_until_idle(worker: Worker) {
    tokio::time::timeout(
        Duration::from_secs(60),
        worker.run(RunMode::UntilIdle, Duration::from_secs(30)),
    )
    .await
    .expect("the worker drained the queue within 60 s")
    .unwrap();
}

/// Reconcile `user`'s accounts now (as the sweep would) and return every finding; a report with
/// an error fails the test.
pub async fn reconcile_findings(app: &TestApp, user: Uuid) -> Vec<sparky::reconcile::Finding> {
    let reports = app.worker().reconcile(Some(user)).await.unwrap();
    for r in &reports {
        assert_eq!(r.error, None, "{r}");
    }
    reports.into_iter().flat_map(|r| r.findings).collect()
}

/// Make `job`'s working entries due: the follower's next look expires them.
pub async fn expire_working_entries_now(app: &TestApp, job: Uuid) {
    sqlx::query(
        "UPDATE broker_orders SET expires_at = now() - interval '1 second' WHERE job_id = $1",
    )
    .bind(job)
    .execute(&app.store.pool)
    .await
    .unwrap();
}

/// (quantity, price, pnl, exit reason, fee) of the trade row of `job`'s `leg`.
pub async fn trade_leg(
    app: &TestApp,
    job: Uuid,
    leg: &str,
) -> (
    rust_decimal::Decimal,
    Option<rust_decimal::Decimal>,
    Option<rust_decimal::Decimal>,
    Option<sparky::job::ExitReason>,
    Option<rust_decimal::Decimal>,
) {
    sqlx::query_as(
        "SELECT quantity, price, pnl, exit_reason, fee FROM trades WHERE job_id = $1 AND leg = $2",
    )
    .bind(job)
    .bind(leg)
    .fetch_one(&app.store.pool)
    .await
    .unwrap()
}

/// The sum of the series of `name` (in `ns`) whose labels include all of `want`.
pub fn metric(text: &str, ns: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    sparky::metrics::samples(text, ns)
        .into_iter()
        .filter(|(n, labels, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .sum()
}
