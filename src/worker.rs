//! The worker: reads partition streams, runs each job, commits, then acks.
//!
//! # Ordering
//! Entries are read from the partition streams in stream order and handed to per-user *lanes*
//! ([`Lanes`]): a lane is a FIFO of one user's entries driven by at most one task, so a user's jobs
//! run strictly one after another (the next starts only after the previous one's final state is
//! committed and acked), while different users' lanes run concurrently, bounded by
//! `SPARKY_WORKER_CONCURRENCY` permits. A slow user or exchange holds one permit, not the worker.
//!
//! # Ownership (this version)
//! A worker consumes **all** partitions. On start it claims every pending entry of every partition
//! (`XAUTOCLAIM` to itself), re-reads them in stream order (`XREADGROUP ... 0`), then reads new ones
//! (`>`). That is only safe with **one worker process per namespace**: two workers sharing
//! partitions could run one user's jobs concurrently. Partition leases for a horizontally scaled pool
//! are the ordering issue's work; the README says to run one worker until then.
//!
//! # Never lose, never repeat
//! - An entry is acked only after its job's final state is committed in Postgres
//!   ([`Store::finish_job`]). If Postgres or Redis is unavailable the worker retries (capped backoff)
//!   until it is back or the worker shuts down; in both cases the entry stays pending and nothing is
//!   lost.
//! - `jobs.job_id` makes a redelivered, already-finished entry a no-op (acked, not executed), and a
//!   redelivered unfinished one runs in recovery mode (orders looked up by client order id first).
//! - Entries that are not jobs go to the dead-letter stream (and are acked).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::Config;
use crate::credentials::{CredentialError, CredentialLoader};
use crate::domain::Job;
use crate::exchanges::{build_exchange, ExchangeContext};
use crate::executor::{self, JobStatus, Outcome, PositionChange, RetryPolicy};
use crate::queue::{Entry, Queue};
use crate::store::{Begin, Store, StoreError};

/// How long one `XREADGROUP` blocks waiting for new entries.
const READ_BLOCK: Duration = Duration::from_millis(1000);
/// Entries read per `XREADGROUP`.
const READ_COUNT: usize = 256;
/// A partition is not read while this many of its entries are in flight (back-pressure).
const MAX_INFLIGHT_PER_PARTITION: usize = 1024;

/// Everything a worker needs; built once by [`Worker::connect`].
#[derive(Clone)]
pub struct Worker {
    pub config: Config,
    pub store: Store,
    pub queue: Queue,
    pub consumer: String,
    processor: Arc<Processor>,
}

struct Processor {
    store: Store,
    queue: Queue,
    credentials: CredentialLoader,
    ctx: ExchangeContext,
    policy: RetryPolicy,
    max_signal_age: Duration,
    shutdown: CancellationToken,
}

/// How [`Worker::run`] ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Until the shutdown token is cancelled.
    Forever,
    /// Until every partition is empty and nothing is in flight (tests, one-off drains).
    UntilIdle,
}

impl Worker {
    /// Connect to Postgres and Redis and run the start-up checks (migrations, partition count).
    pub async fn connect(config: Config, shutdown: CancellationToken) -> anyhow::Result<Worker> {
        let store = Store::connect(
            &config.database_url,
            (config.worker_concurrency as u32 + 2).min(32),
        )
        .await?;
        store.check_migrated().await?;
        let queue = Queue::connect(
            &config.redis_url,
            &config.namespace,
            config.partitions,
            Duration::from_secs(5),
        )
        .await?;
        queue.check_partitions().await?;
        queue.ensure_groups().await?;
        Ok(Worker::new(config, store, queue, shutdown))
    }

    pub fn new(config: Config, store: Store, queue: Queue, shutdown: CancellationToken) -> Worker {
        let keys = config.master_key.iter().cloned().collect();
        let processor = Arc::new(Processor {
            credentials: CredentialLoader::new(
                store.clone(),
                queue.clone(),
                config.credential_cache_ttl,
                keys,
            ),
            ctx: ExchangeContext::new(&config, store.clone()),
            policy: RetryPolicy {
                max_retries: config.exchange_retries,
                max_total: config.exchange_retry_max,
                ..RetryPolicy::default()
            },
            max_signal_age: config.max_signal_age,
            store: store.clone(),
            queue: queue.clone(),
            shutdown,
        });
        Worker {
            consumer: format!("worker-{}", Uuid::now_v7().simple()),
            config,
            store,
            queue,
            processor,
        }
    }

    /// Consume every partition until shutdown (or until idle). In-flight jobs are finished before
    /// this returns; on shutdown they get `drain_timeout` to do so.
    pub async fn run(&self, mode: RunMode, drain_timeout: Duration) -> anyhow::Result<()> {
        let shutdown = self.processor.shutdown.clone();
        let partitions: Vec<u32> = (0..self.config.partitions).collect();
        for &p in &partitions {
            let n = self.queue.claim_all_pending(p, &self.consumer).await?;
            if n > 0 {
                tracing::info!(
                    partition = p,
                    entries = n,
                    "claimed pending entries; they run first"
                );
            }
        }
        let inflight: Arc<Vec<AtomicUsize>> =
            Arc::new(partitions.iter().map(|_| AtomicUsize::new(0)).collect());
        let lanes = Lanes::new(
            self.config.worker_concurrency,
            self.processor.clone(),
            inflight.clone(),
        );
        // "0"-style cursors re-read this consumer's pending entries; ">" reads new ones.
        let mut cursors: HashMap<u32, String> =
            partitions.iter().map(|&p| (p, "0".to_string())).collect();
        let mut conn = self.queue.blocking_conn(READ_BLOCK).await?;
        let mut failures = 0u32;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let wanted: Vec<(u32, String)> = partitions
                .iter()
                .filter(|&&p| {
                    inflight[p as usize].load(Ordering::Acquire) < MAX_INFLIGHT_PER_PARTITION
                })
                .map(|p| (*p, cursors[p].clone()))
                .collect();
            let read = tokio::select! {
                r = self.queue.read(&mut conn, &self.consumer, &wanted, READ_COUNT, READ_BLOCK) => r,
                _ = shutdown.cancelled() => break,
            };
            let entries = match read {
                Ok(e) => {
                    failures = 0;
                    e
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(error = %e, "reading the partition streams failed; retrying");
                    let delay = Duration::from_millis(200 * u64::from(failures.min(25)));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {},
                        _ = shutdown.cancelled() => break,
                    }
                    if let Ok(c) = self.queue.blocking_conn(READ_BLOCK).await {
                        conn = c;
                    }
                    continue;
                }
            };
            let read_all_new =
                wanted.len() == partitions.len() && wanted.iter().all(|(_, c)| c == ">");
            // Pending-mode cursors advance past what was returned; a partition with nothing more
            // pending switches to new entries.
            for (p, cursor) in &wanted {
                if cursor != ">" {
                    let last = entries.iter().rev().find(|e| e.partition == *p);
                    let next = last.map_or_else(|| ">".to_string(), |e| e.id.clone());
                    cursors.insert(*p, next);
                }
            }
            let got = entries.len();
            for e in entries {
                inflight[e.partition as usize].fetch_add(1, Ordering::AcqRel);
                lanes.push(e);
            }
            if mode == RunMode::UntilIdle && got == 0 && read_all_new && lanes.is_idle() {
                break;
            }
        }
        lanes.tracker.close();
        if tokio::time::timeout(drain_timeout, lanes.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight jobs did not finish within {drain_timeout:?}; their entries stay pending and are redelivered"
            );
        }
        Ok(())
    }

    /// `/healthz` and `/readyz` for the worker (served on `WORKER_PORT`).
    pub fn health_router(&self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(worker_ready))
            .with_state(self.clone())
    }
}

async fn worker_ready(State(w): State<Worker>) -> (StatusCode, Json<serde_json::Value>) {
    let redis = w.queue.ping().await.is_ok();
    let postgres = w.store.ping().await.is_ok();
    let code = if redis && postgres {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({"redis": redis, "postgres": postgres})))
}

/// Per-user FIFO lanes. A lane exists (is in the map) exactly while one task drives it.
struct Lanes {
    queues: Arc<Mutex<HashMap<Uuid, VecDeque<Entry>>>>,
    permits: Arc<Semaphore>,
    processor: Arc<Processor>,
    inflight: Arc<Vec<AtomicUsize>>,
    tracker: TaskTracker,
}

impl Lanes {
    fn new(concurrency: usize, processor: Arc<Processor>, inflight: Arc<Vec<AtomicUsize>>) -> Self {
        Lanes {
            queues: Arc::default(),
            permits: Arc::new(Semaphore::new(concurrency)),
            processor,
            inflight,
            tracker: TaskTracker::new(),
        }
    }

    fn is_idle(&self) -> bool {
        self.queues.lock().expect("lanes lock").is_empty()
    }

    fn push(&self, entry: Entry) {
        // Entries that are not jobs share the nil lane; they only need dead-lettering.
        let user = entry
            .job
            .as_ref()
            .map(|j| j.alert.user_id)
            .unwrap_or_else(|_| Uuid::nil());
        {
            let mut q = self.queues.lock().expect("lanes lock");
            if let Some(lane) = q.get_mut(&user) {
                lane.push_back(entry);
                return;
            }
            q.insert(user, VecDeque::from([entry]));
        }
        let queues = self.queues.clone();
        let permits = self.permits.clone();
        let processor = self.processor.clone();
        let inflight = self.inflight.clone();
        self.tracker.spawn(async move {
            loop {
                let next = {
                    let mut q = queues.lock().expect("lanes lock");
                    let lane = q.get_mut(&user).expect("a driven lane exists");
                    match lane.pop_front() {
                        Some(e) => e,
                        None => {
                            q.remove(&user);
                            return;
                        }
                    }
                };
                let partition = next.partition as usize;
                let Ok(_permit) = permits.acquire().await else {
                    return;
                };
                processor.process(next).await;
                inflight[partition].fetch_sub(1, Ordering::AcqRel);
            }
        });
    }
}

/// Was this a connection-level database failure (worth waiting out), as opposed to a statement error?
fn db_unavailable(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Db(
            sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::WorkerCrashed
        )
    ) || matches!(e, StoreError::Db(sqlx::Error::Database(d)) if d.code().is_some_and(|c| c.starts_with("57P") || c.starts_with("08")))
}

impl Processor {
    /// Run `op` until it succeeds or the worker shuts down (`None`). For infrastructure calls whose
    /// failure must never turn into a lost or half-recorded job.
    async fn until_ok<T, E: std::fmt::Display, F, Fut>(&self, what: &str, mut op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut delay = Duration::from_millis(100);
        loop {
            match op().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    tracing::warn!(error = %e, "{what} failed; retrying in {delay:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.cancelled() => return None,
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn process(&self, entry: Entry) {
        let job = match &entry.job {
            Ok(job) => job.clone(),
            Err(reason) => {
                tracing::error!(partition = entry.partition, entry_id = %entry.id, %reason, "unreadable stream entry; dead-lettering it");
                let fields = [
                    ("status", "dead".to_string()),
                    ("error_class", "poison".to_string()),
                    ("error", reason.clone()),
                    ("partition", entry.partition.to_string()),
                    ("entry_id", entry.id.clone()),
                    ("raw", entry.raw.clone().unwrap_or_default()),
                    ("at", Utc::now().to_rfc3339()),
                ];
                if self
                    .until_ok("dead-lettering", || self.queue.dead_letter(&fields))
                    .await
                    .is_some()
                {
                    self.ack(&entry).await;
                }
                return;
            }
        };
        let span = tracing::info_span!(
            "job",
            job_id = %job.job_id,
            user_id = %job.alert.user_id,
            exchange = %job.alert.exchange,
            partition = entry.partition,
        );
        self.process_job(&entry, &job).instrument(span).await
    }

    async fn process_job(&self, entry: &Entry, job: &Job) {
        let begin = self
            .until_ok("recording the job start", || {
                self.store.begin_job(job, entry.partition, &entry.id)
            })
            .await;
        let attempt = match begin {
            None => return, // shutting down; the entry stays pending
            Some(Begin::Finished(status)) => {
                tracing::info!(%status, "job already finished; acknowledging the redelivered entry");
                self.ack(entry).await;
                return;
            }
            Some(Begin::Execute { attempt }) => attempt,
        };
        let outcome = match self.run_job(job, attempt).await {
            Some(o) => o,
            None => return,
        };
        if !self.commit(job, &outcome).await {
            return;
        }
        if outcome.status.is_failure() {
            let fields = dead_letter_fields(job, entry, &outcome);
            if self
                .until_ok("dead-lettering", || self.queue.dead_letter(&fields))
                .await
                .is_none()
            {
                return;
            }
        }
        self.ack(entry).await;
        let latency_ms = (Utc::now() - job.accepted_at).num_milliseconds();
        tracing::info!(
            status = outcome.status.as_str(),
            message = outcome.message.as_deref().unwrap_or(""),
            fills = outcome.fills.len(),
            attempt,
            latency_ms,
            "job finished"
        );
    }

    /// Execute the job; `None` only when shutting down mid-way.
    async fn run_job(&self, job: &Job, attempt: i32) -> Option<Outcome> {
        let a = &job.alert;
        let now = Utc::now();
        let age = (now - job.accepted_at).to_std().unwrap_or_default();
        if age > self.max_signal_age {
            return Some(Outcome::failed(
                JobStatus::Dead,
                "stale",
                format!(
                    "stale: reached {}s after acceptance (SPARKY_MAX_SIGNAL_AGE_SECS={})",
                    age.as_secs(),
                    self.max_signal_age.as_secs()
                ),
            ));
        }
        if let (Some(ts), Some(lag)) = (a.timestamp, a.max_lag_secs) {
            if now > ts + chrono::Duration::seconds(lag as i64) {
                return Some(Outcome::failed(
                    JobStatus::Dead,
                    "stale",
                    format!("stale: alert time {ts} is more than max_lag_secs={lag} ago"),
                ));
            }
        }

        let exchange = a.exchange;
        tracing::info!(
            "🔐 Loading {exchange} credentials for user {}...",
            a.user_id
        );
        let creds = loop {
            match self
                .credentials
                .load(a.user_id, exchange, a.environment)
                .await
            {
                Ok(c) => break c,
                Err(CredentialError::Store(e)) => {
                    tracing::warn!(error = %e, "loading credentials failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        _ = self.shutdown.cancelled() => return None,
                    }
                }
                Err(e @ CredentialError::Unusable { .. }) => {
                    return Some(Outcome::failed(
                        JobStatus::Rejected,
                        "credentials",
                        e.to_string(),
                    ))
                }
            }
        };
        let Some(creds) = creds else {
            let env = a.environment.map(|e| e.as_str()).unwrap_or("any");
            return Some(Outcome::failed(
                JobStatus::Rejected,
                "credentials",
                format!(
                    "no {exchange} credentials for user {} (environment: {env}); add them with `sparky credentials set`",
                    a.user_id
                ),
            ));
        };
        tracing::info!(
            "✅ Loaded {exchange} credentials for user (label: {})",
            creds.label.as_deref().unwrap_or("none")
        );
        let client = match build_exchange(&creds, &self.ctx) {
            Ok(c) => c,
            Err(e) => {
                return Some(Outcome::failed(
                    JobStatus::Rejected,
                    e.class.as_str(),
                    e.message,
                ))
            }
        };
        tracing::info!("✅ Created {exchange} executor for user {}", a.user_id);
        let run = executor::execute(client.as_ref(), job, attempt > 1, &self.policy);
        // A shutdown does not interrupt an order in flight: it is given the drain timeout.
        Some(run.await)
    }

    /// Commit the outcome; `false` if shutting down before it could be committed.
    async fn commit(&self, job: &Job, outcome: &Outcome) -> bool {
        let mut delay = Duration::from_millis(100);
        let mut statement_failures = 0;
        loop {
            match self.store.finish_job(job, outcome).await {
                Ok(()) => return true,
                Err(StoreError::Db(sqlx::Error::Database(d)))
                    if d.code().as_deref() == Some("23505") =>
                {
                    // Another delivery of this job already recorded its trades.
                    tracing::error!(error = %d, "job outcome was already recorded by another delivery; not recording it twice");
                    return true;
                }
                Err(e) if db_unavailable(&e) => {
                    tracing::warn!(error = %e, "Postgres unavailable; the entry stays pending until the outcome is committed");
                }
                Err(e) => {
                    statement_failures += 1;
                    tracing::error!(error = %e, "recording the job outcome failed");
                    if statement_failures >= 5 && outcome.status != JobStatus::Dead {
                        // Record what can be recorded rather than block the user's lane forever.
                        let dead = Outcome {
                            fills: vec![],
                            position: PositionChange::Unchanged,
                            ..Outcome::failed(
                                JobStatus::Dead,
                                "internal",
                                format!(
                                    "could not record the outcome ({e}); outcome was {:?}: {:?}",
                                    outcome.status, outcome.message
                                ),
                            )
                        };
                        return Box::pin(self.commit(job, &dead)).await;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.cancelled() => return false,
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn ack(&self, entry: &Entry) {
        let _ = self
            .until_ok("acknowledging the entry", || {
                self.queue.ack(entry.partition, &entry.id)
            })
            .await;
    }
}

fn dead_letter_fields(job: &Job, entry: &Entry, o: &Outcome) -> Vec<(&'static str, String)> {
    vec![
        ("job_id", job.job_id.to_string()),
        ("user_id", job.alert.user_id.to_string()),
        ("status", o.status.as_str().to_string()),
        ("error_class", o.error_class.clone().unwrap_or_default()),
        ("error", o.message.clone().unwrap_or_default()),
        (
            "history",
            serde_json::to_string(&o.history).expect("history serialises"),
        ),
        ("partition", entry.partition.to_string()),
        ("entry_id", entry.id.clone()),
        ("job", serde_json::to_string(job).expect("job serialises")),
        ("at", Utc::now().to_rfc3339()),
    ]
}
