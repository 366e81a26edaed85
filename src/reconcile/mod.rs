//! Reconciliation: Sparky's record of an account (its `positions` rows and the orders it left
//! resting, `broker_orders`) brought back in line with the broker, which is the truth.
//!
//! For one account (user, exchange, environment), per symbol with a position row or an open
//! `broker_orders` row ([`reconcile_account`]):
//! 1. **Working entries** ([`follow`]): an entry a job left working is looked up by its client id;
//!    filled -> the job's open trade, its position and its protection, the job `succeeded`; past
//!    its `expires_at` -> cancelled at the broker, then what filled (a partial fill) is recorded as
//!    above or the job ends `expired`. What an entry still working has filled so far explains that
//!    much of the broker's position in step 4. An entry a later alert cancelled ends its job
//!    `succeeded` if that alert recorded a partial fill for it, else `expired`.
//! 2. **Protective orders** Sparky recorded as open that the broker no longer lists are looked up:
//!    filled -> a trade of the job that placed them (leg `sl`/`tp`, exit reason `stop_loss` /
//!    `take_profit`, realized PnL from Sparky's entry price) and the row `filled`; otherwise the row
//!    is `cancelled`.
//! 3. **Orphans**: a Sparky stop-loss / take-profit resting at the broker while the broker holds
//!    no position it could close (flat, or on the side the order would add to) is cancelled. Its
//!    row is then settled as in step 2 from the broker's final state: the order was listed before
//!    the position was read, so a stop that fired in between (which is why the position is gone)
//!    is recorded as the exit it was, not as a cancel and an unexplained close.
//! 4. **Position**: Sparky's row is set to the broker's (deleted when flat). A difference that the
//!    protective fills of step 2 and the working entries' fills do not explain is *drift*
//!    ([`DriftKind`]), counted in
//!    `sparky_reconcile_drift_total{exchange, kind}` and in `sparky status`. Drift is not recorded
//!    as a trade: there is no Sparky order (and so no job) behind it, and `trades` rows belong to a
//!    job's leg; the sweep's report and the worker's log carry it.
//!
//! Listings go through the account's client, so on Tradier they include the orders Sparky recorded
//! that the session's listing lacks ([`crate::exchanges::recorded`]). OANDA's on-fill orders cannot
//! be orphans (they go with their trade); the sweep marks them gone.
//!
//! The broker's open orders are listed *before* its position is read, so an order a job places
//! while the sweep runs is only seen together with the position it protects: the sweep cannot
//! cancel a new position's protection as an orphan. It never opens a position and never sends
//! anything but cancels.
//!
//! **Ordering with the user's jobs.** The worker's periodic sweep runs *inside the user's lane*
//! (`worker::lanes`): it is queued behind the user's jobs and no job of the user starts until it is
//! done, exactly as one job waits for the previous one. No lock is held across broker calls and no
//! extra Postgres connection is pinned per job, which a per-user advisory lock around
//! execute+commit would need. `sparky reconcile` (the CLI) runs outside the workers; it is made
//! safe against a concurrent job by the order above and by compare-and-set writes (a position row
//! is only changed if it is still what the sweep read; a working job is only moved on if it is
//! still `working`), so a job that commits meanwhile wins and the next sweep looks again.

pub mod db;
pub mod follow;

use std::fmt;

use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use crate::domain::{Account, ExchangeKind, OrderSide, Side, Symbol};
use crate::exchanges::{ExPosition, Exchange, ExchangeError, Leg, OpenOrder, OrderAck};
use crate::executor::realized_pnl;
use crate::job::{ExitReason, JobStatus};
use crate::store::{PositionRow, Store, StoreError};

use db::{OpenRow, ProtectiveExit, RowState};

/// A difference between Sparky's position and the broker's that no Sparky order explains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// Sparky had a position; the broker is flat.
    Closed,
    /// Both hold the same side, in different quantities.
    Resized,
    /// The broker holds a position Sparky had no row for.
    Opened,
    /// The broker holds the other side.
    Flipped,
}

impl DriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftKind::Closed => "closed",
            DriftKind::Resized => "resized",
            DriftKind::Opened => "opened",
            DriftKind::Flipped => "flipped",
        }
    }
}

/// A position as the report shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Held {
    pub side: Side,
    pub quantity: Decimal,
}

impl fmt::Display for Held {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.side.as_str(), self.quantity.normalize())
    }
}

fn show(h: Option<Held>) -> String {
    h.map_or_else(|| "flat".to_string(), |h| h.to_string())
}

/// One thing the reconciliation found (and what it did about it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// A Sparky stop-loss / take-profit filled at the broker: recorded as its job's trade.
    ProtectionFilled {
        symbol: String,
        job_id: Uuid,
        client_order_id: String,
        exit_reason: ExitReason,
        quantity: Decimal,
        price: Option<Decimal>,
        pnl: Option<Decimal>,
    },
    /// A Sparky protective order is gone at the broker without a fill: marked cancelled.
    ProtectionGone {
        symbol: String,
        client_order_id: String,
    },
    /// A Sparky protective order rested while there was nothing for it to protect: cancelled.
    OrphanCancelled {
        symbol: String,
        client_order_id: String,
    },
    /// Sparky's position row was set to the broker's.
    PositionSynced {
        symbol: String,
        sparky: Option<Held>,
        broker: Option<Held>,
        /// `None`: explained by the protective fills found in this sweep.
        drift: Option<DriftKind>,
    },
    /// The position row changed while the sweep ran (a job committed): left alone this time.
    PositionChangedMeanwhile { symbol: String },
    /// A working entry filled: its job's fill, position and protection recorded.
    EntryFilled {
        symbol: String,
        job_id: Uuid,
        quantity: Decimal,
        price: Option<Decimal>,
        status: JobStatus,
    },
    /// A working entry's time ran out with nothing filled: cancelled, the job `expired`.
    EntryExpired { symbol: String, job_id: Uuid },
    /// A working entry a later alert cancelled: the job `expired`.
    EntryCancelledByLaterAlert { job_id: Uuid },
    /// A working entry a later alert cancelled after part of it filled (the later job recorded
    /// the fill as this job's open): the job `succeeded`.
    EntryPartlyFilledBeforeLaterAlert { job_id: Uuid, quantity: Decimal },
}

impl Finding {
    /// Is this drift (a difference no Sparky order explains)?
    pub fn drift(&self) -> Option<DriftKind> {
        match self {
            Finding::PositionSynced { drift, .. } => *drift,
            _ => None,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::ProtectionFilled {
                symbol,
                job_id,
                exit_reason,
                quantity,
                price,
                pnl,
                ..
            } => write!(
                f,
                "{symbol}: {} filled at the broker ({} at {}, pnl {}): recorded for job {job_id}",
                serde_json::to_value(exit_reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                quantity.normalize(),
                price.map_or("?".into(), |p| p.normalize().to_string()),
                pnl.map_or("?".into(), |p| p.normalize().to_string()),
            ),
            Finding::ProtectionGone {
                symbol,
                client_order_id,
            } => write!(
                f,
                "{symbol}: protective order {client_order_id} is gone at the broker unfilled: marked cancelled"
            ),
            Finding::OrphanCancelled {
                symbol,
                client_order_id,
            } => write!(
                f,
                "{symbol}: orphaned protective order {client_order_id} (nothing to protect): cancelled"
            ),
            Finding::PositionSynced {
                symbol,
                sparky,
                broker,
                drift,
            } => write!(
                f,
                "{symbol}: position {} -> {} ({})",
                show(*sparky),
                show(*broker),
                drift.map_or("explained by the fills above".to_string(), |d| format!(
                    "drift: {}",
                    d.as_str()
                )),
            ),
            Finding::PositionChangedMeanwhile { symbol } => write!(
                f,
                "{symbol}: the position changed while reconciling (a job ran); left for the next sweep"
            ),
            Finding::EntryFilled {
                symbol,
                job_id,
                quantity,
                price,
                status,
            } => write!(
                f,
                "{symbol}: working entry of job {job_id} filled {} at {}: recorded, job {status}",
                quantity.normalize(),
                price.map_or("?".into(), |p| p.normalize().to_string()),
            ),
            Finding::EntryExpired { symbol, job_id } => write!(
                f,
                "{symbol}: working entry of job {job_id} expired unfilled: cancelled, job expired"
            ),
            Finding::EntryCancelledByLaterAlert { job_id } => write!(
                f,
                "working entry of job {job_id} was cancelled by a later alert: job expired"
            ),
            Finding::EntryPartlyFilledBeforeLaterAlert { job_id, quantity } => write!(
                f,
                "working entry of job {job_id} filled {} before a later alert cancelled the rest: job succeeded",
                quantity.normalize()
            ),
        }
    }
}

/// What one account's reconciliation found; `error` when it stopped early (the findings before
/// it were recorded).
#[derive(Clone, Debug, Serialize)]
pub struct AccountReport {
    pub account: Account,
    pub findings: Vec<Finding>,
    pub error: Option<String>,
}

impl AccountReport {
    pub fn drift(&self) -> impl Iterator<Item = DriftKind> + '_ {
        self.findings.iter().filter_map(Finding::drift)
    }
}

impl fmt::Display for AccountReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}:", self.account)?;
        if self.findings.is_empty() && self.error.is_none() {
            writeln!(f, "  in line with the broker")?;
        }
        for x in &self.findings {
            writeln!(f, "  {x}")?;
        }
        if let Some(e) = &self.error {
            writeln!(f, "  stopped: {e}")?;
        }
        Ok(())
    }
}

/// Why reconciling a symbol stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("broker: {0}")]
    Exchange(#[from] ExchangeError),
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("unusable symbol {0}")]
    Symbol(String),
}

/// Reconcile one account with its broker (`ex`: the account's client). Never fails as a whole: a
/// symbol that cannot be reconciled stops the account's report with the error (the next sweep
/// tries again).
pub async fn reconcile_account(
    store: &Store,
    ex: &dyn Exchange,
    account: &Account,
) -> AccountReport {
    let mut report = AccountReport {
        account: *account,
        findings: vec![],
        error: None,
    };
    if let Err(e) = reconcile_into(store, ex, account, &mut report.findings).await {
        report.error = Some(e.to_string());
    }
    report
}

async fn reconcile_into(
    store: &Store,
    ex: &dyn Exchange,
    account: &Account,
    findings: &mut Vec<Finding>,
) -> Result<(), ReconcileError> {
    for (job_id, filled) in db::finish_cancelled_entries(store, account).await? {
        findings.push(match filled {
            None => Finding::EntryCancelledByLaterAlert { job_id },
            Some(quantity) => Finding::EntryPartlyFilledBeforeLaterAlert { job_id, quantity },
        });
    }
    for symbol in db::symbols(store, account).await? {
        reconcile_symbol(store, ex, account, &symbol, findings).await?;
    }
    Ok(())
}

/// One symbol of the account, in the order the module documentation gives.
async fn reconcile_symbol(
    store: &Store,
    ex: &dyn Exchange,
    account: &Account,
    symbol: &str,
    findings: &mut Vec<Finding>,
) -> Result<(), ReconcileError> {
    let sym = Symbol::parse(symbol, account.exchange)
        .map_err(|e| ReconcileError::Symbol(format!("{symbol}: {e}")))?;
    let working = follow::follow_entries(store, ex, account, &sym, findings).await?;
    // What Sparky holds before any protective exit is recorded: the exits' PnL is from its entry.
    let seen = store.position(account, symbol).await?;
    // Orders first, then the position (see the module documentation).
    let listed = ex.open_orders(&sym).await?;
    let rows = db::open_rows(store, account, sym.as_str()).await?;
    let protective = Protective {
        store,
        ex,
        account,
        sym: &sym,
        rows: &rows,
        seen: seen.as_ref(),
    };
    let exited = protective.exits(&listed, findings).await?;
    let position = ex.position(&sym).await?;
    let exited_meanwhile = protective
        .cancel_orphans(&listed, position.as_ref(), findings)
        .await?;
    let exited = exited.checked_add(exited_meanwhile).unwrap_or(exited);
    sync_position(
        store,
        account,
        symbol,
        seen.as_ref(),
        position.as_ref(),
        (exited, working),
        findings,
    )
    .await
}

/// Steps 2 and 3: Sparky's protective orders of one symbol (`rows`: its open `broker_orders`
/// rows; `seen`: Sparky's position before any exit is recorded).
struct Protective<'a> {
    store: &'a Store,
    ex: &'a dyn Exchange,
    account: &'a Account,
    sym: &'a Symbol,
    rows: &'a [OpenRow],
    seen: Option<&'a PositionRow>,
}

impl Protective<'_> {
    /// Step 2: the open protective rows the broker no longer lists. Returns the quantity their
    /// fills closed (what explains a smaller position).
    async fn exits(
        &self,
        listed: &[OpenOrder],
        findings: &mut Vec<Finding>,
    ) -> Result<Decimal, ReconcileError> {
        let mut exited = Decimal::ZERO;
        for row in self.rows.iter().filter(|r| r.leg.is_protective()) {
            let still_listed = listed
                .iter()
                .any(|o| o.client_order_id.as_deref() == Some(row.client_order_id.as_str()));
            if !still_listed {
                let q = self.settle(row, findings).await?;
                exited = exited.checked_add(q).unwrap_or(exited);
            }
        }
        Ok(exited)
    }

    /// Step 3: cancel Sparky's protective orders that protect nothing (no position, or one on the
    /// side they would open). An order listed before the position was read may have filled in
    /// between (a stop that fired is why the position is gone): after the cancel its row is
    /// settled from the broker's final state, so such a fill is recorded as the exit it was, not
    /// as a cancelled order and a position that closed unexplained. Returns the quantity those
    /// fills closed.
    async fn cancel_orphans(
        &self,
        listed: &[OpenOrder],
        position: Option<&ExPosition>,
        findings: &mut Vec<Finding>,
    ) -> Result<Decimal, ReconcileError> {
        let mut exited = Decimal::ZERO;
        for o in listed {
            let Some((_, leg)) = o.sparky_leg() else {
                continue;
            };
            let protects = position.is_some_and(|p| o.side == OrderSide::closing(p.side));
            if !leg.is_protective() || protects {
                continue;
            }
            self.ex.cancel_order(self.sym, o).await?;
            let id = o.client_order_id.clone().unwrap_or_default();
            match self.rows.iter().find(|r| r.client_order_id == id) {
                Some(row) => {
                    let mut settled = Vec::new();
                    let q = self.settle(row, &mut settled).await?;
                    exited = exited.checked_add(q).unwrap_or(exited);
                    if settled.is_empty() {
                        // The broker still reports it working a moment after the cancel: the
                        // cancel was sent; the next sweep settles the row.
                        settled.push(Finding::ProtectionGone {
                            symbol: self.sym.to_string(),
                            client_order_id: id.clone(),
                        });
                    }
                    // A plain cancel reads as the orphan it was.
                    for f in settled {
                        findings.push(match f {
                            Finding::ProtectionGone { .. } => Finding::OrphanCancelled {
                                symbol: self.sym.to_string(),
                                client_order_id: id.clone(),
                            },
                            other => other,
                        });
                    }
                }
                None => findings.push(Finding::OrphanCancelled {
                    symbol: self.sym.to_string(),
                    client_order_id: id,
                }),
            }
        }
        Ok(exited)
    }

    /// A protective row whose order is not (or no longer) working at the broker, from the
    /// broker's final state: a fill is recorded as the exit trade, anything else ends the row
    /// cancelled; an order the broker still reports working is left for the next sweep. Returns
    /// the quantity filled.
    async fn settle(
        &self,
        row: &OpenRow,
        findings: &mut Vec<Finding>,
    ) -> Result<Decimal, ReconcileError> {
        let sym = self.sym;
        match self.ex.find_order(sym, &row.client_order_id).await? {
            // Listed a moment ago no more, but still working: the next sweep looks again.
            Some(ack) if !ack.state.is_final() => Ok(Decimal::ZERO),
            Some(ack) if ack.filled_qty > Decimal::ZERO => {
                let exit = protective_exit(self.account, sym.as_str(), row, &ack, self.seen);
                db::record_protective_exit(self.store, &exit).await?;
                findings.push(Finding::ProtectionFilled {
                    symbol: sym.to_string(),
                    job_id: row.job_id,
                    client_order_id: row.client_order_id.clone(),
                    exit_reason: exit.exit_reason,
                    quantity: ack.filled_qty,
                    price: ack.avg_price.or(row.price),
                    pnl: exit.pnl,
                });
                Ok(ack.filled_qty)
            }
            _ => {
                db::mark(self.store, &row.client_order_id, RowState::Cancelled).await?;
                findings.push(Finding::ProtectionGone {
                    symbol: sym.to_string(),
                    client_order_id: row.client_order_id.clone(),
                });
                Ok(Decimal::ZERO)
            }
        }
    }
}

/// The trade of a protective order's fill: PnL from Sparky's entry price, the exit reason from the
/// leg ([`exit_reason`]).
fn protective_exit<'a>(
    account: &'a Account,
    symbol: &'a str,
    row: &'a OpenRow,
    ack: &'a OrderAck,
    seen: Option<&PositionRow>,
) -> ProtectiveExit<'a> {
    // The position the order closed: the opposite of the order's side.
    let side = match row.side {
        OrderSide::Sell => Side::Long,
        OrderSide::Buy => Side::Short,
    };
    let entry = seen.filter(|p| p.side == side).map(|p| p.entry_price);
    let exit = ack.avg_price.or(row.price);
    let pnl = realized_pnl(side, entry, exit, ack.filled_qty);
    ProtectiveExit {
        account,
        symbol,
        row,
        ack,
        pnl,
        exit_reason: exit_reason(account.exchange, row.leg, pnl),
    }
}

/// Why a protective order's fill exited. A Tradier OCO order (one order carrying both levels,
/// recorded under the stop-loss leg's id) does not say which leg filled: a fill at a profit was the
/// take-profit.
pub fn exit_reason(exchange: ExchangeKind, leg: Leg, pnl: Option<Decimal>) -> ExitReason {
    match leg {
        Leg::TakeProfit => ExitReason::TakeProfit,
        Leg::StopLoss
            if exchange == ExchangeKind::Tradier && pnl.is_some_and(|p| p > Decimal::ZERO) =>
        {
            ExitReason::TakeProfit
        }
        _ => ExitReason::StopLoss,
    }
}

/// Step 4: Sparky's position row set to the broker's; drift is what `explained` (the quantity
/// protective fills closed, and the signed quantity working entries have filled so far) does not
/// explain.
async fn sync_position(
    store: &Store,
    account: &Account,
    symbol: &str,
    seen: Option<&PositionRow>,
    broker: Option<&ExPosition>,
    explained: (Decimal, Decimal),
    findings: &mut Vec<Finding>,
) -> Result<(), ReconcileError> {
    let sparky = seen.map(|p| Held {
        side: p.side,
        quantity: p.quantity,
    });
    let broker_held = broker.map(|p| Held {
        side: p.side,
        quantity: p.quantity,
    });
    if sparky == broker_held {
        return Ok(());
    }
    let drift = drift(sparky, broker_held, explained.0, explained.1);
    if !db::set_position(store, account, symbol, seen, broker).await? {
        findings.push(Finding::PositionChangedMeanwhile {
            symbol: symbol.to_string(),
        });
        return Ok(());
    }
    findings.push(Finding::PositionSynced {
        symbol: symbol.to_string(),
        sparky,
        broker: broker_held,
        drift,
    });
    Ok(())
}

/// The drift between Sparky's position and the broker's, given what protective fills closed
/// (`exited`) and what working entries have filled so far (`working`, signed: long positive);
/// `None` when they explain the difference.
pub fn drift(
    sparky: Option<Held>,
    broker: Option<Held>,
    exited: Decimal,
    working: Decimal,
) -> Option<DriftKind> {
    let signed = |h: Option<Held>| {
        h.map_or(Decimal::ZERO, |h| match h.side {
            Side::Long => h.quantity,
            Side::Short => -h.quantity,
        })
    };
    let (s, b) = (signed(sparky), signed(broker));
    // Protective fills close toward flat.
    let closed = if s > Decimal::ZERO { -exited } else { exited };
    let expected = s
        .checked_add(if s.is_zero() { Decimal::ZERO } else { closed })
        .and_then(|x| x.checked_add(working));
    if expected == Some(b) {
        return None;
    }
    match (sparky, broker) {
        (None, None) => None,
        (None, Some(_)) => Some(DriftKind::Opened),
        (Some(_), None) => Some(DriftKind::Closed),
        (Some(s), Some(b)) if s.side != b.side => Some(DriftKind::Flipped),
        (Some(_), Some(_)) => Some(DriftKind::Resized),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn held(side: Side, q: Decimal) -> Option<Held> {
        Some(Held { side, quantity: q })
    }

    #[test]
    fn drift_is_what_protective_fills_do_not_explain() {
        let long = |q| held(Side::Long, q);
        assert_eq!(
            drift(long(dec!(1)), None, dec!(1), dec!(0)),
            None,
            "the stop closed it"
        );
        assert_eq!(
            drift(long(dec!(1)), None, dec!(0), dec!(0)),
            Some(DriftKind::Closed)
        );
        assert_eq!(
            drift(long(dec!(1)), long(dec!(0.4)), dec!(0.6), dec!(0)),
            None
        );
        assert_eq!(
            drift(long(dec!(1)), long(dec!(0.4)), dec!(0), dec!(0)),
            Some(DriftKind::Resized)
        );
        assert_eq!(
            drift(None, long(dec!(1)), dec!(0), dec!(0)),
            Some(DriftKind::Opened)
        );
        assert_eq!(
            drift(long(dec!(1)), held(Side::Short, dec!(1)), dec!(1), dec!(0)),
            Some(DriftKind::Flipped)
        );
        assert_eq!(drift(None, None, dec!(0), dec!(0)), None);
        // A working entry that has filled in part explains a position Sparky has no row for.
        assert_eq!(drift(None, long(dec!(4)), dec!(0), dec!(4)), None);
        assert_eq!(
            drift(None, long(dec!(5)), dec!(0), dec!(4)),
            Some(DriftKind::Opened)
        );
        assert_eq!(
            drift(None, held(Side::Short, dec!(4)), dec!(0), dec!(-4)),
            None
        );
    }

    #[test]
    fn a_tradier_oco_fill_at_a_profit_is_the_take_profit() {
        use ExchangeKind::*;
        assert_eq!(
            exit_reason(Tradier, Leg::StopLoss, Some(dec!(5))),
            ExitReason::TakeProfit
        );
        assert_eq!(
            exit_reason(Tradier, Leg::StopLoss, Some(dec!(-5))),
            ExitReason::StopLoss
        );
        assert_eq!(
            exit_reason(Aster, Leg::StopLoss, Some(dec!(5))),
            ExitReason::StopLoss
        );
        assert_eq!(
            exit_reason(Aster, Leg::TakeProfit, None),
            ExitReason::TakeProfit
        );
    }
}
