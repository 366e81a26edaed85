//! The reconciliation's reads and writes. Position writes are compare-and-set on the row the sweep
//! read (side and quantity), so a write based on a stale read changes nothing: a job that committed
//! in between wins, and the next sweep looks again.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::Row;
use std::str::FromStr;
use uuid::Uuid;

use crate::domain::{Account, CredentialEnv, ExchangeKind, Job, OrderSide};
use crate::exchanges::{ExPosition, Leg, OrderAck};
use crate::executor::Outcome;
use crate::job::{ExitReason, FillState, JobStatus};
use crate::store::{pg_text, record_fills, PositionRow, Store, StoreError};

/// A `broker_orders` row in state `open`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenRow {
    pub client_order_id: String,
    pub job_id: Uuid,
    pub leg: Leg,
    pub side: OrderSide,
    pub quantity: Decimal,
    pub price: Option<Decimal>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Where a `broker_orders` row ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowState {
    Filled,
    Cancelled,
}

impl RowState {
    fn as_str(self) -> &'static str {
        match self {
            RowState::Filled => "filled",
            RowState::Cancelled => "cancelled",
        }
    }
}

/// A protective order's fill found at the broker, to be recorded as a trade of the job that placed
/// it.
#[derive(Clone, Debug)]
pub struct ProtectiveExit<'a> {
    pub account: &'a Account,
    pub symbol: &'a str,
    pub row: &'a OpenRow,
    pub ack: &'a OrderAck,
    pub pnl: Option<Decimal>,
    pub exit_reason: ExitReason,
}

fn leg_of(s: &str) -> Result<Leg, String> {
    match s {
        "open" => Ok(Leg::Open),
        "sl" => Ok(Leg::StopLoss),
        "tp" => Ok(Leg::TakeProfit),
        other => Err(format!("not a broker_orders leg: {other}")),
    }
}

fn side_of(s: &str) -> Result<OrderSide, String> {
    match s {
        "buy" => Ok(OrderSide::Buy),
        "sell" => Ok(OrderSide::Sell),
        other => Err(format!("not an order side: {other}")),
    }
}

fn decode(column: &str, e: String) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.into(),
        source: e.into(),
    }
}

/// The accounts with something to reconcile (a position row, or an open `broker_orders` row),
/// optionally of one user, in user order. Paper accounts are left out: the paper exchange's
/// positions are Sparky's own rows and nothing rests on it, so there is nothing to compare.
pub async fn accounts(store: &Store, user: Option<Uuid>) -> Result<Vec<Account>, StoreError> {
    accounts_where(store, user, None).await
}

/// [`accounts`] of the users in `partitions` (of `count`), selected in SQL by
/// `sparky_partition(user_id, count)`, the database's copy of [`crate::queue::partition_of`]:
/// a worker's sweep reads only the accounts of the partitions it owns.
pub async fn accounts_in_partitions(
    store: &Store,
    partitions: &[u32],
    count: u32,
) -> Result<Vec<Account>, StoreError> {
    accounts_where(store, None, Some((partitions, count))).await
}

async fn accounts_where(
    store: &Store,
    user: Option<Uuid>,
    partitions: Option<(&[u32], u32)>,
) -> Result<Vec<Account>, StoreError> {
    let (owned, count): (Option<Vec<i32>>, i32) = match partitions {
        Some((ps, n)) => (
            Some(ps.iter().filter_map(|p| i32::try_from(*p).ok()).collect()),
            i32::try_from(n).unwrap_or(i32::MAX),
        ),
        None => (None, 1),
    };
    let rows = sqlx::query(
        "WITH candidates AS (
           SELECT user_id, exchange, environment FROM positions
            WHERE exchange <> 'paper' AND ($1::uuid IS NULL OR user_id = $1)
           UNION
           SELECT user_id, exchange, environment FROM broker_orders
            WHERE state = 'open' AND exchange <> 'paper' AND ($1::uuid IS NULL OR user_id = $1)
         )
         SELECT user_id, exchange, environment FROM candidates
          WHERE $2::int[] IS NULL OR sparky_partition(user_id, $3) = ANY($2)
          ORDER BY 1, 2, 3",
    )
    .bind(user)
    .bind(owned)
    .bind(count)
    .fetch_all(&store.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let exchange: String = r.try_get("exchange")?;
        let environment: String = r.try_get("environment")?;
        out.push(Account {
            user_id: r.try_get("user_id")?,
            exchange: ExchangeKind::from_str(&exchange).map_err(|e| decode("exchange", e))?,
            environment: CredentialEnv::from_str(&environment)
                .map_err(|e| decode("environment", e))?,
        });
    }
    Ok(out)
}

/// The symbols of `account` with a position row or an open `broker_orders` row.
pub async fn symbols(store: &Store, account: &Account) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT symbol FROM positions WHERE user_id = $1 AND exchange = $2 AND environment = $3
         UNION
         SELECT symbol FROM broker_orders
          WHERE user_id = $1 AND exchange = $2 AND environment = $3 AND state = 'open'
         ORDER BY 1",
    )
    .bind(account.user_id)
    .bind(account.exchange.as_str())
    .bind(account.environment.as_str())
    .fetch_all(&store.pool)
    .await?)
}

/// The open `broker_orders` rows of `account` in `symbol`, oldest first.
pub async fn open_rows(
    store: &Store,
    account: &Account,
    symbol: &str,
) -> Result<Vec<OpenRow>, StoreError> {
    let rows = sqlx::query(
        "SELECT client_order_id, job_id, leg, side, quantity, price, expires_at FROM broker_orders
          WHERE user_id = $1 AND exchange = $2 AND environment = $3 AND symbol = $4 AND state = 'open'
          ORDER BY created_at, client_order_id",
    )
    .bind(account.user_id)
    .bind(account.exchange.as_str())
    .bind(account.environment.as_str())
    .bind(symbol)
    .fetch_all(&store.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let leg: String = r.try_get("leg")?;
        let side: String = r.try_get("side")?;
        out.push(OpenRow {
            client_order_id: r.try_get("client_order_id")?,
            job_id: r.try_get("job_id")?,
            leg: leg_of(&leg).map_err(|e| decode("leg", e))?,
            side: side_of(&side).map_err(|e| decode("side", e))?,
            quantity: r.try_get("quantity")?,
            price: r.try_get("price")?,
            expires_at: r.try_get("expires_at")?,
        });
    }
    Ok(out)
}

/// Move an open `broker_orders` row to `state`.
pub async fn mark(store: &Store, client_order_id: &str, state: RowState) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE broker_orders SET state = $2, updated_at = now()
          WHERE client_order_id = $1 AND state = 'open'",
    )
    .bind(client_order_id)
    .bind(state.as_str())
    .execute(&store.pool)
    .await?;
    Ok(())
}

/// Record a protective order's fill as a trade of the job that placed it (leg `sl`/`tp`) and mark
/// its row `filled`, in one transaction. A trade already recorded for that leg is left as it is.
/// A newly recorded exit raises its notification (`stop_loss_fired` / `take_profit_fired`) in the
/// same transaction.
pub async fn record_protective_exit(
    store: &Store,
    exit: &ProtectiveExit<'_>,
) -> Result<(), StoreError> {
    let mut tx = store.pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO trades (job_id, user_id, exchange, symbol, leg, side, quantity, price, client_order_id, exchange_order_id, status, environment, pnl, exit_reason, fee)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         ON CONFLICT (job_id, leg) DO NOTHING",
    )
    .bind(exit.row.job_id)
    .bind(exit.account.user_id)
    .bind(exit.account.exchange.as_str())
    .bind(exit.symbol)
    .bind(exit.row.leg.as_str())
    .bind(exit.row.side.as_str())
    .bind(exit.ack.filled_qty)
    .bind(exit.ack.avg_price.or(exit.row.price))
    .bind(pg_text(&exit.row.client_order_id))
    .bind(pg_text(&exit.ack.exchange_order_id))
    .bind(FillState::Filled)
    .bind(exit.account.environment.as_str())
    .bind(exit.pnl)
    .bind(exit.exit_reason)
    .bind(exit.ack.fee)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let kind = match exit.row.leg {
        Leg::StopLoss => Some(crate::notify::EventKind::StopLossFired),
        Leg::TakeProfit => Some(crate::notify::EventKind::TakeProfitFired),
        _ => None,
    };
    if let (1, Some(kind)) = (inserted, kind) {
        let data = serde_json::json!({
            "exchange": exit.account.exchange.as_str(),
            "environment": exit.account.environment.as_str(),
            "symbol": exit.symbol,
            "quantity": exit.ack.filled_qty,
            "price": exit.ack.avg_price.or(exit.row.price),
            "pnl": exit.pnl,
            "exit_reason": exit.exit_reason,
            "client_order_id": exit.row.client_order_id,
        });
        crate::notify::enqueue_event(
            &mut tx,
            exit.account.user_id,
            kind,
            Some(exit.row.job_id),
            data,
        )
        .await?;
    }
    sqlx::query(
        "UPDATE broker_orders SET state = 'filled', updated_at = now()
          WHERE client_order_id = $1 AND state = 'open'",
    )
    .bind(&exit.row.client_order_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Set Sparky's position in `symbol` to the broker's (`None`: flat -> the row is deleted), if the
/// row is still what the sweep read (`seen`; `None`: there was no row). `false` when it changed
/// meanwhile (a job committed): nothing is written.
pub async fn set_position(
    store: &Store,
    account: &Account,
    symbol: &str,
    seen: Option<&PositionRow>,
    broker: Option<&ExPosition>,
) -> Result<bool, StoreError> {
    let key = (
        account.user_id,
        account.exchange.as_str(),
        account.environment.as_str(),
    );
    let affected = match (seen, broker) {
        (None, None) => return Ok(true),
        (Some(s), None) => sqlx::query(
            "DELETE FROM positions
              WHERE user_id = $1 AND exchange = $2 AND environment = $3 AND symbol = $4
                AND side = $5 AND quantity = $6",
        )
        .bind(key.0)
        .bind(key.1)
        .bind(key.2)
        .bind(symbol)
        .bind(s.side.as_str())
        .bind(s.quantity)
        .execute(&store.pool)
        .await?
        .rows_affected(),
        (Some(s), Some(b)) => sqlx::query(
            "UPDATE positions SET side = $7, quantity = $8, entry_price = COALESCE($9, entry_price),
                    updated_at = now()
              WHERE user_id = $1 AND exchange = $2 AND environment = $3 AND symbol = $4
                AND side = $5 AND quantity = $6",
        )
        .bind(key.0)
        .bind(key.1)
        .bind(key.2)
        .bind(symbol)
        .bind(s.side.as_str())
        .bind(s.quantity)
        .bind(b.side.as_str())
        .bind(b.quantity)
        .bind(b.entry_price)
        .execute(&store.pool)
        .await?
        .rows_affected(),
        (None, Some(b)) => sqlx::query(
            "INSERT INTO positions (user_id, exchange, environment, symbol, side, quantity, entry_price)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (user_id, exchange, environment, symbol) DO NOTHING",
        )
        .bind(key.0)
        .bind(key.1)
        .bind(key.2)
        .bind(symbol)
        .bind(b.side.as_str())
        .bind(b.quantity)
        .bind(b.entry_price.unwrap_or_default())
        .execute(&store.pool)
        .await?
        .rows_affected(),
    };
    Ok(affected == 1)
}

/// Commit what the follower found for a `working` job: its new status, the open fill, the position
/// and the protection it placed (through [`record_fills`], like a job's own commit), and the entry
/// order's row moved to `entry_state`. `false` when the job is no longer `working` (someone else
/// moved it on): nothing is written.
pub async fn finish_working(
    store: &Store,
    job: &Job,
    outcome: &Outcome,
    entry: &OpenRow,
    entry_state: RowState,
) -> Result<bool, StoreError> {
    let mut tx = store.pool.begin().await?;
    let updated = sqlx::query(
        "UPDATE jobs SET status = $2, error_class = $3, error = $4, finished_at = now(), updated_at = now()
          WHERE job_id = $1 AND status = $5",
    )
    .bind(job.job_id)
    .bind(outcome.status)
    .bind(outcome.error_class)
    .bind(outcome.message.as_deref().map(pg_text))
    .bind(JobStatus::Working)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if updated == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    record_fills(&mut tx, job, outcome).await?;
    sqlx::query(
        "UPDATE broker_orders SET state = $2, updated_at = now()
          WHERE client_order_id = $1 AND state = 'open'",
    )
    .bind(&entry.client_order_id)
    .bind(entry_state.as_str())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// `working` jobs whose entry order a later alert cancelled (its row is `cancelled`). One whose
/// entry had filled in part before (the later job recorded that as this job's `open` trade) ends
/// `succeeded`, as partly filled; one with nothing filled ends `expired`. Returns them, with what
/// filled.
pub async fn finish_cancelled_entries(
    store: &Store,
    account: &Account,
) -> Result<Vec<(Uuid, Option<Decimal>)>, StoreError> {
    let mut tx = store.pool.begin().await?;
    let mut done: Vec<(Uuid, Option<Decimal>)> = sqlx::query_as(
        "UPDATE jobs j SET status = 'succeeded', finished_at = now(), updated_at = now(),
                error = 'partially filled: ' || t.quantity::text || ' ' || b.symbol
                        || ' filled before a later alert cancelled the rest'
           FROM broker_orders b
           JOIN trades t ON t.job_id = b.job_id AND t.leg = 'open'
          WHERE b.job_id = j.job_id AND b.leg = 'open' AND b.state = 'cancelled'
            AND j.status = 'working'
            AND b.user_id = $1 AND b.exchange = $2 AND b.environment = $3
          RETURNING j.job_id, t.quantity",
    )
    .bind(account.user_id)
    .bind(account.exchange.as_str())
    .bind(account.environment.as_str())
    .fetch_all(&mut *tx)
    .await?;
    let expired: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE jobs j SET status = 'expired', finished_at = now(), updated_at = now(),
                error = 'the working entry was cancelled by a later alert before it filled'
           FROM broker_orders b
          WHERE b.job_id = j.job_id AND b.leg = 'open' AND b.state = 'cancelled'
            AND j.status = 'working'
            AND b.user_id = $1 AND b.exchange = $2 AND b.environment = $3
          RETURNING j.job_id",
    )
    .bind(account.user_id)
    .bind(account.exchange.as_str())
    .bind(account.environment.as_str())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    done.extend(expired.into_iter().map(|j| (j, None)));
    Ok(done)
}
