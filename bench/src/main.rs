//! `sparky-bench`: the benchmark suite (issue 8, with the worker-scaling run of issue 3).
//!
//! Each number is printed next to a ceiling measured in the same run on the same machine, because
//! on a shared machine a number alone says little:
//! 1. ingress: `POST /webhook` of the real `sparky-ingress` vs a bare axum route that parses the JSON
//!    and does one `XADD` (wrk, fixed connections);
//! 2. pipeline: a backlog of jobs through a real `sparky-worker` to the paper exchange vs the same
//!    Postgres writes issued directly at the same concurrency;
//! 3. latency: accept-to-order at a steady 1000 webhooks/s;
//! 4. scaling: trades/s of 1, 2 and 4 worker processes with a 50 ms exchange;
//! 5. flood: random webhook secrets from a shared source that a fresh ingress absorbs while 1000
//!    uncached known users all still get 202 (issue 16).
//!
//! Every part has its own Postgres database and Redis namespace and removes them afterwards. All
//! traffic stays on 127.0.0.1. `scripts/bench` builds the release binaries and runs this; the table
//! is printed and written into BENCHMARKS.md between the `bench:begin`/`bench:end` markers (text
//! outside them is kept).

/// The same allocator as `sparky-ingress` and `sparky-worker`, so the ceilings measured in this
/// process are not handicapped by a slower one.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cpu;
mod flood;
mod ingress;
mod latency;
mod phases;
mod pipeline;
mod profile;
mod report;
mod scaling;
mod setup;

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    Ingress,
    Pipeline,
    Latency,
    Scaling,
    Flood,
}

#[derive(Parser, Debug)]
#[command(about = "Sparky benchmarks against ceilings measured in the same run")]
pub struct Args {
    /// Directory of the release `sparky-worker` and `sparky-ingress` (default: next to this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Parts to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "ingress,pipeline,latency,scaling,flood"
    )]
    only: Vec<Part>,
    /// Report file; `-` prints only.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: String,
    /// Ingress: measured seconds of each side (Sparky and ceiling), in 3 alternating slices.
    #[arg(long, default_value_t = 9)]
    ingress_secs: u64,
    /// Ingress: untimed warm-up seconds before each measured run.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Pipeline: jobs in the backlog (rounded up to whole rounds of 1000 users).
    #[arg(long, default_value_t = 20_000)]
    pipeline_jobs: usize,
    /// Pipeline and latency: SPARKY_WORKER_CONCURRENCY of the worker (and the ceiling's concurrency).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Latency: webhooks per second.
    #[arg(long, default_value_t = 1000)]
    latency_rate: u64,
    /// Latency: seconds of steady load.
    #[arg(long, default_value_t = 30)]
    latency_secs: u64,
    /// Latency: a second, short run at this lower rate (0 = none), to tell the latency of one job
    /// apart from queueing when 1000/s is beyond what the machine can process.
    #[arg(long, default_value_t = 200)]
    latency_low_rate: u64,
    /// Latency: seconds of the low-rate run.
    #[arg(long, default_value_t = 10)]
    latency_low_secs: u64,
    /// Scaling: measured window per worker count, seconds.
    #[arg(long, default_value_t = 10)]
    scaling_window: u64,
    /// Flood: known users' alerts per second during the random-secret flood (1000 in all).
    #[arg(long, default_value_t = 100)]
    flood_known_rate: u64,
    /// Profile the ingress and the worker with `perf` during their runs. It slows the profiled side
    /// only, so the ratios of a profiled run are lower (`scripts/bench` profiles only when asked).
    #[arg(long)]
    perf: bool,
    /// `LOG_LEVEL` of the workers (what a deployment logs is part of what a job costs; `warn`
    /// shows how much the per-job info lines cost).
    #[arg(long, default_value = "info,sqlx=warn")]
    worker_log_level: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default(),
    };
    let mut ctx = setup::Ctx::from_env(bin_dir)?;
    ctx.worker_log_level = args.worker_log_level.clone();
    ctx.sweep().await?;
    let started = Instant::now();
    let mut rep = report::Report::start(&ctx).await;
    let r = run_parts(&ctx, &args, &mut rep).await;
    setup::remove_tmp(&ctx);
    r?;
    rep.finish(started.elapsed());
    let text = rep.table();
    println!("\n{text}");
    if args.out != "-" {
        rep.write(&args.out, &args)?;
        println!("written to {}", args.out);
    }
    Ok(())
}

async fn run_parts(ctx: &setup::Ctx, args: &Args, rep: &mut report::Report) -> anyhow::Result<()> {
    let step = |name: &str| eprintln!("==> {name} ({})", report::loadavg());
    if args.only.contains(&Part::Ingress) {
        step("ingress vs ceiling");
        let r = ingress::run(ctx, args.ingress_secs, args.warmup_secs, args.perf).await?;
        eprintln!(
            "    sparky {:.0}/s, ceiling {:.0}/s",
            r.sparky.rate(),
            r.ceiling.rate()
        );
        rep.ingress = Some(r);
    }
    if args.only.contains(&Part::Pipeline) {
        step("pipeline vs ceiling");
        let r = pipeline::run(ctx, args.pipeline_jobs, args.concurrency, args.perf).await?;
        eprintln!(
            "    worker {:.0} jobs/s, ceiling {:.0} jobs/s",
            r.rate, r.ceiling_rate
        );
        rep.pipeline = Some(r);
    }
    if args.only.contains(&Part::Latency) {
        step("accept-to-order latency");
        let r = latency::run(ctx, args.latency_rate, args.latency_secs, args.concurrency).await?;
        eprintln!(
            "    p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            r.p50_ms, r.p99_ms, r.max_ms
        );
        rep.latency = Some(r);
        if args.latency_low_rate > 0 {
            step("accept-to-order latency at a lower rate");
            let r = latency::run(
                ctx,
                args.latency_low_rate,
                args.latency_low_secs,
                args.concurrency,
            )
            .await?;
            eprintln!(
                "    p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                r.p50_ms, r.p99_ms, r.max_ms
            );
            rep.latency_low = Some(r);
        }
    }
    if args.only.contains(&Part::Scaling) {
        step("worker scaling");
        let r = scaling::run(ctx, &[1, 2, 4], args.scaling_window).await?;
        for run in &r.runs {
            eprintln!("    {} worker(s): {:.0} trades/s", run.workers, run.rate);
        }
        rep.scaling = Some(r);
    }
    if args.only.contains(&Part::Flood) {
        step("random-secret flood from a shared source");
        let r = flood::run(ctx, args.flood_known_rate).await?;
        eprintln!(
            "    flood {:.0}/s absorbed; known users {}/{} accepted",
            r.flood_rate,
            r.known_accepted,
            flood::KNOWN_USERS
        );
        rep.flood = Some(r);
    }
    Ok(())
}
