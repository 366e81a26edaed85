//! Starting the jobs of concurrent lanes together (issue 17).
//!
//! Every delivery is recorded before it executes ([`Store::begin_job`]: the attempt fence). One
//! start is one statement and one transaction, and Postgres spends most of a one-row `INSERT`'s
//! time on what every statement and transaction costs, not on the row: on the benchmark machine a
//! statement starting 8 jobs costs about a fifth per job of 8 statements starting one each.
//!
//! [`Begins`] sends the starts of a worker's lanes through one task that writes whatever has
//! queued while its previous statement ran as one statement ([`BEGIN_MANY`]): a job waits for
//! nothing when the worker is idle (it is the only one, written at once), and under load the
//! starts of the lanes that reached their begin meanwhile share one statement. Each job gets
//! exactly what its own [`Store::begin_job`] would have answered:
//! - its `attempts` after the upsert (the same `BEGIN_INTO` and `BEGIN_AGAIN` as one job's), and
//!   for an opening job the risk limits that apply to it, read by the same statement;
//! - `Finished(status)` when the job is final (the upsert returned no row for it);
//! - when a statement of several jobs fails, for any reason, no answer: each of its jobs runs its
//!   own [`Store::begin_job`] in its own task, with that method's fallback without limits and the
//!   caller's retries (what every lane did before starts were grouped: during an outage that is
//!   one failed statement more per group). A statement fails as a whole, so nothing of it was
//!   written, and one job whose data Postgres refuses cannot fail the others' starts;
//! - once the statement succeeded, never a second start of a job it started (that would count a
//!   second attempt, and a job past its first attempt runs in recovery mode: every leg looked up
//!   at the broker first, no staleness check): a row that does not decode is that job's error,
//!   and only the final jobs' status read, a second statement, may fail into starting alone,
//!   which writes nothing for a final job.
//!
//! A start nobody waits for any more (its lane's future was dropped) is not written: its entry
//! stays pending, and the start could only supersede the delivery of the job's next owner.
//!
//! One task writes the starts of a worker, one statement at a time (a paper job's first delivery
//! writes no start here: see `worker::job::Start`): a statement that hangs (a connection cut
//! without a reset, which sqlx does not time out) holds every start of the worker until TCP gives
//! up, where it held one lane before.
//!
//! Two deliveries of one job in one statement would make the upsert touch its row twice (an
//! error): the second waits for the next statement. Rows are inserted in `job_id` order, so two
//! workers starting the same jobs (a partition hand-over) lock them in the same order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};

use chrono::{DateTime, Utc};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{
    begun, reads_limits_at_begin, risk, Begin, Store, StoreError, BEGIN_AGAIN, BEGIN_INTO,
};
use crate::domain::Job;
use crate::job::JobStatus;

/// The most jobs one statement starts.
pub const MAX_BATCH: usize = 64;

/// Starts of jobs queued for the next statement (bounded: a lane waits for room).
const QUEUED: usize = 4 * MAX_BATCH;

/// The starts of many jobs: [`BEGIN_INTO`] from parallel arrays, each row's limits (when its
/// `with_limits`) joined as [`risk::begin_with_limits`] joins one job's. One row per job begun
/// and row of its limits (or one with NULL limits), in `job_id` order; no row for a final job.
static BEGIN_MANY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH t AS (
           SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int4[], $4::text[], $5::text[],
             $6::text[], $7::text[], $8::jsonb[], $9::timestamptz[], $10::text[], $11::bool[])
             AS t(job_id, user_id, partition, entry_id, exchange, action, symbol, alert,
                  accepted_at, strategy, with_limits)),
         b AS ({BEGIN_INTO}
           SELECT job_id, user_id, partition, entry_id, exchange, action, symbol, alert,
             'executing', 1, accepted_at, now() FROM t ORDER BY job_id
           {BEGIN_AGAIN} RETURNING job_id, attempts)
         SELECT b.job_id AS begun, b.attempts, l.*
           FROM b JOIN t ON t.job_id = b.job_id
           LEFT JOIN LATERAL ({}) l ON t.with_limits
           ORDER BY b.job_id, l.strategy",
        risk::limits_that_apply("t.user_id", "t.strategy")
    )
});

/// One job's start waiting for a statement.
struct Pending {
    job: Job,
    partition: u32,
    entry_id: String,
    /// The job's answer; `None`: the statement failed, the job starts on its own.
    reply: oneshot::Sender<Option<Result<Begin, StoreError>>>,
}

/// Starts jobs through one task that writes the starts queued meanwhile as one statement (see the
/// module's header). The task starts on first use and ends when the `Begins` is dropped.
pub struct Begins {
    /// Where the task writes its statements, and the starts that got no answer from it.
    store: Store,
    queue: OnceLock<mpsc::Sender<Pending>>,
    stats: Arc<BeginStats>,
}

/// What a [`Begins`] did (for tests and the benchmark).
#[derive(Debug, Default)]
pub struct BeginStats {
    /// Statements run.
    pub statements: AtomicU64,
    /// Jobs they started or found final.
    pub jobs: AtomicU64,
    /// Jobs started on their own: those of failed statements, and the few that got no answer
    /// otherwise (the task gone, a final job's status not read).
    pub alone: AtomicU64,
}

impl Begins {
    pub fn new(store: Store) -> Begins {
        Begins {
            store,
            queue: OnceLock::new(),
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> &BeginStats {
        &self.stats
    }

    /// What [`Store::begin_job`] answers for this delivery, its start written with those of the
    /// other lanes waiting at the same time.
    pub async fn begin(
        &self,
        job: &Job,
        partition: u32,
        entry_id: &str,
    ) -> Result<Begin, StoreError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            job: job.clone(),
            partition,
            entry_id: entry_id.to_string(),
            reply,
        };
        if self.sender().send(pending).await.is_ok() {
            if let Ok(Some(answer)) = answer.await {
                return answer;
            }
        }
        self.stats.alone.fetch_add(1, Ordering::Relaxed);
        self.store.begin_job(job, partition, entry_id).await
    }

    fn sender(&self) -> &mpsc::Sender<Pending> {
        self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUED);
            tokio::spawn(run(self.store.clone(), rx, Arc::clone(&self.stats)));
            tx
        })
    }
}

/// The task: take what is queued (at most [`MAX_BATCH`], one delivery per job), write it as one
/// statement, answer each job, repeat.
async fn run(store: Store, mut rx: mpsc::Receiver<Pending>, stats: Arc<BeginStats>) {
    let mut next: Vec<Pending> = Vec::new();
    loop {
        if next.is_empty() {
            match rx.recv().await {
                Some(p) => next.push(p),
                None => return,
            }
        }
        let (batch, later) = one_per_job(std::mem::take(&mut next), &mut rx);
        next = later;
        if batch.is_empty() {
            continue; // every start taken was one nobody waits for
        }
        stats.statements.fetch_add(1, Ordering::Relaxed);
        stats.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let [p] = &batch[..] {
            // Alone: the one-row statement, planned once (the array statement is planned again
            // on every execution, which costs about what a statement of two jobs saves).
            // Its answer, an error included, is the job's (the caller retries an outage).
            let answer = store.begin_job(&p.job, p.partition, &p.entry_id).await;
            let p = batch.into_iter().next().expect("one");
            let _ = p.reply.send(Some(answer));
            continue;
        }
        match begin_many(&store, &batch).await {
            Ok(mut answers) => {
                for p in batch {
                    let _ = p.reply.send(answers.remove(&p.job.job_id));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, jobs = batch.len(), "starting jobs together failed; each starts on its own");
                for p in batch {
                    let _ = p.reply.send(None);
                }
            }
        }
    }
}

/// `carried` plus what is queued now, up to [`MAX_BATCH`] jobs with one delivery each; a second
/// delivery of a job in it (and anything past the limit) goes to the next statement.
fn one_per_job(
    carried: Vec<Pending>,
    rx: &mut mpsc::Receiver<Pending>,
) -> (Vec<Pending>, Vec<Pending>) {
    let mut batch = Vec::new();
    let mut later = Vec::new();
    let mut seen = HashSet::new();
    let mut take = |p: Pending, batch: &mut Vec<Pending>| {
        if p.reply.is_closed() {
            // Nobody waits for it (its lane is gone): its entry stays pending, and a start
            // written now could only supersede the delivery of the job's next owner.
            return;
        }
        if batch.len() < MAX_BATCH && seen.insert(p.job.job_id) {
            batch.push(p);
        } else {
            later.push(p);
        }
    };
    for p in carried {
        take(p, &mut batch);
    }
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(p) => take(p, &mut batch),
            Err(_) => break,
        }
    }
    (batch, later)
}

/// Each job's answer from [`BEGIN_MANY`]; a job missing from it starts on its own.
type Answers = HashMap<Uuid, Result<Begin, StoreError>>;

/// Run [`BEGIN_MANY`] for `batch`. `Err`: the statement failed, so nothing of it was written. Once
/// it succeeded its starts are committed: every job it started gets its answer from it (a row
/// that does not decode is that job's error, as for one job), never a second start, which would
/// count a second attempt. A final job (no row) gets its status from a second read; if that
/// fails it starts on its own, which for a final job writes nothing.
async fn begin_many(store: &Store, batch: &[Pending]) -> Result<Answers, StoreError> {
    let n = batch.len();
    let mut job_ids = Vec::with_capacity(n);
    let mut users = Vec::with_capacity(n);
    let mut partitions = Vec::with_capacity(n);
    let mut entry_ids = Vec::with_capacity(n);
    let mut exchanges = Vec::with_capacity(n);
    let mut actions = Vec::with_capacity(n);
    let mut symbols = Vec::with_capacity(n);
    let mut alerts = Vec::with_capacity(n);
    let mut accepted: Vec<DateTime<Utc>> = Vec::with_capacity(n);
    let mut strategies = Vec::with_capacity(n);
    let mut with_limits = Vec::with_capacity(n);
    for p in batch {
        let a = &p.job.alert;
        job_ids.push(p.job.job_id);
        users.push(a.user_id);
        partitions.push(p.partition as i32);
        entry_ids.push(p.entry_id.as_str());
        exchanges.push(a.exchange.as_str());
        actions.push(a.action.as_str());
        symbols.push(a.symbol.as_str());
        alerts.push(serde_json::to_value(a).expect("alert serialises"));
        accepted.push(p.job.accepted_at);
        strategies.push(a.strategy.as_deref().unwrap_or(""));
        with_limits.push(reads_limits_at_begin(&p.job));
    }
    let rows = sqlx::query(&BEGIN_MANY)
        .bind(&job_ids)
        .bind(&users)
        .bind(&partitions)
        .bind(&entry_ids)
        .bind(&exchanges)
        .bind(&actions)
        .bind(&symbols)
        .bind(&alerts)
        .bind(&accepted)
        .bind(&strategies)
        .bind(&with_limits)
        .fetch_all(&store.pool)
        .await?;
    // From here on the starts are committed.
    let mut answers = Answers::with_capacity(n);
    // A job's rows are consecutive (`ORDER BY b.job_id`).
    let ids: Vec<Option<Uuid>> = rows.iter().map(|r| r.try_get("begun").ok()).collect();
    for p in batch {
        let job = Some(p.job.job_id);
        if let Some(start) = ids.iter().position(|id| *id == job) {
            let len = ids[start..].iter().take_while(|id| **id == job).count();
            let mine = &rows[start..start + len];
            answers.insert(p.job.job_id, begun(mine, reads_limits_at_begin(&p.job)));
        }
    }
    let finals: Vec<Uuid> = job_ids
        .iter()
        .filter(|j| !answers.contains_key(j))
        .copied()
        .collect();
    if !finals.is_empty() {
        let statuses = sqlx::query("SELECT job_id, status FROM jobs WHERE job_id = ANY($1)")
            .bind(&finals)
            .fetch_all(&store.pool)
            .await;
        match statuses {
            Ok(rows) => {
                for r in rows {
                    let status: Result<JobStatus, _> = r.try_get("status");
                    if let (Ok(job), Ok(status)) = (r.try_get("job_id"), status) {
                        // Only a final job is left out by the upsert; anything else starts on
                        // its own.
                        if status.is_final() {
                            answers.insert(job, Ok(Begin::Finished(status)));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, jobs = finals.len(), "reading the status of final jobs failed; each reads its own")
            }
        }
    }
    Ok(answers)
}
