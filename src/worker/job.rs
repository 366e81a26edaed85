//! One job's path, as explicit steps: **begin -> execute -> commit -> dead-letter -> ack**.
//!
//! - *begin*: the bounds the ingress enforces are checked again (replayed and old entries), then
//!   the delivery is recorded (`begin_job`, written together with the starts of the other lanes
//!   waiting at the same time: `store::Begins`; the attempt number fences the commit). A job that
//!   already finished is acked (its dead-letter record written again first if it failed). A paper
//!   job's first delivery records its start with its commit instead ([`Start`]).
//! - *execute*: a job that never started and is too old is `dead` (`stale`) without running; a
//!   started one (a redelivery) always runs, in recovery mode, so an order it placed is found and
//!   recorded rather than called "not executed". Execution runs inside the partition's fence (no
//!   broker request once the lease could have moved) and a panic in it ends the job `dead`
//!   (`internal`).
//! - *commit*: one statement, so one transaction (job status, trades, broker orders, position,
//!   notification: `store::commit`), fenced by the attempt (or, without a recorded start, by the
//!   job having no row yet).
//! - *dead-letter*: `rejected` and `dead` jobs are written to `{ns}:dlq` after the commit.
//! - *ack*: last, so a crash anywhere before leaves the entry pending and it is redelivered.
//!
//! Every infrastructure step waits out an unavailable Redis or Postgres ([`crate::retry`]); a
//! database that *refuses* a job's data (SQLSTATE classes 22, 23, ...) is tried at most
//! `SPARKY_MAX_DELIVERIES` times, then the job ends `dead` (`database`): never an endless loop.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::config::Config;
use crate::credentials::{CredentialError, CredentialLoader, Credentials};
use crate::domain::{Account, CredentialEnv, ExchangeKind, Job};
use crate::exchanges::metered::Metered;
use crate::exchanges::{Exchange, ExchangeContext, ExchangeFactory};
use crate::executor::{self, Outcome, PositionChange, RetryPolicy};
use crate::job::{FailureClass, JobStatus};
use crate::metrics::{JobPhase, Metrics};
use crate::partition::Fence;
use crate::queue::{Entry, Queue};
use crate::replay::would_be_stale;
use crate::retry::{retry, until_ok, Retried};
use crate::risk::{self, RiskLimits};
use crate::store::{Begin, Begins, FirstStart, Holds, Store, StoreError};
use std::sync::Arc;
use tokio::sync::SemaphorePermit;

/// Runs jobs; shared by every lane of a worker.
pub struct JobRunner {
    store: Store,
    /// Job starts recorded before the job executes, written together with those of the other
    /// lanes ([`Begins`]); not a paper job's first delivery's ([`Start`]).
    begins: Begins,
    queue: Queue,
    credentials: CredentialLoader,
    exchanges: Arc<dyn ExchangeFactory>,
    policy: RetryPolicy,
    max_signal_age: Duration,
    max_deliveries: u32,
    /// Paper jobs that may run their statements on one held connection at once, each kept for
    /// the next job ([`Holds`]): half the pool's connections.
    holds: Holds,
    shutdown: CancellationToken,
    metrics: Metrics,
}

/// Whether this delivery's start is written with its commit instead of before it executes
/// (issue 17, step 10): a paper job's first delivery.
///
/// A start written before the job executes is what makes a delivery that died after sending an
/// order known as started, so the next delivery looks the order up instead of sending it again;
/// and it counts deliveries toward the poison limit. At the paper exchange nothing happens
/// outside this database: the paper order *is* the job's commit. So a paper job's first delivery
/// (its entry never delivered before: nothing of it can have happened) executes without a
/// recorded start, and its commit inserts the job's row with its outcome in one statement
/// ([`Store::finish_first`]): one statement and one transaction per paper job instead of two.
/// - **Exactly once.** The insert is `ON CONFLICT DO NOTHING` and every other part of the
///   statement depends on it: if the job has a row (a late begin of a previous owner, a duplicate
///   entry, a replay), nothing is written and the delivery takes the usual path (a recorded start,
///   in recovery mode, where the paper exchange finds any order committed meanwhile). Two
///   deliveries can never both record: the usual commit needs its own start's row, this one needs
///   there to be none.
/// - **Poison.** A first delivery that kills the process leaves no row; its redelivery (read
///   from the pending list, so not a first delivery) records its start as usual. A paper job that
///   kills every worker is stopped after `SPARKY_MAX_DELIVERIES` + 1 deliveries instead of
///   `SPARKY_MAX_DELIVERIES`.
/// - **What is not seen:** the job's row in state `executing` while it runs (a few milliseconds;
///   the user API shows it once it is final), and its `start` phase in the metrics.
/// - Replays (`sparky replay` sets the row back to `queued`) and redeliveries record their start.
fn starts_with_its_commit(entry: &Entry, job: &Job, exchanges: &dyn ExchangeFactory) -> bool {
    entry.first_delivery
        && entry.replay.is_none()
        && exchanges.orders_are_commits(job.alert.exchange)
}

/// How a delivery's start is recorded ([`starts_with_its_commit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// Before the job executes, as this attempt ([`Store::begin_job`]): the attempt fence.
    Recorded(i32),
    /// With the job's outcome, as attempt 1 started at this instant ([`Store::finish_first`]).
    WithTheCommit(Instant),
}

impl Start {
    fn attempt(self) -> i32 {
        match self {
            Start::Recorded(attempt) => attempt,
            Start::WithTheCommit(_) => 1,
        }
    }
}

/// A job whose outcome is recorded in Postgres, its entry not yet dead-lettered or acked.
struct Recorded {
    outcome: Outcome,
    attempt: i32,
}

/// How the *commit* step ended.
enum Committed {
    /// This outcome (or the `dead` one that replaced a refused outcome) is the job's record.
    Recorded(Outcome),
    /// Another delivery of the job started after this one: nothing recorded, nothing acked.
    Superseded,
    Shutdown,
}

/// Why one commit attempt did not record.
enum Commit {
    Refused(StoreError),
    Superseded,
    Shutdown,
}

/// How the *begin* step ended.
enum Began {
    Run {
        attempt: i32,
        /// The risk limits read with the start (see [`Begin::Execute`]).
        limits: Option<Vec<RiskLimits>>,
    },
    AlreadyFinished(JobStatus),
    /// Postgres refused the job's data `SPARKY_MAX_DELIVERIES` times.
    Unstorable(StoreError),
    Shutdown,
}

impl JobRunner {
    pub(super) fn new(
        config: &Config,
        store: Store,
        queue: Queue,
        shutdown: CancellationToken,
    ) -> JobRunner {
        let metrics = Metrics::new(&config.namespace);
        let keys = config.master_key.iter().cloned().collect();
        JobRunner {
            credentials: CredentialLoader::new(
                store.clone(),
                queue.clone(),
                config.credential_cache_ttl,
                keys,
            ),
            exchanges: Arc::new(ExchangeContext::new(config, store.clone())),
            policy: RetryPolicy {
                max_retries: config.exchange_retries,
                max_total: config.exchange_retry_max,
                ..RetryPolicy::default()
            },
            max_signal_age: config.max_signal_age,
            max_deliveries: config.max_deliveries,
            holds: Holds::new(store.max_connections() as usize / 2),
            begins: Begins::new(store.clone()),
            store,
            queue,
            shutdown,
            metrics,
        }
    }

    /// Build exchange clients with `factory` instead of the real ones.
    pub(super) fn with_exchanges(mut self, factory: Arc<dyn ExchangeFactory>) -> JobRunner {
        self.exchanges = factory;
        self
    }

    /// Has Postgres refused the job's data for good: a data error, `SPARKY_MAX_DELIVERIES` times?
    /// (Every other database error is waited out.)
    fn refused_for_good(&self, e: &StoreError, tries: u32) -> bool {
        e.is_data_error() && tries >= self.max_deliveries
    }

    pub(super) fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub(super) fn store(&self) -> &Store {
        &self.store
    }

    pub(super) fn queue(&self) -> &Queue {
        &self.queue
    }

    pub(super) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Process one entry to the end (or until shutdown / the loss of its partition, when it stays
    /// pending). `permit` is the lane's share of `SPARKY_WORKER_CONCURRENCY`: it is given back
    /// once the job is recorded, before the entry is dead-lettered and acked, which wait on Redis
    /// only (so another lane's job starts meanwhile; this lane's next job still waits for the ack).
    /// `queued`: when the read loop queued the entry on its lane (the `waiting` phase ends now).
    pub(super) async fn process(
        &self,
        entry: Entry,
        fence: Fence,
        permit: SemaphorePermit<'_>,
        queued: Instant,
    ) {
        let job = match &entry.job {
            Ok(job) => job.clone(),
            Err(reason) => return self.unreadable(&entry, reason).await,
        };
        self.phase(&job, JobPhase::Waiting, queued);
        let span = tracing::info_span!(
            "job",
            job_id = %job.job_id,
            user_id = %job.alert.user_id,
            exchange = %job.alert.exchange,
            partition = entry.partition,
        );
        let run = self
            .process_job(&entry, &job, &fence)
            .instrument(span.clone());
        // A paper job waits on nothing but Postgres: its statements share one connection, kept
        // for the next paper job (no release ping). A job at a remote broker gives its connection
        // back between statements, as it waits on the broker in between.
        let recorded = if job.alert.exchange.is_in_postgres() {
            self.holds.run(run).await
        } else {
            run.await
        };
        drop(permit);
        if let Some(recorded) = recorded {
            let settling = Instant::now();
            self.settle(&entry, &job, recorded).instrument(span).await;
            self.phase(&job, JobPhase::Settle, settling);
        }
    }

    /// Record that `phase` of `job` ran from `since` until now.
    fn phase(&self, job: &Job, phase: JobPhase, since: Instant) {
        self.metrics
            .job_phase(job.alert.exchange.as_str(), phase, since.elapsed());
    }

    /// The job up to its commit: `Some` once its outcome is recorded (then [`JobRunner::settle`]),
    /// `None` when it ended otherwise (acked here, or left pending).
    async fn process_job(&self, entry: &Entry, job: &Job, fence: &Fence) -> Option<Recorded> {
        if let Err(errors) = job.alert.check_bounds() {
            let message = errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            let outcome = Outcome::failed(
                JobStatus::Dead,
                FailureClass::Invalid,
                format!("the alert breaks the webhook's bounds: {message}"),
            );
            self.finish_unrecorded(entry, job, &outcome).await;
            return None;
        }

        let mut rerun = false;
        let mut with_the_commit = starts_with_its_commit(entry, job, &*self.exchanges);
        let (recorded, attempt) = loop {
            let (start, limits) = if with_the_commit {
                // Read with the job's stored position before it opens (`limits_with_position`).
                (Start::WithTheCommit(Instant::now()), None)
            } else {
                let (attempt, limits) = self.begin_recorded(entry, job).await?;
                (Start::Recorded(attempt), limits)
            };
            let attempt = start.attempt();
            // The begin may have waited (Postgres slow or down) past this ownership's validity;
            // another worker may own the job now.
            if fence.is_void() {
                return None;
            }
            let executing = Instant::now();
            let Some(outcome) = self
                .execute(entry, job, attempt, fence, rerun, limits)
                .await
            else {
                return None; // shutting down, or the partition was lost: the entry stays pending
            };
            self.phase(job, JobPhase::Execute, executing);
            let committing = Instant::now();
            let committed = self.commit(job, entry, outcome, start).await;
            self.phase(job, JobPhase::Commit, committing);
            match committed {
                Committed::Recorded(o) => break (o, attempt),
                Committed::Superseded if !fence.is_void() => {
                    // Another delivery recorded this job meanwhile (a previous owner's late begin
                    // overtook this one, or the job had a row this delivery's one-statement commit
                    // did not expect) while this worker still owns the partition: the job is this
                    // worker's to finish. Run it again from a recorded start (in recovery mode: the
                    // attempt grew), so its entry is not left behind.
                    tracing::warn!(
                        "another delivery recorded this job meanwhile; running it again"
                    );
                    // A start this delivery recorded was counted toward the poison limit
                    // already; one it did not record was not: the begin's attempt decides.
                    rerun = matches!(start, Start::Recorded(_));
                    with_the_commit = false;
                }
                Committed::Superseded | Committed::Shutdown => return None,
            }
        };
        Some(Recorded {
            outcome: recorded,
            attempt,
        })
    }

    /// The begin step: the delivery's start recorded before it executes, as its attempt and the
    /// risk limits read with it. `None` when the job ended here (already finished, or Postgres
    /// refuses it: dead-lettered and acked) or shutdown came first.
    async fn begin_recorded(
        &self,
        entry: &Entry,
        job: &Job,
    ) -> Option<(i32, Option<Vec<RiskLimits>>)> {
        let starting = Instant::now();
        let began = self.begin(entry, job).await;
        self.phase(job, JobPhase::Start, starting);
        match began {
            Began::Run { attempt, limits } => Some((attempt, limits)),
            Began::AlreadyFinished(status) => {
                self.finished_before(entry, job, status).await;
                None
            }
            Began::Unstorable(e) => {
                let outcome = Outcome::failed(
                    JobStatus::Dead,
                    FailureClass::Database,
                    format!("Postgres refused to record the job: {e}"),
                );
                self.finish_unrecorded(entry, job, &outcome).await;
                None
            }
            Began::Shutdown => None,
        }
    }

    /// A recorded job's last steps: dead-letter it if it failed, ack its entry, report it.
    async fn settle(&self, entry: &Entry, job: &Job, recorded: Recorded) {
        let Recorded { outcome, attempt } = recorded;
        if outcome.status.is_failure() && !self.dead_letter(job, entry, &outcome).await {
            return;
        }
        self.ack(entry).await;
        self.report(job, &outcome, attempt);
    }

    // ---- begin ----

    /// What the worker's start writer did (for the metrics).
    pub(super) fn begin_stats(&self) -> &crate::store::BeginStats {
        self.begins.stats()
    }

    async fn begin(&self, entry: &Entry, job: &Job) -> Began {
        let r = retry(
            "recording the job start",
            &self.shutdown,
            |e: &StoreError, tries| self.refused_for_good(e, tries),
            || self.begins.begin(job, entry.partition, &entry.id),
        )
        .await;
        match r {
            Retried::Ok(Begin::Execute { attempt, limits }) => Began::Run { attempt, limits },
            Retried::Ok(Begin::Finished(status)) => Began::AlreadyFinished(status),
            Retried::GaveUp { error, .. } => Began::Unstorable(error),
            Retried::Shutdown => Began::Shutdown,
        }
    }

    /// A redelivered entry whose job already finished. A failed job's dead-letter record is
    /// written after its commit: a worker that died in between left the entry pending, so write
    /// the record (again) before the ack. The stream is at-least-once; the job row is the record
    /// of truth.
    async fn finished_before(&self, entry: &Entry, job: &Job, status: JobStatus) {
        tracing::info!(%status, "job already finished; acknowledging the redelivered entry");
        if status.is_failure() {
            let row = match retry(
                "reading the finished job",
                &self.shutdown,
                |e: &StoreError, tries| self.refused_for_good(e, tries),
                || self.store.get_job(job.job_id),
            )
            .await
            {
                Retried::Ok(row) => row,
                Retried::Shutdown => return,
                Retried::GaveUp { error, .. } => {
                    // Final already; its row cannot be read back for the record: just ack.
                    tracing::error!(%error, "the finished job's row cannot be read; acknowledging without a dead-letter record");
                    None
                }
            };
            let Some(row) = row else {
                // The row was deleted (an operator's clean-up): nothing to write, just ack.
                return self.ack(entry).await;
            };
            let outcome = Outcome {
                error_class: row.error_class,
                ..Outcome::new(status, row.error.unwrap_or_default())
            };
            if !self.dead_letter(job, entry, &outcome).await {
                return;
            }
        }
        self.ack(entry).await;
    }

    // ---- execute ----

    /// Decide whether to run the job, and run it. `None`: shutting down or the partition's lease
    /// was lost mid-way (the entry stays pending for the next owner).
    /// `rerun`: this delivery already ran the job once and was overtaken (see `process_job`): it
    /// runs again in recovery mode, and neither the poison limit nor staleness applies to it.
    async fn execute(
        &self,
        entry: &Entry,
        job: &Job,
        attempt: i32,
        fence: &Fence,
        rerun: bool,
        limits: Option<Vec<RiskLimits>>,
    ) -> Option<Outcome> {
        if attempt > self.max_deliveries as i32 && !rerun {
            // Delivered again and again without reaching a final state (each delivery died or was
            // cut off mid-way): stop the loop, keep it for an operator, and record what its earlier
            // deliveries did at the broker (looked up, nothing sent).
            let poison = Outcome::failed(
                JobStatus::Dead,
                FailureClass::Poison,
                format!(
                    "poison: delivered {attempt} times without finishing (SPARKY_MAX_DELIVERIES={})",
                    self.max_deliveries
                ),
            );
            let look_up = async {
                match self.client_for(job).await? {
                    Ok((client, environment)) => {
                        executor::record_placed(&client, job, poison.clone(), &self.policy, fence)
                            .await
                            .map(|o| Outcome { environment, ..o })
                    }
                    Err(_) => Some(poison.clone()),
                }
            };
            return match AssertUnwindSafe(fence.scope(look_up)).catch_unwind().await {
                Ok(outcome) => outcome,
                Err(_) => Some(poison),
            };
        }
        let replay = entry.replay.as_ref();
        // Staleness applies only to the first start (of the job, or of its replay): a redelivery
        // may follow orders that were placed, and must find and record them.
        let allow_stale = replay.is_some_and(|r| r.allow_stale);
        if attempt == 1 && !allow_stale && !rerun {
            if let Some(why) = would_be_stale(job, self.max_signal_age, Utc::now()) {
                return Some(Outcome::failed(
                    JobStatus::Dead,
                    FailureClass::Stale,
                    format!("stale: {why}"),
                ));
            }
        }
        let recover = attempt > 1 || replay.is_some() || rerun;
        let run = fence.scope(self.run_on_exchange(job, recover, fence, limits));
        match AssertUnwindSafe(run).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(panic) => {
                let msg = panic_message(&*panic);
                tracing::error!(panic = %msg, "the job's execution panicked; it ends dead (internal)");
                Some(Outcome::failed(
                    JobStatus::Dead,
                    FailureClass::Internal,
                    format!("internal error: the job's execution panicked ({msg}); a replay looks up any order it placed before sending anything"),
                ))
            }
        }
    }

    /// `limits`: the risk limits read with the job's start, used by the first evaluation (a
    /// retried one, after Postgres was away, reads them again).
    async fn run_on_exchange(
        &self,
        job: &Job,
        recover: bool,
        fence: &Fence,
        mut limits: Option<Vec<RiskLimits>>,
    ) -> Option<Outcome> {
        let (client, environment) = match self.client_for(job).await? {
            Ok(c) => c,
            Err(outcome) => return Some(outcome),
        };
        let account = Account {
            user_id: job.alert.user_id,
            exchange: job.alert.exchange,
            environment,
        };
        // Risk limits, before the job's open: on its first run, and on a redelivery or replay
        // that finds no open of the job at the broker (close legs it finds may be those of a
        // blocked reversal: `blocked` records them). One that finds its open is finishing what
        // was placed, and one whose broker cannot say runs on to the executor, which looks
        // everything up again: neither is evaluated again. A close is never blocked, so it is
        // not looked up for this.
        let check = !recover
            || job.alert.action.side().is_none()
            || executor::open_placed_before(&client, job, &self.policy, fence).await == Some(false);
        if check {
            let verdict = retry(
                "evaluating the risk limits",
                &self.shutdown,
                |_: &StoreError, _| false,
                || {
                    let read = limits.take();
                    async {
                        let limits = match read {
                            Some(limits) => Some(limits),
                            None => self.limits_with_position(&client, job, &account).await?,
                        };
                        risk::check(&self.store, &client, job, limits).await
                    }
                },
            )
            .await;
            match verdict {
                Retried::Ok(risk::Verdict::Allow) => {}
                Retried::Ok(risk::Verdict::Block(block)) => {
                    let outcome = self.blocked(&client, job, &account, block, recover, fence);
                    return outcome.await.map(|o| Outcome { environment, ..o });
                }
                Retried::GaveUp { .. } | Retried::Shutdown => return None,
            }
            if fence.is_void() {
                return None; // Postgres was away longer than the lease: the next owner runs it
            }
        }
        // A redelivered close that finds the broker flat records what an earlier delivery closed
        // against Sparky's record of the position (read for a redelivered close only).
        let closed = if recover && job.alert.action.side().is_none() {
            self.recorded_position(&account, job).await
        } else {
            None
        };
        let outcome =
            executor::execute_until(&client, job, recover, closed, &self.policy, fence).await;
        if outcome.is_none() {
            tracing::warn!("lease lost; leaving the job to the partition's next owner");
        }
        outcome.map(|o| Outcome { environment, ..o })
    }

    /// A paper buy or sell's risk limits, read with the account's stored position in one
    /// statement (issue 17), the position primed into its client (the paper exchange reads it no
    /// more for this job: only this user's jobs, one at a time, change it). Called when the
    /// evaluation has no limits read with the job's start: a first delivery (which records no
    /// start), and every retried evaluation. `None` for any other job, and when the statement
    /// fails other than by an outage: the risk check then reads the limits itself (and decides on
    /// its error as it always does).
    async fn limits_with_position(
        &self,
        client: &Metered,
        job: &Job,
        account: &Account,
    ) -> Result<Option<Vec<RiskLimits>>, StoreError> {
        let a = &job.alert;
        if !a.exchange.is_in_postgres() || !risk::limits_apply(a.action) {
            return Ok(None);
        }
        let read = self
            .store
            .limits_and_position(a.user_id, a.strategy.as_deref(), account, a.symbol.as_str())
            .await;
        match read {
            Ok((limits, stored)) => {
                client.prime_stored_position(&a.symbol, stored);
                Ok(Some(limits))
            }
            Err(e) if e.is_outage() => Err(e),
            Err(_) => Ok(None),
        }
    }

    /// Sparky's record of the position `job` closes in `account` (read as every step reads,
    /// waiting out an outage); `None` when there is none or the read gave up (a close found at a
    /// flat broker is then recorded as a long's, the most anything tells without it).
    async fn recorded_position(
        &self,
        account: &Account,
        job: &Job,
    ) -> Option<executor::ClosedPosition> {
        let read = retry(
            "reading the recorded position",
            &self.shutdown,
            |_: &StoreError, _| false,
            || self.store.position(account, job.alert.symbol.as_str()),
        )
        .await;
        match read {
            Retried::Ok(p) => p.map(|p| executor::ClosedPosition {
                side: p.side,
                entry: Some(p.entry_price),
            }),
            Retried::GaveUp { .. } | Retried::Shutdown => None,
        }
    }

    /// A job a risk rule blocked: `blocked` with the rule and the numbers. Closing is never
    /// blocked: a reversal (an open against a position on the other side) still closes that
    /// position, and the job records the close. `recover`: an earlier delivery of the job may have
    /// sent some of that close (it was blocked too, and died before its commit): the close is
    /// looked up leg by leg and what it filled recorded, also when the position is flat by now
    /// ([`executor::closes_placed_before`]).
    async fn blocked(
        &self,
        client: &Metered,
        job: &Job,
        account: &Account,
        block: risk::Block,
        recover: bool,
        fence: &Fence,
    ) -> Option<Outcome> {
        tracing::warn!(rule = %block.rule, detail = %block.detail, "a risk limit blocked the job");
        self.metrics.job_blocked(block.rule);
        let blocked = Outcome::failed(JobStatus::Blocked, FailureClass::Risk, block.to_string());
        let Some(side) = job.alert.action.side() else {
            return Some(blocked);
        };
        let position = match client.position(&job.alert.symbol).await {
            Ok(p) => p,
            Err(e) => {
                return Some(Outcome {
                    message: Some(format!(
                        "{block}; the position could not be read ({e}), so nothing was closed"
                    )),
                    ..blocked
                })
            }
        };
        let closing = match &position {
            Some(p) if p.side != side => p.side,
            // Flat: an earlier delivery, blocked too, may have closed the old side under this
            // job's close ids before it died.
            None if recover => {
                let closed = side.opposite();
                // The entry of the position it closed, as recorded (the commit never ran), for
                // the close's realized PnL.
                let entry = self
                    .recorded_position(account, job)
                    .await
                    .filter(|p| p.side == closed)
                    .and_then(|p| p.entry);
                let found =
                    executor::closes_placed_before(client, job, closed, entry, &self.policy, fence);
                return Some(match found.await {
                    Ok(Some(outcome)) => closed_but_blocked(
                        outcome,
                        &block,
                        format!("an earlier delivery closed the {} position", closed.as_str()),
                    ),
                    Ok(None) => blocked,
                    Err(e) => Outcome {
                        message: Some(format!(
                            "{block}; whether an earlier delivery closed a position could not be looked up ({e}): the reconciliation compares the position"
                        )),
                        ..blocked
                    },
                });
            }
            _ => return Some(blocked),
        };
        let mut close = job.clone();
        close.alert.action = crate::domain::Action::Close;
        // A reversal closes all of the old side (a `close_percent` is for close alerts).
        close.alert.close_percent = None;
        // The position it closes, as the broker showed it a moment ago.
        let closed = executor::ClosedPosition {
            side: closing,
            entry: position.and_then(|p| p.entry_price),
        };
        let mut outcome =
            executor::execute_until(client, &close, recover, Some(closed), &self.policy, fence)
                .await?;
        match outcome.status {
            JobStatus::Succeeded => Some(closed_but_blocked(
                outcome,
                &block,
                format!("the {} position was closed", closing.as_str()),
            )),
            // The position went away between the reads: nothing to close.
            JobStatus::Skipped => Some(blocked),
            _ => {
                let m = outcome.message.take().unwrap_or_default();
                outcome.message = Some(format!(
                    "{block}; closing the {} position: {m}",
                    closing.as_str()
                ));
                Some(outcome)
            }
        }
    }

    /// The job's exchange client (credentials loaded, client built) and the environment of its
    /// credentials (which account the job trades on), or the outcome that ends the job without
    /// one; `None` on shutdown.
    async fn client_for(&self, job: &Job) -> Option<Result<(Metered, CredentialEnv), Outcome>> {
        let a = &job.alert;
        self.client(a.user_id, a.exchange, a.environment, job.accepted_at)
            .await
    }

    /// The client of one account (the reconciliation's), or why there is none; `None` on shutdown.
    pub(super) async fn account_client(
        &self,
        account: &Account,
    ) -> Option<Result<Metered, String>> {
        let built = self
            .client(
                account.user_id,
                account.exchange,
                Some(account.environment),
                Utc::now(),
            )
            .await?;
        Some(
            built
                .map(|(c, _)| c)
                .map_err(|o| o.message.unwrap_or_default()),
        )
    }

    async fn client(
        &self,
        user: Uuid,
        exchange: ExchangeKind,
        environment: Option<CredentialEnv>,
        accepted_at: DateTime<Utc>,
    ) -> Option<Result<(Metered, CredentialEnv), Outcome>> {
        let creds = match self.load_credentials(user, exchange, environment).await? {
            Ok(c) => c,
            Err(outcome) => return Some(Err(outcome)),
        };
        match self.exchanges.build(&creds) {
            Ok(c) => {
                tracing::info!("✅ Created {exchange} executor for user {user}");
                Some(Ok((
                    Metered::new(c, self.metrics.clone(), accepted_at),
                    creds.environment,
                )))
            }
            Err(e) => Some(Err(Outcome::failed(
                JobStatus::Rejected,
                e.class.into(),
                e.message,
            ))),
        }
    }

    /// The user's credentials, or the outcome that ends the job without them; `None` on shutdown.
    async fn load_credentials(
        &self,
        user: Uuid,
        exchange: ExchangeKind,
        environment: Option<CredentialEnv>,
    ) -> Option<Result<Credentials, Outcome>> {
        tracing::info!("🔐 Loading {exchange} credentials for user {user}...");
        let loaded = retry(
            "loading credentials",
            &self.shutdown,
            |e: &CredentialError, tries| match e {
                CredentialError::Store(s) => self.refused_for_good(s, tries),
                CredentialError::Unusable { .. } => true,
            },
            || self.credentials.load(user, exchange, environment),
        )
        .await;
        let failed =
            |status, class, message: String| Some(Err(Outcome::failed(status, class, message)));
        match loaded {
            Retried::Shutdown => None,
            Retried::GaveUp {
                error: e @ CredentialError::Unusable { .. },
                ..
            } => failed(
                JobStatus::Rejected,
                FailureClass::Credentials,
                e.to_string(),
            ),
            Retried::GaveUp { error, .. } => failed(
                JobStatus::Dead,
                FailureClass::Database,
                format!("loading credentials failed: {error}"),
            ),
            Retried::Ok(None) => {
                let env = environment.map(|e| e.as_str()).unwrap_or("any");
                failed(
                    JobStatus::Rejected,
                    FailureClass::Credentials,
                    format!(
                        "no {exchange} credentials for user {user} (environment: {env}); add them with `sparky credentials set`"
                    ),
                )
            }
            Retried::Ok(Some(creds)) => {
                tracing::info!(
                    "✅ Loaded {exchange} credentials for user (label: {})",
                    creds.label.as_deref().unwrap_or("none")
                );
                Some(Ok(creds))
            }
        }
    }

    // ---- commit ----

    /// Commit `outcome`. An outcome Postgres refuses (a data error, `SPARKY_MAX_DELIVERIES`
    /// times) is replaced by a `dead` (`database`) one without trades; if even that is refused, the
    /// job is dead-lettered and acked unrecorded rather than block the user's lane.
    async fn commit(&self, job: &Job, entry: &Entry, outcome: Outcome, start: Start) -> Committed {
        let e = match self.try_commit(job, entry, &outcome, start).await {
            Ok(()) => return Committed::Recorded(outcome),
            Err(Commit::Refused(e)) => e,
            Err(Commit::Superseded) => return Committed::Superseded,
            Err(Commit::Shutdown) => return Committed::Shutdown,
        };
        let dead = Outcome {
            fills: vec![],
            position: PositionChange::Unchanged,
            ..Outcome::failed(
                JobStatus::Dead,
                FailureClass::Database,
                format!(
                    "could not record the outcome ({e}); it was {}: {}",
                    outcome.status,
                    outcome.message.as_deref().unwrap_or("")
                ),
            )
        };
        match self.try_commit(job, entry, &dead, start).await {
            Ok(()) => Committed::Recorded(dead),
            Err(Commit::Refused(e)) => {
                tracing::error!(error = %e, "Postgres refused even the dead outcome; dead-lettering the job unrecorded");
                Committed::Recorded(dead)
            }
            Err(Commit::Superseded) => Committed::Superseded,
            Err(Commit::Shutdown) => Committed::Shutdown,
        }
    }

    async fn try_commit(
        &self,
        job: &Job,
        entry: &Entry,
        outcome: &Outcome,
        start: Start,
    ) -> Result<(), Commit> {
        let record = || async move {
            match start {
                Start::Recorded(attempt) => self.store.finish_job(job, outcome, attempt).await,
                Start::WithTheCommit(started) => {
                    let first = FirstStart {
                        partition: entry.partition,
                        entry_id: &entry.id,
                        running_for: started.elapsed(),
                    };
                    self.store.finish_first(job, outcome, &first).await
                }
            }
        };
        let r = retry(
            "recording the job outcome",
            &self.shutdown,
            |e: &StoreError, tries| {
                matches!(e, StoreError::Superseded(_)) || self.refused_for_good(e, tries)
            },
            record,
        )
        .await;
        match r {
            Retried::Ok(()) => Ok(()),
            Retried::Shutdown => Err(Commit::Shutdown),
            Retried::GaveUp {
                error: e @ StoreError::Superseded(_),
                ..
            } => {
                tracing::warn!(error = %e, "not recording a superseded delivery");
                Err(Commit::Superseded)
            }
            Retried::GaveUp { error, .. } => Err(Commit::Refused(error)),
        }
    }

    // ---- dead-letter and ack ----

    /// A job that cannot be recorded in Postgres (its alert breaks the bounds, or Postgres refuses
    /// it): dead-letter it with the reason and ack, so the lane goes on.
    async fn finish_unrecorded(&self, entry: &Entry, job: &Job, outcome: &Outcome) {
        tracing::error!(
            detail = outcome.message.as_deref().unwrap_or(""),
            "job cannot run to its commit; dead-lettering it"
        );
        // A row that exists (a replay, or a delivery begun before) says so too.
        let marked = retry(
            "recording the failed job",
            &self.shutdown,
            |e: &StoreError, tries| self.refused_for_good(e, tries),
            || self.store.mark_failed(job.job_id, outcome),
        )
        .await;
        if matches!(marked, Retried::Shutdown) {
            return;
        }
        if self.dead_letter(job, entry, outcome).await {
            self.ack(entry).await;
            self.report(job, outcome, 0);
        }
    }

    /// The last resort after a panic outside a job's execution (in its begin, commit, dead-letter
    /// or ack): end the job `dead` (`internal`) where it stands and ack it, so the lane goes on in
    /// order. Orders it may have placed are looked up if it is replayed.
    pub(super) async fn after_panic(&self, entry: &Entry, panic: &str) {
        let job = match &entry.job {
            Ok(job) => job,
            Err(reason) => return self.unreadable(entry, reason).await,
        };
        let outcome = Outcome::failed(
            JobStatus::Dead,
            FailureClass::Internal,
            format!("internal error around the job ({panic}); a replay looks up any order it placed before sending anything"),
        );
        let read = || {
            retry(
                "reading the job after a panic",
                &self.shutdown,
                |e: &StoreError, tries| self.refused_for_good(e, tries),
                || self.store.get_job(job.job_id),
            )
        };
        match read().await {
            // The panic may have come after the commit (in the ack, say): then the job is final
            // and only its entry is left to acknowledge.
            Retried::Ok(Some(row)) if row.status.is_final() => {
                return self.finished_before(entry, job, row.status).await;
            }
            // No row (a paper job's first delivery writes its start with its commit, or the panic
            // came before the start): the job's row is written with this outcome, so the job can
            // be found and replayed, then dead-lettered and acked as any failed job.
            Retried::Ok(None) => {
                let written = self
                    .try_commit(job, entry, &outcome, Start::WithTheCommit(Instant::now()))
                    .await;
                match written {
                    Ok(()) => {
                        let recorded = Recorded {
                            outcome,
                            attempt: 1,
                        };
                        return self.settle(entry, job, recorded).await;
                    }
                    Err(Commit::Shutdown) => return,
                    // Another delivery recorded the job meanwhile (its commit was running when
                    // the row was read): if it is final, this entry is only to be acknowledged.
                    Err(Commit::Superseded) => {
                        if let Retried::Ok(Some(row)) = read().await {
                            if row.status.is_final() {
                                return self.finished_before(entry, job, row.status).await;
                            }
                        }
                    }
                    Err(Commit::Refused(error)) => {
                        tracing::error!(%error, "the job's dead row cannot be written");
                    }
                }
            }
            Retried::Shutdown => return,
            _ => {}
        }
        self.finish_unrecorded(entry, job, &outcome).await
    }

    async fn unreadable(&self, entry: &Entry, reason: &str) {
        tracing::error!(partition = entry.partition, entry_id = %entry.id, %reason, "unreadable stream entry; dead-lettering it");
        let fields = [
            ("status", JobStatus::Dead.as_str().to_string()),
            ("error_class", FailureClass::Poison.as_str().to_string()),
            ("error", reason.to_string()),
            ("partition", entry.partition.to_string()),
            ("entry_id", entry.id.clone()),
            ("raw", entry.raw.clone().unwrap_or_default()),
            ("at", Utc::now().to_rfc3339()),
        ];
        if until_ok("dead-lettering", &self.shutdown, || {
            self.queue.dead_letter(&fields)
        })
        .await
        .is_some()
        {
            self.metrics
                .dead_lettered(JobStatus::Dead, Some(FailureClass::Poison));
            self.ack(entry).await;
        }
    }

    /// `false` when shutting down before the record was written (then nothing is acked).
    async fn dead_letter(&self, job: &Job, entry: &Entry, outcome: &Outcome) -> bool {
        let fields = dead_letter_fields(job, entry, outcome);
        let written = until_ok("dead-lettering", &self.shutdown, || {
            self.queue.dead_letter(&fields)
        })
        .await
        .is_some();
        if written {
            self.metrics
                .dead_lettered(outcome.status, outcome.error_class);
        }
        written
    }

    async fn ack(&self, entry: &Entry) {
        let _ = until_ok("acknowledging the entry", &self.shutdown, || {
            self.queue.ack(entry.partition, &entry.id)
        })
        .await;
    }

    fn report(&self, job: &Job, outcome: &Outcome, attempt: i32) {
        let exchange = job.alert.exchange.as_str();
        let since_accept = (Utc::now() - job.accepted_at).to_std().unwrap_or_default();
        self.metrics
            .job_finished(outcome.status.as_str(), exchange, since_accept);
        self.metrics.exchange_retries(exchange, outcome.retries());
        tracing::info!(
            status = outcome.status.as_str(),
            // Not `message`: in JSON logs that would collide with the line's own message.
            detail = outcome.message.as_deref().unwrap_or(""),
            fills = outcome.fills.len(),
            attempt,
            latency_ms = since_accept.as_millis() as u64,
            "job finished"
        );
    }
}

/// The outcome of the close a blocked job made (`closed` says what), recorded as the job's: it is
/// `blocked` by `block`, closing is never blocked.
fn closed_but_blocked(mut outcome: Outcome, block: &risk::Block, closed: String) -> Outcome {
    outcome.status = JobStatus::Blocked;
    outcome.error_class = Some(FailureClass::Risk);
    outcome.message = Some(format!("{block}; {closed} (closing is never blocked)"));
    outcome
}

/// The text of a caught panic.
pub(super) fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

fn dead_letter_fields(job: &Job, entry: &Entry, o: &Outcome) -> Vec<(&'static str, String)> {
    let json = |v: Result<String, serde_json::Error>| {
        v.unwrap_or_else(|e| format!("{{\"unserialisable\":\"{e}\"}}"))
    };
    vec![
        ("job_id", job.job_id.to_string()),
        ("user_id", job.alert.user_id.to_string()),
        ("status", o.status.as_str().to_string()),
        (
            "error_class",
            o.error_class.map_or("", |c| c.as_str()).to_string(),
        ),
        ("error", o.message.clone().unwrap_or_default()),
        ("history", json(serde_json::to_string(&o.history))),
        ("partition", entry.partition.to_string()),
        ("entry_id", entry.id.clone()),
        ("job", json(serde_json::to_string(job))),
        ("at", Utc::now().to_rfc3339()),
    ]
}
