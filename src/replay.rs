//! Replaying failed jobs (`sparky replay`) and listing them (`sparky dlq list`).
//!
//! A replay re-enqueues a `rejected` or `dead` job on its user's partition stream, so the ordering
//! rules hold as for any job. It keeps the job id, hence the client order ids of every leg, and the
//! worker runs a replayed job in recovery mode: each leg is looked up at the exchange by its client
//! order id before anything is placed, so an order that in fact exists is recorded, not sent again.
//!
//! Safety:
//! - only `rejected` / `dead` jobs are replayed: the job row is moved back to `queued` with a
//!   compare-and-set before the entry is appended (of two concurrent replays, one wins; a job that
//!   succeeded is never run again: replaying it twice does nothing the second time);
//! - a job that would be stale (older than `SPARKY_MAX_SIGNAL_AGE_SECS`, or past its own
//!   `timestamp + max_lag_secs`) is not replayed unless `--allow-stale` is given;
//! - `--dry-run` only lists what would be replayed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::domain::Job;
use crate::job::JobStatus;
use crate::queue::{Queue, Replay};
use crate::store::Store;

/// Which jobs to replay.
#[derive(Debug, Clone)]
pub enum Selector {
    Jobs(Vec<Uuid>),
    User(Uuid),
    /// Jobs whose entries are in the partition streams between these times.
    Range {
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    },
    /// Every rejected or dead job.
    AllFailed,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub dry_run: bool,
    pub allow_stale: bool,
    pub max_signal_age: Duration,
}

/// What happened (or, with `--dry-run`, would happen) to one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Re-enqueued (or would be).
    Replayed,
    /// Not replayed: older than the signal age limit and `--allow-stale` was not given.
    WouldBeStale,
    /// Not replayed: the job is not failed (it succeeded, was skipped, or is still running).
    NotFailed,
    /// Not replayed: no such job.
    NotFound,
    /// Not replayed: the job's alert breaks a bound the ingress enforces now.
    Invalid,
    /// Not replayed: the queue or the database failed.
    Error,
}

#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub job_id: Uuid,
    pub user_id: Option<Uuid>,
    pub status: Option<JobStatus>,
    pub decision: Decision,
    pub detail: String,
}

/// Would `job` be stale if run now?
pub fn would_be_stale(job: &Job, max_age: Duration, now: DateTime<Utc>) -> Option<String> {
    if let (Some(ts), Some(lag)) = (job.alert.timestamp, job.alert.max_lag_secs) {
        // Checked: an alert read back from storage may carry any lag (the ingress bounds it).
        let deadline = i64::try_from(lag)
            .ok()
            .and_then(chrono::Duration::try_seconds)
            .and_then(|d| ts.checked_add_signed(d));
        if deadline.is_some_and(|d| now > d) {
            return Some(format!(
                "alert time {ts} is more than max_lag_secs={lag} ago"
            ));
        }
    }
    let age = (now - job.accepted_at).to_std().unwrap_or_default();
    if age > max_age {
        return Some(format!(
            "accepted {}s ago (SPARKY_MAX_SIGNAL_AGE_SECS={})",
            age.as_secs(),
            max_age.as_secs()
        ));
    }
    None
}

/// The job ids a selector names.
pub async fn select(
    store: &Store,
    queue: &Queue,
    selector: &Selector,
) -> anyhow::Result<Vec<Uuid>> {
    Ok(match selector {
        Selector::Jobs(ids) => ids.clone(),
        Selector::User(u) => store
            .failed_jobs(Some(*u), None, None, i64::MAX)
            .await?
            .into_iter()
            .rev() // oldest first: the user's order
            .map(|j| j.job_id)
            .collect(),
        Selector::AllFailed => store
            .failed_jobs(None, None, None, i64::MAX)
            .await?
            .into_iter()
            .rev()
            .map(|j| j.job_id)
            .collect(),
        Selector::Range { since, until } => {
            let mut ids = vec![];
            for p in 0..queue.partitions {
                for e in queue
                    .range(p, since.timestamp_millis(), until.timestamp_millis())
                    .await?
                {
                    if let Ok(job) = e.job {
                        if !ids.contains(&job.job_id) {
                            ids.push(job.job_id);
                        }
                    }
                }
            }
            ids
        }
    })
}

/// Replay the selected jobs, in the given order.
pub async fn replay(
    store: &Store,
    queue: &Queue,
    ids: &[Uuid],
    opts: &Options,
) -> anyhow::Result<Vec<Item>> {
    let now = Utc::now();
    let mut out = Vec::with_capacity(ids.len());
    for &job_id in ids {
        let Some((job, status)) = store.job_envelope(job_id).await? else {
            out.push(Item {
                job_id,
                user_id: None,
                status: None,
                decision: Decision::NotFound,
                detail: "no such job (never accepted, or not yet picked up by a worker)".into(),
            });
            continue;
        };
        let item = |decision, detail: String| Item {
            job_id,
            user_id: Some(job.alert.user_id),
            status: Some(status),
            decision,
            detail,
        };
        if !status.is_failure() {
            out.push(item(
                Decision::NotFailed,
                format!("job is {status}; only rejected and dead jobs are replayed"),
            ));
            continue;
        }
        if let Err(errors) = job.alert.check_bounds() {
            let why: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            out.push(item(
                Decision::Invalid,
                format!("the alert breaks the webhook's bounds: {}", why.join("; ")),
            ));
            continue;
        }
        if let Some(why) = would_be_stale(&job, opts.max_signal_age, now) {
            if !opts.allow_stale {
                out.push(item(
                    Decision::WouldBeStale,
                    format!("would be stale: {why}; pass --allow-stale to run it anyway"),
                ));
                continue;
            }
        }
        if opts.dry_run {
            out.push(item(
                Decision::Replayed,
                "would be re-enqueued (dry run)".into(),
            ));
            continue;
        }
        let Some(old) = store.requeue_failed(job_id).await? else {
            out.push(item(
                Decision::NotFailed,
                "job changed state meanwhile (another replay?)".into(),
            ));
            continue;
        };
        let marker = Replay {
            at: now,
            allow_stale: opts.allow_stale,
        };
        match queue.append_replay(&job, &marker).await {
            Ok((p, entry)) => out.push(item(
                Decision::Replayed,
                format!("re-enqueued on partition {p} as entry {entry}"),
            )),
            Err(e) => {
                store.undo_requeue(job_id, old).await?;
                out.push(item(Decision::Error, format!("could not enqueue: {e}")));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_max_lag_is_never_stale_and_never_panics() {
        let body = serde_json::json!({"user_id": Uuid::now_v7(), "exchange": "paper", "action": "buy",
            "symbol": "ETHUSDT", "position_size_usd": 100});
        let mut alert = crate::domain::parse_alert(body.as_object().unwrap(), None).unwrap();
        let now = Utc::now();
        alert.timestamp = Some(now);
        let mut job = Job {
            job_id: Uuid::now_v7(),
            accepted_at: now,
            alert,
        };
        for lag in [u64::MAX, 100_000_000_000_000_000, i64::MAX as u64] {
            job.alert.max_lag_secs = Some(lag);
            assert_eq!(would_be_stale(&job, Duration::from_secs(60), now), None);
        }
        job.alert.max_lag_secs = Some(1);
        let later = now + chrono::Duration::seconds(5);
        assert!(would_be_stale(&job, Duration::from_secs(60), later).is_some());
    }
}
