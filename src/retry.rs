//! The one retry helper for infrastructure calls (Redis, Postgres) whose failure must never turn
//! into a lost or half-recorded job: capped exponential backoff with jitter from `backon`, for as
//! long as it takes, until the call succeeds, the caller's `give_up` says stop, or shutdown.
//!
//! Broker calls are not retried here: the executor retries them with its own bounded
//! [`crate::executor::RetryPolicy`] (attempts and total time), because a broker that keeps failing
//! must end the job, while a database that is down must only delay it.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// The schedule: 100 ms doubling to 5 s, with jitter, never ending. For loops that retry in
/// their own way (the read loop), so every infrastructure retry backs off alike.
pub fn schedule() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
        .build()
}

/// How a retried call ended.
#[derive(Debug)]
pub enum Retried<T, E> {
    Ok(T),
    /// `give_up` returned true for this error (after `tries` failures).
    GaveUp {
        error: E,
        tries: u32,
    },
    /// Shutdown was requested while waiting.
    Shutdown,
}

/// Run `op` until it succeeds, or until `give_up(&error, failures so far)` says stop, or until
/// `shutdown` is cancelled. Every failure is logged with `what`.
pub async fn retry<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut give_up: impl FnMut(&E, u32) -> bool,
    mut op: F,
) -> Retried<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delays = schedule();
    let mut tries = 0u32;
    loop {
        match op().await {
            Ok(v) => return Retried::Ok(v),
            Err(e) => {
                tries += 1;
                if give_up(&e, tries) {
                    return Retried::GaveUp { error: e, tries };
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(error = %e, tries, "{what} failed; retrying in {delay:?}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Retried::Shutdown,
                }
            }
        }
    }
}

/// [`retry`] that never gives up: `None` only on shutdown.
pub async fn until_ok<T, E, F, Fut>(what: &str, shutdown: &CancellationToken, op: F) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    match retry(what, shutdown, |_, _| false, op).await {
        Retried::Ok(v) => Some(v),
        Retried::GaveUp { .. } | Retried::Shutdown => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn retries_until_ok_and_gives_up_when_told() {
        let calls = AtomicU32::new(0);
        let stop = CancellationToken::new();
        let r = until_ok("op", &stop, || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            if n < 3 {
                Err("down")
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(r, Some(3));

        let r: Retried<(), &str> = retry(
            "op",
            &stop,
            |_, tries| tries >= 2,
            || async { Err("data error") },
        )
        .await;
        assert!(matches!(r, Retried::GaveUp { tries: 2, .. }), "{r:?}");

        stop.cancel();
        let r: Option<()> = until_ok("op", &stop, || async { Err("down") }).await;
        assert_eq!(r, None);
    }
}
