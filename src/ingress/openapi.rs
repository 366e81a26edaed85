//! The OpenAPI 3.1 document (`GET /openapi.json`), generated from the code with `utoipa`.
//!
//! Every route the ingress serves is registered here through `utoipa_axum`'s `routes!`, which takes
//! the handler's `#[utoipa::path]` description and the handler itself together: the served router
//! and the document come from the same list ([`routes`] -> `split_for_parts`), so a route cannot be
//! served without being documented. The error shapes are the schemas below; every answer of every
//! route names one.

use std::sync::{Arc, OnceLock};

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use super::AppState;
use crate::job::JobStatus;
use crate::notify::EventKind;
use crate::replay::Decision;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sparky",
        description = "Executes TradingView-style trading alerts on users' own broker accounts. `POST /webhook` takes alerts (authenticated by the webhook secret); the `/v1` user API (authenticated by an API token from `sparky user token create`) shows a user's jobs, positions, trades and dead letters and replays failed jobs. Notification events (`EventKind`) are delivered to the user's channels; a generic webhook channel receives the event envelope signed per the Standard Webhooks spec.",
        license(name = "MIT", identifier = "MIT"),
    ),
    modifiers(&Security),
    components(schemas(EventKind, NotificationEvent, Decision)),
    tags(
        (name = "webhook", description = "Alerts in"),
        (name = "user API", description = "A user's own trading, behind `Authorization: Bearer <API token>`"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (`sat_...`) from `sparky user token create`",
                    ))
                    .build(),
            ),
        );
        c.add_security_scheme(
            "webhook_secret",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Sparky-Secret",
                "The user's webhook secret (`sk_...`); in a webhook it may be the body's `secret` instead",
            ))),
        );
    }
}

/// Every route of the ingress, with its description.
pub(crate) fn routes() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(super::webhook))
        .routes(routes!(super::healthz))
        .routes(routes!(super::ready))
        .routes(routes!(super::metrics_text))
        .routes(routes!(openapi_json))
        .merge(super::api::routes())
}

/// The document (built once).
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: OnceLock<utoipa::openapi::OpenApi> = OnceLock::new();
    DOC.get_or_init(|| routes().split_for_parts().1)
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document of this service", content_type = "application/json")))]
pub(crate) async fn openapi_json() -> impl IntoResponse {
    static JSON: OnceLock<String> = OnceLock::new();
    let body = JSON.get_or_init(|| document().to_json().expect("the document serialises"));
    ([(CONTENT_TYPE, "application/json")], body.as_str())
}

// ---- schemas of the answers (documentation only: the handlers build these shapes) ----

/// A webhook (TradingView alert). Unknown fields are ignored; numbers may be JSON numbers or
/// numeric strings. See the README for every field and alias.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct WebhookRequest {
    /// The user's webhook secret (or header `X-Sparky-Secret`).
    secret: Option<String>,
    /// Optional: the secret decides the user; if present it must be the secret's owner.
    user_id: Option<Uuid>,
    /// `aster`, `oanda`, `tradier`, `paper` (case-insensitive).
    exchange: String,
    /// `buy`, `sell`, `close` (aliases `long`, `short`, `exit`, `flat`).
    action: String,
    /// e.g. `BINANCE:ETHUSDT` (a `PREFIX:` is stripped), `EUR_USD`, `AAPL`.
    symbol: String,
    /// `market` (default) or `limit`.
    order_type: Option<String>,
    /// Required for `limit`; decimal > 0.
    #[schema(value_type = Option<String>)]
    price: Option<String>,
    /// Decimal > 0; the size of a buy/sell.
    #[schema(value_type = Option<String>)]
    position_size_usd: Option<String>,
    /// 0 < x < 100.
    #[schema(value_type = Option<String>)]
    stop_loss_percent: Option<String>,
    /// 0 < x < 100.
    #[schema(value_type = Option<String>)]
    take_profit_percent: Option<String>,
    /// On `close`: the share of the position to close, 0 < x <= 100.
    #[schema(value_type = Option<String>)]
    close_percent: Option<String>,
    strategy_id: Option<String>,
    strategy: Option<String>,
    /// Idempotency key (or header `Idempotency-Key`): the same key within 24 h runs once.
    alert_id: Option<String>,
    /// The alert's time (RFC 3339 or unix ms); with `max_lag_secs` bounds how stale it may run.
    timestamp: Option<String>,
    max_lag_secs: Option<u64>,
    /// `production` or `sandbox`: which credential row to use.
    environment: Option<String>,
}

/// `202`: the alert is durably queued.
#[derive(Serialize, ToSchema)]
pub struct Queued {
    pub job_id: Uuid,
    /// `queued`
    pub status: String,
    pub partition: u32,
}

/// `200`: the same `alert_id` was seen within 24 h for the same alert; nothing was enqueued.
#[derive(Serialize, ToSchema)]
pub struct Duplicate {
    pub job_id: Uuid,
    /// `duplicate`
    pub status: String,
}

/// An error: what went wrong, in words.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// One invalid field.
#[derive(Serialize, ToSchema)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

/// `400`: every problem, each naming its field (`field` is the first).
#[derive(Serialize, ToSchema)]
pub struct InvalidBody {
    pub error: String,
    pub field: Option<String>,
    pub errors: Vec<FieldProblem>,
}

/// `429` / `503` with `Retry-After`.
#[derive(Serialize, ToSchema)]
pub struct RetryBody {
    pub error: String,
    pub retry_after_secs: u64,
}

/// `409` to a webhook: the `alert_id` was first used for a different alert.
#[derive(Serialize, ToSchema)]
pub struct ConflictBody {
    pub error: String,
    /// The first job of that `alert_id`.
    pub job_id: Uuid,
}

/// `409` to a replay: why the job was not replayed.
#[derive(Serialize, ToSchema)]
pub struct ReplayRefusedBody {
    pub error: String,
    /// The job's status.
    pub status: Option<JobStatus>,
    /// `not_failed`, `would_be_stale` or `invalid`.
    pub decision: Decision,
}

/// `GET /readyz`.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    pub redis: bool,
    pub postgres: bool,
}

/// The body a generic webhook channel receives (signed: headers `webhook-id` = `event_id`,
/// `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`).
#[derive(Serialize, ToSchema)]
pub struct NotificationEvent {
    /// The event kind (`filled`, `rejected`, `dead`, `blocked`, `unprotected`,
    /// `stop_loss_fired`, `take_profit_fired`), or `test`.
    #[serde(rename = "type")]
    pub kind: String,
    pub event_id: Uuid,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    pub user_id: Uuid,
    /// For job events: `job_id`, `status`, `exchange`, `symbol`, `action`, `error_class`,
    /// `error`, `fills` (`leg`, `side`, `quantity`, `price`, `status`).
    pub data: serde_json::Value,
}
