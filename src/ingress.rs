//! The ingress: `POST /webhook` validates, authenticates and enqueues; nothing else.
//!
//! Order of checks for a webhook:
//! 0. the client address ([`crate::net::client_ip`]: the TCP peer, or `X-Forwarded-For` when the peer
//!    is in `SPARKY_TRUSTED_PROXIES`) must be in `SPARKY_IP_ALLOWLIST` when one is set, else 403;
//! 1. body size (64 KiB, 413) and JSON object (400, `field: "body"`);
//! 2. the secret (body `secret` or header `X-Sparky-Secret`): missing or unknown -> 401. Checked before
//!    the fields so an unauthenticated caller learns nothing about what a valid alert looks like;
//! 3. every field (400 naming each problem);
//! 4. the body's `user_id` must be the secret's owner, else 401 (and nothing is enqueued);
//! 5. the enqueue script (idempotency + the user's token bucket + `XADD`, one round trip), then `202`;
//!    an empty bucket -> 429 with `Retry-After`; Redis unavailable -> 503.
//!
//! Secret look-ups go through an in-process cache ([`SecretCache`], TTL `SPARKY_SECRET_CACHE_TTL_SECS`,
//! at most 60 s) so steady-state requests do not touch Postgres; a rotated or revoked secret stops
//! working within that TTL (each replica caches independently, so the bound holds for all of them).
//! The secret is looked up by its SHA-256, never compared byte by byte (see `secrets`).
//!
//! Failed authentications (2 and 4) are counted per client address in Redis (`{ns}:authfail:{ip}`,
//! a fixed window shared by all replicas, [`AuthFailures`]). An address over the limit gets 429 for
//! every request whose secret is not already known-good in this replica's cache, without a Postgres
//! query: that stops secret guessing and query floods, while alerts of users whose secret is cached
//! keep flowing even when they share the address (TradingView sends every user's alerts from the same
//! four addresses).

use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequestParts, MatchedPath, Path, Request, State,
};
use axum::http::request::Parts;
use axum::http::{header::RETRY_AFTER, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
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
use crate::metrics::Metrics;
use crate::net::{self, IpNet};
use crate::queue::{Enqueued, Queue, RateLimit};
use crate::secrets::hash_webhook_secret;
use crate::store::Store;

/// Largest accepted webhook body.
pub const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub queue: Queue,
    pub store: Store,
    pub secrets: Arc<SecretCache>,
    pub auth_failures: Arc<AuthFailures>,
    pub rate_limit: RateLimit,
    pub trusted_proxies: Arc<Vec<IpNet>>,
    pub ip_allowlist: Option<Arc<Vec<IpNet>>>,
    pub metrics: Metrics,
    /// On shutdown, in-flight requests get this long to finish (`SPARKY_DRAIN_TIMEOUT_SECS`).
    pub drain_timeout: Duration,
}

impl AppState {
    /// The state of one ingress process over already connected `store` and `queue`.
    pub fn new(config: &Config, store: Store, queue: Queue) -> AppState {
        AppState {
            auth_failures: Arc::new(AuthFailures::new(
                config.auth_fail_limit,
                config.auth_fail_window,
            )),
            metrics: Metrics::new(&queue.keys.ns),
            drain_timeout: config.drain_timeout,
            queue,
            store,
            secrets: Arc::new(SecretCache::new(config.secret_cache_ttl)),
            rate_limit: config.rate_limit,
            trusted_proxies: Arc::new(config.trusted_proxies.clone()),
            ip_allowlist: config.ip_allowlist.clone().map(Arc::new),
        }
    }
}

/// Failed authentications per client address: counted in Redis (shared by all replicas, fixed
/// window), with a local note of the addresses found over the limit so that checking costs nothing
/// on the hot path. A replica learns that an address is over the limit on that address's next
/// failure there.
pub struct AuthFailures {
    limit: u32,
    window: Duration,
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    script: redis::Script,
}

// KEYS[1] the address's counter; ARGV[1] window (ms). Returns {count, ms left in the window}.
const AUTH_FAIL_LUA: &str = r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local left = redis.call('PTTL', KEYS[1])
if left < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  left = tonumber(ARGV[1])
end
return {n, left}
"#;

impl AuthFailures {
    pub fn new(limit: u32, window: Duration) -> Self {
        AuthFailures {
            limit,
            window,
            blocked: Mutex::new(HashMap::new()),
            script: redis::Script::new(AUTH_FAIL_LUA),
        }
    }

    /// How long `ip` stays over the limit, if it is.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        if self.limit == 0 {
            return None;
        }
        let until = *self.blocked.lock().expect("blocked lock").get(&ip)?;
        until.checked_duration_since(Instant::now())
    }

    /// Count a failure of `ip`; returns how long it is blocked when this failure put it over the
    /// limit. A Redis error is logged and the failure not counted (the request is refused anyway).
    pub async fn record(&self, queue: &Queue, ip: IpAddr) -> Option<Duration> {
        if self.limit == 0 {
            return None;
        }
        let key = format!("{}:authfail:{ip}", queue.keys.ns);
        let res: Result<(u64, u64), _> = self
            .script
            .key(key)
            .arg(self.window.as_millis() as u64)
            .invoke_async(&mut queue.conn())
            .await;
        let (count, left_ms) = match res {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "could not count a failed authentication");
                return None;
            }
        };
        if count <= u64::from(self.limit) {
            return None;
        }
        let left = Duration::from_millis(left_ms.max(1));
        let mut map = self.blocked.lock().expect("blocked lock");
        if map.len() > 10_000 {
            let now = Instant::now();
            map.retain(|_, until| *until > now);
        }
        map.insert(ip, Instant::now() + left);
        tracing::warn!(client_ip = %ip, failures = count, "too many failed authentications from this address");
        Some(left)
    }
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

    /// The owner of `secret` if this cache holds it as valid and fresh (no Postgres query).
    pub fn cached_owner(&self, secret: &str) -> Option<Uuid> {
        let hash = hash_webhook_secret(secret);
        let (owner, at) = self.map.lock().expect("cache lock").get(&hash).copied()?;
        owner.filter(|_| at.elapsed() < self.ttl)
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
    /// The client address is not in `SPARKY_IP_ALLOWLIST`.
    Forbidden,
    /// Too many requests (the user's bucket) or failed authentications (the address): retry after.
    TooMany {
        retry_after: Duration,
        message: &'static str,
    },
    TooLarge,
    NotFound,
    Unavailable(String),
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
            ApiError::Unavailable(_) => "unavailable",
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
            ApiError::Unavailable(m) => {
                (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": m}))).into_response()
            }
        }
    }
}

/// The ingress routes. The state is shared behind an `Arc`: axum clones the state for every request,
/// and cloning `AppState` itself (Redis client, key names, the Lua script source) showed up as
/// allocation in the ingress profile (BENCHMARKS.md).
pub fn router(state: AppState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route("/webhook", post(webhook))
        .route("/v1/jobs/{job_id}", get(get_job))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(crate::metrics::handler))
        .route_layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            track_latency,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// The route template as a static label value (no allocation per request).
fn route_label(path: Option<&MatchedPath>) -> &'static str {
    match path.map(MatchedPath::as_str) {
        Some("/webhook") => "/webhook",
        Some("/v1/jobs/{job_id}") => "/v1/jobs/{job_id}",
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
    let queue = Queue::connect(
        &config.redis_url,
        &config.namespace,
        config.partitions,
        Duration::from_millis(1000),
    )
    .await?;
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

const TOO_MANY_FAILURES: &str = "too many failed authentications from this address; retry later";

/// Who owns `secret`, with the per-address failed-authentication limit applied: an address over the
/// limit is only served from the cache of known-good secrets. `Err` is the answer to give.
async fn authenticate(st: &AppState, ip: IpAddr, secret: Option<&str>) -> Result<Uuid, ApiError> {
    if let Some(retry_after) = st.auth_failures.blocked(ip) {
        return secret
            .and_then(|s| st.secrets.cached_owner(s))
            .ok_or(ApiError::TooMany {
                retry_after,
                message: TOO_MANY_FAILURES,
            });
    }
    let owner = match secret {
        Some(s) => st.secrets.owner(&st.store, s).await?,
        None => None,
    };
    match owner {
        Some(o) => Ok(o),
        None => Err(auth_failed(st, ip).await),
    }
}

/// Count a failed authentication of `ip` and say what to answer (401, or 429 once over the limit).
async fn auth_failed(st: &AppState, ip: IpAddr) -> ApiError {
    match st.auth_failures.record(&st.queue, ip).await {
        Some(retry_after) => ApiError::TooMany {
            retry_after,
            message: TOO_MANY_FAILURES,
        },
        None => ApiError::Unauthorized,
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

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
    let owner = authenticate(st, ip, secret).await?;
    let alert = domain::parse_alert(&obj, header(&headers, "idempotency-key"))
        .map_err(ApiError::Invalid)?;
    if !bool::from(alert.user_id.as_bytes().ct_eq(owner.as_bytes())) {
        tracing::warn!(claimed_user = %alert.user_id, client_ip = %ip, "webhook secret does not belong to the claimed user_id");
        return Err(auth_failed(st, ip).await);
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
        Ok((_, Enqueued::RateLimited { retry_after })) => {
            tracing::info!(user_id = %job.alert.user_id, "webhook rate limit reached");
            Err(ApiError::TooMany {
                retry_after,
                message: "rate limit of this user reached; nothing was accepted, retry after Retry-After seconds",
            })
        }
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
    State(st): State<Arc<AppState>>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Path(job_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let ip = net::client_ip(peer, &headers, &st.trusted_proxies);
    let owner = authenticate(&st, ip, header(&headers, "x-sparky-secret")).await?;
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
    let ms = |from: chrono::DateTime<Utc>, to: Option<chrono::DateTime<Utc>>| {
        to.map(|t| (t - from).num_milliseconds())
    };
    let timing = json!({
        "queued_ms": ms(job.accepted_at, job.started_at),
        "run_ms": job.started_at.and_then(|s| ms(s, job.finished_at)),
        "total_ms": ms(job.accepted_at, job.finished_at),
    });
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
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "timing": timing,
        "orders": trades,
    })))
}

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
