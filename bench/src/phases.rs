//! Where a job's time went in the worker: `sparky_job_phase_seconds{phase}` read from the worker's
//! `/metrics` ([`sparky::metrics::JobPhase`]) before and after a measured stretch, so the report
//! says, next to a rate or a latency, how long each job waited for a slot, started, executed,
//! committed and settled.

use anyhow::Context;
use sparky::metrics::{samples, JobPhase};

/// One phase's histogram: observations, their sum (s), and cumulative counts per upper bound (s).
#[derive(Clone, Debug, Default)]
struct Histogram {
    count: f64,
    sum: f64,
    buckets: Vec<(f64, f64)>,
}

/// The phases' histograms at one moment (or the difference of two moments).
#[derive(Clone, Debug, Default)]
pub struct Phases(Vec<(JobPhase, Histogram)>);

/// Read the worker's phase histograms from `http://127.0.0.1:{port}/metrics` (namespace `ns`).
pub async fn scrape(port: u16, ns: &str) -> anyhow::Result<Phases> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .context("reading the worker's /metrics")?
        .text()
        .await?;
    Ok(parse(&text, ns))
}

fn parse(text: &str, ns: &str) -> Phases {
    let mut phases: Vec<(JobPhase, Histogram)> = JobPhase::ALL
        .iter()
        .map(|p| (*p, Histogram::default()))
        .collect();
    for (name, labels, value) in samples(text, ns) {
        let label = |k: &str| labels.iter().find(|(l, _)| l == k).map(|(_, v)| v.as_str());
        let Some((_, h)) = phases
            .iter_mut()
            .find(|(p, _)| Some(p.as_str()) == label("phase"))
        else {
            continue;
        };
        match name.as_str() {
            "sparky_job_phase_seconds_count" => h.count += value,
            "sparky_job_phase_seconds_sum" => h.sum += value,
            "sparky_job_phase_seconds_bucket" => {
                let le = match label("le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => le.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                match h.buckets.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, c)) => *c += value,
                    None => h.buckets.push((le, value)),
                }
            }
            _ => {}
        }
    }
    for (_, h) in phases.iter_mut() {
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Phases(phases)
}

impl Phases {
    /// What happened between `before` and `self`.
    pub fn since(&self, before: &Phases) -> Phases {
        let minus = |now: &Histogram, then: Option<&Histogram>| {
            let Some(then) = then else {
                return now.clone();
            };
            Histogram {
                count: now.count - then.count,
                sum: now.sum - then.sum,
                buckets: now
                    .buckets
                    .iter()
                    .map(|(le, c)| {
                        let was = then
                            .buckets
                            .iter()
                            .find(|(b, _)| b == le)
                            .map_or(0.0, |b| b.1);
                        (*le, c - was)
                    })
                    .collect(),
            }
        };
        Phases(
            self.0
                .iter()
                .map(|(p, h)| {
                    let then = before.0.iter().find(|(q, _)| q == p).map(|(_, h)| h);
                    (*p, minus(h, then))
                })
                .collect(),
        )
    }

    /// Per phase: mean per job and the bucket bound its p99 falls under, in ms, e.g.
    /// "waiting 0.41 ms (p99 <= 5), start 0.90 ms (p99 <= 2.5), ...".
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .filter(|(_, h)| h.count > 0.0)
            .map(|(p, h)| {
                let mean = h.sum / h.count * 1000.0;
                let p99 = h
                    .buckets
                    .iter()
                    .find(|(_, c)| *c >= 0.99 * h.count)
                    .map_or(f64::INFINITY, |(le, _)| le * 1000.0);
                format!("{} {mean:.2} ms (p99 <= {p99} ms)", p.as_str())
            })
            .collect();
        if parts.is_empty() {
            "not measured (no phase histogram in /metrics)".into()
        } else {
            parts.join(", ")
        }
    }
}
