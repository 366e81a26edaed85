//! The Aster (Binance-style futures) fake.
//!
//! Endpoints: `exchangeInfo`, `ticker/price`, `time`, `positionRisk` (one symbol or all),
//! `leverage`; `POST /fapi/v1/order` (MARKET, LIMIT, STOP_MARKET / TAKE_PROFIT_MARKET with
//! `closePosition=true` or `quantity` [+ `reduceOnly`]); `GET /fapi/v1/order` and `openOrder`
//! (by `orderId` or `origClientOrderId`), `openOrders` (`symbol` optional), `allOrders`,
//! `userTrades`; `DELETE /fapi/v1/order` (-2011 "Unknown order sent." for a final or unknown order,
//! configurable in `cancel_unknown`) and `allOpenOrders`.
//!
//! Test controls: `set_price(symbol, price)` fires crossed stops / take-profits / limits;
//! `partial_next(fraction)`, `partial_next_qty(qty)`, `partial_when(rule)` (market orders that end
//! `EXPIRED` with a partial `executedQty`); helpers `open_orders(symbol)`, `position(symbol)`,
//! `order(coid)`, `orders_with(coid)`, `user_trades(symbol)`; `aster_call` sends any signed request.

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
    /// symbol -> signed position amount (one-way mode)
    pub(crate) positions: HashMap<String, Decimal>,
    /// symbol -> average entry price of the open position
    pub(crate) entries: HashMap<String, Decimal>,
    /// Every order ever placed, in placement order (Aster's order objects, with `time`).
    pub(crate) orders: Vec<Value>,
    /// Every execution, as `GET /fapi/v1/userTrades` returns them.
    pub(crate) trades: Vec<Value>,
    pub(crate) next_id: u64,
    pub(crate) reject_duplicates: bool,
    pub(crate) clock_skew_ms: i64,
    pub(crate) margin_limit: Option<Decimal>,
    pub(crate) leverage: Vec<(String, String)>,
    /// Which market orders fill only partly ([`PartialFills`]).
    pub(crate) partial: PartialFills,
    /// The error a cancel of a final or unknown order gets (Binance: -2011 "Unknown order sent.";
    /// Aster also lists -2013 "Order does not exist."; which one Aster sends is unverified).
    pub(crate) cancel_unknown: (i64, &'static str),
    /// Commission per fill, as a fraction of the notional (reported negative, as in the docs).
    pub(crate) fee_rate: Decimal,
    /// `totalMarginBalance` of `/fapi/v4/account`; `None` answers 500 (equity unreadable).
    pub(crate) equity: Option<Decimal>,
    /// A price a symbol moves to right after the next `openOrders` answer (once): a stop that
    /// fires between a sweep's listing and its position read.
    pub(crate) price_after_listing: Option<(String, Decimal)>,
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
                entries: HashMap::new(),
                orders: vec![],
                trades: vec![],
                next_id: 1000,
                reject_duplicates: false,
                clock_skew_ms: 0,
                margin_limit: None,
                leverage: vec![],
                partial: PartialFills::default(),
                cancel_unknown: (-2011, "Unknown order sent."),
                fee_rate: dec!(0.0004),
                equity: Some(dec!(10000)),
                price_after_listing: None,
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

    /// The latest order with this client order id.
    pub(crate) fn order(&self, coid: &str) -> Option<Value> {
        self.orders()
            .into_iter()
            .rev()
            .find(|o| o["clientOrderId"] == coid)
    }

    /// The open (NEW / PARTIALLY_FILLED) orders of `symbol`, resting stops included.
    pub(crate) fn open_orders(&self, symbol: &str) -> Vec<Value> {
        self.orders()
            .into_iter()
            .filter(|o| o["symbol"] == symbol && is_open(o))
            .collect()
    }

    /// The signed position amount of `symbol` (0 when flat).
    pub(crate) fn position(&self, symbol: &str) -> Decimal {
        self.st
            .lock()
            .unwrap()
            .positions
            .get(symbol)
            .copied()
            .unwrap_or_default()
    }

    /// The executions (`userTrades` rows) of `symbol`.
    pub(crate) fn user_trades(&self, symbol: &str) -> Vec<Value> {
        self.st
            .lock()
            .unwrap()
            .trades
            .iter()
            .filter(|t| t["symbol"] == symbol)
            .cloned()
            .collect()
    }

    /// The next MARKET order fills only `fraction` of its quantity (rounded down to the market
    /// step) and ends `EXPIRED` with that `executedQty`; the position moves by what filled.
    /// Each call queues one partial order.
    pub(crate) fn partial_next(&self, fraction: Decimal) {
        self.st
            .lock()
            .unwrap()
            .partial
            .push(Partial::Fraction(fraction));
    }

    /// Decide partial fills by a rule once the queue of [`AsterFake::partial_next`] is empty, e.g.
    /// every fifth close leg fills half:
    /// `fake.partial_when(move |o| ...count... .then_some(Partial::Fraction(dec!(0.5))))`.
    pub(crate) fn partial_when(
        &self,
        rule: impl FnMut(&Value) -> Option<Partial> + Send + 'static,
    ) {
        self.st.lock().unwrap().partial.when(rule);
    }

    /// As [`AsterFake::partial_next`], with the filled quantity itself.
    pub(crate) fn partial_next_qty(&self, qty: Decimal) {
        self.st.lock().unwrap().partial.push(Partial::Qty(qty));
    }

    /// Fill `qty` of the working LIMIT order `coid` at its limit (the market touched it only
    /// briefly): it stays working as `PARTIALLY_FILLED`; the position moves, a `userTrades` row.
    pub(crate) fn fill_part(&self, coid: &str, qty: Decimal) {
        let now = chrono::Utc::now().timestamp_millis();
        let mut st = self.st.lock().unwrap();
        let i = st
            .orders
            .iter()
            .rposition(|o| o["clientOrderId"] == coid && is_open(o))
            .expect("a working order with that id");
        let o = st.orders[i].clone();
        let price = o["price"].as_str().map(d).unwrap_or_default();
        let orig = o["origQty"].as_str().map(d).unwrap_or_default();
        let done = o["executedQty"].as_str().map(d).unwrap_or_default();
        assert!(done + qty < orig, "a part, not all of it");
        Self::execute(&mut st, i, qty, price, now);
        st.orders[i]["status"] = json!("PARTIALLY_FILLED");
    }

    /// The price of `symbol` moves to `price` right after the next `openOrders` answer.
    pub(crate) fn set_price_after_next_listing(&self, symbol: &str, price: Decimal) {
        self.st.lock().unwrap().price_after_listing = Some((symbol.to_string(), price));
    }

    /// Move the price of `symbol` (ticker, mark and fills) and fire what it crosses, in placement
    /// order: a SELL STOP_MARKET at or above the price, a BUY STOP_MARKET at or below it, a SELL
    /// TAKE_PROFIT_MARKET at or below it, a BUY TAKE_PROFIT_MARKET at or above it (the fill is at
    /// the new price); a BUY LIMIT at or above the price, a SELL LIMIT at or below it (the fill is at
    /// the limit). `closePosition` closes the whole position on that side, `reduceOnly` at most the
    /// position; with nothing to close the order ends `EXPIRED`. Each fill is a `userTrades` row.
    pub(crate) fn set_price(&self, symbol: &str, price: Decimal) {
        let now = chrono::Utc::now().timestamp_millis();
        let mut st = self.st.lock().unwrap();
        st.markets.get_mut(symbol).expect("a known symbol")[0] = price;
        for i in 0..st.orders.len() {
            let o = st.orders[i].clone();
            if o["symbol"] != symbol || !is_open(&o) {
                continue;
            }
            let buy = o["side"] == "BUY";
            let stop = o["stopPrice"].as_str().map(d);
            let limit = o["price"].as_str().map(d);
            let (fires, at) = match (o["type"].as_str().unwrap_or_default(), stop, limit) {
                ("STOP_MARKET", Some(s), _) => (if buy { price >= s } else { price <= s }, price),
                ("TAKE_PROFIT_MARKET", Some(s), _) => {
                    (if buy { price <= s } else { price >= s }, price)
                }
                ("LIMIT", _, Some(l)) => (if buy { price <= l } else { price >= l }, l),
                _ => (false, price),
            };
            if !fires {
                continue;
            }
            let pos = st.positions.get(symbol).copied().unwrap_or_default();
            let closing = if buy { -pos } else { pos }.max(Decimal::ZERO);
            // What is left of it (a LIMIT may have filled in part, `fill_part`).
            let orig = o["origQty"].as_str().map(d).unwrap_or_default()
                - o["executedQty"].as_str().map(d).unwrap_or_default();
            let qty = if o["closePosition"] == true {
                closing
            } else if o["reduceOnly"] == true {
                orig.min(closing)
            } else {
                orig
            };
            if qty.is_zero() {
                st.orders[i]["status"] = json!("EXPIRED");
                st.orders[i]["updateTime"] = json!(now);
                continue;
            }
            Self::execute(&mut st, i, qty, at, now);
            st.orders[i]["status"] = json!("FILLED");
        }
    }

    /// Fill `qty` of order `i` at `price`: the order's numbers, the position, a `userTrades` row.
    fn execute(st: &mut AsterState, i: usize, qty: Decimal, price: Decimal, now: i64) {
        let o = st.orders[i].clone();
        let sym = o["symbol"].as_str().unwrap_or_default().to_string();
        let buy = o["side"] == "BUY";
        let executed = o["executedQty"].as_str().map(d).unwrap_or_default() + qty;
        let cum = o["cumQuote"].as_str().map(d).unwrap_or_default() + qty * price;
        let o = &mut st.orders[i];
        o["executedQty"] = json!(executed.normalize().to_string());
        o["cumQuote"] = json!(cum.normalize().to_string());
        o["avgPrice"] = json!(format!("{:.5}", cum / executed));
        o["updateTime"] = json!(now);
        let order_id = o["orderId"].clone();
        let signed = if buy { qty } else { -qty };
        let pnl = apply_fill(&mut st.positions, &mut st.entries, &sym, signed, price);
        let trade_id = st.trades.len() + 1;
        st.trades
            .push(json!({"id": trade_id, "orderId": order_id, "symbol": sym,
            "side": if buy { "BUY" } else { "SELL" }, "positionSide": "BOTH",
            "price": price.normalize().to_string(), "qty": qty.normalize().to_string(),
            "quoteQty": (qty * price).normalize().to_string(),
            "realizedPnl": pnl.normalize().to_string(),
            "commission": (-(qty * price * st.fee_rate)).round_dp(8).normalize().to_string(),
            "commissionAsset": "USDT", "maker": false, "buyer": buy, "time": now}));
    }
}

/// `openOrders`: the open orders of `sym` (every symbol's when empty).
fn open_listing(orders: &[Value], sym: &str) -> Value {
    Value::Array(
        orders
            .iter()
            .filter(|o| is_open(o) && (sym.is_empty() || o["symbol"] == sym))
            .cloned()
            .collect(),
    )
}

/// NEW or PARTIALLY_FILLED.
pub(crate) fn is_open(o: &Value) -> bool {
    matches!(o["status"].as_str(), Some("NEW") | Some("PARTIALLY_FILLED"))
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
        // Never mixed: GET and DELETE sign the query, POST the body.
        let in_query = method == Method::GET || method == Method::DELETE;
        let raw = if in_query { &query } else { &body };
        let other = if in_query { &body } else { &query };
        if !other.is_empty() || !aster_verify(raw, ASTER_SECRET) {
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
    let in_query = method == Method::GET || method == Method::DELETE;
    let p = params(if in_query { &query } else { &body });
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
        if (method.as_str(), path) == ("GET", "/fapi/v1/openOrders") {
            if let Some((symbol, price)) = st.price_after_listing.take() {
                let listing = open_listing(&st.orders, &sym);
                drop(st);
                self.set_price(&symbol, price);
                return (200, listing);
            }
        }
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
                // One row per symbol (every market without `symbol`), flat ones included.
                let mut syms: Vec<String> = if sym.is_empty() {
                    st.markets.keys().map(|k| k.to_string()).collect()
                } else {
                    vec![sym.clone()]
                };
                syms.sort();
                let rows: Vec<Value> = syms
                    .iter()
                    .map(|s| {
                        let amt = st.positions.get(s).copied().unwrap_or_default();
                        let price = st.markets.get(s.as_str()).map(|m| m[0]).unwrap_or_default();
                        let entry = match st.entries.get(s) {
                            Some(e) if !amt.is_zero() => e.round_dp(8).normalize().to_string(),
                            _ => "0.0".to_string(),
                        };
                        let upnl = st.entries.get(s).map(|e| (price - e) * amt).unwrap_or_default();
                        json!({"symbol": s, "positionAmt": format!("{amt:.3}"), "entryPrice": entry,
                            "markPrice": price.to_string(), "unRealizedProfit": upnl.round_dp(8).normalize().to_string(),
                            "leverage": "20", "marginType": "cross", "positionSide": "BOTH", "updateTime": now})
                    })
                    .collect();
                (200, Value::Array(rows))
            }
            ("POST", "/fapi/v1/leverage") => {
                let lev = param(p, "leverage").unwrap_or_default().to_string();
                st.leverage.push((sym.clone(), lev.clone()));
                (
                    200,
                    json!({"leverage": lev.parse::<u32>().unwrap_or(0), "maxNotionalValue": "1000000", "symbol": sym}),
                )
            }
            ("GET", "/fapi/v1/order") => match find(&st.orders, p) {
                Some(i) => (200, st.orders[i].clone()),
                None => aster_err(400, -2013, "Order does not exist."),
            },
            ("GET", "/fapi/v1/openOrder") => match find(&st.orders, p) {
                Some(i) if is_open(&st.orders[i]) => (200, st.orders[i].clone()),
                _ => aster_err(400, -2013, "Order does not exist."),
            },
            ("GET", "/fapi/v1/openOrders") => (200, open_listing(&st.orders, &sym)),
            ("GET", "/fapi/v1/allOrders") => {
                let limit: usize = param(p, "limit")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(500);
                let from: u64 = param(p, "orderId")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                let mine: Vec<Value> = st
                    .orders
                    .iter()
                    .filter(|o| o["symbol"] == sym && o["orderId"].as_u64().unwrap_or(0) >= from)
                    .cloned()
                    .collect();
                let skip = if from > 0 {
                    0
                } else {
                    mine.len().saturating_sub(limit)
                };
                (
                    200,
                    Value::Array(mine.into_iter().skip(skip).take(limit).collect()),
                )
            }
            ("GET", "/fapi/v1/userTrades") => {
                let limit: usize = param(p, "limit")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(500);
                let mine: Vec<Value> = st
                    .trades
                    .iter()
                    .filter(|t| t["symbol"] == sym)
                    .cloned()
                    .collect();
                let skip = mine.len().saturating_sub(limit);
                (200, Value::Array(mine.into_iter().skip(skip).collect()))
            }
            ("DELETE", "/fapi/v1/order") => match find(&st.orders, p) {
                Some(i) if is_open(&st.orders[i]) => {
                    st.orders[i]["status"] = json!("CANCELED");
                    st.orders[i]["updateTime"] = json!(now);
                    (200, st.orders[i].clone())
                }
                _ => {
                    let (code, msg) = st.cancel_unknown;
                    aster_err(400, code, msg)
                }
            },
            ("DELETE", "/fapi/v1/allOpenOrders") => {
                for o in st
                    .orders
                    .iter_mut()
                    .filter(|o| o["symbol"] == sym && is_open(o))
                {
                    o["status"] = json!("CANCELED");
                    o["updateTime"] = json!(now);
                }
                (
                    200,
                    json!({"code": "200", "msg": "The operation of cancel all open order is done."}),
                )
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
                let close_position = param(p, "closePosition") == Some("true");
                let pos = st.positions.get(&sym).copied().unwrap_or_default();
                let id = st.next_id;
                let mut order = json!({"orderId": id, "clientOrderId": coid, "symbol": sym, "side": side,
                    "type": ty, "origType": ty, "reduceOnly": reduce, "closePosition": close_position,
                    "positionSide": "BOTH", "time": now, "updateTime": now,
                    "status": "NEW", "origQty": "0", "executedQty": "0", "cumQuote": "0",
                    "avgPrice": "0.00000", "price": "0", "stopPrice": "0", "workingType": "CONTRACT_PRICE",
                    "timeInForce": param(p, "timeInForce").unwrap_or("GTC")});
                let qty_of = |step: Decimal, min: Decimal| -> Result<Decimal, (u16, Value)> {
                    let qty = d(param(p, "quantity").unwrap_or("0"));
                    if !(qty % step).is_zero() || qty < min {
                        return Err(aster_err(
                            400,
                            -1111,
                            "Precision is over the maximum defined for this asset.",
                        ));
                    }
                    Ok(qty)
                };
                let reduces = |qty: Decimal| {
                    (side == "BUY" && pos < Decimal::ZERO && qty <= -pos)
                        || (side == "SELL" && pos > Decimal::ZERO && qty <= pos)
                };
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
                        let Some(stop) = param(p, "stopPrice") else {
                            return aster_err(400, -1102, "Mandatory parameter 'stopPrice' was not sent, was empty/null, or malformed.");
                        };
                        if !(d(stop) % m[1]).is_zero() {
                            return aster_err(400, -4014, "Price not increased by tick size.");
                        }
                        if close_position {
                            // closePosition takes no quantity and no reduceOnly.
                            if param(p, "quantity").is_some() {
                                return aster_err(
                                    400,
                                    -1106,
                                    "Parameter 'quantity' sent when not required.",
                                );
                            }
                            if reduce {
                                return aster_err(
                                    400,
                                    -1106,
                                    "Parameter 'reduceOnly' sent when not required.",
                                );
                            }
                        } else {
                            let qty = match qty_of(m[4], m[5]) {
                                Ok(q) => q,
                                Err(e) => return e,
                            };
                            if param(p, "quantity").is_none() {
                                return aster_err(400, -1102, "Mandatory parameter 'quantity' was not sent, was empty/null, or malformed.");
                            }
                            order["origQty"] = json!(qty.normalize().to_string());
                        }
                        order["stopPrice"] = json!(stop);
                    }
                    "MARKET" | "LIMIT" => {
                        let (step, min) = if ty == "MARKET" {
                            (m[4], m[5])
                        } else {
                            (m[2], m[3])
                        };
                        let qty = match qty_of(step, min) {
                            Ok(q) => q,
                            Err(e) => return e,
                        };
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
                            if !reduces(qty) {
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
                        st.next_id += 1;
                        st.orders.push(order);
                        let i = st.orders.len() - 1;
                        if ty == "MARKET" {
                            let o = st.orders[i].clone();
                            let part = st.partial.next(&o);
                            let filled = match part {
                                None => qty,
                                Some(Partial::Fraction(f)) => (qty * f / step).floor() * step,
                                Some(Partial::Qty(q)) => q.min(qty),
                            };
                            if !filled.is_zero() {
                                Self::execute(&mut st, i, filled, price, now);
                            }
                            st.orders[i]["status"] =
                                json!(if filled == qty { "FILLED" } else { "EXPIRED" });
                        } else {
                            // A limit through the market fills at once (at its limit); one at
                            // the current price or outside it rests (NEW) until `set_price`
                            // reaches it.
                            let market = m[0];
                            if (side == "BUY" && market < price)
                                || (side == "SELL" && market > price)
                            {
                                Self::execute(&mut st, i, qty, price, now);
                                st.orders[i]["status"] = json!("FILLED");
                            }
                        }
                        return (200, st.orders[i].clone());
                    }
                    _ => return aster_err(400, -1116, "Invalid orderType."),
                }
                st.next_id += 1;
                st.orders.push(order.clone());
                (200, order)
            }
            _ => (404, json!({"code": -1, "msg": "no such route"})),
        }
    }
}

/// The order a request names by `orderId` or `origClientOrderId` (the latest with that client id),
/// within `symbol` when one is given.
fn find(orders: &[Value], p: &[(String, String)]) -> Option<usize> {
    let sym = param(p, "symbol").unwrap_or_default();
    let by_id = param(p, "orderId").and_then(|i| i.parse::<u64>().ok());
    let coid = param(p, "origClientOrderId");
    orders.iter().rposition(|o| {
        (sym.is_empty() || o["symbol"] == sym)
            && match (by_id, coid) {
                (Some(id), _) => o["orderId"] == id,
                (None, Some(c)) => o["clientOrderId"] == c,
                (None, None) => false,
            }
    })
}

/// A signed request straight to the fake, as Aster's docs describe it (GET/DELETE: the query;
/// POST: the body), for tests of endpoints no client method uses yet. Returns (status, JSON).
pub(crate) async fn aster_call(
    url: &str,
    method: &str,
    path: &str,
    params: &[(&str, &str)],
) -> (u16, Value) {
    let mut all: Vec<(&str, String)> = params.iter().map(|(k, v)| (*k, v.to_string())).collect();
    all.push(("recvWindow", "5000".into()));
    all.push((
        "timestamp",
        chrono::Utc::now().timestamp_millis().to_string(),
    ));
    let payload = sparky::exchanges::aster::encode_params(&all);
    let mut mac = Hmac::<Sha256>::new_from_slice(ASTER_SECRET.as_bytes()).unwrap();
    mac.update(payload.as_bytes());
    let signed = format!(
        "{payload}&signature={}",
        hex::encode(mac.finalize().into_bytes())
    );
    let http = reqwest::Client::new();
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let req = if m == reqwest::Method::POST {
        http.request(m, format!("{url}{path}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(signed)
    } else {
        http.request(m, format!("{url}{path}?{signed}"))
    };
    let r = req.header("X-MBX-APIKEY", ASTER_KEY).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

pub(crate) fn aster_client(url: &str, timeout: Duration, extra: Value) -> AsterClient {
    let c = creds(ExchangeKind::Aster, ASTER_KEY, ASTER_SECRET, None, extra);
    AsterClient::new(&c, &ctx(timeout, url, "http://unused", "http://unused")).unwrap()
}

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
