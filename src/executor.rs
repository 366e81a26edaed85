//! The trade executor: turns one job into orders on one exchange (design.md "Trade semantics").
//!
//! - `buy`/`sell` with no position: open; quantity = `position_size_usd / price`, rounded DOWN to the
//!   exchange's step; below the minimum quantity or notional -> `rejected` with the numbers.
//! - Same side as the open position: `skipped`.
//! - Opposite side: a reversal. The new leg is sized and checked first (so a too-small reversal does
//!   not close anything), then the position is closed reduce-only, and only once that close is
//!   confirmed filled is the new side opened.
//! - `close`: close the whole position; no position -> `skipped`.
//! - Stop-loss / take-profit: exchange-native protective orders after the open; if they cannot be
//!   placed the job is `succeeded_unprotected` with the reason.
//!
//! The executor never writes to the database: it returns an [`Outcome`] (status, the fills to record,
//! the position change) which the worker commits in one transaction.
//!
//! Failures follow the exchange error taxonomy. Transient errors are retried with exponential backoff
//! and jitter (`backon`'s schedule, bounded by attempts and total time); an unknown outcome is resolved
//! by looking the order up by its client order id; from the first retry on (and on any redelivery of
//! the job, `recover = true`) every leg is looked up before it is placed, so a leg the exchange
//! already has is recorded, not sent again.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::domain::{Job, OrderSide, OrderType, Side, TrailingStop};
use crate::exchanges::{
    client_order_id, ErrorClass, ExPosition, Exchange, ExchangeError, Leg, OnFill, OrderAck,
    OrderRequest, OrderState, Protection,
};
pub use crate::job::JobStatus;
use crate::job::{FailureClass, FillState};
use crate::money::{self, round_to_tick, Overflow};
use crate::partition::Fence;
use crate::sizing;

/// One order leg the exchange executed (or accepted), to be recorded as a trade row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fill {
    pub leg: Leg,
    pub side: OrderSide,
    pub quantity: Decimal,
    pub price: Option<Decimal>,
    pub client_order_id: String,
    pub exchange_order_id: Option<String>,
    pub status: FillState,
}

/// How the user's position in the job's symbol changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PositionChange {
    Unchanged,
    Flat,
    Open {
        side: Side,
        quantity: Decimal,
        entry_price: Decimal,
        stop_loss_price: Option<Decimal>,
        take_profit_price: Option<Decimal>,
    },
}

/// One failed attempt, kept in the job's history and the dead-letter record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AttemptError {
    pub at: DateTime<Utc>,
    pub class: FailureClass,
    pub message: String,
}

/// The result of executing a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub status: JobStatus,
    pub fills: Vec<Fill>,
    pub position: PositionChange,
    /// Why it was skipped / rejected / dead / unprotected.
    pub message: Option<String>,
    pub error_class: Option<FailureClass>,
    pub history: Vec<AttemptError>,
}

impl Outcome {
    pub fn new(status: JobStatus, message: impl Into<String>) -> Outcome {
        Outcome {
            status,
            fills: vec![],
            position: PositionChange::Unchanged,
            message: Some(message.into()),
            error_class: None,
            history: vec![],
        }
    }
    /// A job that fails before reaching the exchange (no credentials, stale, ...).
    pub fn failed(status: JobStatus, class: FailureClass, message: impl Into<String>) -> Outcome {
        let message = message.into();
        Outcome {
            error_class: Some(class),
            history: vec![AttemptError {
                at: Utc::now(),
                class,
                message: message.clone(),
            }],
            ..Outcome::new(status, message)
        }
    }

    /// How many times the executor retried a transient or unknown exchange failure: each such
    /// failure in the history was retried, except the last one of a job that gave up (`dead` with
    /// that class).
    pub fn retries(&self) -> u64 {
        let failures = self
            .history
            .iter()
            .filter(|h| h.class.is_retriable())
            .count() as u64;
        let gave_up = self.status == JobStatus::Dead
            && self.error_class.is_some_and(FailureClass::is_retriable);
        failures.saturating_sub(u64::from(gave_up))
    }
}

/// How transient exchange failures are retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub max_retries: usize,
    pub max_total: Duration,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    fn schedule(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_retries)
            .with_total_delay(Some(self.max_total))
            .build()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 5,
            max_total: Duration::from_secs(30),
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// Execute `job` on `ex`, retrying transient failures. `recover` says a previous delivery of this job
/// may already have placed orders.
pub async fn execute(ex: &dyn Exchange, job: &Job, recover: bool, policy: &RetryPolicy) -> Outcome {
    let fence = Fence::unbounded();
    match execute_until(ex, job, recover, policy, &fence).await {
        Some(outcome) => outcome,
        None => Outcome::failed(
            JobStatus::Dead,
            FailureClass::Internal,
            "abandoned under a fence that never ends",
        ),
    }
}

/// [`execute`], for as long as `fence` (the partition's lease, as this worker sees it) allows: no
/// new attempt or leg starts once it is void, and the exchange clients ask it before every request
/// when run inside [`Fence::scope`]. `None` then: the job's next owner will look its orders up and
/// finish it, and nothing may be recorded or acked by this worker. A request already sent is not
/// cut off, so what the exchange did is never unknown to the attempt that caused it.
pub async fn execute_until(
    ex: &dyn Exchange,
    job: &Job,
    mut recover: bool,
    policy: &RetryPolicy,
    fence: &Fence,
) -> Option<Outcome> {
    let mut schedule = policy.schedule();
    let mut history = Vec::new();
    loop {
        let mut fills = Vec::new();
        if fence.is_void() {
            return None;
        }
        let result = attempt(ex, job, recover, &mut fills, fence).await;
        if fence.is_void() && result.is_err() {
            // Stopped between legs (or failed after the lease was lost): the next owner finishes it.
            return None;
        }
        let err = match result {
            Ok(mut outcome) => {
                outcome.history.splice(0..0, history);
                return Some(outcome);
            }
            Err(e) => e,
        };
        history.push(AttemptError {
            at: Utc::now(),
            class: err.class.into(),
            message: err.message.clone(),
        });
        let status = match err.class {
            ErrorClass::Permanent => JobStatus::Rejected,
            ErrorClass::Transient | ErrorClass::Unknown => match schedule.next() {
                Some(delay) => {
                    let delay = err.retry_after.map_or(delay, |r| r.max(delay));
                    tracing::warn!(error = %err, ?delay, "exchange call failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = fence.voided() => return None,
                    }
                    recover = true;
                    continue;
                }
                None => JobStatus::Dead,
            },
        };
        let position = if fills.iter().any(|f| f.leg == Leg::Close) {
            PositionChange::Flat
        } else {
            PositionChange::Unchanged
        };
        let message = if status == JobStatus::Dead {
            format!("gave up after {} attempts: {}", history.len(), err.message)
        } else {
            err.message.clone()
        };
        return Some(Outcome {
            status,
            fills,
            position,
            message: Some(message),
            error_class: Some(err.class.into()),
            history,
        });
    }
}

/// Before each leg of an attempt: is the job still this worker's to run?
fn still_ours(fence: &Fence) -> Result<(), ExchangeError> {
    if fence.is_void() {
        Err(ExchangeError::transient(
            "stopped: this worker lost the partition's lease",
        ))
    } else {
        Ok(())
    }
}

fn fill_of(leg: Leg, side: OrderSide, ack: &OrderAck, fallback_qty: Decimal) -> Fill {
    let quantity = if ack.filled_qty > Decimal::ZERO {
        ack.filled_qty
    } else {
        fallback_qty
    };
    Fill {
        leg,
        side,
        quantity,
        price: ack.avg_price,
        client_order_id: ack.client_order_id.clone(),
        exchange_order_id: Some(ack.exchange_order_id.clone()),
        status: match ack.state {
            OrderState::Filled => FillState::Filled,
            OrderState::Accepted => FillState::Accepted,
        },
    }
}

/// Place one leg exactly once: look it up first when recovering, and resolve an unknown outcome by
/// looking it up before anything is sent again.
async fn place_leg(
    ex: &dyn Exchange,
    order: &OrderRequest,
    close_of: Option<&ExPosition>,
) -> Result<OrderAck, ExchangeError> {
    let sent = match close_of {
        Some(p) => {
            ex.close_position(&order.symbol, p, &order.client_order_id)
                .await
        }
        None => ex.place_order(order).await,
    };
    match sent {
        Err(e) if e.class == ErrorClass::Unknown => {
            match ex.find_order(&order.symbol, &order.client_order_id).await? {
                Some(ack) => Ok(ack),
                None => Err(ExchangeError {
                    class: ErrorClass::Transient,
                    message: format!(
                        "{} (order {} not found afterwards; it will be sent again)",
                        e.message, order.client_order_id
                    ),
                    retry_after: e.retry_after,
                }),
            }
        }
        other => other,
    }
}

async fn attempt(
    ex: &dyn Exchange,
    job: &Job,
    recover: bool,
    fills: &mut Vec<Fill>,
    fence: &Fence,
) -> Result<Outcome, ExchangeError> {
    let a = &job.alert;
    let sym = &a.symbol;
    let open_id = client_order_id(job.job_id, Leg::Open);

    // Legs a previous delivery already placed.
    let (prev_close, prev_open) = if recover {
        placed_legs(ex, job).await?
    } else {
        (None, None)
    };
    let position = ex.position(sym).await?;
    // A close a previous delivery placed, while the position it was closing is still open: that
    // close filled only partly. Its client order id is spent, so nothing more is sent.
    if let (Some(ack), Some(p)) = (&prev_close, &position) {
        if a.action.side() != Some(p.side) {
            return Ok(still_open_after_close(job, p, ack, fills));
        }
    }

    let Some(side) = a.action.side() else {
        // close
        if let Some(ack) = prev_close {
            let side = position
                .as_ref()
                .map(|p| OrderSide::closing(p.side))
                .unwrap_or(OrderSide::Sell);
            fills.push(fill_of(Leg::Close, side, &ack, Decimal::ZERO));
            return Ok(done(fills, PositionChange::Flat));
        }
        let Some(p) = position else {
            return Ok(Outcome::new(
                JobStatus::Skipped,
                format!("no open position in {sym} to close"),
            ));
        };
        still_ours(fence)?;
        let ack = close(ex, job, &p).await?;
        fills.push(fill_of(
            Leg::Close,
            OrderSide::closing(p.side),
            &ack,
            p.quantity,
        ));
        if let Some(partial) = partly_closed(job, &p, &ack, fills) {
            return Ok(partial);
        }
        return Ok(done(fills, PositionChange::Flat));
    };

    if let Some(ack) = &prev_close {
        let close_side = OrderSide::closing(side.opposite());
        fills.push(fill_of(Leg::Close, close_side, ack, Decimal::ZERO));
    }
    if let Some(ack) = prev_open {
        // The whole job got as far as the open leg before: record it, do not send anything.
        fills.push(fill_of(
            Leg::Open,
            OrderSide::opening(side),
            &ack,
            Decimal::ZERO,
        ));
        let entry = ack.avg_price.unwrap_or_default();
        return Ok(done(
            fills,
            PositionChange::Open {
                side,
                quantity: ack.filled_qty,
                entry_price: entry,
                stop_loss_price: None,
                take_profit_price: None,
            },
        ));
    }

    if let Some(p) = &position {
        if p.side == side {
            return Ok(Outcome::new(
                JobStatus::Skipped,
                format!(
                    "already {} {} {}; {} ignored",
                    p.side.as_str(),
                    p.quantity,
                    sym,
                    a.action.as_str()
                ),
            ));
        }
    }

    // Size the new leg before touching the existing position.
    let rules = ex.symbol_rules(sym).await?;
    let reference_price = match (a.order_type, a.price) {
        (OrderType::Limit, Some(p)) => round_to_tick(p, rules.tick)?,
        _ => ex.price(sym).await?,
    };
    if reference_price <= Decimal::ZERO {
        return Err(ExchangeError::permanent(format!(
            "{sym} has no usable price ({reference_price})"
        )));
    }
    let qty = size_open(ex, a, side, reference_price, &rules).await?;

    // Reversal: close first, and only go on once the close is confirmed.
    if let Some(p) = &position {
        if prev_close.is_none() {
            still_ours(fence)?;
            let ack = close(ex, job, p).await?;
            fills.push(fill_of(
                Leg::Close,
                OrderSide::closing(p.side),
                &ack,
                p.quantity,
            ));
            if let Some(partial) = partly_closed(job, p, &ack, fills) {
                return Ok(partial);
            }
        }
    }

    // Exchanges that protect on fill get the levels with the order, from the reference price.
    let on_fill = if ex.protects_on_fill()
        && (a.has_stop_loss()
            || a.take_profit_percent.is_some()
            || a.take_profit_price.is_some()
            || a.trailing_stop.is_some())
    {
        let (sl, tp) = protective_prices(side, reference_price, a, rules.tick)?;
        Some(OnFill {
            stop_loss: sl,
            take_profit: tp,
            trailing_stop: trailing_on_fill(a.trailing_stop, reference_price)?,
        })
    } else {
        None
    };
    let order = OrderRequest {
        symbol: sym.clone(),
        side: OrderSide::opening(side),
        quantity: qty,
        order_type: a.order_type,
        limit_price: (a.order_type == OrderType::Limit).then_some(reference_price),
        reduce_only: false,
        leg: Leg::Open,
        client_order_id: open_id,
        on_fill: on_fill.clone(),
    };
    still_ours(fence)?;
    let ack = place_leg(ex, &order, None).await?;
    fills.push(fill_of(Leg::Open, order.side, &ack, qty));
    if ack.state != OrderState::Filled {
        // A resting limit order: no position yet.
        let position = if position.is_some() {
            PositionChange::Flat
        } else {
            PositionChange::Unchanged
        };
        return Ok(done(fills, position));
    }
    let entry = ack.avg_price.unwrap_or(reference_price);
    let filled = if ack.filled_qty > Decimal::ZERO {
        ack.filled_qty
    } else {
        qty
    };
    let (sl, tp) = match &on_fill {
        Some(f) => (f.stop_loss, f.take_profit),
        None => protective_prices(side, entry, a, rules.tick)?,
    };
    let mut outcome = done(
        fills,
        PositionChange::Open {
            side,
            quantity: filled,
            entry_price: entry,
            stop_loss_price: sl,
            take_profit_price: tp,
        },
    );
    if on_fill.is_none() && (sl.is_some() || tp.is_some() || a.trailing_stop.is_some()) {
        let protection = Protection {
            symbol: sym.clone(),
            position_side: side,
            quantity: filled,
            stop_loss: sl,
            take_profit: tp,
            trailing_stop: a.trailing_stop,
            job_id: job.job_id,
        };
        // Not stopped here even if the lease was lost: the position exists, and leaving it without
        // its stop-loss would be worse than a late protective order.
        if let Err(e) = ex.protect(&protection).await {
            outcome.status = JobStatus::SucceededUnprotected;
            outcome.message = Some(format!("position opened but not protected: {}", e.message));
            outcome.error_class = Some(e.class.into());
        }
    }
    Ok(outcome)
}

/// A close that filled only part of the position: the job stops there (the new side is never
/// opened on top of a remainder) and ends `dead` with the numbers; Sparky records what filled and
/// the remainder as the open position. `None` when the close filled the whole position.
fn partly_closed(
    job: &Job,
    p: &ExPosition,
    ack: &OrderAck,
    fills: &mut Vec<Fill>,
) -> Option<Outcome> {
    if ack.filled_qty <= Decimal::ZERO || ack.filled_qty >= p.quantity {
        return None;
    }
    let remainder = p.quantity - ack.filled_qty; // no overflow: 0 < filled < quantity
    let remaining = ExPosition {
        quantity: remainder,
        ..p.clone()
    };
    Some(still_open_after_close(job, &remaining, ack, fills))
}

/// The outcome of a job whose close left `p` open at the broker.
fn still_open_after_close(
    job: &Job,
    p: &ExPosition,
    ack: &OrderAck,
    fills: &mut Vec<Fill>,
) -> Outcome {
    let message = format!(
        "the close of {} {} filled only {} (order {}); {} {} remain open at the broker and the new side was not opened; send a close alert for the remainder",
        p.quantity
            .checked_add(ack.filled_qty)
            .unwrap_or(p.quantity)
            .normalize(),
        job.alert.symbol,
        ack.filled_qty.normalize(),
        ack.exchange_order_id,
        p.side.as_str(),
        p.quantity.normalize(),
    );
    Outcome {
        status: JobStatus::Dead,
        fills: std::mem::take(fills),
        position: PositionChange::Open {
            side: p.side,
            quantity: p.quantity,
            entry_price: p.entry_price.or(ack.avg_price).unwrap_or_default(),
            stop_loss_price: None,
            take_profit_price: None,
        },
        error_class: Some(FailureClass::Permanent),
        history: vec![AttemptError {
            at: Utc::now(),
            class: FailureClass::Permanent,
            message: message.clone(),
        }],
        message: Some(message),
    }
}

/// The close and open legs a previous delivery of `job` placed, looked up by their client order ids.
async fn placed_legs(
    ex: &dyn Exchange,
    job: &Job,
) -> Result<(Option<OrderAck>, Option<OrderAck>), ExchangeError> {
    let sym = &job.alert.symbol;
    Ok((
        ex.find_order(sym, &client_order_id(job.job_id, Leg::Close))
            .await?,
        ex.find_order(sym, &client_order_id(job.job_id, Leg::Open))
            .await?,
    ))
}

/// For a job that is given up (`poison`: delivered too often without finishing): record what its
/// earlier deliveries did at the broker, looked up by client order id, and send nothing. The
/// outcome stays `given_up`'s status and class; the legs found are its fills. Failed look-ups are
/// retried on `policy`'s schedule; `None` once `fence` is void (the next owner looks them up).
pub async fn record_placed(
    ex: &dyn Exchange,
    job: &Job,
    mut given_up: Outcome,
    policy: &RetryPolicy,
    fence: &Fence,
) -> Option<Outcome> {
    let mut schedule = policy.schedule();
    let (close, open) = loop {
        match placed_legs(ex, job).await {
            Ok(legs) => break legs,
            Err(_) if fence.is_void() => return None,
            Err(e) => match schedule.next() {
                Some(delay) => {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = fence.voided() => return None,
                    }
                }
                None => {
                    let m = given_up.message.take().unwrap_or_default();
                    given_up.message = Some(format!("{m}; its orders could not be looked up: {e}"));
                    return Some(given_up);
                }
            },
        }
    };
    let side = job.alert.action.side();
    if let Some(ack) = close.filter(|a| a.filled_qty > Decimal::ZERO) {
        let closing = side.map_or(OrderSide::Sell, |s| OrderSide::closing(s.opposite()));
        given_up
            .fills
            .push(fill_of(Leg::Close, closing, &ack, Decimal::ZERO));
        given_up.position = PositionChange::Flat;
    }
    if let (Some(ack), Some(side)) = (open.filter(|a| a.filled_qty > Decimal::ZERO), side) {
        given_up.fills.push(fill_of(
            Leg::Open,
            OrderSide::opening(side),
            &ack,
            Decimal::ZERO,
        ));
        if ack.state == OrderState::Filled {
            given_up.position = PositionChange::Open {
                side,
                quantity: ack.filled_qty,
                entry_price: ack.avg_price.unwrap_or_default(),
                stop_loss_price: None,
                take_profit_price: None,
            };
        }
    }
    if !given_up.fills.is_empty() {
        let m = given_up.message.take().unwrap_or_default();
        given_up.message = Some(format!(
            "{m}; {} order(s) it placed were found at the broker and recorded",
            given_up.fills.len()
        ));
    }
    Some(given_up)
}

/// The quantity of the opening leg at `price`: the alert's [`crate::domain::Sizing`] through
/// [`sizing::size`] (rounded down to the step, minimums checked). The account's equity is read
/// only for the modes that need it; an unreadable equity fails like any exchange call (retried
/// when transient).
async fn size_open(
    ex: &dyn Exchange,
    a: &crate::domain::Alert,
    side: Side,
    price: Decimal,
    rules: &crate::exchanges::SymbolRules,
) -> Result<Decimal, ExchangeError> {
    let Some(s) = a.sizing() else {
        return Err(ExchangeError::permanent(
            "the alert has no size (position_size_usd, quantity, percent_of_equity, risk_usd or risk_percent)",
        ));
    };
    let equity = if s.mode.needs_equity() {
        Some(ex.equity().await?)
    } else {
        None
    };
    let stop_distance = if s.mode.needs_stop_loss() {
        Some(stop_distance(a, side, price)?)
    } else {
        None
    };
    let input = sizing::SizingInput {
        symbol: a.symbol.as_str(),
        sizing: s,
        price,
        rules,
        equity,
        stop_distance,
    };
    sizing::size(&input)
        .map(|sized| sized.quantity)
        .map_err(|e| ExchangeError::permanent(e.to_string()))
}

/// How far the alert's stop-loss is from `price` for a position of `side` (price units). A stop
/// price on the wrong side of the price is refused (it would trigger at once).
pub fn stop_distance(
    a: &crate::domain::Alert,
    side: Side,
    price: Decimal,
) -> Result<Decimal, ExchangeError> {
    if let Some(stop) = a.stop_loss_price {
        let d = match side {
            Side::Long => money::sub(price, stop)?,
            Side::Short => money::sub(stop, price)?,
        };
        if d <= Decimal::ZERO {
            let (side, rel) = match side {
                Side::Long => ("long", "below"),
                Side::Short => ("short", "above"),
            };
            return Err(ExchangeError::permanent(format!(
                "stop_loss_price {stop} must be {rel} the price {price} of a {side}"
            )));
        }
        return Ok(d);
    }
    match a.stop_loss_percent {
        Some(pct) => Ok(money::div(money::mul(price, pct)?, Decimal::ONE_HUNDRED)?),
        None => Err(ExchangeError::permanent(
            "risk sizing needs stop_loss_percent or stop_loss_price",
        )),
    }
}

/// The trailing stop sent with an opening order: a percent becomes a price distance at the
/// reference price (OANDA's `trailingStopLossOnFill` takes a distance); pips stay pips (the
/// client knows the instrument's pip size).
fn trailing_on_fill(
    t: Option<TrailingStop>,
    price: Decimal,
) -> Result<Option<TrailingStop>, Overflow> {
    Ok(match t {
        Some(TrailingStop::Percent(p)) => Some(TrailingStop::Distance(money::div(
            money::mul(price, p)?,
            Decimal::ONE_HUNDRED,
        )?)),
        other => other,
    })
}

/// Stop-loss and take-profit prices for a position of `side` entered at `entry`, rounded to `tick`.
/// Absolute prices (`stop_loss_price`, `take_profit_price`) are used as given (rounded).
fn protective_prices(
    side: Side,
    entry: Decimal,
    a: &crate::domain::Alert,
    tick: Decimal,
) -> Result<(Option<Decimal>, Option<Decimal>), Overflow> {
    // Below the entry for a long's stop and a short's target, above for the others.
    let level = |pct: Option<Decimal>, below: bool| -> Result<Option<Decimal>, Overflow> {
        let Some(pct) = pct else { return Ok(None) };
        let frac = money::div(pct, Decimal::ONE_HUNDRED)?;
        let factor = if below {
            money::sub(Decimal::ONE, frac)?
        } else {
            money::add(Decimal::ONE, frac)?
        };
        Ok(Some(round_to_tick(money::mul(entry, factor)?, tick)?))
    };
    let long = side == Side::Long;
    let fixed = |p: Option<Decimal>| p.map(|p| round_to_tick(p, tick)).transpose();
    Ok((
        match fixed(a.stop_loss_price)? {
            Some(p) => Some(p),
            None => level(a.stop_loss_percent, long)?,
        },
        match fixed(a.take_profit_price)? {
            Some(p) => Some(p),
            None => level(a.take_profit_percent, !long)?,
        },
    ))
}

async fn close(ex: &dyn Exchange, job: &Job, p: &ExPosition) -> Result<OrderAck, ExchangeError> {
    let order = OrderRequest {
        symbol: job.alert.symbol.clone(),
        side: OrderSide::closing(p.side),
        quantity: p.quantity,
        order_type: OrderType::Market,
        limit_price: None,
        reduce_only: true,
        leg: Leg::Close,
        client_order_id: client_order_id(job.job_id, Leg::Close),
        on_fill: None,
    };
    let ack = place_leg(ex, &order, Some(p)).await?;
    if ack.state != OrderState::Filled {
        return Err(ExchangeError::permanent(format!(
            "closing {} {} was not confirmed filled (order {}); the new side was not opened",
            p.quantity, job.alert.symbol, ack.exchange_order_id
        )));
    }
    Ok(ack)
}

fn done(fills: &mut Vec<Fill>, position: PositionChange) -> Outcome {
    Outcome {
        status: JobStatus::Succeeded,
        fills: std::mem::take(fills),
        position,
        message: None,
        error_class: None,
        history: vec![],
    }
}
