//! The real exchange clients (Aster, OANDA, Tradier) against small fake servers.
//!
//! Each fake is an axum app on 127.0.0.1:0 that checks authentication the way the broker does (for
//! Aster it recomputes the HMAC signature itself and answers -1022 when it does not match), keeps
//! orders and positions, records every request, and can be told to fail the next call of a route:
//! answer an error without doing anything ([`Fault::Reply`]), do the request and then answer an error
//! ([`Fault::AfterDoing`], e.g. a 503 after the order was recorded), or do it and then not answer in
//! time ([`Fault::HangAfterDoing`]).
//!
//! Client-level tests drive a client (or the executor over it) directly; the end-to-end tests go
//! webhook -> ingress -> Redis -> worker -> fake broker -> Postgres.

use std::collections::{HashMap, VecDeque};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use hmac::{Hmac, Mac};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{json, Value};
use sha2::Sha256;
use sparky::credentials::Credentials;
use sparky::domain::{
    Action, Alert, CredentialEnv, ExchangeKind, Job, OrderSide, OrderType, Side, Symbol,
};
use sparky::exchanges::aster::AsterClient;
use sparky::exchanges::oanda::OandaClient;
use sparky::exchanges::tradier::TradierClient;
use sparky::exchanges::{
    client_order_id, ErrorClass, ExPosition, Exchange, ExchangeContext, Leg, OrderRequest,
    OrderState, SharedState,
};
use sparky::executor::{execute, JobStatus, Outcome, RetryPolicy};
use sparky::secrets::SecretString;
use sparky::store::{CredentialRow, Store};
use uuid::Uuid;

use crate::helpers::*;

// ---------------------------------------------------------------------------------------------
// Fake-server plumbing shared by the three fakes
// ---------------------------------------------------------------------------------------------

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
    route: String,
    query: String,
    body: String,
    headers: HeaderMap,
}

#[derive(Default)]
pub(crate) struct Core {
    faults: Mutex<HashMap<String, VecDeque<Fault>>>,
    seen: Mutex<Vec<Seen>>,
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
    fn take(&self, route: &str) -> Option<Fault> {
        self.faults.lock().unwrap().get_mut(route)?.pop_front()
    }
    fn record(&self, route: &str, uri: &Uri, headers: &HeaderMap, body: &str) {
        self.seen.lock().unwrap().push(Seen {
            route: route.to_string(),
            query: uri.query().unwrap_or_default().to_string(),
            body: body.to_string(),
            headers: headers.clone(),
        });
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
    fn routes(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.route.clone())
            .collect()
    }
}

fn reply(status: u16, body: Value, headers: &[(&'static str, String)]) -> Response {
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
async fn with_faults(core: &Core, route: &str, work: impl FnOnce() -> (u16, Value)) -> Response {
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

async fn serve(app: Router) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

fn url_decode(s: &str) -> String {
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
fn params(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (url_decode(k), url_decode(v))
        })
        .collect()
}

fn param<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// A context whose HTTP client gives up after `timeout` (the worker's gives up after 10 s).
fn ctx(timeout: Duration, aster: &str, oanda: &str, tradier: &str) -> ExchangeContext {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy(&admin_database_url())
        .unwrap();
    ExchangeContext {
        store: Store { pool },
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

fn creds(
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
            stop_loss_percent: None,
            take_profit_percent: None,
            strategy_id: None,
            strategy: None,
            alert_id: None,
            timestamp: None,
            max_lag_secs: None,
            environment: None,
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

async fn run(ex: &dyn Exchange, job: &Job) -> Outcome {
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

// ---------------------------------------------------------------------------------------------
// Aster fake
// ---------------------------------------------------------------------------------------------

pub(crate) const ASTER_KEY: &str =
    "dbefbc809e3e83c283a984c3a1459732ea7db1360ca80c5c2c8867408d28cc83";
pub(crate) const ASTER_SECRET: &str =
    "2b5eb11e18796d12d88f13dc27dbbd02c2cc51ff7059765ed9821957d82bb4d9";

pub(crate) struct AsterState {
    /// symbol -> (price, tick, lot step, lot min, market step, market min, min notional)
    markets: HashMap<&'static str, [Decimal; 7]>,
    positions: HashMap<String, Decimal>,
    orders: Vec<Value>,
    next_id: u64,
    reject_duplicates: bool,
    clock_skew_ms: i64,
    pub(crate) margin_limit: Option<Decimal>,
    leverage: Vec<(String, String)>,
}

pub(crate) struct AsterFake {
    pub(crate) core: Core,
    pub(crate) st: Mutex<AsterState>,
}

impl AsterFake {
    pub(crate) async fn start() -> (Arc<AsterFake>, String) {
        let mut markets = HashMap::new();
        markets.insert(
            "ETHUSDT",
            [
                dec!(3000),
                dec!(0.01),
                dec!(0.001),
                dec!(0.001),
                dec!(0.001),
                dec!(0.001),
                dec!(5),
            ],
        );
        markets.insert(
            "SOLUSDT",
            [
                dec!(150),
                dec!(0.001),
                dec!(0.01),
                dec!(0.01),
                dec!(0.1),
                dec!(0.1),
                dec!(5),
            ],
        );
        let fake = Arc::new(AsterFake {
            core: Core::default(),
            st: Mutex::new(AsterState {
                markets,
                positions: HashMap::new(),
                orders: vec![],
                next_id: 1000,
                reject_duplicates: false,
                clock_skew_ms: 0,
                margin_limit: None,
                leverage: vec![],
            }),
        });
        let app = Router::new()
            .fallback(aster_handle)
            .with_state(fake.clone());
        (fake, serve(app).await)
    }

    pub(crate) fn orders(&self) -> Vec<Value> {
        self.st.lock().unwrap().orders.clone()
    }

    /// Another market with SOLUSDT's rules (price 150, market step 0.1, min notional 5), so that
    /// many users can each trade their own symbol on the one fake account.
    pub(crate) fn add_market_like_sol(&self, symbol: &str) {
        let mut st = self.st.lock().unwrap();
        let sol = st.markets["SOLUSDT"];
        st.markets
            .insert(Box::leak(symbol.to_string().into_boxed_str()), sol);
    }

    pub(crate) fn orders_with(&self, coid: &str) -> usize {
        self.orders()
            .iter()
            .filter(|o| o["clientOrderId"] == coid)
            .count()
    }
}

fn aster_err(status: u16, code: i64, msg: &str) -> (u16, Value) {
    (status, json!({"code": code, "msg": msg}))
}

/// The fake's own signature check: HMAC-SHA256 over exactly what precedes `&signature=`.
fn aster_verify(raw: &str, secret: &str) -> bool {
    let Some((payload, sig)) = raw.rsplit_once("&signature=") else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(payload.as_bytes());
    let want = hex::encode(mac.finalize().into_bytes());
    !sig.contains('&') && want.eq_ignore_ascii_case(sig)
}

async fn aster_handle(
    axum::extract::State(f): axum::extract::State<Arc<AsterFake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let route = format!("{method} {}", uri.path());
    f.core.record(&route, &uri, &headers, &body);
    let query = uri.query().unwrap_or_default().to_string();
    let public = matches!(
        uri.path(),
        "/fapi/v1/exchangeInfo" | "/fapi/v1/ticker/price" | "/fapi/v1/time"
    );
    let skew = f.st.lock().unwrap().clock_skew_ms;
    let server_now = chrono::Utc::now().timestamp_millis() + skew;
    if !public {
        if headers.get("X-MBX-APIKEY").and_then(|v| v.to_str().ok()) != Some(ASTER_KEY) {
            let (s, b) = aster_err(
                401,
                -2015,
                "Invalid API-key, IP, or permissions for action.",
            );
            return reply(s, b, &[]);
        }
        // Never mixed: GET signs the query, POST the body.
        let raw = if method == Method::GET { &query } else { &body };
        if (method != Method::GET && !query.is_empty()) || !aster_verify(raw, ASTER_SECRET) {
            let (s, b) = aster_err(400, -1022, "Signature for this request is not valid.");
            return reply(s, b, &[]);
        }
        let p = params(raw);
        let ts: i64 = param(&p, "timestamp").unwrap_or("0").parse().unwrap_or(0);
        let window: i64 = param(&p, "recvWindow").unwrap_or("5000").parse().unwrap();
        if ts >= server_now + 1000 || server_now - ts > window {
            let (s, b) = aster_err(
                400,
                -1021,
                "Timestamp for this request is outside of the recvWindow.",
            );
            return reply(s, b, &[]);
        }
    }
    let p = params(if method == Method::GET { &query } else { &body });
    let fc = f.clone();
    with_faults(&f.core, &route, move || {
        fc.process(&method, uri.path(), &p, server_now)
    })
    .await
}

impl AsterFake {
    fn process(
        &self,
        method: &Method,
        path: &str,
        p: &[(String, String)],
        now: i64,
    ) -> (u16, Value) {
        let mut st = self.st.lock().unwrap();
        let sym = param(p, "symbol").unwrap_or_default().to_string();
        match (method.as_str(), path) {
            ("GET", "/fapi/v1/time") => (200, json!({"serverTime": now})),
            ("GET", "/fapi/v1/exchangeInfo") => {
                let symbols: Vec<Value> = st
                    .markets
                    .iter()
                    .map(|(s, m)| {
                        json!({"symbol": s, "status": "TRADING", "filters": [
                            {"filterType": "PRICE_FILTER", "minPrice": "0.01", "maxPrice": "1000000", "tickSize": m[1].to_string()},
                            {"filterType": "LOT_SIZE", "minQty": m[3].to_string(), "maxQty": "10000", "stepSize": m[2].to_string()},
                            {"filterType": "MARKET_LOT_SIZE", "minQty": m[5].to_string(), "maxQty": "1000", "stepSize": m[4].to_string()},
                            {"filterType": "MIN_NOTIONAL", "notional": m[6].to_string()},
                        ]})
                    })
                    .collect();
                (200, json!({"timezone": "UTC", "symbols": symbols}))
            }
            ("GET", "/fapi/v1/ticker/price") => match st.markets.get(sym.as_str()) {
                Some(m) => (
                    200,
                    json!({"symbol": sym, "price": format!("{:.2}", m[0]), "time": now}),
                ),
                None => aster_err(400, -1121, "Invalid symbol."),
            },
            ("GET", "/fapi/v2/positionRisk") => {
                let amt = st.positions.get(&sym).copied().unwrap_or_default();
                let price = st
                    .markets
                    .get(sym.as_str())
                    .map(|m| m[0])
                    .unwrap_or_default();
                (
                    200,
                    json!([{"symbol": sym, "positionAmt": format!("{amt:.3}"), "entryPrice": price.to_string(),
                    "markPrice": price.to_string(), "unRealizedProfit": "0.0", "leverage": "20",
                    "marginType": "cross", "positionSide": "BOTH", "updateTime": now}]),
                )
            }
            ("POST", "/fapi/v1/leverage") => {
                let lev = param(p, "leverage").unwrap_or_default().to_string();
                st.leverage.push((sym.clone(), lev.clone()));
                (
                    200,
                    json!({"leverage": lev.parse::<u32>().unwrap_or(0), "maxNotionalValue": "1000000", "symbol": sym}),
                )
            }
            ("GET", "/fapi/v1/order") => {
                let coid = param(p, "origClientOrderId").unwrap_or_default();
                match st.orders.iter().rev().find(|o| o["clientOrderId"] == coid) {
                    Some(o) => (200, o.clone()),
                    None => aster_err(400, -2013, "Order does not exist."),
                }
            }
            ("POST", "/fapi/v1/order") => {
                let coid = param(p, "newClientOrderId").unwrap_or_default().to_string();
                if st.reject_duplicates && st.orders.iter().any(|o| o["clientOrderId"] == coid) {
                    return aster_err(400, -4116, "clientOrderId is duplicated");
                }
                let Some(m) = st.markets.get(sym.as_str()).copied() else {
                    return aster_err(400, -1121, "Invalid symbol.");
                };
                let side = param(p, "side").unwrap_or_default().to_string();
                let ty = param(p, "type").unwrap_or_default().to_string();
                let reduce = param(p, "reduceOnly") == Some("true");
                let pos = st.positions.get(&sym).copied().unwrap_or_default();
                let id = st.next_id;
                st.next_id += 1;
                let mut order = json!({"orderId": id, "clientOrderId": coid, "symbol": sym, "side": side,
                    "type": ty, "reduceOnly": reduce, "positionSide": "BOTH", "updateTime": now,
                    "status": "NEW", "executedQty": "0", "cumQuote": "0", "avgPrice": "0.00000"});
                match ty.as_str() {
                    "STOP_MARKET" | "TAKE_PROFIT_MARKET" => {
                        if param(p, "closePosition") != Some("true")
                            || param(p, "stopPrice").is_none()
                        {
                            return aster_err(400, -1102, "Mandatory parameter was not sent.");
                        }
                        order["stopPrice"] = json!(param(p, "stopPrice"));
                        order["closePosition"] = json!(true);
                    }
                    "MARKET" | "LIMIT" => {
                        let qty = d(param(p, "quantity").unwrap_or("0"));
                        let (step, min) = if ty == "MARKET" {
                            (m[4], m[5])
                        } else {
                            (m[2], m[3])
                        };
                        if !(qty % step).is_zero() || qty < min {
                            return aster_err(
                                400,
                                -1111,
                                "Precision is over the maximum defined for this asset.",
                            );
                        }
                        let price = if ty == "LIMIT" {
                            let pr = d(param(p, "price").unwrap_or("0"));
                            if !(pr % m[1]).is_zero() || param(p, "timeInForce").is_none() {
                                return aster_err(400, -4014, "Price not increased by tick size.");
                            }
                            pr
                        } else {
                            m[0]
                        };
                        if reduce {
                            let reduces = (side == "BUY" && pos < Decimal::ZERO && qty <= -pos)
                                || (side == "SELL" && pos > Decimal::ZERO && qty <= pos);
                            if !reduces {
                                return aster_err(400, -2022, "ReduceOnly Order is rejected.");
                            }
                        } else if qty * price < m[6] {
                            return aster_err(400, -4164, &format!("Order's notional must be no smaller than {} (unless you choose reduce only)", m[6]));
                        }
                        if let Some(limit) = st.margin_limit {
                            if !reduce && qty * price > limit {
                                return aster_err(400, -2019, "Margin is insufficient.");
                            }
                        }
                        order["origQty"] = json!(qty.to_string());
                        order["price"] = json!(price.to_string());
                        if ty == "MARKET" {
                            let signed = if side == "BUY" { qty } else { -qty };
                            *st.positions.entry(sym.clone()).or_default() += signed;
                            order["status"] = json!("FILLED");
                            order["executedQty"] = json!(qty.to_string());
                            order["cumQuote"] = json!((qty * price).to_string());
                            order["avgPrice"] = json!(format!("{:.5}", price));
                        }
                    }
                    _ => return aster_err(400, -1116, "Invalid orderType."),
                }
                st.orders.push(order.clone());
                (200, order)
            }
            _ => (404, json!({"code": -1, "msg": "no such route"})),
        }
    }
}

pub(crate) fn aster_client(url: &str, timeout: Duration, extra: Value) -> AsterClient {
    let c = creds(ExchangeKind::Aster, ASTER_KEY, ASTER_SECRET, None, extra);
    AsterClient::new(&c, &ctx(timeout, url, "http://unused", "http://unused")).unwrap()
}

fn order_params(s: &Seen) -> Vec<(String, String)> {
    params(&s.body)
}

#[tokio::test]
async fn aster_signs_every_private_call_and_a_bad_secret_is_refused_with_1022() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let sym = Symbol::parse("ETHUSDT", ExchangeKind::Aster).unwrap();
    assert_eq!(ex.position(&sym).await.unwrap(), None);
    let seen = fake.core.seen("GET /fapi/v2/positionRisk");
    let q = params(&seen[0].query);
    assert_eq!(
        q.last().unwrap().0,
        "signature",
        "signature is the last parameter"
    );
    assert!(param(&q, "timestamp").is_some() && param(&q, "recvWindow") == Some("5000"));
    assert_eq!(seen[0].headers["X-MBX-APIKEY"], ASTER_KEY);

    let bad = creds(
        ExchangeKind::Aster,
        ASTER_KEY,
        "not-the-secret",
        None,
        json!({}),
    );
    let bad = AsterClient::new(&bad, &ctx(Duration::from_secs(5), &url, "x", "x")).unwrap();
    let e = bad.position(&sym).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert!(
        e.message.contains("-1022") && e.message.contains("Signature"),
        "{e}"
    );
    assert!(!e.message.contains("not-the-secret"));
    let dbg = format!("{bad:?}");
    assert!(
        !dbg.contains("not-the-secret") && !dbg.contains(ASTER_KEY),
        "{dbg}"
    );
}

#[tokio::test]
async fn aster_market_buy_is_sized_to_the_market_lot_step_and_recorded() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    // 100 USD of ETH at 3000 = 0.0333.. -> 0.033
    let j = job(
        ExchangeKind::Aster,
        Action::Buy,
        "BINANCE:ETHUSDT",
        dec!(100),
    );
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let post = &fake.core.seen("POST /fapi/v1/order")[0];
    let p = order_params(post);
    assert!(post.query.is_empty(), "parameters go in the body only");
    assert_eq!(param(&p, "symbol"), Some("ETHUSDT"));
    assert_eq!(param(&p, "side"), Some("BUY"));
    assert_eq!(param(&p, "type"), Some("MARKET"));
    assert_eq!(param(&p, "quantity"), Some("0.033"));
    assert_eq!(param(&p, "reduceOnly"), None);
    assert_eq!(param(&p, "newOrderRespType"), Some("RESULT"));
    let open_id = client_order_id(j.job_id, Leg::Open);
    assert_eq!(param(&p, "newClientOrderId"), Some(open_id.as_str()));
    assert_eq!(p.last().unwrap().0, "signature");
    assert_eq!(out.fills[0].quantity, dec!(0.033));
    assert_eq!(out.fills[0].price, Some(dec!(3000)));
    assert_eq!(out.fills[0].status, sparky::job::FillState::Filled);

    // SOLUSDT: LOT_SIZE step 0.01 but MARKET_LOT_SIZE step 0.1: 100/150 = 0.666 -> 0.6
    let j = job(ExchangeKind::Aster, Action::Sell, "SOLUSDT", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let p = order_params(&fake.core.seen("POST /fapi/v1/order")[1]);
    assert_eq!(param(&p, "quantity"), Some("0.6"));
    assert_eq!(param(&p, "side"), Some("SELL"));
    // exchangeInfo was fetched once and cached for both symbols.
    assert_eq!(fake.core.seen("GET /fapi/v1/exchangeInfo").len(), 1);
}

#[tokio::test]
async fn aster_too_small_orders_never_reach_the_exchange() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    // 4 USD -> 0.001 ETH = 3 USD notional, below MIN_NOTIONAL 5
    let out = run(
        &ex,
        &job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(4)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Rejected);
    assert!(
        out.message
            .as_ref()
            .unwrap()
            .contains("below the minimum 5"),
        "{out:?}"
    );
    // and straight at the client: 0.0019 rounds down to 0.001 -> 3 USD
    let sym = Symbol::parse("ETHUSDT", ExchangeKind::Aster).unwrap();
    let e = ex
        .place_order(&OrderRequest {
            on_fill: None,
            symbol: sym.clone(),
            side: OrderSide::Buy,
            quantity: dec!(0.0019),
            order_type: OrderType::Market,
            limit_price: None,
            reduce_only: false,
            leg: Leg::Open,
            client_order_id: "x1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert!(
        e.message.contains("0.001") && e.message.contains("notional"),
        "{e}"
    );
    assert!(fake.core.seen("POST /fapi/v1/order").is_empty());

    // A limit price is rounded to the tick before it is sent.
    let ack = ex
        .place_order(&OrderRequest {
            on_fill: None,
            symbol: sym,
            side: OrderSide::Buy,
            quantity: dec!(0.01),
            order_type: OrderType::Limit,
            limit_price: Some(dec!(2999.996)),
            reduce_only: false,
            leg: Leg::Open,
            client_order_id: "x2".into(),
        })
        .await
        .unwrap();
    assert_eq!(ack.state, OrderState::Accepted);
    let p = order_params(&fake.core.seen("POST /fapi/v1/order")[0]);
    assert_eq!(param(&p, "price"), Some("3000"));
    assert_eq!(param(&p, "timeInForce"), Some("GTC"));
}

#[tokio::test]
async fn aster_reversal_closes_reduce_only_then_opens() {
    let (fake, url) = AsterFake::start().await;
    fake.st
        .lock()
        .unwrap()
        .positions
        .insert("ETHUSDT".into(), dec!(-0.05));
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let j = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let posts = fake.core.seen("POST /fapi/v1/order");
    assert_eq!(posts.len(), 2);
    let close = order_params(&posts[0]);
    assert_eq!(param(&close, "reduceOnly"), Some("true"));
    assert_eq!(param(&close, "side"), Some("BUY"));
    assert_eq!(param(&close, "quantity"), Some("0.05"));
    assert_eq!(
        param(&close, "newClientOrderId"),
        Some(client_order_id(j.job_id, Leg::Close).as_str())
    );
    let open = order_params(&posts[1]);
    assert_eq!(param(&open, "reduceOnly"), None);
    assert_eq!(param(&open, "quantity"), Some("0.033"));
    assert_eq!(fake.st.lock().unwrap().positions["ETHUSDT"], dec!(0.033));
    let legs: Vec<_> = out.fills.iter().map(|f| f.leg).collect();
    assert_eq!(legs, vec![Leg::Close, Leg::Open]);

    // close: no position -> skipped; with one -> a reduce-only market order
    let out = run(
        &ex,
        &job(ExchangeKind::Aster, Action::Close, "ETHUSDT", dec!(1)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(fake.st.lock().unwrap().positions["ETHUSDT"], dec!(0));
    let out = run(
        &ex,
        &job(ExchangeKind::Aster, Action::Close, "ETHUSDT", dec!(1)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Skipped, "{out:?}");
}

#[tokio::test]
async fn aster_rate_limits_and_5xx_are_retried_honouring_retry_after() {
    let (fake, url) = AsterFake::start().await;
    fake.core.inject(
        "POST /fapi/v1/order",
        Fault::Reply(
            429,
            json!({"code": -1003, "msg": "Too many requests."}),
            vec![("Retry-After", "1".into())],
        ),
    );
    fake.core.inject(
        "POST /fapi/v1/order",
        Fault::Reply(
            500,
            json!({"code": -1001, "msg": "Internal error."}),
            vec![],
        ),
    );
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let j = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    let started = Instant::now();
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    let classes: Vec<_> = out.history.iter().map(|h| h.class.as_str()).collect();
    assert_eq!(classes, vec!["transient", "transient"]);
    // Every retry carried the same client order id, and exactly one order exists.
    let open_id = client_order_id(j.job_id, Leg::Open);
    for s in fake.core.seen("POST /fapi/v1/order") {
        assert_eq!(
            param(&order_params(&s), "newClientOrderId"),
            Some(open_id.as_str())
        );
    }
    assert_eq!(fake.orders_with(&open_id), 1);
}

#[tokio::test]
async fn aster_503_after_the_order_was_recorded_is_resolved_by_lookup() {
    let (fake, url) = AsterFake::start().await;
    // Aster would accept a blind resend of a filled order's id: only the look-up prevents a double.
    fake.core.inject(
        "POST /fapi/v1/order",
        Fault::AfterDoing(503, json!({"code": -1007, "msg": "Timeout waiting for response from backend server. Send status unknown; execution status unknown."})),
    );
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let j = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let open_id = client_order_id(j.job_id, Leg::Open);
    assert_eq!(fake.orders_with(&open_id), 1);
    assert_eq!(fake.core.seen("POST /fapi/v1/order").len(), 1);
    let lookups = fake.core.seen("GET /fapi/v1/order");
    assert!(!lookups.is_empty());
    assert_eq!(
        param(&params(&lookups[0].query), "origClientOrderId"),
        Some(open_id.as_str())
    );
    assert_eq!(out.fills[0].exchange_order_id.as_deref(), Some("1000"));
}

#[tokio::test]
async fn aster_timeout_after_the_order_was_recorded_leaves_exactly_one_order() {
    let (fake, url) = AsterFake::start().await;
    fake.core.inject(
        "POST /fapi/v1/order",
        Fault::HangAfterDoing(Duration::from_secs(3)),
    );
    let ex = aster_client(&url, Duration::from_millis(700), json!({}));
    let j = job(ExchangeKind::Aster, Action::Sell, "ETHUSDT", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(
        out.history.len(),
        0,
        "resolved by the look-up within the attempt"
    );
    assert_eq!(fake.orders_with(&client_order_id(j.job_id, Leg::Open)), 1);
    assert_eq!(fake.orders().len(), 1);
    assert_eq!(fake.st.lock().unwrap().positions["ETHUSDT"], dec!(-0.033));
}

#[tokio::test]
async fn aster_unknown_outcome_with_no_order_resends_the_same_id_once() {
    let (fake, url) = AsterFake::start().await;
    // 503 without recording anything: the look-up says -2013, so the leg is sent again.
    fake.core.inject(
        "POST /fapi/v1/order",
        Fault::Reply(
            503,
            json!({"code": -1007, "msg": "execution status unknown"}),
            vec![],
        ),
    );
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let j = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let open_id = client_order_id(j.job_id, Leg::Open);
    let posts = fake.core.seen("POST /fapi/v1/order");
    assert_eq!(posts.len(), 2);
    for s in &posts {
        assert_eq!(
            param(&order_params(s), "newClientOrderId"),
            Some(open_id.as_str())
        );
    }
    assert_eq!(fake.orders_with(&open_id), 1);
}

#[tokio::test]
async fn aster_duplicate_id_4116_means_already_placed() {
    let (fake, url) = AsterFake::start().await;
    fake.st.lock().unwrap().reject_duplicates = true;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let order = OrderRequest {
        on_fill: None,
        symbol: Symbol::parse("ETHUSDT", ExchangeKind::Aster).unwrap(),
        side: OrderSide::Buy,
        quantity: dec!(0.01),
        order_type: OrderType::Market,
        limit_price: None,
        reduce_only: false,
        leg: Leg::Open,
        client_order_id: "spdup".into(),
    };
    let first = ex.place_order(&order).await.unwrap();
    let again = ex.place_order(&order).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(again.state, OrderState::Filled);
    assert_eq!(fake.orders_with("spdup"), 1);
}

#[tokio::test]
async fn aster_margin_rejection_is_permanent_with_the_brokers_message() {
    let (fake, url) = AsterFake::start().await;
    fake.st.lock().unwrap().margin_limit = Some(dec!(50));
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let out = run(
        &ex,
        &job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Rejected);
    assert_eq!(out.error_class, Some(sparky::job::FailureClass::Permanent));
    assert!(
        out.message
            .as_ref()
            .unwrap()
            .contains("Margin is insufficient. (code -2019)"),
        "{out:?}"
    );
    assert_eq!(
        fake.core.seen("POST /fapi/v1/order").len(),
        1,
        "not retried"
    );
}

#[tokio::test]
async fn aster_clock_drift_is_corrected_after_1021() {
    let (fake, url) = AsterFake::start().await;
    fake.st.lock().unwrap().clock_skew_ms = 20_000;
    let ex = aster_client(&url, Duration::from_secs(5), json!({}));
    let sym = Symbol::parse("ETHUSDT", ExchangeKind::Aster).unwrap();
    assert_eq!(ex.position(&sym).await.unwrap(), None);
    assert_eq!(fake.core.seen("GET /fapi/v1/time").len(), 1);
    // The offset is kept: the next call is accepted at once.
    ex.position(&sym).await.unwrap();
    assert_eq!(fake.core.seen("GET /fapi/v2/positionRisk").len(), 3);
}

#[tokio::test]
async fn aster_leverage_and_protective_orders() {
    let (fake, url) = AsterFake::start().await;
    let ex = aster_client(&url, Duration::from_secs(5), json!({"leverage": 5}));
    let mut j = job(ExchangeKind::Aster, Action::Buy, "ETHUSDT", dec!(100));
    j.alert.stop_loss_percent = Some(dec!(2));
    j.alert.take_profit_percent = Some(dec!(4));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(
        fake.st.lock().unwrap().leverage,
        vec![("ETHUSDT".to_string(), "5".to_string())]
    );
    let routes = fake.core.routes();
    let lev = routes
        .iter()
        .position(|r| r == "POST /fapi/v1/leverage")
        .unwrap();
    let ord = routes
        .iter()
        .position(|r| r == "POST /fapi/v1/order")
        .unwrap();
    assert!(lev < ord, "leverage is set before the order");
    let orders = fake.orders();
    assert_eq!(orders.len(), 3);
    let sl = &orders[1];
    assert_eq!(sl["type"], "STOP_MARKET");
    assert_eq!(sl["stopPrice"], "2940");
    assert_eq!(sl["side"], "SELL");
    assert_eq!(
        sl["clientOrderId"],
        client_order_id(j.job_id, Leg::StopLoss)
    );
    let tp = &orders[2];
    assert_eq!(tp["type"], "TAKE_PROFIT_MARKET");
    assert_eq!(tp["stopPrice"], "3120");
    assert_eq!(
        tp["clientOrderId"],
        client_order_id(j.job_id, Leg::TakeProfit)
    );

    let bad = creds(
        ExchangeKind::Aster,
        ASTER_KEY,
        ASTER_SECRET,
        None,
        json!({"leverage": 500}),
    );
    let e = AsterClient::new(&bad, &ctx(Duration::from_secs(1), &url, "x", "x")).unwrap_err();
    assert!(e.message.contains("1 to 125"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// OANDA fake
// ---------------------------------------------------------------------------------------------

const OANDA_TOKEN: &str = "oanda-token-abc123";
const OANDA_ACCOUNT: &str = "101-004-1234567-001";

struct OandaState {
    /// instrument -> (bid, ask, tradeUnitsPrecision, displayPrecision, minimumTradeSize)
    instruments: HashMap<&'static str, (Decimal, Decimal, u32, u32, Decimal)>,
    /// instrument -> net units
    positions: HashMap<String, Decimal>,
    orders: Vec<Value>,
    transactions: HashMap<String, Value>,
    trades: HashMap<String, Value>,
    next_id: u64,
    insufficient_margin: bool,
}

struct OandaFake {
    core: Core,
    st: Mutex<OandaState>,
}

impl OandaFake {
    async fn start() -> (Arc<OandaFake>, String) {
        let mut instruments = HashMap::new();
        instruments.insert("EUR_USD", (dec!(1.08500), dec!(1.08520), 0, 5, dec!(1)));
        instruments.insert("XAU_USD", (dec!(2000.00), dec!(2000.50), 2, 3, dec!(0.01)));
        let fake = Arc::new(OandaFake {
            core: Core::default(),
            st: Mutex::new(OandaState {
                instruments,
                positions: HashMap::new(),
                orders: vec![],
                transactions: HashMap::new(),
                trades: HashMap::new(),
                next_id: 6000,
                insufficient_margin: false,
            }),
        });
        let app = Router::new()
            .fallback(oanda_handle)
            .with_state(fake.clone());
        (fake, serve(app).await)
    }

    fn orders_with(&self, coid: &str) -> Vec<Value> {
        self.st
            .lock()
            .unwrap()
            .orders
            .iter()
            .filter(|o| o["clientExtensions"]["id"] == coid)
            .cloned()
            .collect()
    }
}

async fn oanda_handle(
    axum::extract::State(f): axum::extract::State<Arc<OandaFake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let prefix = format!("/v3/accounts/{OANDA_ACCOUNT}");
    let rest = uri.path().strip_prefix(&prefix).unwrap_or("?").to_string();
    // Route names without ids: "GET /orders/@", "PUT /positions/close", ...
    let route = {
        let r = if rest.starts_with("/orders/@") {
            "/orders/@".to_string()
        } else if rest.starts_with("/positions/") && rest.ends_with("/close") {
            "/positions/close".to_string()
        } else if rest.starts_with("/transactions/") {
            "/transactions/".to_string()
        } else if rest.starts_with("/trades/@") {
            "/trades/@/orders".to_string()
        } else {
            rest.clone()
        };
        format!("{method} {r}")
    };
    f.core.record(&route, &uri, &headers, &body);
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {OANDA_TOKEN}")) {
        return reply(
            401,
            json!({"errorMessage": "Insufficient authorization to perform request."}),
            &[],
        );
    }
    if !body.is_empty()
        && headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json")
    {
        return reply(
            415,
            json!({"errorMessage": "Content-Type must be application/json"}),
            &[],
        );
    }
    let q = params(uri.query().unwrap_or_default());
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let fc = f.clone();
    with_faults(&f.core, &route, move || {
        fc.process(&method, &rest, &q, &body)
    })
    .await
}

impl OandaFake {
    fn fill(
        st: &mut OandaState,
        instrument: &str,
        units: Decimal,
        coid: &str,
        trade_coid: Option<&str>,
    ) -> Value {
        let (bid, ask, ..) = st.instruments[instrument];
        let price = if units > Decimal::ZERO { ask } else { bid };
        let order_id = st.next_id.to_string();
        let fill_id = (st.next_id + 1).to_string();
        st.next_id += 2;
        *st.positions.entry(instrument.to_string()).or_default() += units;
        let fill = json!({"id": fill_id, "type": "ORDER_FILL", "orderID": order_id, "clientOrderID": coid,
            "instrument": instrument, "units": units.to_string(), "fullVWAP": price.to_string(),
            "price": price.to_string(), "pl": "0.0000", "tradeOpened": {"tradeID": fill_id, "units": units.to_string()}});
        st.transactions.insert(fill_id.clone(), fill.clone());
        if let Some(t) = trade_coid {
            st.trades
                .insert(t.to_string(), json!({"id": fill_id, "orders": []}));
        }
        st.orders.push(json!({"id": order_id, "state": "FILLED", "fillingTransactionID": fill_id,
            "instrument": instrument, "units": units.to_string(), "clientExtensions": {"id": coid}}));
        json!({"orderCreateTransaction": {"id": order_id, "type": "MARKET_ORDER", "units": units.to_string()},
            "orderFillTransaction": fill, "lastTransactionID": fill_id})
    }

    fn process(
        &self,
        method: &Method,
        rest: &str,
        q: &[(String, String)],
        body: &Value,
    ) -> (u16, Value) {
        let mut st = self.st.lock().unwrap();
        let inst_q = param(q, "instruments").unwrap_or_default().to_string();
        match (method.as_str(), rest) {
            ("GET", "/instruments") => match st.instruments.get(inst_q.as_str()) {
                Some((_, _, tup, dp, min)) => (
                    200,
                    json!({"instruments": [{"name": inst_q, "type": "CURRENCY",
                    "pipLocation": -4, "displayPrecision": dp, "tradeUnitsPrecision": tup,
                    "minimumTradeSize": min.to_string(), "marginRate": "0.0333"}], "lastTransactionID": "1"}),
                ),
                None => (
                    400,
                    json!({"errorMessage": "Invalid value specified for 'instruments'"}),
                ),
            },
            ("GET", "/pricing") => match st.instruments.get(inst_q.as_str()) {
                Some((bid, ask, ..)) => (
                    200,
                    json!({"prices": [{"type": "PRICE", "instrument": inst_q, "tradeable": true,
                    "bids": [{"price": bid.to_string(), "liquidity": 1000000}],
                    "asks": [{"price": ask.to_string(), "liquidity": 1000000}],
                    "closeoutBid": bid.to_string(), "closeoutAsk": ask.to_string()}]}),
                ),
                None => (
                    400,
                    json!({"errorMessage": "Invalid value specified for 'instruments'"}),
                ),
            },
            ("GET", "/openPositions") => {
                let positions: Vec<Value> = st.positions.iter().filter(|(_, u)| !u.is_zero()).map(|(i, u)| {
                    let (l, s) = if *u > Decimal::ZERO { (*u, Decimal::ZERO) } else { (Decimal::ZERO, *u) };
                    json!({"instrument": i, "long": {"units": l.to_string(), "averagePrice": "1.08520"},
                        "short": {"units": s.to_string(), "averagePrice": "1.08500"}})
                }).collect();
                (
                    200,
                    json!({"positions": positions, "lastTransactionID": "1"}),
                )
            }
            ("POST", "/orders") => {
                let o = &body["order"];
                let coid = o["clientExtensions"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if st
                    .orders
                    .iter()
                    .any(|x| x["clientExtensions"]["id"] == coid.as_str())
                {
                    return (
                        400,
                        json!({"orderRejectTransaction": {"type": "MARKET_ORDER_REJECT", "rejectReason": "CLIENT_ORDER_ID_ALREADY_EXISTS"},
                        "errorCode": "CLIENT_ORDER_ID_ALREADY_EXISTS", "errorMessage": "The Client Order ID specified is already in use"}),
                    );
                }
                let inst = o["instrument"].as_str().unwrap_or_default().to_string();
                let Some((_, _, tup, _, min)) = st.instruments.get(inst.as_str()).copied() else {
                    return (
                        400,
                        json!({"errorMessage": "Invalid value specified for 'instrument'", "errorCode": "INSTRUMENT_UNKNOWN"}),
                    );
                };
                let units_s = o["units"].as_str().unwrap_or("x").to_string();
                let Ok(units) = Decimal::from_str(&units_s) else {
                    return (
                        400,
                        json!({"errorMessage": "The request was missing required data"}),
                    );
                };
                if units.scale() > tup {
                    return (
                        400,
                        json!({"orderRejectTransaction": {"rejectReason": "UNITS_PRECISION_EXCEEDED"},
                        "errorCode": "UNITS_PRECISION_EXCEEDED", "errorMessage": "The units specified contain more precision than is allowed for the Order's instrument"}),
                    );
                }
                if units.abs() < min {
                    return (
                        400,
                        json!({"orderRejectTransaction": {"rejectReason": "UNITS_MIMIMUM_NOT_MET"},
                        "errorCode": "UNITS_MIMIMUM_NOT_MET", "errorMessage": "The Order's units do not meet the minimum"}),
                    );
                }
                let id = st.next_id.to_string();
                if st.insufficient_margin {
                    st.next_id += 2;
                    let cancel_id = (st.next_id - 1).to_string();
                    let cancel = json!({"id": cancel_id, "type": "ORDER_CANCEL", "orderID": id, "reason": "INSUFFICIENT_MARGIN"});
                    st.transactions.insert(cancel_id.clone(), cancel.clone());
                    st.orders.push(
                        json!({"id": id, "state": "CANCELLED", "cancellingTransactionID": cancel_id,
                        "clientExtensions": o["clientExtensions"].clone()}),
                    );
                    return (
                        201,
                        json!({"orderCreateTransaction": {"id": id, "type": "MARKET_ORDER"},
                        "orderCancelTransaction": cancel, "lastTransactionID": cancel_id}),
                    );
                }
                if o["type"] == "LIMIT" {
                    st.next_id += 1;
                    st.orders.push(
                        json!({"id": id, "state": "PENDING", "price": o["price"].clone(),
                        "clientExtensions": o["clientExtensions"].clone()}),
                    );
                    return (
                        201,
                        json!({"orderCreateTransaction": {"id": id, "type": "LIMIT_ORDER"}}),
                    );
                }
                let trade = o["tradeClientExtensions"]["id"]
                    .as_str()
                    .map(str::to_string);
                let mut r = Self::fill(&mut st, &inst, units, &coid, trade.as_deref());
                if let Some(last) = st.orders.last_mut() {
                    last["request"] = o.clone();
                }
                // Stop-loss / take-profit on fill: pending orders created with the trade.
                for (key, kind) in [
                    ("stopLossOnFill", "stopLoss"),
                    ("takeProfitOnFill", "takeProfit"),
                ] {
                    if o[key].is_object() {
                        let id = st.next_id.to_string();
                        st.next_id += 1;
                        st.orders.push(json!({"id": id, "state": "PENDING", "type": kind, "price": o[key]["price"].clone(),
                            "clientExtensions": o[key]["clientExtensions"].clone(), "tradeClientID": trade.clone()}));
                        r[format!("{kind}OrderTransaction")] = json!({"id": id});
                    }
                }
                (201, r)
            }
            ("PUT", r) if r.starts_with("/positions/") && r.ends_with("/close") => {
                let inst = r
                    .trim_start_matches("/positions/")
                    .trim_end_matches("/close")
                    .to_string();
                let net = st.positions.get(&inst).copied().unwrap_or_default();
                let (prefix, units, ext) = if body["longUnits"] == "ALL" {
                    ("long", -net, &body["longClientExtensions"])
                } else {
                    ("short", -net, &body["shortClientExtensions"])
                };
                if (prefix == "long" && net <= Decimal::ZERO)
                    || (prefix == "short" && net >= Decimal::ZERO)
                {
                    return (
                        400,
                        json!({format!("{prefix}OrderRejectTransaction"): {"rejectReason": "CLOSEOUT_POSITION_DOESNT_EXIST"},
                        "errorCode": "CLOSEOUT_POSITION_DOESNT_EXIST", "errorMessage": "The Position requested to be closed out does not exist"}),
                    );
                }
                let coid = ext["id"].as_str().unwrap_or_default().to_string();
                let r = Self::fill(&mut st, &inst, units, &coid, None);
                (
                    200,
                    json!({format!("{prefix}OrderCreateTransaction"): r["orderCreateTransaction"].clone(),
                    format!("{prefix}OrderFillTransaction"): r["orderFillTransaction"].clone(), "lastTransactionID": "1"}),
                )
            }
            ("GET", r) if r.starts_with("/orders/@") => {
                let coid = &r["/orders/@".len()..];
                match st
                    .orders
                    .iter()
                    .rev()
                    .find(|o| o["clientExtensions"]["id"] == coid)
                {
                    Some(o) => (200, json!({"order": o, "lastTransactionID": "1"})),
                    None => (
                        404,
                        json!({"errorCode": "ORDER_DOESNT_EXIST", "errorMessage": "The order ID specified does not exist"}),
                    ),
                }
            }
            ("GET", r) if r.starts_with("/transactions/") => {
                let id = &r["/transactions/".len()..];
                match st.transactions.get(id) {
                    Some(t) => (200, json!({"transaction": t})),
                    None => (404, json!({"errorMessage": "Transaction not found"})),
                }
            }
            ("PUT", r) if r.starts_with("/trades/@") => {
                let coid = r
                    .trim_start_matches("/trades/@")
                    .trim_end_matches("/orders")
                    .to_string();
                if !st.trades.contains_key(&coid) {
                    return (
                        404,
                        json!({"errorCode": "NO_SUCH_TRADE", "errorMessage": "The Trade specified does not exist"}),
                    );
                }
                let mut out = json!({});
                for key in ["stopLoss", "takeProfit"] {
                    if body[key].is_object() {
                        let id = st.next_id.to_string();
                        st.next_id += 1;
                        st.orders.push(json!({"id": id, "state": "PENDING", "type": key, "price": body[key]["price"].clone(),
                            "clientExtensions": body[key]["clientExtensions"].clone(), "tradeClientID": coid}));
                        out[format!("{key}OrderTransaction")] = json!({"id": id});
                    }
                }
                (200, out)
            }
            _ => (
                404,
                json!({"errorMessage": format!("no route {method} {rest}")}),
            ),
        }
    }
}

fn oanda_client(url: &str, timeout: Duration) -> OandaClient {
    let c = creds(
        ExchangeKind::Oanda,
        OANDA_TOKEN,
        "unused",
        Some(OANDA_ACCOUNT),
        json!({}),
    );
    OandaClient::new(&c, &ctx(timeout, "http://unused", url, "http://unused")).unwrap()
}

#[tokio::test]
async fn oanda_market_order_shape_units_and_protection() {
    let (fake, url) = OandaFake::start().await;
    let ex = oanda_client(&url, Duration::from_secs(5));
    // 100 USD at the mid 1.0851 = 92.157.. -> 92 units (tradeUnitsPrecision 0)
    let mut j = job(ExchangeKind::Oanda, Action::Sell, "OANDA:EURUSD", dec!(100));
    j.alert.stop_loss_percent = Some(dec!(1));
    j.alert.take_profit_percent = Some(dec!(2));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let open_id = client_order_id(j.job_id, Leg::Open);
    let orders = fake.orders_with(&open_id);
    assert_eq!(orders.len(), 1);
    let req = &orders[0]["request"];
    assert_eq!(req["type"], "MARKET");
    assert_eq!(req["instrument"], "EUR_USD");
    assert_eq!(req["units"], "-92");
    assert_eq!(req["timeInForce"], "FOK");
    assert_eq!(req["positionFill"], "DEFAULT");
    assert_eq!(req["tradeClientExtensions"]["id"], open_id.as_str());
    assert_eq!(out.fills[0].quantity, dec!(92));
    assert_eq!(out.fills[0].price, Some(dec!(1.085)));
    // Stop-loss / take-profit sent on fill with the order, at 1% / 2% from the reference price
    // (the mid, 1.0851), rounded to the instrument's 5 places; no separate call afterwards.
    assert_eq!(req["stopLossOnFill"]["price"], "1.09595");
    assert_eq!(req["takeProfitOnFill"]["price"], "1.0634");
    assert_eq!(
        req["stopLossOnFill"]["clientExtensions"]["id"],
        client_order_id(j.job_id, Leg::StopLoss).as_str()
    );
    let sl = fake.orders_with(&client_order_id(j.job_id, Leg::StopLoss));
    assert_eq!(sl[0]["price"], "1.09595");
    let tp = fake.orders_with(&client_order_id(j.job_id, Leg::TakeProfit));
    assert_eq!(tp[0]["price"], "1.0634");
    assert!(fake
        .core
        .routes()
        .iter()
        .all(|r| !r.starts_with("PUT /trades")));
    let pos = match &out.position {
        sparky::executor::PositionChange::Open {
            stop_loss_price,
            take_profit_price,
            ..
        } => (*stop_loss_price, *take_profit_price),
        other => panic!("{other:?}"),
    };
    assert_eq!(pos, (Some(dec!(1.09595)), Some(dec!(1.0634))));
    assert_eq!(fake.st.lock().unwrap().positions["EUR_USD"], dec!(-92));
    let seen = &fake.core.seen("POST /orders")[0];
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {OANDA_TOKEN}")
    );
    assert!(!format!("{ex:?}").contains(OANDA_TOKEN));
}

#[tokio::test]
async fn oanda_units_are_rounded_to_the_precision_and_minimum_enforced() {
    let (fake, url) = OandaFake::start().await;
    let ex = oanda_client(&url, Duration::from_secs(5));
    let rules = ex
        .symbol_rules(&Symbol::parse("XAU_USD", ExchangeKind::Oanda).unwrap())
        .await
        .unwrap();
    assert_eq!(
        (rules.step, rules.min_qty, rules.tick),
        (dec!(0.01), dec!(0.01), dec!(0.001))
    );
    let ack = ex
        .place_order(&OrderRequest {
            on_fill: None,
            symbol: Symbol::parse("XAU_USD", ExchangeKind::Oanda).unwrap(),
            side: OrderSide::Buy,
            quantity: dec!(0.0567),
            order_type: OrderType::Market,
            limit_price: None,
            reduce_only: false,
            leg: Leg::Open,
            client_order_id: "spxau".into(),
        })
        .await
        .unwrap();
    assert_eq!(ack.filled_qty, dec!(0.05));
    assert_eq!(fake.orders_with("spxau")[0]["request"]["units"], "0.05");
    // A reversal to short with 10 USD of gold at ~2000 rounds to 0.00 oz: refused before anything
    // is sent, so the long position is not closed either.
    let out = run(
        &ex,
        &job(ExchangeKind::Oanda, Action::Sell, "XAU_USD", dec!(10)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Rejected, "{out:?}");
    assert!(out
        .message
        .unwrap()
        .contains("below the minimum quantity 0.01"));
    assert_eq!(fake.core.seen("POST /orders").len(), 1);
    assert!(fake.core.seen("PUT /positions/close").is_empty());
    assert_eq!(fake.st.lock().unwrap().positions["XAU_USD"], dec!(0.05));
}

#[tokio::test]
async fn oanda_201_with_order_cancel_is_a_rejection_not_a_fill() {
    let (fake, url) = OandaFake::start().await;
    fake.st.lock().unwrap().insufficient_margin = true;
    let ex = oanda_client(&url, Duration::from_secs(5));
    let out = run(
        &ex,
        &job(ExchangeKind::Oanda, Action::Buy, "EUR_USD", dec!(100)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Rejected, "{out:?}");
    assert!(
        out.message
            .as_ref()
            .unwrap()
            .contains("INSUFFICIENT_MARGIN"),
        "{out:?}"
    );
    assert!(out.fills.is_empty());
    assert_eq!(fake.core.seen("POST /orders").len(), 1);
}

#[tokio::test]
async fn oanda_reversal_closes_through_the_positions_endpoint_then_opens() {
    let (fake, url) = OandaFake::start().await;
    fake.st
        .lock()
        .unwrap()
        .positions
        .insert("EUR_USD".into(), dec!(500));
    let ex = oanda_client(&url, Duration::from_secs(5));
    let j = job(ExchangeKind::Oanda, Action::Sell, "EUR_USD", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let routes: Vec<_> = fake
        .core
        .routes()
        .into_iter()
        .filter(|r| r.starts_with("PUT") || r.starts_with("POST"))
        .collect();
    assert_eq!(routes, vec!["PUT /positions/close", "POST /orders"]);
    let close = &fake.core.seen("PUT /positions/close")[0];
    let b: Value = serde_json::from_str(&close.body).unwrap();
    assert_eq!(b["longUnits"], "ALL");
    assert_eq!(
        b["longClientExtensions"]["id"],
        client_order_id(j.job_id, Leg::Close)
    );
    assert_eq!(fake.st.lock().unwrap().positions["EUR_USD"], dec!(-92));
    assert_eq!(out.fills[0].quantity, dec!(500));
}

#[tokio::test]
async fn oanda_timeout_and_503_after_recording_leave_one_order() {
    let (fake, url) = OandaFake::start().await;
    fake.core.inject(
        "POST /orders",
        Fault::HangAfterDoing(Duration::from_secs(3)),
    );
    let ex = oanda_client(&url, Duration::from_millis(700));
    let j = job(ExchangeKind::Oanda, Action::Buy, "EUR_USD", dec!(100));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(
        fake.orders_with(&client_order_id(j.job_id, Leg::Open))
            .len(),
        1
    );
    assert_eq!(out.fills[0].quantity, dec!(92));
    assert_eq!(out.fills[0].price, Some(dec!(1.0852)));

    fake.core.inject(
        "PUT /positions/close",
        Fault::AfterDoing(503, json!({"errorMessage": "Service Unavailable"})),
    );
    let j = job(ExchangeKind::Oanda, Action::Close, "EUR_USD", dec!(1));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(
        fake.orders_with(&client_order_id(j.job_id, Leg::Close))
            .len(),
        1
    );
    assert_eq!(fake.core.seen("PUT /positions/close").len(), 1);
    assert_eq!(fake.st.lock().unwrap().positions["EUR_USD"], dec!(0));

    // a retried open whose first send got through: OANDA refuses the id, the client finds the order
    let order = OrderRequest {
        on_fill: None,
        symbol: Symbol::parse("EUR_USD", ExchangeKind::Oanda).unwrap(),
        side: OrderSide::Buy,
        quantity: dec!(10),
        order_type: OrderType::Market,
        limit_price: None,
        reduce_only: false,
        leg: Leg::Open,
        client_order_id: "sprepeat".into(),
    };
    let a = ex.place_order(&order).await.unwrap();
    let b = ex.place_order(&order).await.unwrap();
    assert_eq!(a.exchange_order_id, b.exchange_order_id);
    assert_eq!(b.state, OrderState::Filled);
    assert_eq!(b.filled_qty, dec!(10));
    assert_eq!(fake.orders_with("sprepeat").len(), 1);
}

#[tokio::test]
async fn oanda_auth_and_rate_limit_errors_are_classified() {
    let (fake, url) = OandaFake::start().await;
    let c = creds(
        ExchangeKind::Oanda,
        "wrong",
        "unused",
        Some(OANDA_ACCOUNT),
        json!({}),
    );
    let bad = OandaClient::new(&c, &ctx(Duration::from_secs(5), "x", &url, "x")).unwrap();
    let sym = Symbol::parse("EUR_USD", ExchangeKind::Oanda).unwrap();
    let e = bad.price(&sym).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert!(e.message.contains("Insufficient authorization"), "{e}");

    fake.core.inject(
        "GET /pricing",
        Fault::Reply(
            429,
            json!("Too Many Requests"),
            vec![("Retry-After", "2".into())],
        ),
    );
    let ex = oanda_client(&url, Duration::from_secs(5));
    let e = ex.price(&sym).await.unwrap_err();
    assert_eq!(
        (e.class, e.retry_after),
        (ErrorClass::Transient, Some(Duration::from_secs(2)))
    );
    assert_eq!(ex.price(&sym).await.unwrap(), dec!(1.0851));

    let c = creds(ExchangeKind::Oanda, OANDA_TOKEN, "x", None, json!({}));
    let e = OandaClient::new(&c, &ctx(Duration::from_secs(1), "x", &url, "x")).unwrap_err();
    assert!(e.message.contains("account id"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Tradier fake
// ---------------------------------------------------------------------------------------------

const TRADIER_TOKEN: &str = "tradier-token-xyz789";
const TRADIER_ACCOUNT: &str = "VA000001";

struct TradierState {
    prices: HashMap<&'static str, Decimal>,
    positions: HashMap<String, Decimal>,
    orders: Vec<Value>,
    next_id: u64,
    /// Answer order placement with HTTP 200 + `errors`.
    reject_200: Option<String>,
    /// Report new market orders as `pending` on the first read.
    pending_first: bool,
}

struct TradierFake {
    core: Core,
    st: Mutex<TradierState>,
}

impl TradierFake {
    async fn start() -> (Arc<TradierFake>, String) {
        let prices = HashMap::from([("AAPL", dec!(190.00)), ("SPY", dec!(500.00))]);
        let fake = Arc::new(TradierFake {
            core: Core::default(),
            st: Mutex::new(TradierState {
                prices,
                positions: HashMap::new(),
                orders: vec![],
                next_id: 257459,
                reject_200: None,
                pending_first: false,
            }),
        });
        let app = Router::new()
            .fallback(tradier_handle)
            .with_state(fake.clone());
        (fake, serve(app).await)
    }

    fn orders_tagged(&self, tag: &str) -> Vec<Value> {
        self.st
            .lock()
            .unwrap()
            .orders
            .iter()
            .filter(|o| o["tag"] == tag)
            .cloned()
            .collect()
    }
}

/// Tradier's collection shapes: "null" when empty, an object when one, a list otherwise.
fn tradier_collection(items: Vec<Value>) -> Value {
    match items.len() {
        0 => json!("null"),
        1 => items.into_iter().next().unwrap(),
        _ => Value::Array(items),
    }
}

async fn tradier_handle(
    axum::extract::State(f): axum::extract::State<Arc<TradierFake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let acct = format!("/v1/accounts/{TRADIER_ACCOUNT}");
    let path = uri.path().to_string();
    let route = if let Some(rest) = path.strip_prefix(&format!("{acct}/orders/")) {
        let _ = rest;
        format!("{method} /orders/id")
    } else {
        format!("{method} {}", path.replace(&acct, ""))
    };
    f.core.record(&route, &uri, &headers, &body);
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {TRADIER_TOKEN}"))
    {
        return reply(401, json!("Invalid Access Token"), &[]);
    }
    if headers.get("accept").and_then(|v| v.to_str().ok()) != Some("application/json") {
        return reply(200, json!("<?xml version=\"1.0\"?><response/>"), &[]);
    }
    let q = params(uri.query().unwrap_or_default());
    let form = params(&body);
    let fc = f.clone();
    let r = route.clone();
    with_faults(&f.core, &route, move || fc.process(&r, &path, &q, &form)).await
}

impl TradierFake {
    fn process(
        &self,
        route: &str,
        path: &str,
        q: &[(String, String)],
        form: &[(String, String)],
    ) -> (u16, Value) {
        let mut st = self.st.lock().unwrap();
        match route {
            "GET /v1/markets/quotes" => {
                let sym = param(q, "symbols").unwrap_or_default();
                match st.prices.get(sym) {
                    Some(p) => (
                        200,
                        json!({"quotes": {"quote": {"symbol": sym, "last": serde_json::Number::from_str(&p.to_string()).unwrap(),
                        "bid": 189.99, "ask": 190.01, "type": "stock"}}}),
                    ),
                    None => (
                        200,
                        json!({"quotes": {"unmatched_symbols": {"symbol": sym}}}),
                    ),
                }
            }
            "GET /positions" => {
                let items: Vec<Value> = st.positions.iter().filter(|(_, q)| !q.is_zero()).map(|(s, q)| json!({
                    "cost_basis": serde_json::Number::from_str(&(q.abs() * st.prices[s.as_str()]).to_string()).unwrap(),
                    "date_acquired": "2024-01-01T00:00:00.000Z", "id": 1, "quantity": serde_json::Number::from_str(&q.to_string()).unwrap(),
                    "symbol": s})).collect();
                (
                    200,
                    json!({"positions": if items.is_empty() { json!("null") } else { json!({"position": tradier_collection(items)}) }}),
                )
            }
            "POST /orders" => {
                if let Some(msg) = &st.reject_200 {
                    return (200, json!({"errors": {"error": [msg]}}));
                }
                let sym = param(form, "symbol").unwrap_or_default().to_string();
                let side = param(form, "side").unwrap_or_default().to_string();
                let class = param(form, "class").unwrap_or_default().to_string();
                let tag = param(form, "tag").unwrap_or_default().to_string();
                if tag.len() > 255 || !tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                    return (400, json!({"errors": {"error": "Invalid tag"}}));
                }
                let id = st.next_id;
                st.next_id += 1;
                let mut order = json!({"id": id, "tag": tag, "class": class, "symbol": sym, "side": side,
                    "type": param(form, "type"), "duration": param(form, "duration"), "status": "open",
                    "exec_quantity": 0.0, "avg_fill_price": 0.0, "form": form.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>()});
                if class == "equity" && param(form, "type") == Some("market") {
                    let qty = d(param(form, "quantity").unwrap_or("0"));
                    if qty.fract() != Decimal::ZERO || qty < Decimal::ONE {
                        return (400, json!({"errors": {"error": "IncorrectOrderQuantity"}}));
                    }
                    let pos = st.positions.get(&sym).copied().unwrap_or_default();
                    let ok = match side.as_str() {
                        "buy" => pos >= Decimal::ZERO,
                        "sell" => pos >= qty,
                        "sell_short" => pos <= Decimal::ZERO,
                        "buy_to_cover" => -pos >= qty,
                        _ => false,
                    };
                    if !ok {
                        return (
                            400,
                            json!({"errors": {"error": format!("side {side} does not match the position {pos}")}}),
                        );
                    }
                    let signed = if side.starts_with("buy") { qty } else { -qty };
                    *st.positions.entry(sym.clone()).or_default() += signed;
                    let price = st.prices[sym.as_str()];
                    order["status"] = json!(if st.pending_first {
                        "pending"
                    } else {
                        "filled"
                    });
                    order["quantity"] = serde_json::Number::from_str(&qty.to_string())
                        .unwrap()
                        .into();
                    order["exec_quantity"] = serde_json::Number::from_str(&format!("{qty}.0"))
                        .unwrap()
                        .into();
                    order["avg_fill_price"] = serde_json::Number::from_str(&format!("{price}"))
                        .unwrap()
                        .into();
                }
                st.orders.push(order);
                (
                    200,
                    json!({"order": {"id": id, "status": "ok", "partner_id": "c4998eb7-06e8-4820-a7ab-55d9760065fb"}}),
                )
            }
            "GET /orders/id" => {
                let id: u64 = path.rsplit('/').next().unwrap().parse().unwrap_or(0);
                match st.orders.iter_mut().find(|o| o["id"] == id) {
                    Some(o) => {
                        let out = o.clone();
                        if o["status"] == "pending" {
                            o["status"] = json!("filled");
                        }
                        (200, json!({"order": out}))
                    }
                    None => (404, json!("Order not found")),
                }
            }
            "GET /orders" => {
                // Pages of at most `limit` (default 25), "null" past the end.
                let limit: usize = param(q, "limit")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(25)
                    .min(25);
                let page: usize = param(q, "page").and_then(|l| l.parse().ok()).unwrap_or(1);
                let items: Vec<Value> = st
                    .orders
                    .iter()
                    .skip((page - 1) * limit)
                    .take(limit)
                    .cloned()
                    .collect();
                (
                    200,
                    json!({"orders": if items.is_empty() { json!("null") } else { json!({"order": tradier_collection(items)}) }}),
                )
            }
            _ => (404, json!(format!("no route {route}"))),
        }
    }
}

fn tradier_client(url: &str, timeout: Duration) -> TradierClient {
    let c = creds(
        ExchangeKind::Tradier,
        TRADIER_TOKEN,
        "unused",
        Some(TRADIER_ACCOUNT),
        json!({}),
    );
    TradierClient::new(&c, &ctx(timeout, "http://unused", "http://unused", url)).unwrap()
}

#[tokio::test]
async fn tradier_order_shape_sides_and_whole_shares() {
    let (fake, url) = TradierFake::start().await;
    let ex = tradier_client(&url, Duration::from_secs(5));
    // 1000 USD of AAPL at 190 = 5.26 -> 5 shares, opened short with sell_short
    let j = job(
        ExchangeKind::Tradier,
        Action::Sell,
        "NASDAQ:AAPL",
        dec!(1000),
    );
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let post = &fake.core.seen("POST /orders")[0];
    let p = params(&post.body);
    assert_eq!(
        post.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(post.headers["accept"], "application/json");
    assert_eq!(param(&p, "class"), Some("equity"));
    assert_eq!(param(&p, "symbol"), Some("AAPL"));
    assert_eq!(param(&p, "side"), Some("sell_short"));
    assert_eq!(param(&p, "quantity"), Some("5"));
    assert_eq!(param(&p, "type"), Some("market"));
    assert_eq!(param(&p, "duration"), Some("day"));
    let open_id = client_order_id(j.job_id, Leg::Open);
    assert_eq!(param(&p, "tag"), Some(open_id.as_str()));
    assert_eq!(
        (out.fills[0].quantity, out.fills[0].price),
        (dec!(5), Some(dec!(190)))
    );

    // Reversal: buy_to_cover the 5 short shares, then buy 5
    let j = job(ExchangeKind::Tradier, Action::Buy, "AAPL", dec!(1000));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let sides: Vec<_> = fake
        .st
        .lock()
        .unwrap()
        .orders
        .iter()
        .map(|o| o["side"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sides, vec!["sell_short", "buy_to_cover", "buy"]);
    assert_eq!(fake.st.lock().unwrap().positions["AAPL"], dec!(5));
    // and a close of a long position is a plain sell
    let out = run(
        &ex,
        &job(ExchangeKind::Tradier, Action::Close, "AAPL", dec!(1)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(fake.st.lock().unwrap().orders[3]["side"], "sell");

    // less than one share never reaches Tradier
    let out = run(
        &ex,
        &job(ExchangeKind::Tradier, Action::Buy, "SPY", dec!(100)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Rejected);
    assert!(out.message.unwrap().contains("rounds down to 0"));
    let e = ex
        .place_order(&OrderRequest {
            on_fill: None,
            symbol: Symbol::parse("SPY", ExchangeKind::Tradier).unwrap(),
            side: OrderSide::Buy,
            quantity: dec!(0.4),
            order_type: OrderType::Market,
            limit_price: None,
            reduce_only: false,
            leg: Leg::Open,
            client_order_id: "x".into(),
        })
        .await
        .unwrap_err();
    assert!(e.message.contains("less than one share"), "{e}");
    assert_eq!(fake.core.seen("POST /orders").len(), 4);
}

#[tokio::test]
async fn tradier_quirks_null_single_object_and_pending_fill() {
    let (fake, url) = TradierFake::start().await;
    fake.st.lock().unwrap().pending_first = true;
    let ex = tradier_client(&url, Duration::from_secs(5));
    let sym = Symbol::parse("AAPL", ExchangeKind::Tradier).unwrap();
    // {"positions":"null"}
    assert_eq!(ex.position(&sym).await.unwrap(), None);
    // a single quote object
    assert_eq!(ex.price(&sym).await.unwrap(), dec!(190));
    let e = ex
        .price(&Symbol::parse("NOPE", ExchangeKind::Tradier).unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    let out = run(
        &ex,
        &job(ExchangeKind::Tradier, Action::Buy, "AAPL", dec!(400)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(
        out.fills[0].status,
        sparky::job::FillState::Filled,
        "read back until filled"
    );
    // a single position object
    let p = ex.position(&sym).await.unwrap().unwrap();
    assert_eq!(
        (p.side, p.quantity, p.entry_price),
        (Side::Long, dec!(2), Some(dec!(190)))
    );
}

#[tokio::test]
async fn tradier_200_with_errors_is_a_rejection() {
    let (fake, url) = TradierFake::start().await;
    fake.st.lock().unwrap().reject_200 = Some("DayTradingBuyingPowerExceeded".into());
    let ex = tradier_client(&url, Duration::from_secs(5));
    let out = run(
        &ex,
        &job(ExchangeKind::Tradier, Action::Buy, "AAPL", dec!(400)),
    )
    .await;
    assert_eq!(out.status, JobStatus::Rejected, "{out:?}");
    assert!(out
        .message
        .unwrap()
        .contains("DayTradingBuyingPowerExceeded"));
    assert_eq!(fake.core.seen("POST /orders").len(), 1);
}

#[tokio::test]
async fn tradier_unknown_outcome_is_found_by_tag_across_pages() {
    let (fake, url) = TradierFake::start().await;
    let ex = tradier_client(&url, Duration::from_millis(700));
    // 30 earlier orders today: the one we look for is on the second page.
    {
        let mut st = fake.st.lock().unwrap();
        for i in 0..30 {
            st.orders.push(json!({"id": i, "tag": format!("other{i}"), "status": "filled", "exec_quantity": 1.0}));
        }
    }
    fake.core.inject(
        "POST /orders",
        Fault::HangAfterDoing(Duration::from_secs(3)),
    );
    let j = job(ExchangeKind::Tradier, Action::Buy, "AAPL", dec!(400));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let open_id = client_order_id(j.job_id, Leg::Open);
    assert_eq!(fake.orders_tagged(&open_id).len(), 1);
    assert_eq!(fake.core.seen("POST /orders").len(), 1);
    let pages: Vec<_> = fake
        .core
        .seen("GET /orders")
        .iter()
        .map(|s| param(&params(&s.query), "page").unwrap().to_string())
        .collect();
    assert!(pages.contains(&"2".to_string()), "{pages:?}");
    assert_eq!(fake.st.lock().unwrap().positions["AAPL"], dec!(2));

    // 503 after recording, on a close
    fake.core.inject(
        "POST /orders",
        Fault::AfterDoing(503, json!("Service Unavailable")),
    );
    let j = job(ExchangeKind::Tradier, Action::Close, "AAPL", dec!(1));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    assert_eq!(
        fake.orders_tagged(&client_order_id(j.job_id, Leg::Close))
            .len(),
        1
    );
    assert_eq!(fake.st.lock().unwrap().positions["AAPL"], dec!(0));
}

#[tokio::test]
async fn tradier_quota_violation_and_429_are_transient() {
    let (fake, url) = TradierFake::start().await;
    fake.core.inject(
        "POST /orders",
        Fault::Reply(400, json!("Quota Violation"), vec![]),
    );
    fake.core.inject(
        "POST /orders",
        Fault::Reply(
            429,
            json!("Rate limit exceeded"),
            vec![("Retry-After", "1".into())],
        ),
    );
    let ex = tradier_client(&url, Duration::from_secs(5));
    let j = job(ExchangeKind::Tradier, Action::Buy, "AAPL", dec!(400));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let classes: Vec<_> = out.history.iter().map(|h| h.class.as_str()).collect();
    assert_eq!(classes, vec!["transient", "transient"]);
    assert_eq!(
        fake.orders_tagged(&client_order_id(j.job_id, Leg::Open))
            .len(),
        1
    );
}

#[tokio::test]
async fn tradier_protection_is_one_oco_order() {
    let (fake, url) = TradierFake::start().await;
    let ex = tradier_client(&url, Duration::from_secs(5));
    let mut j = job(ExchangeKind::Tradier, Action::Buy, "SPY", dec!(1000));
    j.alert.stop_loss_percent = Some(dec!(5));
    j.alert.take_profit_percent = Some(dec!(10));
    let out = run(&ex, &j).await;
    assert_eq!(out.status, JobStatus::Succeeded, "{out:?}");
    let oco = fake.orders_tagged(&client_order_id(j.job_id, Leg::StopLoss));
    assert_eq!(oco.len(), 1);
    let form: Vec<(String, String)> = oco[0]["form"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| {
            (
                kv[0].as_str().unwrap().into(),
                kv[1].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(param(&form, "class"), Some("oco"));
    assert_eq!(param(&form, "side[0]"), Some("sell"));
    assert_eq!(param(&form, "price[0]"), Some("550"));
    assert_eq!(param(&form, "stop[1]"), Some("475"));
    assert_eq!(param(&form, "quantity[1]"), Some("2"));
}

// ---------------------------------------------------------------------------------------------
// End to end: webhook -> worker -> fake broker -> Postgres
// ---------------------------------------------------------------------------------------------

/// An Aster fake, an app whose worker talks to it, and a user with Aster credentials.
pub(crate) async fn aster_app() -> (Arc<AsterFake>, String, TestApp, Uuid, String) {
    let (fake, url) = AsterFake::start().await;
    let app = TestApp::spawn_with(|c| c.aster_base_url = Some(url.clone())).await;
    let (user, secret) = app.create_user().await;
    store_credentials(
        &app,
        user,
        "aster",
        ASTER_KEY,
        ASTER_SECRET,
        None,
        json!({}),
    )
    .await;
    (fake, url, app, user, secret)
}

#[tokio::test]
async fn e2e_aster_buy_reversal_unknown_outcome_and_rejection() {
    let (fake, _, app, user, secret) = aster_app().await;

    // buy -> filled and recorded
    let buy = app
        .enqueue(&webhook(
            user,
            &secret,
            "aster",
            "buy",
            "BINANCE:ETHUSDT",
            100,
        ))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(buy).await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded, "{job:?}");
    let trades = app.trades(user).await;
    assert_eq!(trades.len(), 1);
    assert_eq!(
        (trades[0].quantity, trades[0].price),
        (dec!(0.033), Some(dec!(3000)))
    );
    assert_eq!(trades[0].exchange_order_id.as_deref(), Some("1000"));
    assert_eq!(trades[0].client_order_id, client_order_id(buy, Leg::Open));

    // sell -> reversal: close then open. The close first fails with a 500 (retried; every leg is
    // looked up first), then the open's reply is lost after Aster filled it (503 -1007).
    let route = "POST /fapi/v1/order";
    fake.core.inject(
        route,
        Fault::Reply(500, json!({"code": -1001, "msg": "Internal error"}), vec![]),
    );
    fake.core.inject(route, Fault::Pass);
    fake.core.inject(
        route,
        Fault::AfterDoing(
            503,
            json!({"code": -1007, "msg": "execution status unknown"}),
        ),
    );
    let sell = app
        .enqueue(&webhook(user, &secret, "aster", "sell", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(sell).await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded, "{job:?}");
    let legs: Vec<_> = app
        .trades(user)
        .await
        .into_iter()
        .filter(|t| t.job_id == sell)
        .map(|t| (t.leg, t.side, t.quantity))
        .collect();
    assert!(
        legs.contains(&("close".into(), "sell".into(), dec!(0.033))),
        "{legs:?}"
    );
    assert!(
        legs.contains(&("open".into(), "sell".into(), dec!(0.033))),
        "{legs:?}"
    );
    assert_eq!(fake.orders_with(&client_order_id(sell, Leg::Close)), 1);
    assert_eq!(fake.orders_with(&client_order_id(sell, Leg::Open)), 1);
    let p = app.position(user, "ETHUSDT").await.unwrap();
    assert_eq!((p.side, p.quantity), (Side::Short, dec!(0.033)));

    // close with the reply lost after the order was recorded: found by lookup, one order
    fake.core.inject(
        "POST /fapi/v1/order",
        Fault::AfterDoing(
            503,
            json!({"code": -1007, "msg": "execution status unknown"}),
        ),
    );
    let close = app
        .enqueue(&webhook(user, &secret, "aster", "close", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    assert_eq!(
        app.job(close).await.status,
        sparky::job::JobStatus::Succeeded
    );
    assert_eq!(fake.orders_with(&client_order_id(close, Leg::Close)), 1);
    assert!(app.position(user, "ETHUSDT").await.is_none());

    // permanent rejection: the broker's message is the job's error
    fake.st.lock().unwrap().margin_limit = Some(dec!(10));
    let rej = app
        .enqueue(&webhook(user, &secret, "aster", "buy", "ETHUSDT", 100))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(rej).await;
    assert_eq!(job.status, sparky::job::JobStatus::Rejected);
    assert_eq!(job.error_class, Some(sparky::job::FailureClass::Permanent));
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("Margin is insufficient."),
        "{job:?}"
    );

    // no secret in the logs
    let logs = captured_logs();
    assert!(!logs.contains(ASTER_SECRET));
    app.cleanup().await;
}

#[tokio::test]
async fn e2e_oanda_buy_reversal_unknown_outcome_and_rejection() {
    let (fake, url) = OandaFake::start().await;
    let app = TestApp::spawn_with(|c| c.oanda_base_url = Some(url.clone())).await;
    let (user, secret) = app.create_user().await;
    store_credentials(
        &app,
        user,
        "oanda",
        OANDA_TOKEN,
        "-",
        Some(OANDA_ACCOUNT),
        json!({}),
    )
    .await;

    let buy = app
        .enqueue(&webhook(user, &secret, "oanda", "buy", "EURUSD", 100))
        .await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(buy).await.status, sparky::job::JobStatus::Succeeded);
    let t = &app.trades(user).await[0];
    assert_eq!(
        (t.symbol.as_str(), t.quantity, t.price),
        ("EUR_USD", dec!(92), Some(dec!(1.0852)))
    );

    // reversal, with the open's reply lost after OANDA filled it
    fake.core.inject(
        "POST /orders",
        Fault::AfterDoing(503, json!({"errorMessage": "Service Unavailable"})),
    );
    let sell = app
        .enqueue(&webhook(user, &secret, "oanda", "sell", "EUR_USD", 100))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(sell).await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded, "{job:?}");
    assert_eq!(fake.orders_with(&client_order_id(sell, Leg::Open)).len(), 1);
    assert_eq!(
        fake.orders_with(&client_order_id(sell, Leg::Close)).len(),
        1
    );
    assert_eq!(fake.st.lock().unwrap().positions["EUR_USD"], dec!(-92));
    let p = app.position(user, "EUR_USD").await.unwrap();
    assert_eq!((p.side, p.quantity), (Side::Short, dec!(92)));

    // margin rejection arrives as a 201
    fake.st.lock().unwrap().insufficient_margin = true;
    let close = app
        .enqueue(&webhook(user, &secret, "oanda", "close", "EUR_USD", 100))
        .await;
    app.run_worker_until_idle().await;
    assert_eq!(
        app.job(close).await.status,
        sparky::job::JobStatus::Succeeded,
        "closes go through the positions endpoint"
    );
    let rej = app
        .enqueue(&webhook(user, &secret, "oanda", "buy", "EUR_USD", 100))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(rej).await;
    assert_eq!(job.status, sparky::job::JobStatus::Rejected);
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("INSUFFICIENT_MARGIN"),
        "{job:?}"
    );
    assert!(!captured_logs().contains(OANDA_TOKEN));
    app.cleanup().await;
}

#[tokio::test]
async fn e2e_tradier_buy_reversal_unknown_outcome_and_rejection() {
    let (fake, url) = TradierFake::start().await;
    let app = TestApp::spawn_with(|c| c.tradier_base_url = Some(format!("{url}/v1"))).await;
    let (user, secret) = app.create_user().await;
    store_credentials(
        &app,
        user,
        "tradier",
        TRADIER_TOKEN,
        "-",
        Some(TRADIER_ACCOUNT),
        json!({}),
    )
    .await;

    let buy = app
        .enqueue(&webhook(user, &secret, "tradier", "buy", "AAPL", 1000))
        .await;
    app.run_worker_until_idle().await;
    assert_eq!(app.job(buy).await.status, sparky::job::JobStatus::Succeeded);
    let t = &app.trades(user).await[0];
    assert_eq!(
        (t.quantity, t.price, t.side.as_str()),
        (dec!(5), Some(dec!(190)), "buy")
    );

    fake.core.inject(
        "POST /orders",
        Fault::AfterDoing(503, json!("Service Unavailable")),
    );
    let sell = app
        .enqueue(&webhook(user, &secret, "tradier", "sell", "AAPL", 1000))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(sell).await;
    assert_eq!(job.status, sparky::job::JobStatus::Succeeded, "{job:?}");
    let sides: Vec<_> = fake
        .st
        .lock()
        .unwrap()
        .orders
        .iter()
        .map(|o| o["side"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sides, vec!["buy", "sell", "sell_short"]);
    let p = app.position(user, "AAPL").await.unwrap();
    assert_eq!((p.side, p.quantity), (Side::Short, dec!(5)));

    fake.st.lock().unwrap().reject_200 = Some("AccountMarginRuleViolation".into());
    let rej = app
        .enqueue(&webhook(user, &secret, "tradier", "close", "AAPL", 1000))
        .await;
    app.run_worker_until_idle().await;
    let job = app.job(rej).await;
    assert_eq!(job.status, sparky::job::JobStatus::Rejected);
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("AccountMarginRuleViolation"),
        "{job:?}"
    );
    assert!(!captured_logs().contains(TRADIER_TOKEN));
    app.cleanup().await;
}

#[tokio::test]
async fn factory_hosts_and_missing_fields() {
    let mut c = ctx(Duration::from_secs(1), "x", "x", "x");
    c.aster_base_url = None;
    let mut cr = creds(ExchangeKind::Aster, "k", "s", None, json!({}));
    cr.environment = CredentialEnv::Sandbox;
    let e = sparky::exchanges::build_exchange(&cr, &c).err().unwrap();
    assert!(e.message.contains("testnet"), "{e}");
    cr.environment = CredentialEnv::Production;
    assert!(sparky::exchanges::build_exchange(&cr, &c).is_ok());
    let cr = creds(ExchangeKind::Tradier, "tok", "s", None, json!({}));
    let e = sparky::exchanges::build_exchange(&cr, &c).err().unwrap();
    assert!(e.message.contains("account id"), "{e}");
    let _ = ExPosition {
        side: Side::Long,
        quantity: dec!(1),
        entry_price: None,
    };
}
