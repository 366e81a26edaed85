//! Notifications: users learn what happened to their alerts without asking (issue 15).
//!
//! ```text
//! job outcome (Store::finish_job / Store::mark_failed)   reconciliation (stop/take-profit fired)
//!        \___ one transaction: the job row + [`record_job_outcome`] / [`enqueue_event`] ___/
//!                 notification_outbox (the event) + notification_deliveries (one per channel)
//!                                   |
//!                     [`dispatch::Dispatcher`] (its own task in each worker process)
//!                  claims due deliveries (FOR UPDATE SKIP LOCKED + a lease), sends, logs
//!                                   |
//!          generic webhook (Standard Webhooks signature) | Discord | Slack | Telegram
//! ```
//!
//! # Guarantees
//! - **Written with the outcome.** The event is inserted in the same transaction as the job's final
//!   state, so an outcome is never committed without its event and an event never exists for an
//!   outcome that was rolled back. It is written only when the user has a channel that wants that
//!   kind of event (one statement; nothing at all for users without channels).
//! - **At least once.** A delivery is done only when its channel answered 2xx. A dispatcher that
//!   dies (or is cut off) mid-delivery leaves its lease to expire and another dispatcher (or the
//!   same one) claims the delivery again. Receivers deduplicate by the `webhook-id` header (the
//!   event id, the same on every retry), as the Standard Webhooks spec asks.
//! - **Backoff and a log.** A failed attempt is retried with exponential backoff and jitter (`backon`)
//!   up to [`dispatch::DispatcherConfig::max_attempts`] times; a 4xx other than 408/429 gives up
//!   at once. Every attempt is a row of `notification_attempts` (status, error, duration).
//! - **Never slows trading.** The trading transaction does one extra `INSERT ... SELECT`; the
//!   dispatcher runs on a pool of its own, with bounded concurrency and a request time-out.
//! - **Secrets.** A channel's URL (Discord and Slack webhook URLs are secrets), its signing secret
//!   and a Telegram bot token are encrypted under `SPARKY_MASTER_KEY` like credentials
//!   ([`channel`]); nothing of them is logged, and `notify list` shows only the host.
//!
//! # What it does not promise
//! - **Order.** Deliveries are sent concurrently and retried independently: a channel may receive
//!   events out of order; `occurred_at` (and the UUIDv7 `event_id`) order them.
//! - **Jobs without a row.** A job that never got a `jobs` row (its alert broke a bound before it
//!   began, or Postgres refused to record it at all) raises no notification: the API cannot show it
//!   either; it is in the dead-letter stream for the operator.
//!
//! # Events for later sources
//! [`EventKind::StopLossFired`] and [`EventKind::TakeProfitFired`] come from reconciliation (a
//! protective order that fired at the broker). That code calls [`enqueue_event`] inside the
//! transaction that records the exit, exactly as the job path calls [`record_job_outcome`].

pub mod channel;
pub mod dispatch;
pub mod format;

use std::fmt;
use std::str::FromStr;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::domain::Alert;
use crate::executor::Outcome;
use crate::job::{FillState, JobStatus};
use crate::store::commit::{Gate, Statement};

/// What a user can be notified of. Each channel has a filter: the kinds it wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A job filled (`succeeded` with a filled order).
    Filled,
    /// The broker (or sizing, or the credentials) refused the job for good.
    Rejected,
    /// The job gave up (retries exhausted, stale, poison, ...); it can be replayed.
    Dead,
    /// A risk limit refused the job before any order was sent.
    Blocked,
    /// The job filled but its stop-loss / take-profit could not be placed (`succeeded_unprotected`).
    Unprotected,
    /// The stop-loss fired at the broker (from reconciliation).
    StopLossFired,
    /// The take-profit fired at the broker (from reconciliation).
    TakeProfitFired,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::Filled,
        EventKind::Rejected,
        EventKind::Dead,
        EventKind::Blocked,
        EventKind::Unprotected,
        EventKind::StopLossFired,
        EventKind::TakeProfitFired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Filled => "filled",
            EventKind::Rejected => "rejected",
            EventKind::Dead => "dead",
            EventKind::Blocked => "blocked",
            EventKind::Unprotected => "unprotected",
            EventKind::StopLossFired => "stop_loss_fired",
            EventKind::TakeProfitFired => "take_profit_fired",
        }
    }

    /// The event a job outcome raises, if any: one per outcome. `unprotected` is a fill whose
    /// protection failed (a channel that wants every fill subscribes to both).
    pub fn of_outcome(outcome: &Outcome) -> Option<EventKind> {
        match outcome.status {
            JobStatus::Succeeded if outcome.fills.iter().any(|f| f.status == FillState::Filled) => {
                Some(EventKind::Filled)
            }
            JobStatus::SucceededUnprotected => Some(EventKind::Unprotected),
            JobStatus::Rejected => Some(EventKind::Rejected),
            JobStatus::Dead => Some(EventKind::Dead),
            JobStatus::Blocked => Some(EventKind::Blocked),
            _ => None,
        }
    }

    /// Parse a comma-separated filter (`filled,dead`, or `all`).
    pub fn parse_list(s: &str) -> Result<Vec<EventKind>, String> {
        let mut out = vec![];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part.eq_ignore_ascii_case("all") {
                return Ok(EventKind::ALL.to_vec());
            }
            let k: EventKind = part.parse()?;
            if !out.contains(&k) {
                out.push(k);
            }
        }
        if out.is_empty() {
            return Err("no event kinds given (use `all`, or some of filled, rejected, dead, blocked, unprotected, stop_loss_fired, take_profit_fired)".into());
        }
        Ok(out)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        EventKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!("unknown event kind `{s}`: expected filled, rejected, dead, blocked, unprotected, stop_loss_fired or take_profit_fired")
            })
    }
}

/// Text as `jsonb` accepts it (no NUL), as the job row's own text is stored.
fn clean(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

/// Write the notification a job's outcome raises (if any, and if the user has a channel for it)
/// inside the caller's transaction: [`crate::store::Store::mark_failed`] calls it next to the job's
/// status update ([`crate::store::Store::finish_job`] adds the same parts to its one statement with
/// [`push_job_outcome`]).
pub async fn record_job_outcome(
    conn: &mut sqlx::PgConnection,
    job_id: Uuid,
    alert: &Alert,
    outcome: &Outcome,
) -> Result<Option<Uuid>, sqlx::Error> {
    let Some((kind, data)) = job_outcome_event(job_id, alert, outcome) else {
        return Ok(None);
    };
    enqueue_event(conn, alert.user_id, kind, Some(job_id), data).await
}

/// The event a job's outcome raises and its `data`, if it raises one.
fn job_outcome_event(job_id: Uuid, alert: &Alert, outcome: &Outcome) -> Option<(EventKind, Value)> {
    let kind = EventKind::of_outcome(outcome)?;
    let fills: Vec<Value> = outcome
        .fills
        .iter()
        .map(|f| {
            json!({
                "leg": f.leg.as_str(),
                "side": f.side.as_str(),
                "quantity": f.quantity,
                "price": f.price,
                "status": f.status,
            })
        })
        .collect();
    let data = json!({
        "job_id": job_id,
        "status": outcome.status,
        "exchange": alert.exchange.as_str(),
        "symbol": alert.symbol.as_str(),
        "action": alert.action.as_str(),
        "error_class": outcome.error_class,
        "error": outcome.message.as_deref().map(clean),
        "fills": fills,
    });
    Some((kind, data))
}

/// Add the notification a job's outcome raises to a statement being built (gated like its other
/// parts: written only if the job's fenced update matched).
pub(crate) fn push_job_outcome(
    s: &mut Statement<'_>,
    job_id: Uuid,
    alert: &Alert,
    outcome: &Outcome,
) {
    if let Some((kind, data)) = job_outcome_event(job_id, alert, outcome) {
        push_event(s, alert.user_id, kind, Some(job_id), data);
    }
}

/// Write one event for `user_id` into the outbox, with a delivery for each of the user's channels
/// that wants `kind`, in one statement on the caller's connection (call it inside the transaction
/// that records what the event reports). Nothing is written when no channel wants it. Returns the
/// event id when one was written.
pub async fn enqueue_event(
    conn: &mut sqlx::PgConnection,
    user_id: Uuid,
    kind: EventKind,
    job_id: Option<Uuid>,
    data: Value,
) -> Result<Option<Uuid>, sqlx::Error> {
    let mut s = Statement::new(Gate::Always);
    push_event(&mut s, user_id, kind, job_id, data);
    s.finish("SELECT event_id FROM ev")
        .build_query_scalar()
        .fetch_optional(conn)
        .await
}

/// The parts `ch` (the user's channels that want `kind`), `ev` (the event, if any channel wants it)
/// and `d` (a delivery per channel) of a statement.
///
/// The envelope is `{"type", "event_id", "occurred_at", "user_id", "data"}` (`data` as given): the
/// body a generic webhook receives, and what the chat formats are rendered from.
fn push_event(
    s: &mut Statement<'_>,
    user_id: Uuid,
    kind: EventKind,
    job_id: Option<Uuid>,
    data: Value,
) {
    let event_id = Uuid::now_v7();
    let payload = json!({
        "type": kind.as_str(),
        "event_id": event_id,
        "occurred_at": Utc::now(),
        "user_id": user_id,
        "data": data,
    });
    let gate = s.gate;
    s.part("ch")
        .push("SELECT channel_id FROM notification_channels WHERE user_id = ")
        .push_bind(user_id)
        .push(" AND ")
        .push_bind(kind.as_str())
        .push(" = ANY(events)")
        .push(gate.and());
    s.close();
    let q = s.part("ev");
    q.push("INSERT INTO notification_outbox (event_id, user_id, kind, job_id, payload) SELECT ");
    q.separated(", ")
        .push_bind(event_id)
        .push_bind(user_id)
        .push_bind(kind.as_str())
        .push_bind(job_id)
        .push_bind(payload);
    q.push(" WHERE EXISTS (SELECT 1 FROM ch) RETURNING event_id");
    s.close();
    s.part("d").push(
        "INSERT INTO notification_deliveries (event_id, channel_id) SELECT ev.event_id, ch.channel_id FROM ev, ch",
    );
    s.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_parse_and_print_alike() {
        for k in EventKind::ALL {
            assert_eq!(k.as_str().parse::<EventKind>().unwrap(), k);
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        assert_eq!(EventKind::parse_list("all").unwrap().len(), 7);
        assert_eq!(
            EventKind::parse_list("dead, Filled,dead").unwrap(),
            vec![EventKind::Dead, EventKind::Filled]
        );
        let e = EventKind::parse_list("filled,exploded").unwrap_err();
        assert!(e.contains("exploded"), "{e}");
        assert!(EventKind::parse_list(" , ").is_err());
    }

    #[test]
    fn outcomes_raise_their_event() {
        let o = |s| Outcome::new(s, "x");
        assert_eq!(
            EventKind::of_outcome(&o(JobStatus::Dead)),
            Some(EventKind::Dead)
        );
        assert_eq!(
            EventKind::of_outcome(&o(JobStatus::Blocked)),
            Some(EventKind::Blocked)
        );
        assert_eq!(
            EventKind::of_outcome(&o(JobStatus::SucceededUnprotected)),
            Some(EventKind::Unprotected)
        );
        // Succeeded without a filled order (nothing happened at the broker): no event.
        assert_eq!(EventKind::of_outcome(&o(JobStatus::Succeeded)), None);
        assert_eq!(EventKind::of_outcome(&o(JobStatus::Skipped)), None);
    }
}
