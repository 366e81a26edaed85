//! The OANDA v20 fake.
//!
//! A trade model: market and limit fills reduce the oldest opposite trades (or the dependent
//! order's own trade) and open a trade with the rest; `stopLossOnFill` / `takeProfitOnFill` and
//! `PUT /trades/{id|@clientID}/orders` make dependent STOP_LOSS / TAKE_PROFIT orders tied to the
//! trade, which OANDA cancels (LINKED_TRADE_CLOSED) when the trade closes any other way.
//!
//! Endpoints: `instruments`, `pricing`, `openPositions`, `positions/{instrument}`,
//! `positions/{instrument}/close` (ALL or units), `POST /orders` (MARKET, LIMIT), `pendingOrders`,
//! `orders?state=&instrument=&count=&ids=`, `orders/{id|@clientID}`,
//! `PUT orders/{id|@clientID}/cancel` (404 ORDER_DOESNT_EXIST when not pending), `trades?state=`,
//! `openTrades`, `trades/{id|@clientID}`, `transactions/{id}`, `transactions/sinceid?id=`.
//!
//! Test controls: `set_price(instrument, price)` (bid = ask) and `set_quote(instrument, bid, ask)`
//! fire crossed stop-losses, take-profits and limits; helpers `pending_orders()`,
//! `position(instrument)`, `trade(spec)`, `open_trades(instrument)`, `orders_with(coid)`;
//! `oanda_call` sends any request.

use std::collections::{BTreeMap, HashMap};
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
use sparky::exchanges::oanda::OandaClient;

use super::*;
// ---------------------------------------------------------------------------------------------
// OANDA fake
// ---------------------------------------------------------------------------------------------

pub(crate) const OANDA_TOKEN: &str = "oanda-token-abc123";
pub(crate) const OANDA_ACCOUNT: &str = "101-004-1234567-001";

pub(crate) struct OandaState {
    /// instrument -> (bid, ask, tradeUnitsPrecision, displayPrecision, minimumTradeSize)
    pub(crate) instruments: HashMap<&'static str, (Decimal, Decimal, u32, u32, Decimal)>,
    /// instrument -> net units (kept equal to the sum of the open trades; a test that writes here
    /// directly gets a trade for the difference at the next request)
    pub(crate) positions: HashMap<String, Decimal>,
    /// Every order: MARKET / LIMIT (with the `request` as sent) and the dependent STOP_LOSS /
    /// TAKE_PROFIT orders (with `tradeID`), in creation order.
    pub(crate) orders: Vec<Value>,
    /// id -> transaction (ORDER_FILL, ORDER_CANCEL, MARKET_ORDER, ...).
    pub(crate) transactions: BTreeMap<u64, Value>,
    /// Every trade, open and closed (OANDA's Trade objects).
    pub(crate) trades: Vec<Value>,
    pub(crate) next_id: u64,
    pub(crate) insufficient_margin: bool,
    /// `NAV` of `/summary`; `None` answers 500 (equity unreadable).
    pub(crate) nav: Option<Decimal>,
    /// `commission` of every ORDER_FILL (home currency, positive; OANDA's is usually 0).
    pub(crate) commission: Decimal,
    /// `financing` of an ORDER_FILL that closes or reduces a trade (negative: paid).
    pub(crate) close_financing: Decimal,
}

pub(crate) struct OandaFake {
    pub(crate) core: Core,
    pub(crate) st: Mutex<OandaState>,
}

impl OandaFake {
    pub(crate) async fn start() -> (Arc<OandaFake>, String) {
        let mut instruments = HashMap::new();
        instruments.insert("EUR_USD", (dec!(1.08500), dec!(1.08520), 0, 5, dec!(1)));
        instruments.insert("XAU_USD", (dec!(2000.00), dec!(2000.50), 2, 3, dec!(0.01)));
        let fake = Arc::new(OandaFake {
            core: Core::default(),
            st: Mutex::new(OandaState {
                instruments,
                positions: HashMap::new(),
                orders: vec![],
                transactions: BTreeMap::new(),
                trades: vec![],
                next_id: 6000,
                insufficient_margin: false,
                nav: Some(dec!(10000)),
                commission: Decimal::ZERO,
                close_financing: Decimal::ZERO,
            }),
        });
        let app = Router::new()
            .fallback(oanda_handle)
            .with_state(fake.clone());
        (fake, serve(app).await)
    }

    pub(crate) fn orders_with(&self, coid: &str) -> Vec<Value> {
        self.st
            .lock()
            .unwrap()
            .orders
            .iter()
            .filter(|o| o["clientExtensions"]["id"] == coid)
            .cloned()
            .collect()
    }

    /// The PENDING orders (resting limits, dependent stop-loss / take-profit orders).
    pub(crate) fn pending_orders(&self) -> Vec<Value> {
        self.st
            .lock()
            .unwrap()
            .orders
            .iter()
            .filter(|o| o["state"] == "PENDING")
            .cloned()
            .collect()
    }

    /// The net units of `instrument` (0 when flat).
    pub(crate) fn position(&self, instrument: &str) -> Decimal {
        let mut st = self.st.lock().unwrap();
        sync_trades(&mut st, instrument);
        st.positions.get(instrument).copied().unwrap_or_default()
    }

    /// The trade with this id or client id (`@` + client id), open or closed.
    pub(crate) fn trade(&self, spec: &str) -> Option<Value> {
        let st = self.st.lock().unwrap();
        find_trade(&st, spec).map(|i| st.trades[i].clone())
    }

    /// The open trades of `instrument`.
    pub(crate) fn open_trades(&self, instrument: &str) -> Vec<Value> {
        let mut st = self.st.lock().unwrap();
        sync_trades(&mut st, instrument);
        st.trades
            .iter()
            .filter(|t| t["state"] == "OPEN" && t["instrument"] == instrument)
            .cloned()
            .collect()
    }

    /// Set the price of `instrument` (bid = ask = `price`) and fire what it crosses; see
    /// [`OandaFake::set_quote`].
    pub(crate) fn set_price(&self, instrument: &str, price: Decimal) {
        self.set_quote(instrument, price, price);
    }

    /// Set the quote of `instrument` and fire the PENDING orders it crosses, in creation order: a
    /// long trade's STOP_LOSS when the bid is at or below it, its TAKE_PROFIT when the bid is at or
    /// above it (a short trade's: the ask, mirrored); a buy LIMIT when the ask is at or below it, a
    /// sell LIMIT when the bid is at or above it. A stop-loss fills at the bid/ask, a take-profit
    /// and a limit at their price. A dependent order closes its whole trade (ORDER_FILL with
    /// `tradesClosed`, reason STOP_LOSS_ORDER / TAKE_PROFIT_ORDER), and the trade's other dependent
    /// orders are cancelled with LINKED_TRADE_CLOSED, as OANDA does.
    pub(crate) fn set_quote(&self, instrument: &str, bid: Decimal, ask: Decimal) {
        let mut st = self.st.lock().unwrap();
        sync_trades(&mut st, instrument);
        let inst = st
            .instruments
            .get_mut(instrument)
            .expect("a known instrument");
        inst.0 = bid;
        inst.1 = ask;
        let mut i = 0;
        while i < st.orders.len() {
            let o = st.orders[i].clone();
            i += 1;
            // Dependent orders name no instrument: their trade's.
            if o["state"] != "PENDING" || order_instrument(&st, &o) != instrument {
                continue;
            }
            let price = dv(&o["price"]);
            let oid = o["id"].as_str().unwrap_or_default().to_string();
            match o["type"].as_str().unwrap_or_default() {
                ty @ ("STOP_LOSS" | "TAKE_PROFIT") => {
                    let Some(t) = find_trade(&st, o["tradeID"].as_str().unwrap_or_default()) else {
                        continue;
                    };
                    let long = dv(&st.trades[t]["currentUnits"]) > Decimal::ZERO;
                    let market = if long { bid } else { ask };
                    let (fires, at) = match (ty, long) {
                        ("STOP_LOSS", true) => (market <= price, market),
                        ("STOP_LOSS", false) => (market >= price, market),
                        (_, true) => (market >= price, price),
                        (_, false) => (market <= price, price),
                    };
                    if !fires {
                        continue;
                    }
                    let reason = if ty == "STOP_LOSS" {
                        "STOP_LOSS_ORDER"
                    } else {
                        "TAKE_PROFIT_ORDER"
                    };
                    let coid = o["clientExtensions"]["id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let units = -dv(&st.trades[t]["currentUnits"]);
                    // Triggered: not one of the trade's orders to cancel when it closes.
                    st.orders[i - 1]["state"] = json!("TRIGGERED");
                    let fill =
                        fill_units(&mut st, instrument, units, at, &oid, &coid, reason, Some(t));
                    let idx = i - 1;
                    mark_filled(&mut st, idx, &fill);
                }
                "LIMIT" => {
                    let units = dv(&o["units"]);
                    let fires = if units > Decimal::ZERO {
                        ask <= price
                    } else {
                        bid >= price
                    };
                    if !fires {
                        continue;
                    }
                    let req = o["request"].clone();
                    let coid = o["clientExtensions"]["id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let fill = fill_units(
                        &mut st,
                        instrument,
                        units,
                        price,
                        &oid,
                        &coid,
                        "LIMIT_ORDER",
                        None,
                    );
                    let idx = i - 1;
                    mark_filled(&mut st, idx, &fill);
                    on_fill_orders(&mut st, &req, &fill);
                }
                _ => {}
            }
        }
    }
}

/// A decimal from an OANDA string number (0 when absent).
fn dv(v: &Value) -> Decimal {
    v.as_str()
        .and_then(|s| Decimal::from_str(s).ok())
        .unwrap_or_default()
}

fn new_id(st: &mut OandaState) -> String {
    st.next_id += 1;
    st.next_id.to_string()
}

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Record a transaction (with a fresh id and the time); returns it.
fn record_txn(st: &mut OandaState, mut t: Value) -> Value {
    let id = new_id(st);
    t["id"] = json!(id);
    t["time"] = json!(now_text());
    t["accountID"] = json!(OANDA_ACCOUNT);
    st.transactions.insert(st.next_id, t.clone());
    t
}

fn last_txn(st: &OandaState) -> String {
    st.next_id.to_string()
}

/// The index of the trade `spec` names: its id, or `@` + its client id.
fn find_trade(st: &OandaState, spec: &str) -> Option<usize> {
    match spec.strip_prefix('@') {
        Some(c) => st
            .trades
            .iter()
            .rposition(|t| t["clientExtensions"]["id"] == c),
        None => st.trades.iter().position(|t| t["id"] == spec),
    }
}

/// The index of the order `spec` names: its id, or `@` + its client id (the latest).
fn find_order(st: &OandaState, spec: &str) -> Option<usize> {
    match spec.strip_prefix('@') {
        Some(c) => st
            .orders
            .iter()
            .rposition(|o| o["clientExtensions"]["id"] == c),
        None => st.orders.iter().position(|o| o["id"] == spec),
    }
}

/// Make the open trades of `instrument` add up to `positions[instrument]` (tests may set the
/// position directly): the difference becomes a trade at the mid, or reduces the oldest trades.
fn sync_trades(st: &mut OandaState, instrument: &str) {
    let net = st.positions.get(instrument).copied().unwrap_or_default();
    let open: Decimal = st
        .trades
        .iter()
        .filter(|t| t["state"] == "OPEN" && t["instrument"] == instrument)
        .map(|t| dv(&t["currentUnits"]))
        .sum();
    let mut diff = net - open;
    if diff.is_zero() {
        return;
    }
    if open.is_zero() || open.is_sign_positive() == diff.is_sign_positive() {
        let Some((bid, ask, ..)) = st.instruments.get(instrument).copied() else {
            return;
        };
        let id = new_id(st);
        st.trades.push(
            json!({"id": id, "instrument": instrument, "price": ((bid + ask) / dec!(2)).to_string(),
            "openTime": now_text(), "state": "OPEN", "initialUnits": diff.to_string(),
            "currentUnits": diff.to_string(), "realizedPL": "0.0000", "unrealizedPL": "0.0000",
            "financing": "0.0000", "clientExtensions": {}}),
        );
        return;
    }
    for t in st.trades.iter_mut() {
        if diff.is_zero() || t["state"] != "OPEN" || t["instrument"] != instrument {
            continue;
        }
        let cur = dv(&t["currentUnits"]);
        let take = if cur.abs() <= diff.abs() { -cur } else { diff };
        diff -= take;
        let left = cur + take;
        t["currentUnits"] = json!(left.to_string());
        if left.is_zero() {
            t["state"] = json!("CLOSED");
        }
    }
}

/// Fill `units` (signed) of `instrument` at `price` for order `order_id`: close / reduce the
/// target trade (a dependent order's) or the oldest opposite trades first, open a trade with the
/// rest (`trade_ext` its client extensions). Closing a trade cancels its dependent orders
/// (LINKED_TRADE_CLOSED). Returns the ORDER_FILL transaction.
#[allow(clippy::too_many_arguments)]
fn fill_units(
    st: &mut OandaState,
    instrument: &str,
    units: Decimal,
    price: Decimal,
    order_id: &str,
    coid: &str,
    reason: &str,
    target: Option<usize>,
) -> Value {
    fill_units_ext(
        st,
        instrument,
        units,
        price,
        order_id,
        coid,
        reason,
        target,
        &Value::Null,
    )
}

#[allow(clippy::too_many_arguments)]
fn fill_units_ext(
    st: &mut OandaState,
    instrument: &str,
    units: Decimal,
    price: Decimal,
    order_id: &str,
    coid: &str,
    reason: &str,
    target: Option<usize>,
    trade_ext: &Value,
) -> Value {
    sync_trades(st, instrument);
    let fill_id = new_id(st);
    let mut left = units;
    let mut closed = Vec::new();
    let mut reduced = Value::Null;
    let mut pl = Decimal::ZERO;
    let candidates: Vec<usize> = match target {
        Some(t) => vec![t],
        None => (0..st.trades.len()).collect(),
    };
    let mut closed_ids = Vec::new();
    for t in candidates {
        let tr = &st.trades[t];
        if left.is_zero() || tr["state"] != "OPEN" || tr["instrument"] != instrument {
            continue;
        }
        let cur = dv(&tr["currentUnits"]);
        if cur.is_sign_positive() == left.is_sign_positive() {
            continue;
        }
        let take = if cur.abs() <= left.abs() { cur } else { -left };
        let trade_pl = (price - dv(&tr["price"])) * take;
        pl += trade_pl;
        left += take;
        let remaining = cur - take;
        let tid = tr["id"].as_str().unwrap_or_default().to_string();
        let tr = &mut st.trades[t];
        tr["currentUnits"] = json!(remaining.to_string());
        tr["realizedPL"] = json!((dv(&tr["realizedPL"]) + trade_pl).round_dp(4).to_string());
        let part = json!({"tradeID": tid, "units": (-take).to_string(), "price": price.to_string(),
            "realizedPL": trade_pl.round_dp(4).to_string(), "financing": "0.0000"});
        if remaining.is_zero() {
            tr["state"] = json!("CLOSED");
            tr["averageClosePrice"] = json!(price.to_string());
            tr["closeTime"] = json!(now_text());
            tr["closingTransactionIDs"] = json!([fill_id.clone()]);
            closed.push(part);
            closed_ids.push(tid);
        } else {
            reduced = part;
        }
    }
    let mut opened = Value::Null;
    if !left.is_zero() && target.is_none() {
        st.trades.push(json!({"id": fill_id, "instrument": instrument, "price": price.to_string(),
            "openTime": now_text(), "state": "OPEN", "initialUnits": left.to_string(),
            "currentUnits": left.to_string(), "realizedPL": "0.0000", "unrealizedPL": "0.0000",
            "financing": "0.0000", "clientExtensions": if trade_ext.is_object() { trade_ext.clone() } else { json!({}) }}));
        opened = json!({"tradeID": fill_id, "units": left.to_string(), "price": price.to_string()});
    }
    let filled = if target.is_some() {
        units - left
    } else {
        units
    };
    *st.positions.entry(instrument.to_string()).or_default() += filled;
    let financing = if closed.is_empty() && reduced.is_null() {
        Decimal::ZERO
    } else {
        st.close_financing
    };
    let mut fill = json!({"id": fill_id, "type": "ORDER_FILL", "orderID": order_id, "clientOrderID": coid,
        "instrument": instrument, "units": filled.to_string(), "fullVWAP": price.to_string(),
        "price": price.to_string(), "pl": pl.round_dp(4).to_string(), "financing": format!("{:.4}", financing),
        "commission": format!("{:.4}", st.commission), "reason": reason, "time": now_text(), "accountID": OANDA_ACCOUNT});
    if opened.is_object() {
        fill["tradeOpened"] = opened;
    }
    if !closed.is_empty() {
        fill["tradesClosed"] = json!(closed);
    }
    if reduced.is_object() {
        fill["tradeReduced"] = reduced;
    }
    st.transactions
        .insert(fill_id.parse().unwrap(), fill.clone());
    for tid in closed_ids {
        cancel_dependents(st, &tid);
    }
    fill
}

/// Cancel the PENDING dependent orders of trade `tid` (it was closed).
fn cancel_dependents(st: &mut OandaState, tid: &str) {
    for i in 0..st.orders.len() {
        if st.orders[i]["state"] == "PENDING" && st.orders[i]["tradeID"] == tid {
            cancel_order(st, i, "LINKED_TRADE_CLOSED");
        }
    }
}

/// Cancel order `i` with `reason`; returns the ORDER_CANCEL transaction.
fn cancel_order(st: &mut OandaState, i: usize, reason: &str) -> Value {
    let o = st.orders[i].clone();
    let t = record_txn(
        st,
        json!({"type": "ORDER_CANCEL", "orderID": o["id"], "clientOrderID": o["clientExtensions"]["id"],
            "reason": reason}),
    );
    let o = &mut st.orders[i];
    o["state"] = json!("CANCELLED");
    o["cancellingTransactionID"] = t["id"].clone();
    o["cancelledTime"] = t["time"].clone();
    if let Some(tid) = o["tradeID"].as_str().map(str::to_string) {
        let key = if o["type"] == "STOP_LOSS" {
            "stopLossOrderID"
        } else {
            "takeProfitOrderID"
        };
        if let Some(tr) = st.trades.iter_mut().find(|t| t["id"] == tid.as_str()) {
            if tr[key] == o["id"] {
                tr.as_object_mut().unwrap().remove(key);
            }
        }
    }
    t
}

/// Order `i` was filled by `fill`.
fn mark_filled(st: &mut OandaState, i: usize, fill: &Value) {
    let o = &mut st.orders[i];
    o["state"] = json!("FILLED");
    o["fillingTransactionID"] = fill["id"].clone();
    o["filledTime"] = fill["time"].clone();
    if let Some(t) = fill["tradeOpened"]["tradeID"].as_str() {
        o["tradeOpenedID"] = json!(t);
    }
    if let Some(c) = fill["tradesClosed"].as_array() {
        o["tradeClosedIDs"] = json!(c.iter().map(|x| x["tradeID"].clone()).collect::<Vec<_>>());
    }
    if let Some(t) = fill["tradeReduced"]["tradeID"].as_str() {
        o["tradeReducedID"] = json!(t);
    }
}

/// A dependent order (STOP_LOSS / TAKE_PROFIT) on trade index `t`; replaces one of that kind.
/// Returns its create transaction and the cancel of the one it replaced, if any.
fn dependent_order(
    st: &mut OandaState,
    t: usize,
    kind: &str,
    spec: &Value,
) -> (Value, Option<Value>) {
    let key = match kind {
        "STOP_LOSS" => "stopLossOrderID",
        "TRAILING_STOP_LOSS" => "trailingStopLossOrderID",
        _ => "takeProfitOrderID",
    };
    let mut replaced = None;
    if let Some(old) = st.trades[t][key].as_str().map(str::to_string) {
        if let Some(i) = st.orders.iter().position(|o| o["id"] == old.as_str()) {
            replaced = Some(cancel_order(st, i, "CLIENT_REQUEST_REPLACED"));
        }
    }
    let tr = st.trades[t].clone();
    let txn = record_txn(
        st,
        json!({"type": format!("{kind}_ORDER"), "tradeID": tr["id"], "price": spec["price"],
            "distance": spec["distance"],
            "timeInForce": spec["timeInForce"].as_str().unwrap_or("GTC"),
            "clientExtensions": spec["clientExtensions"], "reason": "CLIENT_ORDER"}),
    );
    // As OANDA's StopLossOrder / TakeProfitOrder: no `instrument`; the trade's id and client id.
    st.orders.push(json!({"id": txn["id"], "type": kind, "state": "PENDING",
        "tradeID": tr["id"], "price": spec["price"], "timeInForce": spec["timeInForce"].as_str().unwrap_or("GTC"),
        "clientExtensions": spec["clientExtensions"], "createTime": txn["time"],
        "clientTradeID": tr["clientExtensions"]["id"]}));
    st.trades[t][key] = txn["id"].clone();
    (txn, replaced)
}

/// `stopLossOnFill` / `takeProfitOnFill` of `req`, for the trade `fill` opened.
fn on_fill_orders(st: &mut OandaState, req: &Value, fill: &Value) -> Value {
    let mut out = json!({});
    let Some(t) = fill["tradeOpened"]["tradeID"]
        .as_str()
        .and_then(|id| find_trade(st, id))
    else {
        return out;
    };
    for (key, kind, name) in [
        ("stopLossOnFill", "STOP_LOSS", "stopLoss"),
        ("takeProfitOnFill", "TAKE_PROFIT", "takeProfit"),
        (
            "trailingStopLossOnFill",
            "TRAILING_STOP_LOSS",
            "trailingStopLoss",
        ),
    ] {
        if req[key].is_object() {
            let (txn, _) = dependent_order(st, t, kind, &req[key]);
            out[format!("{name}OrderTransaction")] = txn;
        }
    }
    out
}

pub(crate) async fn oanda_handle(
    axum::extract::State(f): axum::extract::State<Arc<OandaFake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> Response {
    let prefix = format!("/v3/accounts/{OANDA_ACCOUNT}");
    let rest = uri.path().strip_prefix(&prefix).unwrap_or("?").to_string();
    // Route names without ids: "GET /orders/@", "PUT /positions/close", "PUT /orders/{spec}/cancel"...
    let route = {
        let r = if rest.starts_with("/orders/") && rest.ends_with("/cancel") {
            "/orders/{spec}/cancel".to_string()
        } else if rest.starts_with("/orders/@") {
            "/orders/@".to_string()
        } else if rest.starts_with("/orders/") {
            "/orders/{id}".to_string()
        } else if rest.starts_with("/positions/") && rest.ends_with("/close") {
            "/positions/close".to_string()
        } else if rest.starts_with("/positions/") {
            "/positions/{instrument}".to_string()
        } else if rest.starts_with("/transactions/") {
            "/transactions/".to_string()
        } else if rest.starts_with("/trades/@") && rest.ends_with("/orders") {
            "/trades/@/orders".to_string()
        } else if rest.starts_with("/trades/") && rest.ends_with("/orders") {
            "/trades/{id}/orders".to_string()
        } else if rest.starts_with("/trades/") {
            "/trades/{spec}".to_string()
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
    pub(crate) fn process(
        &self,
        method: &Method,
        rest: &str,
        q: &[(String, String)],
        body: &Value,
    ) -> (u16, Value) {
        let mut st = self.st.lock().unwrap();
        let inst_q = param(q, "instruments").unwrap_or_default().to_string();
        let names: Vec<String> = st.instruments.keys().map(|k| k.to_string()).collect();
        for n in &names {
            sync_trades(&mut st, n);
        }
        match (method.as_str(), rest) {
            ("GET", "/summary") => match st.nav {
                Some(nav) => (
                    200,
                    json!({"account": {"id": OANDA_ACCOUNT, "currency": "USD", "NAV": nav.to_string(),
                    "balance": nav.to_string(), "unrealizedPL": "0.0000"}, "lastTransactionID": "1"}),
                ),
                None => (500, json!({"errorMessage": "Internal server error"})),
            },
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
                let mut insts: Vec<String> = st
                    .positions
                    .iter()
                    .filter(|(_, u)| !u.is_zero())
                    .map(|(i, _)| i.clone())
                    .collect();
                insts.sort();
                let positions: Vec<Value> = insts.iter().map(|i| position_json(&st, i)).collect();
                (
                    200,
                    json!({"positions": positions, "lastTransactionID": last_txn(&st)}),
                )
            }
            ("GET", r) if r.starts_with("/positions/") => {
                let inst = &r["/positions/".len()..];
                if !st.instruments.contains_key(inst) {
                    return (
                        400,
                        json!({"errorMessage": "Invalid value specified for 'instrument'"}),
                    );
                }
                (
                    200,
                    json!({"position": position_json(&st, inst), "lastTransactionID": last_txn(&st)}),
                )
            }
            ("GET", "/pendingOrders") => {
                let orders: Vec<Value> = st
                    .orders
                    .iter()
                    .rev()
                    .filter(|o| o["state"] == "PENDING")
                    .cloned()
                    .collect();
                (
                    200,
                    json!({"orders": orders, "lastTransactionID": last_txn(&st)}),
                )
            }
            ("GET", "/orders") => {
                let state = param(q, "state").unwrap_or("PENDING");
                let inst = param(q, "instrument");
                let count: usize = param(q, "count")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(50)
                    .min(500);
                let ids: Option<Vec<&str>> = param(q, "ids").map(|i| i.split(',').collect());
                let orders: Vec<Value> = st
                    .orders
                    .iter()
                    .rev()
                    .filter(|o| state == "ALL" || o["state"] == state)
                    .filter(|o| inst.is_none_or(|i| order_instrument(&st, o) == i))
                    .filter(|o| {
                        ids.as_ref()
                            .is_none_or(|ids| ids.iter().any(|i| o["id"] == *i))
                    })
                    .take(count)
                    .cloned()
                    .collect();
                (
                    200,
                    json!({"orders": orders, "lastTransactionID": last_txn(&st)}),
                )
            }
            ("GET", "/openTrades") => {
                let trades: Vec<Value> = st
                    .trades
                    .iter()
                    .rev()
                    .filter(|t| t["state"] == "OPEN")
                    .cloned()
                    .collect();
                (
                    200,
                    json!({"trades": trades, "lastTransactionID": last_txn(&st)}),
                )
            }
            ("GET", "/trades") => {
                let state = param(q, "state").unwrap_or("OPEN");
                let inst = param(q, "instrument");
                let count: usize = param(q, "count")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(50)
                    .min(500);
                let trades: Vec<Value> = st
                    .trades
                    .iter()
                    .rev()
                    .filter(|t| state == "ALL" || t["state"] == state)
                    .filter(|t| inst.is_none_or(|i| t["instrument"] == i))
                    .take(count)
                    .cloned()
                    .collect();
                (
                    200,
                    json!({"trades": trades, "lastTransactionID": last_txn(&st)}),
                )
            }
            ("GET", r) if r.starts_with("/trades/") => {
                match find_trade(&st, &r["/trades/".len()..]) {
                    Some(t) => (
                        200,
                        json!({"trade": st.trades[t], "lastTransactionID": last_txn(&st)}),
                    ),
                    None => (
                        404,
                        json!({"errorCode": "NO_SUCH_TRADE", "errorMessage": "The Trade specified does not exist"}),
                    ),
                }
            }
            ("POST", "/orders") => {
                let o = &body["order"];
                let coid = o["clientExtensions"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                if !coid.is_empty()
                    && st
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
                let Some((bid, ask, tup, _, min)) = st.instruments.get(inst.as_str()).copied()
                else {
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
                let ty = o["type"].as_str().unwrap_or("MARKET").to_string();
                let create = record_txn(
                    &mut st,
                    json!({"type": format!("{ty}_ORDER"), "instrument": inst, "units": units_s,
                        "timeInForce": o["timeInForce"], "positionFill": o["positionFill"],
                        "clientExtensions": o["clientExtensions"], "reason": "CLIENT_ORDER"}),
                );
                let id = create["id"].as_str().unwrap().to_string();
                let mut order = json!({"id": id, "type": ty, "state": "PENDING", "instrument": inst,
                    "units": units_s, "createTime": create["time"], "clientExtensions": o["clientExtensions"].clone(),
                    "request": o.clone()});
                if st.insufficient_margin {
                    st.orders.push(order);
                    let i = st.orders.len() - 1;
                    let cancel = cancel_order(&mut st, i, "INSUFFICIENT_MARGIN");
                    return (
                        201,
                        json!({"orderCreateTransaction": create,
                        "orderCancelTransaction": cancel, "lastTransactionID": last_txn(&st)}),
                    );
                }
                if ty == "LIMIT" {
                    order["price"] = o["price"].clone();
                    order["timeInForce"] = o["timeInForce"].clone();
                    st.orders.push(order);
                    // A limit through the market fills at once (at its price); at or outside it,
                    // it rests until `set_price` crosses it.
                    let p = dv(&o["price"]);
                    if (units > Decimal::ZERO && ask < p) || (units < Decimal::ZERO && bid > p) {
                        let i = st.orders.len() - 1;
                        let fill = fill_units_ext(
                            &mut st,
                            &inst,
                            units,
                            p,
                            &id,
                            &coid,
                            "LIMIT_ORDER",
                            None,
                            &o["tradeClientExtensions"],
                        );
                        mark_filled(&mut st, i, &fill);
                        let mut r = on_fill_orders(&mut st, o, &fill);
                        r["orderCreateTransaction"] = create;
                        r["orderFillTransaction"] = fill;
                        r["lastTransactionID"] = json!(last_txn(&st));
                        return (201, r);
                    }
                    return (
                        201,
                        json!({"orderCreateTransaction": create, "lastTransactionID": last_txn(&st)}),
                    );
                }
                // MARKET: buys at the ask, sells at the bid. REDUCE_ONLY fills at most the
                // opposite position.
                let mut fill_units_n = units;
                if o["positionFill"] == "REDUCE_ONLY" {
                    let net = st.positions.get(&inst).copied().unwrap_or_default();
                    let room = if units > Decimal::ZERO {
                        (-net).max(Decimal::ZERO)
                    } else {
                        net.max(Decimal::ZERO)
                    };
                    if room.is_zero() {
                        st.orders.push(order);
                        let i = st.orders.len() - 1;
                        let cancel = cancel_order(&mut st, i, "REDUCE_ONLY_VIOLATION");
                        return (
                            201,
                            json!({"orderCreateTransaction": create, "orderCancelTransaction": cancel,
                                "lastTransactionID": last_txn(&st)}),
                        );
                    }
                    fill_units_n = if units > Decimal::ZERO {
                        units.min(room)
                    } else {
                        units.max(-room)
                    };
                }
                st.orders.push(order);
                let i = st.orders.len() - 1;
                let price = if units > Decimal::ZERO { ask } else { bid };
                let fill = fill_units_ext(
                    &mut st,
                    &inst,
                    fill_units_n,
                    price,
                    &id,
                    &coid,
                    "MARKET_ORDER",
                    None,
                    &o["tradeClientExtensions"],
                );
                mark_filled(&mut st, i, &fill);
                // Stop-loss / take-profit on fill: dependent orders of the trade it opened.
                let mut r = on_fill_orders(&mut st, o, &fill);
                r["orderCreateTransaction"] = create;
                r["orderFillTransaction"] = fill;
                r["lastTransactionID"] = json!(last_txn(&st));
                (201, r)
            }
            ("PUT", r) if r.starts_with("/positions/") && r.ends_with("/close") => {
                let inst = r
                    .trim_start_matches("/positions/")
                    .trim_end_matches("/close")
                    .to_string();
                let net = st.positions.get(&inst).copied().unwrap_or_default();
                let (prefix, spec, ext) =
                    if body["longUnits"].is_string() && body["longUnits"] != "NONE" {
                        (
                            "long",
                            body["longUnits"].as_str().unwrap().to_string(),
                            &body["longClientExtensions"],
                        )
                    } else {
                        (
                            "short",
                            body["shortUnits"].as_str().unwrap_or("NONE").to_string(),
                            &body["shortClientExtensions"],
                        )
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
                let units = match spec.as_str() {
                    "ALL" => -net,
                    s => match Decimal::from_str(s) {
                        Ok(u) if u > Decimal::ZERO && u <= net.abs() => {
                            if net > Decimal::ZERO {
                                -u
                            } else {
                                u
                            }
                        }
                        _ => {
                            return (
                                400,
                                json!({format!("{prefix}OrderRejectTransaction"): {"rejectReason": "CLOSEOUT_POSITION_UNITS_EXCEED_POSITION_SIZE"},
                                "errorCode": "CLOSEOUT_POSITION_UNITS_EXCEED_POSITION_SIZE", "errorMessage": "The Position closeout units exceed the position size"}),
                            )
                        }
                    },
                };
                let coid = ext["id"].as_str().unwrap_or_default().to_string();
                let (bid, ask, ..) = st.instruments[inst.as_str()];
                let create = record_txn(
                    &mut st,
                    json!({"type": "MARKET_ORDER", "instrument": inst, "units": units.to_string(),
                        "timeInForce": "FOK", "positionFill": "REDUCE_ONLY", "reason": "POSITION_CLOSEOUT",
                        "clientExtensions": ext, "longPositionCloseout": if prefix == "long" { json!({"instrument": inst, "units": spec}) } else { Value::Null },
                        "shortPositionCloseout": if prefix == "short" { json!({"instrument": inst, "units": spec}) } else { Value::Null }}),
                );
                let id = create["id"].as_str().unwrap().to_string();
                st.orders.push(json!({"id": id, "type": "MARKET", "state": "PENDING", "instrument": inst,
                    "units": units.to_string(), "createTime": create["time"], "clientExtensions": ext.clone(),
                    "request": body.clone()}));
                let i = st.orders.len() - 1;
                let price = if units > Decimal::ZERO { ask } else { bid };
                let fill = fill_units(
                    &mut st,
                    &inst,
                    units,
                    price,
                    &id,
                    &coid,
                    "MARKET_ORDER_POSITION_CLOSEOUT",
                    None,
                );
                mark_filled(&mut st, i, &fill);
                (
                    200,
                    json!({format!("{prefix}OrderCreateTransaction"): create,
                    format!("{prefix}OrderFillTransaction"): fill, "lastTransactionID": last_txn(&st)}),
                )
            }
            ("PUT", r) if r.starts_with("/orders/") && r.ends_with("/cancel") => {
                let spec = r.trim_start_matches("/orders/").trim_end_matches("/cancel");
                match find_order(&st, spec) {
                    Some(i) if st.orders[i]["state"] == "PENDING" => {
                        let cancel = cancel_order(&mut st, i, "CLIENT_REQUEST");
                        let id = cancel["id"].clone();
                        (
                            200,
                            json!({"orderCancelTransaction": cancel, "relatedTransactionIDs": [id],
                            "lastTransactionID": last_txn(&st)}),
                        )
                    }
                    _ => {
                        let reject = record_txn(
                            &mut st,
                            json!({"type": "ORDER_CANCEL_REJECT", "orderID": spec, "rejectReason": "ORDER_DOESNT_EXIST"}),
                        );
                        (
                            404,
                            json!({"orderCancelRejectTransaction": reject, "relatedTransactionIDs": [reject["id"]],
                            "lastTransactionID": last_txn(&st), "errorCode": "ORDER_DOESNT_EXIST",
                            "errorMessage": "The Order specified does not exist"}),
                        )
                    }
                }
            }
            ("GET", r) if r.starts_with("/orders/") => {
                match find_order(&st, &r["/orders/".len()..]) {
                    Some(i) => (
                        200,
                        json!({"order": st.orders[i], "lastTransactionID": last_txn(&st)}),
                    ),
                    None => (
                        404,
                        json!({"errorCode": "ORDER_DOESNT_EXIST", "errorMessage": "The order ID specified does not exist"}),
                    ),
                }
            }
            ("GET", "/transactions/sinceid") => {
                let since: u64 = param(q, "id").and_then(|i| i.parse().ok()).unwrap_or(0);
                let txns: Vec<Value> = st
                    .transactions
                    .range(since + 1..)
                    .map(|(_, t)| t.clone())
                    .collect();
                (
                    200,
                    json!({"transactions": txns, "lastTransactionID": last_txn(&st)}),
                )
            }
            ("GET", r) if r.starts_with("/transactions/") => {
                let id = r["/transactions/".len()..].parse::<u64>().unwrap_or(0);
                match st.transactions.get(&id) {
                    Some(t) => (
                        200,
                        json!({"transaction": t, "lastTransactionID": last_txn(&st)}),
                    ),
                    None => (404, json!({"errorMessage": "Transaction not found"})),
                }
            }
            ("PUT", r) if r.starts_with("/trades/") && r.ends_with("/orders") => {
                let spec = r.trim_start_matches("/trades/").trim_end_matches("/orders");
                let Some(t) = find_trade(&st, spec).filter(|t| st.trades[*t]["state"] == "OPEN")
                else {
                    return (
                        404,
                        json!({"errorCode": "NO_SUCH_TRADE", "errorMessage": "The Trade specified does not exist"}),
                    );
                };
                let mut out = json!({});
                for (key, kind, id_key) in [
                    ("stopLoss", "STOP_LOSS", "stopLossOrderID"),
                    ("takeProfit", "TAKE_PROFIT", "takeProfitOrderID"),
                ] {
                    if body[key].is_object() {
                        let (txn, replaced) = dependent_order(&mut st, t, kind, &body[key]);
                        out[format!("{key}OrderTransaction")] = txn;
                        if let Some(c) = replaced {
                            out[format!("{key}OrderCancelTransaction")] = c;
                        }
                    } else if body.get(key).is_some_and(Value::is_null) {
                        // null: cancel the trade's order of that kind.
                        if let Some(old) = st.trades[t][id_key].as_str().map(str::to_string) {
                            if let Some(i) = st.orders.iter().position(|o| o["id"] == old.as_str())
                            {
                                out[format!("{key}OrderCancelTransaction")] =
                                    cancel_order(&mut st, i, "CLIENT_REQUEST");
                            }
                        }
                    }
                }
                out["lastTransactionID"] = json!(last_txn(&st));
                (200, out)
            }
            _ => (
                404,
                json!({"errorMessage": format!("no route {method} {rest}")}),
            ),
        }
    }
}

/// The instrument of an order (a dependent order's is its trade's).
fn order_instrument(st: &OandaState, o: &Value) -> Value {
    match o["tradeID"].as_str().and_then(|t| find_trade(st, t)) {
        Some(t) => st.trades[t]["instrument"].clone(),
        None => o["instrument"].clone(),
    }
}

/// OANDA's Position of `inst`, from its open trades.
fn position_json(st: &OandaState, inst: &str) -> Value {
    let side = |long: bool| {
        let trades: Vec<&Value> = st
            .trades
            .iter()
            .filter(|t| t["state"] == "OPEN" && t["instrument"] == inst)
            .filter(|t| (dv(&t["currentUnits"]) > Decimal::ZERO) == long)
            .collect();
        let units: Decimal = trades.iter().map(|t| dv(&t["currentUnits"])).sum();
        let cost: Decimal = trades
            .iter()
            .map(|t| dv(&t["currentUnits"]) * dv(&t["price"]))
            .sum();
        let mut v = json!({"units": units.to_string(), "pl": "0.0000", "unrealizedPL": "0.0000",
            "tradeIDs": trades.iter().map(|t| t["id"].clone()).collect::<Vec<_>>()});
        if !units.is_zero() {
            v["averagePrice"] = json!((cost / units).round_dp(5).normalize().to_string());
        }
        v
    };
    json!({"instrument": inst, "long": side(true), "short": side(false), "pl": "0.0000", "unrealizedPL": "0.0000"})
}

/// A request straight to the fake (token, JSON), for tests of endpoints no client method uses
/// yet; `path` is after `/v3/accounts/{id}`. Returns (status, JSON).
pub(crate) async fn oanda_call(
    url: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = reqwest::Client::new()
        .request(m, format!("{url}/v3/accounts/{OANDA_ACCOUNT}{path}"))
        .bearer_auth(OANDA_TOKEN);
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

pub(crate) fn oanda_client(url: &str, timeout: Duration) -> OandaClient {
    let c = creds(
        ExchangeKind::Oanda,
        OANDA_TOKEN,
        "unused",
        Some(OANDA_ACCOUNT),
        json!({}),
    );
    OandaClient::new(&c, &ctx(timeout, "http://unused", url, "http://unused")).unwrap()
}

/// A test app with one user whose OANDA credentials point at a fresh fake: (fake, its URL, app,
/// user, webhook secret).
pub(crate) async fn oanda_app() -> (Arc<OandaFake>, String, TestApp, Uuid, String) {
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
    (fake, url, app, user, secret)
}
