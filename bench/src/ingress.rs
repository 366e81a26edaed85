//! Part 1: `POST /webhook` of the real `sparky-ingress` (release binary) against a ceiling, a bare
//! axum route in this process that only parses the JSON and does one `XADD`. Both are driven by
//! `wrk` with the same connections, threads, duration and bodies (valid, authenticated alerts of
//! 1000 users, rotated by a Lua script).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;
use sparky::queue::RedisConn;

use crate::cpu::{self, CpuUse};
use crate::profile;
use crate::setup::{self, Ctx, Scope, User};

/// The fixed load: wrk threads and connections.
pub const WRK_THREADS: usize = 2;
pub const WRK_CONNECTIONS: usize = 32;
/// The measured time of each side is cut into this many alternating slices.
pub const SLICES: u64 = 3;

#[derive(Clone, Debug, Default)]
pub struct WrkStats {
    pub requests: u64,
    pub secs: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Answers other than 2xx/3xx.
    pub non_2xx: u64,
    /// Connect/read/write errors and timeouts.
    pub socket_errors: u64,
    pub cpu: CpuUse,
}

impl WrkStats {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.secs.max(1e-9)
    }

    /// Slices of one measurement: counts add up; p50 is the mean of the slices' p50, p99 and max
    /// the worst slice's (percentiles of slices cannot be merged exactly).
    fn combine(slices: &[WrkStats]) -> WrkStats {
        let n = slices.len().max(1) as f64;
        WrkStats {
            requests: slices.iter().map(|s| s.requests).sum(),
            secs: slices.iter().map(|s| s.secs).sum(),
            p50_ms: slices.iter().map(|s| s.p50_ms).sum::<f64>() / n,
            p99_ms: slices.iter().map(|s| s.p99_ms).fold(0.0, f64::max),
            max_ms: slices.iter().map(|s| s.max_ms).fold(0.0, f64::max),
            non_2xx: slices.iter().map(|s| s.non_2xx).sum(),
            socket_errors: slices.iter().map(|s| s.socket_errors).sum(),
            cpu: CpuUse::mean(&slices.iter().map(|s| s.cpu.clone()).collect::<Vec<_>>()),
        }
    }
}

pub struct IngressResult {
    pub sparky: WrkStats,
    pub ceiling: WrkStats,
    /// Entries the real ingress appended to the partition streams (every 202 is one).
    pub enqueued: u64,
    pub measure_secs: u64,
    /// `--perf`: the ingress's top symbols during its measured run.
    pub profile: Option<String>,
}

// One request per call, rotating over the bodies file (one JSON body per line); each thread starts
// at its own offset. `done` prints one machine-readable line.
const WRK_LUA: &str = r#"
local bodies = {}
local i = 0
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end
function init(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  i = ((tid or 1) * 397) % #bodies
end
function request()
  i = i % #bodies + 1
  return wrk.format("POST", "/webhook", {["Content-Type"] = "application/json"}, bodies[i])
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max, e.status,
    e.connect + e.read + e.write + e.timeout))
end
"#;

/// One valid alert per user (alternating buy/sell so they are realistic, not all the same).
fn bodies(users: &[User]) -> String {
    let mut out = String::new();
    for (i, u) in users.iter().enumerate() {
        let body = json!({
            "secret": u.secret, "user_id": u.id, "exchange": "paper",
            "action": if i % 2 == 0 { "buy" } else { "sell" },
            "symbol": "BINANCE:ETHUSDT", "order_type": "market", "position_size_usd": "100",
        });
        out.push_str(&body.to_string());
        out.push('\n');
    }
    out
}

/// Start `wrk` (the bench's threads and connections) for `secs` against `url`, with the Lua
/// `script` reading its bodies from `script_arg`.
pub fn start_wrk(
    script: &Path,
    url: &str,
    secs: u64,
    script_arg: &Path,
) -> anyhow::Result<tokio::process::Child> {
    tokio::process::Command::new("wrk")
        .args([
            "-t",
            &WRK_THREADS.to_string(),
            "-c",
            &WRK_CONNECTIONS.to_string(),
            "-d",
            &format!("{secs}s"),
            "--timeout",
            "5s",
            "-s",
        ])
        .arg(script)
        .arg(url)
        .arg("--")
        .arg(script_arg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting wrk (scripts/bench installs it: apt-get install wrk)")
}

async fn wrk(
    ctx: &Ctx,
    url: &str,
    secs: u64,
    bodies: &Path,
    sparky_pids: &[u32],
) -> anyhow::Result<WrkStats> {
    let script = ctx.tmp.join("bench.lua");
    std::fs::write(&script, WRK_LUA)?;
    let child = start_wrk(&script, url, secs, bodies)?;
    // CPU is sampled inside wrk's run, so wrk is still there to be counted.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cpu::snapshot(sparky_pids);
    tokio::time::sleep(Duration::from_millis(secs * 1000 - 800)).await;
    let after = cpu::snapshot(sparky_pids);
    let out = child.wait_with_output().await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().find(|l| l.starts_with("BENCH ")) else {
        bail!(
            "wrk printed no result:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let v: Vec<f64> = line[6..]
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    Ok(WrkStats {
        requests: v[0] as u64,
        secs: v[1] / 1e6,
        p50_ms: v[2] / 1e3,
        p99_ms: v[3] / 1e3,
        max_ms: v[4] / 1e3,
        non_2xx: v[5] as u64,
        socket_errors: v[6] as u64,
        cpu: cpu::between(&before, &after),
    })
}

#[derive(Clone)]
struct Ceiling {
    conn: RedisConn,
    stream: String,
}

/// The ceiling: parse the JSON, one XADD, answer 202.
async fn ceiling_webhook(State(st): State<Ceiling>, body: Bytes) -> Response {
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) if v.is_object() => {}
        _ => return StatusCode::BAD_REQUEST.into_response(),
    }
    let mut c = st.conn.clone();
    let r: redis::RedisResult<String> = redis::cmd("XADD")
        .arg(&st.stream)
        .arg("*")
        .arg("job")
        .arg(&body[..])
        .query_async(&mut c)
        .await;
    match r {
        Ok(id) => (
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "status": "queued"})),
        )
            .into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

pub async fn run(
    ctx: &Ctx,
    measure_secs: u64,
    warmup_secs: u64,
    perf: bool,
) -> anyhow::Result<IngressResult> {
    let scope = Scope::create(ctx, "ingress").await?;
    let r = run_in(ctx, &scope, measure_secs, warmup_secs, perf).await;
    scope.cleanup(ctx).await;
    r
}

async fn run_in(
    ctx: &Ctx,
    scope: &Scope,
    measure_secs: u64,
    warmup_secs: u64,
    perf: bool,
) -> anyhow::Result<IngressResult> {
    let users = setup::create_users(&scope.store, 1000, json!({})).await?;
    let bodies_path = ctx.tmp.join("ingress-bodies.txt");
    std::fs::write(&bodies_path, bodies(&users))?;

    // The ceiling, served by this process on 127.0.0.1 with the same kind of Redis connection the
    // ingress uses (one multiplexed connection manager).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let ceiling_url = format!("http://{}/webhook", listener.local_addr()?);
    let state = Ceiling {
        conn: scope.queue.conn(),
        stream: format!("{}:ceiling:stream", scope.ns),
    };
    let app = Router::new()
        .route("/webhook", post(ceiling_webhook))
        .with_state(state);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let r = measure(
        ctx,
        scope,
        &ceiling_url,
        &bodies_path,
        measure_secs,
        warmup_secs,
        perf,
    )
    .await;
    server.abort();
    r
}

/// Both servers are up at once and measured in alternating slices (ceiling, Sparky, ceiling, ...),
/// so that load from elsewhere on the machine falls on both alike.
async fn measure(
    ctx: &Ctx,
    scope: &Scope,
    ceiling_url: &str,
    bodies_path: &Path,
    measure_secs: u64,
    warmup_secs: u64,
    perf: bool,
) -> anyhow::Result<IngressResult> {
    let port = setup::free_port()?;
    let mut ingress = setup::spawn_ingress(ctx, scope, port).await?;
    let url = format!("http://127.0.0.1:{port}/webhook");
    let pids = [ingress.pid()];
    // Warm-up: every user's secret gets into the ingress's cache (one Postgres look-up each).
    // (This process is the ceiling; it shows up as `bench` in the CPU lines.)
    wrk(ctx, ceiling_url, warmup_secs, bodies_path, &[]).await?;
    wrk(ctx, &url, warmup_secs, bodies_path, &pids).await?;
    let slice = (measure_secs / SLICES).max(2);
    let (mut ceiling, mut sparky) = (vec![], vec![]);
    let mut enqueued = 0;
    let mut profile = None;
    for i in 0..SLICES {
        ceiling.push(wrk(ctx, ceiling_url, slice, bodies_path, &[]).await?);
        let before = stream_total(scope).await?;
        let rec = (perf && i == 0).then(|| profile::start(ctx, "ingress", pids[0], slice - 1));
        sparky.push(wrk(ctx, &url, slice, bodies_path, &pids).await?);
        if let Some(r) = rec {
            profile = Some(profile::finish(r, 6).await);
        }
        enqueued += stream_total(scope).await? - before;
    }
    ingress.check_alive()?;
    ingress.stop(Duration::from_secs(5)).await;
    let (sparky, ceiling) = (WrkStats::combine(&sparky), WrkStats::combine(&ceiling));
    // Every body is a valid alert: an answer other than 202 means the bench measures an error path
    // (until 2026-12-01 14:45 the bodies named a strategy the users did not have, and every answer
    // was a 400 after issue 19 made that an error).
    for (side, w) in [("sparky-ingress", &sparky), ("the ceiling", &ceiling)] {
        if w.non_2xx > 0 || w.socket_errors > 0 {
            bail!(
                "{side} answered {} of {} requests with a non-2xx status ({} socket errors): the ingress numbers would measure an error path",
                w.non_2xx,
                w.requests,
                w.socket_errors
            );
        }
    }
    if enqueued == 0 {
        bail!(
            "sparky-ingress appended no entries during {} requests",
            sparky.requests
        );
    }
    Ok(IngressResult {
        sparky,
        ceiling,
        enqueued,
        measure_secs: slice * SLICES,
        profile,
    })
}

async fn stream_total(scope: &Scope) -> anyhow::Result<u64> {
    let mut n = 0;
    for p in 0..setup::PARTITIONS {
        n += scope.queue.stream_len(p).await?;
    }
    Ok(n)
}
