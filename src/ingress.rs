//! The ingress: `POST /webhook` validates, authenticates and enqueues; nothing else.
//!
//! Order of checks for a webhook:
//! 1. body size (64 KiB, 413) and JSON object (400, `field: "body"`);
//! 2. the secret (body `secret` or header `X-Sparky-Secret`): missing or unknown -> 401. Checked before
//!    the fields so an unauthenticated caller learns nothing about what a valid alert looks like;
//! 3. every field (400 naming each problem);
//! 4. the body's `user_id` must be the secret's owner, else 401 (and nothing is enqueued);
//! 5. the enqueue script (idempotency + `XADD`), then `202`; Redis unavailable -> 503.
//!
//! Secret look-ups go through an in-process cache ([`SecretCache`], TTL `SPARKY_SECRET_CACHE_TTL_SECS`)
//! so steady-state requests do not touch Postgres; a rotated or revoked secret stops working within
//! that TTL.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::domain::{self, FieldError, Job};
use crate::queue::{Enqueued, Queue};
use crate::secrets::hash_webhook_secret;
use crate::store::Store;

/// Largest accepted webhook body.
pub const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub queue: Queue,
    pub store: Store,
    pub secrets: Arc<SecretCache>,
}

/// Webhook secret hash -> owner, cached for a short TTL (unknown secrets too, for less time, so a
/// flood of wrong secrets does not become a flood of queries).
pub struct SecretCache {
    ttl: Duration,
    negative_ttl: Duration,
    map: Mutex<HashMap<String, (Option<Uuid>, Instant)>>,
}

impl SecretCache {
    pub fn new(ttl: Duration) -> Self {
        SecretCache {
            ttl,
            negative_ttl: ttl.min(Duration::from_secs(5)),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The owner of `secret`, or `None` if it is not a valid secret.
    pub async fn owner(&self, store: &Store, secret: &str) -> Result<Option<Uuid>, ApiError> {
        let hash = hash_webhook_secret(secret);
        if let Some((owner, at)) = self.map.lock().expect("cache lock").get(&hash).copied() {
            let ttl = if owner.is_some() {
                self.ttl
            } else {
                self.negative_ttl
            };
            if at.elapsed() < ttl {
                return Ok(owner);
            }
        }
        let owner = store.secret_owner(&hash).await.map_err(|e| {
            tracing::error!(error = %e, "secret look-up failed");
            ApiError::Unavailable("cannot authenticate right now; try again".into())
        })?;
        let mut map = self.map.lock().expect("cache lock");
        if map.len() > 100_000 {
            map.clear();
        }
        map.insert(hash, (owner, Instant::now()));
        Ok(owner)
    }
}

/// An answer other than success. Only what is the caller's to know goes into the body; causes are
/// logged where they happen.
#[derive(Debug)]
pub enum ApiError {
    Invalid(Vec<FieldError>),
    Unauthorized,
    TooLarge,
    NotFound,
    Unavailable(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Invalid(errs) => {
                let summary = errs
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ");
                (
                    StatusCode::BAD_REQUEST,
                    Json(json!({
                        "error": format!("invalid webhook: {summary}"),
                        "field": errs.first().map(|e| e.field.clone()),
                        "errors": errs,
                    })),
                )
                    .into_response()
            }
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "missing or invalid webhook secret for this user_id"})),
            )
                .into_response(),
            ApiError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                Json(
                    json!({"error": format!("body larger than {MAX_BODY} bytes"), "field": "body"}),
                ),
            )
                .into_response(),
            ApiError::NotFound => {
                (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))).into_response()
            }
            ApiError::Unavailable(m) => {
                (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": m}))).into_response()
            }
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/webhook", post(webhook))
        .route("/v1/jobs/{job_id}", get(get_job))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// Connect, run the start-up checks, and build the state.
pub async fn connect(config: &Config) -> anyhow::Result<AppState> {
    let store = Store::connect(&config.database_url, 8).await?;
    store.check_migrated().await?;
    let queue = Queue::connect(
        &config.redis_url,
        &config.namespace,
        config.partitions,
        Duration::from_millis(1000),
    )
    .await?;
    queue.check_partitions().await?;
    Ok(AppState {
        queue,
        store,
        secrets: Arc::new(SecretCache::new(config.secret_cache_ttl)),
    })
}

/// Serve on `listener` until `shutdown`; in-flight requests are drained.
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

async fn webhook(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = match body {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(ApiError::TooLarge),
        Err(r) => {
            return Err(ApiError::Invalid(vec![FieldError {
                field: "body".into(),
                message: r.body_text(),
            }]))
        }
    };
    let obj = domain::parse_body(&body).map_err(|e| ApiError::Invalid(vec![e]))?;
    let secret = domain::body_secret(&obj)
        .or_else(|| header(&headers, "x-sparky-secret"))
        .ok_or(ApiError::Unauthorized)?;
    let owner = st
        .secrets
        .owner(&st.store, secret)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    let alert = domain::parse_alert(&obj, header(&headers, "idempotency-key"))
        .map_err(ApiError::Invalid)?;
    if !bool::from(alert.user_id.as_bytes().ct_eq(owner.as_bytes())) {
        tracing::warn!(claimed_user = %alert.user_id, "webhook secret does not belong to the claimed user_id");
        return Err(ApiError::Unauthorized);
    }
    let job = Job {
        job_id: Uuid::now_v7(),
        accepted_at: Utc::now(),
        alert,
    };
    match st.queue.enqueue(&job).await {
        Ok((partition, Enqueued::Queued { .. })) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"job_id": job.job_id, "status": "queued", "partition": partition})),
        )
            .into_response()),
        Ok((_, Enqueued::Duplicate { job_id })) => Ok((
            StatusCode::OK,
            Json(json!({"job_id": job_id, "status": "duplicate"})),
        )
            .into_response()),
        Err(e) => {
            tracing::error!(error = %e, "enqueue failed");
            Err(ApiError::Unavailable(
                "the queue cannot take the job right now; nothing was accepted, retry".into(),
            ))
        }
    }
}

/// `GET /v1/jobs/{job_id}`: the job's status and orders, for the owner's secret only.
async fn get_job(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(job_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let secret = header(&headers, "x-sparky-secret").ok_or(ApiError::Unauthorized)?;
    let owner = st
        .secrets
        .owner(&st.store, secret)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    let job_id = Uuid::parse_str(&job_id).map_err(|_| ApiError::NotFound)?;
    let unavailable = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "job look-up failed");
        ApiError::Unavailable("cannot read jobs right now".into())
    };
    // Not found and not yours look the same.
    let job = st
        .store
        .get_job(job_id)
        .await
        .map_err(unavailable)?
        .filter(|j| j.user_id == owner)
        .ok_or(ApiError::NotFound)?;
    let trades = st.store.trades_of_job(job_id).await.map_err(unavailable)?;
    Ok(Json(json!({
        "job_id": job.job_id,
        "status": job.status,
        "attempts": job.attempts,
        "error_class": job.error_class,
        "error": job.error,
        "exchange": job.exchange,
        "action": job.action,
        "symbol": job.symbol,
        "accepted_at": job.accepted_at,
        "finished_at": job.finished_at,
        "orders": trades,
    })))
}

async fn ready(State(st): State<AppState>) -> (StatusCode, Json<Value>) {
    let redis = st.queue.ping().await.is_ok();
    let postgres = st.store.ping().await.is_ok();
    let code = if redis && postgres {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({"redis": redis, "postgres": postgres})))
}
