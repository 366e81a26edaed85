//! The two loops every broker client needs, written once: placing a resting order exactly once
//! ([`place_once`]) and polling an order until it is final ([`poll_until_final`]).

use std::future::Future;
use std::time::Duration;

use super::{ErrorClass, ExchangeError};

/// How many times a resting (protective) order is sent before giving up.
const SENDS: u32 = 3;

/// Place an order exactly once: up to three sends; before a resend the order is looked up with
/// `find` (a send whose reply was lost may have placed it), and once more after the last failure.
/// A permanent error ends it at once. Waits honour the broker's `retry_after`.
pub(crate) async fn place_once<T, S, SF, F, FF>(send: S, find: F) -> Result<T, ExchangeError>
where
    S: Fn() -> SF,
    SF: Future<Output = Result<T, ExchangeError>>,
    F: Fn() -> FF,
    FF: Future<Output = Result<Option<T>, ExchangeError>>,
{
    let mut last: Option<ExchangeError> = None;
    for attempt in 0..SENDS {
        if attempt > 0 {
            if let Ok(Some(found)) = find().await {
                return Ok(found);
            }
            let wait = last
                .as_ref()
                .and_then(|e| e.retry_after)
                .unwrap_or(Duration::from_millis(300 * u64::from(attempt)))
                .min(Duration::from_secs(5));
            tokio::time::sleep(wait).await;
        }
        match send().await {
            Ok(placed) => return Ok(placed),
            Err(e) if e.class == ErrorClass::Permanent => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    if let Ok(Some(found)) = find().await {
        return Ok(found);
    }
    Err(last.unwrap_or_else(|| ExchangeError::transient("the order was not placed")))
}

/// What one look at an order saw.
pub(crate) enum Polled<T> {
    /// Final: nothing more will fill.
    Final(T),
    /// Still working; the latest state.
    Working(T),
    /// Not visible (yet).
    Unseen,
}

/// Look at an order (`look`) until it is final or `within` has passed (50 ms, doubling to 500 ms,
/// between looks); then the latest state seen, starting from `current`. A permanent error (the
/// broker rejected it) ends it; a failed look is tried again.
pub(crate) async fn poll_until_final<T, L, LF>(
    within: Duration,
    mut current: T,
    look: L,
) -> Result<T, ExchangeError>
where
    L: Fn() -> LF,
    LF: Future<Output = Result<Polled<T>, ExchangeError>>,
{
    let deadline = tokio::time::Instant::now() + within;
    let mut delay = Duration::from_millis(50);
    loop {
        match look().await {
            Ok(Polled::Final(t)) => return Ok(t),
            Ok(Polled::Working(t)) => current = t,
            Ok(Polled::Unseen) => {}
            Err(e) if e.class == ErrorClass::Permanent => return Err(e),
            Err(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(current);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}
