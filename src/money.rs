//! Exact arithmetic on prices, quantities and USD amounts: every operation is checked, and an
//! overflow is an error naming the numbers, never a panic. (`rust_decimal`'s operators panic on
//! overflow; an alert with `position_size_usd: "1e28"` on a cheap symbol must end as a `rejected`
//! job, not as a dead worker task.)

use rust_decimal::{Decimal, RoundingStrategy};

/// An arithmetic step whose result does not fit a decimal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the numbers are out of range: {0} overflows")]
pub struct Overflow(pub String);

fn op(
    a: Decimal,
    sym: &str,
    b: Decimal,
    f: impl Fn(Decimal, Decimal) -> Option<Decimal>,
) -> Result<Decimal, Overflow> {
    f(a, b).ok_or_else(|| Overflow(format!("{a} {sym} {b}")))
}

pub fn mul(a: Decimal, b: Decimal) -> Result<Decimal, Overflow> {
    op(a, "x", b, Decimal::checked_mul)
}

pub fn div(a: Decimal, b: Decimal) -> Result<Decimal, Overflow> {
    op(a, "/", b, Decimal::checked_div)
}

pub fn add(a: Decimal, b: Decimal) -> Result<Decimal, Overflow> {
    op(a, "+", b, Decimal::checked_add)
}

pub fn sub(a: Decimal, b: Decimal) -> Result<Decimal, Overflow> {
    op(a, "-", b, Decimal::checked_sub)
}

/// The midpoint of a bid and an ask.
pub fn midpoint(bid: Decimal, ask: Decimal) -> Result<Decimal, Overflow> {
    Ok(div(add(bid, ask)?, Decimal::TWO)?.normalize())
}

/// Round `x` down (toward zero) to a multiple of `step`.
pub fn round_down(x: Decimal, step: Decimal) -> Result<Decimal, Overflow> {
    if step <= Decimal::ZERO {
        return Ok(x);
    }
    let n = div(x, step)?.round_dp_with_strategy(0, RoundingStrategy::ToZero);
    Ok(mul(n, step)?.normalize())
}

/// Round a price to the nearest multiple of `tick`.
pub fn round_to_tick(x: Decimal, tick: Decimal) -> Result<Decimal, Overflow> {
    if tick <= Decimal::ZERO {
        return Ok(x);
    }
    let n = div(x, tick)?.round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero);
    Ok(mul(n, tick)?.normalize())
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
        div(usd, price)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

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
    fn overflow_is_an_error_with_the_numbers() {
        let huge = Decimal::from_scientific("1e28").unwrap();
        let e = units_for_usd("SHIBUSDT", huge, dec!(0.00001)).unwrap_err();
        assert!(
            e.to_string()
                .contains("10000000000000000000000000000 / 0.00001"),
            "{e}"
        );
        assert!(round_down(huge, dec!(0.0001)).is_err());
        assert!(mul(huge, dec!(150.25)).is_err());
        assert_eq!(midpoint(dec!(1.0845), dec!(1.0855)), Ok(dec!(1.085)));
        assert!(
            midpoint(Decimal::MAX, Decimal::MAX).is_err(),
            "a broker quoting absurd prices"
        );
    }
}
