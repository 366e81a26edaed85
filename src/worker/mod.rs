//! The worker: reads the partitions it owns, runs each job, commits, then acks.
//!
//! The story, one file each:
//! - [`crate::partition`]: which partitions this worker owns, until when, and where their reads
//!   stand (one state machine per partition, driven by its own keeper task);
//! - [`read_loop`]: `XREADGROUP` over the readable partitions; history passes after a takeover or a
//!   lost reply, then new entries; each entry taken into the table and queued on its user's lane;
//! - [`lanes`]: per-user FIFO lanes: one user's jobs strictly one after another, users in parallel
//!   (bounded by `SPARKY_WORKER_CONCURRENCY`); a panic is contained to its job;
//! - [`job`]: one job's steps, begin -> execute -> commit -> dead-letter -> ack;
//! - [`health`] and [`gauges`]: `/healthz`, `/readyz`, `/metrics` and the partition gauges.
//!
//! # Never lose, never repeat, never reorder
//! - An entry is acked only after its job's final state is committed in Postgres. If Postgres or
//!   Redis is unavailable the worker waits and retries ([`crate::retry`]); the entry stays pending.
//! - `jobs.job_id` makes a redelivered finished entry a no-op (acked, not executed); a redelivered
//!   started one runs in recovery mode (each leg looked up by client order id before it is placed).
//! - One user's entries are queued on one lane in stream order; a partition's entries are taken
//!   only under the ownership that read them, and a partition lost with entries still queued is
//!   acquired again only once they are dropped, so re-read copies never run behind newer ones.
//! - No input, broker reply or database answer stops a lane: bad alerts are refused at the ingress
//!   and checked again here, sizing arithmetic is checked, a panic in a job ends that job `dead`
//!   (`internal`), and a database that refuses a job's data ends it `dead` (`database`) after
//!   `SPARKY_MAX_DELIVERIES` tries.

mod gauges;
mod health;
mod job;
mod lanes;
mod read_loop;
pub mod sweep;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::exchanges::ExchangeFactory;
use crate::metrics::Metrics;
use crate::partition::{Leases, Table};
use crate::queue::Queue;
use crate::store::Store;

pub use job::JobRunner;

/// Everything a worker needs; built once by [`Worker::connect`].
#[derive(Clone)]
pub struct Worker {
    pub config: Config,
    pub store: Store,
    pub queue: Queue,
    pub consumer: String,
    pub metrics: Metrics,
    runner: Arc<JobRunner>,
    table: Arc<Table>,
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
    /// Connect to Postgres and Redis and run the start-up checks (timing, migrations, partition
    /// count, Redis durability).
    pub async fn connect(config: Config, shutdown: CancellationToken) -> anyhow::Result<Worker> {
        config.check_worker_timing()?;
        let store = Store::connect_retrying(
            &config.database_url,
            (config.worker_concurrency as u32 + 2).min(32),
        )
        .await?;
        store.check_migrated().await?;
        let queue = Queue::from_config(&config, Duration::from_secs(5)).await?;
        queue.check_partitions().await?;
        for w in queue.durability_warnings().await {
            tracing::warn!("{w}");
        }
        queue.ensure_groups().await?;
        Ok(Worker::new(config, store, queue, shutdown))
    }

    pub fn new(config: Config, store: Store, queue: Queue, shutdown: CancellationToken) -> Worker {
        let runner = JobRunner::new(&config, store.clone(), queue.clone(), shutdown);
        Worker::with_runner(config, store, queue, runner)
    }

    /// A worker whose exchange clients come from `factory` (tests inject clients that panic or
    /// block; the real factory is the `ExchangeContext`).
    pub fn with_exchanges(
        config: Config,
        store: Store,
        queue: Queue,
        shutdown: CancellationToken,
        factory: Arc<dyn ExchangeFactory>,
    ) -> Worker {
        let runner =
            JobRunner::new(&config, store.clone(), queue.clone(), shutdown).with_exchanges(factory);
        Worker::with_runner(config, store, queue, runner)
    }

    fn with_runner(config: Config, store: Store, queue: Queue, runner: JobRunner) -> Worker {
        let metrics = Metrics::new(&config.namespace);
        let consumer = format!("worker-{}", Uuid::now_v7().simple());
        let leases = Leases::new(
            queue.clone(),
            consumer.clone(),
            config.lease_ttl.as_millis() as u64,
        );
        let table = Arc::new(Table::new(
            leases,
            queue.clone(),
            metrics.clone(),
            config.partitions,
            config.lease_validity(),
            config.exchange_timeout,
        ));
        let runner = Arc::new(runner);
        Worker {
            consumer,
            metrics,
            config,
            store,
            queue,
            runner,
            table,
        }
    }

    /// Reconcile the accounts of `user` (or of every user with something to reconcile) with their
    /// brokers now, outside the lanes (`sparky reconcile`, tests): see [`crate::reconcile`] for why
    /// that is safe next to running jobs.
    pub async fn reconcile(
        &self,
        user: Option<Uuid>,
    ) -> Result<Vec<crate::reconcile::AccountReport>, crate::store::StoreError> {
        sweep::reconcile_users(&self.runner, user).await
    }

    /// The partition table (tests and status read it).
    pub fn partitions(&self) -> &Table {
        &self.table
    }

    /// Consume the partitions this worker owns until shutdown (or until idle). A worker runs once:
    /// it stops acquiring when it stops, so build a new one to run again. On the way out:
    /// start nothing new, finish the started jobs (within `drain_timeout`; the others stay
    /// pending), release the leases and leave, so other workers take over at once.
    pub async fn run(&self, mode: RunMode, drain_timeout: Duration) -> anyhow::Result<()> {
        let shutdown = self.runner.shutdown().clone();
        let background = CancellationToken::new();
        let keeper = tokio::spawn({
            let table = self.table.clone();
            let stop = background.clone();
            async move { table.keep(stop).await }
        });
        let sampler = tokio::spawn(self.clone().sample_gauges(background.clone()));
        let lanes = Arc::new(lanes::Lanes::new(
            self.config.worker_concurrency,
            self.runner.clone(),
            self.table.clone(),
        ));
        let sweeper = (!self.config.reconcile_interval.is_zero()).then(|| {
            tokio::spawn(sweep::sweep_loop(
                self.runner.clone(),
                self.table.clone(),
                lanes.clone(),
                self.config.partitions,
                self.config.reconcile_interval,
                background.clone(),
            ))
        });
        let read = read_loop::ReadLoop::new(self, &lanes, mode)
            .run(&shutdown)
            .await;

        self.table.stop_starting();
        if let Some(sweeper) = sweeper {
            sweeper.abort();
            let _ = sweeper.await;
        }
        lanes.close();
        if tokio::time::timeout(drain_timeout, lanes.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "in-flight jobs did not finish within {drain_timeout:?}; their entries stay pending and are redelivered"
            );
        }
        background.cancel();
        let _ = keeper.await;
        let _ = sampler.await;
        self.table.release_all().await;
        read
    }
}
