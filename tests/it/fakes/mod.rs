//! Fake brokers: small axum servers that check auth and signatures the way each broker does,
//! keep orders and positions, record every request and inject failures ([`Fault`]).
//!
//! Shared plumbing here; one file per broker.

pub(crate) mod aster;
pub(crate) mod oanda;
pub(crate) mod tradier;

pub(crate) use aster::*;
pub(crate) use oanda::*;
pub(crate) use tradier::*;

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sparky::credentials::Credentials;
use sparky::domain::{Action, Alert, CredentialEnv, ExchangeKind, Job, OrderType, Symbol};
use sparky::exchanges::{Exchange, ExchangeContext, SharedState};
use sparky::executor::{execute, Outcome, RetryPolicy};
use sparky::secrets::SecretString;
use sparky::store::{CredentialRow, Store};
use uuid::Uuid;

use crate::helpers::*;
// ---------------------------------------------------------------------------------------------
// Fake-server plumbing shared by the three fakes
// ---------------------------------------------------------------------------------------------

/// How much of the next market order fills (`partial_next` of the Aster and Tradier fakes).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Partial {
    /// This fraction of the quantity (rounded down to the step).
    Fraction(Decimal),
    /// This quantity (at most the order's).
    Qty(Decimal),
}

/// Decides, for each market order the queue does not cover, whether it fills partly: it gets the
/// order as the fake keeps it (Aster: `clientOrderId`, `reduceOnly`, `side`; Tradier: `tag`,
/// `side`) and may count calls (e.g. every fifth close leg).
pub(crate) type PartialRule = Box<dyn FnMut(&Value) -> Option<Partial> + Send>;

/// Which market orders of a fake fill only partly: a queue of the next ones, then a rule.
#[derive(Default)]
pub(crate) struct PartialFills {
    queue: VecDeque<Partial>,
    rule: Option<PartialRule>,
}

impl PartialFills {
    /// The next market order fills only so much (one entry per order).
    pub(crate) fn push(&mut self, part: Partial) {
        self.queue.push_back(part);
    }
    /// Decide for the orders the queue does not cover.
    pub(crate) fn when(&mut self, rule: impl FnMut(&Value) -> Option<Partial> + Send + 'static) {
        self.rule = Some(Box::new(rule));
    }
    /// How `order` (a market order, as the fake keeps it) fills: `None` for all of it.
    pub(crate) fn next(&mut self, order: &Value) -> Option<Partial> {
        self.queue
            .pop_front()
            .or_else(|| self.rule.as_mut().and_then(|r| r(order)))
    }
}

/// Apply a signed fill to a position with an average entry price; returns the realized PnL.
pub(crate) fn apply_fill(
    positions: &mut HashMap<String, Decimal>,
    entries: &mut HashMap<String, Decimal>,
    sym: &str,
    signed: Decimal,
    price: Decimal,
) -> Decimal {
    if signed.is_zero() {
        return Decimal::ZERO;
    }
    let pos = positions.get(sym).copied().unwrap_or_default();
    let entry = entries.get(sym).copied().unwrap_or_default();
    let mut pnl = Decimal::ZERO;
    let new_pos = pos + signed;
    if pos.is_zero() || pos.is_sign_positive() == signed.is_sign_positive() {
        let e = (pos.abs() * entry + signed.abs() * price) / new_pos.abs();
        entries.insert(sym.to_string(), e);
    } else {
        let closed = signed.abs().min(pos.abs());
        pnl = closed
            * (price - entry)
            * if pos > Decimal::ZERO {
                Decimal::ONE
            } else {
                -Decimal::ONE
            };
        if new_pos.is_zero() {
            entries.remove(sym);
        } else if new_pos.is_sign_positive() != pos.is_sign_positive() {
            entries.insert(sym.to_string(), price);
        }
    }
    positions.insert(sym.to_string(), new_pos);
    pnl
}

#[derive(Clone, Debug)]
pub(crate) enum Fault {
    /// Answer this (status, JSON or text body, headers) without doing anything.
    Reply(u16, Value, Vec<(&'static str, String)>),
    /// Do the request, then answer this instead of the real answer.
    AfterDoing(u16, Value),
    /// Do the request, then wait this long before answering (the client times out first).
    HangAfterDoing(Duration),
    /// No fault for this call (to aim a later fault at a later call).
    Pass,
}

#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) route: String,
    pub(crate) query: String,
    pub(crate) body: String,
    pub(crate) headers: HeaderMap,
}

#[derive(Default)]
pub(crate) struct Core {
    pub(crate) faults: Mutex<HashMap<String, VecDeque<Fault>>>,
    pub(crate) seen: Mutex<Vec<Seen>>,
}

impl Core {
    pub(crate) fn inject(&self, route: &str, fault: Fault) {
        self.faults
            .lock()
            .unwrap()
            .entry(route.to_string())
            .or_default()
            .push_back(fault);
    }
    /// Drop every fault not yet applied.
    pub(crate) fn clear_faults(&self) {
        self.faults.lock().unwrap().clear();
    }
    pub(crate) fn take(&self, route: &str) -> Option<Fault> {
        self.faults.lock().unwrap().get_mut(route)?.pop_front()
    }
    pub(crate) fn record(&self, route: &str, uri: &Uri, headers: &HeaderMap, body: &str) {
        self.seen.lock().unwrap().push(Seen {
            route: route.to_string(),
            query: uri.query().unwrap_or_default().to_string(),
            body: body.to_string(),
            headers: headers.clone(),
        });
    }
    /// Every request, in the order received.
    pub(crate) fn all_seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub(crate) fn seen(&self, route: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.route == route)
            .cloned()
            .collect()
    }
    pub(crate) fn routes(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.route.clone())
            .collect()
    }
}

pub(crate) fn reply(status: u16, body: Value, headers: &[(&'static str, String)]) -> Response {
    let status = StatusCode::from_u16(status).unwrap();
    let text = match &body {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut r = (status, text).into_response();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    for (k, v) in headers {
        r.headers_mut().insert(*k, v.parse().unwrap());
    }
    r
}

/// Apply the pending fault of `route` around `work` (which does the request and returns the answer).
pub(crate) async fn with_faults(
    core: &Core,
    route: &str,
    work: impl FnOnce() -> (u16, Value),
) -> Response {
    match core.take(route) {
        Some(Fault::Reply(s, b, h)) => reply(s, b, &h),
        Some(Fault::AfterDoing(s, b)) => {
            let _ = work();
            reply(s, b, &[])
        }
        Some(Fault::HangAfterDoing(d)) => {
            let (s, b) = work();
            tokio::time::sleep(d).await;
            reply(s, b, &[])
        }
        Some(Fault::Pass) | None => {
            let (s, b) = work();
            reply(s, b, &[])
        }
    }
}

pub(crate) async fn serve(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

pub(crate) fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// Parameters of a query string or form body, in order.
pub(crate) fn params(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

pub(crate) fn param<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

pub(crate) fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// A context whose HTTP client gives up after `timeout` (the worker's gives up after 10 s).
pub(crate) fn ctx(timeout: Duration, aster: &str, oanda: &str, tradier: &str) -> ExchangeContext {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy(&admin_database_url())
        .unwrap();
    ExchangeContext {
        store: Store::from_pool(pool),
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(timeout)
            .build()
            .unwrap(),
        aster_base_url: Some(aster.to_string()),
        oanda_base_url: Some(oanda.to_string()),
        tradier_base_url: Some(tradier.to_string()),
        shared: Arc::new(SharedState::default()),
    }
}

pub(crate) fn creds(
    kind: ExchangeKind,
    key: &str,
    secret: &str,
    account: Option<&str>,
    extra: Value,
) -> Credentials {
    Credentials {
        user_id: Uuid::now_v7(),
        exchange: kind,
        api_key: SecretString::new(key),
        api_secret: SecretString::new(secret),
        account_id: account.map(str::to_string),
        environment: CredentialEnv::Production,
        extra_config: extra,
        label: Some("test".into()),
    }
}

pub(crate) fn job(kind: ExchangeKind, action: Action, symbol: &str, usd: Decimal) -> Job {
    Job {
        job_id: Uuid::now_v7(),
        accepted_at: chrono::Utc::now(),
        alert: Alert {
            user_id: Uuid::now_v7(),
            exchange: kind,
            action,
            symbol: Symbol::parse(symbol, kind).unwrap(),
            order_type: OrderType::Market,
            price: None,
            position_size_usd: Some(usd),
            quantity: None,
            percent_of_equity: None,
            risk_usd: None,
            risk_percent: None,
            stop_loss_percent: None,
            take_profit_percent: None,
            stop_loss_price: None,
            take_profit_price: None,
            trailing_stop: None,
            close_percent: None,
            limit_ttl_secs: None,
            strategy_id: None,
            strategy: None,
            alert_id: None,
            timestamp: None,
            max_lag_secs: None,
            environment: None,
            ignored_fields: vec![],
        },
    }
}

pub(crate) fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        max_retries: 4,
        max_total: Duration::from_secs(10),
        min_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
    }
}

pub(crate) async fn run(ex: &dyn Exchange, job: &Job) -> Outcome {
    execute(ex, job, false, &fast_policy()).await
}

/// Store credentials for `user` (encrypted as the CLI would).
pub(crate) async fn store_credentials(
    app: &TestApp,
    user: Uuid,
    exchange: &str,
    key: &str,
    secret: &str,
    account: Option<&str>,
    extra: Value,
) {
    let mut row = CredentialRow {
        user_id: user,
        exchange: exchange.into(),
        api_key: key.into(),
        api_secret: secret.into(),
        account_id: account.map(str::to_string),
        environment: "production".into(),
        extra_config: extra,
        label: Some("Main Account".into()),
    };
    sparky::credentials::seal_row(&mut row, app.config.master_key.as_ref());
    app.store.upsert_credentials(&row).await.unwrap();
}

pub(crate) fn webhook(
    user: Uuid,
    secret: &str,
    exchange: &str,
    action: &str,
    symbol: &str,
    usd: u32,
) -> Value {
    json!({
        "secret": secret,
        "user_id": user,
        "exchange": exchange,
        "action": action,
        "symbol": symbol,
        "order_type": "market",
        "position_size_usd": usd
    })
}
