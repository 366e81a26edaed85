//! Sparky: executes TradingView-style trading alerts for many users on their own broker accounts.
//!
//! ```text
//! POST /webhook -> ingress (validate, authenticate, XADD) -> Redis Stream partition (by user)
//!   -> worker (per-user lanes) -> credentials (Redis cache -> Postgres) -> exchange client
//!   -> executor (size, place) -> Postgres commit (job, trades, position) -> XACK
//! ```
//!
//! Modules are named for what they own: [`config`], [`domain`] (typed webhook values and the parser),
//! [`queue`] (Redis Streams), [`store`] (Postgres), [`credentials`], [`exchanges`], [`executor`],
//! [`ingress`] (and its user API), [`notify`] (notifications), [`worker`], [`partition`], [`replay`], [`metrics`] (Prometheus), [`status`]
//! (`sparky status`), [`telemetry`], [`cli`]. The binaries (`sparky`, `sparky-ingress`, `sparky-worker`) only
//! call into this library, so tests run the real ingress and worker in-process.

pub mod cli;
pub mod config;
pub mod credentials;
pub mod domain;
pub mod exchanges;
pub mod executor;
pub mod ingress;
pub mod job;
pub mod metrics;
pub mod money;
pub mod net;
pub mod notify;
pub mod partition;
pub mod queue;
pub mod reconcile;
pub mod redis_conn;
pub mod replay;
pub mod retry;
pub mod risk;
pub mod secrets;
pub mod sizing;
pub mod status;
pub mod store;
pub mod strategy;
pub mod telemetry;
pub mod worker;

/// The `main` of a service binary: read the configuration (a bad value: its one-line message and
/// exit code 2), set up logging, run `run`, and turn its error into a logged line and exit code 1.
pub async fn service_main<F, Fut>(name: &str, run: F) -> std::process::ExitCode
where
    F: FnOnce(config::Config) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let config = match config::Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    telemetry::init(&config);
    match run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let why = error_chain(e.as_ref());
            tracing::error!("{name}: {why}");
            eprintln!("{name}: {why}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, leaving out a cause whose text its parent already shows
/// (our error types print their source inline, and so do some of sqlx's).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Resolve when the process gets SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_names_each_cause_once() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(super::error_chain(&e), "outer: disk on fire");
        let wrapped = anyhow::Error::new(e).context("starting");
        assert_eq!(
            super::error_chain(wrapped.as_ref()),
            "starting: outer: disk on fire"
        );
    }
}
