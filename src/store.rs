//! Postgres: the source of truth for users, webhook secrets, credentials, jobs, trades and positions.
//!
//! The worker writes a job's final state, its trade rows and the position change in ONE transaction
//! ([`Store::finish_job`]); only after that commit does it `XACK` the stream entry. `jobs.job_id` is
//! the primary key and `trades` is `UNIQUE (job_id, leg)`, so a job can never be recorded as having
//! placed two orders for one leg, whatever the worker does.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::Duration;
use uuid::Uuid;

use crate::domain::{Account, CredentialEnv, Job, Side};
use crate::executor::Outcome;
use crate::job::{FailureClass, FillState, JobStatus};

mod user_api;
pub use user_api::{JobFilter, PositionKey, TradeRecord};
mod begins;
pub use begins::{BeginStats, Begins};
pub(crate) mod commit;
mod held;
pub use held::{Holds, IDLE_HOLD, MAX_HOLD};
mod risk;
pub use commit::{record_fills, FirstStart};
mod strategies;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("the database is not migrated ({0}); run `sparky migrate` first")]
    NotMigrated(String),
    #[error("{0}")]
    Conflict(String),
    #[error("job {0} was started again by another delivery; this one's outcome is not recorded")]
    Superseded(Uuid),
}

impl StoreError {
    /// Postgres answered with a SQLSTATE of one of `classes` (its first two characters).
    fn sqlstate_in(&self, classes: &[&str]) -> bool {
        match self {
            StoreError::Db(sqlx::Error::Database(d)) => d
                .code()
                .is_some_and(|c| classes.iter().any(|class| c.starts_with(class))),
            _ => false,
        }
    }

    /// Postgres refused the job's *data*: SQLSTATE classes 22 (data exception: a value it cannot
    /// store) and 23 (integrity constraint), or a value that does not decode. Trying again cannot
    /// help, so the job ends after `SPARKY_MAX_DELIVERIES` tries. Everything else (connections, the
    /// pool, a read-only server during a failover, timeouts, serialization failures, disk full, ...)
    /// is the database's state, not the job's: worth waiting out, however long it takes.
    pub fn is_data_error(&self) -> bool {
        self.sqlstate_in(&["22", "23"])
            || matches!(
                self,
                StoreError::Db(
                    sqlx::Error::ColumnDecode { .. }
                        | sqlx::Error::Decode(_)
                        | sqlx::Error::TypeNotFound { .. },
                )
            )
    }

    /// Postgres answered that the statement cannot run as written (SQLSTATE classes 42: an
    /// undefined table or column, a missing privilege; 22: a value it cannot take; 0A: a feature
    /// it lacks). Running the same statement again gets the same answer; a transient refusal (a
    /// serialization failure or deadlock, class 40; a read-only standby, 25006) is not one.
    pub fn is_refused_statement(&self) -> bool {
        self.sqlstate_in(&["42", "22", "0A"])
    }

    /// Postgres cannot be reached or is overloaded (SQLSTATE classes 08, 53, 57, 58, or no answer
    /// at all): worth waiting out, as opposed to an error Postgres *answered* about the query.
    pub fn is_outage(&self) -> bool {
        self.sqlstate_in(&["08", "53", "57", "58"])
            || matches!(
                self,
                StoreError::Db(
                    sqlx::Error::Io(_)
                        | sqlx::Error::Tls(_)
                        | sqlx::Error::Protocol(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::WorkerCrashed,
                )
            )
    }
}

/// Text as Postgres accepts it: `text` and `jsonb` cannot hold NUL, which a broker's reply may
/// carry into an error message. (Alert text fields are refused with NUL at the ingress.)
pub(crate) fn pg_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// A `bot_credentials` row as stored (api_key/api_secret still encrypted).
#[derive(Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct CredentialRow {
    pub user_id: Uuid,
    pub exchange: String,
    pub api_key: String,
    pub api_secret: String,
    pub account_id: Option<String>,
    pub environment: String,
    pub extra_config: serde_json::Value,
    pub label: Option<String>,
}

impl std::fmt::Debug for CredentialRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialRow")
            .field("user_id", &self.user_id)
            .field("exchange", &self.exchange)
            .field("api_key", &"[redacted]")
            .field("api_secret", &"[redacted]")
            .field("account_id", &self.account_id)
            .field("environment", &self.environment)
            .field("label", &self.label)
            .finish()
    }
}

/// A stored open position.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PositionRow {
    pub user_id: Uuid,
    pub symbol: String,
    pub exchange: String,
    pub environment: CredentialEnv,
    pub side: Side,
    pub quantity: Decimal,
    pub entry_price: Decimal,
    pub stop_loss_price: Option<Decimal>,
    pub take_profit_price: Option<Decimal>,
}

/// A stored trade (one order leg).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TradeRow {
    pub job_id: Uuid,
    pub user_id: Uuid,
    pub exchange: String,
    pub symbol: String,
    pub leg: String,
    pub side: String,
    pub quantity: Decimal,
    pub price: Option<Decimal>,
    pub client_order_id: String,
    pub exchange_order_id: Option<String>,
    pub status: FillState,
}

/// A stored job.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobRow {
    pub job_id: Uuid,
    pub user_id: Uuid,
    pub partition: i32,
    pub entry_id: String,
    pub exchange: String,
    pub action: String,
    pub symbol: String,
    pub status: JobStatus,
    pub attempts: i32,
    pub error_class: Option<FailureClass>,
    pub error: Option<String>,
    pub accepted_at: DateTime<Utc>,
    /// When the last delivery started executing it.
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What [`Store::begin_job`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Run it; `attempt` counts deliveries (1 on the first). On `attempt > 1` the previous delivery
    /// may have placed orders already: the executor looks them up before placing anything.
    /// `limits`: the risk limits that apply to the job, read by the same statement for an opening
    /// job (`None`: not read, for a close, or when they could not be read: the risk check reads
    /// them itself and says why it cannot).
    Execute {
        attempt: i32,
        limits: Option<Vec<crate::risk::RiskLimits>>,
    },
    /// The job already reached this final state: ack the entry, do nothing.
    Finished(JobStatus),
}

#[derive(Clone)]
pub struct Store {
    pub pool: PgPool,
}

impl Store {
    /// A store on `pool`, as any other.
    pub fn from_pool(pool: PgPool) -> Store {
        Store { pool }
    }

    /// A pool that pings a connection before handing it out (one round trip), so a connection
    /// that died while idle (Postgres restarted, a proxy dropped it) is replaced before use: for
    /// callers that cannot run a statement again (the ingress answers a webhook once).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        Self::connect_with(url, max_connections, true).await
    }

    /// A pool that hands connections out untested: a connection that died while idle fails its
    /// next statement once. For callers that retry every statement on a connection error: the
    /// worker, whose job uses the pool four times (issue 17: a ping each was a quarter of its
    /// round trips). sqlx still pings a connection when it goes back to the pool.
    pub async fn connect_retrying(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        Self::connect_with(url, max_connections, false).await
    }

    async fn connect_with(
        url: &str,
        max_connections: u32,
        test_before_acquire: bool,
    ) -> Result<Store, StoreError> {
        let opts = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(test_before_acquire)
            .connect_with(opts)
            .await?;
        Ok(Store::from_pool(pool))
    }

    /// Another pool of at most `max_connections` to the same database, connecting on first use.
    /// The ingress's secret look-ups run on one, so however they are loaded they can never take a
    /// connection from anything else.
    pub fn sibling(&self, max_connections: u32, acquire_timeout: Duration) -> Store {
        let opts = (*self.pool.connect_options()).clone();
        Store::from_pool(
            PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(acquire_timeout)
                .connect_lazy_with(opts),
        )
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Refuse to run against a database that lacks any of this build's migrations.
    pub async fn check_migrated(&self) -> Result<(), StoreError> {
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM information_schema.tables WHERE table_name = '_sqlx_migrations')",
        )
        .fetch_one(&self.pool)
        .await?;
        if !exists {
            return Err(StoreError::NotMigrated("no migrations applied".into()));
        }
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await?;
        let missing: Vec<String> = MIGRATOR
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .map(|m| format!("{} {}", m.version, m.description))
            .collect();
        if !missing.is_empty() {
            return Err(StoreError::NotMigrated(format!(
                "missing: {}",
                missing.join(", ")
            )));
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // ---- users and webhook secrets ----

    /// Create a user with a first webhook secret (given as its hash).
    pub async fn create_user(
        &self,
        user_id: Uuid,
        label: Option<&str>,
        secret_hash: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO users (user_id, label) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(user_id)
        .bind(label)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(StoreError::Conflict(format!(
                "user {user_id} already exists (use `sparky user rotate-secret --user {user_id}` for a new secret)"
            )));
        }
        sqlx::query("INSERT INTO webhook_secrets (secret_hash, user_id) VALUES ($1, $2)")
            .bind(secret_hash)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Revoke every secret of the user and add a new one (given as its hash).
    pub async fn rotate_secret(&self, user_id: Uuid, secret_hash: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE user_id = $1)")
                .bind(user_id)
                .fetch_one(&mut *tx)
                .await?;
        if !exists {
            return Err(StoreError::Conflict(format!("no user {user_id}")));
        }
        sqlx::query(
            "UPDATE webhook_secrets SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
        )
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO webhook_secrets (secret_hash, user_id) VALUES ($1, $2)")
            .bind(secret_hash)
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The owner of a (non-revoked) webhook secret hash.
    pub async fn secret_owner(&self, secret_hash: &str) -> Result<Option<Uuid>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT user_id FROM webhook_secrets WHERE secret_hash = $1 AND revoked_at IS NULL",
        )
        .bind(secret_hash)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The owners of those of `secret_hashes` that are valid (not revoked) webhook secrets, in one
    /// query (the ingress batches its uncached look-ups through this).
    pub async fn secret_owners(
        &self,
        secret_hashes: &[String],
    ) -> Result<Vec<(String, Uuid)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT secret_hash, user_id FROM webhook_secrets
             WHERE secret_hash = ANY($1) AND revoked_at IS NULL",
        )
        .bind(secret_hashes)
        .fetch_all(&self.pool)
        .await?)
    }

    // ---- credentials ----

    /// Insert or replace the credential row of (user, exchange, environment).
    pub async fn upsert_credentials(&self, row: &CredentialRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO bot_credentials (user_id, exchange, api_key, api_secret, account_id, environment, extra_config, label)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (user_id, exchange, environment) DO UPDATE SET
               api_key = EXCLUDED.api_key, api_secret = EXCLUDED.api_secret, account_id = EXCLUDED.account_id,
               extra_config = EXCLUDED.extra_config, label = EXCLUDED.label, updated_at = now()",
        )
        .bind(row.user_id)
        .bind(&row.exchange)
        .bind(&row.api_key)
        .bind(&row.api_secret)
        .bind(&row.account_id)
        .bind(&row.environment)
        .bind(&row.extra_config)
        .bind(&row.label)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The credential row for (user, exchange). With `environment` given, exactly that row; without,
    /// the `production` row if there is one, else the `sandbox` row.
    pub async fn load_credentials(
        &self,
        user_id: Uuid,
        exchange: &str,
        environment: Option<&str>,
    ) -> Result<Option<CredentialRow>, StoreError> {
        let row = sqlx::query(
            "SELECT user_id, exchange, api_key, api_secret, account_id, environment, extra_config, label
             FROM bot_credentials
             WHERE user_id = $1 AND lower(exchange) = $2 AND ($3::text IS NULL OR environment = $3)
             ORDER BY (environment = 'production') DESC, id
             LIMIT 1",
        )
        .bind(user_id)
        .bind(exchange)
        .bind(environment)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| CredentialRow {
            user_id: r.get("user_id"),
            exchange: r.get("exchange"),
            api_key: r.get("api_key"),
            api_secret: r.get("api_secret"),
            account_id: r.get("account_id"),
            environment: r.get("environment"),
            extra_config: r
                .get::<Option<serde_json::Value>, _>("extra_config")
                .unwrap_or(serde_json::Value::Null),
            label: r.get("label"),
        }))
    }

    // ---- jobs ----

    /// Record that a delivery of `job` starts executing, or learn that it already finished.
    ///
    /// For an opening job (buy, sell) the same statement also reads the risk limits that apply to
    /// it ([`Begin::Execute`]'s `limits`): the risk check then needs no read of its own for a user
    /// without limits, one round trip fewer. If Postgres refuses that statement as written
    /// ([`StoreError::is_refused_statement`]: the limits cannot be read), the job is begun without
    /// them: the risk check reads them itself and blocks the job, and a close still runs. Any
    /// other error (an outage, a serialization failure) is returned as it is, for the caller to
    /// retry the same statement.
    pub async fn begin_job(
        &self,
        job: &Job,
        partition: u32,
        entry_id: &str,
    ) -> Result<Begin, StoreError> {
        if reads_limits_at_begin(job) {
            match self.begin(job, partition, entry_id, true).await {
                // Postgres refused the statement (so nothing of it was written): start without.
                Err(e) if e.is_refused_statement() => {
                    tracing::warn!(error = %e, "the job's start could not read its risk limits; starting it without them");
                }
                r => return r,
            }
        }
        self.begin(job, partition, entry_id, false).await
    }

    async fn begin(
        &self,
        job: &Job,
        partition: u32,
        entry_id: &str,
        with_limits: bool,
    ) -> Result<Begin, StoreError> {
        let a = &job.alert;
        let sql: &str = if with_limits {
            &BEGIN_WITH_LIMITS
        } else {
            &BEGIN
        };
        let mut q = sqlx::query(sql)
            .bind(job.job_id)
            .bind(a.user_id)
            .bind(partition as i32)
            .bind(entry_id)
            .bind(a.exchange.as_str())
            .bind(a.action.as_str())
            .bind(a.symbol.as_str())
            .bind(serde_json::to_value(a).expect("alert serialises"))
            .bind(job.accepted_at);
        if with_limits {
            q = q.bind(a.strategy.as_deref().unwrap_or(""));
        }
        let rows = self.on_conn(async |c| Ok(q.fetch_all(c).await?)).await?;
        if !rows.is_empty() {
            return begun(&rows, with_limits);
        }
        let status =
            sqlx::query_scalar("SELECT status FROM jobs WHERE job_id = $1").bind(job.job_id);
        let status: JobStatus = self
            .on_conn(async |c| Ok(status.fetch_one(c).await?))
            .await?;
        Ok(Begin::Finished(status))
    }

    /// Commit a job's final state, its trades and the position change, in one statement (so one
    /// transaction and one round trip: [`commit`]).
    ///
    /// Fenced by the delivery: only the delivery that [`Store::begin_job`] last started (its
    /// `attempt`) may finish the job. A delivery that was overtaken (its worker lost the partition
    /// and another worker started the job again) gets [`StoreError::Superseded`] and nothing is
    /// written, so a late commit can never overwrite a newer outcome or position.
    pub async fn finish_job(
        &self,
        job: &Job,
        outcome: &Outcome,
        attempt: i32,
    ) -> Result<(), StoreError> {
        if self
            .on_conn(async |c| commit::finish(c, job, outcome, attempt).await)
            .await?
        {
            Ok(())
        } else {
            Err(StoreError::Superseded(job.job_id))
        }
    }

    /// Commit a delivery whose start was not written ([`commit::finish_first`]): the job's row
    /// is inserted with its outcome, in one statement. [`StoreError::Superseded`] when the job
    /// already had a row (nothing was written).
    pub async fn finish_first(
        &self,
        job: &Job,
        outcome: &Outcome,
        first: &commit::FirstStart<'_>,
    ) -> Result<(), StoreError> {
        if self
            .on_conn(async |c| commit::finish_first(c, job, outcome, first).await)
            .await?
        {
            Ok(())
        } else {
            Err(StoreError::Superseded(job.job_id))
        }
    }

    /// End a job that cannot run to its commit (its alert breaks a bound, or the worker failed
    /// around it) in a failed state, if it has a row that is not final yet. `false` when no such
    /// row exists (it was never begun, or it already finished).
    pub async fn mark_failed(&self, job_id: Uuid, outcome: &Outcome) -> Result<bool, StoreError> {
        self.on_conn(async |c| Self::mark_failed_on(c, job_id, outcome).await)
            .await
    }

    async fn mark_failed_on(
        conn: &mut sqlx::PgConnection,
        job_id: Uuid,
        outcome: &Outcome,
    ) -> Result<bool, StoreError> {
        let mut tx = sqlx::Connection::begin(conn).await?;
        let alert: Option<serde_json::Value> = sqlx::query_scalar(
            "UPDATE jobs SET status = $2, error_class = $3, error = $4, finished_at = now(), updated_at = now()
             WHERE job_id = $1 AND status IN ('queued', 'executing')
             RETURNING alert",
        )
        .bind(job_id)
        .bind(outcome.status)
        .bind(outcome.error_class)
        .bind(outcome.message.as_deref().map(pg_text))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(alert) = alert else {
            tx.rollback().await?;
            return Ok(false);
        };
        // The user's notification, in the same transaction (issue 15). A stored alert that no
        // longer reads back has no notification (the job row still says what happened).
        if let Ok(alert) = serde_json::from_value(alert) {
            crate::notify::record_job_outcome(&mut tx, job_id, &alert, outcome).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    pub async fn get_job(&self, job_id: Uuid) -> Result<Option<JobRow>, StoreError> {
        let q = sqlx::query(&JOB_BY_ID).bind(job_id);
        let r = self
            .on_conn(async |c| Ok(q.fetch_optional(c).await?))
            .await?;
        Ok(r.as_ref().map(job_row).transpose()?)
    }

    /// A stored job as it was enqueued (for replays).
    pub async fn job_envelope(&self, job_id: Uuid) -> Result<Option<(Job, JobStatus)>, StoreError> {
        let r = sqlx::query("SELECT alert, accepted_at, status FROM jobs WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?;
        let Some(r) = r else { return Ok(None) };
        let alert: serde_json::Value = r.get("alert");
        let alert = serde_json::from_value(alert).map_err(|e| {
            StoreError::Conflict(format!("job {job_id} has an unreadable alert: {e}"))
        })?;
        Ok(Some((
            Job {
                job_id,
                accepted_at: r.get("accepted_at"),
                alert,
            },
            r.try_get("status")?,
        )))
    }

    /// Failed (`rejected` / `dead`) jobs, newest first, optionally of one user and time range.
    pub async fn failed_jobs(
        &self,
        user: Option<Uuid>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<JobRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "{JOB_SELECT}
             WHERE failed
               AND ($1::uuid IS NULL OR user_id = $1)
               AND ($2::timestamptz IS NULL OR accepted_at >= $2)
               AND ($3::timestamptz IS NULL OR accepted_at <= $3)
             ORDER BY accepted_at DESC
             LIMIT $4"
        ))
        .bind(user)
        .bind(since)
        .bind(until)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job_row).collect::<Result<_, _>>()?)
    }

    /// Move a failed job back to `queued` for a replay (only one concurrent replay wins). Returns
    /// the status it had, or `None` if it was not failed (any more).
    pub async fn requeue_failed(&self, job_id: Uuid) -> Result<Option<JobStatus>, StoreError> {
        let entry = serde_json::json!([{"at": Utc::now(), "class": "replay", "message": "re-enqueued by `sparky replay`"}]);
        Ok(sqlx::query_scalar(
            "UPDATE jobs j SET status = 'queued', attempts = 0, updated_at = now(),
                    history = j.history || $2::jsonb
             FROM (SELECT job_id, status AS old FROM jobs WHERE job_id = $1 FOR UPDATE) o
             WHERE j.job_id = o.job_id AND o.old IN ('rejected', 'dead')
             RETURNING o.old",
        )
        .bind(job_id)
        .bind(entry)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Undo [`Store::requeue_failed`] when the re-enqueue itself failed.
    pub async fn undo_requeue(&self, job_id: Uuid, status: JobStatus) -> Result<(), StoreError> {
        sqlx::query("UPDATE jobs SET status = $2 WHERE job_id = $1 AND status = 'queued'")
            .bind(job_id)
            .bind(status)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn trades_of_job(&self, job_id: Uuid) -> Result<Vec<TradeRow>, StoreError> {
        let rows = sqlx::query(&format!("{TRADE_SELECT} WHERE job_id = $1 ORDER BY id"))
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(trade_row).collect::<Result<_, _>>()?)
    }

    pub async fn trades_of_user(&self, user_id: Uuid) -> Result<Vec<TradeRow>, StoreError> {
        let rows = sqlx::query(&format!("{TRADE_SELECT} WHERE user_id = $1 ORDER BY id"))
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(trade_row).collect::<Result<_, _>>()?)
    }

    /// A trade by its client order id (how the paper exchange answers order look-ups).
    pub async fn trade_by_client_order_id(
        &self,
        user_id: Uuid,
        client_order_id: &str,
    ) -> Result<Option<TradeRow>, StoreError> {
        let r = sqlx::query(&format!(
            "{TRADE_SELECT} WHERE user_id = $1 AND client_order_id = $2"
        ))
        .bind(user_id)
        .bind(client_order_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(r.as_ref().map(trade_row).transpose()?)
    }

    /// The open position of one account in `symbol`.
    pub async fn position(
        &self,
        account: &Account,
        symbol: &str,
    ) -> Result<Option<PositionRow>, StoreError> {
        let q = sqlx::query(&POSITION_OF)
            .bind(account.user_id)
            .bind(account.exchange.as_str())
            .bind(account.environment.as_str())
            .bind(symbol);
        let r = self
            .on_conn(async |c| Ok(q.fetch_optional(c).await?))
            .await?;
        Ok(r.as_ref().map(position_row).transpose()?)
    }

    /// Every open position of a user, on every account, in account then symbol order.
    pub async fn positions_of_user(&self, user_id: Uuid) -> Result<Vec<PositionRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "{POSITION_SELECT} WHERE user_id = $1 ORDER BY exchange, environment, symbol"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(position_row).collect::<Result<_, _>>()?)
    }
}

/// Does a job's start read the risk limits that apply to it (an opening job's do)?
fn reads_limits_at_begin(job: &Job) -> bool {
    crate::risk::limits_apply(job.alert.action)
}

/// A started job's answer from its rows of [`BEGIN`] or [`begins`]' statement (at least one; with
/// `with_limits`, one per row of limits that apply). The start is committed: limits that do not
/// decode are not read (the check reads them again and blocks the job, saying why), never a reason
/// to start it again.
fn begun(rows: &[sqlx::postgres::PgRow], with_limits: bool) -> Result<Begin, StoreError> {
    let limits = match with_limits.then(|| risk::limits_of_begin(rows)) {
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "the job's risk limits read with its start do not decode");
            None
        }
        None => None,
    };
    Ok(Begin::Execute {
        attempt: rows[0].try_get("attempts")?,
        limits,
    })
}

/// The columns a job's start writes ([`BEGIN`], and [`begins`] for many jobs).
const BEGIN_INTO: &str = "INSERT INTO jobs (job_id, user_id, partition, entry_id, exchange, action,
     symbol, alert, status, attempts, accepted_at, started_at)";

/// A job's start when its row exists: a new delivery of a job that is not final (no row returned
/// for a final one).
const BEGIN_AGAIN: &str = "ON CONFLICT (job_id) DO UPDATE SET
       attempts = jobs.attempts + 1, status = 'executing', partition = EXCLUDED.partition,
       entry_id = EXCLUDED.entry_id, started_at = now(), updated_at = now()
     WHERE jobs.status IN ('queued', 'executing')";

/// The start of a job's delivery (the attempt fence): `attempts`, or no row when the job is final.
static BEGIN: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{BEGIN_INTO} VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'executing', 1, $9, now())
         {BEGIN_AGAIN} RETURNING attempts"
    )
});

/// [`BEGIN`] that also reads the job's risk limits ([`risk::begin_with_limits`]).
static BEGIN_WITH_LIMITS: LazyLock<String> = LazyLock::new(|| risk::begin_with_limits(&BEGIN));

/// [`Store::get_job`]'s statement.
static JOB_BY_ID: LazyLock<String> = LazyLock::new(|| format!("{JOB_SELECT} WHERE job_id = $1"));

/// [`Store::position`]'s statement.
static POSITION_OF: LazyLock<String> = LazyLock::new(|| {
    format!("{POSITION_SELECT} WHERE user_id = $1 AND exchange = $2 AND environment = $3 AND symbol = $4")
});

/// The columns [`job_row`] reads.
const JOB_SELECT: &str = "SELECT job_id, user_id, partition, entry_id, exchange, action, symbol,
    status, attempts, error_class, error, accepted_at, started_at, finished_at FROM jobs";

/// The columns [`position_row`] reads.
const POSITION_SELECT: &str = "SELECT user_id, symbol, exchange, environment, side, quantity,
    entry_price, stop_loss_price, take_profit_price FROM positions";

fn position_row(r: &sqlx::postgres::PgRow) -> Result<PositionRow, sqlx::Error> {
    position_row_prefixed(r, "")
}

/// A position from the columns [`POSITION_SELECT`] names, each with `prefix` in front.
fn position_row_prefixed(
    r: &sqlx::postgres::PgRow,
    prefix: &str,
) -> Result<PositionRow, sqlx::Error> {
    // No allocation for the unprefixed columns (every other position read).
    let col = |name: &'static str| -> std::borrow::Cow<'static, str> {
        if prefix.is_empty() {
            name.into()
        } else {
            format!("{prefix}{name}").into()
        }
    };
    let side: &str = r.try_get(&*col("side"))?;
    let environment: &str = r.try_get(&*col("environment"))?;
    let decode = |column: &'static str, e: String| sqlx::Error::ColumnDecode {
        index: col(column).into_owned(),
        source: e.into(),
    };
    Ok(PositionRow {
        user_id: r.try_get(&*col("user_id"))?,
        symbol: r.try_get(&*col("symbol"))?,
        exchange: r.try_get(&*col("exchange"))?,
        environment: CredentialEnv::from_str(environment).map_err(|e| decode("environment", e))?,
        side: Side::from_str(side).map_err(|e| decode("side", e))?,
        quantity: r.try_get(&*col("quantity"))?,
        entry_price: r.try_get(&*col("entry_price"))?,
        stop_loss_price: r.try_get(&*col("stop_loss_price"))?,
        take_profit_price: r.try_get(&*col("take_profit_price"))?,
    })
}

/// The columns [`trade_row`] reads.
const TRADE_SELECT: &str = "SELECT job_id, user_id, exchange, symbol, leg, side, quantity, price,
    client_order_id, exchange_order_id, status FROM trades";

fn job_row(r: &sqlx::postgres::PgRow) -> Result<JobRow, sqlx::Error> {
    Ok(JobRow {
        job_id: r.try_get("job_id")?,
        user_id: r.try_get("user_id")?,
        partition: r.try_get("partition")?,
        entry_id: r.try_get("entry_id")?,
        exchange: r.try_get("exchange")?,
        action: r.try_get("action")?,
        symbol: r.try_get("symbol")?,
        status: r.try_get("status")?,
        attempts: r.try_get("attempts")?,
        error_class: r.try_get("error_class")?,
        error: r.try_get("error")?,
        accepted_at: r.try_get("accepted_at")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}

fn trade_row(r: &sqlx::postgres::PgRow) -> Result<TradeRow, sqlx::Error> {
    Ok(TradeRow {
        job_id: r.try_get("job_id")?,
        user_id: r.try_get("user_id")?,
        exchange: r.try_get("exchange")?,
        symbol: r.try_get("symbol")?,
        leg: r.try_get("leg")?,
        side: r.try_get("side")?,
        quantity: r.try_get("quantity")?,
        price: r.try_get("price")?,
        client_order_id: r.try_get("client_order_id")?,
        exchange_order_id: r.try_get("exchange_order_id")?,
        status: r.try_get("status")?,
    })
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::StoreError;

    /// An error Postgres answered with `code`.
    #[derive(Debug)]
    struct Answered(&'static str);

    impl std::fmt::Display for Answered {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Answered {}

    impl sqlx::error::DatabaseError for Answered {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn answered(code: &'static str) -> StoreError {
        StoreError::Db(sqlx::Error::Database(Box::new(Answered(code))))
    }

    #[test]
    fn a_statement_refused_as_written_is_told_from_a_transient_refusal_and_an_outage() {
        // undefined table, undefined column, no privilege, NUL in text, bad JSON, unsupported
        for code in ["42P01", "42703", "42501", "22021", "22P02", "0A000"] {
            let e = answered(code);
            assert!(e.is_refused_statement(), "{code}");
            assert!(!e.is_outage(), "{code}");
        }
        // the job's data: a value Postgres cannot store, a constraint
        for code in ["22021", "22003", "23505", "23514"] {
            assert!(answered(code).is_data_error(), "{code}");
        }
        for code in ["42P01", "40001", "25006", "53300"] {
            assert!(!answered(code).is_data_error(), "{code}");
        }
        // serialization failure, deadlock, read-only standby: the same statement may pass later
        for code in ["40001", "40P01", "25006"] {
            let e = answered(code);
            assert!(!e.is_refused_statement(), "{code}");
            assert!(!e.is_outage(), "{code}");
        }
        // too many connections, admin shutdown, connection failure
        for code in ["53300", "57P01", "08006"] {
            let e = answered(code);
            assert!(!e.is_refused_statement(), "{code}");
            assert!(e.is_outage(), "{code}");
        }
        let undecodable = StoreError::Db(sqlx::Error::Decode("NaN".into()));
        assert!(undecodable.is_data_error());
        assert!(!undecodable.is_outage());
        let no_answer = StoreError::Db(sqlx::Error::PoolTimedOut);
        assert!(!no_answer.is_refused_statement());
        assert!(no_answer.is_outage());
        assert!(!no_answer.is_data_error());
    }
}
