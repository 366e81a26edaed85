//! The user API (issue 15): a user's own jobs, positions, trades and dead letters, and
//! self-service replay, behind a per-user API token.
//!
//! # Authentication
//! `Authorization: Bearer sat_...`, a token from `sparky user token create` (only its SHA-256 is
//! stored, as for webhook secrets). The token is separate from the webhook secret, which sits in
//! every TradingView alert body: a leaked alert does not open the API, and revoking a token does not
//! break alerts. `GET /v1/jobs/{job_id}` also takes the webhook secret (`X-Sparky-Secret`), as it
//! always did. A wrong token counts as a failed authentication of its source like a wrong webhook
//! secret ([`super::auth`]); a valid token is always accepted.
//!
//! # Authorization (BOLA)
//! Every query filters on the caller's `user_id` in SQL ([`crate::store::Store::jobs_page`], ...):
//! another user's job is "404 not found", exactly like a job that does not exist, on every route.
//!
//! # Pages
//! Lists are newest first and keyset-paginated: `next_cursor` (opaque) names the last item; pass
//! it as `cursor` for the next page. A page boundary never moves while new jobs arrive (new jobs
//! sort before the first page, never into a later one), so paging never repeats or skips an item.
//! `limit`: 1..=200, default 50. Query parameters are checked: an unknown one, a bad value or a
//! cursor from another route is a 400 naming the parameter; an empty value means "not given".
//!
//! # Isolation
//! The API's reads and token look-ups run on a Postgres pool of their own
//! ([`super::API_DB_CONNECTIONS`] connections): however it is loaded, it never takes a connection
//! from `/readyz` or the webhook's secret look-ups (which have theirs), and the webhook path does
//! not touch Postgres at all.
//!
//! # Replay
//! `POST /v1/jobs/{job_id}/replay` runs [`crate::replay::replay`], the rules of `sparky replay`:
//! only the owner's `rejected`/`dead` jobs, moved back to `queued` by compare-and-set (of two
//! concurrent replays one wins), refused when it would be stale unless `{"allow_stale": true}`.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::openapi::{ErrorBody, InvalidBody, ReplayRefusedBody, RetryBody};
use super::{auth_failed, authenticate, header, ApiError, AppState, Peer};
use crate::domain::{ExchangeKind, FieldError};
use crate::job::{FailureClass, FillState, JobStatus};
use crate::net;
use crate::replay::{self, Decision};
use crate::secrets::hash_api_token;
use crate::store::{JobFilter, JobRow, PositionKey, StoreError, TradeRecord};

/// The routes of the user API.
pub(crate) fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(list_jobs))
        .routes(routes!(get_job))
        .routes(routes!(replay_job))
        .routes(routes!(list_positions))
        .routes(routes!(list_trades))
        .routes(routes!(list_dead_letters))
}

const DEFAULT_LIMIT: i64 = 50;
const MAX_LIMIT: i64 = 200;

// ---- who is calling ----

/// The user whose API token the request carries (`Authorization: Bearer`).
pub(crate) struct Caller(pub Uuid);

/// The user of the request's API token, or (when it has no `Authorization` header) of its
/// webhook secret in `X-Sparky-Secret`: `GET /v1/jobs/{job_id}` takes either.
pub(crate) struct CallerOrSecret(pub Uuid);

fn bearer(headers: &HeaderMap) -> Option<Result<&str, ()>> {
    let v = headers.get(axum::http::header::AUTHORIZATION)?;
    let v = v.to_str().map_err(|_| ()).ok()?;
    let (scheme, token) = v.trim().split_once(' ').unwrap_or((v, ""));
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Some(Err(()));
    }
    Some(Ok(token.trim()))
}

async fn token_owner(st: &AppState, parts: &Parts, token: &str) -> Result<Uuid, ApiError> {
    let owner = st
        .api_store
        .api_token_owner(&hash_api_token(token))
        .await
        .map_err(unavailable)?;
    if let Some(o) = owner {
        return Ok(o);
    }
    let ip = peer_ip(st, parts);
    let origin = st.auth_failures.origin(ip, None);
    let blocked = st.auth_failures.blocked(&origin);
    Err(match auth_failed(st, &origin, blocked).await {
        ApiError::Unauthorized => ApiError::BadToken,
        other => other,
    })
}

fn peer_ip(st: &AppState, parts: &Parts) -> std::net::IpAddr {
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    net::client_ip(peer, &parts.headers, &st.trusted_proxies)
}

impl FromRequestParts<Arc<AppState>> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        match bearer(&parts.headers) {
            Some(Ok(token)) => Ok(Caller(token_owner(st, parts, token).await?)),
            _ => Err(ApiError::BadToken),
        }
    }
}

impl FromRequestParts<Arc<AppState>> for CallerOrSecret {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        match bearer(&parts.headers) {
            Some(Ok(token)) => Ok(CallerOrSecret(token_owner(st, parts, token).await?)),
            Some(Err(())) => Err(ApiError::BadToken),
            // Neither credential: ask for the token (the route's first way in).
            None if header(&parts.headers, "x-sparky-secret").is_none() => Err(ApiError::BadToken),
            None => {
                let Peer(peer) = Peer::from_request_parts(parts, st)
                    .await
                    .unwrap_or(Peer(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)));
                let ip = net::client_ip(peer, &parts.headers, &st.trusted_proxies);
                let origin = st.auth_failures.origin(ip, None);
                let secret = header(&parts.headers, "x-sparky-secret");
                Ok(CallerOrSecret(authenticate(st, &origin, secret).await?))
            }
        }
    }
}

fn unavailable(e: StoreError) -> ApiError {
    tracing::error!(error = %e, "user API: database read failed");
    ApiError::Unavailable("cannot read right now; retry".into())
}

// ---- query parameters ----

type RawQuery = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The query parameters of a route: each known one at most once; empty values are "not given".
struct Params {
    map: HashMap<String, String>,
    errors: Vec<FieldError>,
}

fn invalid(field: &str, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

impl Params {
    fn new(q: RawQuery, allowed: &[&str]) -> Result<Params, ApiError> {
        let Query(pairs) =
            q.map_err(|e| ApiError::BadRequest(vec![invalid("query", e.body_text())]))?;
        let mut map = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let mut errors = vec![];
        for (k, v) in pairs {
            if !allowed.contains(&k.as_str()) {
                errors.push(invalid(
                    &k,
                    format!(
                        "unknown query parameter; expected one of {}",
                        allowed.join(", ")
                    ),
                ));
            } else if !seen.insert(k.clone()) {
                errors.push(invalid(&k, "given more than once"));
            } else if !v.trim().is_empty() {
                map.insert(k, v.trim().to_string());
            }
        }
        Ok(Params { map, errors })
    }

    fn parse<T>(&mut self, k: &str, f: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let v = self.map.get(k)?;
        match f(v) {
            Ok(t) => Some(t),
            Err(e) => {
                self.errors.push(invalid(k, e));
                None
            }
        }
    }

    fn limit(&mut self) -> i64 {
        self.parse("limit", |v| match v.parse::<i64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(format!("must be a whole number from 1 to {MAX_LIMIT}")),
        })
        .unwrap_or(DEFAULT_LIMIT)
    }

    fn cursor<T: DeserializeOwned>(&mut self) -> Option<T> {
        self.parse("cursor", |v| {
            URL_SAFE_NO_PAD
                .decode(v)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .ok_or_else(|| {
                    "not a cursor this route gave out (pass next_cursor as it is)".into()
                })
        })
    }

    fn time(&mut self, k: &str) -> Option<DateTime<Utc>> {
        self.parse(k, |v| {
            DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| "must be an RFC 3339 time, e.g. 2026-12-01T00:00:00Z".into())
        })
    }

    /// The filters every list shares: symbol, exchange, since, until. The symbol is normalised as
    /// an alert's is (a `PREFIX:` stripped, upper-case; `EURUSD` -> `EUR_USD` with `exchange=oanda`).
    fn filter(&mut self) -> JobFilter {
        let exchange = self.parse("exchange", ExchangeKind::from_str);
        let symbol = self.parse("symbol", |v| {
            crate::domain::Symbol::parse(v, exchange.unwrap_or(ExchangeKind::Paper))
                .map(|s| s.as_str().to_string())
        });
        let since = self.time("since");
        let until = self.time("until");
        JobFilter {
            statuses: vec![],
            symbol,
            exchange: exchange.map(|e| e.as_str().to_string()),
            since,
            until,
        }
    }

    fn done(self) -> Result<(), ApiError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ApiError::BadRequest(self.errors))
        }
    }
}

fn encode_cursor<T: Serialize>(key: &T) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(key).expect("a cursor key serialises"))
}

/// Keep `limit` of `rows` (fetched `limit + 1`): the rest says whether there is a next page.
fn page<T, K: Serialize>(
    mut rows: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> K,
) -> (Vec<T>, Option<String>) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next = if more {
        rows.last().map(|r| encode_cursor(&key(r)))
    } else {
        None
    };
    (rows, next)
}

// ---- views ----

/// A job as the lists show it.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub job_id: Uuid,
    pub status: JobStatus,
    pub exchange: String,
    /// `buy`, `sell` or `close`.
    pub action: String,
    pub symbol: String,
    /// Deliveries so far (1 on the first).
    pub attempts: i32,
    pub error_class: Option<FailureClass>,
    /// Why it was skipped, rejected, blocked, dead or left unprotected.
    pub error: Option<String>,
    pub accepted_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<JobRow> for JobView {
    fn from(j: JobRow) -> JobView {
        JobView {
            job_id: j.job_id,
            status: j.status,
            exchange: j.exchange,
            action: j.action,
            symbol: j.symbol,
            attempts: j.attempts,
            error_class: j.error_class,
            error: j.error,
            accepted_at: j.accepted_at,
            started_at: j.started_at,
            finished_at: j.finished_at,
        }
    }
}

/// A page of jobs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobPage {
    pub items: Vec<JobView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Milliseconds a job spent queued and running.
#[derive(Debug, Serialize, ToSchema)]
pub struct Timing {
    pub queued_ms: Option<i64>,
    pub run_ms: Option<i64>,
    pub total_ms: Option<i64>,
}

/// One order leg of a job.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderView {
    pub job_id: Uuid,
    pub user_id: Uuid,
    pub exchange: String,
    pub symbol: String,
    /// `open`, `close`, `sl` or `tp`.
    pub leg: String,
    /// `buy` or `sell`.
    pub side: String,
    pub quantity: Decimal,
    pub price: Option<Decimal>,
    pub client_order_id: String,
    pub exchange_order_id: Option<String>,
    pub status: FillState,
}

/// A job with its orders (`GET /v1/jobs/{job_id}`).
#[derive(Debug, Serialize, ToSchema)]
pub struct JobDetail {
    #[serde(flatten)]
    pub job: JobView,
    pub timing: Timing,
    pub orders: Vec<OrderView>,
    /// The strategy the alert ran under (its defaults filled in at the ingress).
    pub strategy: Option<String>,
    /// Fields of the webhook Sparky does not know (ignored, listed here).
    pub ignored_fields: Vec<String>,
}

/// An open position of one account.
#[derive(Debug, Serialize, ToSchema)]
pub struct PositionView {
    pub exchange: String,
    /// `production` or `sandbox`, where positions are kept per credential environment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    pub symbol: String,
    /// `long` or `short`.
    pub side: String,
    pub quantity: Decimal,
    pub entry_price: Decimal,
    pub stop_loss_price: Option<Decimal>,
    pub take_profit_price: Option<Decimal>,
    pub opened_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// The job that last changed it.
    pub last_job_id: Option<Uuid>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PositionPage {
    pub items: Vec<PositionView>,
    pub next_cursor: Option<String>,
}

/// One order leg (a fill, or an order accepted at the broker).
#[derive(Debug, Serialize, ToSchema)]
pub struct TradeView {
    pub trade_id: i64,
    pub job_id: Uuid,
    pub exchange: String,
    /// `production` or `sandbox`: the account the order went to.
    pub environment: String,
    pub symbol: String,
    /// `open`, `close` (`close2`, `close3`: the remainders of a close), `sl` or `tp`.
    pub leg: String,
    /// `buy` or `sell`.
    pub side: String,
    pub quantity: Decimal,
    pub price: Option<Decimal>,
    /// `filled` or `accepted`.
    pub status: String,
    /// Realized PnL in the account currency, where known (closing legs).
    pub realized_pnl: Option<Decimal>,
    /// Fees in the account currency, where known.
    pub fee: Option<Decimal>,
    /// Why a position was exited: `signal`, `stop_loss`, `take_profit`, `trailing_stop`, ...
    pub exit_reason: Option<String>,
    pub client_order_id: String,
    pub exchange_order_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl From<TradeRecord> for TradeView {
    fn from(t: TradeRecord) -> TradeView {
        TradeView {
            trade_id: t.id,
            job_id: t.job_id,
            exchange: t.exchange,
            environment: t.environment,
            symbol: t.symbol,
            leg: t.leg,
            side: t.side,
            quantity: t.quantity,
            price: t.price,
            status: t.status,
            realized_pnl: t.pnl,
            fee: t.fee,
            exit_reason: t.exit_reason,
            client_order_id: t.client_order_id,
            exchange_order_id: t.exchange_order_id,
            created_at: t.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TradePage {
    pub items: Vec<TradeView>,
    pub next_cursor: Option<String>,
}

/// The answer to an accepted replay.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayAccepted {
    pub job_id: Uuid,
    /// Always `queued`.
    pub status: JobStatus,
    pub detail: String,
}

/// The optional body of a replay.
#[derive(Debug, Default, ToSchema)]
pub struct ReplayRequest {
    /// Run it even if it would be stale (older than `SPARKY_MAX_SIGNAL_AGE_SECS`, or past its own
    /// `timestamp + max_lag_secs`). Default false.
    #[serde(default)]
    pub allow_stale: bool,
}

/// `GET /v1/jobs` filters. All optional; an empty value is "not given".
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct JobsQuery {
    /// Only jobs in these statuses, comma-separated (`queued`, `executing`, `working`, `succeeded`,
    /// `succeeded_unprotected`, `skipped`, `rejected`, `blocked`, `expired`, `dead`).
    status: Option<String>,
    /// Only this symbol (a `PREFIX:` is stripped, case-insensitive), e.g. `ETHUSDT`, `EUR_USD`.
    symbol: Option<String>,
    /// Only this exchange: `aster`, `oanda`, `tradier`, `paper`.
    exchange: Option<String>,
    /// Accepted at or after this time (RFC 3339).
    since: Option<DateTime<Utc>>,
    /// Accepted before this time (RFC 3339).
    until: Option<DateTime<Utc>>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Items per page, 1..=200 (default 50).
    limit: Option<i64>,
}

/// `GET /v1/trades` and `GET /v1/dead-letters` filters. All optional.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct ListQuery {
    /// Only this symbol (a `PREFIX:` is stripped, case-insensitive).
    symbol: Option<String>,
    /// Only this exchange: `aster`, `oanda`, `tradier`, `paper`.
    exchange: Option<String>,
    /// At or after this time (RFC 3339): a trade's time, a dead letter's acceptance.
    since: Option<DateTime<Utc>>,
    /// Before this time (RFC 3339).
    until: Option<DateTime<Utc>>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Items per page, 1..=200 (default 50).
    limit: Option<i64>,
}

/// `GET /v1/positions` paging.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct PageQuery {
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Items per page, 1..=200 (default 50).
    limit: Option<i64>,
}

// ---- handlers ----

/// The replay body: nothing, or a JSON object with an optional boolean `allow_stale`.
fn replay_request(body: &[u8]) -> Result<ReplayRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ReplayRequest::default());
    }
    let bad = |field: &str, m: &str| ApiError::BadRequest(vec![invalid(field, m)]);
    let obj = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => o,
        _ => {
            return Err(bad(
                "body",
                "must be a JSON object, e.g. {\"allow_stale\": true}, or empty",
            ))
        }
    };
    let mut req = ReplayRequest::default();
    for (k, v) in obj {
        match (k.as_str(), v) {
            ("allow_stale", Value::Bool(b)) => req.allow_stale = b,
            ("allow_stale", _) => return Err(bad("allow_stale", "must be true or false")),
            (other, _) => {
                return Err(bad(
                    other,
                    "unknown field; the body takes only `allow_stale` (true or false)",
                ))
            }
        }
    }
    Ok(req)
}

fn parse_statuses(v: &str) -> Result<Vec<JobStatus>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            serde_json::from_value::<JobStatus>(Value::String(s.to_ascii_lowercase()))
                .map_err(|_| format!("unknown status `{s}`"))
        })
        .collect()
}

/// The caller's jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "user API", security(("token" = [])),
    params(JobsQuery),
    responses(
        (status = 200, description = "A page of jobs", body = JobPage),
        (status = 400, description = "A bad query parameter (named in `field`)", body = InvalidBody),
        (status = 401, description = "Missing or invalid API token", body = ErrorBody),
        (status = 429, description = "Too many failed authentications", body = RetryBody),
        (status = 503, description = "The database cannot be read right now", body = ErrorBody),
    ))]
pub(crate) async fn list_jobs(
    State(st): State<Arc<AppState>>,
    Caller(user): Caller,
    q: RawQuery,
) -> Result<Json<JobPage>, ApiError> {
    let mut p = Params::new(
        q,
        &[
            "status", "symbol", "exchange", "since", "until", "cursor", "limit",
        ],
    )?;
    let mut filter = p.filter();
    filter.statuses = p.parse("status", parse_statuses).unwrap_or_default();
    job_page(&st, user, p, &filter).await
}

/// The caller's `rejected` and `dead` jobs (replayable), newest first.
#[utoipa::path(get, path = "/v1/dead-letters", tag = "user API", security(("token" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "A page of failed jobs", body = JobPage),
        (status = 400, description = "A bad query parameter (named in `field`)", body = InvalidBody),
        (status = 401, description = "Missing or invalid API token", body = ErrorBody),
        (status = 429, description = "Too many failed authentications", body = RetryBody),
        (status = 503, description = "The database cannot be read right now", body = ErrorBody),
    ))]
pub(crate) async fn list_dead_letters(
    State(st): State<Arc<AppState>>,
    Caller(user): Caller,
    q: RawQuery,
) -> Result<Json<JobPage>, ApiError> {
    let mut p = Params::new(
        q,
        &["symbol", "exchange", "since", "until", "cursor", "limit"],
    )?;
    let mut filter = p.filter();
    filter.statuses = vec![JobStatus::Rejected, JobStatus::Dead];
    job_page(&st, user, p, &filter).await
}

/// One page of `user`'s jobs matching `filter`, after the cursor and up to the limit that `p`
/// still holds (the rest of `p` must be empty): `/v1/jobs` and `/v1/dead-letters`.
async fn job_page(
    st: &AppState,
    user: Uuid,
    mut p: Params,
    filter: &JobFilter,
) -> Result<Json<JobPage>, ApiError> {
    let limit = p.limit();
    let after: Option<Uuid> = p.cursor();
    p.done()?;
    let rows = st
        .api_store
        .jobs_page(user, filter, after, limit + 1)
        .await
        .map_err(unavailable)?;
    let (rows, next_cursor) = page(rows, limit, |j| j.job_id);
    Ok(Json(JobPage {
        items: rows.into_iter().map(JobView::from).collect(),
        next_cursor,
    }))
}

/// The caller's trades (order legs) with realized PnL, fees and exit reason where known, newest first.
#[utoipa::path(get, path = "/v1/trades", tag = "user API", security(("token" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "A page of trades", body = TradePage),
        (status = 400, description = "A bad query parameter (named in `field`)", body = InvalidBody),
        (status = 401, description = "Missing or invalid API token", body = ErrorBody),
        (status = 429, description = "Too many failed authentications", body = RetryBody),
        (status = 503, description = "The database cannot be read right now", body = ErrorBody),
    ))]
pub(crate) async fn list_trades(
    State(st): State<Arc<AppState>>,
    Caller(user): Caller,
    q: RawQuery,
) -> Result<Json<TradePage>, ApiError> {
    let mut p = Params::new(
        q,
        &["symbol", "exchange", "since", "until", "cursor", "limit"],
    )?;
    let filter = p.filter();
    let limit = p.limit();
    let after: Option<i64> = p.cursor();
    p.done()?;
    let rows = st
        .api_store
        .trades_page(user, &filter, after, limit + 1)
        .await
        .map_err(unavailable)?;
    let (rows, next_cursor) = page(rows, limit, |t| t.id);
    Ok(Json(TradePage {
        items: rows.into_iter().map(TradeView::from).collect(),
        next_cursor,
    }))
}

fn position_view(row: &Value) -> Option<PositionView> {
    let text = |k: &str| row.get(k).and_then(Value::as_str).map(str::to_string);
    let dec = |k: &str| {
        row.get(k)
            .filter(|v| !v.is_null())
            .and_then(|v| Decimal::from_str(v.to_string().trim_matches('"')).ok())
    };
    let time = |k: &str| {
        text(k).and_then(|t| {
            DateTime::parse_from_rfc3339(&t)
                .ok()
                .map(|t| t.with_timezone(&Utc))
        })
    };
    Some(PositionView {
        exchange: text("exchange")?,
        environment: text("environment"),
        symbol: text("symbol")?,
        side: text("side")?,
        quantity: dec("quantity")?,
        entry_price: dec("entry_price")?,
        stop_loss_price: dec("stop_loss_price"),
        take_profit_price: dec("take_profit_price"),
        opened_at: time("opened_at"),
        updated_at: time("updated_at"),
        last_job_id: text("last_job_id").and_then(|j| j.parse().ok()),
    })
}

/// The caller's open positions, one per account (exchange, environment where kept) and symbol.
#[utoipa::path(get, path = "/v1/positions", tag = "user API", security(("token" = [])),
    params(PageQuery),
    responses(
        (status = 200, description = "A page of open positions", body = PositionPage),
        (status = 400, description = "A bad query parameter (named in `field`)", body = InvalidBody),
        (status = 401, description = "Missing or invalid API token", body = ErrorBody),
        (status = 429, description = "Too many failed authentications", body = RetryBody),
        (status = 503, description = "The database cannot be read right now", body = ErrorBody),
    ))]
pub(crate) async fn list_positions(
    State(st): State<Arc<AppState>>,
    Caller(user): Caller,
    q: RawQuery,
) -> Result<Json<PositionPage>, ApiError> {
    let mut p = Params::new(q, &["cursor", "limit"])?;
    let limit = p.limit();
    let after: Option<PositionKey> = p.cursor();
    p.done()?;
    let rows = st
        .api_store
        .positions_page(user, after.as_ref(), limit + 1)
        .await
        .map_err(unavailable)?;
    let (rows, next_cursor) = page(rows, limit, |r| {
        let t = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        (t("exchange"), t("environment"), t("symbol"))
    });
    Ok(Json(PositionPage {
        items: rows.iter().filter_map(position_view).collect(),
        next_cursor,
    }))
}

/// A job's status and orders. Takes the API token, or the webhook secret in `X-Sparky-Secret`.
#[utoipa::path(get, path = "/v1/jobs/{job_id}", tag = "user API",
    security(("token" = []), ("webhook_secret" = [])),
    params(("job_id" = Uuid, Path, description = "The job id the webhook answered")),
    responses(
        (status = 200, description = "The job", body = JobDetail),
        (status = 401, description = "Missing or invalid API token or webhook secret", body = ErrorBody),
        (status = 404, description = "No such job of this user (another user's job answers the same)", body = ErrorBody),
        (status = 429, description = "Too many failed authentications", body = RetryBody),
        (status = 503, description = "The database cannot be read right now", body = ErrorBody),
    ))]
pub(crate) async fn get_job(
    State(st): State<Arc<AppState>>,
    CallerOrSecret(owner): CallerOrSecret,
    Path(job_id): Path<String>,
) -> Result<Json<JobDetail>, ApiError> {
    let job_id = Uuid::parse_str(&job_id).map_err(|_| ApiError::NotFound)?;
    // Not found and not yours look the same.
    let job = st
        .api_store
        .job_of_user(owner, job_id)
        .await
        .map_err(unavailable)?
        .ok_or(ApiError::NotFound)?;
    let trades = st
        .api_store
        .trades_of_job(job_id)
        .await
        .map_err(unavailable)?;
    let ms =
        |from: DateTime<Utc>, to: Option<DateTime<Utc>>| to.map(|t| (t - from).num_milliseconds());
    let timing = Timing {
        queued_ms: ms(job.accepted_at, job.started_at),
        run_ms: job.started_at.and_then(|s| ms(s, job.finished_at)),
        total_ms: ms(job.accepted_at, job.finished_at),
    };
    let orders = trades
        .into_iter()
        .map(|t| OrderView {
            job_id: t.job_id,
            user_id: t.user_id,
            exchange: t.exchange,
            symbol: t.symbol,
            leg: t.leg,
            side: t.side,
            quantity: t.quantity,
            price: t.price,
            client_order_id: t.client_order_id,
            exchange_order_id: t.exchange_order_id,
            status: t.status,
        })
        .collect();
    // The alert as it was executed; one that cannot be read back only leaves these two empty.
    let alert = st
        .api_store
        .job_envelope(job_id)
        .await
        .ok()
        .flatten()
        .map(|(j, _)| j.alert);
    Ok(Json(JobDetail {
        job: job.into(),
        timing,
        orders,
        strategy: alert.as_ref().and_then(|a| a.strategy.clone()),
        ignored_fields: alert.map(|a| a.ignored_fields).unwrap_or_default(),
    }))
}

/// Replay one of the caller's `rejected` or `dead` jobs (the rules of `sparky replay`).
#[utoipa::path(post, path = "/v1/jobs/{job_id}/replay", tag = "user API", security(("token" = [])),
    params(("job_id" = Uuid, Path, description = "The failed job to run again")),
    request_body(content = Option<ReplayRequest>, description = "Optional; `{}` or no body is `allow_stale: false`", content_type = "application/json"),
    responses(
        (status = 202, description = "Re-enqueued on the user's partition; it runs in recovery mode (orders looked up before any is sent)", body = ReplayAccepted),
        (status = 400, description = "A bad body (the field is named)", body = InvalidBody),
        (status = 401, description = "Missing or invalid API token", body = ErrorBody),
        (status = 404, description = "No such job of this user", body = ErrorBody),
        (status = 409, description = "Not replayable: not failed (e.g. succeeded), would be stale, or its alert breaks a bound", body = ReplayRefusedBody),
        (status = 429, description = "Too many failed authentications", body = RetryBody),
        (status = 503, description = "The queue or the database failed; nothing was replayed", body = ErrorBody),
    ))]
pub(crate) async fn replay_job(
    State(st): State<Arc<AppState>>,
    Caller(owner): Caller,
    Path(job_id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let job_id = Uuid::parse_str(&job_id).map_err(|_| ApiError::NotFound)?;
    let body = body.map_err(|r| ApiError::BadRequest(vec![invalid("body", r.body_text())]))?;
    let req = replay_request(&body)?;
    // Ownership first: another user's job is "not found", and nothing about it is touched.
    st.api_store
        .job_of_user(owner, job_id)
        .await
        .map_err(unavailable)?
        .ok_or(ApiError::NotFound)?;
    let opts = replay::Options {
        dry_run: false,
        allow_stale: req.allow_stale,
        max_signal_age: st.max_signal_age,
    };
    let items = replay::replay(&st.api_store, &st.queue, &[job_id], &opts)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, %job_id, "self-service replay failed");
            ApiError::Unavailable("cannot replay right now; nothing was replayed, retry".into())
        })?;
    let Some(item) = items.into_iter().next() else {
        return Err(ApiError::NotFound);
    };
    match item.decision {
        Decision::Replayed => {
            tracing::info!(%job_id, user_id = %owner, "job replayed by its owner through the API");
            Ok((
                StatusCode::ACCEPTED,
                Json(ReplayAccepted {
                    job_id,
                    status: JobStatus::Queued,
                    detail: item.detail,
                }),
            )
                .into_response())
        }
        Decision::NotFound => Err(ApiError::NotFound),
        Decision::Error => Err(ApiError::Unavailable(format!(
            "nothing was replayed: {}",
            item.detail
        ))),
        Decision::NotFailed | Decision::WouldBeStale | Decision::Invalid => {
            let detail = match item.decision {
                Decision::WouldBeStale => item
                    .detail
                    .replace("pass --allow-stale", "send {\"allow_stale\": true}"),
                _ => item.detail,
            };
            Err(ApiError::NotReplayable {
                status: item.status,
                decision: item.decision,
                message: detail,
            })
        }
    }
}
