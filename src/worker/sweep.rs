//! The periodic reconciliation sweep ([`crate::reconcile`]): every
//! `SPARKY_RECONCILE_INTERVAL_SECS`, each worker reconciles the accounts of the users in the
//! partitions it owns (those with a position row or an open `broker_orders` row), one task per
//! user queued on that user's lane ([`super::lanes::Lanes::push_sweep`]), so it never overlaps the
//! user's jobs, and only while the partition's fence allows (a lost partition's users are swept by
//! its next owner).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::job::JobRunner;
use super::lanes::Lanes;
use crate::partition::Table;
use crate::queue::partition_of;
use crate::reconcile::{self, AccountReport};
use crate::store::StoreError;

/// Reconcile every account of `user` (or of every user with something to reconcile, `None`) with
/// its broker, report drift (metric, log, the Redis record `sparky status` shows) and return what
/// was found. Credentials and clients are the job path's ([`JobRunner::account_client`]).
pub async fn reconcile_users(
    runner: &JobRunner,
    user: Option<Uuid>,
) -> Result<Vec<AccountReport>, StoreError> {
    let accounts = reconcile::db::accounts(runner.store(), user).await?;
    let mut reports = Vec::with_capacity(accounts.len());
    for account in accounts {
        let report = match runner.account_client(&account).await {
            None => break, // shutting down
            Some(Ok(client)) => {
                reconcile::reconcile_account(runner.store(), &client, &account).await
            }
            Some(Err(why)) => AccountReport {
                account,
                findings: vec![],
                error: Some(format!("no client for the account: {why}")),
            },
        };
        record(runner, &report).await;
        reports.push(report);
    }
    Ok(reports)
}

/// Metrics, log lines and the Redis record of one account's reconciliation.
async fn record(runner: &JobRunner, report: &AccountReport) {
    let exchange = report.account.exchange.as_str();
    let drift: Vec<&'static str> = report.drift().map(|d| d.as_str()).collect();
    for kind in &drift {
        runner.metrics().reconcile_drift(exchange, kind);
    }
    runner
        .metrics()
        .reconciled(exchange, report.error.is_none());
    for f in &report.findings {
        tracing::info!(account = %report.account, finding = %f, "reconciliation");
    }
    if let Some(e) = &report.error {
        tracing::warn!(account = %report.account, error = %e, "reconciliation stopped");
    }
    if let Err(e) = runner
        .queue()
        .record_reconciliation(Utc::now(), &drift, report.error.is_some())
        .await
    {
        tracing::warn!(error = %e, "recording the reconciliation for status failed");
    }
}

/// The sweep loop: every `interval` until `stop`, queue one reconciliation per user with something
/// to reconcile in each partition this worker consumes, on that user's lane.
pub(super) async fn sweep_loop(
    runner: Arc<JobRunner>,
    table: Arc<Table>,
    lanes: Arc<Lanes>,
    partitions: u32,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
        if let Err(e) = queue_sweeps(&runner, &table, &lanes, partitions).await {
            tracing::warn!(error = %e, "could not list the accounts to reconcile; trying at the next sweep");
        }
    }
}

/// Queue one sweep per user with something to reconcile in the partitions consumed now (selected
/// in SQL: only those partitions' accounts are read). Returns how many were queued.
pub(super) async fn queue_sweeps(
    runner: &JobRunner,
    table: &Table,
    lanes: &Lanes,
    partitions: u32,
) -> Result<usize, StoreError> {
    let live: Vec<u32> = (0..partitions)
        .filter(|p| table.fence_of(*p).is_some())
        .collect();
    if live.is_empty() {
        return Ok(0);
    }
    let mut users: Vec<Uuid> =
        reconcile::db::accounts_in_partitions(runner.store(), &live, partitions)
            .await?
            .into_iter()
            .map(|a| a.user_id)
            .collect();
    users.dedup();
    let mut queued = 0;
    for user in users {
        if let Some(fence) = table.fence_of(partition_of(&user, partitions)) {
            if lanes.push_sweep(user, fence) {
                queued += 1;
            }
        }
    }
    Ok(queued)
}
