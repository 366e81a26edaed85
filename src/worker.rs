//! The worker: reads partition streams, runs each job, commits, then acks.
//!
//! # Ordering
//! Entries are read from the partition streams in stream order and handed to per-user *lanes*
//! ([`Lanes`]): a lane is a FIFO of one user's entries driven by at most one task, so a user's jobs
//! run strictly one after another (the next starts only after the previous one's final state is
//! committed and acked), while different users' lanes run concurrently, bounded by
//! `SPARKY_WORKER_CONCURRENCY` permits. A slow user or exchange holds one permit, not the worker.
//!
//! # Ownership
//! A worker consumes only the partitions whose lease it holds (see the `lease` module): leases are
//! shared fairly among the live workers and handed over when one joins, leaves or dies. A new owner
//! claims every pending entry of the partition (`XAUTOCLAIM`), re-reads them in stream order
//! (`XREADGROUP ... 0`), then reads new ones (`>`). A partition that is handed over (or whose lease
//! is lost) is no longer read; its entries that were read but not started are dropped from the
//! lanes (they stay pending for the next owner) and the lease is released once the started ones are
//! committed and acked. So at any time at most one worker runs a given user's jobs, in order.
//!
//! # Never lose, never repeat
//! - An entry is acked only after its job's final state is committed in Postgres
//!   ([`Store::finish_job`]). If Postgres or Redis is unavailable the worker retries (capped backoff)
//!   until it is back or the worker shuts down; in both cases the entry stays pending and nothing is
//!   lost.
//! - `jobs.job_id` makes a redelivered, already-finished entry a no-op (acked, not executed), and a
//!   redelivered unfinished one runs in recovery mode (orders looked up by client order id first).
//! - Entries that are not jobs go to the dead-letter stream (and are acked).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use crate::exchanges::metered::Metered;
use crate::exchanges::{build_exchange, ExchangeContext};
use crate::executor::{self, JobStatus, Outcome, PositionChange, RetryPolicy};
use crate::lease::{assignment, Leases};
use crate::metrics::Metrics;
use crate::queue::{Entry, Queue, Replay};
use crate::replay::would_be_stale;
use crate::store::{Begin, Store, StoreError};

/// How long one `XREADGROUP` blocks waiting for new entries.
const READ_BLOCK: Duration = Duration::from_millis(1000);
/// Entries read per `XREADGROUP`.
const READ_COUNT: usize = 256;
/// A partition is not read while this many of its entries are in flight (back-pressure).
const MAX_INFLIGHT_PER_PARTITION: usize = 1024;
/// How often an owner trims its partition streams to `SPARKY_STREAM_RETENTION_SECS`.
const TRIM_EVERY: Duration = Duration::from_secs(60);
/// How often the partition gauges (lag, pending, oldest pending age) and the dead-letter size are
/// sampled from Redis.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Everything a worker needs; built once by [`Worker::connect`].
#[derive(Clone)]
pub struct Worker {
    pub config: Config,
    pub store: Store,
    pub queue: Queue,
    pub consumer: String,
    pub metrics: Metrics,
    processor: Arc<Processor>,
    parts: Arc<PartState>,
}

struct Processor {
    store: Store,
    queue: Queue,
    credentials: CredentialLoader,
    ctx: ExchangeContext,
    policy: RetryPolicy,
    max_signal_age: Duration,
    max_deliveries: u32,
    shutdown: CancellationToken,
    metrics: Metrics,
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
        config.check_worker_timing()?;
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
        for w in queue.durability_warnings().await {
            tracing::warn!("{w}");
        }
        queue.ensure_groups().await?;
        Ok(Worker::new(config, store, queue, shutdown))
    }

    pub fn new(config: Config, store: Store, queue: Queue, shutdown: CancellationToken) -> Worker {
        let keys = config.master_key.iter().cloned().collect();
        let metrics = Metrics::new(&config.namespace);
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
            max_deliveries: config.max_deliveries,
            store: store.clone(),
            queue: queue.clone(),
            shutdown,
            metrics: metrics.clone(),
        });
        Worker {
            consumer: format!("worker-{}", Uuid::now_v7().simple()),
            parts: Arc::new(PartState::new(config.partitions)),
            metrics,
            config,
            store,
            queue,
            processor,
        }
    }

    /// Consume the partitions this worker owns until shutdown (or until idle). In-flight jobs are
    /// finished before this returns (given `drain_timeout` on shutdown), then the leases are released
    /// so other workers take over at once.
    pub async fn run(&self, mode: RunMode, drain_timeout: Duration) -> anyhow::Result<()> {
        let shutdown = self.processor.shutdown.clone();
        let ttl = self.config.lease_ttl;
        let leases = Leases::new(
            self.queue.clone(),
            self.consumer.clone(),
            ttl.as_millis() as u64,
        );
        let parts = self.parts.clone();
        let lanes = Lanes::new(
            self.config.worker_concurrency,
            self.processor.clone(),
            parts.clone(),
        );
        let block = READ_BLOCK.min(ttl / 6);
        let tick = ttl / 3;
        let mut owned: HashMap<u32, Owned> = HashMap::new();
        let mut epoch = 0u64;
        let mut next_tick = Instant::now();
        let mut next_trim = Instant::now() + TRIM_EVERY;
        let mut conn = self.queue.blocking_conn(block).await?;
        let mut failures = 0u32;
        let sampler_stop = CancellationToken::new();
        let sampler = tokio::spawn(self.clone().sample_gauges(sampler_stop.clone()));
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if Instant::now() >= next_tick {
                self.rebalance(&leases, &mut owned, epoch).await;
                next_tick = Instant::now() + tick;
            }
            self.finish_handovers(&leases, &mut owned, epoch).await;
            self.drop_expired(&mut owned);
            if Instant::now() >= next_trim {
                next_trim = Instant::now() + TRIM_EVERY;
                for (p, o) in &owned {
                    if o.releasing_since.is_none() {
                        match self.queue.trim(*p, self.config.stream_retention).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(
                                partition = p,
                                removed = n,
                                "trimmed the partition stream"
                            ),
                            Err(e) => tracing::warn!(partition = p, error = %e, "trimming failed"),
                        }
                    }
                }
            }

            let wanted: Vec<(u32, String)> = owned
                .iter()
                .filter(|(p, o)| {
                    // A blocking read delivers entries until it returns: only while still ours.
                    o.releasing_since.is_none()
                        && Instant::now() + block < o.valid_until
                        && parts.inflight[**p as usize].load(Ordering::Acquire)
                            < MAX_INFLIGHT_PER_PARTITION
                })
                .map(|(p, o)| (*p, o.cursor.clone()))
                .collect();
            let read_all_new = wanted.len() == owned.len()
                && owned.len() == parts.desired.load(Ordering::Acquire)
                && wanted.iter().all(|(_, c)| c == ">");
            let read = tokio::select! {
                r = self.queue.read(&mut conn, &self.consumer, &wanted, READ_COUNT, block) => r,
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
                    // Redis may have delivered entries whose reply was lost: they are pending
                    // for this consumer now, so re-read those before anything new.
                    for (p, _) in &wanted {
                        if let Some(o) = owned.get_mut(p) {
                            o.cursor = o.last_dispatched.clone();
                        }
                    }
                    let delay = Duration::from_millis(200 * u64::from(failures.min(25)));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {},
                        _ = shutdown.cancelled() => break,
                    }
                    if let Ok(c) = self.queue.blocking_conn(block).await {
                        conn = c;
                    }
                    continue;
                }
            };
            // Pending-mode cursors advance past what was returned; a partition with nothing more
            // pending switches to new entries, after one more claim: a previous owner that had
            // not yet noticed losing the lease may have been delivered entries meanwhile.
            for (p, cursor) in &wanted {
                let Some(o) = owned.get_mut(p) else { continue };
                if let Some(last) = entries.iter().rev().find(|e| e.partition == *p) {
                    o.last_dispatched = last.id.clone();
                }
                if cursor != ">" {
                    let last = entries.iter().rev().find(|e| e.partition == *p);
                    o.cursor = match last {
                        Some(e) => e.id.clone(),
                        None => match self.queue.claim_all_pending(*p, &self.consumer).await {
                            Ok(0) => ">".to_string(),
                            Ok(n) => {
                                tracing::info!(
                                    partition = p,
                                    claimed = n,
                                    "claimed late pending entries of the previous owner"
                                );
                                o.last_dispatched.clone()
                            }
                            Err(e) => {
                                tracing::warn!(partition = p, error = %e, "claiming pending entries failed; retrying");
                                cursor.clone()
                            }
                        },
                    };
                }
            }
            let got = entries.len();
            for e in entries {
                parts.inflight[e.partition as usize].fetch_add(1, Ordering::AcqRel);
                lanes.push(e);
            }
            // Every entry of this read is dispatched: a hand-over started before it may complete.
            epoch += 1;
            if mode == RunMode::UntilIdle && got == 0 && read_all_new && lanes.is_idle() {
                break;
            }
        }

        // Stop: drop what was read but not started (it stays pending for the next owner), finish
        // what was started, then release the leases and leave the member set.
        sampler_stop.cancel();
        let _ = sampler.await;
        for a in parts.active.iter() {
            a.store(false, Ordering::Release);
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
        for p in owned.keys() {
            if let Err(e) = leases.release(*p).await {
                tracing::warn!(partition = p, error = %e, "could not release the lease; it expires by itself");
            }
        }
        parts.owned.store(0, Ordering::Release);
        self.metrics.partitions(0, 0);
        if let Err(e) = leases.leave().await {
            tracing::warn!(error = %e, "could not leave the member set; the heartbeat expires by itself");
        }
        Ok(())
    }

    /// Heartbeat, renew owned leases, acquire newly assigned partitions and start handing over the
    /// ones no longer assigned.
    async fn rebalance(&self, leases: &Leases, owned: &mut HashMap<u32, Owned>, epoch: u64) {
        let parts = &self.parts;
        let live = match leases.heartbeat().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                vec![]
            }
        };
        // Renew; a lease that is someone else's now (or could not be renewed for a whole TTL) is
        // lost: stop touching that partition at once.
        let mut lost = vec![];
        for (p, o) in owned.iter_mut() {
            let sent = Instant::now();
            match leases.renew(*p).await {
                Ok(true) => {
                    o.renewed_at = sent;
                    o.valid_until = sent + self.validity();
                    parts.set_valid_until(*p, o.valid_until);
                }
                Ok(false) => lost.push(*p),
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "lease renewal failed");
                    if o.renewed_at.elapsed() >= self.config.lease_ttl {
                        lost.push(*p);
                    }
                }
            }
        }
        for p in lost {
            self.lose(p, owned);
        }
        if live.is_empty() {
            parts.owned.store(owned.len(), Ordering::Release);
            return;
        }
        let desired = assignment(&self.consumer, &live, self.config.partitions);
        parts.desired.store(desired.len(), Ordering::Release);
        for p in &desired {
            if owned.contains_key(p) {
                continue;
            }
            let sent = Instant::now();
            match leases.try_acquire(*p).await {
                Ok(true) => match self.queue.claim_all_pending(*p, &self.consumer).await {
                    Ok(n) => {
                        tracing::info!(
                            partition = p,
                            pending = n,
                            "acquired partition; its pending entries run first"
                        );
                        *parts.lost[*p as usize].lock().expect("lost lock") =
                            CancellationToken::new();
                        parts.set_valid_until(*p, sent + self.validity());
                        parts.active[*p as usize].store(true, Ordering::Release);
                        owned.insert(
                            *p,
                            Owned {
                                cursor: "0".into(),
                                releasing_since: None,
                                renewed_at: sent,
                                valid_until: sent + self.validity(),
                                last_dispatched: "0".into(),
                            },
                        );
                    }
                    Err(e) => {
                        tracing::warn!(partition = p, error = %e, "could not claim pending entries; releasing for now");
                        let _ = leases.release(*p).await;
                    }
                },
                Ok(false) => {} // still held by its previous owner, who hands it over soon
                Err(e) => tracing::warn!(partition = p, error = %e, "lease acquisition failed"),
            }
        }
        for (p, o) in owned.iter_mut() {
            if o.releasing_since.is_none() && !desired.contains(p) {
                tracing::info!(partition = p, "partition reassigned; handing it over");
                o.releasing_since = Some(epoch);
                parts.active[*p as usize].store(false, Ordering::Release);
            }
        }
        let n = owned
            .values()
            .filter(|o| o.releasing_since.is_none())
            .count();
        parts.owned.store(n, Ordering::Release);
        self.metrics.partitions(n, desired.len());
    }

    /// Sample the gauges of the partitions this worker consumes every [`SAMPLE_EVERY`] until `stop`.
    /// A partition it no longer consumes is reported as 0 once (its new owner reports it), so
    /// `sum by (partition)` over all workers is right.
    async fn sample_gauges(self, stop: CancellationToken) {
        let mut reported: HashSet<u32> = HashSet::new();
        loop {
            let active: Vec<u32> = (0..self.config.partitions)
                .filter(|p| self.parts.active[*p as usize].load(Ordering::Acquire))
                .collect();
            for p in reported.iter().filter(|p| !active.contains(p)) {
                self.metrics.partition(*p, Some(0), 0, Duration::ZERO);
            }
            reported = active.iter().copied().collect();
            if let Err(e) = self.record_partition_metrics(&active).await {
                tracing::debug!(error = %e, "sampling the partition gauges failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                _ = stop.cancelled() => break,
            }
        }
        for p in reported {
            self.metrics.partition(p, Some(0), 0, Duration::ZERO);
        }
    }

    /// Set the lag / pending / oldest-pending-age gauges of `partitions` and the dead-letter size
    /// gauge from Redis now.
    pub async fn record_partition_metrics(
        &self,
        partitions: &[u32],
    ) -> Result<(), crate::queue::QueueError> {
        let now = self.queue.redis_now_ms().await?;
        for p in partitions {
            let s = self.queue.partition_stats(*p, now).await?;
            self.metrics.partition(
                *p,
                s.lag,
                s.pending,
                Duration::from_millis(s.oldest_pending_age_ms.unwrap_or(0)),
            );
        }
        self.metrics.dead_letter_size(self.queue.dlq_len().await?);
        Ok(())
    }

    /// How long after sending an acquire/renew this worker may act on the partition: the TTL minus
    /// a fifth, for clock rate differences and the time the reply took.
    fn validity(&self) -> Duration {
        self.config.lease_ttl - self.config.lease_ttl / 5
    }

    /// Stop touching a partition whose lease is (or may be) someone else's: nothing of it is
    /// started any more and its running jobs stop before their next exchange call.
    fn lose(&self, p: u32, owned: &mut HashMap<u32, Owned>) {
        tracing::error!(
            partition = p,
            "lost the lease of a partition; stopped consuming it"
        );
        self.parts.active[p as usize].store(false, Ordering::Release);
        self.parts.set_valid_until(p, Instant::now());
        self.parts.lost[p as usize]
            .lock()
            .expect("lost lock")
            .cancel();
        owned.remove(&p);
    }

    /// Partitions whose lease could not be renewed in time are lost, even before Redis says so.
    fn drop_expired(&self, owned: &mut HashMap<u32, Owned>) {
        let now = Instant::now();
        let expired: Vec<u32> = owned
            .iter()
            .filter(|(_, o)| now >= o.valid_until)
            .map(|(p, _)| *p)
            .collect();
        for p in expired {
            self.lose(p, owned);
        }
    }

    /// Release partitions whose hand-over is complete: no read that could still include them is
    /// outstanding (a read finished after the hand-over began) and none of their jobs is running.
    async fn finish_handovers(&self, leases: &Leases, owned: &mut HashMap<u32, Owned>, epoch: u64) {
        let done: Vec<u32> = owned
            .iter()
            .filter(|(p, o)| {
                o.releasing_since.is_some_and(|e| epoch > e)
                    && self.parts.inflight[**p as usize].load(Ordering::Acquire) == 0
            })
            .map(|(p, _)| *p)
            .collect();
        for p in done {
            owned.remove(&p);
            match leases.release(p).await {
                Ok(_) => tracing::info!(partition = p, "handed the partition over"),
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "could not release the lease; it expires by itself")
                }
            }
        }
    }

    /// `/healthz` and `/readyz` for the worker (served on `WORKER_PORT`).
    pub fn health_router(&self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(worker_ready))
            .route("/metrics", get(crate::metrics::handler))
            .with_state(self.clone())
    }
}

async fn worker_ready(State(w): State<Worker>) -> (StatusCode, Json<serde_json::Value>) {
    let redis = w.queue.ping().await.is_ok();
    let postgres = w.store.ping().await.is_ok();
    let owned = w.parts.owned.load(Ordering::Acquire);
    let desired = w.parts.desired.load(Ordering::Acquire);
    let code = if redis && postgres && owned >= desired {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let desired = (desired != usize::MAX).then_some(desired);
    (
        code,
        Json(
            json!({"redis": redis, "postgres": postgres, "partitions_owned": owned, "partitions_assigned": desired}),
        ),
    )
}

/// A partition this worker holds the lease of.
struct Owned {
    /// `">"` for new entries, else the id after which to re-read this consumer's pending entries.
    cursor: String,
    /// Set when the partition was reassigned: the read epoch at that moment.
    releasing_since: Option<u64>,
    renewed_at: Instant,
    /// Until when this worker may still act on the partition: when the last successful
    /// acquire/renew was *sent*, plus the TTL, minus a margin. Past it the lease may be someone
    /// else's, whatever Redis has told us so far.
    valid_until: Instant,
    /// The id of the last entry of this partition handed to the lanes (to re-read own pending
    /// entries after a read whose reply was lost).
    last_dispatched: String,
}

/// Per-partition state shared by the read loop and the lanes.
struct PartState {
    /// Entries of the partition may be started (we own it and are not handing it over).
    active: Vec<AtomicBool>,
    /// Entries read and not yet finished (or dropped).
    inflight: Vec<AtomicUsize>,
    /// Cancelled when the partition's lease is lost (not on a graceful hand-over): jobs of it that
    /// are retrying stop before their next attempt and leave the entry to the next owner.
    lost: Vec<Mutex<CancellationToken>>,
    /// Until when jobs of the partition may be started (ms since `base`).
    valid_until_ms: Vec<AtomicU64>,
    base: Instant,
    /// Partitions owned / assigned (readiness).
    owned: AtomicUsize,
    desired: AtomicUsize,
}

impl PartState {
    fn set_valid_until(&self, p: u32, until: Instant) {
        let ms = until.saturating_duration_since(self.base).as_millis() as u64;
        self.valid_until_ms[p as usize].store(ms, Ordering::Release);
    }

    /// May a job of partition `p` be started now?
    fn may_start(&self, p: usize) -> bool {
        self.active[p].load(Ordering::Acquire)
            && (self.base.elapsed().as_millis() as u64)
                < self.valid_until_ms[p].load(Ordering::Acquire)
    }

    fn new(partitions: u32) -> Self {
        PartState {
            active: (0..partitions).map(|_| AtomicBool::new(false)).collect(),
            inflight: (0..partitions).map(|_| AtomicUsize::new(0)).collect(),
            lost: (0..partitions)
                .map(|_| Mutex::new(CancellationToken::new()))
                .collect(),
            valid_until_ms: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            base: Instant::now(),
            owned: AtomicUsize::new(0),
            desired: AtomicUsize::new(usize::MAX),
        }
    }
}

/// Per-user FIFO lanes. A lane exists (is in the map) exactly while one task drives it.
struct Lanes {
    queues: Arc<Mutex<HashMap<Uuid, VecDeque<Entry>>>>,
    permits: Arc<Semaphore>,
    processor: Arc<Processor>,
    parts: Arc<PartState>,
    tracker: TaskTracker,
}

impl Lanes {
    fn new(concurrency: usize, processor: Arc<Processor>, parts: Arc<PartState>) -> Self {
        Lanes {
            queues: Arc::default(),
            permits: Arc::new(Semaphore::new(concurrency)),
            processor,
            parts,
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
        let parts = self.parts.clone();
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
                // Not ours any more (handed over, lost, shutting down): leave it pending for the
                // next owner, which claims it before anything newer of this user.
                if parts.may_start(partition) {
                    if let Ok(_permit) = permits.acquire().await {
                        // Waiting for the permit may have taken a while: ask again.
                        if parts.may_start(partition) {
                            let lost = parts.lost[partition].lock().expect("lost lock").clone();
                            processor.process(next, lost).await;
                        }
                    }
                }
                parts.inflight[partition].fetch_sub(1, Ordering::AcqRel);
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

    async fn process(&self, entry: Entry, lost: CancellationToken) {
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
                    self.metrics.dead_lettered("dead", "poison".into());
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
        self.process_job(&entry, &job, &lost).instrument(span).await
    }

    async fn process_job(&self, entry: &Entry, job: &Job, lost: &CancellationToken) {
        let begin = self
            .until_ok("recording the job start", || {
                self.store.begin_job(job, entry.partition, &entry.id)
            })
            .await;
        let attempt = match begin {
            None => return, // shutting down; the entry stays pending
            Some(Begin::Finished(status)) => {
                tracing::info!(%status, "job already finished; acknowledging the redelivered entry");
                // A failed job's dead-letter record is written after its commit: a worker that died
                // in between left the entry pending, so write the record (again) before the ack.
                // The dead-letter stream is at-least-once; the job row is the record of truth.
                if status == "rejected" || status == "dead" {
                    let row = self
                        .until_ok("reading the finished job", || {
                            self.store.get_job(job.job_id)
                        })
                        .await;
                    let Some(Some(row)) = row else { return };
                    let outcome = Outcome {
                        error_class: row.error_class.clone(),
                        ..Outcome::new(
                            if status == "dead" {
                                JobStatus::Dead
                            } else {
                                JobStatus::Rejected
                            },
                            row.error.clone().unwrap_or_default(),
                        )
                    };
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
                return;
            }
            Some(Begin::Execute { attempt }) => attempt,
        };
        let outcome = if attempt > self.max_deliveries as i32 {
            // Delivered again and again without reaching a final state (each delivery died or was
            // cut off mid-way): stop the loop, keep it for an operator.
            Some(Outcome::failed(
                JobStatus::Dead,
                "poison",
                format!(
                    "poison: delivered {attempt} times without finishing (SPARKY_MAX_DELIVERIES={})",
                    self.max_deliveries
                ),
            ))
        } else {
            self.run_job(job, attempt, entry.replay.as_ref(), lost)
                .await
        };
        let outcome = match outcome {
            Some(o) => o,
            None => return,
        };
        if !self.commit(job, &outcome, attempt).await {
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
            self.metrics.dead_lettered(
                outcome.status.as_str(),
                outcome.error_class.clone().unwrap_or_default(),
            );
        }
        self.ack(entry).await;
        let exchange = job.alert.exchange.as_str();
        let since_accept = (Utc::now() - job.accepted_at).to_std().unwrap_or_default();
        self.metrics
            .job_finished(outcome.status.as_str(), exchange, since_accept);
        self.metrics.exchange_retries(exchange, retries(&outcome));
        let latency_ms = (Utc::now() - job.accepted_at).num_milliseconds();
        tracing::info!(
            status = outcome.status.as_str(),
            // Not `message`: in JSON logs that would collide with the line's own message.
            detail = outcome.message.as_deref().unwrap_or(""),
            fills = outcome.fills.len(),
            attempt,
            latency_ms,
            "job finished"
        );
    }

    /// Execute the job; `None` when shutting down mid-way or when the partition's lease was lost
    /// (the entry stays pending for the next owner).
    async fn run_job(
        &self,
        job: &Job,
        attempt: i32,
        replay: Option<&Replay>,
        lost: &CancellationToken,
    ) -> Option<Outcome> {
        let a = &job.alert;
        if !replay.is_some_and(|r| r.allow_stale) {
            if let Some(why) = would_be_stale(job, self.max_signal_age, Utc::now()) {
                return Some(Outcome::failed(
                    JobStatus::Dead,
                    "stale",
                    format!("stale: {why}"),
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
            Ok(c) => Metered::new(c, self.metrics.clone(), job.accepted_at),
            Err(e) => {
                return Some(Outcome::failed(
                    JobStatus::Rejected,
                    e.class.as_str(),
                    e.message,
                ))
            }
        };
        tracing::info!("✅ Created {exchange} executor for user {}", a.user_id);
        // A redelivery or a replay may follow orders that were placed: look legs up first.
        let recover = attempt > 1 || replay.is_some();
        // A shutdown does not interrupt an order in flight (it is given the drain timeout); losing
        // the lease stops further retries, since the next owner may already be running this job.
        let outcome = executor::execute_until(&client, job, recover, &self.policy, lost).await;
        if outcome.is_none() {
            tracing::warn!(
                "lease lost while retrying; leaving the job to the partition's next owner"
            );
        }
        outcome
    }

    /// Commit the outcome; `false` if shutting down before it could be committed, or if another
    /// delivery of the job started meanwhile (then nothing is recorded and the entry is not acked).
    async fn commit(&self, job: &Job, outcome: &Outcome, attempt: i32) -> bool {
        let mut delay = Duration::from_millis(100);
        let mut statement_failures = 0;
        loop {
            match self.store.finish_job(job, outcome, attempt).await {
                Ok(()) => return true,
                Err(e @ StoreError::Superseded(_)) => {
                    // Another worker owns the job now; its entry is its to ack.
                    tracing::warn!(error = %e, "not recording a superseded delivery");
                    return false;
                }
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
                        return Box::pin(self.commit(job, &dead, attempt)).await;
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

/// How many times the executor retried a transient or unknown exchange failure for `o`: each such
/// failure in the history was retried, except the last one of a job that gave up (`dead` with that
/// class).
fn retries(o: &Outcome) -> u64 {
    let retriable = |c: &str| c == "transient" || c == "unknown";
    let failures = o.history.iter().filter(|h| retriable(&h.class)).count() as u64;
    let gave_up = o.status == JobStatus::Dead && o.error_class.as_deref().is_some_and(retriable);
    failures.saturating_sub(u64::from(gave_up))
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
