//! `sparky-ingress`: the webhook endpoint. All logic lives in `sparky::ingress`.

/// mimalloc instead of glibc malloc: allocation was about a quarter of this binary's CPU samples in
/// the benchmark (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use sparky::config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    sparky::service_main("sparky-ingress", run).await
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
