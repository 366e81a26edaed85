//! The trade executor: turns one job into orders on one exchange (design.md "Trade semantics").
//!
//! - `buy`/`sell` with no position: open; quantity = `position_size_usd / price`, rounded DOWN to the
//!   exchange's step; below the minimum quantity or notional -> `rejected` with the numbers.
//! - Same side as the open position: `skipped`.
//! - Opposite side: a reversal. The new leg is sized and checked first (so a too-small reversal does
//!   not close anything), then the position is closed (see below), and only once it is flat at the
//!   broker is the new side opened.
//! - `close`: close the whole position, or `close_percent` of it; no position -> `skipped`.
//! - An entry that the broker accepts but does not fill (a resting limit order) ends `working`: it
//!   is recorded in `broker_orders` and followed until it fills or expires. A later alert in the same
//!   symbol first cancels a working entry an earlier job left; what that entry had filled is
//!   recorded as the earlier job's open ([`Fill::of_job`]) and is the position the alert acts on.
//! - Each attempt lists the broker's open orders once; a close reuses that listing for the
//!   protection it cancels and lists again only to confirm a cancel.
//! - Stop-loss / take-profit: exchange-native protective orders after the open, sized to what
//!   filled (OANDA attaches them to the fill); if they cannot be placed the job is
//!   `succeeded_unprotected` with the reason. They are recorded with their broker ids (OANDA's
//!   on-fill ones under the job's `sl` / `tp` client ids).
//! - Fills carry the broker's fee where it reports one ([`Fill::fee`]).
//!
//! Closing ([`close`]): the position's protective orders are cancelled first and the cancellation
//! confirmed (OANDA's go with the trade), then close orders are sent until the broker's position is
//! what the job wants (flat, or the `close_percent` remainder): a close that fills only partly is
//! followed by another for the rest, at most three ([`Leg::CLOSES`]); if the position is still not
//! there, the job ends `dead` with the numbers and nothing new is opened. A partial close re-places
//! the protection for the remainder. Every closing fill carries its realized PnL.
//!
//! The executor never writes to the database: it returns an [`Outcome`] (status, the fills to record,
//! the position change, the orders left resting and cancelled) which the worker commits in one
//! transaction.
//!
//! Failures follow the exchange error taxonomy. Transient errors are retried with exponential backoff
//! and jitter (`backon`'s schedule, bounded by attempts and total time); an unknown outcome is resolved
//! by looking the order up by its client order id; from the first retry on (and on any redelivery of
//! the job, `recover = true`) every leg is looked up before it is placed, so a leg the exchange
//! already has is recorded, not sent again.

mod close;
mod protect;

pub use close::realized_pnl;

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::domain::{CredentialEnv, Job, OrderSide, OrderType, Side, TrailingStop};
use crate::exchanges::{
    client_order_id, ErrorClass, ExPosition, Exchange, ExchangeError, Leg, OnFill, OrderAck,
    OrderRequest, OrderState, RestingOrder,
};
pub use crate::job::JobStatus;
use crate::job::{ExitReason, FailureClass, FillState};
use crate::money::{self, Overflow};
use crate::partition::Fence;
use crate::sizing::{self, round_to_tick};

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
    /// Realized PnL of a closing fill, in the symbol's quote currency (USD for USDT pairs, US
    /// shares and `*_USD` pairs): (exit - entry) x quantity for a long, (entry - exit) x quantity
    /// for a short, from the broker's entry price. `None` on an opening fill or when a price is
    /// unknown. Fees are not included: they are [`Fill::fee`].
    pub pnl: Option<Decimal>,
    /// Why a closing fill exited the position.
    pub exit_reason: Option<ExitReason>,
    /// What the broker charged for the fill, in the account currency, where it says
    /// ([`OrderAck::fee`]); `None` where it does not (Tradier, paper).
    pub fee: Option<Decimal>,
    /// The earlier job whose order this is, when the job records another job's fill: a working
    /// entry it cancelled after part of it had filled (recorded as that job's `open` trade).
    /// `None`: the job's own order.
    pub of_job: Option<uuid::Uuid>,
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
    /// The environment of the credentials the job ran with: with the job's user and exchange, the
    /// account its fills and position belong to. Set by the worker once the credentials are loaded.
    pub environment: CredentialEnv,
    /// Orders the job leaves resting at the broker (protective orders, a working entry).
    pub resting: Vec<RestingOrder>,
    /// Client order ids of Sparky orders the job cancelled at the broker (an earlier position's
    /// protection, a working entry an earlier job left), or that went with the trade its close
    /// closed (OANDA's on-fill orders: nothing is sent for those). Their rows end `cancelled`.
    pub cancelled: Vec<String>,
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
            environment: CredentialEnv::Production,
            resting: vec![],
            cancelled: vec![],
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

/// The position a close job closes, as the caller knew it before the job ran (Sparky's record of
/// it): what a redelivered close that finds the broker flat records its found close legs against.
/// The broker's orders do not say which side they closed, nor at what entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClosedPosition {
    pub side: Side,
    /// For the close's realized PnL; `None` when not known.
    pub entry: Option<Decimal>,
}

/// Execute `job` on `ex`, retrying transient failures. `recover` says a previous delivery of this job
/// may already have placed orders.
pub async fn execute(ex: &dyn Exchange, job: &Job, recover: bool, policy: &RetryPolicy) -> Outcome {
    let fence = Fence::unbounded();
    match execute_until(ex, job, recover, None, policy, &fence).await {
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
/// cut off, so what the exchange did is never unknown to the attempt that caused it. `closed`: for a
/// close job, the position it closes as the caller knew it ([`ClosedPosition`]), if known; once an
/// attempt has seen the broker's position, a later attempt (a retry after an unknown outcome that
/// finds the broker flat) goes by that instead.
pub async fn execute_until(
    ex: &dyn Exchange,
    job: &Job,
    mut recover: bool,
    mut closed: Option<ClosedPosition>,
    policy: &RetryPolicy,
    fence: &Fence,
) -> Option<Outcome> {
    let mut schedule = policy.schedule();
    let mut history = Vec::new();
    loop {
        let mut progress = Progress::default();
        if fence.is_void() {
            return None;
        }
        let result = attempt(ex, job, recover, &mut closed, &mut progress, fence).await;
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
        let message = if status == JobStatus::Dead {
            format!("gave up after {} attempts: {}", history.len(), err.message)
        } else {
            err.message.clone()
        };
        return Some(Outcome {
            error_class: Some(err.class.into()),
            history,
            ..progress.into_outcome(status, Some(message))
        });
    }
}

/// `look_up` until the broker answers, transient failures retried on `policy`'s schedule: the last
/// error once the schedule is spent, on a permanent failure, or when the fence ends.
async fn looked_up<T, Fut>(
    policy: &RetryPolicy,
    fence: &Fence,
    what: &str,
    mut look_up: impl FnMut() -> Fut,
) -> Result<T, ExchangeError>
where
    Fut: std::future::Future<Output = Result<T, ExchangeError>>,
{
    let mut schedule = policy.schedule();
    loop {
        still_ours(fence)?;
        let err = match look_up().await {
            Ok(found) => return Ok(found),
            Err(e) if e.class == ErrorClass::Permanent => return Err(e),
            Err(e) => e,
        };
        let Some(delay) = schedule.next() else {
            return Err(err);
        };
        let delay = err.retry_after.map_or(delay, |r| r.max(delay));
        tracing::warn!(error = %err, ?delay, "looking up {what} failed; retrying");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = fence.voided() => {}
        }
    }
}

/// Did an earlier delivery of `job` place its opening leg at the broker (looked up by its client
/// order id, transient failures retried on `policy`'s schedule)? `None`: the broker could not say
/// (or the fence ended), so the caller must assume it might have. Close legs do not count: a
/// blocked reversal closes under the job's own close ids too (closing is never blocked).
pub async fn open_placed_before(
    ex: &dyn Exchange,
    job: &Job,
    policy: &RetryPolicy,
    fence: &Fence,
) -> Option<bool> {
    let open = client_order_id(job.job_id, Leg::Open);
    looked_up(policy, fence, "the job's earlier open", || {
        ex.find_order(&job.alert.symbol, &open)
    })
    .await
    .ok()
    .map(|found| found.is_some())
}

/// What an earlier delivery of `job`, blocked as a reversal, closed before it died, now that the
/// broker shows no position: its close legs, looked up by their client order ids (retried as
/// [`open_placed_before`]), recorded as the close of a `closed` position entered at `entry` (the
/// caller's record of it), and the position flat. `Ok(None)`: no close of the job was found.
pub async fn closes_placed_before(
    ex: &dyn Exchange,
    job: &Job,
    closed: Side,
    entry: Option<Decimal>,
    policy: &RetryPolicy,
    fence: &Fence,
) -> Result<Option<Outcome>, ExchangeError> {
    let placed = looked_up(policy, fence, "the job's earlier closes", || {
        Placed::look_up(ex, job)
    })
    .await?;
    if placed.closes.is_empty() {
        return Ok(None);
    }
    let mut progress = Progress::default();
    close::record_found(&placed.closes, closed, entry, &mut progress);
    progress.position = Some(PositionChange::Flat);
    Ok(Some(done(&mut progress)))
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

/// The trade row of an opening leg's acknowledgement.
fn open_fill(side: OrderSide, ack: &OrderAck, fallback_qty: Decimal) -> Fill {
    Fill {
        leg: Leg::Open,
        side,
        quantity: filled_or(ack, fallback_qty),
        price: ack.avg_price,
        client_order_id: ack.client_order_id.clone(),
        exchange_order_id: Some(ack.exchange_order_id.clone()),
        status: FillState::Filled,
        pnl: None,
        exit_reason: None,
        fee: ack.fee,
        of_job: None,
    }
}

/// What an acknowledged order filled: its `filled_qty`, or `fallback` for a broker that reports a
/// complete fill without a quantity.
fn filled_or(ack: &OrderAck, fallback: Decimal) -> Decimal {
    if ack.filled_qty > Decimal::ZERO {
        ack.filled_qty
    } else if ack.state == OrderState::Filled {
        fallback
    } else {
        Decimal::ZERO
    }
}

/// What one attempt did so far: kept when it fails half-way, so the job's record says what
/// happened at the broker.
#[derive(Default)]
struct Progress {
    fills: Vec<Fill>,
    resting: Vec<RestingOrder>,
    cancelled: Vec<String>,
    /// The position as the broker last reported it after a close (`None`: no close ran).
    position: Option<PositionChange>,
}

impl Progress {
    fn into_outcome(self, status: JobStatus, message: Option<String>) -> Outcome {
        Outcome {
            status,
            fills: self.fills,
            position: self.position.unwrap_or(PositionChange::Unchanged),
            message,
            error_class: None,
            history: vec![],
            environment: CredentialEnv::Production,
            resting: self.resting,
            cancelled: self.cancelled,
        }
    }

    fn cancelled(&mut self, client_order_id: &str) {
        if !self.cancelled.iter().any(|c| c == client_order_id) {
            self.cancelled.push(client_order_id.to_string());
        }
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

/// The legs a previous delivery of the job placed, looked up by their client order ids.
#[derive(Default)]
struct Placed {
    /// Close orders found, in leg order, with what they filled.
    closes: Vec<(Leg, OrderAck)>,
    open: Option<OrderAck>,
}

impl Placed {
    async fn look_up(ex: &dyn Exchange, job: &Job) -> Result<Placed, ExchangeError> {
        let sym = &job.alert.symbol;
        let mut closes = Vec::new();
        for leg in Leg::CLOSES {
            if let Some(ack) = ex
                .find_order(sym, &client_order_id(job.job_id, leg))
                .await?
            {
                closes.push((leg, ack));
            }
        }
        let open = ex
            .find_order(sym, &client_order_id(job.job_id, Leg::Open))
            .await?;
        Ok(Placed { closes, open })
    }

    fn closed_qty(&self) -> Result<Decimal, Overflow> {
        self.closes
            .iter()
            .try_fold(Decimal::ZERO, |sum, (_, a)| money::add(sum, a.filled_qty))
    }
}

/// `closed`: what is known of the position a close job closes; updated to what the broker shows.
async fn attempt(
    ex: &dyn Exchange,
    job: &Job,
    recover: bool,
    closed: &mut Option<ClosedPosition>,
    progress: &mut Progress,
    fence: &Fence,
) -> Result<Outcome, ExchangeError> {
    let placed = if recover {
        Placed::look_up(ex, job).await?
    } else {
        Placed::default()
    };
    // An entry an earlier job left working in this symbol goes first, in the user's order: the
    // alert after it decides what the account holds now. What it filled before the cancel is
    // that job's open, and the position this job starts from.
    still_ours(fence)?;
    let mut listing = protect::Listing::read(ex, job).await?;
    let entries =
        protect::cancel_sparky_orders(ex, job, |leg| leg == Leg::Open, &mut listing, progress)
            .await?;
    let position = ex.position(&job.alert.symbol).await?;
    if let Some(p) = &position {
        *closed = Some(ClosedPosition {
            side: p.side,
            entry: p.entry_price,
        });
    }
    protect::take_over_filled_entries(ex, job, &entries, position.as_ref(), progress).await?;
    let at = Broker { position, listing };
    match job.alert.action.side() {
        None => close_job(ex, job, at, placed, *closed, progress, fence).await,
        Some(side) => open_job(ex, job, side, at, placed, progress, fence).await,
    }
}

/// What the broker showed at the start of the attempt (after earlier jobs' working entries were
/// cancelled): the position in the job's symbol and the open orders, listed once and reused by a
/// close for the protection it cancels.
struct Broker {
    position: Option<ExPosition>,
    listing: protect::Listing,
}

/// `close` (all of the position, or `close_percent` of it).
async fn close_job(
    ex: &dyn Exchange,
    job: &Job,
    at: Broker,
    placed: Placed,
    closed: Option<ClosedPosition>,
    progress: &mut Progress,
    fence: &Fence,
) -> Result<Outcome, ExchangeError> {
    let sym = &job.alert.symbol;
    let Broker {
        position,
        mut listing,
    } = at;
    let Some(p) = position else {
        if placed.closes.is_empty() {
            return Ok(skipped(
                progress,
                format!("no open position in {sym} to close"),
            ));
        }
        // An earlier delivery closed it all: record what it sent, as the close of the position
        // the caller knew (the broker's position is gone and its close orders do not say which
        // side they closed); without one, as a long's, as far as anything tells.
        let (side, entry) = closed.map_or((Side::Long, None), |c| (c.side, c.entry));
        close::record_found(&placed.closes, side, entry, progress);
        progress.position = Some(PositionChange::Flat);
        return Ok(done(progress));
    };
    let target = close::target_remaining(ex, job, &p, placed.closed_qty()?).await?;
    let closed = close::close_to(
        ex,
        job,
        p,
        target,
        &placed.closes,
        &mut listing,
        progress,
        fence,
    )
    .await?;
    closed.into_outcome(job, target, progress)
}

/// `buy` / `sell`: open, skip, or reverse.
async fn open_job(
    ex: &dyn Exchange,
    job: &Job,
    side: Side,
    at: Broker,
    placed: Placed,
    progress: &mut Progress,
    fence: &Fence,
) -> Result<Outcome, ExchangeError> {
    let a = &job.alert;
    let sym = &a.symbol;
    let Broker {
        position,
        mut listing,
    } = at;
    if let Some(ack) = placed.open {
        // The whole job got as far as the open leg before: record it and finish what is missing
        // (its protection), send nothing else.
        close::record_found(&placed.closes, side.opposite(), None, progress);
        return recovered_open(ex, job, side, ack, progress).await;
    }
    if let Some(p) = &position {
        if p.side == side {
            return Ok(skipped(
                progress,
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

    // Reversal: the old side is closed, and the new one opened only once the broker is flat.
    match position {
        Some(p) => {
            let closed = close::close_to(
                ex,
                job,
                p,
                Decimal::ZERO,
                &placed.closes,
                &mut listing,
                progress,
                fence,
            )
            .await?;
            if closed.remaining.is_some() {
                return closed.into_outcome(job, Decimal::ZERO, progress);
            }
        }
        None if !placed.closes.is_empty() => {
            // An earlier delivery closed the old side: record what it sent.
            close::record_found(&placed.closes, side.opposite(), None, progress);
            progress.position = Some(PositionChange::Flat);
        }
        None => {}
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
        client_order_id: client_order_id(job.job_id, Leg::Open),
        on_fill: on_fill.clone(),
    };
    still_ours(fence)?;
    let ack = place_leg(ex, &order, None).await?;
    if !ack.state.is_final() {
        return Ok(working(job, &order, &ack, progress));
    }
    let filled = filled_or(&ack, qty);
    progress.fills.push(open_fill(order.side, &ack, qty));
    let entry = ack.avg_price.unwrap_or(reference_price);
    let (sl, tp) = match &on_fill {
        Some(f) => (f.stop_loss, f.take_profit),
        None => protective_prices(side, entry, a, rules.tick)?,
    };
    progress.position = Some(PositionChange::Open {
        side,
        quantity: filled,
        entry_price: entry,
        stop_loss_price: sl,
        take_profit_price: tp,
    });
    let mut outcome = done(progress);
    if ack.state == OrderState::PartiallyFilled {
        outcome.message = Some(format!(
            "partially filled: {} of {qty} {sym}; the rest was cancelled by the broker",
            filled.normalize()
        ));
    }
    if on_fill.is_none() {
        let levels = protect::Levels {
            stop_loss: sl,
            take_profit: tp,
            trailing_stop: a.trailing_stop,
        };
        protect::protect_new(ex, job, side, filled, levels, false, &mut outcome).await;
    } else {
        outcome
            .resting
            .extend(on_fill_resting(job, side, filled, sl, tp));
    }
    Ok(outcome)
}

/// The stop-loss / take-profit that came with an open's fill on an exchange that
/// [`Exchange::protects_on_fill`] (OANDA's on-fill orders of the trade, under the job's `sl` /
/// `tp` client order ids): recorded like placed ones, so the reconciliation knows them (a stop
/// that fires is the job's `sl` exit, not drift) and a close records them gone with the trade.
fn on_fill_resting(
    job: &Job,
    side: Side,
    quantity: Decimal,
    stop_loss: Option<Decimal>,
    take_profit: Option<Decimal>,
) -> Vec<RestingOrder> {
    [(Leg::StopLoss, stop_loss), (Leg::TakeProfit, take_profit)]
        .into_iter()
        .filter_map(|(leg, price)| {
            Some(RestingOrder {
                leg,
                client_order_id: client_order_id(job.job_id, leg),
                exchange_order_id: None,
                side: OrderSide::closing(side),
                quantity,
                price: Some(price?),
            })
        })
        .collect()
}

/// An entry the broker accepted but has not filled: the job ends `working` and the order is
/// recorded for the follower (which records its fill and protects it, or cancels it when its time
/// is up).
fn working(job: &Job, order: &OrderRequest, ack: &OrderAck, progress: &mut Progress) -> Outcome {
    progress.resting.push(RestingOrder {
        leg: Leg::Open,
        client_order_id: order.client_order_id.clone(),
        exchange_order_id: Some(ack.exchange_order_id.clone()),
        side: order.side,
        quantity: order.quantity,
        price: order.limit_price,
    });
    let mut outcome = std::mem::take(progress).into_outcome(JobStatus::Working, None);
    outcome.message = Some(format!(
        "{} {} {} accepted and working at the broker (order {}, {} filled so far); it is followed until it fills or is cancelled after {} s",
        order.side.as_str(),
        order.quantity.normalize(),
        job.alert.symbol,
        ack.exchange_order_id,
        ack.filled_qty.normalize(),
        working_ttl_secs(&job.alert),
    ));
    outcome
}

/// How long a working entry is followed before it is cancelled: the alert's `limit_ttl_secs`, or
/// [`DEFAULT_LIMIT_TTL_SECS`]; never more than the 30 days the parser allows (an entry that got
/// past it cannot make an expiry time overflow).
pub fn working_ttl_secs(a: &crate::domain::Alert) -> u64 {
    a.limit_ttl_secs
        .unwrap_or(DEFAULT_LIMIT_TTL_SECS)
        .min(crate::domain::bounds::MAX_LAG_SECS)
}

/// A working entry's default lifetime: one day.
pub const DEFAULT_LIMIT_TTL_SECS: u64 = 24 * 3600;

/// A redelivered job whose open leg an earlier delivery placed: record it, and place its
/// protection if that delivery did not get to it.
async fn recovered_open(
    ex: &dyn Exchange,
    job: &Job,
    side: Side,
    ack: OrderAck,
    progress: &mut Progress,
) -> Result<Outcome, ExchangeError> {
    let order_side = OrderSide::opening(side);
    if !ack.state.is_final() {
        let order = OrderRequest {
            symbol: job.alert.symbol.clone(),
            side: order_side,
            quantity: ack.filled_qty,
            order_type: job.alert.order_type,
            limit_price: job.alert.price,
            reduce_only: false,
            leg: Leg::Open,
            client_order_id: ack.client_order_id.clone(),
            on_fill: None,
        };
        return Ok(working(job, &order, &ack, progress));
    }
    let filled = ack.filled_qty;
    progress.fills.push(open_fill(order_side, &ack, filled));
    // A limit entry without a reported average fills at its limit or better.
    let entry = ack.avg_price.or(job.alert.price).unwrap_or_default();
    let rules = ex.symbol_rules(&job.alert.symbol).await?;
    let (sl, tp) = protective_prices(side, entry, &job.alert, rules.tick)?;
    progress.position = Some(PositionChange::Open {
        side,
        quantity: filled,
        entry_price: entry,
        stop_loss_price: sl,
        take_profit_price: tp,
    });
    let mut outcome = done(progress);
    if ack.state == OrderState::PartiallyFilled {
        outcome.message = Some(format!(
            "partially filled: {} {}; the rest was cancelled",
            filled.normalize(),
            job.alert.symbol
        ));
    }
    if !ex.protects_on_fill() {
        let levels = protect::Levels {
            stop_loss: sl,
            take_profit: tp,
            trailing_stop: job.alert.trailing_stop,
        };
        protect::protect_new(ex, job, side, filled, levels, true, &mut outcome).await;
    } else {
        // The open carried them (OANDA's on-fill orders, when the alert had levels).
        outcome
            .resting
            .extend(on_fill_resting(job, side, filled, sl, tp));
    }
    Ok(outcome)
}

/// The working-order follower's step for an entry that filled (`ack` final: filled, or partly
/// filled and then cancelled or expired): the job's open fill and position, and its protection
/// placed for what filled at levels from the fill price (OANDA's came with the fill). The outcome is
/// `succeeded` (or `succeeded_unprotected` with the reason) for the follower to commit.
pub async fn follow_fill(
    ex: &dyn Exchange,
    job: &Job,
    ack: OrderAck,
) -> Result<Outcome, ExchangeError> {
    let Some(side) = job.alert.action.side() else {
        return Err(ExchangeError::permanent(format!(
            "job {} is a close; it has no entry to follow",
            job.job_id
        )));
    };
    if !ack.state.is_final() || ack.filled_qty <= Decimal::ZERO {
        return Err(ExchangeError::permanent(format!(
            "order {} has not filled (state {:?}, {} filled)",
            ack.client_order_id, ack.state, ack.filled_qty
        )));
    }
    let mut progress = Progress::default();
    recovered_open(ex, job, side, ack, &mut progress).await
}

/// For a job that is given up (`poison`: delivered too often without finishing): record what its
/// earlier deliveries did at the broker, looked up by client order id, and send nothing. The
/// outcome stays `given_up`'s status and class; the legs found are its fills. Look-ups are retried
/// as every look-up of earlier orders is ([`looked_up`]); `None` once `fence` is void (the next
/// owner looks them up).
pub async fn record_placed(
    ex: &dyn Exchange,
    job: &Job,
    mut given_up: Outcome,
    policy: &RetryPolicy,
    fence: &Fence,
) -> Option<Outcome> {
    let looked = looked_up(policy, fence, "the given-up job's orders", || {
        Placed::look_up(ex, job)
    });
    let placed = match looked.await {
        Ok(placed) => placed,
        Err(_) if fence.is_void() => return None,
        Err(e) => {
            let m = given_up.message.take().unwrap_or_default();
            given_up.message = Some(format!("{m}; its orders could not be looked up: {e}"));
            return Some(given_up);
        }
    };
    let mut progress = Progress::default();
    let closed_side = side_closed_by(job);
    close::record_found(&placed.closes, closed_side, None, &mut progress);
    if !progress.fills.is_empty() {
        // What the closes left is unknown here; the reconciliation compares it with the broker.
        given_up.position = PositionChange::Flat;
    }
    given_up.fills.append(&mut progress.fills);
    let side = job.alert.action.side();
    if let (Some(ack), Some(side)) = (placed.open.filter(|a| a.filled_qty > Decimal::ZERO), side) {
        given_up
            .fills
            .push(open_fill(OrderSide::opening(side), &ack, Decimal::ZERO));
        given_up.position = PositionChange::Open {
            side,
            quantity: ack.filled_qty,
            entry_price: ack.avg_price.unwrap_or_default(),
            stop_loss_price: None,
            take_profit_price: None,
        };
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

/// The side of the position a job's close orders closed: the opposite of a reversal's new side; a
/// long's for a plain close (nothing else tells once the position is gone).
fn side_closed_by(job: &Job) -> Side {
    job.alert.action.side().map_or(Side::Long, Side::opposite)
}

/// A skipped outcome that keeps what the attempt did before deciding to skip (an earlier job's
/// working entry it cancelled, and what that had filled).
fn skipped(progress: &mut Progress, message: String) -> Outcome {
    let taken_over: Vec<String> = progress
        .fills
        .iter()
        .filter_map(|f| {
            Some(format!(
                "{} of job {}'s working entry",
                f.quantity.normalize(),
                f.of_job?
            ))
        })
        .collect();
    let message = if taken_over.is_empty() {
        message
    } else {
        format!(
            "{message} (the position is the {} that filled before this alert cancelled the rest; it has no protection)",
            taken_over.join(", ")
        )
    };
    std::mem::take(progress).into_outcome(JobStatus::Skipped, Some(message))
}

/// A succeeded outcome from what the attempt did.
fn done(progress: &mut Progress) -> Outcome {
    std::mem::take(progress).into_outcome(JobStatus::Succeeded, None)
}
