//! Where the CPU went during a measurement: `/proc` snapshots before and after, CPU time grouped by
//! process (the Sparky processes the bench started, the bench itself, Postgres, Redis, the load
//! generator, everything else). On a 2-core machine this says what a number is limited by.

use std::collections::BTreeMap;
use std::time::Instant;

/// Clock ticks per second of `/proc` CPU times (`getconf CLK_TCK`; 100 on Linux x86_64/arm64).
const TICKS: f64 = 100.0;

pub struct Snapshot {
    at: Instant,
    /// Busy and total ticks of the whole machine (`/proc/stat`).
    busy: u64,
    groups: BTreeMap<&'static str, u64>,
}

/// Cores used per group over a window.
#[derive(Clone, Debug, Default)]
pub struct CpuUse {
    /// Cores the whole machine was busy (at most the number of cores).
    pub busy: f64,
    pub groups: Vec<(&'static str, f64)>,
}

impl CpuUse {
    /// The average of equally long windows.
    pub fn mean(windows: &[CpuUse]) -> CpuUse {
        let n = windows.len().max(1) as f64;
        let mut groups: Vec<(&'static str, f64)> = vec![];
        for w in windows {
            for (g, v) in &w.groups {
                match groups.iter_mut().find(|(x, _)| x == g) {
                    Some((_, t)) => *t += v / n,
                    None => groups.push((g, v / n)),
                }
            }
        }
        CpuUse {
            busy: windows.iter().map(|w| w.busy).sum::<f64>() / n,
            groups,
        }
    }
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "busy {:.2} cores:", self.busy)?;
        for (g, v) in &self.groups {
            if *v >= 0.005 {
                write!(f, " {g} {v:.2}")?;
            }
        }
        Ok(())
    }
}

/// Processes are grouped by these rules; `sparky` are the pids passed in. `other` is everything
/// else on the machine (other people's builds and tests); the time of processes that exited during
/// the window, and kernel work not charged to a process, are only in `busy`.
fn group(pid: u32, comm: &str, sparky: &[u32]) -> &'static str {
    if sparky.contains(&pid) {
        "sparky"
    } else if pid == std::process::id() {
        "bench"
    } else if comm == "postgres" {
        // Shared server processes (WAL writer, checkpointer, ...) and the backends of the bench's
        // own databases; backends serving other databases (other test runs) are someone else's.
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let client = cmd.contains("127.0.0.1(") || cmd.contains("::1(") || cmd.contains("[local]");
        if !client || cmd.contains(" sparky_bench_") {
            "postgres"
        } else {
            "other"
        }
    } else if comm.starts_with("redis-server") {
        "redis"
    } else if comm == "wrk" {
        "wrk"
    } else {
        "other"
    }
}

pub fn snapshot(sparky: &[u32]) -> Snapshot {
    let busy = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.to_string();
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal
            Some(v.iter().take(8).sum::<u64>() - v.get(3)? - v.get(4)?)
        })
        .unwrap_or(0);
    let mut groups: BTreeMap<&'static str, u64> = BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = &stat[open + 1..close];
            let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            // rest[0] is field 3 (state); utime and stime are fields 14 and 15.
            let ticks = rest
                .get(11)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                + rest
                    .get(12)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            *groups.entry(group(pid, comm, sparky)).or_default() += ticks;
        }
    }
    Snapshot {
        at: Instant::now(),
        busy,
        groups,
    }
}

/// CPU use between two snapshots. Processes that exited in between are not in `after`; their time
/// shows up only in `busy` (so `busy` minus the groups is "exited or unaccounted").
pub fn between(before: &Snapshot, after: &Snapshot) -> CpuUse {
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let cores = |t: u64| t as f64 / TICKS / secs;
    let groups = after
        .groups
        .iter()
        .map(|(g, t)| {
            let b = before.groups.get(g).copied().unwrap_or(0);
            (*g, cores(t.saturating_sub(b)))
        })
        .collect();
    CpuUse {
        busy: cores(after.busy.saturating_sub(before.busy)),
        groups,
    }
}
