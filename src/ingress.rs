//! The ingress: `POST /webhook` validates, authenticates and enqueues; nothing else.
//!
//! Order of checks for a webhook:
//! 0. the client address ([`crate::net::client_ip`]: the TCP peer, or `X-Forwarded-For` when the peer
//!    is in `SPARKY_TRUSTED_PROXIES`) must be in `SPARKY_IP_ALLOWLIST` when one is set, else 403;
//! 1. body size (64 KiB, 413) and JSON object (400, `field: "body"`);
//! 2. the secret (body `secret` or header `X-Sparky-Secret`): missing or unknown -> 401 (429 once the
//!    source or the (source, claimed `user_id`) pair is blocked). Checked before the fields so an
//!    unauthenticated caller learns nothing about what a valid alert looks like. A secret that
//!    cannot be verified right now (look-up queue full, Postgres down) -> 503, nothing enqueued;
//! 3. every field (400 naming each problem);
//! 4. the body's `user_id` must be the secret's owner, else 401 (and nothing is enqueued);
//! 5. the enqueue script (idempotency + the user's token bucket + `XADD`, one round trip), then `202`;
//!    the same `alert_id` with the same alert -> `200 duplicate`, with a different alert -> `409`
//!    naming the first job; an empty bucket -> 429 with `Retry-After`; Redis unavailable or slow ->
//!    503 saying the alert may have been accepted (retry with the same `alert_id`).
//!
//! Authentication (who owns a secret, failed-authentication limits, the bounded look-up queue) is
//! in [`auth`]: a presented secret is always verified, whatever its source did before.

pub mod api;
pub mod auth;
pub mod openapi;

use std::future::IntoFuture;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{header::RETRY_AFTER, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use chrono::Utc;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Config;
use crate::domain::{self, FieldError, Job};
use crate::metrics::Metrics;
use crate::net::{self, IpNet};
use crate::queue::{Enqueued, Queue, RateLimit};
use crate::store::Store;
use crate::strategy::{StrategyCache, StrategyRef};

pub use auth::{AuthFailures, LookupError, LookupLimits, Origin, SecretCache};

/// Connections of the user API's own pool ([`AppState::api_store`]).
pub const API_DB_CONNECTIONS: u32 = 4;

/// Largest accepted webhook body.
pub const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub queue: Queue,
    pub store: Store,
    /// The user API's reads and token look-ups run on a pool of their own
    /// ([`API_DB_CONNECTIONS`]), so a flood of `/v1` requests (or of bad
    /// tokens) can never take a connection from `/readyz` or anything else.
    pub api_store: Store,
    pub secrets: Arc<SecretCache>,
    /// The users' strategies, cached for `SPARKY_SECRET_CACHE_TTL_SECS` ([`crate::strategy`]).
    pub strategies: Arc<StrategyCache>,
    pub auth_failures: Arc<AuthFailures>,
    pub rate_limit: RateLimit,
    pub trusted_proxies: Arc<Vec<IpNet>>,
    pub ip_allowlist: Option<Arc<Vec<IpNet>>>,
    pub metrics: Metrics,
    /// On shutdown, in-flight requests get this long to finish (`SPARKY_DRAIN_TIMEOUT_SECS`).
    pub drain_timeout: Duration,
    /// `SPARKY_MAX_SIGNAL_AGE_SECS`: a self-service replay of an older job needs `allow_stale`.
    pub max_signal_age: Duration,
}

impl AppState {
    /// The state of one ingress process over already connected `store` and `queue`. Must be called
    /// inside a Tokio runtime (it starts the secret look-up task).
    pub fn new(config: &Config, store: Store, queue: Queue) -> AppState {
        AppState {
            auth_failures: Arc::new(AuthFailures::new(
                config.auth_fail_limit,
                config.auth_fail_window,
                shared_sources(config),
            )),
            metrics: Metrics::new(&queue.keys.ns),
            drain_timeout: config.drain_timeout,
            max_signal_age: config.max_signal_age,
            secrets: Arc::new(SecretCache::new(
                store.sibling(
                    config.secret_lookup_concurrency as u32,
                    config.secret_lookup_wait,
                ),
                config.secret_cache_ttl,
                LookupLimits {
                    concurrency: config.secret_lookup_concurrency,
                    queue: config.secret_lookup_queue,
                    wait: config.secret_lookup_wait,
                },
            )),
            api_store: store.sibling(API_DB_CONNECTIONS, Duration::from_secs(2)),
            // A pool of its own (like the secret look-ups): strategy reads never take a
            // connection from the job API or /readyz.
            strategies: Arc::new(StrategyCache::new(
                store.sibling(
                    config.secret_lookup_concurrency as u32,
                    config.secret_lookup_wait,
                ),
                config.secret_cache_ttl,
            )),
            queue,
            store,
            rate_limit: config.rate_limit,
            trusted_proxies: Arc::new(config.trusted_proxies.clone()),
            ip_allowlist: config.ip_allowlist.clone().map(Arc::new),
        }
    }
}

/// The shared sources: `SPARKY_SHARED_SOURCES` plus `SPARKY_IP_ALLOWLIST` (an allowlisted address
/// is by definition one that carries alerts on purpose).
fn shared_sources(config: &Config) -> Vec<IpNet> {
    let mut v = config.shared_sources.clone();
    v.extend(config.ip_allowlist.iter().flatten().copied());
    v
}

/// An answer other than success. Only what is the caller's to know goes into the body; causes are
/// logged where they happen.
#[derive(Debug)]
pub enum ApiError {
    Invalid(Vec<FieldError>),
    Unauthorized,
    /// The client address is not in `SPARKY_IP_ALLOWLIST`.
    Forbidden,
    /// Too many requests (the user's bucket) or failed authentications (the address): retry after.
    TooMany {
        retry_after: Duration,
        message: &'static str,
    },
    TooLarge,
    NotFound,
    /// The same `alert_id` was first used for a different alert: that job's id.
    Conflict {
        job_id: Uuid,
    },
    /// The webhook could not be checked right now, though nothing is known to be wrong with it;
    /// nothing was enqueued. `503` with `Retry-After`: following it is always safe.
    Busy {
        retry_after: Duration,
        cause: NotNow,
    },
    Unavailable(String),
    /// A user API request without a valid API token (`Authorization: Bearer`).
    BadToken,
    /// A user API request with bad query parameters or body (each field named).
    BadRequest(Vec<FieldError>),
    /// A self-service replay the replay rules refuse (not failed, would be stale, invalid).
    NotReplayable {
        status: Option<crate::job::JobStatus>,
        decision: crate::replay::Decision,
        message: String,
    },
}

/// Why a webhook was answered [`ApiError::Busy`]: a look-up it needs before anything is enqueued
/// did not answer. Every such answer says "nothing was accepted" and carries `Retry-After`, so a
/// sender can tell it from the other `503` ([`UNCONFIRMED`]: the alert may have been accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotNow {
    /// The secret's look-up queue is full, or the look-up took longer than
    /// `SPARKY_SECRET_LOOKUP_WAIT_MS`.
    SecretLookupBusy,
    /// Postgres failed the secret's look-up (down, or its pool timed out).
    SecretLookupFailed,
    /// Postgres failed the look-up of the alert's strategy (down, or its pool timed out).
    StrategyLookupFailed,
}

/// `Retry-After` of a failed look-up: Postgres may be back in a second, and a retry that finds it
/// still down costs one more `503`.
const NOT_NOW_RETRY_AFTER: Duration = Duration::from_secs(1);

impl NotNow {
    /// The `reason` label of `sparky_webhooks_rejected_total`.
    fn reason(self) -> &'static str {
        match self {
            NotNow::SecretLookupBusy => "auth_busy",
            NotNow::SecretLookupFailed => "auth_unavailable",
            NotNow::StrategyLookupFailed => "strategy_unavailable",
        }
    }

    fn message(self) -> &'static str {
        match self {
            NotNow::SecretLookupBusy | NotNow::SecretLookupFailed => {
                "cannot verify the webhook secret right now"
            }
            NotNow::StrategyLookupFailed => "cannot read the alert's strategy right now",
        }
    }
}

impl ApiError {
    /// The `reason` label of `sparky_webhooks_rejected_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Invalid(_) => "invalid",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::TooMany { message, .. } if *message == TOO_MANY_FAILURES => "auth_blocked",
            ApiError::TooMany { .. } => "rate_limited",
            ApiError::TooLarge => "too_large",
            ApiError::NotFound => "not_found",
            ApiError::Conflict { .. } => "conflict",
            ApiError::Busy { cause, .. } => cause.reason(),
            ApiError::Unavailable(_) => "unavailable",
            ApiError::BadToken => "bad_token",
            ApiError::BadRequest(_) => "invalid",
            ApiError::NotReplayable { .. } => "not_replayable",
        }
    }
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
            ApiError::Forbidden => (
                StatusCode::FORBIDDEN,
                Json(json!({"error": "requests from this address are not allowed"})),
            )
                .into_response(),
            ApiError::TooMany {
                retry_after,
                message,
            } => {
                // Whole seconds, rounded up: retrying at the announced time must succeed.
                let secs = retry_after.as_millis().div_ceil(1000).max(1) as u64;
                let mut r = (
                    StatusCode::TOO_MANY_REQUESTS,
                    Json(json!({"error": message, "retry_after_secs": secs})),
                )
                    .into_response();
                r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
                r
            }
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
            ApiError::Conflict { job_id } => (
                StatusCode::CONFLICT,
                Json(json!({
                    "error": format!("alert_id was already used for a different alert (job {job_id}) within the last 24 h; nothing was enqueued. Give every distinct alert its own alert_id"),
                    "job_id": job_id,
                })),
            )
                .into_response(),
            ApiError::Busy { retry_after, cause } => {
                let secs = retry_after.as_millis().div_ceil(1000).max(1) as u64;
                let mut r = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({
                        "error": format!("{}; nothing was accepted, retry after Retry-After seconds", cause.message()),
                        "retry_after_secs": secs,
                    })),
                )
                    .into_response();
                r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
                r
            }
            ApiError::Unavailable(m) => {
                (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": m}))).into_response()
            }
            ApiError::BadToken => {
                let mut r = (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": "missing or invalid API token: send `Authorization: Bearer <token>` with a token from `sparky user token create`"})),
                )
                    .into_response();
                r.headers_mut()
                    .insert("www-authenticate", HeaderValue::from_static("Bearer"));
                r
            }
            ApiError::BadRequest(errs) => {
                let summary = errs
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ");
                (
                    StatusCode::BAD_REQUEST,
                    Json(json!({
                        "error": format!("invalid request: {summary}"),
                        "field": errs.first().map(|e| e.field.clone()),
                        "errors": errs,
                    })),
                )
                    .into_response()
            }
            ApiError::NotReplayable {
                status,
                decision,
                message,
            } => (
                StatusCode::CONFLICT,
                Json(json!({"error": format!("not replayed: {message}"), "status": status, "decision": decision})),
            )
                .into_response(),
        }
    }
}

/// The ingress routes. The state is shared behind an `Arc`: axum clones the state for every request,
/// and cloning `AppState` itself (Redis client, key names, the Lua script source) showed up as
/// allocation in the ingress profile (BENCHMARKS.md). The routes and the OpenAPI document come from
/// one list ([`openapi::routes`]).
pub fn router(state: AppState) -> Router {
    let state = Arc::new(state);
    let (routes, _doc) = openapi::routes().split_for_parts();
    routes
        .fallback(no_such_route)
        .route_layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            track_latency,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// The answer to a path no route serves (told apart from a `404` of a route: `route` is absent).
async fn no_such_route() -> (StatusCode, Json<Value>) {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": "no such route; GET /openapi.json lists every route"})),
    )
}

/// The route template as a static label value (no allocation per request).
fn route_label(path: Option<&MatchedPath>) -> &'static str {
    match path.map(MatchedPath::as_str) {
        Some("/webhook") => "/webhook",
        Some("/v1/jobs") => "/v1/jobs",
        Some("/v1/jobs/{job_id}") => "/v1/jobs/{job_id}",
        Some("/v1/jobs/{job_id}/replay") => "/v1/jobs/{job_id}/replay",
        Some("/v1/positions") => "/v1/positions",
        Some("/v1/trades") => "/v1/trades",
        Some("/v1/dead-letters") => "/v1/dead-letters",
        Some("/openapi.json") => "/openapi.json",
        Some("/healthz") => "/healthz",
        Some("/readyz") => "/readyz",
        Some("/metrics") => "/metrics",
        Some(_) => "other",
        None => "unmatched",
    }
}

/// `sparky_ingress_request_duration_seconds{route, status}` (the route template, never the path).
async fn track_latency(State(metrics): State<Metrics>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = route_label(req.extensions().get::<MatchedPath>());
    let resp = next.run(req).await;
    metrics.ingress_request(route, resp.status().as_u16(), start.elapsed());
    resp
}

/// Connect, run the start-up checks, and build the state.
pub async fn connect(config: &Config) -> anyhow::Result<AppState> {
    let store = Store::connect(&config.database_url, 8).await?;
    store.check_migrated().await?;
    // With SPARKY_REDIS_WAIT_REPLICAS the answer includes the WAIT: leave it its time.
    let timeout =
        Duration::from_millis(1000).max(config.redis_wait_timeout + Duration::from_millis(500));
    let queue = Queue::from_config(config, timeout).await?;
    queue.check_partitions().await?;
    for w in queue.durability_warnings().await {
        tracing::warn!("{w}");
    }
    Ok(AppState::new(config, store, queue))
}

/// Serve on `listener` until `shutdown`. Then the listener is closed at once (connections not yet
/// accepted are refused, their requests never read), idle keep-alive connections are closed, and
/// requests in flight get `state.drain_timeout` to be answered. A request is only ever answered
/// 202 after its `XADD` returned, so a request cut off by the timeout was either never enqueued or
/// enqueued without an answer (the sender retries; an `alert_id` makes the retry a duplicate).
pub async fn serve(
    state: AppState,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let drain = state.drain_timeout;
    let server = axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
    .into_future();
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r,
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(drain).await;
        } => {
            tracing::warn!("in-flight requests did not finish within {drain:?}; stopped waiting for them");
            Ok(())
        }
    }
}

/// The TCP peer's address (from `ConnectInfo`; `0.0.0.0` when the router is served without it, which
/// no allowlist contains, so the allowlist fails closed).
struct Peer(IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip())
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        ))
    }
}

const TOO_MANY_FAILURES: &str =
    "too many failed authentications from this address (for this user_id); retry later";

/// Who owns `secret`. The secret is always verified (cache, then the bounded look-up queue), even
/// when `origin` is blocked: a block only turns the answer to a secret that does not verify into
/// 429, and puts the look-up second in line. `Err` is the answer to give.
async fn authenticate(
    st: &AppState,
    origin: &Origin,
    secret: Option<&str>,
) -> Result<Uuid, ApiError> {
    let blocked = st.auth_failures.blocked(origin);
    let owner = match secret {
        Some(s) => match st.secrets.owner(s, blocked.is_some()).await {
            Ok(o) => o,
            Err(LookupError::Busy(retry_after)) => {
                return Err(ApiError::Busy {
                    retry_after,
                    cause: NotNow::SecretLookupBusy,
                })
            }
            Err(LookupError::Unavailable) => {
                return Err(ApiError::Busy {
                    retry_after: NOT_NOW_RETRY_AFTER,
                    cause: NotNow::SecretLookupFailed,
                })
            }
        },
        None => None,
    };
    match owner {
        Some(o) => Ok(o),
        None => Err(auth_failed(st, origin, blocked).await),
    }
}

/// Count a failed authentication of `origin` and say what to answer: 401, or 429 once its pair or
/// source is over the limit (`already`: how long it was blocked before this failure).
async fn auth_failed(st: &AppState, origin: &Origin, already: Option<Duration>) -> ApiError {
    match st.auth_failures.record(&st.queue, origin).await.or(already) {
        Some(retry_after) => ApiError::TooMany {
            retry_after,
            message: TOO_MANY_FAILURES,
        },
        None => ApiError::Unauthorized,
    }
}

/// The `user_id` a body claims (unverified; only for counting failures per claimed user).
fn claimed_user(obj: &serde_json::Map<String, Value>) -> Option<Uuid> {
    ["user_id", "userId"]
        .iter()
        .find_map(|k| obj.get(*k)?.as_str())
        .and_then(|s| Uuid::parse_str(s.trim()).ok())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Take an alert: validate, authenticate, enqueue.
#[utoipa::path(post, path = "/webhook", tag = "webhook",
    security(("webhook_secret" = []), ()),
    params(("Idempotency-Key" = Option<String>, Header, description = "Same as the body's `alert_id`")),
    request_body(content = openapi::WebhookRequest, description = "JSON (also sent as text/plain by TradingView); at most 64 KiB", content_type = "application/json"),
    responses(
        (status = 202, description = "Durably queued", body = openapi::Queued),
        (status = 200, description = "A repeat of an accepted alert (same `alert_id`, same alert): nothing enqueued", body = openapi::Duplicate),
        (status = 400, description = "Invalid alert: every problem, each naming its field", body = openapi::InvalidBody),
        (status = 401, description = "Missing or wrong webhook secret, or `user_id` not its owner", body = openapi::ErrorBody),
        (status = 403, description = "The client address is not in SPARKY_IP_ALLOWLIST", body = openapi::ErrorBody),
        (status = 409, description = "The `alert_id` was first used for a different alert", body = openapi::ConflictBody),
        (status = 413, description = "Body larger than 64 KiB", body = openapi::InvalidBody),
        (status = 429, description = "The user's rate limit, or too many failed authentications (Retry-After)", body = openapi::RetryBody),
        (status = 503, description = "Cannot read the secret's owner or the alert's strategy right now (nothing was accepted; Retry-After), or cannot confirm the enqueue (the alert may have been accepted; no Retry-After)", body = openapi::ErrorBody),
    ))]
async fn webhook(
    State(st): State<Arc<AppState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let answer = handle_webhook(&st, peer, headers, body).await;
    match &answer {
        Ok(r) if r.status() == StatusCode::ACCEPTED => st.metrics.webhook_accepted("queued"),
        Ok(_) => st.metrics.webhook_accepted("duplicate"),
        Err(e) => st.metrics.webhook_rejected(e.reason()),
    }
    answer
}

/// The 503 answer when the enqueue script failed or timed out.
pub const UNCONFIRMED: &str = "the queue did not confirm the job: the alert may or may not have been accepted. Retry with the same alert_id (or Idempotency-Key): a repeat of an accepted alert answers 200 duplicate and runs once. Without an alert_id a retry may run twice";

async fn handle_webhook(
    st: &AppState,
    peer: IpAddr,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let ip = net::client_ip(peer, &headers, &st.trusted_proxies);
    if let Some(allow) = &st.ip_allowlist {
        if !allow.iter().any(|n| n.contains(ip)) {
            tracing::warn!(client_ip = %ip, "webhook from an address outside SPARKY_IP_ALLOWLIST");
            return Err(ApiError::Forbidden);
        }
    }
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
    let secret = domain::body_secret(&obj).or_else(|| header(&headers, "x-sparky-secret"));
    let origin = st.auth_failures.origin(ip, claimed_user(&obj));
    let owner = authenticate(st, &origin, secret).await?;
    // A key that is not visible ASCII must not be silently dropped: its retries would run twice.
    if headers
        .get("idempotency-key")
        .is_some_and(|v| v.to_str().is_err())
    {
        return Err(ApiError::Invalid(vec![domain::FieldError {
            field: "Idempotency-Key".into(),
            message: "must be visible ASCII text".into(),
        }]));
    }
    let body = resolve_strategy(st, owner, &obj).await?;
    let alert = domain::parse_alert_for(&body, header(&headers, "idempotency-key"), Some(owner))
        .map_err(ApiError::Invalid)?;
    if !bool::from(alert.user_id.as_bytes().ct_eq(owner.as_bytes())) {
        tracing::warn!(claimed_user = %alert.user_id, client_ip = %ip, "webhook secret does not belong to the claimed user_id");
        let origin = Origin {
            claimed: Some(alert.user_id),
            ..origin
        };
        let blocked = st.auth_failures.blocked(&origin);
        return Err(auth_failed(st, &origin, blocked).await);
    }
    let job = Job {
        job_id: Uuid::now_v7(),
        accepted_at: Utc::now(),
        alert,
    };
    match st.queue.enqueue_limited(&job, st.rate_limit).await {
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
        Ok((_, Enqueued::Conflict { job_id })) => {
            tracing::info!(user_id = %job.alert.user_id, first_job = %job_id, "alert_id reused for a different alert");
            Err(ApiError::Conflict { job_id })
        }
        Ok((_, Enqueued::RateLimited { retry_after })) => {
            tracing::info!(user_id = %job.alert.user_id, "webhook rate limit reached");
            Err(ApiError::TooMany {
                retry_after,
                message: "rate limit of this user reached; nothing was accepted, retry after Retry-After seconds",
            })
        }
        Err(e) => {
            // A time-out may come after Redis appended the entry: we cannot say it was not.
            tracing::error!(error = %e, "enqueue failed");
            Err(ApiError::Unavailable(UNCONFIRMED.into()))
        }
    }
}

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is up", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok"
}

/// The webhook body with the original Sparky's names under Sparky's own and the defaults of the
/// alert's strategy filled in ([`crate::strategy`]). A TradingView placeholder left unreplaced is
/// a 400 before anything is looked up (it may be the strategy's name); a strategy that the alert
/// names (by `strategy_id` or `strategy`) and `owner` does not have is a 400 naming it.
async fn resolve_strategy<'a>(
    st: &AppState,
    owner: Uuid,
    obj: &'a serde_json::Map<String, Value>,
) -> Result<std::borrow::Cow<'a, serde_json::Map<String, Value>>, ApiError> {
    let body = domain::canonical_body(obj).map_err(ApiError::Invalid)?;
    let placeholders = domain::unreplaced_placeholders(&body);
    if !placeholders.is_empty() {
        return Err(ApiError::Invalid(placeholders));
    }
    let r = StrategyRef::of(&body);
    let strategy = st.strategies.get(owner, &r).await.map_err(|e| {
        tracing::error!(error = %e, "strategy look-up failed");
        ApiError::Busy {
            retry_after: NOT_NOW_RETRY_AFTER,
            cause: NotNow::StrategyLookupFailed,
        }
    })?;
    match (strategy, &r) {
        (Some(s), _) => Ok(std::borrow::Cow::Owned(s.fill(&body))),
        (None, StrategyRef::Default) => Ok(body),
        (None, StrategyRef::Id(key) | StrategyRef::Name(key)) => {
            let flag = match r {
                StrategyRef::Id(_) => "--strategy-id",
                _ => "--name",
            };
            Err(ApiError::Invalid(vec![FieldError {
                field: r.field().into(),
                message: format!(
                    "this user has no strategy `{key}`; create it with `sparky strategy set --user {owner} {flag} {key} ...` (or leave the field out)"
                ),
            }]))
        }
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics_text() -> impl IntoResponse {
    crate::metrics::handler().await
}

/// Readiness: Redis and Postgres answer.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = openapi::Readiness),
        (status = 503, description = "Redis or Postgres does not answer", body = openapi::Readiness),
    ))]
async fn ready(State(st): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let redis = st.queue.ping().await.is_ok();
    let postgres = st.store.ping().await.is_ok();
    let code = if redis && postgres {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({"redis": redis, "postgres": postgres})))
}
