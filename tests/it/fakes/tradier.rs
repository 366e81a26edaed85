//! The Tradier fake.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use axum::Router;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{json, Value};
use sparky::domain::ExchangeKind;
use sparky::exchanges::tradier::TradierClient;

use super::*;
// ---------------------------------------------------------------------------------------------
// Tradier fake
// ---------------------------------------------------------------------------------------------

pub(crate) const TRADIER_TOKEN: &str = "tradier-token-xyz789";
pub(crate) const TRADIER_ACCOUNT: &str = "VA000001";

pub(crate) struct TradierState {
    pub(crate) prices: HashMap<&'static str, Decimal>,
    pub(crate) positions: HashMap<String, Decimal>,
    pub(crate) orders: Vec<Value>,
    pub(crate) next_id: u64,
    /// Answer order placement with HTTP 200 + `errors`.
    pub(crate) reject_200: Option<String>,
    /// Report new market orders as `pending` on the first read.
    pub(crate) pending_first: bool,
    /// `total_equity` of `/balances`; `None` answers 500 (equity unreadable).
    pub(crate) equity: Option<Decimal>,
}

pub(crate) struct TradierFake {
    pub(crate) core: Core,
    pub(crate) st: Mutex<TradierState>,
}

impl TradierFake {
    pub(crate) async fn start() -> (Arc<TradierFake>, String) {
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
                equity: Some(dec!(10000)),
            }),
        });
        let app = Router::new()
            .fallback(tradier_handle)
            .with_state(fake.clone());
        (fake, serve(app).await)
    }

    pub(crate) fn orders_tagged(&self, tag: &str) -> Vec<Value> {
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
pub(crate) fn tradier_collection(items: Vec<Value>) -> Value {
    match items.len() {
        0 => json!("null"),
        1 => items.into_iter().next().unwrap(),
        _ => Value::Array(items),
    }
}

pub(crate) async fn tradier_handle(
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
    pub(crate) fn process(
        &self,
        route: &str,
        path: &str,
        q: &[(String, String)],
        form: &[(String, String)],
    ) -> (u16, Value) {
        let mut st = self.st.lock().unwrap();
        match route {
            "GET /balances" => match st.equity {
                Some(e) => (
                    200,
                    json!({"balances": {"account_type": "margin", "total_equity": serde_json::Number::from_str(&e.to_string()).unwrap(),
                    "total_cash": 1000.0, "market_value": 0.0, "open_pl": 0.0, "close_pl": 0.0}}),
                ),
                None => (500, json!("Internal Server Error")),
            },
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

pub(crate) fn tradier_client(url: &str, timeout: Duration) -> TradierClient {
    let c = creds(
        ExchangeKind::Tradier,
        TRADIER_TOKEN,
        "unused",
        Some(TRADIER_ACCOUNT),
        json!({}),
    );
    TradierClient::new(&c, &ctx(timeout, "http://unused", "http://unused", url)).unwrap()
}
