//! The Tradier fake.
//!
//! Endpoints: quotes, positions (with `cost_basis` from the fills), `POST /orders` (equity market /
//! limit / stop / stop_limit; oco, oto, otoco with indexed legs), `GET /orders/{id}`,
//! `DELETE /orders/{id}` (400 "order already in finalized state: ..." for a final order; an advanced
//! order's working legs are cancelled with it), `GET /orders` (today's orders by the fake's
//! calendar; `date=`; `filter=all` with `start`/`end`, at most a month; pages).
//!
//! Test controls: `set_today(day)` / `today()` (the calendar orders are created on);
//! `set_price(symbol, price)` fills crossed limits and stops (an OCO leg cancels its sibling);
//! `partial_next(fraction)`, `partial_next_qty(qty)`, `partial_when(rule)` (market orders read
//! `partially_filled` once, then `canceled`); helpers `open_orders()`, `position(symbol)`,
//! `order(id)`, `orders_tagged(tag)`; `tradier_call` sends any request.

use std::collections::HashMap;

use chrono::NaiveDate;
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
    /// symbol -> average entry price of the open position (for `cost_basis`)
    pub(crate) entries: HashMap<String, Decimal>,
    /// Every order ever placed; advanced orders (oco, oto, otoco) carry their `leg` list.
    pub(crate) orders: Vec<Value>,
    pub(crate) next_id: u64,
    /// Answer order placement with HTTP 200 + `errors`.
    pub(crate) reject_200: Option<String>,
    /// Report new market orders as `pending` on the first read.
    pub(crate) pending_first: bool,
    /// Which market orders fill only partly ([`PartialFills`]).
    pub(crate) partial: PartialFills,
    /// The fake's calendar day: orders are created on it, and `/orders` without `filter=all`
    /// lists only the orders created on it.
    pub(crate) today: NaiveDate,
    /// Does the default (today's) `/orders` list also show orders of earlier days that are still
    /// working (a GTC OCO placed yesterday)? Unverified at Tradier, so off by default: only
    /// orders created today are listed.
    pub(crate) intraday_lists_working: bool,
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
                entries: HashMap::new(),
                orders: vec![],
                next_id: 257459,
                reject_200: None,
                pending_first: false,
                partial: PartialFills::default(),
                today: chrono::Utc::now().date_naive(),
                intraday_lists_working: false,
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

    /// The order (or advanced order) with this Tradier id.
    pub(crate) fn order(&self, id: u64) -> Option<Value> {
        self.st
            .lock()
            .unwrap()
            .orders
            .iter()
            .find(|o| o["id"] == id)
            .cloned()
    }

    /// Orders still working (open, partially_filled, pending), advanced orders included.
    pub(crate) fn open_orders(&self) -> Vec<Value> {
        self.st
            .lock()
            .unwrap()
            .orders
            .iter()
            .filter(|o| tradier_working(o))
            .cloned()
            .collect()
    }

    /// The signed position of `symbol` (0 when flat).
    pub(crate) fn position(&self, symbol: &str) -> Decimal {
        self.st
            .lock()
            .unwrap()
            .positions
            .get(symbol)
            .copied()
            .unwrap_or_default()
    }

    /// Fill `qty` shares of the working equity order tagged `tag` at its limit price (the market
    /// touched it only briefly): it stays working as `partially_filled`, the position moves.
    pub(crate) fn fill_part(&self, tag: &str, qty: Decimal) {
        let mut st = self.st.lock().unwrap();
        let stamp = stamp(st.today);
        let i = st
            .orders
            .iter()
            .rposition(|o| o["tag"] == tag && tradier_working(o))
            .expect("a working order with that tag");
        let o = st.orders[i].clone();
        let dec_of = |v: &Value| {
            v.as_f64()
                .and_then(|f| Decimal::from_str(&f.to_string()).ok())
                .unwrap_or_default()
        };
        let (ordered, done, price) = (
            dec_of(&o["quantity"]),
            dec_of(&o["exec_quantity"]),
            dec_of(&o["price"]),
        );
        assert!(done + qty < ordered, "a part, not all of it");
        let sym = o["symbol"].as_str().unwrap_or_default().to_string();
        let signed = if buys(&o["side"]) { qty } else { -qty };
        {
            let st = &mut *st;
            apply_fill(&mut st.positions, &mut st.entries, &sym, signed, price);
        }
        let o = &mut st.orders[i];
        o["status"] = json!("partially_filled");
        o["exec_quantity"] = num(done + qty);
        o["remaining_quantity"] = num(ordered - done - qty);
        o["avg_fill_price"] = num(price);
        o["last_fill_price"] = num(price);
        o["last_fill_quantity"] = num(qty);
        o["transaction_date"] = json!(stamp);
    }

    /// The fake's calendar day (orders created now get this `create_date`).
    pub(crate) fn today(&self) -> NaiveDate {
        self.st.lock().unwrap().today
    }

    /// Move the fake's calendar (e.g. to tomorrow, for a replay after midnight).
    pub(crate) fn set_today(&self, day: NaiveDate) {
        self.st.lock().unwrap().today = day;
    }

    /// The next market order fills only `fraction` of its quantity (whole shares, rounded down):
    /// it reads `partially_filled` on the first `GET /orders/{id}`, then `canceled`; the position
    /// moves by what filled. Each call queues one partial order.
    pub(crate) fn partial_next(&self, fraction: Decimal) {
        self.st
            .lock()
            .unwrap()
            .partial
            .push(Partial::Fraction(fraction));
    }

    /// Decide partial fills by a rule once the queue of [`TradierFake::partial_next`] is empty, e.g.
    /// every fifth close leg fills half:
    /// `fake.partial_when(move |o| ...count... .then_some(Partial::Fraction(dec!(0.5))))`.
    pub(crate) fn partial_when(
        &self,
        rule: impl FnMut(&Value) -> Option<Partial> + Send + 'static,
    ) {
        self.st.lock().unwrap().partial.when(rule);
    }

    /// As [`TradierFake::partial_next`], with the filled quantity itself.
    pub(crate) fn partial_next_qty(&self, qty: Decimal) {
        self.st.lock().unwrap().partial.push(Partial::Qty(qty));
    }

    /// Move the price of `symbol` and fill the working orders (and advanced-order legs) it
    /// crosses, in placement order: a sell `limit` at or below the price and a buy `limit` at or
    /// above it fill at the limit; a sell `stop` at or above the price and a buy `stop` at or below
    /// it fill at the new price. The filled leg of an OCO cancels its sibling; the first leg of an
    /// OTO / OTOCO opens the legs after it. A fill the position does not allow (a `sell` of more
    /// shares than held, a `buy_to_cover` of more than the short) is `rejected` instead.
    pub(crate) fn set_price(&self, symbol: &str, price: Decimal) {
        let mut st = self.st.lock().unwrap();
        let key = st
            .prices
            .keys()
            .find(|k| **k == symbol)
            .copied()
            .unwrap_or_else(|| Box::leak(symbol.to_string().into_boxed_str()));
        st.prices.insert(key, price);
        let stamp = stamp(st.today);
        for i in 0..st.orders.len() {
            let o = st.orders[i].clone();
            if let Some(legs) = o["leg"].as_array() {
                for (j, leg) in legs.iter().enumerate() {
                    if leg["symbol"] != symbol || leg["status"] != "open" {
                        continue;
                    }
                    let Some(at) = crossed(leg, price) else {
                        continue;
                    };
                    let mut leg = st.orders[i]["leg"][j].clone();
                    let ok = fill_against(&mut st, &mut leg, at, &stamp);
                    st.orders[i]["leg"][j] = leg;
                    let legs = st.orders[i]["leg"].as_array_mut().unwrap();
                    let class = o["class"].as_str().unwrap_or_default();
                    if ok {
                        match (class, j) {
                            ("oco", _) | ("otoco", 1 | 2) => {
                                for (k, l) in legs.iter_mut().enumerate() {
                                    if k != j && (class == "oco" || k > 0) && l["status"] == "open"
                                    {
                                        l["status"] = json!("canceled");
                                    }
                                }
                            }
                            (_, 0) => {
                                for l in legs.iter_mut().skip(1) {
                                    if l["status"] == "pending" {
                                        l["status"] = json!("open");
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    let status = parent_status(&st.orders[i]);
                    st.orders[i]["status"] = json!(status);
                    st.orders[i]["transaction_date"] = json!(stamp);
                }
            } else if o["symbol"] == symbol && o["status"] == "open" {
                if let Some(at) = crossed(&o, price) {
                    let mut o = o;
                    fill_against(&mut st, &mut o, at, &stamp);
                    st.orders[i] = o;
                }
            }
        }
    }
}

/// `YYYY-MM-DDThh:mm:ss.000Z` on the fake's day at the real time of day.
fn stamp(day: NaiveDate) -> String {
    format!("{day}T{}Z", chrono::Utc::now().format("%H:%M:%S%.3f"))
}

/// The day an order was created (the fake's orders without a `create_date` count as today's).
fn created_on(o: &Value, today: NaiveDate) -> NaiveDate {
    o["create_date"]
        .as_str()
        .and_then(|s| s.get(..10))
        .and_then(|s| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
        .unwrap_or(today)
}

fn buys(side: &Value) -> bool {
    side.as_str().unwrap_or_default().starts_with("buy")
}

/// Is this order (or any leg of it) still working?
pub(crate) fn tradier_working(o: &Value) -> bool {
    let w = |s: &Value| matches!(s.as_str(), Some("open" | "partially_filled" | "pending"));
    w(&o["status"])
}

/// The price a working limit / stop order fills at when the market is at `price`, if it fills.
fn crossed(o: &Value, price: Decimal) -> Option<Decimal> {
    let num = |k: &str| {
        o[k].as_f64()
            .and_then(|f| Decimal::from_str(&f.to_string()).ok())
    };
    let buy = buys(&o["side"]);
    match o["type"].as_str()? {
        "limit" => {
            let l = num("price")?;
            (if buy { price <= l } else { price >= l }).then_some(l)
        }
        "stop" | "stop_limit" => {
            let s = num("stop")?;
            (if buy { price >= s } else { price <= s }).then_some(price)
        }
        _ => None,
    }
}

/// Fill all of `o` at `price` if the position allows its side; otherwise reject it. Returns
/// whether it filled.
fn fill_against(st: &mut TradierState, o: &mut Value, price: Decimal, stamp: &str) -> bool {
    let sym = o["symbol"].as_str().unwrap_or_default().to_string();
    let qty = o["quantity"]
        .as_f64()
        .and_then(|f| Decimal::from_str(&f.to_string()).ok())
        .unwrap_or_default();
    let pos = st.positions.get(&sym).copied().unwrap_or_default();
    let side = o["side"].as_str().unwrap_or_default().to_string();
    if !side_allowed(&side, pos, qty) {
        o["status"] = json!("rejected");
        o["reason_description"] = json!(format!(
            "side {side} of {qty} does not match the position {pos}"
        ));
        o["transaction_date"] = json!(stamp);
        return false;
    }
    let signed = if buys(&o["side"]) { qty } else { -qty };
    apply_fill(&mut st.positions, &mut st.entries, &sym, signed, price);
    o["status"] = json!("filled");
    o["exec_quantity"] = num(qty);
    o["remaining_quantity"] = json!(0.0);
    o["avg_fill_price"] = num(price);
    o["last_fill_price"] = num(price);
    o["last_fill_quantity"] = num(qty);
    o["transaction_date"] = json!(stamp);
    true
}

fn side_allowed(side: &str, pos: Decimal, qty: Decimal) -> bool {
    match side {
        "buy" => pos >= Decimal::ZERO,
        "sell" => pos >= qty,
        "sell_short" => pos <= Decimal::ZERO,
        "buy_to_cover" => -pos >= qty,
        _ => false,
    }
}

/// An advanced order's status from its legs: working while a leg works, else filled if a leg
/// filled, else the first leg's final status.
fn parent_status(o: &Value) -> String {
    let legs = o["leg"].as_array().cloned().unwrap_or_default();
    if legs.iter().any(tradier_working) {
        return "open".into();
    }
    if legs.iter().any(|l| l["status"] == "filled") {
        return "filled".into();
    }
    legs.first()
        .and_then(|l| l["status"].as_str())
        .unwrap_or("canceled")
        .to_string()
}

/// A JSON number from a decimal.
fn num(d: Decimal) -> Value {
    let s = d.normalize().to_string();
    let s = if s.contains('.') { s } else { format!("{s}.0") };
    serde_json::Number::from_str(&s).unwrap().into()
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
                let items: Vec<Value> = st
                    .positions
                    .iter()
                    .filter(|(_, q)| !q.is_zero())
                    .map(|(s, q)| {
                        let entry = st
                            .entries
                            .get(s)
                            .copied()
                            .unwrap_or_else(|| st.prices[s.as_str()]);
                        json!({
                    "cost_basis": num(q.abs() * entry),
                    "date_acquired": "2024-01-01T00:00:00.000Z", "id": 1, "quantity": num(*q),
                    "symbol": s})
                    })
                    .collect();
                (
                    200,
                    json!({"positions": if items.is_empty() { json!("null") } else { json!({"position": tradier_collection(items)}) }}),
                )
            }
            "POST /orders" => {
                if let Some(msg) = &st.reject_200 {
                    return (200, json!({"errors": {"error": [msg]}}));
                }
                let class = param(form, "class").unwrap_or_default().to_string();
                let tag = param(form, "tag").unwrap_or_default().to_string();
                if tag.len() > 255 || !tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                    return (400, json!({"errors": {"error": "Invalid tag"}}));
                }
                let now = stamp(st.today);
                // One order (equity) or the legs of an advanced order, from the indexed keys.
                let leg_of = |k: Option<usize>| -> Result<Value, String> {
                    let f = |name: &str| match k {
                        None => param(form, name).map(str::to_string),
                        Some(i) => param(form, &format!("{name}[{i}]")).map(str::to_string),
                    };
                    let qty = d(&f("quantity").unwrap_or_else(|| "0".into()));
                    if qty.fract() != Decimal::ZERO || qty < Decimal::ONE {
                        return Err("IncorrectOrderQuantity".into());
                    }
                    let ty = f("type").unwrap_or_default();
                    let mut o = json!({"type": ty, "symbol": f("symbol").unwrap_or_default(),
                        "side": f("side").unwrap_or_default(), "quantity": num(qty),
                        "duration": f("duration").or_else(|| param(form, "duration").map(str::to_string)),
                        "status": "open", "exec_quantity": 0.0, "avg_fill_price": 0.0,
                        "last_fill_price": 0.0, "last_fill_quantity": 0.0, "remaining_quantity": num(qty),
                        "create_date": now, "transaction_date": now});
                    for k in ["price", "stop"] {
                        match f(k) {
                            Some(v) => o[k] = num(d(&v)),
                            None if (k == "price"
                                && matches!(ty.as_str(), "limit" | "stop_limit"))
                                || (k == "stop"
                                    && matches!(ty.as_str(), "stop" | "stop_limit")) =>
                            {
                                return Err(format!("{k} is required for {ty} orders"));
                            }
                            None => {}
                        }
                    }
                    if !matches!(ty.as_str(), "market" | "limit" | "stop" | "stop_limit") {
                        return Err(format!("invalid type {ty}"));
                    }
                    Ok(o)
                };
                let id = st.next_id;
                st.next_id += 1;
                let form_echo: Vec<Value> = form.iter().map(|(k, v)| json!([k, v])).collect();
                if class == "equity" {
                    let mut order = match leg_of(None) {
                        Ok(o) => o,
                        Err(e) => return (400, json!({"errors": {"error": e}})),
                    };
                    order["id"] = json!(id);
                    order["tag"] = json!(tag);
                    order["class"] = json!(class);
                    order["form"] = json!(form_echo);
                    let sym = order["symbol"].as_str().unwrap_or_default().to_string();
                    let side = order["side"].as_str().unwrap_or_default().to_string();
                    let qty = d(param(form, "quantity").unwrap_or("0"));
                    let market = st.prices.get(sym.as_str()).copied();
                    if order["type"] == "market" {
                        let pos = st.positions.get(&sym).copied().unwrap_or_default();
                        if !side_allowed(&side, pos, qty) {
                            return (
                                400,
                                json!({"errors": {"error": format!("side {side} does not match the position {pos}")}}),
                            );
                        }
                        let price = market.unwrap_or_default();
                        let part = st.partial.next(&order);
                        match part {
                            None => {
                                fill_against(&mut st, &mut order, price, &now);
                                if st.pending_first {
                                    order["status"] = json!("pending");
                                }
                            }
                            Some(p) => {
                                let filled = match p {
                                    Partial::Fraction(f) => (qty * f).floor(),
                                    Partial::Qty(q) => q.min(qty),
                                };
                                if filled > Decimal::ZERO {
                                    let signed = if buys(&order["side"]) {
                                        filled
                                    } else {
                                        -filled
                                    };
                                    let st = &mut *st;
                                    apply_fill(
                                        &mut st.positions,
                                        &mut st.entries,
                                        &sym,
                                        signed,
                                        price,
                                    );
                                }
                                order["status"] = json!("partially_filled");
                                order["exec_quantity"] = num(filled);
                                order["remaining_quantity"] = num(qty - filled);
                                order["avg_fill_price"] = num(if filled > Decimal::ZERO {
                                    price
                                } else {
                                    Decimal::ZERO
                                });
                                order["last_fill_price"] = order["avg_fill_price"].clone();
                                order["last_fill_quantity"] = num(filled);
                                order["_then"] = json!("canceled");
                            }
                        }
                    } else if let Some(m) = market {
                        // A limit through the market fills at once at its limit; at or outside
                        // the market it rests until `set_price` crosses it.
                        if let ("limit", Some(l)) = (
                            order["type"].as_str().unwrap_or_default(),
                            order["price"].as_f64(),
                        ) {
                            let l = Decimal::from_str(&l.to_string()).unwrap();
                            if (buys(&order["side"]) && m < l) || (!buys(&order["side"]) && m > l) {
                                fill_against(&mut st, &mut order, l, &now);
                            }
                        }
                    }
                    st.orders.push(order);
                } else if matches!(class.as_str(), "oco" | "oto" | "otoco") {
                    let n = if class == "otoco" { 3 } else { 2 };
                    let mut legs = Vec::new();
                    for i in 0..n {
                        match leg_of(Some(i)) {
                            Ok(mut l) => {
                                l["id"] = json!(st.next_id);
                                st.next_id += 1;
                                if class != "oco" && i > 0 {
                                    l["status"] = json!("pending");
                                }
                                legs.push(l);
                            }
                            Err(e) => return (400, json!({"errors": {"error": e}})),
                        }
                    }
                    let sym0 = legs[0]["symbol"].clone();
                    let mut order = json!({"id": id, "tag": tag, "class": class, "symbol": sym0,
                        "type": class, "status": "open", "num_legs": n, "leg": legs,
                        "duration": param(form, "duration"), "exec_quantity": 0.0, "avg_fill_price": 0.0,
                        "create_date": now, "transaction_date": now, "form": form_echo});
                    // An OTO / OTOCO whose first leg is a market order: it fills now.
                    if class != "oco" && order["leg"][0]["type"] == "market" {
                        let sym = sym0.as_str().unwrap_or_default().to_string();
                        let price = st.prices.get(sym.as_str()).copied().unwrap_or_default();
                        let mut l0 = order["leg"][0].clone();
                        if fill_against(&mut st, &mut l0, price, &now) {
                            for l in order["leg"].as_array_mut().unwrap().iter_mut().skip(1) {
                                l["status"] = json!("open");
                            }
                        }
                        order["leg"][0] = l0;
                        order["status"] = json!(parent_status(&order));
                    }
                    st.orders.push(order);
                } else {
                    return (
                        400,
                        json!({"errors": {"error": format!("invalid class {class}")}}),
                    );
                }
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
                        if o["status"] == "pending" && o["class"] == "equity" {
                            o["status"] = json!("filled");
                        }
                        if let Some(next) = o.as_object_mut().and_then(|m| m.remove("_then")) {
                            o["status"] = next;
                            o["remaining_quantity"] = json!(0.0);
                        }
                        (200, json!({"order": without_internals(out)}))
                    }
                    None => (404, json!("Order not found")),
                }
            }
            "DELETE /orders/id" => {
                let id: u64 = path.rsplit('/').next().unwrap().parse().unwrap_or(0);
                let now = stamp(st.today);
                let Some(o) = st.orders.iter_mut().find(|o| o["id"] == id) else {
                    return (
                        400,
                        json!({"errors": {"error": format!("order {id} not found")}}),
                    );
                };
                if !tradier_working(o) {
                    let status = o["status"].as_str().unwrap_or_default().to_string();
                    return (
                        400,
                        json!({"errors": {"error": format!("order already in finalized state: {status}")}}),
                    );
                }
                // Cancelling an advanced order cancels its working legs.
                if let Some(legs) = o["leg"].as_array_mut() {
                    for l in legs.iter_mut().filter(|l| tradier_working(l)) {
                        l["status"] = json!("canceled");
                    }
                }
                if let Some(m) = o.as_object_mut() {
                    m.remove("_then");
                }
                o["status"] = json!("canceled");
                o["transaction_date"] = json!(now);
                (200, json!({"order": {"id": id, "status": "ok"}}))
            }
            "GET /orders" => {
                // Today's orders (the fake's calendar), or with `filter=all` those created from
                // `start` to `end` (YYYY-MM-DD, at most a month); `date=` one day. Pages of at
                // most `limit` (default 25), "null" past the end.
                let today = st.today;
                let day = |k: &str| param(q, k).map(|v| NaiveDate::parse_from_str(v, "%Y-%m-%d"));
                let intraday = param(q, "filter").is_none_or(|f| f == "intraday")
                    && param(q, "date").is_none();
                let keep_working = intraday && st.intraday_lists_working;
                let (from, to) = match (param(q, "filter"), day("date")) {
                    (_, Some(Ok(dd))) => (dd, dd),
                    (_, Some(Err(_))) => {
                        return (400, json!({"errors": {"error": "Invalid date"}}))
                    }
                    (Some("all"), None) => {
                        let (Ok(from), Ok(to)) = (
                            day("start").unwrap_or(Ok(today - chrono::Days::new(31))),
                            day("end").unwrap_or(Ok(today)),
                        ) else {
                            return (
                                400,
                                json!({"errors": {"error": "Invalid start or end date"}}),
                            );
                        };
                        if (to - from).num_days() > 31 {
                            return (
                                400,
                                json!({"errors": {"error": "filter=all returns at most 1 month of data"}}),
                            );
                        }
                        (from, to)
                    }
                    _ => (today, today),
                };
                let limit: usize = param(q, "limit")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(25)
                    .min(25);
                let page: usize = param(q, "page").and_then(|l| l.parse().ok()).unwrap_or(1);
                let items: Vec<Value> = st
                    .orders
                    .iter()
                    .filter(|o| {
                        (from..=to).contains(&created_on(o, today))
                            || (keep_working && tradier_working(o))
                    })
                    .skip((page - 1) * limit)
                    .take(limit)
                    .cloned()
                    .map(without_internals)
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

/// An order as the API shows it (without the fake's own bookkeeping).
fn without_internals(mut o: Value) -> Value {
    if let Some(m) = o.as_object_mut() {
        m.remove("_then");
    }
    o
}

/// A request straight to the fake with the right headers, for tests of endpoints no client method
/// uses yet: `form` is sent form-encoded when not empty. Returns (status, JSON or text).
pub(crate) async fn tradier_call(
    url: &str,
    method: &str,
    path: &str,
    form: &[(&str, &str)],
) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = reqwest::Client::new()
        .request(m, format!("{url}/v1/accounts/{TRADIER_ACCOUNT}{path}"))
        .bearer_auth(TRADIER_TOKEN)
        .header("accept", "application/json");
    if !form.is_empty() {
        let body = form
            .iter()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    sparky::exchanges::aster::form_encode(k),
                    sparky::exchanges::aster::form_encode(v)
                )
            })
            .collect::<Vec<_>>()
            .join("&");
        req = req
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
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

/// A test app with one user whose Tradier credentials point at a fresh fake: (fake, its URL, app,
/// user, webhook secret).
pub(crate) async fn tradier_app() -> (Arc<TradierFake>, String, TestApp, Uuid, String) {
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
    (fake, url, app, user, secret)
}
