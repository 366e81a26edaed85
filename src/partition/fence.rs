//! [`Fence`]: how long this worker may still act on one partition, as seen by the jobs running on
//! it, down to each broker request.
//!
//! A partition's lease is valid in Redis for `SPARKY_LEASE_TTL_MS` from when Redis applied the last
//! renewal. This worker cannot know that moment, only when it *sent* the renewal, so it counts its
//! validity from the send time, minus a fifth of the TTL for clock rate differences
//! ([`crate::config::Config::lease_validity`]). Past that instant another worker may own the
//! partition, so nothing more may reach the broker on its behalf.
//!
//! Every broker request runs inside [`Fence::scope`] and asks [`request_permit`] first (the exchange
//! clients' one HTTP send does, `exchanges::http::send`): the request is sent only if it can
//! *finish* (the HTTP timeout, `SPARKY_EXCHANGE_TIMEOUT_MS`) before the validity ends. If it could
//! not, the request waits for the next renewal; if none comes before the validity ends, the lease
//! may have moved, and the request is not sent. The start-up rule ([`crate::config::Config::check_worker_timing`])
//! makes sure the window is never too short while renewals succeed, so requests only wait when
//! Redis does not answer.
//!
//! One fence per acquisition of a partition: when the lease is lost the fence is revoked for good,
//! and a later re-acquisition makes a new one, so a job of the old ownership can never act under
//! the new one.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
// The tokio clock: the same as `std::time::Instant`, but pausable in tests.
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Window {
    /// The lease is ours until this instant (local clock), unless renewed.
    Until(Instant),
    /// Lost (or given up): nothing more may be done under this fence.
    Revoked,
}

/// The validity of one ownership of one partition. Cheap to clone; all clones see the same state.
#[derive(Clone, Debug)]
pub struct Fence {
    window: Arc<watch::Sender<Window>>,
    /// New jobs may start (false while the partition is handed over or the worker stops).
    starting: Arc<AtomicBool>,
    /// The longest one broker request can take (`SPARKY_EXCHANGE_TIMEOUT_MS`).
    request_time: Duration,
}

/// Why an action was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not sent: this worker's lease on the partition may have moved to another worker")]
pub struct Void;

tokio::task_local! {
    static CURRENT: Fence;
}

impl Fence {
    /// A fence valid until `until` for requests that take at most `request_time`.
    pub fn new(until: Instant, request_time: Duration) -> Fence {
        Fence {
            window: Arc::new(watch::Sender::new(Window::Until(until))),
            starting: Arc::new(AtomicBool::new(true)),
            request_time,
        }
    }

    /// A fence that never ends (tests, tools that run one job outside a worker).
    pub fn unbounded() -> Fence {
        Fence::new(
            Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600),
            Duration::ZERO,
        )
    }

    /// The lease was renewed: valid until `until`. A fence that is already void stays void (its
    /// jobs may have stopped and left entries behind, which only a new ownership's history pass
    /// reads again): `false` then, and the caller must treat the partition as lost.
    pub fn extend(&self, until: Instant) -> bool {
        let now = Instant::now();
        let mut alive = false;
        self.window.send_if_modified(|w| match w {
            Window::Until(t) if now < *t => {
                alive = true;
                if *t < until {
                    *w = Window::Until(until);
                    true
                } else {
                    false
                }
            }
            _ => false,
        });
        alive
    }

    /// The lease is (or may be) someone else's: stop everything at once, for good.
    pub fn revoke(&self) {
        self.starting.store(false, Ordering::Release);
        self.window.send_replace(Window::Revoked);
    }

    /// Start no new job (hand-over, shutdown); running ones go on while the lease is valid.
    pub fn stop_starting(&self) {
        self.starting.store(false, Ordering::Release);
    }

    /// Revoked, or past its validity.
    pub fn is_void(&self) -> bool {
        match *self.window.borrow() {
            Window::Revoked => true,
            Window::Until(t) => Instant::now() >= t,
        }
    }

    /// May a job of this partition start now?
    pub fn may_start(&self) -> bool {
        self.starting.load(Ordering::Acquire) && !self.is_void()
    }

    /// Is the ownership still valid at `at` (for a blocking read that delivers until then)?
    pub fn valid_at(&self, at: Instant) -> bool {
        matches!(*self.window.borrow(), Window::Until(t) if at < t)
    }

    /// Resolves when the fence is revoked or its validity ends without a renewal.
    pub async fn voided(&self) {
        let mut rx = self.window.subscribe();
        loop {
            let w = *rx.borrow_and_update();
            match w {
                Window::Revoked => return,
                Window::Until(t) if Instant::now() >= t => return,
                Window::Until(t) => {
                    tokio::select! {
                        r = rx.changed() => if r.is_err() { return },
                        _ = tokio::time::sleep_until(t) => {}
                    }
                }
            }
        }
    }

    /// Wait until one request can be sent and finish within the validity; `Err` when the validity
    /// ends first (or the fence is revoked).
    pub async fn permit(&self) -> Result<(), Void> {
        let mut rx = self.window.subscribe();
        loop {
            let w = *rx.borrow_and_update();
            let Window::Until(t) = w else {
                return Err(Void);
            };
            let now = Instant::now();
            if now + self.request_time <= t {
                return Ok(());
            }
            if now >= t {
                return Err(Void);
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(Void) },
                _ = tokio::time::sleep_until(t) => {}
            }
        }
    }

    /// Run `fut` with this fence as the current one: every broker request it makes asks it first.
    pub async fn scope<F: Future>(&self, fut: F) -> F::Output {
        CURRENT.scope(self.clone(), fut).await
    }
}

/// Called before every broker request: waits for the current fence's permit. Outside a fence
/// (tools, tests of a client alone) requests are always allowed.
pub async fn request_permit() -> Result<(), Void> {
    match CURRENT.try_with(Fence::clone) {
        Ok(fence) => fence.permit().await,
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_a_renewal_and_is_refused_past_the_validity() {
        let start = Instant::now();
        let f = Fence::new(start + Duration::from_secs(10), Duration::from_secs(4));
        assert!(f.permit().await.is_ok(), "6 s of room for a 4 s request");

        // 3 s left: a 4 s request waits; a renewal lets it go.
        tokio::time::advance(Duration::from_secs(7)).await;
        let waited = tokio::time::timeout(Duration::from_millis(500), f.permit()).await;
        assert!(waited.is_err(), "still waiting after 500 ms: {waited:?}");
        assert!(f.extend(Instant::now() + Duration::from_secs(10)));
        assert_eq!(f.permit().await, Ok(()));

        // No renewal: refused once the validity ends, and void for good: a renewal that arrives
        // late does not bring it back.
        tokio::time::advance(Duration::from_secs(7)).await;
        assert_eq!(f.permit().await, Err(Void));
        assert!(f.is_void() && !f.may_start());
        assert!(!f.extend(Instant::now() + Duration::from_secs(10)));
        assert!(f.is_void());
    }

    #[tokio::test]
    async fn revoked_is_for_good_and_scoped_requests_see_it() {
        let f = Fence::new(
            Instant::now() + Duration::from_secs(60),
            Duration::from_secs(1),
        );
        assert_eq!(f.scope(request_permit()).await, Ok(()));
        assert_eq!(request_permit().await, Ok(()), "outside a fence: allowed");
        f.revoke();
        assert!(!f.extend(Instant::now() + Duration::from_secs(600)));
        assert_eq!(f.scope(request_permit()).await, Err(Void));
        f.voided().await;
    }

    #[test]
    fn stop_starting_keeps_running_jobs_valid() {
        let f = Fence::new(
            Instant::now() + Duration::from_secs(60),
            Duration::from_secs(1),
        );
        f.stop_starting();
        assert!(!f.may_start());
        assert!(!f.is_void());
    }
}
