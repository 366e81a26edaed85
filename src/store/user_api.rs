//! The SQL of the user API (issue 15): API tokens, and the per-user pages of jobs, trades,
//! positions and dead letters.
//!
//! Every read takes the owner's `user_id` and filters on it in SQL: a row of another user is never
//! read, so it cannot leak through a missing check in a handler (the API answers 404 for it).
//!
//! Pages are keyset-paginated, newest first, so a page boundary never moves while new rows arrive:
//! jobs by `job_id` (a UUIDv7 minted at the ingress: time-ordered), trades by their `id`
//! (bigserial), positions by (exchange, environment, symbol). A page asks for rows strictly after
//! the last key of the previous page, never for an offset.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::Row;
use uuid::Uuid;

use super::{job_row, JobRow, Store, StoreError, JOB_SELECT};
use crate::job::JobStatus;

/// The filters of `GET /v1/jobs` (and of `GET /v1/dead-letters`, with `statuses` fixed).
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Any of these statuses (empty: any status).
    pub statuses: Vec<JobStatus>,
    /// The exchange's symbol, upper-case (compared case-insensitively).
    pub symbol: Option<String>,
    pub exchange: Option<String>,
    /// `accepted_at >= since`
    pub since: Option<DateTime<Utc>>,
    /// `accepted_at < until`
    pub until: Option<DateTime<Utc>>,
}

/// One stored trade as the user API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct TradeRecord {
    pub id: i64,
    pub job_id: Uuid,
    pub exchange: String,
    /// `production` or `sandbox`: the account the order went to.
    pub environment: String,
    pub symbol: String,
    pub leg: String,
    pub side: String,
    pub quantity: Decimal,
    pub price: Option<Decimal>,
    pub status: String,
    pub pnl: Option<Decimal>,
    pub fee: Option<Decimal>,
    pub exit_reason: Option<String>,
    pub client_order_id: String,
    pub exchange_order_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// The keyset of a position page: (exchange, environment or "", symbol).
pub type PositionKey = (String, String, String);

impl Store {
    // ---- API tokens ----

    /// Store a new API token of `user_id` (given as its hash). Refused when there is no such user.
    pub async fn create_api_token(
        &self,
        user_id: Uuid,
        token_id: Uuid,
        token_hash: &str,
        label: Option<&str>,
    ) -> Result<(), StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO api_tokens (token_id, token_hash, user_id, label)
             SELECT $1, $2, user_id, $4 FROM users WHERE user_id = $3",
        )
        .bind(token_id)
        .bind(token_hash)
        .bind(user_id)
        .bind(label)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(StoreError::Conflict(format!("no user {user_id}")));
        }
        Ok(())
    }

    /// Revoke API tokens of `user_id`: the one with `token_id`, or all of them. Returns how many
    /// were revoked (0: none matched, or they already were).
    pub async fn revoke_api_tokens(
        &self,
        user_id: Uuid,
        token_id: Option<Uuid>,
    ) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "UPDATE api_tokens SET revoked_at = now()
             WHERE user_id = $1 AND ($2::uuid IS NULL OR token_id = $2) AND revoked_at IS NULL",
        )
        .bind(user_id)
        .bind(token_id)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// The owner of a valid (not revoked) API token, by its hash.
    pub async fn api_token_owner(&self, token_hash: &str) -> Result<Option<Uuid>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT user_id FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?)
    }

    // ---- pages ----

    /// A page of `user_id`'s jobs, newest first, strictly older than the job `after` (the cursor).
    pub async fn jobs_page(
        &self,
        user_id: Uuid,
        filter: &JobFilter,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<JobRow>, StoreError> {
        let statuses: Option<Vec<&str>> = if filter.statuses.is_empty() {
            None
        } else {
            Some(filter.statuses.iter().map(|s| s.as_str()).collect())
        };
        let rows = sqlx::query(&format!(
            "{JOB_SELECT}
             WHERE user_id = $1
               AND ($2::text[] IS NULL OR status = ANY($2))
               AND ($3::text IS NULL OR upper(symbol) = $3)
               AND ($4::text IS NULL OR lower(exchange) = $4)
               AND ($5::timestamptz IS NULL OR accepted_at >= $5)
               AND ($6::timestamptz IS NULL OR accepted_at < $6)
               AND ($7::uuid IS NULL OR job_id < $7)
             ORDER BY job_id DESC
             LIMIT $8"
        ))
        .bind(user_id)
        .bind(statuses)
        .bind(filter.symbol.as_deref())
        .bind(filter.exchange.as_deref())
        .bind(filter.since)
        .bind(filter.until)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(job_row).collect::<Result<_, _>>()?)
    }

    /// The job `job_id` if `user_id` owns it (another user's job is `None`, like a missing one).
    pub async fn job_of_user(
        &self,
        user_id: Uuid,
        job_id: Uuid,
    ) -> Result<Option<JobRow>, StoreError> {
        let r = sqlx::query(&format!("{JOB_SELECT} WHERE job_id = $1 AND user_id = $2"))
            .bind(job_id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(r.as_ref().map(job_row).transpose()?)
    }

    /// A page of `user_id`'s trades (order legs), newest first, strictly before the trade `after`.
    pub async fn trades_page(
        &self,
        user_id: Uuid,
        filter: &JobFilter,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<TradeRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, job_id, exchange, environment, symbol, leg, side, quantity, price, status, pnl, fee,
                    exit_reason, client_order_id, exchange_order_id, created_at
             FROM trades
             WHERE user_id = $1
               AND ($2::text IS NULL OR upper(symbol) = $2)
               AND ($3::text IS NULL OR lower(exchange) = $3)
               AND ($4::timestamptz IS NULL OR created_at >= $4)
               AND ($5::timestamptz IS NULL OR created_at < $5)
               AND ($6::bigint IS NULL OR id < $6)
             ORDER BY id DESC
             LIMIT $7",
        )
        .bind(user_id)
        .bind(filter.symbol.as_deref())
        .bind(filter.exchange.as_deref())
        .bind(filter.since)
        .bind(filter.until)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TradeRecord {
                    id: r.try_get("id")?,
                    job_id: r.try_get("job_id")?,
                    exchange: r.try_get("exchange")?,
                    environment: r.try_get("environment")?,
                    symbol: r.try_get("symbol")?,
                    leg: r.try_get("leg")?,
                    side: r.try_get("side")?,
                    quantity: r.try_get("quantity")?,
                    price: r.try_get("price")?,
                    status: r.try_get("status")?,
                    pnl: r.try_get("pnl")?,
                    fee: r.try_get("fee")?,
                    exit_reason: r.try_get("exit_reason")?,
                    client_order_id: r.try_get("client_order_id")?,
                    exchange_order_id: r.try_get("exchange_order_id")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    /// A page of `user_id`'s open positions, each as its row's JSON (every column the table has:
    /// the positions table gains columns, e.g. `environment`, as accounts are keyed finer), ordered
    /// by (exchange, environment, symbol), strictly after `after`.
    pub async fn positions_page(
        &self,
        user_id: Uuid,
        after: Option<&PositionKey>,
        limit: i64,
    ) -> Result<Vec<serde_json::Value>, StoreError> {
        let (ex, env, sym) = match after {
            Some((a, b, c)) => (Some(a.as_str()), Some(b.as_str()), Some(c.as_str())),
            None => (None, None, None),
        };
        let rows: Vec<serde_json::Value> = sqlx::query_scalar(
            "SELECT row FROM (
                SELECT to_jsonb(p) AS row, p.exchange AS ex,
                       coalesce(to_jsonb(p)->>'environment', '') AS env, p.symbol AS sym
                FROM positions p WHERE p.user_id = $1
             ) k
             WHERE $2::text IS NULL OR (ex, env, sym) > ($2, $3, $4)
             ORDER BY ex, env, sym
             LIMIT $5",
        )
        .bind(user_id)
        .bind(ex)
        .bind(env)
        .bind(sym)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}
