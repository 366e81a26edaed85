//! Risk limits that fail closed (issue 14).
//!
//! Limits are set per user (`sparky risk set --user U`) and optionally per strategy (`--strategy
//! NAME`: then they count only that strategy's jobs). Both rows apply to a job of that strategy.
//! They are evaluated by the worker **before the first order of a job that opens a position**
//! (`buy`/`sell`): on its first delivery, and on a redelivery or replay that finds no open of the
//! job at the broker (see the end of this header):
//!
//! | rule ([`RiskRule`]) | blocks an open when |
//! | --- | --- |
//! | `strategy_disabled` | the alert's strategy is disabled (`sparky strategy disable`) |
//! | `kill_switch` | the kill switch is on |
//! | `symbol_not_allowed` / `symbol_denied` | the symbol is outside the allow list / in the deny list |
//! | `trading_hours` | the local time (in the limits' time zone) is outside `start-end` |
//! | `cooldown` | the last open in this symbol is less than `cooldown_secs` ago |
//! | `max_open_positions` | a new symbol would exceed the open positions |
//! | `max_trades_per_day` | today's opens reached the limit (the day starts at midnight in the time zone) |
//! | `max_daily_loss` | today's realized loss (sum of `trades.pnl`, account currency) reached the limit |
//! | `breaker` | the user's last N finished jobs, in the order they started (their alerts' order: a user's jobs run one at a time), all failed (`rejected`/`dead`); `sparky risk set --reset-breaker` counts only jobs started after it |
//! | `max_position_usd` | the sized order is worth more than the limit in USD |
//!
//! **Fail closed.** A limit that cannot be evaluated blocks the job, naming the rule and why: the
//! limits or the counts cannot be read, a closing trade of today has no realized PnL yet (the daily
//! loss is unknown), the broker's price, rules or equity are unreadable for `max_position_usd`.
//!
//! **Closes are never blocked.** `close` alerts are not evaluated. A reversal (a `buy` while short,
//! a `sell` while long) whose open is blocked still closes the position; the job ends `blocked`
//! with the close recorded.
//!
//! A blocked job ends with status `blocked`, error class `risk` and a message `blocked by <rule>:
//! <the numbers>` (in `/v1/jobs/{id}`), and counts in `sparky_jobs_blocked_total{rule}`. Blocked jobs
//! are not dead-lettered (nothing failed). Redeliveries and replays (recovery mode) are evaluated
//! like a first run when the job's open is not found at the broker
//! (`executor::open_placed_before`, by its client order id); close legs found do not count, as a
//! blocked reversal closes under the job's close ids too, and a blocked redelivery records what
//! they filled. One that finds its open is finishing what an earlier delivery placed, and is not
//! evaluated again, nor is one whose broker cannot be asked (the executor then looks everything
//! up again): the limits are skipped exactly when the broker cannot say.

use std::fmt;

use chrono::{DateTime, NaiveTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use crate::domain::{Action, Job};
use crate::exchanges::Exchange;
use crate::store::{Store, StoreError};
use crate::strategy::StrategyRef;

/// The rule that blocked a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RiskRule {
    /// The limits themselves could not be read.
    Limits,
    StrategyDisabled,
    KillSwitch,
    SymbolNotAllowed,
    SymbolDenied,
    TradingHours,
    Cooldown,
    MaxOpenPositions,
    MaxTradesPerDay,
    MaxDailyLoss,
    Breaker,
    MaxPositionUsd,
}

impl RiskRule {
    pub fn as_str(self) -> &'static str {
        match self {
            RiskRule::Limits => "limits",
            RiskRule::StrategyDisabled => "strategy_disabled",
            RiskRule::KillSwitch => "kill_switch",
            RiskRule::SymbolNotAllowed => "symbol_not_allowed",
            RiskRule::SymbolDenied => "symbol_denied",
            RiskRule::TradingHours => "trading_hours",
            RiskRule::Cooldown => "cooldown",
            RiskRule::MaxOpenPositions => "max_open_positions",
            RiskRule::MaxTradesPerDay => "max_trades_per_day",
            RiskRule::MaxDailyLoss => "max_daily_loss",
            RiskRule::Breaker => "breaker",
            RiskRule::MaxPositionUsd => "max_position_usd",
        }
    }
}

impl fmt::Display for RiskRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job is blocked: the rule and the numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub rule: RiskRule,
    pub detail: String,
}

impl Block {
    fn new(rule: RiskRule, detail: impl Into<String>) -> Block {
        Block {
            rule,
            detail: detail.into(),
        }
    }
    /// A limit that could not be evaluated.
    fn unevaluable(rule: RiskRule, why: impl fmt::Display) -> Block {
        Block::new(
            rule,
            format!("cannot be evaluated ({why}); blocked to be safe"),
        )
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blocked by {}: {}", self.rule, self.detail)
    }
}

/// One row of limits: the user's (`strategy: None`) or one strategy's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Default)]
pub struct RiskLimits {
    pub user_id: Uuid,
    pub strategy: Option<String>,
    pub kill_switch: bool,
    pub max_open_positions: Option<i32>,
    pub max_position_usd: Option<Decimal>,
    pub max_daily_loss: Option<Decimal>,
    pub max_trades_per_day: Option<i32>,
    /// Trading hours `(start, end)` in `time_zone`; `start > end` spans midnight.
    pub trading_hours: Option<(NaiveTime, NaiveTime)>,
    /// An IANA time zone (Postgres checks it): the day's reset and the trading hours.
    pub time_zone: String,
    pub allow_symbols: Option<Vec<String>>,
    pub deny_symbols: Option<Vec<String>>,
    pub cooldown_secs: Option<i32>,
    pub max_consecutive_failures: Option<i32>,
    /// Failures before this time do not count for the breaker.
    pub breaker_reset_at: Option<DateTime<Utc>>,
}

/// What the counting rules read from Postgres for one row of limits (see `store/risk.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RiskFacts {
    /// Open positions (of the strategy, for a strategy's row).
    pub open_positions: i64,
    /// Is there an open position in the job's symbol?
    pub has_position: bool,
    /// Realized PnL of today's trades (account currency).
    pub realized_today: Decimal,
    /// Today's closing trades without a realized PnL (then the daily loss is unknown).
    pub unpriced_closes_today: i64,
    /// Today's opening trades.
    pub opens_today: i64,
    /// The local time in the limits' time zone.
    pub local_time: NaiveTime,
    /// Seconds since the last open in the job's symbol, if any.
    pub secs_since_last_open: Option<i64>,
    /// The statuses of the last `max_consecutive_failures` finished jobs, newest first.
    pub recent_failures: Vec<bool>,
}

/// The verdict on a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Block(Block),
}

/// Evaluate every limit that applies to `job` (an opening job) before its first order. `ex` is
/// asked only when `max_position_usd` is set. `Err` is an outage of Postgres (it cannot be
/// reached): the worker waits it out, as it does for every other step, and evaluates again. An
/// error Postgres *answers* (a query it refuses, a value it cannot use) makes the limits
/// unevaluable: the job is blocked.
///
/// `limits`: the rows of limits that apply to the job if they were read already (by
/// [`Store::begin_job`], in the same statement as the job's start); `None` reads them.
pub async fn check(
    store: &Store,
    ex: &dyn Exchange,
    job: &Job,
    limits: Option<Vec<RiskLimits>>,
) -> Result<Verdict, StoreError> {
    match evaluate(store, ex, job, limits).await {
        Ok(()) => Ok(Verdict::Allow),
        Err(Stop::Block(b)) => Ok(Verdict::Block(b)),
        Err(Stop::Outage(e)) => Err(e),
    }
}

/// Why evaluation stopped.
enum Stop {
    Block(Block),
    Outage(StoreError),
}

impl From<Block> for Stop {
    fn from(b: Block) -> Stop {
        Stop::Block(b)
    }
}

/// A store error while evaluating: an outage, or the limits cannot be evaluated (`what`).
fn store_stop(what: &str, e: StoreError) -> Stop {
    if e.is_outage() {
        Stop::Outage(e)
    } else {
        Stop::Block(Block::unevaluable(RiskRule::Limits, format!("{what}: {e}")))
    }
}

/// Do the risk limits apply to an alert with this action? Only an open (a buy or a sell) is
/// evaluated: closing is never blocked.
pub fn limits_apply(action: Action) -> bool {
    matches!(action, Action::Buy | Action::Sell)
}

async fn evaluate(
    store: &Store,
    ex: &dyn Exchange,
    job: &Job,
    limits: Option<Vec<RiskLimits>>,
) -> Result<(), Stop> {
    let a = &job.alert;
    if !limits_apply(a.action) {
        return Ok(());
    }
    let unreadable = |e: StoreError| store_stop("the limits cannot be read", e);
    if let Some(name) = &a.strategy {
        let s = store
            .find_strategy(a.user_id, &StrategyRef::Name(name.clone()))
            .await
            .map_err(unreadable)?;
        if s.is_some_and(|s| !s.enabled) {
            return Err(Stop::Block(Block::new(
                RiskRule::StrategyDisabled,
                format!("strategy `{name}` is disabled (`sparky strategy enable` turns it on)"),
            )));
        }
    }
    let rows = match limits {
        Some(rows) => rows,
        None => store
            .risk_limits_for(a.user_id, a.strategy.as_deref())
            .await
            .map_err(unreadable)?,
    };
    for limits in &rows {
        check_static(limits, a.symbol.as_str())?;
        let facts = store
            .risk_facts(limits, a.symbol.as_str())
            .await
            .map_err(|e| store_stop("the counts cannot be read", e))?;
        check_counts(limits, &facts)?;
        if let Some(max) = limits.max_position_usd {
            check_position_usd(ex, job, max).await?;
        }
    }
    Ok(())
}

fn scope(l: &RiskLimits) -> String {
    match &l.strategy {
        Some(s) => format!(" (strategy `{s}`)"),
        None => String::new(),
    }
}

/// The rules that need nothing but the limits and the symbol.
pub fn check_static(l: &RiskLimits, symbol: &str) -> Result<(), Block> {
    let sc = scope(l);
    if l.kill_switch {
        return Err(Block::new(
            RiskRule::KillSwitch,
            format!("the kill switch is on{sc}"),
        ));
    }
    let listed = |list: &Option<Vec<String>>| {
        list.as_ref()
            .map(|v| v.iter().any(|s| s.eq_ignore_ascii_case(symbol)))
    };
    if listed(&l.allow_symbols) == Some(false) {
        return Err(Block::new(
            RiskRule::SymbolNotAllowed,
            format!(
                "{symbol} is not in the allow list [{}]{sc}",
                l.allow_symbols.as_deref().unwrap_or_default().join(", ")
            ),
        ));
    }
    if listed(&l.deny_symbols) == Some(true) {
        return Err(Block::new(
            RiskRule::SymbolDenied,
            format!("{symbol} is in the deny list{sc}"),
        ));
    }
    Ok(())
}

/// The rules that count (from [`RiskFacts`]).
pub fn check_counts(l: &RiskLimits, f: &RiskFacts) -> Result<(), Block> {
    let sc = scope(l);
    if let Some((start, end)) = l.trading_hours {
        let t = f.local_time;
        let inside = if start <= end {
            t >= start && t < end
        } else {
            t >= start || t < end
        };
        if !inside {
            return Err(Block::new(
                RiskRule::TradingHours,
                format!(
                    "{} in {} is outside the trading hours {}-{}{sc}",
                    t.format("%H:%M:%S"),
                    l.time_zone,
                    start.format("%H:%M"),
                    end.format("%H:%M")
                ),
            ));
        }
    }
    if let (Some(cd), Some(ago)) = (l.cooldown_secs, f.secs_since_last_open) {
        if ago < i64::from(cd) {
            return Err(Block::new(
                RiskRule::Cooldown,
                format!("the last open in this symbol was {ago} s ago, the cooldown is {cd} s{sc}"),
            ));
        }
    }
    if let Some(max) = l.max_open_positions {
        if !f.has_position && f.open_positions >= i64::from(max) {
            return Err(Block::new(
                RiskRule::MaxOpenPositions,
                format!(
                    "{} positions are open, the limit is {max}{sc}",
                    f.open_positions
                ),
            ));
        }
    }
    if let Some(max) = l.max_trades_per_day {
        if f.opens_today >= i64::from(max) {
            return Err(Block::new(
                RiskRule::MaxTradesPerDay,
                format!(
                    "{} trades opened today ({}), the limit is {max}{sc}",
                    f.opens_today, l.time_zone
                ),
            ));
        }
    }
    if let Some(max) = l.max_daily_loss {
        if f.unpriced_closes_today > 0 {
            return Err(Block::unevaluable(
                RiskRule::MaxDailyLoss,
                format!(
                    "{} closing trade(s) of today have no realized PnL recorded",
                    f.unpriced_closes_today
                ),
            ));
        }
        let loss = -f.realized_today;
        if loss >= max {
            return Err(Block::new(
                RiskRule::MaxDailyLoss,
                format!(
                    "today's realized loss is {} ({}), the limit is {max}{sc}",
                    loss.normalize(),
                    l.time_zone
                ),
            ));
        }
    }
    if let Some(n) = l.max_consecutive_failures {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if f.recent_failures.len() >= n && f.recent_failures.iter().take(n).all(|failed| *failed) {
            return Err(Block::new(
                RiskRule::Breaker,
                format!(
                    "the last {n} jobs failed; reset with `sparky risk set --user {} --reset-breaker`{sc}",
                    l.user_id
                ),
            ));
        }
    }
    Ok(())
}

/// `max_position_usd`: size the order as the executor will, and compare its USD value.
async fn check_position_usd(ex: &dyn Exchange, job: &Job, max: Decimal) -> Result<(), Block> {
    let a = &job.alert;
    let rule = RiskRule::MaxPositionUsd;
    let Some(sizing) = a.sizing() else {
        return Err(Block::unevaluable(rule, "the alert has no size"));
    };
    let side = a.action.side().expect("an opening action");
    let sym = &a.symbol;
    let rules = ex
        .symbol_rules(sym)
        .await
        .map_err(|e| Block::unevaluable(rule, format!("the symbol's rules are unreadable: {e}")))?;
    let price = match a.price {
        Some(p) if a.order_type == crate::domain::OrderType::Limit => p,
        _ => ex
            .price(sym)
            .await
            .map_err(|e| Block::unevaluable(rule, format!("the price is unreadable: {e}")))?,
    };
    let equity = if sizing.mode.needs_equity() {
        Some(
            ex.equity()
                .await
                .map_err(|e| Block::unevaluable(rule, format!("the equity is unreadable: {e}")))?,
        )
    } else {
        None
    };
    let stop_distance = if sizing.mode.needs_stop_loss() {
        Some(
            crate::executor::stop_distance(a, side, price)
                .map_err(|e| Block::unevaluable(rule, e.message))?,
        )
    } else {
        None
    };
    let input = crate::sizing::SizingInput {
        symbol: sym.as_str(),
        sizing,
        price,
        rules: &rules,
        equity,
        stop_distance,
    };
    // An order too small to size is the executor's to refuse (rejected), not a risk matter.
    let Ok(sized) = crate::sizing::size(&input) else {
        return Ok(());
    };
    let usd = crate::sizing::usd_value(sym.as_str(), sized.quantity, price)
        .map_err(|e| Block::unevaluable(rule, e))?;
    if usd > max {
        return Err(Block::new(
            rule,
            format!(
                "{} {sym} at {price} is worth {} USD, the limit is {max}",
                sized.quantity,
                usd.normalize()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn limits() -> RiskLimits {
        RiskLimits {
            time_zone: "UTC".into(),
            ..RiskLimits::default()
        }
    }

    #[test]
    fn trading_hours_may_span_midnight() {
        let mut l = limits();
        let t = |h, m| NaiveTime::from_hms_opt(h, m, 0).unwrap();
        l.trading_hours = Some((t(22, 0), t(6, 0)));
        let at = |time| RiskFacts {
            local_time: time,
            ..RiskFacts::default()
        };
        assert!(check_counts(&l, &at(t(23, 0))).is_ok());
        assert!(check_counts(&l, &at(t(5, 59))).is_ok());
        let b = check_counts(&l, &at(t(12, 0))).unwrap_err();
        assert_eq!(b.rule, RiskRule::TradingHours);
        assert!(
            b.to_string()
                .contains("12:00:00 in UTC is outside the trading hours 22:00-06:00"),
            "{b}"
        );
    }

    #[test]
    fn daily_loss_with_an_unpriced_close_is_unevaluable() {
        let mut l = limits();
        l.max_daily_loss = Some(dec!(100));
        let mut f = RiskFacts {
            realized_today: dec!(-99.5),
            ..RiskFacts::default()
        };
        assert!(check_counts(&l, &f).is_ok());
        f.realized_today = dec!(-100);
        assert_eq!(
            check_counts(&l, &f).unwrap_err().rule,
            RiskRule::MaxDailyLoss
        );
        f.realized_today = dec!(50);
        f.unpriced_closes_today = 1;
        let b = check_counts(&l, &f).unwrap_err();
        assert!(b.detail.contains("cannot be evaluated"), "{b}");
    }

    #[test]
    fn breaker_needs_n_failures_in_a_row() {
        let mut l = limits();
        l.max_consecutive_failures = Some(2);
        let f = |v: Vec<bool>| RiskFacts {
            recent_failures: v,
            ..RiskFacts::default()
        };
        assert!(check_counts(&l, &f(vec![true])).is_ok());
        assert!(check_counts(&l, &f(vec![true, false])).is_ok());
        assert_eq!(
            check_counts(&l, &f(vec![true, true])).unwrap_err().rule,
            RiskRule::Breaker
        );
    }
}
