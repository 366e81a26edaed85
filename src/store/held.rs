//! One connection for all of a job's statements, kept from one job to the next (issue 17).
//!
//! sqlx 0.8 pings a connection every time it goes back to the pool (a round trip of its own,
//! about 20-30 us of Postgres CPU and a send and a receive in the worker, not configurable), so a
//! job whose three or four statements each took a connection from the pool paid three or four
//! pings. Inside a hold the statements that go through [`Store::on_conn`] share one connection,
//! and a worker's holds ([`Holds`]) keep their connections between jobs: a paper job in a steady
//! stream pays no ping at all.
//!
//! Rules that keep this safe:
//! - The hold is a task-local: only the statements of the task that runs the job use the held
//!   connection; anything the job spawns, and every method not written with [`Store::on_conn`],
//!   takes a connection from the pool as before, for that one statement.
//! - A worker has at most half its pool's connections in holds (its [`Holds`]; a paper job
//!   beyond that runs as any other): the other half serves the statements outside the holds (a
//!   holding job's credential load or risk counts, the jobs at remote brokers, the sweeps), so
//!   such a statement always gets one in turn, and no job waits on a connection another job holds.
//! - Only jobs that wait on nothing but Postgres hold one (the paper exchange's): a job at a
//!   remote broker would keep it idle through every broker call.
//! - **A hold keeps a connection only between statements that ended well.** A statement takes the
//!   connection out of the hold while it runs and puts it back when it succeeds. A statement that
//!   fails, or that is cancelled mid-way (its job dropped at shutdown, a timeout), drops it, so it
//!   goes back to the pool, which tests it (sqlx waits for the pending answers) and closes it if it
//!   is broken; the next statement takes a fresh one. A retried statement never runs on a
//!   connection that failed.
//! - **A kept connection is not kept for ever.** One idle in a hold for longer than
//!   [`IDLE_HOLD`] goes back to the pool (a task sweeps the free holds; the pool tests it, it may
//!   have died while idle), and one taken from the pool longer than [`MAX_HOLD`] ago goes back
//!   when its job ends, so the pool's own life-time rules still see every connection regularly and
//!   a worker with nothing to run holds none (closing the pool waits for no hold). A kept
//!   connection is not tested before its next statement: one that died within [`IDLE_HOLD`] (a
//!   Postgres restart) fails that statement once, which the worker retries on a fresh one, as a
//!   statement on any connection that dies is.
//! - The bound is per [`Holds`], one per worker (`JobRunner`): two on one pool (only tests make
//!   that) could hold all of it, idle, for up to [`IDLE_HOLD`].

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};
use tokio::sync::Mutex;

use super::{Store, StoreError};

/// A connection idle in a hold this long goes back to the pool (the holds' sweep, every half of
/// it, and a job taking the hold): a worker with no paper job to run keeps none for long.
pub const IDLE_HOLD: Duration = Duration::from_secs(1);
/// A connection held this long since it left the pool goes back to it when its job ends (or at
/// the next sweep), so the pool's own life-time rules still see it.
pub const MAX_HOLD: Duration = Duration::from_secs(60);

/// A connection in a hold: since when it left the pool, and when a statement last ended well on it.
struct Held {
    conn: PoolConnection<Postgres>,
    taken: Instant,
    used: Instant,
}

type Slot = Arc<Mutex<Option<Held>>>;

tokio::task_local! {
    static HELD: Slot;
}

/// A worker's holds: at most `n` jobs at once run their statements on a held connection, each
/// kept for the next job that takes the same hold (see the module's header). Dropping the holds
/// gives their connections back.
pub struct Holds {
    inner: Arc<Inner>,
}

struct Inner {
    holds: Vec<(AtomicBool, Slot)>,
    idle: Duration,
    max: Duration,
}

/// Frees a hold when its job ends or is dropped.
struct Taken<'a>(&'a AtomicBool);

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Holds {
    pub fn new(n: usize) -> Holds {
        Holds::with_limits(n, IDLE_HOLD, MAX_HOLD)
    }

    /// Holds whose connections go back to the pool after `idle` unused or `max` held. A task
    /// sweeps the free holds every `idle / 2` (when made inside a Tokio runtime) and ends with the
    /// holds.
    pub fn with_limits(n: usize, idle: Duration, max: Duration) -> Holds {
        let inner = Arc::new(Inner {
            holds: (0..n)
                .map(|_| (AtomicBool::new(false), Slot::default()))
                .collect(),
            idle,
            max,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&inner)));
        }
        Holds { inner }
    }

    /// Run `fut` (one job) in a free hold, or as it is when every hold is taken.
    pub async fn run<F: Future>(&self, fut: F) -> F::Output {
        let Some((taken, slot)) = self.inner.take() else {
            return fut.await;
        };
        let _taken = Taken(taken);
        self.inner.expire(&mut *slot.lock().await);
        let out = HELD.scope(Arc::clone(slot), fut).await;
        self.inner.expire(&mut *slot.lock().await);
        out
    }

    /// How many holds keep a connection now. For tests and diagnostics.
    pub fn kept(&self) -> usize {
        self.inner
            .holds
            .iter()
            .filter(|(_, slot)| slot.try_lock().is_ok_and(|h| h.is_some()))
            .count()
    }
}

impl Inner {
    /// A free hold, taken.
    fn take(&self) -> Option<&(AtomicBool, Slot)> {
        self.holds.iter().find(|(taken, _)| {
            taken
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })
    }

    /// Give the connection of a hold back to the pool if it was idle or held too long.
    fn expire(&self, held: &mut Option<Held>) {
        if held
            .as_ref()
            .is_some_and(|h| h.used.elapsed() > self.idle || h.taken.elapsed() > self.max)
        {
            *held = None;
        }
    }

    /// [`Inner::expire`] every free hold.
    fn sweep(&self) {
        for (taken, slot) in &self.holds {
            let free = taken
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok();
            if free {
                let _taken = Taken(taken);
                if let Ok(mut held) = slot.try_lock() {
                    self.expire(&mut held);
                }
            }
        }
    }
}

/// The holds' sweep: until they are dropped.
async fn sweep(inner: std::sync::Weak<Inner>) {
    let Some(every) = inner
        .upgrade()
        .map(|i| (i.idle / 2).max(Duration::from_millis(10)))
    else {
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        match inner.upgrade() {
            Some(inner) => inner.sweep(),
            None => return,
        }
    }
}

impl Store {
    /// The pool's size.
    pub fn max_connections(&self) -> u32 {
        self.pool.options().get_max_connections()
    }

    /// The Postgres backend (process id) that serves this task's statements made through
    /// [`Store::on_conn`]: inside a hold always the same one, until a statement fails. For tests
    /// and diagnostics.
    pub async fn backend_pid(&self) -> Result<i32, StoreError> {
        self.on_conn(async |c| {
            Ok(sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(c)
                .await?)
        })
        .await
    }

    /// Run `f` on the connection held by the current job (a hold), or on one from the pool for
    /// this call. `f` must not call back into the store (it would wait for the connection it
    /// holds).
    pub(crate) async fn on_conn<T>(
        &self,
        f: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Ok(slot) = HELD.try_with(Arc::clone) else {
            let mut conn = self.pool.acquire().await?;
            return f(&mut conn).await;
        };
        let mut held = slot.lock().await;
        // Out of the hold while the statement runs: if it fails or is cancelled, the connection
        // is dropped, so it goes back to the pool, which tests it.
        let mut h = match held.take() {
            Some(h) => h,
            None => {
                let conn = self.pool.acquire().await?;
                let now = Instant::now();
                Held {
                    conn,
                    taken: now,
                    used: now,
                }
            }
        };
        let r = f(&mut h.conn).await;
        if r.is_ok() {
            h.used = Instant::now();
            *held = Some(h);
        }
        r
    }
}
