//! Prometheus metrics (`GET /metrics` on the ingress and on the worker's `WORKER_PORT`).
//!
//! One `metrics-exporter-prometheus` recorder is installed per process ([`install`], idempotent) and
//! every `/metrics` route renders it. Each series carries the label `sparky_namespace`
//! (`SPARKY_NAMESPACE`): one value per deployment, so it costs nothing in production, and it keeps
//! the series of different deployments apart when several share a process (the integration tests
//! run many ingresses and workers in one process, each on its own namespace, and read their own).
//!
//! Labels are bounded: statuses, reasons, exchange names, call names, partitions (at most
//! `SPARKY_PARTITIONS`). Never a user id, job id, symbol or secret.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `sparky_webhooks_accepted_total` | counter | `status` (`queued`, `duplicate`) |
//! | `sparky_webhooks_rejected_total` | counter | `reason` |
//! | `sparky_ingress_request_duration_seconds` | histogram | `route`, `status` |
//! | `sparky_jobs_finished_total` | counter | `status`, `exchange` |
//! | `sparky_job_duration_seconds` | histogram | `exchange` (acceptance to final state) |
//! | `sparky_accept_to_order_seconds` | histogram | `exchange` (acceptance to the first order acknowledged) |
//! | `sparky_job_phase_seconds` | histogram | `exchange`, `phase` (one step of a job in the worker: [`JobPhase`]) |
//! | `sparky_exchange_request_duration_seconds` | histogram | `exchange`, `op`, `outcome` |
//! | `sparky_exchange_retries_total` | counter | `exchange` |
//! | `sparky_dead_letters_total` | counter | `status`, `error_class` |
//! | `sparky_jobs_blocked_total` | counter | `rule` (the risk rule that blocked the job) |
//! | `sparky_dead_letter_size` | gauge | (entries in `{ns}:dlq`) |
//! | `sparky_partition_lag` | gauge | `partition` (entries not yet read) |
//! | `sparky_partition_pending` | gauge | `partition` (read, not acked) |
//! | `sparky_partition_oldest_pending_age_seconds` | gauge | `partition` |
//! | `sparky_partitions_owned`, `sparky_partitions_assigned` | gauge | |
//! | `sparky_credential_cache_hits_total`, `sparky_credential_cache_misses_total` | counter | |
//! | `sparky_job_start_statements_total` | counter | (statements writing job starts recorded before the job executes) |
//! | `sparky_job_starts_total` | counter | (job starts those statements wrote or found final; divided by the statements, the starts per statement) |
//! | `sparky_job_starts_alone_total` | counter | (starts written on their own, mostly those of failed statements) |

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::SharedString;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The label every series carries.
pub const NAMESPACE_LABEL: &str = "sparky_namespace";

/// Histogram buckets (seconds): from a fast ingress answer to a slow broker with retries.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the process-wide recorder (first call; later calls return the same handle). `None` when
/// another recorder was installed first (then `/metrics` is empty and a warning is logged once).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .expect("static buckets are valid");
            match builder.install_recorder() {
                Ok(handle) => {
                    // Histogram samples are folded into their buckets by upkeep (also on render);
                    // this bounds memory when nobody scrapes.
                    let h = handle.clone();
                    let _ = std::thread::Builder::new()
                        .name("metrics-upkeep".into())
                        .spawn(move || loop {
                            std::thread::sleep(Duration::from_secs(5));
                            h.run_upkeep();
                        });
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "a metrics recorder was already installed; /metrics will be empty");
                    None
                }
            }
        })
        .as_ref()
}

/// The Prometheus text exposition of everything this process recorded.
pub fn render() -> String {
    install().map(|h| h.render()).unwrap_or_default()
}

/// `GET /metrics`.
pub async fn handler() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(),
    )
}

/// Records metrics of one deployment (namespace). Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    ns: SharedString,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("ns", &&*self.ns).finish()
    }
}

macro_rules! ns_labels {
    ($self:ident $(, $k:expr => $v:expr)*) => {
        [(NAMESPACE_LABEL, $self.ns.clone()) $(, ($k, SharedString::from($v)))*]
    };
}

impl Metrics {
    /// Metrics labelled with `namespace`; installs the recorder if needed.
    pub fn new(namespace: &str) -> Metrics {
        install();
        Metrics {
            ns: SharedString::from_shared(Arc::<str>::from(namespace)),
        }
    }

    fn labels<const N: usize>(
        &self,
        pairs: [(&'static str, SharedString); N],
    ) -> Vec<metrics::Label> {
        pairs
            .into_iter()
            .map(|(k, v)| metrics::Label::new(k, v))
            .collect()
    }

    pub fn webhook_accepted(&self, status: &'static str) {
        metrics::counter!(
            "sparky_webhooks_accepted_total",
            self.labels(ns_labels!(self, "status" => status))
        )
        .increment(1);
    }

    pub fn webhook_rejected(&self, reason: &'static str) {
        metrics::counter!(
            "sparky_webhooks_rejected_total",
            self.labels(ns_labels!(self, "reason" => reason))
        )
        .increment(1);
    }

    pub fn ingress_request(&self, route: &'static str, status: u16, elapsed: Duration) {
        metrics::histogram!(
            "sparky_ingress_request_duration_seconds",
            self.labels(ns_labels!(self, "route" => route, "status" => status.to_string()))
        )
        .record(elapsed.as_secs_f64());
    }

    pub fn job_finished(
        &self,
        status: &'static str,
        exchange: &'static str,
        since_accept: Duration,
    ) {
        metrics::counter!(
            "sparky_jobs_finished_total",
            self.labels(ns_labels!(self, "status" => status, "exchange" => exchange))
        )
        .increment(1);
        metrics::histogram!(
            "sparky_job_duration_seconds",
            self.labels(ns_labels!(self, "exchange" => exchange))
        )
        .record(since_accept.as_secs_f64());
    }

    /// One step of one job in the worker ([`JobPhase`]): where a job's time goes.
    pub fn job_phase(&self, exchange: &'static str, phase: JobPhase, elapsed: Duration) {
        metrics::histogram!(
            "sparky_job_phase_seconds",
            self.labels(ns_labels!(self, "exchange" => exchange, "phase" => phase.as_str()))
        )
        .record(elapsed.as_secs_f64());
    }

    pub fn accept_to_order(&self, exchange: &'static str, elapsed: Duration) {
        metrics::histogram!(
            "sparky_accept_to_order_seconds",
            self.labels(ns_labels!(self, "exchange" => exchange))
        )
        .record(elapsed.as_secs_f64());
    }

    pub fn exchange_request(
        &self,
        exchange: &'static str,
        op: &'static str,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        metrics::histogram!(
            "sparky_exchange_request_duration_seconds",
            self.labels(ns_labels!(self, "exchange" => exchange, "op" => op, "outcome" => outcome))
        )
        .record(elapsed.as_secs_f64());
    }

    pub fn exchange_retries(&self, exchange: &'static str, n: u64) {
        if n > 0 {
            metrics::counter!(
                "sparky_exchange_retries_total",
                self.labels(ns_labels!(self, "exchange" => exchange))
            )
            .increment(n);
        }
    }

    /// One notification delivery attempt (`outcome`: `delivered`, `retry`, `failed`).
    pub fn notification_attempt(&self, channel: &'static str, outcome: &'static str) {
        metrics::counter!(
            "sparky_notification_attempts_total",
            self.labels(ns_labels!(self, "channel" => channel, "outcome" => outcome))
        )
        .increment(1);
    }

    /// A job blocked by a risk rule (`sparky_jobs_blocked_total{rule}`).
    pub fn job_blocked(&self, rule: crate::risk::RiskRule) {
        metrics::counter!(
            "sparky_jobs_blocked_total",
            self.labels(ns_labels!(self, "rule" => rule.as_str()))
        )
        .increment(1);
    }

    pub fn dead_lettered(
        &self,
        status: crate::job::JobStatus,
        error_class: Option<crate::job::FailureClass>,
    ) {
        let class = error_class.map_or("", |c| c.as_str());
        metrics::counter!(
            "sparky_dead_letters_total",
            self.labels(ns_labels!(self, "status" => status.as_str(), "error_class" => class))
        )
        .increment(1);
    }

    /// The worker's job-start statements so far ([`crate::store::BeginStats`], sampled with the
    /// gauges).
    pub fn job_starts(&self, stats: &crate::store::BeginStats) {
        use std::sync::atomic::Ordering::Relaxed;
        let labels = || self.labels(ns_labels!(self));
        metrics::counter!("sparky_job_start_statements_total", labels())
            .absolute(stats.statements.load(Relaxed));
        metrics::counter!("sparky_job_starts_total", labels()).absolute(stats.jobs.load(Relaxed));
        metrics::counter!("sparky_job_starts_alone_total", labels())
            .absolute(stats.alone.load(Relaxed));
    }

    pub fn dead_letter_size(&self, n: u64) {
        metrics::gauge!("sparky_dead_letter_size", self.labels(ns_labels!(self))).set(n as f64);
    }

    pub fn partition(&self, partition: u32, lag: Option<u64>, pending: u64, oldest_age: Duration) {
        let p = partition.to_string();
        if let Some(lag) = lag {
            metrics::gauge!(
                "sparky_partition_lag",
                self.labels(ns_labels!(self, "partition" => p.clone()))
            )
            .set(lag as f64);
        }
        metrics::gauge!(
            "sparky_partition_pending",
            self.labels(ns_labels!(self, "partition" => p.clone()))
        )
        .set(pending as f64);
        metrics::gauge!(
            "sparky_partition_oldest_pending_age_seconds",
            self.labels(ns_labels!(self, "partition" => p))
        )
        .set(oldest_age.as_secs_f64());
    }

    pub fn partitions(&self, owned: usize, assigned: usize) {
        metrics::gauge!("sparky_partitions_owned", self.labels(ns_labels!(self))).set(owned as f64);
        metrics::gauge!("sparky_partitions_assigned", self.labels(ns_labels!(self)))
            .set(assigned as f64);
    }

    /// A drift the reconciliation found (a difference between Sparky's position and the broker's
    /// that no Sparky order explains), by exchange and [`crate::reconcile::DriftKind`].
    pub fn reconcile_drift(&self, exchange: &'static str, kind: &'static str) {
        metrics::counter!(
            "sparky_reconcile_drift_total",
            self.labels(ns_labels!(self, "exchange" => exchange, "kind" => kind))
        )
        .increment(1);
    }

    /// One account reconciled (`ok`: to the end, or stopped by an error).
    pub fn reconciled(&self, exchange: &'static str, ok: bool) {
        metrics::counter!(
            "sparky_reconcile_accounts_total",
            self.labels(ns_labels!(self, "exchange" => exchange, "result" => if ok { "ok" } else { "error" }))
        )
        .increment(1);
    }

    pub fn credential_cache(&self, hit: bool) {
        if hit {
            metrics::counter!(
                "sparky_credential_cache_hits_total",
                self.labels(ns_labels!(self))
            )
            .increment(1);
        } else {
            metrics::counter!(
                "sparky_credential_cache_misses_total",
                self.labels(ns_labels!(self))
            )
            .increment(1);
        }
    }
}

/// The steps of a job in the worker, in order (`sparky_job_phase_seconds{phase}`). `start`,
/// `execute` and `commit` hold one of the worker's `SPARKY_WORKER_CONCURRENCY` slots; `waiting`
/// is the wait for one, and `settle` runs after it is given back. A job run again within its
/// delivery (its commit found another delivery's record) counts its steps again; one that finds
/// the job finished counts `waiting` and `start` only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobPhase {
    /// From the read that took the entry to the slot it runs in: behind the user's earlier jobs
    /// (its lane), then behind the other lanes.
    Waiting,
    /// Recording the delivery's start (the attempt fence), with the starts of other lanes.
    Start,
    /// Between the start and the commit: credentials, the exchange client, the risk check, the
    /// orders.
    Execute,
    /// The statement that records the job's outcome.
    Commit,
    /// The dead-letter record (a failed job's) and the ack, after the slot is given back.
    Settle,
}

impl JobPhase {
    pub const ALL: [JobPhase; 5] = [
        JobPhase::Waiting,
        JobPhase::Start,
        JobPhase::Execute,
        JobPhase::Commit,
        JobPhase::Settle,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Waiting => "waiting",
            JobPhase::Start => "start",
            JobPhase::Execute => "execute",
            JobPhase::Commit => "commit",
            JobPhase::Settle => "settle",
        }
    }
}

/// One parsed series: name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// Parse the exposition text into the samples whose `sparky_namespace` is `ns` (for tests and
/// tools that read `/metrics`).
pub fn samples(text: &str, ns: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels: Vec<(String, String)> = split_labels(labels);
        if labels.iter().any(|(k, v)| k == NAMESPACE_LABEL && v == ns) {
            out.push((name.to_string(), labels, value));
        }
    }
    out
}

fn split_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 2..];
        let mut end = 0;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = i;
                    break;
                }
                _ => escaped = false,
            }
        }
        out.push((
            key,
            after[..end].replace("\\\"", "\"").replace("\\\\", "\\"),
        ));
        rest = &after[end + 1..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_filtered_by_namespace_and_parsed() {
        let text = "# TYPE a counter\n\
                    a{sparky_namespace=\"x\",reason=\"invalid\"} 3\n\
                    a{sparky_namespace=\"y\",reason=\"invalid\"} 5\n\
                    b_bucket{sparky_namespace=\"x\",le=\"0.5\"} 2\n";
        let s = samples(text, "x");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0, "a");
        assert_eq!(s[0].1[1], ("reason".to_string(), "invalid".to_string()));
        assert_eq!(s[0].2, 3.0);
        assert_eq!(s[1].1[1], ("le".to_string(), "0.5".to_string()));
    }
}
