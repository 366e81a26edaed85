//! The partition gauges (lag, pending, oldest pending age) and the dead-letter size, sampled from
//! Redis every [`SAMPLE_EVERY`] for the partitions this worker consumes, and the job-start
//! counters, from the worker's own start writers.

use std::collections::HashSet;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Worker;

/// How often the gauges are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

impl Worker {
    /// Sample until `stop`. A partition this worker no longer consumes is reported as 0 once (its
    /// new owner reports it), so `sum by (partition)` over all workers is right.
    pub(super) async fn sample_gauges(self, stop: CancellationToken) {
        let mut reported: HashSet<u32> = HashSet::new();
        loop {
            let active = self.table.consuming();
            for p in reported.iter().filter(|p| !active.contains(p)) {
                self.metrics.partition(*p, Some(0), 0, Duration::ZERO);
            }
            reported = active.iter().copied().collect();
            self.record_start_metrics();
            if let Err(e) = self.record_partition_metrics(&active).await {
                tracing::debug!(error = %e, "sampling the partition gauges failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                _ = stop.cancelled() => break,
            }
        }
        for p in reported {
            self.metrics.partition(p, Some(0), 0, Duration::ZERO);
        }
    }

    /// Set the job-start counters from the worker's start writers now.
    pub fn record_start_metrics(&self) {
        self.metrics.job_starts(self.runner.begin_stats());
    }

    /// Set the lag / pending / oldest-pending-age gauges of `partitions` and the dead-letter size
    /// gauge from Redis now.
    pub async fn record_partition_metrics(
        &self,
        partitions: &[u32],
    ) -> Result<(), crate::queue::QueueError> {
        let now = self.queue.redis_now_ms().await?;
        for p in partitions {
            let s = self.queue.partition_stats(*p, now).await?;
            self.metrics.partition(
                *p,
                s.lag,
                s.pending,
                Duration::from_millis(s.oldest_pending_age_ms.unwrap_or(0)),
            );
        }
        self.metrics.dead_letter_size(self.queue.dlq_len().await?);
        Ok(())
    }
}
