//! Sizing and rounding: how many units an opening order is for, from the alert's [`Sizing`]
//! (issue 14), and the one place quantities and prices are rounded to a symbol's rules
//! ([`SymbolRules`], [`round_down`], [`round_to_tick`]). The executor, the risk checks and every
//! exchange client round through here, so what is sized is what is sent.
//!
//! | mode | units before rounding |
//! | --- | --- |
//! | `position_size_usd` | `usd / price` ([`units_for_usd`]: a `USD_xxx` pair is sized in dollars) |
//! | `quantity` | as given |
//! | `percent_of_equity` | `equity x pct / 100` USD, then as `position_size_usd` |
//! | `risk_usd` | `risk / loss per unit at the stop` (the stop distance; for `USD_xxx` divided by the price) |
//! | `risk_percent` | `equity x pct / 100` USD of risk, then as `risk_usd` |
//!
//! Every result is rounded DOWN to the symbol's step and must reach the minimum quantity and the
//! minimum notional, else the order is refused with the numbers. Equity is the broker's
//! ([`crate::exchanges::Exchange::equity`]) in the account currency, taken as USD (as
//! `position_size_usd` is). All arithmetic is checked ([`crate::money`]).

// The errors carry the numbers their messages show; sizing runs once per job, so their size is
// of no consequence.
#![allow(clippy::result_large_err)]

use rust_decimal::Decimal;

use crate::domain::{Sizing, SizingMode};
use rust_decimal::RoundingStrategy;

use crate::money::{self, Overflow};

/// Trading rules of a symbol, applied before an order is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SymbolRules {
    /// Quantities are multiples of this.
    pub step: Decimal,
    pub min_qty: Decimal,
    /// Minimum price x quantity (in the quote currency).
    pub min_notional: Decimal,
    /// Prices are multiples of this.
    pub tick: Decimal,
}

/// Round `x` down (toward zero) to a multiple of `step`.
pub fn round_down(x: Decimal, step: Decimal) -> Result<Decimal, Overflow> {
    if step <= Decimal::ZERO {
        return Ok(x);
    }
    let n = money::div(x, step)?.round_dp_with_strategy(0, RoundingStrategy::ToZero);
    Ok(money::mul(n, step)?.normalize())
}

/// Round a price to the nearest multiple of `tick`.
pub fn round_to_tick(x: Decimal, tick: Decimal) -> Result<Decimal, Overflow> {
    if tick <= Decimal::ZERO {
        return Ok(x);
    }
    let n = money::div(x, tick)?.round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero);
    Ok(money::mul(n, tick)?.normalize())
}

/// How many units of `symbol` `usd` buys at `price`. Quantities are in the base asset, so for a
/// forex pair whose base is the US dollar (`USD_JPY`, OANDA's form) the size is the dollar amount
/// itself; otherwise (`ETHUSDT`, `EUR_USD`, `AAPL`) it is `usd / price`. Crosses without USD
/// (`EUR_GBP`) are sized as `usd / price`, i.e. as if the quote currency were USD: an
/// approximation until home-currency conversion rates are fetched.
pub fn units_for_usd(symbol: &str, usd: Decimal, price: Decimal) -> Result<Decimal, Overflow> {
    if symbol.starts_with("USD_") {
        Ok(usd)
    } else {
        money::div(usd, price)
    }
}

/// Whole units (shares): `x` rounded down to a multiple of 1.
pub fn whole_units(x: Decimal) -> Result<Decimal, Overflow> {
    round_down(x, Decimal::ONE)
}

/// What a size is computed from.
#[derive(Clone, Debug)]
pub struct SizingInput<'a> {
    pub symbol: &'a str,
    pub sizing: Sizing,
    /// The reference price (the limit price, or the current price).
    pub price: Decimal,
    pub rules: &'a SymbolRules,
    /// The account's equity, for the modes that need it ([`SizingMode::needs_equity`]).
    pub equity: Option<Decimal>,
    /// How far the stop-loss is from `price` (price units), for the risk modes.
    pub stop_distance: Option<Decimal>,
}

/// A sized order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sized {
    /// Rounded down to the step, at least the minimums.
    pub quantity: Decimal,
    /// Before rounding.
    pub raw: Decimal,
    /// `quantity x price`, in the quote currency.
    pub notional: Decimal,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizingError {
    #[error("cannot size {what} of {symbol} at {price} (step {step}): {source}")]
    Overflow {
        what: String,
        symbol: String,
        price: Decimal,
        step: Decimal,
        source: Overflow,
    },
    #[error("{0} needs the account's equity, which was not available")]
    NoEquity(&'static str),
    #[error("{0} needs a stop-loss at a distance from the price")]
    NoStop(&'static str),
    #[error("order too small: {what} at {price} is {raw} {symbol}, which rounds down to {quantity} (step {step}), below the minimum quantity {min_qty}")]
    BelowMinQty {
        what: String,
        symbol: String,
        price: Decimal,
        raw: Decimal,
        quantity: Decimal,
        step: Decimal,
        min_qty: Decimal,
    },
    #[error("order too small: {quantity} {symbol} at {price} is {notional} notional, below the minimum {min_notional}")]
    BelowMinNotional {
        symbol: String,
        quantity: Decimal,
        price: Decimal,
        notional: Decimal,
        min_notional: Decimal,
    },
}

/// How the mode's amount reads in a message (`100 USD`, `2 units`, `5% of equity 1000`).
fn describe(s: Sizing, equity: Option<Decimal>) -> String {
    let a = s.amount.normalize();
    match s.mode {
        SizingMode::PositionSizeUsd => format!("{a} USD"),
        SizingMode::Quantity => format!("quantity {a}"),
        SizingMode::PercentOfEquity => format!(
            "{a}% of equity {}",
            equity.map_or("?".into(), |e| e.normalize().to_string())
        ),
        SizingMode::RiskUsd => format!("a risk of {a} USD"),
        SizingMode::RiskPercent => format!(
            "a risk of {a}% of equity {}",
            equity.map_or("?".into(), |e| e.normalize().to_string())
        ),
    }
}

/// The units `input` asks for, before rounding.
fn raw_units(i: &SizingInput<'_>) -> Result<Result<Decimal, SizingError>, Overflow> {
    let mode = i.sizing.mode;
    let amount = i.sizing.amount;
    let pct_of_equity = || -> Result<Result<Decimal, SizingError>, Overflow> {
        let Some(e) = i.equity else {
            return Ok(Err(SizingError::NoEquity(mode.as_str())));
        };
        Ok(Ok(money::div(
            money::mul(e, amount)?,
            Decimal::ONE_HUNDRED,
        )?))
    };
    let per_risk = |risk_usd: Decimal| -> Result<Result<Decimal, SizingError>, Overflow> {
        let Some(d) = i.stop_distance.filter(|d| *d > Decimal::ZERO) else {
            return Ok(Err(SizingError::NoStop(mode.as_str())));
        };
        // The loss per unit at the stop, in USD: the distance is in the quote currency, which is
        // USD except for USD_xxx pairs (there it is divided by the price).
        let loss_per_unit = if i.symbol.starts_with("USD_") {
            money::div(d, i.price)?
        } else {
            d
        };
        Ok(Ok(money::div(risk_usd, loss_per_unit)?))
    };
    match mode {
        SizingMode::PositionSizeUsd => Ok(Ok(units_for_usd(i.symbol, amount, i.price)?)),
        SizingMode::Quantity => Ok(Ok(amount)),
        SizingMode::PercentOfEquity => match pct_of_equity()? {
            Ok(usd) => Ok(Ok(units_for_usd(i.symbol, usd, i.price)?)),
            Err(e) => Ok(Err(e)),
        },
        SizingMode::RiskUsd => per_risk(amount),
        SizingMode::RiskPercent => match pct_of_equity()? {
            Ok(risk) => per_risk(risk),
            Err(e) => Ok(Err(e)),
        },
    }
}

/// Size an opening order: the mode's units, rounded down to the step, checked against the
/// minimum quantity and notional.
pub fn size(i: &SizingInput<'_>) -> Result<Sized, SizingError> {
    let what = describe(i.sizing, i.equity);
    let overflow = |source: Overflow| SizingError::Overflow {
        what: what.clone(),
        symbol: i.symbol.to_string(),
        price: i.price,
        step: i.rules.step,
        source,
    };
    let raw = raw_units(i).map_err(overflow)??;
    let quantity = round_down(raw, i.rules.step).map_err(overflow)?;
    if quantity < i.rules.min_qty || quantity <= Decimal::ZERO {
        return Err(SizingError::BelowMinQty {
            what,
            symbol: i.symbol.to_string(),
            price: i.price,
            raw: raw.round_dp(8).normalize(),
            quantity,
            step: i.rules.step,
            min_qty: i.rules.min_qty,
        });
    }
    let notional = money::mul(quantity, i.price).map_err(overflow)?;
    if notional < i.rules.min_notional {
        return Err(SizingError::BelowMinNotional {
            symbol: i.symbol.to_string(),
            quantity,
            price: i.price,
            notional: notional.normalize(),
            min_notional: i.rules.min_notional,
        });
    }
    Ok(Sized {
        quantity,
        raw,
        notional,
    })
}

/// The USD value of `quantity` of `symbol` at `price` (a `USD_xxx` pair's units are dollars).
pub fn usd_value(symbol: &str, quantity: Decimal, price: Decimal) -> Result<Decimal, Overflow> {
    if symbol.starts_with("USD_") {
        Ok(quantity)
    } else {
        money::mul(quantity, price)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn rules(step: Decimal, min_qty: Decimal, min_notional: Decimal) -> SymbolRules {
        SymbolRules {
            step,
            min_qty,
            min_notional,
            tick: dec!(0.01),
        }
    }

    fn input<'a>(
        symbol: &'a str,
        mode: SizingMode,
        amount: Decimal,
        price: Decimal,
        r: &'a SymbolRules,
    ) -> SizingInput<'a> {
        SizingInput {
            symbol,
            sizing: Sizing { mode, amount },
            price,
            rules: r,
            equity: Some(dec!(10000)),
            stop_distance: Some(dec!(30)),
        }
    }

    #[test]
    fn usd_based_pairs_are_sized_in_dollars() {
        assert_eq!(
            units_for_usd("USD_JPY", dec!(100), dec!(150.25)),
            Ok(dec!(100))
        );
        assert_eq!(
            units_for_usd("EUR_USD", dec!(100), dec!(1.25)),
            Ok(dec!(80))
        );
        assert_eq!(
            units_for_usd("ETHUSDT", dec!(300), dec!(3000)),
            Ok(dec!(0.1))
        );
    }

    #[test]
    fn rounding() {
        assert_eq!(round_down(dec!(0.0333333), dec!(0.001)), Ok(dec!(0.033)));
        assert_eq!(round_down(dec!(5.999), dec!(1)), Ok(dec!(5)));
        assert_eq!(round_down(dec!(0.0009), dec!(0.001)), Ok(dec!(0)));
        assert_eq!(round_to_tick(dec!(2849.996), dec!(0.01)), Ok(dec!(2850)));
        assert_eq!(round_to_tick(dec!(1.23456), dec!(0.0001)), Ok(dec!(1.2346)));
    }

    #[test]
    fn rounding_overflow_is_an_error_with_the_numbers() {
        let huge = Decimal::from_scientific("1e28").unwrap();
        let e = units_for_usd("SHIBUSDT", huge, dec!(0.00001)).unwrap_err();
        assert!(
            e.to_string()
                .contains("10000000000000000000000000000 / 0.00001"),
            "{e}"
        );
        assert!(round_down(huge, dec!(0.0001)).is_err());
        assert_eq!(whole_units(dec!(2.99)), Ok(dec!(2)));
    }

    #[test]
    fn every_mode_rounds_down_to_the_step() {
        let r = rules(dec!(0.001), dec!(0.001), dec!(5));
        let q = |mode, amount| {
            size(&input("ETHUSDT", mode, amount, dec!(3000), &r)).map(|s| s.quantity)
        };
        assert_eq!(q(SizingMode::PositionSizeUsd, dec!(100)), Ok(dec!(0.033)));
        assert_eq!(q(SizingMode::Quantity, dec!(0.0339)), Ok(dec!(0.033)));
        // 1% of 10000 = 100 USD
        assert_eq!(q(SizingMode::PercentOfEquity, dec!(1)), Ok(dec!(0.033)));
        // 100 USD over a 30 USD stop distance = 3.333..
        assert_eq!(q(SizingMode::RiskUsd, dec!(100)), Ok(dec!(3.333)));
        // 0.5% of 10000 = 50 USD of risk / 30 = 1.666..
        assert_eq!(q(SizingMode::RiskPercent, dec!(0.5)), Ok(dec!(1.666)));
    }

    #[test]
    fn minimums_and_missing_inputs_are_errors_with_the_numbers() {
        let r = rules(dec!(0.001), dec!(0.001), dec!(5));
        let e = size(&input(
            "ETHUSDT",
            SizingMode::Quantity,
            dec!(0.0009),
            dec!(3000),
            &r,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("rounds down to 0"), "{e}");
        let e = size(&input(
            "ETHUSDT",
            SizingMode::Quantity,
            dec!(0.001),
            dec!(3000),
            &r,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("below the minimum 5"), "{e}");
        let mut i = input(
            "ETHUSDT",
            SizingMode::PercentOfEquity,
            dec!(1),
            dec!(3000),
            &r,
        );
        i.equity = None;
        assert_eq!(size(&i), Err(SizingError::NoEquity("percent_of_equity")));
        let mut i = input("ETHUSDT", SizingMode::RiskUsd, dec!(1), dec!(3000), &r);
        i.stop_distance = None;
        assert_eq!(size(&i), Err(SizingError::NoStop("risk_usd")));
    }

    #[test]
    fn usd_based_pairs() {
        let r = rules(dec!(1), dec!(1), dec!(0));
        // 100 USD of risk, stop 0.5 JPY away at 150: a unit loses 0.5/150 USD -> 30000 units
        let mut i = input("USD_JPY", SizingMode::RiskUsd, dec!(100), dec!(150), &r);
        i.stop_distance = Some(dec!(0.5));
        assert_eq!(size(&i).unwrap().quantity, dec!(30000));
        // 100 USD of USD_JPY is 100 units
        let i = input(
            "USD_JPY",
            SizingMode::PositionSizeUsd,
            dec!(100),
            dec!(150),
            &r,
        );
        assert_eq!(size(&i).unwrap().quantity, dec!(100));
    }
}
