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
