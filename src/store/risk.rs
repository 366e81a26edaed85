//! The SQL of risk limits (`src/risk.rs`) and of the account figures they and paper equity read.

use rust_decimal::Decimal;
use uuid::Uuid;

use super::{PositionRow, Store, StoreError};
use crate::domain::{Account, ExchangeKind};
use crate::risk::{RiskFacts, RiskLimits};
use chrono::{DateTime, NaiveTime, Utc};
use sqlx::Row;
use std::sync::LazyLock;

impl Store {
    /// The realized PnL recorded on `user`'s trades on `exchange`, all time (paper equity).
    pub async fn realized_pnl_total(
        &self,
        user: Uuid,
        exchange: ExchangeKind,
    ) -> Result<Decimal, StoreError> {
        let v: Option<Decimal> =
            sqlx::query_scalar("SELECT sum(pnl) FROM trades WHERE user_id = $1 AND exchange = $2")
                .bind(user)
                .bind(exchange.as_str())
                .fetch_one(&self.pool)
                .await?;
        Ok(v.unwrap_or_default())
    }
}

const LIMITS_SELECT: &str =
    "SELECT user_id, strategy, kill_switch, max_open_positions, max_position_usd,
    max_daily_loss, max_trades_per_day, trading_start, trading_end, time_zone, allow_symbols,
    deny_symbols, cooldown_secs, max_consecutive_failures, breaker_reset_at FROM risk_limits";

fn limits_row(r: &sqlx::postgres::PgRow) -> Result<RiskLimits, StoreError> {
    let strategy: String = r.try_get("strategy")?;
    let start: Option<NaiveTime> = r.try_get("trading_start")?;
    let end: Option<NaiveTime> = r.try_get("trading_end")?;
    Ok(RiskLimits {
        user_id: r.try_get("user_id")?,
        strategy: (!strategy.is_empty()).then_some(strategy),
        kill_switch: r.try_get("kill_switch")?,
        max_open_positions: r.try_get("max_open_positions")?,
        max_position_usd: r.try_get("max_position_usd")?,
        max_daily_loss: r.try_get("max_daily_loss")?,
        max_trades_per_day: r.try_get("max_trades_per_day")?,
        trading_hours: start.zip(end),
        time_zone: r.try_get("time_zone")?,
        allow_symbols: r.try_get("allow_symbols")?,
        deny_symbols: r.try_get("deny_symbols")?,
        cooldown_secs: r.try_get("cooldown_secs")?,
        max_consecutive_failures: r.try_get("max_consecutive_failures")?,
        breaker_reset_at: r.try_get("breaker_reset_at")?,
    })
}

/// The limits that apply to a job of the user in parameter `user` under the strategy (or '') in
/// parameter `strategy`: the user's row and the strategy's.
pub(super) fn limits_that_apply(user: &str, strategy: &str) -> String {
    format!("{LIMITS_SELECT} WHERE user_id = {user} AND (strategy = '' OR strategy = {strategy})")
}

/// The begin's upsert (`upsert`, returning `attempts`) that also reads the limits that apply to
/// the job (`$2` the user, `$10` the strategy or ''): one row per row of limits, or one row with
/// NULL limits when there are none. No row: the upsert did nothing (the job is final). Built once
/// (the caller keeps it in a `LazyLock`).
pub(super) fn begin_with_limits(upsert: &str) -> String {
    format!(
        "WITH b AS ({upsert})
         SELECT b.attempts, l.* FROM b LEFT JOIN ({}) l ON true
         ORDER BY l.strategy",
        limits_that_apply("$2", "$10")
    )
}

/// [`Store::risk_limits_for`]'s statement.
static LIMITS_FOR: LazyLock<String> =
    LazyLock::new(|| format!("{} ORDER BY strategy", limits_that_apply("$1", "$2")));

/// The limits in the rows of [`begin_with_limits`].
pub(super) fn limits_of_begin(
    rows: &[sqlx::postgres::PgRow],
) -> Result<Vec<RiskLimits>, StoreError> {
    let mut out = Vec::new();
    for r in rows {
        if r.try_get::<Option<Uuid>, _>("user_id")?.is_some() {
            out.push(limits_row(r)?);
        }
    }
    Ok(out)
}

/// [`Store::limits_and_position`]'s statement: `$1` the user and `$2` the strategy or '' (the
/// limits), `$3`-`$6` the account and symbol (the position).
static LIMITS_AND_POSITION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT p.user_id AS p_user_id, p.symbol AS p_symbol, p.exchange AS p_exchange,
                p.environment AS p_environment, p.side AS p_side, p.quantity AS p_quantity,
                p.entry_price AS p_entry_price, p.stop_loss_price AS p_stop_loss_price,
                p.take_profit_price AS p_take_profit_price, l.*
           FROM (SELECT 1) one
           LEFT JOIN positions p ON p.user_id = $3 AND p.exchange = $4 AND p.environment = $5
                                AND p.symbol = $6
           LEFT JOIN ({}) l ON true
          ORDER BY l.strategy",
        limits_that_apply("$1", "$2")
    )
});

/// `strategy` filter shared by the counting queries: `$2` NULL counts every job of the user.
const OF_STRATEGY: &str = "($2::text IS NULL OR j.alert->>'strategy' = $2)";

impl Store {
    /// The limits that apply to a job of `user` under `strategy`: the user's row and the
    /// strategy's, if they exist.
    pub async fn risk_limits_for(
        &self,
        user: Uuid,
        strategy: Option<&str>,
    ) -> Result<Vec<RiskLimits>, StoreError> {
        let q = sqlx::query(&LIMITS_FOR)
            .bind(user)
            .bind(strategy.unwrap_or(""));
        // On the job's held connection when there is one (a paper job reads its limits here when
        // the read with its position failed other than by an outage).
        let rows = self.on_conn(async |c| Ok(q.fetch_all(c).await?)).await?;
        rows.iter().map(limits_row).collect()
    }

    /// [`Store::risk_limits_for`] and [`Store::position`] of `account` in `symbol` as one
    /// statement (issue 17): a paper buy or sell evaluated without limits read with its start (a
    /// first delivery, which records no start) reads both before it opens, and each read of its
    /// own was a round trip. One row per row of limits, or one with NULL limits; the
    /// position's columns (prefixed `p_`) on every row.
    pub async fn limits_and_position(
        &self,
        user: Uuid,
        strategy: Option<&str>,
        account: &Account,
        symbol: &str,
    ) -> Result<(Vec<RiskLimits>, Option<PositionRow>), StoreError> {
        let q = sqlx::query(&LIMITS_AND_POSITION)
            .bind(user)
            .bind(strategy.unwrap_or(""))
            .bind(account.user_id)
            .bind(account.exchange.as_str())
            .bind(account.environment.as_str())
            .bind(symbol);
        let rows = self.on_conn(async |c| Ok(q.fetch_all(c).await?)).await?;
        let position = match rows.first() {
            Some(r) if r.try_get::<Option<String>, _>("p_side")?.is_some() => {
                Some(super::position_row_prefixed(r, "p_")?)
            }
            _ => None,
        };
        Ok((limits_of_begin(&rows)?, position))
    }

    /// Every row of limits of `user`.
    pub async fn risk_limits(&self, user: Uuid) -> Result<Vec<RiskLimits>, StoreError> {
        let rows = sqlx::query(&format!(
            "{LIMITS_SELECT} WHERE user_id = $1 ORDER BY strategy"
        ))
        .bind(user)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(limits_row).collect()
    }

    /// Create or replace a row of limits. The time zone is checked by Postgres (an unknown zone
    /// is an error, so a stored zone always evaluates).
    pub async fn upsert_risk_limits(&self, l: &RiskLimits) -> Result<(), StoreError> {
        sqlx::query("SELECT now() AT TIME ZONE $1")
            .bind(&l.time_zone)
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO risk_limits (user_id, strategy, kill_switch, max_open_positions, max_position_usd,
                max_daily_loss, max_trades_per_day, trading_start, trading_end, time_zone, allow_symbols,
                deny_symbols, cooldown_secs, max_consecutive_failures, breaker_reset_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
             ON CONFLICT (user_id, strategy) DO UPDATE SET kill_switch = EXCLUDED.kill_switch,
                max_open_positions = EXCLUDED.max_open_positions,
                max_position_usd = EXCLUDED.max_position_usd, max_daily_loss = EXCLUDED.max_daily_loss,
                max_trades_per_day = EXCLUDED.max_trades_per_day,
                trading_start = EXCLUDED.trading_start, trading_end = EXCLUDED.trading_end,
                time_zone = EXCLUDED.time_zone, allow_symbols = EXCLUDED.allow_symbols,
                deny_symbols = EXCLUDED.deny_symbols, cooldown_secs = EXCLUDED.cooldown_secs,
                max_consecutive_failures = EXCLUDED.max_consecutive_failures,
                breaker_reset_at = EXCLUDED.breaker_reset_at, updated_at = now()",
        )
        .bind(l.user_id)
        .bind(l.strategy.as_deref().unwrap_or(""))
        .bind(l.kill_switch)
        .bind(l.max_open_positions)
        .bind(l.max_position_usd)
        .bind(l.max_daily_loss)
        .bind(l.max_trades_per_day)
        .bind(l.trading_hours.map(|h| h.0))
        .bind(l.trading_hours.map(|h| h.1))
        .bind(&l.time_zone)
        .bind(&l.allow_symbols)
        .bind(&l.deny_symbols)
        .bind(l.cooldown_secs)
        .bind(l.max_consecutive_failures)
        .bind(l.breaker_reset_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What the counting rules of `l` read, for a job in `symbol`: one query. The day starts at
    /// midnight in `l.time_zone`.
    pub async fn risk_facts(&self, l: &RiskLimits, symbol: &str) -> Result<RiskFacts, StoreError> {
        let n = l.max_consecutive_failures.unwrap_or(0).max(0);
        let since: Option<DateTime<Utc>> = l.breaker_reset_at;
        let r = sqlx::query(&format!(
            "WITH day AS (SELECT date_trunc('day', now() AT TIME ZONE $3) AT TIME ZONE $3 AS start),
             today AS (
               SELECT t.leg, t.pnl, t.status FROM trades t JOIN jobs j USING (job_id), day
               WHERE t.user_id = $1 AND t.created_at >= day.start AND {OF_STRATEGY})
             SELECT
               (SELECT count(*) FROM positions p LEFT JOIN jobs j ON j.job_id = p.last_job_id
                 WHERE p.user_id = $1 AND {OF_STRATEGY}) AS open_positions,
               EXISTS (SELECT 1 FROM positions WHERE user_id = $1 AND symbol = $4) AS has_position,
               (SELECT coalesce(sum(pnl), 0) FROM today) AS realized_today,
               (SELECT count(*) FROM today WHERE leg = 'close' AND status = 'filled' AND pnl IS NULL)
                 AS unpriced_closes_today,
               (SELECT count(*) FROM today WHERE leg = 'open') AS opens_today,
               (now() AT TIME ZONE $3)::time AS local_time,
               (SELECT floor(extract(epoch FROM now() - max(t.created_at)))::bigint
                  FROM trades t JOIN jobs j USING (job_id)
                 WHERE t.user_id = $1 AND t.symbol = $4 AND t.leg = 'open' AND {OF_STRATEGY})
                 AS secs_since_last_open,
               (SELECT coalesce(array_agg(failed ORDER BY started_at DESC), '{{}}') FROM (
                  SELECT j.failed, j.started_at FROM jobs j
                   WHERE j.user_id = $1 AND {OF_STRATEGY}
                     AND j.status IN ('succeeded', 'succeeded_unprotected', 'rejected', 'dead')
                     AND ($5::timestamptz IS NULL OR j.started_at > $5)
                   ORDER BY j.started_at DESC LIMIT $6) recent) AS recent_failures"
        ))
        .bind(l.user_id)
        .bind(l.strategy.as_deref())
        .bind(&l.time_zone)
        .bind(symbol)
        .bind(since)
        .bind(i64::from(n))
        .fetch_one(&self.pool)
        .await?;
        Ok(RiskFacts {
            open_positions: r.try_get("open_positions")?,
            has_position: r.try_get("has_position")?,
            realized_today: r.try_get("realized_today")?,
            unpriced_closes_today: r.try_get("unpriced_closes_today")?,
            opens_today: r.try_get("opens_today")?,
            local_time: r.try_get("local_time")?,
            secs_since_last_open: r.try_get("secs_since_last_open")?,
            recent_failures: r.try_get("recent_failures")?,
        })
    }
}
