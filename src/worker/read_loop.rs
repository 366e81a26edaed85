//! The read loop: one read at a time over the partitions the table says to read (one
//! `XREADGROUP` on a single Redis; one per partition, sent together, on a Redis Cluster, where
//! each partition is its own slot: see `Queue::read`), each entry taken into the table and queued
//! on its user's lane.
//!
//! A history read (an id cursor) answers at once; a read of new entries (`>`) blocks up to
//! [`READ_BLOCK`] (at most a sixth of the lease TTL, so a read never outlives the validity it was
//! issued under). After a takeover a partition makes one history pass over this consumer's pending
//! entries, skipping the ones it already holds, then one more claim; only entries it has never seen
//! send it round again. So an idle worker after a takeover blocks in `XREADGROUP`, and a partition
//! reads new entries while older ones of other users are still running.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::lanes::Lanes;
use super::{RunMode, Worker};
use crate::partition::ReadSpec;
use crate::queue::Entry;

/// How long one `XREADGROUP` blocks waiting for new entries.
const READ_BLOCK: Duration = Duration::from_millis(1000);
/// Entries read per `XREADGROUP`.
const READ_COUNT: usize = 256;
/// How often an owner trims its partition streams to `SPARKY_STREAM_RETENTION_SECS`.
const TRIM_EVERY: Duration = Duration::from_secs(60);

pub(super) struct ReadLoop<'a> {
    worker: &'a Worker,
    lanes: &'a Lanes,
    mode: RunMode,
    block: Duration,
}

impl<'a> ReadLoop<'a> {
    pub(super) fn new(worker: &'a Worker, lanes: &'a Lanes, mode: RunMode) -> Self {
        ReadLoop {
            worker,
            lanes,
            mode,
            block: READ_BLOCK.min(worker.config.lease_ttl / 6),
        }
    }

    pub(super) async fn run(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let w = self.worker;
        let mut conn = w.queue.blocking_conn(self.block).await?;
        let mut backoff = crate::retry::schedule();
        let mut next_trim = Instant::now() + TRIM_EVERY;
        // Consecutive empty reads of new entries (a cluster's reads poll: see `Queue::read`).
        let mut idle_polls = 0u32;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if Instant::now() >= next_trim {
                next_trim = Instant::now() + TRIM_EVERY;
                self.trim().await;
            }
            let specs = w.table.to_read(self.block);
            let cursors = cursors(&specs);
            // Idle means a read of new entries only (not a history pass) found nothing.
            let reads_only_new = !specs.is_empty() && specs.iter().all(|s| !s.is_history());
            let read = tokio::select! {
                r = w.queue.read(&mut conn, &w.consumer, &cursors, READ_COUNT, self.block) => r,
                _ = shutdown.cancelled() => return Ok(()),
            };
            let entries = match read {
                Ok(e) => {
                    backoff = crate::retry::schedule();
                    e
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading the partition streams failed; retrying");
                    if e.to_string().contains("NOGROUP") {
                        // A Redis (or a promoted replica) without the consumer group: a master
                        // restarted without its data. Create the groups again; pending entries
                        // are gone with the data, new ones are read from the stream's start.
                        if let Err(e) = w.queue.ensure_groups().await {
                            tracing::warn!(error = %e, "re-creating the consumer groups failed");
                        }
                    }
                    w.table.read_failed(&specs);
                    w.table.read_done();
                    let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {},
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                    if let Ok(c) = w.queue.blocking_conn(self.block).await {
                        conn = c;
                    }
                    continue;
                }
            };
            let got = entries.len();
            let last_ids = last_ids(&entries);
            self.dispatch(&specs, entries);
            let claim_failed = !self.advance_history(&specs, &last_ids).await;
            w.table.read_done();
            if claim_failed {
                // A history read does not block: without a pause a failing claim would spin.
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {},
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
            if w.queue.is_cluster() && reads_only_new && got == 0 {
                let delay = crate::queue::cluster_poll_delay(idle_polls).min(self.block);
                idle_polls = idle_polls.saturating_add(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {},
                    _ = shutdown.cancelled() => return Ok(()),
                }
            } else {
                idle_polls = 0;
            }
            if self.mode == RunMode::UntilIdle
                && reads_only_new
                && got == 0
                && w.table.settled()
                && w.table.nothing_held()
            {
                return Ok(());
            }
        }
    }

    /// Take each entry into the table (under the generation it was read with) and queue it.
    fn dispatch(&self, specs: &[ReadSpec], entries: Vec<Entry>) {
        for e in entries {
            let Some(spec) = specs.iter().find(|s| s.partition == e.partition) else {
                continue;
            };
            if let Some(fence) = self.worker.table.dispatch(spec, &e.id) {
                self.lanes.push(e, fence);
            }
        }
    }

    /// Move history cursors on; a history pass that returned nothing ends with one more claim.
    /// `false` when a claim failed (the pass is tried again).
    async fn advance_history(&self, specs: &[ReadSpec], last_ids: &HashMap<u32, String>) -> bool {
        let w = self.worker;
        let mut ok = true;
        for spec in specs.iter().filter(|s| s.is_history()) {
            let last = last_ids.get(&spec.partition).map(String::as_str);
            if !w.table.history_read(spec, last) {
                continue;
            }
            match w.queue.claim_all_pending(spec.partition, &w.consumer).await {
                Ok(claimed) => w.table.history_claimed(spec, &claimed),
                Err(e) => {
                    tracing::warn!(partition = spec.partition, error = %e, "claiming pending entries failed; retrying");
                    ok = false;
                }
            }
        }
        ok
    }

    async fn trim(&self) {
        let w = self.worker;
        for p in w.table.consuming() {
            match w.queue.trim(p, w.config.stream_retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(partition = p, removed = n, "trimmed the partition stream"),
                Err(e) => tracing::warn!(partition = p, error = %e, "trimming failed"),
            }
        }
    }
}

/// The last entry id a read returned per partition (held ones included: the cursor passes them).
fn last_ids(entries: &[Entry]) -> HashMap<u32, String> {
    entries
        .iter()
        .map(|e| (e.partition, e.id.clone()))
        .collect()
}

fn cursors(specs: &[ReadSpec]) -> Vec<(u32, String)> {
    specs
        .iter()
        .map(|s| (s.partition, s.cursor.clone()))
        .collect()
}
