//! The working-order follower: entries a job left working at the broker (`broker_orders` leg
//! `open`, state `open`; the job `working`) followed until they fill or their time runs out.
//!
//! - Filled (or partly filled and final) -> the job's `open` trade, its position and its
//!   protection for what filled, at levels from the fill price ([`executor::follow_fill`]); the
//!   job ends `succeeded` (`succeeded_unprotected` if the protection could not be placed).
//! - Past `expires_at` and still working -> cancelled at the broker, then looked up again: what
//!   filled meanwhile is recorded as above, otherwise the job ends `expired`.
//! - Still working and in time -> left alone; what it has filled so far is returned, so the
//!   reconciliation counts that much of the broker's position as explained, not drift.
//!
//! Each is committed in one transaction that only moves a job that is still `working`.

use chrono::Utc;
use rust_decimal::Decimal;

use super::db::{self, OpenRow, RowState};
use super::{Finding, ReconcileError};
use crate::domain::{Account, Job, OrderSide, Symbol};
use crate::exchanges::{Exchange, ExchangeError, Leg, OrderAck};
use crate::executor::{self, Outcome};
use crate::job::JobStatus;
use crate::store::Store;

/// Follow every working entry of `account` in `sym`. Returns what the entries still working have
/// filled so far (signed: buys positive), which explains that much of a broker position Sparky
/// has no trade for yet (it is recorded when the entry ends).
pub(super) async fn follow_entries(
    store: &Store,
    ex: &dyn Exchange,
    account: &Account,
    sym: &Symbol,
    findings: &mut Vec<Finding>,
) -> Result<Decimal, ReconcileError> {
    let mut working = Decimal::ZERO;
    let rows = db::open_rows(store, account, sym.as_str()).await?;
    for row in rows.iter().filter(|r| r.leg == Leg::Open) {
        let Some((job, status)) = store.job_envelope(row.job_id).await? else {
            continue;
        };
        if status != JobStatus::Working {
            // Moved on already (a redelivery finished it): the row is no longer followed.
            db::mark(store, &row.client_order_id, RowState::Cancelled).await?;
            continue;
        }
        match follow_one(store, ex, account, sym, &job, row).await? {
            Followed::Done(f) => findings.push(f),
            Followed::Working(filled) => {
                let signed = match row.side {
                    OrderSide::Buy => filled,
                    OrderSide::Sell => -filled,
                };
                working = working.checked_add(signed).unwrap_or(working);
            }
            Followed::Nothing => {}
        }
    }
    Ok(working)
}

/// What following one entry came to.
enum Followed {
    /// It ended (filled, expired): recorded.
    Done(Finding),
    /// Still working, with this much filled so far.
    Working(Decimal),
    /// Moved on by someone else meanwhile.
    Nothing,
}

/// One working entry.
async fn follow_one(
    store: &Store,
    ex: &dyn Exchange,
    account: &Account,
    sym: &Symbol,
    job: &Job,
    row: &OpenRow,
) -> Result<Followed, ReconcileError> {
    let found = ex.find_order(sym, &row.client_order_id).await?;
    let expired = row.expires_at.is_some_and(|at| at <= Utc::now());
    let ack = match found {
        Some(ack) if ack.state.is_final() => ack,
        Some(ack) if !expired => return Ok(Followed::Working(ack.filled_qty)),
        Some(_) => match cancel_and_look_up(ex, sym, &row.client_order_id).await? {
            Some(ack) => ack,
            None => return expire(store, account, sym, job, row).await,
        },
        // Gone at the broker without a fill (cancelled there).
        None => return expire(store, account, sym, job, row).await,
    };
    if ack.filled_qty <= Decimal::ZERO {
        return expire(store, account, sym, job, row).await;
    }
    let outcome = executor::follow_fill(ex, job, ack.clone()).await?;
    let outcome = Outcome {
        environment: account.environment,
        ..outcome
    };
    if !db::finish_working(store, job, &outcome, row, RowState::Filled).await? {
        return Ok(Followed::Nothing);
    }
    Ok(Followed::Done(Finding::EntryFilled {
        symbol: sym.to_string(),
        job_id: job.job_id,
        quantity: ack.filled_qty,
        price: ack.avg_price.or(row.price),
        status: outcome.status,
    }))
}

/// Cancel a working entry whose time is up and look it up again: `Some` with what it filled, `None`
/// when nothing did.
async fn cancel_and_look_up(
    ex: &dyn Exchange,
    sym: &Symbol,
    client_order_id: &str,
) -> Result<Option<OrderAck>, ReconcileError> {
    let resting = ex
        .open_orders(sym)
        .await?
        .into_iter()
        .find(|o| o.client_order_id.as_deref() == Some(client_order_id));
    if let Some(o) = resting {
        ex.cancel_order(sym, &o).await?;
    }
    match ex.find_order(sym, client_order_id).await? {
        Some(ack) if !ack.state.is_final() => Err(ExchangeError::transient(format!(
            "working entry {client_order_id} is still open after its cancel"
        ))
        .into()),
        Some(ack) if ack.filled_qty > Decimal::ZERO => Ok(Some(ack)),
        _ => Ok(None),
    }
}

/// The job ends `expired`; its entry's row `cancelled`.
async fn expire(
    store: &Store,
    account: &Account,
    sym: &Symbol,
    job: &Job,
    row: &OpenRow,
) -> Result<Followed, ReconcileError> {
    let outcome = Outcome {
        environment: account.environment,
        ..Outcome::new(
            JobStatus::Expired,
            format!(
                "the working entry {} was cancelled unfilled (expired {})",
                row.client_order_id,
                row.expires_at
                    .map_or("at the broker".to_string(), |t| t.to_rfc3339())
            ),
        )
    };
    if !db::finish_working(store, job, &outcome, row, RowState::Cancelled).await? {
        return Ok(Followed::Nothing);
    }
    Ok(Followed::Done(Finding::EntryExpired {
        symbol: sym.to_string(),
        job_id: job.job_id,
    }))
}
