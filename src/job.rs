//! The typed states of a job, as the worker, the store, the API and the dead-letter stream see them.
//!
//! Each is an enum end to end: stored in Postgres as its snake_case text (`sqlx::Type` over `text`,
//! the same values the `CHECK` constraints list), serialised as the same text in JSON, and used as
//! a bounded metric label. Nothing compares them as strings.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a job is in its life: `queued` -> `executing` -> one final state.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Executing,
    Succeeded,
    SucceededUnprotected,
    Skipped,
    Rejected,
    Dead,
    /// The order was accepted but has not filled (a resting limit entry, a Tradier order outside
    /// market hours). The stream entry is done; the order follower moves the job on to
    /// `succeeded`/`succeeded_unprotected` when it fills, or `expired` when its time runs out.
    Working,
    /// A working order that was cancelled at the end of its time without filling.
    Expired,
    /// A risk limit refused the job before any order was sent (the error names the rule).
    Blocked,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Executing => "executing",
            JobStatus::Succeeded => "succeeded",
            JobStatus::SucceededUnprotected => "succeeded_unprotected",
            JobStatus::Skipped => "skipped",
            JobStatus::Rejected => "rejected",
            JobStatus::Dead => "dead",
            JobStatus::Working => "working",
            JobStatus::Expired => "expired",
            JobStatus::Blocked => "blocked",
        }
    }
    /// Does a job in this state belong in the dead-letter stream (and may it be replayed)?
    pub fn is_failure(self) -> bool {
        matches!(self, JobStatus::Rejected | JobStatus::Dead)
    }
    /// Is the job's stream work over (its entry may be acked)? Every state but `queued` and
    /// `executing`; a `working` job is then followed by the order follower, not by its entry.
    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Executing)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job failed (or was left unprotected): the `error_class` of the job row, the dead-letter
/// record and the `sparky_dead_letters_total` metric.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum FailureClass {
    /// The broker failed in a way worth retrying (5xx, timeout before sending, rate limit).
    Transient,
    /// The broker may or may not have acted (timeout after sending, 503, Aster -1007).
    Unknown,
    /// The broker refused for good (bad symbol, too small, insufficient margin), or sizing failed.
    Permanent,
    /// No usable credentials for the job's exchange and environment.
    Credentials,
    /// Reached later than `SPARKY_MAX_SIGNAL_AGE_SECS` or its own `timestamp + max_lag_secs`.
    Stale,
    /// Delivered more than `SPARKY_MAX_DELIVERIES` times without finishing, or unreadable.
    Poison,
    /// The job's alert breaks a bound the ingress enforces (a replayed or old entry).
    Invalid,
    /// Postgres refused the job's data (SQLSTATE classes 22, 23, ...), tried `SPARKY_MAX_DELIVERIES` times.
    Database,
    /// A bug: the job's execution panicked. The message says where.
    Internal,
    /// A risk limit blocked the job (status `blocked`); the message names the rule and the numbers
    /// ([`crate::risk::RiskRule`]).
    Risk,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Transient => "transient",
            FailureClass::Unknown => "unknown",
            FailureClass::Permanent => "permanent",
            FailureClass::Credentials => "credentials",
            FailureClass::Stale => "stale",
            FailureClass::Poison => "poison",
            FailureClass::Invalid => "invalid",
            FailureClass::Database => "database",
            FailureClass::Internal => "internal",
            FailureClass::Risk => "risk",
        }
    }
    /// Failures the executor retries (with backoff, bounded).
    pub fn is_retriable(self) -> bool {
        matches!(self, FailureClass::Transient | FailureClass::Unknown)
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the broker did with one order leg.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum FillState {
    /// Executed (the quantity is what filled).
    Filled,
    /// Accepted but not (yet) filled: a resting order.
    Accepted,
}

impl FillState {
    pub fn as_str(self) -> &'static str {
        match self {
            FillState::Filled => "filled",
            FillState::Accepted => "accepted",
        }
    }
}

/// Why a position (or part of it) was exited: `trades.exit_reason` of a closing fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum ExitReason {
    /// An alert closed it (a close, a reversal, a `close_percent`).
    Signal,
    /// Its stop-loss order fired at the broker (found by the reconciliation).
    StopLoss,
    /// Its take-profit order fired at the broker (found by the reconciliation).
    TakeProfit,
    /// It disappeared at the broker with no Sparky order to explain it (closed by hand,
    /// liquidated): the reconciliation records it so Sparky matches the broker.
    External,
}

impl fmt::Display for FillState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_match_serde_and_the_schema() {
        for s in [
            JobStatus::Queued,
            JobStatus::Executing,
            JobStatus::Succeeded,
            JobStatus::SucceededUnprotected,
            JobStatus::Skipped,
            JobStatus::Rejected,
            JobStatus::Dead,
            JobStatus::Working,
            JobStatus::Expired,
            JobStatus::Blocked,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(
            serde_json::to_value(FailureClass::Internal).unwrap(),
            "internal"
        );
        assert_eq!(
            serde_json::to_value(FillState::Accepted).unwrap(),
            "accepted"
        );
    }
}
