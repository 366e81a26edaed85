//! The OANDA v20 fake.

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
    /// instrument -> net units
    pub(crate) positions: HashMap<String, Decimal>,
    pub(crate) orders: Vec<Value>,
    pub(crate) transactions: HashMap<String, Value>,
    pub(crate) trades: HashMap<String, Value>,
    pub(crate) next_id: u64,
    pub(crate) insufficient_margin: bool,
    /// `NAV` of `/summary`; `None` answers 500 (equity unreadable).
    pub(crate) nav: Option<Decimal>,
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
                transactions: HashMap::new(),
                trades: HashMap::new(),
                next_id: 6000,
                insufficient_margin: false,
                nav: Some(dec!(10000)),
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
    pub(crate) fn fill(
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

    pub(crate) fn process(
        &self,
        method: &Method,
        rest: &str,
        q: &[(String, String)],
        body: &Value,
    ) -> (u16, Value) {
        let mut st = self.st.lock().unwrap();
        let inst_q = param(q, "instruments").unwrap_or_default().to_string();
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
                    ("trailingStopLossOnFill", "trailingStopLoss"),
                ] {
                    if o[key].is_object() {
                        let id = st.next_id.to_string();
                        st.next_id += 1;
                        st.orders.push(json!({"id": id, "state": "PENDING", "type": kind, "price": o[key]["price"].clone(),
                            "distance": o[key]["distance"].clone(),
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
