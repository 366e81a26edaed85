//! Closing a position until the broker shows what the job wants: the position's protective orders
//! cancelled first, then up to three close orders ([`Leg::CLOSES`]), each for what the broker still
//! holds beyond the target, with the broker's position read after each.

use rust_decimal::Decimal;

use super::protect::{self, Levels, Listing};
use super::{place_leg, still_ours, Fill, Outcome, PositionChange, Progress};
use crate::domain::{Job, OrderSide, OrderType, Side};
use crate::exchanges::{
    client_order_id, ExPosition, Exchange, ExchangeError, Leg, OrderAck, OrderRequest,
};
use crate::job::{ExitReason, FailureClass, FillState, JobStatus};
use crate::money;
use crate::partition::Fence;
use crate::sizing::round_down;

/// Where a close left the position.
pub(super) struct Closed {
    /// The broker's position after the close orders (`None`: flat).
    pub remaining: Option<ExPosition>,
    /// Protection re-placed for a partial close's remainder could not be placed.
    pub unprotected: Option<ExchangeError>,
    /// The levels the remainder is protected at.
    levels: Levels,
}

impl Closed {
    /// The job's outcome: succeeded when the broker holds `target` (flat for 0), `dead` with the
    /// numbers when more is still open after every close order.
    pub fn into_outcome(
        self,
        job: &Job,
        target: Decimal,
        progress: &mut Progress,
    ) -> Result<Outcome, ExchangeError> {
        let held = self
            .remaining
            .as_ref()
            .map_or(Decimal::ZERO, |p| p.quantity);
        if held > target {
            return Ok(stuck(job, self.remaining.as_ref(), target, progress));
        }
        let mut outcome = super::done(progress);
        if let Some(e) = self.unprotected {
            outcome.status = JobStatus::SucceededUnprotected;
            outcome.message = Some(format!(
                "the remaining position is not protected: {}",
                e.message
            ));
            outcome.error_class = Some(e.class.into());
        }
        outcome.position = held_position(self.remaining.as_ref(), self.levels);
        Ok(outcome)
    }
}

/// Sparky's record of what the broker holds after a close: flat, or the position with `levels`
/// (its re-placed protection; none while it is unprotected).
fn held_position(held: Option<&ExPosition>, levels: Levels) -> PositionChange {
    match held {
        None => PositionChange::Flat,
        Some(p) => PositionChange::Open {
            side: p.side,
            quantity: p.quantity,
            entry_price: p.entry_price.unwrap_or_default(),
            stop_loss_price: levels.stop_loss,
            take_profit_price: levels.take_profit,
        },
    }
}

/// The outcome of a job whose closes left more open at the broker than it wanted.
fn stuck(
    job: &Job,
    held: Option<&ExPosition>,
    target: Decimal,
    progress: &mut Progress,
) -> Outcome {
    let closed = progress
        .fills
        .iter()
        .filter(|f| f.leg.is_close())
        .try_fold(Decimal::ZERO, |s, f| s.checked_add(f.quantity))
        .unwrap_or_default();
    let (side, qty) = held.map_or(("flat", Decimal::ZERO), |p| (p.side.as_str(), p.quantity));
    let message = format!(
        "closing {}: {} orders filled {} in all, but {side} {} remain open at the broker (wanted {}); nothing new was opened. Send a close alert for the rest",
        job.alert.symbol,
        progress.fills.iter().filter(|f| f.leg.is_close()).count(),
        closed.normalize(),
        qty.normalize(),
        target.normalize(),
    );
    let mut outcome = std::mem::take(progress).into_outcome(JobStatus::Dead, Some(message.clone()));
    outcome.error_class = Some(FailureClass::Permanent);
    outcome.history = vec![super::AttemptError {
        at: chrono::Utc::now(),
        class: FailureClass::Permanent,
        message,
    }];
    outcome.position = held_position(held, Levels::default());
    outcome
}

/// How much of `p` the job wants left open: 0 for a full close, else what `close_percent` leaves,
/// the closed part rounded down to the step. `already_closed` is what earlier deliveries' close
/// orders filled (the percentage is of the position before them). Refused (permanent) when the
/// closed part rounds to nothing or the remainder would be below the minimum quantity.
pub(super) async fn target_remaining(
    ex: &dyn Exchange,
    job: &Job,
    p: &ExPosition,
    already_closed: Decimal,
) -> Result<Decimal, ExchangeError> {
    let Some(pct) = job
        .alert
        .close_percent
        .filter(|pct| *pct < Decimal::ONE_HUNDRED)
    else {
        return Ok(Decimal::ZERO);
    };
    let sym = &job.alert.symbol;
    let rules = ex.symbol_rules(sym).await?;
    let before = money::add(p.quantity, already_closed)?;
    let share = money::div(money::mul(before, pct)?, Decimal::ONE_HUNDRED)?;
    let to_close = round_down(share, rules.step)?;
    if to_close <= Decimal::ZERO {
        return Err(ExchangeError::permanent(format!(
            "close_percent {pct} of {} {sym} is {}, which rounds down to 0 (step {})",
            before.normalize(),
            share.normalize(),
            rules.step
        )));
    }
    let remaining = money::sub(before, to_close)?;
    if remaining > Decimal::ZERO && remaining < rules.min_qty {
        return Err(ExchangeError::permanent(format!(
            "close_percent {pct} of {} {sym} would leave {}, below the minimum quantity {}; send close_percent 100 to close it all",
            before.normalize(),
            remaining.normalize(),
            rules.min_qty
        )));
    }
    Ok(remaining)
}

/// Record close orders an earlier delivery placed (found by client order id), closing a position
/// of `side` entered at `entry` (for the realized PnL; unknown once the position is gone).
pub(super) fn record_found(
    found: &[(Leg, OrderAck)],
    side: Side,
    entry: Option<Decimal>,
    progress: &mut Progress,
) {
    for (leg, ack) in found {
        if ack.filled_qty > Decimal::ZERO {
            progress.fills.push(close_fill(*leg, side, ack, entry));
        }
    }
}

/// The trade row of a close order's fill, with its realized PnL.
fn close_fill(leg: Leg, position_side: Side, ack: &OrderAck, entry: Option<Decimal>) -> Fill {
    Fill {
        leg,
        side: OrderSide::closing(position_side),
        quantity: ack.filled_qty,
        price: ack.avg_price,
        client_order_id: ack.client_order_id.clone(),
        exchange_order_id: Some(ack.exchange_order_id.clone()),
        status: FillState::Filled,
        pnl: realized_pnl(position_side, entry, ack.avg_price, ack.filled_qty),
        exit_reason: Some(ExitReason::Signal),
        fee: ack.fee,
        of_job: None,
    }
}

/// (exit - entry) x quantity for a long, (entry - exit) x quantity for a short; `None` when a price
/// is unknown or the numbers overflow.
pub fn realized_pnl(
    side: Side,
    entry: Option<Decimal>,
    exit: Option<Decimal>,
    quantity: Decimal,
) -> Option<Decimal> {
    let (entry, exit) = (entry?, exit?);
    let per_unit = match side {
        Side::Long => exit.checked_sub(entry)?,
        Side::Short => entry.checked_sub(exit)?,
    };
    per_unit.checked_mul(quantity).map(|d| d.normalize())
}

/// Bring the broker's position `p` down to `target`: cancel its protective orders (those
/// `listing` shows: the attempt's listing, not read again), then send close orders (skipping the
/// legs `found` — earlier deliveries' — whose fills are recorded) until the broker holds `target`
/// or three have been sent. A partial close then protects the remainder at the cancelled orders'
/// levels.
#[allow(clippy::too_many_arguments)]
pub(super) async fn close_to(
    ex: &dyn Exchange,
    job: &Job,
    p: ExPosition,
    target: Decimal,
    found: &[(Leg, OrderAck)],
    listing: &mut Listing,
    progress: &mut Progress,
    fence: &Fence,
) -> Result<Closed, ExchangeError> {
    let sym = &job.alert.symbol;
    still_ours(fence)?;
    let levels = if ex.protects_on_fill() {
        // OANDA: the stop-loss / take-profit belong to the trade and go (or shrink) with it.
        if target.is_zero() {
            protect::protection_gone_with_trade(job, listing, progress);
        }
        Levels::default()
    } else {
        protect::cancel_protection(ex, job, listing, progress).await?
    };
    record_found(found, p.side, p.entry_price, progress);
    let entry = p.entry_price;
    let side = p.side;
    let mut held = Some(p);
    for leg in Leg::CLOSES {
        if found.iter().any(|(l, _)| *l == leg) {
            continue;
        }
        let Some(current) = held.clone() else { break };
        let excess = money::sub(current.quantity, target)?;
        if excess <= Decimal::ZERO {
            break;
        }
        still_ours(fence)?;
        let ack = send_close(ex, job, leg, &current, excess).await?;
        if ack.filled_qty > Decimal::ZERO {
            progress.fills.push(close_fill(leg, side, &ack, entry));
        }
        held = ex.position(sym).await?;
    }
    progress.position = Some(held_position(held.as_ref(), Levels::default()));
    let mut unprotected = None;
    if let Some(rest) = held.as_ref().filter(|r| r.quantity <= target) {
        if levels.any() {
            match protect::place(ex, job, rest.side, rest.quantity, levels).await {
                Ok(resting) => progress.resting.extend(resting),
                Err(e) => unprotected = Some(e),
            }
        }
    }
    Ok(Closed {
        remaining: held,
        unprotected,
        levels,
    })
}

/// One close order for `quantity` of `current`: the broker's close-position call for the whole
/// position, a reduce-only market order for part of it. A close the broker leaves working (not
/// final) is cancelled: what it filled is then read from the position.
async fn send_close(
    ex: &dyn Exchange,
    job: &Job,
    leg: Leg,
    current: &ExPosition,
    quantity: Decimal,
) -> Result<OrderAck, ExchangeError> {
    let sym = &job.alert.symbol;
    let order = OrderRequest {
        symbol: sym.clone(),
        side: OrderSide::closing(current.side),
        quantity,
        order_type: OrderType::Market,
        limit_price: None,
        reduce_only: true,
        leg,
        client_order_id: client_order_id(job.job_id, leg),
        on_fill: None,
    };
    let whole = quantity >= current.quantity;
    let ack = if whole {
        place_leg(ex, &order, Some(current)).await?
    } else {
        place_leg(ex, &order, None).await?
    };
    if !ack.state.is_final() {
        let open = crate::exchanges::OpenOrder {
            exchange_order_id: ack.exchange_order_id.clone(),
            client_order_id: Some(order.client_order_id.clone()),
            side: order.side,
            quantity: Some(quantity),
            stop_loss: None,
            take_profit: None,
            limit_price: None,
        };
        ex.cancel_order(sym, &open).await?;
        if let Some(final_ack) = ex.find_order(sym, &order.client_order_id).await? {
            return Ok(final_ack);
        }
    }
    Ok(ack)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn realized_pnl_by_side() {
        assert_eq!(
            realized_pnl(Side::Long, Some(dec!(100)), Some(dec!(110)), dec!(2)),
            Some(dec!(20))
        );
        assert_eq!(
            realized_pnl(Side::Short, Some(dec!(100)), Some(dec!(110)), dec!(2)),
            Some(dec!(-20))
        );
        assert_eq!(realized_pnl(Side::Long, None, Some(dec!(1)), dec!(1)), None);
        assert_eq!(
            realized_pnl(Side::Long, Some(Decimal::MIN), Some(Decimal::MAX), dec!(2)),
            None
        );
    }
}
