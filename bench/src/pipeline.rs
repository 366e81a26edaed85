//! Part 2: a pre-filled backlog of N jobs over 1000 users through a real `sparky-worker` to the
//! paper exchange (no simulated latency), against a ceiling: the same Postgres writes per job,
//! issued by the store's own functions (`begin_job`: the job row insert; `finish_job`: job update,
//! trade row and position upsert in one transaction), at the same concurrency and pool size, with no
//! Redis, no exchange and no executor.
//!
//! A second ceiling (issue 17) is the job's *essential* write: per job one transaction that inserts
//! its trade row and upserts its position, nothing else, at the same concurrency and pool size (the
//! job rows the trades reference are inserted beforehand, outside the timing). It is what Postgres
//! can do for these jobs at all; the first ceiling is only the project's own way of writing.
//!
//! Every job opens a position on a symbol its user has no position in, so each one is exactly one
//! order, one trade row and one position upsert, in the worker and in the ceilings alike.
//!
//! **The tables are not empty** (issue 17): before anything is timed, every user gets a book of
//! [`BOOK_PER_USER`] earlier jobs, trades and open positions (other symbols), and the tables are
//! analysed, as a database in service would be. On empty tables Postgres plans a look-up by key as
//! a sequential scan, and a prepared statement keeps that plan while its table grows, until an
//! `ANALYZE` (autovacuum, within about a minute in service) replans it: a benchmark that starts on
//! empty tables measures that transient (the paper exchange's position read was 25 pages and
//! 275 us a call), not the steady state. Between the runs only the measured rows are removed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::json;
use sparky::domain::{self, Job, OrderSide, Side};
use sparky::exchanges::paper::paper_market;
use sparky::exchanges::{client_order_id, Leg};
use sparky::executor::{Fill, JobStatus, Outcome, PositionChange};
use sparky::job::FillState;
use sparky::queue::Queue;
use sparky::sizing::round_down;
use sparky::store::Store;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::cpu::{self, CpuUse};
use crate::setup::{self, Ctx, Scope, User};
use crate::{phases, profile};

const POSITION_USD: i64 = 1000;

pub struct PipelineResult {
    pub jobs: usize,
    pub concurrency: usize,
    /// Jobs/s of the worker: N / (last finished_at - first started_at).
    pub rate: f64,
    pub secs: f64,
    pub ceiling_rate: f64,
    pub ceiling_secs: f64,
    pub cpu: CpuUse,
    pub ceiling_cpu: CpuUse,
    /// The essential-write ceiling: jobs/s, seconds, CPU.
    pub essential_rate: f64,
    pub essential_secs: f64,
    pub essential_cpu: CpuUse,
    /// Per-job time inside the worker (started_at -> finished_at), p50 / p99 in ms.
    pub run_p50_ms: f64,
    pub run_p99_ms: f64,
    /// Where the worker's time per job went ([`phases::Phases::summary`]).
    pub phases: String,
    /// `--perf`: the worker's top symbols during 10 s of its run.
    pub profile: Option<String>,
}

/// `per_user` jobs for each user, interleaved (user 0..n, then again), each opening `{prefix}{k}`.
pub fn make_jobs(users: &[User], per_user: usize, prefix: &str) -> Vec<Job> {
    let mut jobs = Vec::with_capacity(users.len() * per_user);
    for k in 0..per_user {
        for u in users {
            let body = json!({"user_id": u.id, "exchange": "paper", "action": "buy",
                              "symbol": format!("{prefix}{k}"), "position_size_usd": POSITION_USD.to_string()});
            let alert = domain::parse_alert(body.as_object().expect("object"), None)
                .expect("a valid bench alert");
            jobs.push(Job {
                job_id: Uuid::now_v7(),
                accepted_at: Utc::now(),
                alert,
            });
        }
    }
    jobs
}

/// Append `jobs` to their partitions (concurrently, like many ingress requests would).
pub async fn enqueue_all(queue: &Queue, jobs: &[Job]) -> anyhow::Result<()> {
    let jobs = Arc::new(jobs.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..32 {
        let (jobs, next, queue) = (jobs.clone(), next.clone(), queue.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else {
                    return anyhow::Ok(());
                };
                queue.enqueue(job).await?;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// What the paper exchange and the executor would record for an opening job.
fn open_outcome(job: &Job) -> Outcome {
    let (price, rules) = paper_market(job.alert.symbol.as_str());
    let quantity = round_down(Decimal::from(POSITION_USD) / price, rules.step).expect("fits");
    let coid = client_order_id(job.job_id, Leg::Open);
    Outcome {
        status: JobStatus::Succeeded,
        fills: vec![Fill {
            leg: Leg::Open,
            side: OrderSide::Buy,
            quantity,
            price: Some(price),
            exchange_order_id: Some(format!("paper-{coid}")),
            client_order_id: coid,
            status: FillState::Filled,
            pnl: None,
            exit_reason: None,
            fee: None,
            of_job: None,
        }],
        position: PositionChange::Open {
            side: Side::Long,
            quantity,
            entry_price: price,
            stop_loss_price: None,
            take_profit_price: None,
        },
        message: None,
        error_class: None,
        history: vec![],
        environment: domain::CredentialEnv::Production,
        resting: vec![],
        cancelled: vec![],
    }
}

/// The ceiling: the worker's Postgres writes for every job, `concurrency` at a time.
async fn ceiling(
    db_url: &str,
    jobs: &[Job],
    concurrency: usize,
    pool: u32,
) -> anyhow::Result<(f64, CpuUse)> {
    let store = Store::connect_retrying(db_url, pool).await?; // as the worker's
    let before = cpu::snapshot(&[]);
    let writer = store.clone();
    let secs = for_each_job(jobs, concurrency, move |job| {
        let store = writer.clone();
        async move {
            let p = sparky::queue::partition_of(&job.alert.user_id, setup::PARTITIONS);
            if let sparky::store::Begin::Execute { attempt, .. } =
                store.begin_job(&job, p, "0-0").await?
            {
                store.finish_job(&job, &open_outcome(&job), attempt).await?;
            }
            Ok(())
        }
    })
    .await?;
    let use_ = cpu::between(&before, &cpu::snapshot(&[]));
    store.pool.close().await;
    Ok((secs, use_))
}

/// Run `work` for every job, `concurrency` at a time; the seconds it took.
async fn for_each_job<F, Fut>(jobs: &[Job], concurrency: usize, work: F) -> anyhow::Result<f64>
where
    F: Fn(Job) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let jobs = Arc::new(jobs.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        let (jobs, next, work) = (jobs.clone(), next.clone(), work.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(i) else {
                    return anyhow::Ok(());
                };
                work(job.clone()).await?;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The essential-write ceiling: per job one transaction with the store's own trade insert and
/// position upsert ([`sparky::store::record_fills`]; the job rows exist already), `concurrency` at
/// a time, `pool` connections.
async fn essential_write(
    db_url: &str,
    jobs: &[Job],
    concurrency: usize,
    pool: u32,
) -> anyhow::Result<(f64, CpuUse)> {
    let store = Store::connect_retrying(db_url, pool).await?; // as the worker's
    let setup_store = store.clone();
    for_each_job(jobs, concurrency, move |job| {
        let store = setup_store.clone();
        async move {
            let p = sparky::queue::partition_of(&job.alert.user_id, setup::PARTITIONS);
            store.begin_job(&job, p, "0-0").await?;
            Ok(())
        }
    })
    .await?;
    let pg = store.pool.clone();
    let before = cpu::snapshot(&[]);
    let secs = for_each_job(jobs, concurrency, move |job| {
        let pg = pg.clone();
        async move {
            let mut tx = pg.begin().await?;
            sparky::store::record_fills(&mut tx, &job, &open_outcome(&job)).await?;
            tx.commit().await?;
            Ok(())
        }
    })
    .await?;
    let use_ = cpu::between(&before, &cpu::snapshot(&[]));
    store.pool.close().await;
    Ok((secs, use_))
}

/// Earlier jobs, trades and open positions per user before the measured runs (see the header).
const BOOK_PER_USER: usize = 5;

/// Remove the rows a measured run wrote (its jobs' symbols start with `PIPE`), keeping the book, so
/// the next measurement starts alike.
async fn reset_tables(store: &Store) -> anyhow::Result<()> {
    for table in ["trades", "positions", "jobs"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE symbol LIKE 'PIPE%'"))
            .execute(&store.pool)
            .await?;
    }
    sqlx::query("VACUUM ANALYZE").execute(&store.pool).await?;
    Ok(())
}

pub async fn run(
    ctx: &Ctx,
    n_jobs: usize,
    concurrency: usize,
    perf: bool,
) -> anyhow::Result<PipelineResult> {
    let scope = Scope::create(ctx, "pipeline").await?;
    let r = run_in(ctx, &scope, n_jobs, concurrency, perf).await;
    scope.cleanup(ctx).await;
    r
}

async fn run_in(
    ctx: &Ctx,
    scope: &Scope,
    n_jobs: usize,
    concurrency: usize,
    perf: bool,
) -> anyhow::Result<PipelineResult> {
    let users = setup::create_users(&scope.store, 1000, json!({})).await?;
    let jobs = make_jobs(&users, n_jobs.div_ceil(users.len()), "PIPE");
    let n = jobs.len();
    let pool = (concurrency as u32 + 2).min(32);
    let book = make_jobs(&users, BOOK_PER_USER, "BOOK");
    ceiling(&scope.db_url, &book, concurrency, pool).await?;
    reset_tables(&scope.store).await?; // analyses the book

    // Ceiling first, on the book; then the same rows are removed so the worker starts alike.
    // The worker's pool is min(concurrency + 2, 32) connections; the ceiling gets the same.
    let (ceiling_secs, ceiling_cpu) = ceiling(&scope.db_url, &jobs, concurrency, pool).await?;
    let trades: i64 = sqlx::query_scalar("SELECT count(*) FROM trades WHERE symbol LIKE 'PIPE%'")
        .fetch_one(&scope.store.pool)
        .await?;
    if trades != n as i64 {
        bail!("the ceiling recorded {trades} trades for {n} jobs");
    }
    reset_tables(&scope.store).await?;
    let (essential_secs, essential_cpu) =
        essential_write(&scope.db_url, &jobs, concurrency, pool).await?;
    reset_tables(&scope.store).await?;

    enqueue_all(&scope.queue, &jobs).await?;
    let mut env = setup::worker_env(ctx, scope, &scope.ns, concurrency);
    let metrics_port = setup::metrics_port(&mut env)?;
    let worker = setup::spawn(ctx, "sparky-worker", &env)?;
    let before = cpu::snapshot(&[worker.pid()]);
    let rec = perf.then(|| profile::start(ctx, "worker", worker.pid(), 10));
    let mut procs = [worker];
    let book_jobs = (users.len() * BOOK_PER_USER) as i64;
    setup::wait_finished(
        &scope.store,
        book_jobs + n as i64,
        Duration::from_secs(240),
        &mut procs,
    )
    .await?;
    let profile = match rec {
        Some(r) => Some(profile::finish(r, 6).await),
        None => None,
    };
    let cpu_use = cpu::between(&before, &cpu::snapshot(&[procs[0].pid()]));
    let phases = phases::scrape(metrics_port, &scope.ns).await?;
    procs[0].stop(Duration::from_secs(5)).await;
    let bad = setup::failed_summary(&scope.store).await?;
    if !bad.is_empty() {
        bail!("pipeline jobs did not all succeed: {bad:?}");
    }
    let (first, last, p50, p99): (DateTime<Utc>, DateTime<Utc>, f64, f64) = sqlx::query_as(
        "SELECT min(started_at), max(finished_at),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000)
         FROM jobs WHERE symbol LIKE 'PIPE%'",
    )
    .fetch_one(&scope.store.pool)
    .await?;
    let secs = (last - first).num_microseconds().unwrap_or(0) as f64 / 1e6;
    Ok(PipelineResult {
        jobs: n,
        concurrency,
        rate: n as f64 / secs.max(1e-9),
        secs,
        ceiling_rate: n as f64 / ceiling_secs,
        ceiling_secs,
        essential_rate: n as f64 / essential_secs,
        essential_secs,
        essential_cpu,
        cpu: cpu_use,
        ceiling_cpu,
        run_p50_ms: p50,
        run_p99_ms: p99,
        phases: phases.summary(),
        profile,
    })
}
