//! Part 3: a steady 1000 webhooks/s through the real ingress and one real worker to the paper
//! exchange; accept-to-order latency from the database: `jobs.accepted_at` (the ingress's clock when
//! it accepted the webhook) to `trades.created_at` (`now()` of the worker's commit transaction,
//! which begins right after the exchange acknowledged the order). Same machine, same clock.
//!
//! The load is open-loop: request i is sent at start + i ms whatever the answers do, from this
//! process (wrk from Debian has no fixed-rate mode). Before the measured run every user sends one
//! webhook, so the caches (webhook secrets in the ingress, credentials in Redis) are warm, as they
//! are in steady operation.

use std::time::{Duration, Instant};

use anyhow::bail;
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::cpu::{self, CpuUse};
use crate::phases;
use crate::setup::{self, Ctx, Scope, User};

pub struct LatencyResult {
    pub rate: u64,
    pub secs: u64,
    pub concurrency: usize,
    pub sent: usize,
    /// Rate the generator achieved (sent / time to send).
    pub achieved: f64,
    /// Answers other than 202.
    pub not_accepted: usize,
    pub http_p50_ms: f64,
    pub http_p99_ms: f64,
    /// accept -> order (trade row), ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// accept -> the worker started the job (queueing), p50 / p99 ms.
    pub queued_p50_ms: f64,
    pub queued_p99_ms: f64,
    /// Where the worker's time per job went ([`phases::Phases::summary`]).
    pub phases: String,
    pub cpu: CpuUse,
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Webhook `i` of the run: user `i % users`, opening its own symbol `{prefix}{i / users}`, so every
/// job places exactly one order (like the pipeline part).
pub fn bodies(users: &[User], count: usize, prefix: &str) -> Vec<String> {
    (0..count)
        .map(|i| {
            let u = &users[i % users.len()];
            json!({"secret": u.secret, "user_id": u.id, "exchange": "paper", "action": "buy",
                   "symbol": format!("{prefix}{}", i / users.len()), "position_size_usd": "1000"})
            .to_string()
        })
        .collect()
}

/// Send `bodies` at `rate`/s; returns (status, seconds) per request and the time it took to send
/// them.
pub async fn send(
    url: &str,
    bodies: Vec<String>,
    rate: u64,
) -> anyhow::Result<(Vec<(u16, f64)>, f64)> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(10))
        .build()?;
    let count = bodies.len();
    let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = Instant::now() + Duration::from_millis(20);
    let mut handles = Vec::with_capacity(count);
    for (i, body) in bodies.into_iter().enumerate() {
        tokio::time::sleep_until((start + period * i as u32).into()).await;
        let (http, url) = (http.clone(), url.to_string());
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = http
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let status = r.map(|r| r.status().as_u16()).unwrap_or(0);
            (status, t.elapsed().as_secs_f64())
        }));
    }
    let sent_in = start.elapsed().as_secs_f64();
    let mut out = Vec::with_capacity(count);
    for h in handles {
        out.push(h.await?);
    }
    Ok((out, sent_in))
}

pub async fn run(
    ctx: &Ctx,
    rate: u64,
    secs: u64,
    concurrency: usize,
) -> anyhow::Result<LatencyResult> {
    let scope = Scope::create(ctx, "latency").await?;
    let r = run_in(ctx, &scope, rate, secs, concurrency).await;
    scope.cleanup(ctx).await;
    r
}

async fn run_in(
    ctx: &Ctx,
    scope: &Scope,
    rate: u64,
    secs: u64,
    concurrency: usize,
) -> anyhow::Result<LatencyResult> {
    let users = setup::create_users(&scope.store, 1000, json!({})).await?;
    let port = setup::free_port()?;
    let ingress = setup::spawn_ingress(ctx, scope, port).await?;
    let mut env = setup::worker_env(ctx, scope, &scope.ns, concurrency);
    let metrics_port = setup::metrics_port(&mut env)?;
    let worker = setup::spawn(ctx, "sparky-worker", &env)?;
    let mut procs = [ingress, worker];
    let url = format!("http://127.0.0.1:{port}/webhook");

    // Warm-up: one webhook per user.
    let (warm, _) = send(&url, bodies(&users, users.len(), "WARM"), rate).await?;
    let warm_ok = warm.iter().filter(|(s, _)| *s == 202).count();
    setup::wait_finished(
        &scope.store,
        warm_ok as i64,
        Duration::from_secs(60),
        &mut procs,
    )
    .await?;

    let count = (rate * secs) as usize;
    let steady = bodies(&users, count, "LAT");
    let phases_before = phases::scrape(metrics_port, &scope.ns).await?;
    let measured_from: DateTime<Utc> = Utc::now();
    let pids = [procs[0].pid(), procs[1].pid()];
    let before = cpu::snapshot(&pids);
    let (results, sent_in) = send(&url, steady, rate).await?;
    let cpu_use = cpu::between(&before, &cpu::snapshot(&pids));
    let accepted = results.iter().filter(|(s, _)| *s == 202).count();
    setup::wait_finished(
        &scope.store,
        (warm_ok + accepted) as i64,
        Duration::from_secs(60),
        &mut procs,
    )
    .await?;
    let phases = phases::scrape(metrics_port, &scope.ns)
        .await?
        .since(&phases_before);
    for p in procs.iter_mut() {
        p.stop(Duration::from_secs(5)).await;
    }
    let bad = setup::failed_summary(&scope.store).await?;
    if !bad.is_empty() {
        bail!("latency jobs did not all succeed: {bad:?}");
    }

    let (p50, p99, max, q50, q99): (f64, f64, f64, f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.99) WITHIN GROUP (ORDER BY d), max(d),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY q), percentile_cont(0.99) WITHIN GROUP (ORDER BY q)
         FROM (SELECT (extract(epoch FROM t.created_at - j.accepted_at) * 1000)::float8 AS d,
                      (extract(epoch FROM j.started_at - j.accepted_at) * 1000)::float8 AS q
               FROM trades t JOIN jobs j USING (job_id)
               WHERE j.accepted_at >= $1 AND t.leg = 'open') x",
    )
    .bind(measured_from)
    .fetch_one(&scope.store.pool)
    .await?;
    let mut http: Vec<f64> = results.iter().map(|(_, s)| s * 1000.0).collect();
    http.sort_by(f64::total_cmp);
    Ok(LatencyResult {
        rate,
        secs,
        concurrency,
        sent: count,
        achieved: count as f64 / sent_in.max(1e-9),
        not_accepted: count - accepted,
        http_p50_ms: percentile(&http, 0.5),
        http_p99_ms: percentile(&http, 0.99),
        p50_ms: p50,
        p99_ms: p99,
        max_ms: max,
        queued_p50_ms: q50,
        queued_p99_ms: q99,
        phases: phases.summary(),
        cpu: cpu_use,
    })
}
