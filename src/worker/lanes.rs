//! Per-user FIFO lanes. A lane is a queue of one user's entries driven by at most one task, so a
//! user's jobs run strictly one after another (the next starts only after the previous one is
//! committed and acked, or dropped), while different users' lanes run concurrently, bounded by
//! `SPARKY_WORKER_CONCURRENCY` permits. A slow user or broker holds one permit, not the worker.
//! A job holds its permit until its outcome is recorded; its dead-letter record and its ack, which
//! wait on Redis only, run without one (the lane's next job still waits for them), so another
//! lane's job starts meanwhile.
//!
//! An entry starts only while its partition's [`Fence`] allows (the ownership that read it is
//! still valid and not handed over); otherwise it is dropped and stays pending for the partition's
//! next owner. A panic that escapes a job (the job itself turns an execution panic into `dead`, see
//! `job`) is caught here: the job is ended `dead` (`internal`) where it stands and acked, and the
//! lane, the partition and the process go on, in order.
//!
//! A lane also carries the user's reconciliation sweeps ([`Lanes::push_sweep`], see `sweep`): a
//! sweep is queued like an entry, so it runs after the user's jobs queued before it and before the
//! ones queued after it, never alongside one. At most one sweep waits per lane.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::FutureExt;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::job::{panic_message, JobRunner};
use crate::partition::{Fence, Table};
use crate::queue::Entry;

/// What a lane runs.
enum Work {
    /// An entry, and when it was queued.
    Entry(Box<Entry>, Instant),
    /// Reconcile the user's accounts with their brokers.
    Sweep,
}

type Queued = (Work, Fence);

pub(super) struct Lanes {
    queues: Arc<Mutex<HashMap<Uuid, VecDeque<Queued>>>>,
    permits: Arc<Semaphore>,
    runner: Arc<JobRunner>,
    table: Arc<Table>,
    tracker: TaskTracker,
}

impl Lanes {
    pub(super) fn new(concurrency: usize, runner: Arc<JobRunner>, table: Arc<Table>) -> Self {
        Lanes {
            queues: Arc::default(),
            permits: Arc::new(Semaphore::new(concurrency)),
            runner,
            table,
            tracker: TaskTracker::new(),
        }
    }

    /// No new lane tasks after this; [`Lanes::wait`] then waits for the running ones.
    pub(super) fn close(&self) {
        self.tracker.close();
    }

    pub(super) async fn wait(&self) {
        self.tracker.wait().await
    }

    /// Queue `entry` on its user's lane, starting a task for the lane if none drives it.
    pub(super) fn push(&self, entry: Entry, fence: Fence) {
        // Entries that are not jobs share the nil lane; they only need dead-lettering.
        let user = entry
            .job
            .as_ref()
            .map(|j| j.alert.user_id)
            .unwrap_or_else(|_| Uuid::nil());
        self.queue(user, (Work::Entry(Box::new(entry), Instant::now()), fence));
    }

    /// Queue a reconciliation of `user`'s accounts on the user's lane; `false` when one is already
    /// waiting there (it will see the same broker state).
    pub(super) fn push_sweep(&self, user: Uuid, fence: Fence) -> bool {
        let waiting = lock(&self.queues)
            .get(&user)
            .is_some_and(|lane| lane.iter().any(|(w, _)| matches!(w, Work::Sweep)));
        if !waiting {
            self.queue(user, (Work::Sweep, fence));
        }
        !waiting
    }

    fn queue(&self, user: Uuid, work: Queued) {
        {
            let mut q = lock(&self.queues);
            if let Some(lane) = q.get_mut(&user) {
                lane.push_back(work);
                return;
            }
            q.insert(user, VecDeque::from([work]));
        }
        let lane = Lane {
            user,
            queues: self.queues.clone(),
            permits: self.permits.clone(),
            runner: self.runner.clone(),
            table: self.table.clone(),
        };
        self.tracker.spawn(lane.drive());
    }
}

/// The task driving one user's lane until it is empty.
struct Lane {
    user: Uuid,
    queues: Arc<Mutex<HashMap<Uuid, VecDeque<Queued>>>>,
    permits: Arc<Semaphore>,
    runner: Arc<JobRunner>,
    table: Arc<Table>,
}

impl Lane {
    async fn drive(self) {
        while let Some((work, fence)) = self.next() {
            let permit = if fence.may_start() {
                tokio::select! {
                    p = self.permits.acquire() => p.ok(),
                    _ = fence.voided() => None,
                }
            } else {
                None
            };
            // Waiting for the permit may have taken a while: ask again.
            let permit = permit.filter(|_| fence.may_start());
            match work {
                Work::Entry(entry, queued) => {
                    let (partition, id) = (entry.partition, entry.id.clone());
                    if let Some(permit) = permit {
                        self.run(*entry, &fence, permit, queued).await;
                    }
                    self.table.finish(partition, &id);
                }
                Work::Sweep if permit.is_some() => self.sweep(&fence).await,
                Work::Sweep => {}
            }
        }
    }

    /// The user's reconciliation, inside the partition's fence; a panic in it is logged and the
    /// lane goes on.
    async fn sweep(&self, fence: &Fence) {
        let run = fence.scope(super::sweep::reconcile_users(&self.runner, Some(self.user)));
        match AssertUnwindSafe(run).catch_unwind().await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(user = %self.user, error = %e, "reconciliation failed; the next sweep tries again")
            }
            Err(panic) => {
                tracing::error!(user = %self.user, panic = %panic_message(&*panic), "reconciliation panicked; the next sweep tries again")
            }
        }
    }

    fn next(&self) -> Option<Queued> {
        let mut q = lock(&self.queues);
        let lane = q.get_mut(&self.user)?;
        match lane.pop_front() {
            Some(e) => Some(e),
            None => {
                q.remove(&self.user);
                None
            }
        }
    }

    /// Run the job of `entry`, holding `permit` until the job is recorded (see
    /// [`JobRunner::process`]). A panic drops the permit on its way out, so the last-resort
    /// ending after it runs without one (rare, and one job's statements).
    async fn run(&self, entry: Entry, fence: &Fence, permit: SemaphorePermit<'_>, queued: Instant) {
        let (partition, id) = (entry.partition, entry.id.clone());
        let job =
            AssertUnwindSafe(
                self.runner
                    .process(entry.clone(), fence.clone(), permit, queued),
            );
        let Err(panic) = job.catch_unwind().await else {
            return;
        };
        let panic = panic_message(&*panic);
        if fence.is_void() {
            // Another worker may own the job now: leave it to that worker (the poison limit
            // bounds repeats).
            tracing::error!(partition, entry_id = %id, %panic, "a job panicked outside its execution after the lease lapsed; its entry stays pending");
            return;
        }
        tracing::error!(partition, entry_id = %id, %panic, "a job panicked outside its execution; ending it dead where it stands");
        let last_resort = AssertUnwindSafe(self.runner.after_panic(&entry, &panic));
        if let Err(again) = last_resort.catch_unwind().await {
            tracing::error!(partition, entry_id = %id, panic = %panic_message(&*again), "ending the job panicked too; its entry stays pending");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
