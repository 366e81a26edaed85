//! Exact arithmetic on prices, quantities and USD amounts: every operation is checked, and an
//! overflow is an error naming the numbers, never a panic. (`rust_decimal`'s operators panic on
//! overflow; an alert with `position_size_usd: "1e28"` on a cheap symbol must end as a `rejected`
//! job, not as a dead worker task.)

use rust_decimal::Decimal;

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

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn overflow_is_an_error_with_the_numbers() {
        let huge = Decimal::from_scientific("1e28").unwrap();
        let e = div(huge, dec!(0.00001)).unwrap_err();
        assert!(
            e.to_string()
                .contains("10000000000000000000000000000 / 0.00001"),
            "{e}"
        );
        assert!(mul(huge, dec!(150.25)).is_err());
        assert_eq!(midpoint(dec!(1.0845), dec!(1.0855)), Ok(dec!(1.085)));
        assert!(
            midpoint(Decimal::MAX, Decimal::MAX).is_err(),
            "a broker quoting absurd prices"
        );
    }
}
