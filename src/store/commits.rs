//! Committing the jobs of concurrent lanes together (issue 17): group commit.
//!
//! A job's outcome is one statement ([`commit`](super::commit): the fenced `UPDATE jobs`, its
//! trades, orders, position and notification), so one transaction and one WAL flush per job. Most
//! of what Postgres spends on such a statement is what every statement and every transaction
//! costs, not the rows: on the benchmark machine one statement carrying the writes of 8 jobs
//! writes about twice the jobs per second of 16 connections each writing one.
//!
//! [`Commits`] sends the commits of a worker's lanes through [`SLOTS`] tasks. A slot takes the
//! oldest commit waiting and up to [`MAX_GROUP`] - 1 more **of the same shape** (the same
//! statement text: an open with a trade and a position, a skip, a close ..) and **of other users**,
//! and writes them as one statement ([`commit::finish_many`]: each job's parts read its own fence
//! only). So:
//! - **nothing waits for a timer**: while a slot is free, a commit is written the moment it
//!   arrives (alone, with the same one-job statement as [`Store::finish_job`]); commits group only
//!   while both slots are busy, which is when a statement each would queue anyway;
//! - **Postgres plans each statement text once per connection**: a group's text depends only on
//!   its shape and its size (at most [`MAX_GROUP`] texts per shape), and every part has scalar
//!   parameters, so the generic plan is kept (statements with array parameters are planned on
//!   every execution: the lesson of the first grouping attempt in BENCHMARKS.md);
//! - **each job gets what its own [`Store::finish_job`] would answer**: recorded, or
//!   [`StoreError::Superseded`] when its delivery was overtaken (its parts wrote nothing, the
//!   others' are recorded);
//! - **a failed statement wrote nothing**, and each of its jobs then commits on its own in its
//!   lane ([`Store::finish_job`], with the lane's retries), so a job whose data Postgres refuses
//!   fails its own commit only;
//! - **the lane acks only after its job's commit**: the answer comes once the statement has
//!   committed. A statement whose answer is lost after it committed is answered like one job's lost
//!   answer: the lane commits again on its own, finds the fence gone (`Superseded`) and leaves
//!   the entry pending, and the next delivery finds the job final and acks it;
//! - **a user's commits never share a statement** (a user's lane commits one job at a time anyway;
//!   the check keeps any row from being written twice in one statement), and a group is written in
//!   `job_id` order, so two workers writing the same jobs (a partition hand-over) lock their rows
//!   in the same order.
//!
//! A slot keeps its connection while commits keep coming (so its statements stay prepared) and
//! gives it back to the pool when it finds nothing waiting. A commit nobody waits for any more
//! (its lane's future was dropped) is not written: its entry stays pending for the next delivery.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use sqlx::pool::PoolConnection;
use sqlx::Postgres;
use tokio::sync::{mpsc, oneshot, Mutex};

use super::commit::{self, ToCommit};
use super::{Store, StoreError};
use crate::domain::Job;
use crate::executor::Outcome;

/// The most jobs one statement commits.
pub const MAX_GROUP: usize = 8;

/// Statements in flight at once (each on its own connection).
pub const SLOTS: usize = 2;

/// Commits queued for the slots (bounded: a lane waits for room).
const QUEUED: usize = 256;

/// One job's commit waiting for a slot.
struct Pending {
    job: Job,
    outcome: Outcome,
    attempt: i32,
    /// [`commit::shape`]: commits of one shape can share a statement.
    shape: String,
    /// The job's answer; `None`: the statement failed, the job commits on its own.
    reply: oneshot::Sender<Option<Result<(), StoreError>>>,
}

/// Commits jobs through [`SLOTS`] tasks that write the commits queued meanwhile together (see the
/// module's header). The tasks start on first use and end when the `Commits` is dropped.
pub struct Commits {
    store: Store,
    queue: OnceLock<mpsc::Sender<Pending>>,
    stats: Arc<CommitStats>,
}

/// What a [`Commits`] did (for tests and the benchmark).
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Statements run.
    pub statements: AtomicU64,
    /// Jobs they committed (or found superseded).
    pub jobs: AtomicU64,
    /// Jobs of failed statements, committed on their own.
    pub alone: AtomicU64,
}

impl Commits {
    pub fn new(store: Store) -> Commits {
        Commits {
            store,
            queue: OnceLock::new(),
            stats: Arc::default(),
        }
    }

    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }

    /// What [`Store::finish_job`] answers for this delivery, its commit written with those of the
    /// other lanes waiting at the same time.
    pub async fn finish(
        &self,
        job: &Job,
        outcome: &Outcome,
        attempt: i32,
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            job: job.clone(),
            outcome: outcome.clone(),
            attempt,
            shape: commit::shape(job, outcome, attempt),
            reply,
        };
        if self.sender().send(pending).await.is_ok() {
            if let Ok(Some(answer)) = answer.await {
                return answer;
            }
        }
        self.stats.alone.fetch_add(1, Ordering::Relaxed);
        self.store.finish_job(job, outcome, attempt).await
    }

    fn sender(&self) -> &mpsc::Sender<Pending> {
        self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUED);
            let intake = Arc::new(Mutex::new(Intake {
                rx,
                waiting: VecDeque::new(),
            }));
            for _ in 0..SLOTS {
                tokio::spawn(slot(
                    self.store.clone(),
                    Arc::clone(&intake),
                    Arc::clone(&self.stats),
                ));
            }
            tx
        })
    }
}

/// The commits handed to the slots: the channel, and what was taken from it but not yet written
/// (commits of another shape than the groups taken so far).
struct Intake {
    rx: mpsc::Receiver<Pending>,
    waiting: VecDeque<Pending>,
}

impl Intake {
    /// Take what the channel holds now into `waiting`, dropping commits nobody waits for.
    fn drain(&mut self) {
        while self.waiting.len() < QUEUED {
            match self.rx.try_recv() {
                Ok(p) => self.waiting.push_back(p),
                Err(_) => break,
            }
        }
        // Nobody waits for it (its lane is gone): its entry stays pending, and a commit written
        // now could only record a delivery nobody acks.
        self.waiting.retain(|p| !p.reply.is_closed());
    }

    /// The next group if a commit waits now.
    fn now(&mut self) -> Option<Vec<Pending>> {
        self.drain();
        let group = group(&mut self.waiting);
        (!group.is_empty()).then_some(group)
    }

    /// The next group, waiting for a commit; `None` once the `Commits` is dropped.
    async fn next(&mut self) -> Option<Vec<Pending>> {
        loop {
            if let Some(group) = self.now() {
                return Some(group);
            }
            let p = self.rx.recv().await?;
            self.waiting.push_back(p);
        }
    }
}

/// The oldest waiting commit and up to [`MAX_GROUP`] - 1 more of its shape, each of another user,
/// in `job_id` order; the rest keeps its place.
fn group(waiting: &mut VecDeque<Pending>) -> Vec<Pending> {
    let Some(first) = waiting.pop_front() else {
        return Vec::new();
    };
    let mut users = HashSet::from([first.job.alert.user_id]);
    let mut group = vec![first];
    let mut i = 0;
    while i < waiting.len() && group.len() < MAX_GROUP {
        let p = &waiting[i];
        if p.shape == group[0].shape && users.insert(p.job.alert.user_id) {
            group.extend(waiting.remove(i));
        } else {
            i += 1;
        }
    }
    group.sort_by_key(|p| p.job.job_id);
    group
}

/// One slot: take a group, write it, answer each job, repeat.
async fn slot(store: Store, intake: Arc<Mutex<Intake>>, stats: Arc<CommitStats>) {
    let mut conn: Option<PoolConnection<Postgres>> = None;
    loop {
        let group = {
            let mut intake = intake.lock().await;
            match intake.now() {
                Some(group) => group,
                None => {
                    conn = None; // idle: the connection goes back to the pool meanwhile
                    match intake.next().await {
                        Some(group) => group,
                        None => return,
                    }
                }
            }
        };
        stats.statements.fetch_add(1, Ordering::Relaxed);
        stats.jobs.fetch_add(group.len() as u64, Ordering::Relaxed);
        let written = write(&store, &mut conn, &group).await;
        if written.is_err() {
            conn = None; // back to the pool, which tests it
        }
        match written {
            Ok(matched) => {
                for (p, matched) in group.into_iter().zip(matched) {
                    let answer = if matched {
                        Ok(())
                    } else {
                        Err(StoreError::Superseded(p.job.job_id))
                    };
                    let _ = p.reply.send(Some(answer));
                }
            }
            // Alone: the same statement as the job's own commit, so its error is the answer.
            Err(e) if group.len() == 1 => {
                let p = group.into_iter().next().expect("one");
                let _ = p.reply.send(Some(Err(e)));
            }
            Err(e) => {
                tracing::debug!(error = %e, jobs = group.len(), "committing jobs together failed; each commits on its own");
                // Dropping the replies answers `None`: each job commits on its own.
            }
        }
    }
}

/// Write `group` as one statement on the slot's connection: per job, whether its fence matched.
async fn write(
    store: &Store,
    conn: &mut Option<PoolConnection<Postgres>>,
    group: &[Pending],
) -> Result<Vec<bool>, StoreError> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(store.pool.acquire().await?),
    };
    if let [p] = group {
        return Ok(vec![commit::finish(c, &p.job, &p.outcome, p.attempt).await?]);
    }
    let jobs: Vec<ToCommit<'_>> = group
        .iter()
        .map(|p| ToCommit {
            job: &p.job,
            outcome: &p.outcome,
            attempt: p.attempt,
        })
        .collect();
    commit::finish_many(c, &jobs).await
}
