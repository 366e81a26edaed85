//! `--perf`: a flat CPU profile of one process during a measurement (`perf record` of the pid, then
//! the symbols with the most samples). Optional: when `perf` is missing or not permitted the report
//! says so and the numbers are unaffected.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::setup::Ctx;

pub struct Recording {
    child: Child,
    out: PathBuf,
}

/// Start sampling `pid` for `secs` seconds (cpu-clock, 499 Hz: a few percent of one core).
pub fn start(ctx: &Ctx, name: &str, pid: u32, secs: u64) -> Option<Recording> {
    let out = ctx.tmp.join(format!("perf-{name}.data"));
    let child = Command::new("perf")
        .args(["record", "-F", "499", "-p", &pid.to_string(), "-o"])
        .arg(&out)
        .args(["--", "sleep", &secs.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    Some(Recording { child, out })
}

/// Wait for the recording and return its top `n` symbols ("12.3% symbol"), or why there are none.
pub async fn finish(rec: Option<Recording>, n: usize) -> String {
    let Some(mut rec) = rec else {
        return "perf is not available".into();
    };
    if tokio::time::timeout(Duration::from_secs(60), rec.child.wait())
        .await
        .is_err()
    {
        return "perf did not finish".into();
    }
    let out = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "dso,symbol",
            "-i",
        ])
        .arg(&rec.out)
        .stderr(Stdio::null())
        .output()
        .await;
    let Ok(out) = out else {
        return "perf report failed".into();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    summarize(&text, n)
}

/// Samples grouped by where they were spent (allocator, kernel, each crate of the binary), then
/// the `n` hottest symbols of the binary itself.
fn summarize(report: &str, n: usize) -> String {
    let mut groups: Vec<(String, f64)> = vec![];
    let mut own: Vec<(f64, String)> = vec![];
    for line in report.lines().filter(|l| !l.starts_with('#')) {
        // "  12.34%  sparky-ingress  [.] symbol"
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (Some(pct), Some(dso)) = (parts.first(), parts.get(1)) else {
            continue;
        };
        let Ok(pct) = pct.trim_end_matches('%').parse::<f64>() else {
            continue;
        };
        // (perf may add `-` columns after the symbol.)
        let sym = parts
            .get(3..)
            .unwrap_or_default()
            .iter()
            .filter(|p| **p != "-")
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        let group = if dso.contains("kernel") {
            "kernel (syscalls, network, scheduler)".to_string()
        } else if dso.starts_with("libc") {
            if [
                "malloc",
                "free",
                "_int_",
                "realloc",
                "unlink_chunk",
                "calloc",
            ]
            .iter()
            .any(|m| sym.contains(m))
            {
                "malloc/free (glibc)".to_string()
            } else {
                "libc other (memcpy, ...)".to_string()
            }
        } else if dso.starts_with("sparky") {
            own.push((pct, sym.clone()));
            let krate = sym
                .trim_start_matches('<')
                .split("::")
                .next()
                .unwrap_or("?")
                .trim_start_matches('&')
                .to_string();
            match krate.as_str() {
                "core" | "alloc" | "std" => "std".to_string(),
                _ => krate,
            }
        } else {
            dso.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        };
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, v)) => *v += pct,
            None => groups.push((group, pct)),
        }
    }
    if groups.is_empty() {
        return "perf recorded no samples".into();
    }
    groups.sort_by(|a, b| b.1.total_cmp(&a.1));
    let by_group: Vec<String> = groups
        .iter()
        .filter(|(_, v)| *v >= 1.0)
        .map(|(g, v)| format!("{g} {v:.0}%"))
        .collect();
    let hot: Vec<String> = own
        .iter()
        .take(n)
        .map(|(p, s)| {
            let s: String = s.chars().take(90).collect();
            format!("{p:.1}% `{s}`")
        })
        .collect();
    format!(
        "by where: {}. Hottest own symbols: {}",
        by_group.join(", "),
        hot.join("; ")
    )
}
