//! One connection for all of a job's statements (issue 17).
//!
//! sqlx 0.8 pings a connection every time it goes back to the pool (a round trip of its own,
//! about 20-30 us of Postgres CPU, not configurable), so a job whose three or four statements each
//! took a connection from the pool paid three or four pings. Inside [`Store::holding_a_connection`]
//! the statements that go through [`Store::on_conn`] share one connection, taken from the pool at
//! the first of them and given back (one ping) when the scope ends: at the job's commit (the
//! worker's `JobRunner::process`), before its ack.
//!
//! Rules that keep this safe:
//! - The scope is a task-local: only the statements of the task that runs the job use the held
//!   connection; anything the job spawns, and every method not written with [`Store::on_conn`],
//!   takes a connection from the pool as before, for that one statement.
//! - A job holds at most one connection, and at most half the pool's connections are held at once
//!   (the worker's `holders`; a paper job beyond that runs as any other): the other half serves the
//!   statements outside the held connections (a holding job's credential load or risk counts, the
//!   jobs at remote brokers, the sweeps), so such a statement always gets one in turn, and no job
//!   waits on a connection another job holds.
//! - Only jobs that wait on nothing but Postgres hold one (the paper exchange's): a job at a
//!   remote broker would keep it idle through every broker call.
//! - Any error on the held connection gives it back to the pool (which tests it and closes it if
//!   it is broken); the next statement takes a fresh one. A retried statement never runs on a
//!   connection that failed.
//! - A job cancelled mid-statement drops the scope and so the connection, which the pool tests
//!   (sqlx waits for the pending answers) before it hands it out again, as for any dropped
//!   statement.

use std::future::Future;
use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres};
use tokio::sync::Mutex;

use super::{Store, StoreError};

type Slot = Arc<Mutex<Option<PoolConnection<Postgres>>>>;

tokio::task_local! {
    static HELD: Slot;
}

impl Store {
    /// Run `fut` (one job) with the statements it makes through [`Store::on_conn`] on one
    /// connection (see the module's header). The connection goes back to the pool when `fut` ends.
    pub async fn holding_a_connection<F: Future>(fut: F) -> F::Output {
        HELD.scope(Slot::default(), fut).await
    }

    /// The pool's size.
    pub fn max_connections(&self) -> u32 {
        self.pool.options().get_max_connections()
    }

    /// The Postgres backend (process id) that serves this task's statements made through
    /// [`Store::on_conn`]: inside [`Store::holding_a_connection`] always the same one. For tests and
    /// diagnostics.
    pub async fn backend_pid(&self) -> Result<i32, StoreError> {
        self.on_conn(async |c| {
            Ok(sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(c)
                .await?)
        })
        .await
    }

    /// Run `f` on the connection held by the current job ([`Store::holding_a_connection`]), or on
    /// one from the pool for this call. `f` must not call back into the store (it would wait for
    /// the connection it holds).
    pub(crate) async fn on_conn<T>(
        &self,
        f: impl AsyncFnOnce(&mut PgConnection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Ok(slot) = HELD.try_with(Arc::clone) else {
            let mut conn = self.pool.acquire().await?;
            return f(&mut conn).await;
        };
        let mut held = slot.lock().await;
        let conn = match &mut *held {
            Some(c) => c,
            None => held.insert(self.pool.acquire().await?),
        };
        let r = f(conn).await;
        if r.is_err() {
            *held = None; // back to the pool, which tests it
        }
        r
    }
}
