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
//! [`ingress`], [`worker`], [`lease`], [`replay`], [`metrics`] (Prometheus), [`status`]
//! (`sparky status`), [`telemetry`], [`cli`]. The binaries (`sparky`, `sparky-ingress`, `sparky-worker`) only
//! call into this library, so tests run the real ingress and worker in-process.

pub mod cli;
pub mod config;
pub mod credentials;
pub mod domain;
pub mod exchanges;
pub mod executor;
pub mod ingress;
pub mod lease;
pub mod metrics;
pub mod net;
pub mod queue;
pub mod replay;
pub mod secrets;
pub mod status;
pub mod store;
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
            tracing::error!("{name}: {e:#}");
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
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
