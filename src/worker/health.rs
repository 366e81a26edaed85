//! `/healthz`, `/readyz` and `/metrics` of a worker (served on `WORKER_PORT`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::Worker;

impl Worker {
    pub fn health_router(&self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(worker_ready))
            .route("/metrics", get(crate::metrics::handler))
            .with_state(self.clone())
    }
}

/// Ready when Redis and Postgres answer and the worker consumes its whole share of partitions.
async fn worker_ready(State(w): State<Worker>) -> (StatusCode, Json<serde_json::Value>) {
    let redis = w.queue.ping().await.is_ok();
    let postgres = w.store.ping().await.is_ok();
    let (owned, assigned) = w.table.counts();
    let code = if redis && postgres && assigned.is_some_and(|a| owned >= a) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(
            json!({"redis": redis, "postgres": postgres, "partitions_owned": owned, "partitions_assigned": assigned}),
        ),
    )
}
