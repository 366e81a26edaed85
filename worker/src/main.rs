//! `sparky-worker`: consumes the partition streams. All logic lives in `sparky::worker`.

/// mimalloc instead of glibc malloc: allocation was about a quarter of the ingress's CPU samples
/// in the benchmark (BENCHMARKS.md); the worker allocates the same way.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use sparky::config::Config;
use sparky::worker::{RunMode, Worker};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    sparky::service_main("sparky-worker", run).await
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = Worker::connect(config.clone(), shutdown.clone()).await?;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", config.worker_port)).await?;
    tracing::info!(consumer = %worker.consumer, health = %listener.local_addr()?, partitions = config.partitions, "sparky-worker started");
    let health = worker.health_router();
    let hs = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, health)
            .with_graceful_shutdown(async move { hs.cancelled().await })
            .await;
    });
    let s = shutdown.clone();
    tokio::spawn(async move {
        sparky::shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight jobs");
        s.cancel();
    });
    // Notifications: the dispatcher is its own task, on a pool of its own (two connections), so
    // it never takes a connection or a lane from trading. Every worker process runs one; they share
    // the outbox safely (leases, SKIP LOCKED). See `sparky::notify::dispatch`.
    let dispatcher = std::sync::Arc::new(
        sparky::notify::dispatch::Dispatcher::new(
            worker.store.sibling(2, std::time::Duration::from_secs(5)),
            config.master_key.iter().cloned().collect(),
            sparky::notify::dispatch::DispatcherConfig::default(),
        )
        .with_metrics(worker.metrics.clone()),
    );
    let dispatching = tokio::spawn(dispatcher.run(shutdown.clone()));
    let ran = worker.run(RunMode::Forever, config.drain_timeout).await;
    shutdown.cancel();
    let _ = dispatching.await;
    ran?;
    tracing::info!("sparky-worker stopped");
    Ok(())
}
