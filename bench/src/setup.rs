//! What every part needs: its own Postgres database and Redis namespace (created here, dropped in
//! [`Scope::cleanup`]), users with paper credentials, and real `sparky-worker` / `sparky-ingress`
//! processes started from the release build, in a temp directory so no `.env` is read.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;
use sparky::queue::Queue;
use sparky::secrets::{generate_webhook_secret, hash_webhook_secret};
use sparky::store::{CredentialRow, Store};
use tokio::task::JoinSet;
use uuid::Uuid;

/// Partitions of every bench namespace (the default).
pub const PARTITIONS: u32 = 16;

/// Where the servers and the binaries are.
#[derive(Clone)]
pub struct Ctx {
    pub redis_url: String,
    /// `REDIS_CLUSTER_URLS`: when set, every part runs on that Redis Cluster (passed on to the
    /// ingress and workers it starts), and `redis_url` is not used.
    pub redis_cluster_urls: String,
    /// `SPARKY_REDIS_WAIT_REPLICAS`, passed on to the ingress and workers.
    pub wait_replicas: String,
    /// `DATABASE_URL` with its database replaced by `postgres` (for CREATE/DROP DATABASE).
    pub admin_url: String,
    /// The query part of `DATABASE_URL` (e.g. `?sslmode=disable`), kept on every database URL.
    db_query: String,
    pub bin_dir: PathBuf,
    /// Scratch directory of this run (bodies, logs); removed at the end.
    pub tmp: PathBuf,
    /// `LOG_LEVEL` of the workers the bench starts (`--worker-log-level`).
    pub worker_log_level: String,
}

impl Ctx {
    pub fn from_env(bin_dir: PathBuf) -> anyhow::Result<Ctx> {
        let redis_url =
            std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let db = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/sparky".into());
        let (db, query) = match db.find('?') {
            Some(i) => (&db[..i], db[i..].to_string()),
            None => (db.as_str(), String::new()),
        };
        let (base, _) = db
            .rsplit_once('/')
            .context("DATABASE_URL has no database name")?;
        let tmp = std::env::temp_dir().join(format!("sparky-bench-{}", std::process::id()));
        std::fs::create_dir_all(&tmp)?;
        for bin in ["sparky-worker", "sparky-ingress"] {
            if !bin_dir.join(bin).exists() {
                bail!(
                    "{} not found: build with `cargo build --release -p sparky-worker -p sparky-ingress` (scripts/bench does)",
                    bin_dir.join(bin).display()
                );
            }
        }
        Ok(Ctx {
            redis_url,
            redis_cluster_urls: std::env::var("REDIS_CLUSTER_URLS").unwrap_or_default(),
            wait_replicas: std::env::var("SPARKY_REDIS_WAIT_REPLICAS").unwrap_or_default(),
            admin_url: format!("{base}/postgres{query}"),
            db_query: query,
            bin_dir,
            tmp,
            worker_log_level: "info,sqlx=warn".into(),
        })
    }

    /// Where Redis is: the cluster when `REDIS_CLUSTER_URLS` is set.
    pub fn redis_target(&self) -> sparky::redis_conn::RedisTarget {
        let seeds: Vec<String> = self
            .redis_cluster_urls
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if seeds.is_empty() {
            sparky::redis_conn::RedisTarget::Single(self.redis_url.clone())
        } else {
            sparky::redis_conn::RedisTarget::Cluster(seeds)
        }
    }

    fn db_url(&self, name: &str) -> String {
        let base = &self.admin_url[..self.admin_url.len() - self.db_query.len()];
        format!(
            "{}/{name}{}",
            base.rsplit_once('/').map_or(base, |(b, _)| b),
            self.db_query
        )
    }

    /// Drop bench databases left behind by runs that crashed more than an hour ago.
    pub async fn sweep(&self) -> anyhow::Result<()> {
        let admin = Store::connect(&self.admin_url, 1).await?;
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE datname LIKE 'sparky_bench_%'",
        )
        .fetch_all(&admin.pool)
        .await?;
        let now = chrono::Utc::now().timestamp();
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
        admin.pool.close().await;
        Ok(())
    }
}

/// One part's database and Redis namespace.
pub struct Scope {
    pub db_name: String,
    pub db_url: String,
    pub ns: String,
    pub store: Store,
    pub queue: Queue,
}

impl Scope {
    pub async fn create(ctx: &Ctx, part: &str) -> anyhow::Result<Scope> {
        let tag = &Uuid::new_v4().simple().to_string()[..8];
        let db_name = format!(
            "sparky_bench_{}_{part}_{tag}",
            chrono::Utc::now().timestamp()
        );
        let admin = Store::connect(&ctx.admin_url, 1)
            .await
            .context("connecting to Postgres")?;
        sqlx::query(&format!("CREATE DATABASE {db_name}"))
            .execute(&admin.pool)
            .await?;
        admin.pool.close().await;
        let db_url = ctx.db_url(&db_name);
        let store = Store::connect(&db_url, 16).await?;
        store.migrate().await?;
        let ns = format!("bench{part}{tag}");
        let queue = new_queue(ctx, &ns).await?;
        Ok(Scope {
            db_name,
            db_url,
            ns,
            store,
            queue,
        })
    }

    /// Drop the database and every key of the namespace.
    pub async fn cleanup(self, ctx: &Ctx) {
        self.store.pool.close().await;
        if let Err(e) = drop_database(ctx, &self.db_name).await {
            eprintln!("warning: could not drop {}: {e:#}", self.db_name);
        }
        if let Err(e) = delete_namespace(&self.queue, &self.ns).await {
            eprintln!(
                "warning: could not delete Redis namespace {}: {e:#}",
                self.ns
            );
        }
    }
}

/// A queue (with its consumer groups) on a namespace.
pub async fn new_queue(ctx: &Ctx, ns: &str) -> anyhow::Result<Queue> {
    let queue = Queue::connect(ctx.redis_target(), ns, PARTITIONS, Duration::from_secs(5))
        .await
        .context("connecting to Redis")?;
    queue.check_partitions().await?;
    queue.ensure_groups().await?;
    Ok(queue)
}

async fn drop_database(ctx: &Ctx, name: &str) -> anyhow::Result<()> {
    let admin = Store::connect(&ctx.admin_url, 1).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin.pool)
        .await?;
    admin.pool.close().await;
    Ok(())
}

/// Delete every key `{ns}:*` (SCAN on every master + UNLINK, bounded by the number of keys).
pub async fn delete_namespace(queue: &Queue, ns: &str) -> anyhow::Result<()> {
    let mut c = queue.conn();
    let keys = c.scan_match(&format!("{ns}:*")).await?;
    for chunk in keys.chunks(1000) {
        let _: i64 = redis::cmd("UNLINK").arg(chunk).query_async(&mut c).await?;
    }
    Ok(())
}

/// A user of the bench: id and webhook secret.
#[derive(Clone)]
pub struct User {
    pub id: Uuid,
    pub secret: String,
}

/// `n` users, each with a webhook secret and paper credentials with `extra_config` (e.g. a
/// simulated latency), created through the store like `sparky user create` / `credentials set`.
pub async fn create_users(
    store: &Store,
    n: usize,
    extra_config: Value,
) -> anyhow::Result<Vec<User>> {
    let users: Vec<User> = (0..n)
        .map(|_| User {
            id: Uuid::now_v7(),
            secret: generate_webhook_secret().expose().to_string(),
        })
        .collect();
    let mut set = JoinSet::new();
    for chunk in users.chunks(n.div_ceil(12).max(1)) {
        let chunk = chunk.to_vec();
        let store = store.clone();
        let extra = extra_config.clone();
        set.spawn(async move {
            for u in chunk {
                store
                    .create_user(u.id, Some("bench"), &hash_webhook_secret(&u.secret))
                    .await?;
                store
                    .upsert_credentials(&CredentialRow {
                        user_id: u.id,
                        exchange: "paper".into(),
                        api_key: "bench-key".into(),
                        api_secret: "bench-secret".into(),
                        account_id: None,
                        environment: "production".into(),
                        extra_config: extra.clone(),
                        label: Some("bench".into()),
                    })
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(users)
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough on a machine we control).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process of the bench, killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log (for error messages).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fail if it exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited ({st}):\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `bin` (from the release build) with only `env` (plus `PATH`), logging to a file.
pub fn spawn(ctx: &Ctx, bin: &str, env: &[(&str, String)]) -> anyhow::Result<Proc> {
    let dir = ctx.tmp.join(format!("{bin}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("out.log");
    let out = std::fs::File::create(&log)?;
    let mut cmd = Command::new(ctx.bin_dir.join(bin));
    cmd.current_dir(&dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().with_context(|| format!("starting {bin}"))?;
    Ok(Proc {
        name: bin.to_string(),
        child,
        log,
    })
}

/// The environment of a `sparky-worker` on `scope`'s database and namespace `ns`.
pub fn worker_env(
    ctx: &Ctx,
    scope: &Scope,
    ns: &str,
    concurrency: usize,
) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", scope.db_url.clone()),
        ("REDIS_URL", ctx.redis_url.clone()),
        ("REDIS_CLUSTER_URLS", ctx.redis_cluster_urls.clone()),
        ("SPARKY_REDIS_WAIT_REPLICAS", ctx.wait_replicas.clone()),
        ("SPARKY_NAMESPACE", ns.to_string()),
        ("SPARKY_PARTITIONS", PARTITIONS.to_string()),
        ("SPARKY_WORKER_CONCURRENCY", concurrency.to_string()),
        // Backlogs wait in the stream for a while; they must not go stale.
        ("SPARKY_MAX_SIGNAL_AGE_SECS", "600".into()),
        ("SPARKY_LEASE_TTL_MS", "2000".into()),
        ("SPARKY_EXCHANGE_TIMEOUT_MS", "900".into()),
        ("WORKER_PORT", "0".into()),
        ("LOG_LEVEL", ctx.worker_log_level.clone()),
        ("LOG_FORMAT", "json".into()),
    ]
}

/// Serve the worker's `/metrics` on a free port (instead of none) and return it.
pub fn metrics_port(env: &mut [(&'static str, String)]) -> anyhow::Result<u16> {
    let port = free_port()?;
    let Some((_, v)) = env.iter_mut().find(|(k, _)| *k == "WORKER_PORT") else {
        anyhow::bail!("the worker's environment sets no WORKER_PORT");
    };
    *v = port.to_string();
    Ok(port)
}

/// Start the real ingress binary on 127.0.0.1:`port` (it binds every address; the bench only sends
/// to 127.0.0.1) and wait until it answers `/healthz`.
pub async fn spawn_ingress(ctx: &Ctx, scope: &Scope, port: u16) -> anyhow::Result<Proc> {
    spawn_ingress_with(ctx, scope, port, &[]).await
}

/// [`spawn_ingress`] with more environment (later entries win).
pub async fn spawn_ingress_with(
    ctx: &Ctx,
    scope: &Scope,
    port: u16,
    extra: &[(&str, String)],
) -> anyhow::Result<Proc> {
    let env: Vec<(&str, String)> = [
        ("DATABASE_URL", scope.db_url.clone()),
        ("REDIS_URL", ctx.redis_url.clone()),
        ("REDIS_CLUSTER_URLS", ctx.redis_cluster_urls.clone()),
        ("SPARKY_REDIS_WAIT_REPLICAS", ctx.wait_replicas.clone()),
        ("SPARKY_NAMESPACE", scope.ns.clone()),
        ("SPARKY_PARTITIONS", PARTITIONS.to_string()),
        ("PORT", port.to_string()),
        // The bench sends far more than 10/s per user: the per-user limit is off.
        ("SPARKY_RATE_LIMIT_PER_SEC", "0".into()),
        ("SPARKY_SECRET_CACHE_TTL_SECS", "60".into()),
        ("LOG_LEVEL", "info,sqlx=warn".into()),
        ("LOG_FORMAT", "json".into()),
    ]
    .into_iter()
    .chain(extra.iter().cloned())
    .collect();
    let mut p = spawn(ctx, "sparky-ingress", &env)?;
    let url = format!("http://127.0.0.1:{port}/healthz");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        p.check_alive()?;
        if let Ok(r) = http.get(&url).send().await {
            if r.status().is_success() {
                return Ok(p);
            }
        }
        if Instant::now() > deadline {
            bail!("sparky-ingress did not come up:\n{}", p.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Number of jobs in a final state.
pub async fn finished_jobs(store: &Store) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status NOT IN ('queued', 'executing')")
            .fetch_one(&store.pool)
            .await?,
    )
}

/// Wait until `n` jobs are final, checking that `procs` stay alive; fails after `within`.
pub async fn wait_finished(
    store: &Store,
    n: i64,
    within: Duration,
    procs: &mut [Proc],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let done = finished_jobs(store).await?;
        if done >= n {
            return Ok(());
        }
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        if Instant::now() > deadline {
            bail!("only {done} of {n} jobs finished within {within:?}");
        }
        // The count scans `jobs`: often enough to end a run promptly, rarely enough to cost little
        // (the rates are computed from the rows' timestamps, not from when this noticed).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Statuses of the jobs that did not succeed (should be none), for a sanity line.
pub async fn failed_summary(store: &Store) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT status || coalesce(': ' || left(error, 120), ''), count(*) FROM jobs
         WHERE status <> 'succeeded' GROUP BY 1 ORDER BY 2 DESC LIMIT 5",
    )
    .fetch_all(&store.pool)
    .await?)
}

pub fn remove_tmp(ctx: &Ctx) {
    let _ = std::fs::remove_dir_all(&ctx.tmp);
}
