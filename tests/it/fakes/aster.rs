//! The Aster (Binance-style futures) fake.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use axum::Router;
use hmac::{Hmac, Mac};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{json, Value};
use sha2::Sha256;
use sparky::domain::ExchangeKind;
use sparky::exchanges::aster::AsterClient;

use super::*;

// ---------------------------------------------------------------------------------------------
// Aster fake
// ---------------------------------------------------------------------------------------------

pub(crate) const ASTER_KEY: &str =
    "dbefbc809e3e83c283a984c3a1459732ea7db1360ca80c5c2c8867408d28cc83";
pub(crate) const ASTER_SECRET: &str =
    "2b5eb11e18796d12d88f13dc27dbbd02c2cc51ff7059765ed9821957d82bb4d9";

pub(crate) struct AsterState {
    /// symbol -> (price, tick, lot step, lot min, market step, market min, min notional)
    pub(crate) markets: HashMap<&'static str, [Decimal; 7]>,
    pub(crate) positions: HashMap<String, Decimal>,
    pub(crate) orders: Vec<Value>,
    pub(crate) next_id: u64,
    pub(crate) reject_duplicates: bool,
    pub(crate) clock_skew_ms: i64,
    pub(crate) margin_limit: Option<Decimal>,
    pub(crate) leverage: Vec<(String, String)>,
    /// `totalMarginBalance` of `/fapi/v4/account`; `None` answers 500 (equity unreadable).
    pub(crate) equity: Option<Decimal>,
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
                equity: Some(dec!(10000)),
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

pub(crate) fn aster_err(status: u16, code: i64, msg: &str) -> (u16, Value) {
    (status, json!({"code": code, "msg": msg}))
}

/// The fake's own signature check: HMAC-SHA256 over exactly what precedes `&signature=`.
pub(crate) fn aster_verify(raw: &str, secret: &str) -> bool {
    let Some((payload, sig)) = raw.rsplit_once("&signature=") else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(payload.as_bytes());
    let want = hex::encode(mac.finalize().into_bytes());
    !sig.contains('&') && want.eq_ignore_ascii_case(sig)
}

pub(crate) async fn aster_handle(
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
    pub(crate) fn process(
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
            ("GET", "/fapi/v4/account") => match st.equity {
                Some(e) => (
                    200,
                    json!({"totalWalletBalance": e.to_string(), "totalMarginBalance": e.to_string(),
                    "availableBalance": e.to_string(), "assets": [], "positions": []}),
                ),
                None => aster_err(
                    500,
                    -1001,
                    "Internal error; unable to process your request.",
                ),
            },
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
                    "TRAILING_STOP_MARKET" => {
                        let rate = param(p, "callbackRate").map(d).unwrap_or_default();
                        if rate < dec!(0.1) || rate > dec!(5) || param(p, "quantity").is_none() {
                            return aster_err(400, -1102, "Mandatory parameter was not sent.");
                        }
                        order["priceRate"] = json!(rate.to_string());
                        order["origQty"] = json!(param(p, "quantity"));
                    }
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
