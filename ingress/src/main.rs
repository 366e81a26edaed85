//! `sparky-ingress`: the webhook endpoint. All logic lives in `sparky::ingress`.

/// mimalloc instead of glibc malloc: allocation was about a quarter of the ingress's CPU samples
/// (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use sparky::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    sparky::telemetry::init(&config);
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("sparky-ingress: {e:#}");
            eprintln!("sparky-ingress: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let state = sparky::ingress::connect(&config).await?;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", config.port)).await?;
    tracing::info!(addr = %listener.local_addr()?, "sparky-ingress listening");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        sparky::shutdown_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        s.cancel();
    });
    sparky::ingress::serve(state, listener, shutdown).await?;
    Ok(())
}
