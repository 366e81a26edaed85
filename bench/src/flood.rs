//! Part 5 (issue 16): a flood of random webhook secrets from one shared source (TradingView's
//! situation: every user's alerts and the attacker's come from the same addresses) against a
//! freshly started `sparky-ingress`, while 1000 known users, none of them cached, send one alert
//! each. The number is the rate of random-secret requests the ingress absorbs meanwhile; the
//! condition is that every known user's alert is answered 202.
//!
//! The flood is `wrk` (fixed connections, each request with a new random secret, half of them
//! claiming a known user's id so those users' (source, user) pairs get blocked as well); the known
//! users are sent open-loop from this process at a fixed rate, starting 1 s into the flood.
//! 127.0.0.1 is declared a shared source (`SPARKY_SHARED_SOURCES`), as TradingView's addresses are.

use std::time::Duration;

use anyhow::bail;
use serde_json::json;

use crate::cpu::{self, CpuUse};
use crate::ingress::start_wrk;
use crate::latency;
use crate::setup::{self, Ctx, Scope};

/// Known users, one alert each.
pub const KNOWN_USERS: usize = 1000;

pub struct FloodResult {
    pub secs: u64,
    /// Random-secret requests answered, per second.
    pub flood_rate: f64,
    pub flood_requests: u64,
    /// The flood's answers: 401, 429, 503, other.
    pub flood_answers: [u64; 4],
    pub flood_socket_errors: u64,
    pub known_rate: u64,
    /// Known users answered 202 (of `KNOWN_USERS`).
    pub known_accepted: usize,
    /// The other answers of known users, as (status, count).
    pub known_refused: Vec<(u16, usize)>,
    pub known_p50_ms: f64,
    pub known_p99_ms: f64,
    pub known_max_ms: f64,
    pub cpu: CpuUse,
}

// Every request: a new random secret, and a claimed user_id that is random or (every other
// request) one of the known users'. Answers are counted per status across threads.
const FLOOD_LUA: &str = r#"
local threads = {}
local counter = 0
local users = {}
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end
function init(args)
  for line in io.lines(args[1]) do users[#users + 1] = line end
  math.randomseed(os.time() * 1000 + (tid or 1))
  c401, c429, c503, cother, n = 0, 0, 0, 0, 0
end
local function hex(k)
  local t = {}
  for j = 1, k do t[j] = string.format("%04x", math.random(0, 65535)) end
  return table.concat(t)
end
function request()
  n = n + 1
  local user
  if n % 2 == 0 then
    user = users[math.random(1, #users)]
  else
    local h = hex(8)
    user = h:sub(1, 8) .. "-" .. h:sub(9, 12) .. "-4" .. h:sub(14, 16) .. "-8" .. h:sub(18, 20) .. "-" .. h:sub(21, 32)
  end
  local body = '{"secret":"sk_' .. hex(16) .. '","user_id":"' .. user ..
    '","exchange":"paper","action":"buy","symbol":"BINANCE:ETHUSDT","position_size_usd":"100"}'
  return wrk.format("POST", "/webhook", {["Content-Type"] = "application/json"}, body)
end
function response(status, headers, body)
  if status == 401 then c401 = c401 + 1
  elseif status == 429 then c429 = c429 + 1
  elseif status == 503 then c503 = c503 + 1
  else cother = cother + 1 end
end
function done(summary, latency, requests)
  local a, b, c, d = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("c401"); b = b + t:get("c429"); c = c + t:get("c503"); d = d + t:get("cother")
  end
  local e = summary.errors
  io.write(string.format("FLOOD %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    a, b, c, d, e.connect + e.read + e.write + e.timeout))
end
"#;

pub async fn run(ctx: &Ctx, known_rate: u64) -> anyhow::Result<FloodResult> {
    let scope = Scope::create(ctx, "flood").await?;
    let r = run_in(ctx, &scope, known_rate).await;
    scope.cleanup(ctx).await;
    r
}

async fn run_in(ctx: &Ctx, scope: &Scope, known_rate: u64) -> anyhow::Result<FloodResult> {
    let users = setup::create_users(&scope.store, KNOWN_USERS, json!({})).await?;
    let names = ctx.tmp.join("flood-users.txt");
    std::fs::write(
        &names,
        users
            .iter()
            .map(|u| u.id.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )?;
    let script = ctx.tmp.join("flood.lua");
    std::fs::write(&script, FLOOD_LUA)?;

    let port = setup::free_port()?;
    let mut ingress = setup::spawn_ingress_with(
        ctx,
        scope,
        port,
        &[("SPARKY_SHARED_SOURCES", "127.0.0.1".into())],
    )
    .await?;
    let url = format!("http://127.0.0.1:{port}/webhook");
    // 1 s of flood alone, the known users (KNOWN_USERS / known_rate s), 2 s more.
    let known_secs = (KNOWN_USERS as u64).div_ceil(known_rate.max(1));
    let secs = known_secs + 3;
    let wrk = start_wrk(&script, &url, secs, &names)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pids = [ingress.pid()];
    let before = cpu::snapshot(&pids);
    let (known, _) = latency::send(
        &url,
        latency::bodies(&users, KNOWN_USERS, "FLOOD"),
        known_rate,
    )
    .await?;
    let cpu_use = cpu::between(&before, &cpu::snapshot(&pids));
    let out = wrk.wait_with_output().await?;
    ingress.check_alive()?;
    ingress.stop(Duration::from_secs(5)).await;

    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().find(|l| l.starts_with("FLOOD ")) else {
        bail!(
            "wrk printed no result:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let v: Vec<f64> = line[6..]
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let mut refused = std::collections::BTreeMap::<u16, usize>::new();
    for (s, _) in known.iter().filter(|(s, _)| *s != 202) {
        *refused.entry(*s).or_default() += 1;
    }
    let mut ms: Vec<f64> = known.iter().map(|(_, t)| t * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    Ok(FloodResult {
        secs,
        flood_rate: v[0] / (v[1] / 1e6).max(1e-9),
        flood_requests: v[0] as u64,
        flood_answers: [v[2] as u64, v[3] as u64, v[4] as u64, v[5] as u64],
        flood_socket_errors: v[6] as u64,
        known_rate,
        known_accepted: known.iter().filter(|(s, _)| *s == 202).count(),
        known_refused: refused.into_iter().collect(),
        known_p50_ms: latency::percentile(&ms, 0.5),
        known_p99_ms: latency::percentile(&ms, 0.99),
        known_max_ms: ms.last().copied().unwrap_or(0.0),
        cpu: cpu_use,
    })
}
