//! Part 4 (issue 3): trades/s with 1, 2 and 4 `sparky-worker` processes, 1000 users whose paper
//! credentials add 50 ms to every order, `SPARKY_WORKER_CONCURRENCY=8`: latency, not CPU, is the
//! bound, so the ideal is 8 / 50 ms = 160 trades/s per worker.
//!
//! For each worker count, on a fresh namespace (same database and users): start the workers, wait
//! until the partition leases are spread over all of them, enqueue a backlog larger than they can
//! finish in the window, skip a second of warm-up, then count the trade rows committed in a fixed
//! window. Leftover jobs are abandoned with the namespace.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;

use crate::cpu::{self, CpuUse};
use crate::pipeline::{enqueue_all, make_jobs};
use crate::setup::{self, Ctx, Proc, Scope};

pub const LATENCY_MS: u64 = 50;
pub const CONCURRENCY: usize = 8;

pub struct ScalingRun {
    pub workers: usize,
    pub rate: f64,
    /// Time from the workers' start until the leases were spread over all of them.
    pub balanced_after: Duration,
    pub cpu: CpuUse,
}

pub struct ScalingResult {
    pub window_secs: u64,
    pub runs: Vec<ScalingRun>,
}

async fn count_trades(scope: &Scope) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM trades")
        .fetch_one(&scope.store.pool)
        .await?)
}

/// Wait until every partition of `ns` is leased and by exactly `k` distinct workers, none holding
/// more than its fair share.
async fn wait_balanced(
    queue: &sparky::queue::Queue,
    k: usize,
    procs: &mut [Proc],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let fair = (setup::PARTITIONS as usize).div_ceil(k);
    let mut c = queue.conn();
    loop {
        let mut owners: HashMap<String, usize> = HashMap::new();
        let mut all = true;
        for p in 0..setup::PARTITIONS {
            let o: Option<String> = redis::cmd("GET")
                .arg(queue.keys.lease(p))
                .query_async(&mut c)
                .await?;
            match o {
                Some(o) => *owners.entry(o).or_default() += 1,
                None => all = false,
            }
        }
        if all && owners.len() == k && owners.values().all(|n| *n <= fair) {
            return Ok(());
        }
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        if Instant::now() > deadline {
            bail!("partition leases not balanced over {k} workers: {owners:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(ctx: &Ctx, counts: &[usize], window_secs: u64) -> anyhow::Result<ScalingResult> {
    let scope = Scope::create(ctx, "scaling").await?;
    let r = run_in(ctx, &scope, counts, window_secs).await;
    scope.cleanup(ctx).await;
    r
}

async fn run_in(
    ctx: &Ctx,
    scope: &Scope,
    counts: &[usize],
    window_secs: u64,
) -> anyhow::Result<ScalingResult> {
    let users = setup::create_users(&scope.store, 1000, json!({"latency_ms": LATENCY_MS})).await?;
    let mut runs = vec![];
    for &k in counts {
        let ns = format!("{}w{k}", scope.ns);
        let queue = setup::new_queue(ctx, &ns).await?;
        let started = Instant::now();
        let mut procs = vec![];
        for _ in 0..k {
            procs.push(setup::spawn(
                ctx,
                "sparky-worker",
                &setup::worker_env(ctx, scope, &ns, CONCURRENCY),
            )?);
        }
        let r = async {
            wait_balanced(&queue, k, &mut procs).await?;
            let balanced_after = started.elapsed();
            // Twice what the ideal rate finishes in warm-up + window, in whole rounds of users.
            let ideal = (CONCURRENCY * k) as f64 * 1000.0 / LATENCY_MS as f64;
            let want = (ideal * (window_secs as f64 + 1.0) * 2.0) as usize;
            let jobs = make_jobs(&users, want.div_ceil(users.len()), &format!("W{k}S"));
            let at_start = count_trades(scope).await?;
            enqueue_all(&queue, &jobs).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let pids: Vec<u32> = procs.iter().map(|p| p.pid()).collect();
            let (c0, t0, before) = (
                count_trades(scope).await?,
                Instant::now(),
                cpu::snapshot(&pids),
            );
            tokio::time::sleep(Duration::from_secs(window_secs)).await;
            let (c1, t1, after) = (
                count_trades(scope).await?,
                Instant::now(),
                cpu::snapshot(&pids),
            );
            for p in procs.iter_mut() {
                p.check_alive()?;
            }
            if c1 - c0 <= 0 {
                bail!("no trades in the window with {k} workers");
            }
            if c1 - at_start >= jobs.len() as i64 {
                bail!(
                    "the backlog of {} jobs ran out within the window with {k} workers",
                    jobs.len()
                );
            }
            anyhow::Ok(ScalingRun {
                workers: k,
                rate: (c1 - c0) as f64 / (t1 - t0).as_secs_f64(),
                balanced_after,
                cpu: cpu::between(&before, &after),
            })
        }
        .await;
        for p in procs.iter_mut() {
            p.stop(Duration::from_secs(5)).await;
        }
        setup::delete_namespace(&queue, &ns).await?;
        runs.push(r?);
    }
    Ok(ScalingResult { window_secs, runs })
}
