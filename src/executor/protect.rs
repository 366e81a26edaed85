//! Sparky's orders resting at the broker: protective stop-loss / take-profit orders placed after
//! an open (and recorded with their broker ids), cancelled before the position is closed, and
//! re-placed for what a partial close leaves; working entries an earlier job left, cancelled by the
//! next alert in the symbol.
//!
//! Sparky's orders are told apart from the user's own by their client order ids
//! ([`crate::exchanges::parse_client_order_id`]): what the broker lists is the truth, so an order
//! orphaned by a crash between the broker and the commit is found and cancelled too.

use rust_decimal::Decimal;

use super::{Fill, Outcome, PositionChange, Progress};
use crate::domain::{Job, OrderSide, Side, TrailingStop};
use crate::exchanges::{Exchange, ExchangeError, Leg, OpenOrder, Protection, RestingOrder};
use crate::job::JobStatus;

/// How many list-and-cancel rounds before giving up (an order that keeps reappearing).
const CANCEL_ROUNDS: usize = 3;

/// Stop-loss / take-profit levels of a position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Levels {
    pub stop_loss: Option<Decimal>,
    pub take_profit: Option<Decimal>,
    /// A native trailing stop (placed with a new position; a partial close's remainder gets its
    /// fixed levels back, not a trailing stop: the broker's trailing state cannot be carried over).
    pub trailing_stop: Option<TrailingStop>,
}

impl Levels {
    pub fn any(&self) -> bool {
        self.stop_loss.is_some() || self.take_profit.is_some() || self.trailing_stop.is_some()
    }
}

/// The broker's open orders in the job's symbol (anyone's), as last listed. An attempt lists them
/// once, before anything else, and again only to confirm a cancellation: a close or a reversal
/// whose working entries and protective orders are cancelled lists twice (once to find them, once
/// to see them gone), one with nothing to cancel lists once.
pub(super) struct Listing(Vec<OpenOrder>);

impl Listing {
    pub async fn read(ex: &dyn Exchange, job: &Job) -> Result<Listing, ExchangeError> {
        Ok(Listing(ex.open_orders(&job.alert.symbol).await?))
    }

    /// Sparky orders of other jobs whose leg `which` picks.
    fn others(&self, job: &Job, which: &impl Fn(Leg) -> bool) -> Vec<OpenOrder> {
        self.0
            .iter()
            .filter(|o| {
                o.sparky_leg()
                    .is_some_and(|(owner, leg)| owner != job.job_id && which(leg))
            })
            .cloned()
            .collect()
    }
}

/// Cancel every Sparky order of another job resting in the job's symbol whose leg `which` picks,
/// as `listing` shows them, and confirm: list again (into `listing`) until none is left
/// (bounded). Returns what was cancelled.
pub(super) async fn cancel_sparky_orders(
    ex: &dyn Exchange,
    job: &Job,
    which: impl Fn(Leg) -> bool,
    listing: &mut Listing,
    progress: &mut Progress,
) -> Result<Vec<OpenOrder>, ExchangeError> {
    let sym = &job.alert.symbol;
    let mut cancelled = Vec::new();
    for round in 0..=CANCEL_ROUNDS {
        let mine = listing.others(job, &which);
        if mine.is_empty() {
            return Ok(cancelled);
        }
        if round == CANCEL_ROUNDS {
            break;
        }
        for o in mine {
            ex.cancel_order(sym, &o).await?;
            if let Some(id) = &o.client_order_id {
                progress.cancelled(id);
            }
            cancelled.push(o);
        }
        *listing = Listing::read(ex, job).await?;
    }
    Err(ExchangeError::transient(format!(
        "Sparky orders in {sym} are still open after {CANCEL_ROUNDS} rounds of cancelling them"
    )))
}

/// Cancel the protective orders of the position in the job's symbol (as `listing` shows them);
/// returns their levels (to protect what a partial close leaves).
pub(super) async fn cancel_protection(
    ex: &dyn Exchange,
    job: &Job,
    listing: &mut Listing,
    progress: &mut Progress,
) -> Result<Levels, ExchangeError> {
    let cancelled = cancel_sparky_orders(ex, job, Leg::is_protective, listing, progress).await?;
    Ok(Levels {
        stop_loss: cancelled.iter().find_map(|o| o.stop_loss),
        take_profit: cancelled.iter().find_map(|o| o.take_profit),
        trailing_stop: None,
    })
}

/// OANDA-style protection (on-fill orders that belong to the trade) goes with the trade when a
/// close takes all of it: nothing is sent, but the orders `listing` shows are recorded as
/// cancelled, so Sparky's record of what rests stays true without waiting for a reconciliation.
pub(super) fn protection_gone_with_trade(job: &Job, listing: &Listing, progress: &mut Progress) {
    for o in listing.others(job, &Leg::is_protective) {
        if let Some(id) = &o.client_order_id {
            progress.cancelled(id);
        }
    }
}

/// Working entries of earlier jobs that this job cancelled (`entries`, from
/// [`cancel_sparky_orders`]) but that had filled in part before the cancel: each is looked up
/// once more and what filled is recorded as the earlier job's `open` trade ([`Fill::of_job`]),
/// and the broker's position (`held`, read after the cancels) as Sparky's, so the job goes on
/// from a position Sparky knows, as after any open. The earlier job itself moves from `working`
/// at the next reconciliation (`succeeded`, as partly filled).
pub(super) async fn take_over_filled_entries(
    ex: &dyn Exchange,
    job: &Job,
    entries: &[OpenOrder],
    held: Option<&crate::exchanges::ExPosition>,
    progress: &mut Progress,
) -> Result<(), ExchangeError> {
    let sym = &job.alert.symbol;
    for o in entries {
        let (Some(coid), Some((owner, _))) = (o.client_order_id.as_deref(), o.sparky_leg()) else {
            continue;
        };
        let Some(ack) = ex.find_order(sym, coid).await? else {
            continue;
        };
        if !ack.state.is_final() {
            return Err(ExchangeError::transient(format!(
                "the working entry {coid} is still open after its cancel"
            )));
        }
        if ack.filled_qty <= Decimal::ZERO {
            continue;
        }
        progress.fills.push(Fill {
            of_job: Some(owner),
            price: ack.avg_price.or(o.limit_price),
            ..super::open_fill(o.side, &ack, ack.filled_qty)
        });
        if let Some(p) = held.filter(|p| OrderSide::opening(p.side) == o.side) {
            progress.position = Some(PositionChange::Open {
                side: p.side,
                quantity: p.quantity,
                entry_price: p
                    .entry_price
                    .or(ack.avg_price)
                    .or(o.limit_price)
                    .unwrap_or_default(),
                stop_loss_price: None,
                take_profit_price: None,
            });
        }
    }
    Ok(())
}

/// Place protection for `quantity` of a `side` position at `levels`, with the job's `sl`/`tp`
/// client order ids.
pub(super) async fn place(
    ex: &dyn Exchange,
    job: &Job,
    side: Side,
    quantity: Decimal,
    levels: Levels,
) -> Result<Vec<RestingOrder>, ExchangeError> {
    ex.protect(&Protection {
        symbol: job.alert.symbol.clone(),
        position_side: side,
        quantity,
        stop_loss: levels.stop_loss,
        take_profit: levels.take_profit,
        trailing_stop: levels.trailing_stop,
        job_id: job.job_id,
    })
    .await
}

/// Protect a position the job opened (`quantity`: what filled). With `recovering` (the open was
/// found, not sent, by this delivery: a redelivery or the working-order follower) it first looks
/// for the protection an earlier run placed and sends only what is missing; a job that sent its
/// open itself cannot have any, and skips that look-up. If it cannot be placed, the job is
/// `succeeded_unprotected` with the reason.
pub(super) async fn protect_new(
    ex: &dyn Exchange,
    job: &Job,
    side: Side,
    quantity: Decimal,
    mut levels: Levels,
    recovering: bool,
    outcome: &mut Outcome,
) {
    if !levels.any() {
        return;
    }
    // Not stopped here even if the lease was lost: the position exists, and leaving it without
    // its stop-loss would be worse than a late protective order.
    let result = async {
        if !recovering {
            return place(ex, job, side, quantity, levels).await;
        }
        let own: Vec<OpenOrder> = ex
            .open_orders(&job.alert.symbol)
            .await?
            .into_iter()
            .filter(|o| {
                o.sparky_leg()
                    .is_some_and(|(owner, leg)| owner == job.job_id && leg.is_protective())
            })
            .collect();
        let mut resting: Vec<RestingOrder> = own
            .iter()
            .filter_map(|o| {
                let (_, leg) = o.sparky_leg()?;
                Some(RestingOrder {
                    leg,
                    client_order_id: o.client_order_id.clone()?,
                    exchange_order_id: Some(o.exchange_order_id.clone()),
                    side: o.side,
                    quantity: o.quantity.unwrap_or(quantity),
                    price: o.stop_loss.or(o.take_profit),
                })
            })
            .collect();
        if own.iter().any(|o| o.stop_loss.is_some()) {
            levels.stop_loss = None;
        }
        if !own.is_empty() {
            // An earlier delivery protected it (a trailing stop lists with no fixed level).
            levels.trailing_stop = None;
        }
        if own.iter().any(|o| o.take_profit.is_some()) {
            levels.take_profit = None;
        }
        if levels.any() {
            resting.extend(place(ex, job, side, quantity, levels).await?);
        }
        Ok::<_, ExchangeError>(resting)
    }
    .await;
    match result {
        Ok(resting) => outcome.resting.extend(resting),
        Err(e) => {
            outcome.status = JobStatus::SucceededUnprotected;
            outcome.message = Some(format!("position opened but not protected: {}", e.message));
            outcome.error_class = Some(e.class.into());
        }
    }
}
