//! OANDA v20 REST (forex/CFDs).
//!
//! - Hosts by `environment`: `sandbox` = practice (`api-fxpractice`), `production` = live
//!   (`api-fxtrade`); `OANDA_BASE_URL` overrides both. `Authorization: Bearer <token>` (the token is
//!   the credential's api key) and the account id from `bot_credentials.account_id`.
//! - Sizing: `units` are signed (negative = short) and rounded down to the instrument's
//!   `tradeUnitsPrecision`; `minimumTradeSize` is the minimum; prices are rounded to
//!   `displayPrecision`. Instrument rules are cached per account and instrument.
//! - A 201 is not a fill: only `orderFillTransaction` is. A 201 carrying `orderCancelTransaction`
//!   (INSUFFICIENT_MARGIN, MARKET_HALTED, ...) is a permanent rejection with OANDA's reason.
//! - Exactly once: every order carries `clientExtensions.id` (the job's deterministic id); an
//!   opening order also gives the resulting trade that id (`tradeClientExtensions`), which is how
//!   stop-loss / take-profit find the trade. After an unknown outcome the order is looked up at
//!   `GET /orders/@{id}`; a CLIENT_ORDER_ID_ALREADY_EXISTS (400 reject or 201 cancel; the live
//!   shape is unverified, both are handled) means "already placed" and is answered by that look-up.
//! - Closing goes through `PUT /positions/{instrument}/close` (`longUnits`/`shortUnits` = `ALL`),
//!   with the close leg's id as the closing order's client id.
//! - Stop-loss / take-profit are the trade's dependent orders (`PUT /trades/@{id}/orders`, the same
//!   orders `stopLossOnFill`/`takeProfitOnFill` create), set right after the fill from the actual
//!   fill price.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::http::{self, dec, id_text, Call, Reply};
use super::once::place_once;
use super::{
    client_order_id, sibling_client_order_id, ErrorClass, ExPosition, Exchange, ExchangeContext,
    ExchangeError, Leg, OpenOrder, OrderAck, OrderRequest, OrderState, Protection, RestingOrder,
    SharedState, SymbolRules,
};
use crate::credentials::Credentials;
use crate::domain::{
    CredentialEnv, ExchangeKind, OrderSide, OrderType, Side, Symbol, TrailingStop,
};
use crate::secrets::SecretString;
use crate::sizing::{round_down, round_to_tick};

pub const LIVE_URL: &str = "https://api-fxtrade.oanda.com";
pub const PRACTICE_URL: &str = "https://api-fxpractice.oanda.com";
const NAME: &str = "oanda";
const TAG: &str = "sparky";

pub struct OandaClient {
    http: reqwest::Client,
    base: String,
    token: SecretString,
    account: String,
    shared: Arc<SharedState>,
}

impl fmt::Debug for OandaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OandaClient")
            .field("base", &self.base)
            .field("account", &self.account)
            .field("token", &"[redacted]")
            .finish()
    }
}

/// The parts of an OANDA error body worth showing: `errorMessage`, `errorCode` and any reject
/// reason.
fn error_text(v: &Value, text: &str) -> String {
    let mut parts = Vec::new();
    if let Some(m) = v["errorMessage"].as_str() {
        parts.push(m.to_string());
    }
    let mut codes = Vec::new();
    if let Some(c) = v["errorCode"].as_str() {
        codes.push(c.to_string());
    }
    if let Some(obj) = v.as_object() {
        for (k, t) in obj {
            if k.ends_with("RejectTransaction") {
                if let Some(r) = t["rejectReason"].as_str() {
                    if !codes.iter().any(|c| c == r) {
                        codes.push(r.to_string());
                    }
                }
            }
        }
    }
    if !codes.is_empty() {
        parts.push(format!("({})", codes.join(", ")));
    }
    if parts.is_empty() {
        http::snippet(text)
    } else {
        parts.join(" ")
    }
}

/// Does this error body say the client id is taken (the order was placed before)?
fn id_already_used(v: &Value) -> bool {
    let s = v.to_string();
    s.contains("CLIENT_ORDER_ID_ALREADY_EXISTS") || s.contains("CLIENT_TRADE_ID_ALREADY_EXISTS")
}

/// A failed call: the HTTP status (none when no reply arrived), the error body and the error.
struct Failure {
    status: Option<u16>,
    body: Value,
    error: ExchangeError,
}

fn check(reply: Reply, call: Call) -> Result<Value, Failure> {
    if reply.status.is_success() {
        return Ok(reply.json);
    }
    let message = error_text(&reply.json, &reply.text);
    let error = http::status_error(NAME, &reply, call, &message);
    Err(Failure {
        status: Some(reply.status.as_u16()),
        body: reply.json,
        error,
    })
}

/// `10^-places` (the step of `places` decimals).
fn step_of(places: &Value) -> Option<Decimal> {
    let p = places.as_u64()?;
    Some(Decimal::new(1, u32::try_from(p).ok()?))
}

impl OandaClient {
    pub fn new(creds: &Credentials, ctx: &ExchangeContext) -> Result<OandaClient, ExchangeError> {
        let base = match (&ctx.oanda_base_url, creds.environment) {
            (Some(u), _) => http::base_url(u, "/v3"),
            (None, CredentialEnv::Production) => LIVE_URL.to_string(),
            (None, CredentialEnv::Sandbox) => PRACTICE_URL.to_string(),
        };
        Ok(OandaClient {
            http: ctx.http.clone(),
            base,
            token: super::bearer_token(creds)?,
            account: super::account_id(creds)?,
            shared: ctx.shared.clone(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v3/accounts/{}{path}", self.base, self.account)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        call: Call,
    ) -> Result<Value, Failure> {
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(self.token.expose())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let reply = http::send(NAME, req, call).await.map_err(|error| Failure {
            status: None,
            body: Value::Null,
            error,
        })?;
        check(reply, call)
    }

    async fn get(&self, path: &str) -> Result<Value, ExchangeError> {
        self.call(Method::GET, path, None, Call::Read)
            .await
            .map_err(|f| f.error)
    }

    async fn rules(&self, symbol: &Symbol) -> Result<SymbolRules, ExchangeError> {
        let key = format!("{}|{}|{symbol}", self.base, self.account);
        if let Some(r) = self.shared.oanda_rules.get(&key) {
            return Ok(r);
        }
        let v = self
            .get(&format!("/instruments?instruments={symbol}"))
            .await?;
        let inst = v["instruments"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == symbol.as_str()))
            .ok_or_else(|| {
                ExchangeError::permanent(format!(
                    "oanda: unknown instrument {symbol} for this account"
                ))
            })?;
        let step = step_of(&inst["tradeUnitsPrecision"])
            .ok_or_else(|| http::unexpected(NAME, "instrument without `tradeUnitsPrecision`"))?;
        let tick = step_of(&inst["displayPrecision"]).unwrap_or(Decimal::new(1, 5));
        let min = dec(&inst["minimumTradeSize"]).unwrap_or(step).max(step);
        let rules = SymbolRules {
            step,
            min_qty: min.normalize(),
            min_notional: Decimal::ZERO,
            tick,
        };
        self.shared.oanda_rules.put(key, rules.clone());
        Ok(rules)
    }

    /// The price size of one pip of `symbol`: `10^pipLocation` from the instrument.
    async fn pip_size(&self, symbol: &Symbol) -> Result<Decimal, ExchangeError> {
        let v = self
            .get(&format!("/instruments?instruments={symbol}"))
            .await?;
        let loc = v["instruments"]
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == symbol.as_str()))
            .and_then(|i| i["pipLocation"].as_i64())
            .filter(|l| (-10..=10).contains(l))
            .ok_or_else(|| http::unexpected(NAME, "instrument without a usable `pipLocation`"))?;
        let mut pip = Decimal::ONE;
        for _ in 0..loc.unsigned_abs() {
            pip = if loc < 0 {
                pip / Decimal::TEN
            } else {
                crate::money::mul(pip, Decimal::TEN)?
            };
        }
        Ok(pip.normalize())
    }

    /// The side of each open trade of `instrument`, by trade id (`GET /openTrades` lists the
    /// account's trades of every instrument).
    async fn trade_sides(&self, instrument: &str) -> Result<HashMap<String, Side>, ExchangeError> {
        let v = self.get("/openTrades").await?;
        let Some(trades) = v["trades"].as_array() else {
            return Err(http::unexpected(NAME, "openTrades without `trades`"));
        };
        Ok(trades
            .iter()
            .filter(|t| t["instrument"].as_str() == Some(instrument))
            .filter_map(|t| {
                let units = dec(&t["currentUnits"])?;
                let side = if units < Decimal::ZERO {
                    Side::Short
                } else {
                    Side::Long
                };
                Some((id_text(&t["id"])?, side))
            })
            .collect())
    }

    /// The transaction `id` (to read a fill's units and price).
    async fn transaction(&self, id: &str) -> Result<Value, ExchangeError> {
        let v = self.get(&format!("/transactions/{id}")).await?;
        Ok(v["transaction"].clone())
    }

    /// What to do when OANDA says the client id is already taken: the order exists; return it.
    async fn already_placed(
        &self,
        symbol: &Symbol,
        coid: &str,
        why: &str,
    ) -> Result<OrderAck, ExchangeError> {
        match self.find_order(symbol, coid).await? {
            Some(ack) => Ok(ack),
            None => Err(ExchangeError::permanent(format!(
                "oanda: {why}, but no order {coid} can be found; not sent again"
            ))),
        }
    }

    /// Read the result of an order create (201) or a position close (200); `prefix` is "" or
    /// "long"/"short" (the close reply prefixes its transaction names).
    async fn order_result(
        &self,
        v: &Value,
        prefix: &str,
        symbol: &Symbol,
        coid: &str,
    ) -> Result<OrderAck, ExchangeError> {
        let field = |name: &str| {
            if prefix.is_empty() {
                let mut s = name.to_string();
                s[..1].make_ascii_lowercase();
                v[s].clone()
            } else {
                v[format!("{prefix}{name}")].clone()
            }
        };
        let fill = field("OrderFillTransaction");
        if fill.is_object() {
            return fill_ack(&fill, coid);
        }
        let cancel = field("OrderCancelTransaction");
        if cancel.is_object() {
            let reason = cancel["reason"].as_str().unwrap_or("no reason given");
            if matches!(
                reason,
                "CLIENT_ORDER_ID_ALREADY_EXISTS" | "CLIENT_TRADE_ID_ALREADY_EXISTS"
            ) {
                return self
                    .already_placed(symbol, coid, &format!("order cancelled: {reason}"))
                    .await;
            }
            return Err(ExchangeError::permanent(format!(
                "oanda cancelled the order {coid}: {reason}"
            )));
        }
        let create = field("OrderCreateTransaction");
        if let Some(id) = id_text(&create["id"]) {
            // Created, not (yet) filled: a resting limit order.
            return Ok(OrderAck {
                exchange_order_id: id,
                client_order_id: coid.to_string(),
                state: OrderState::Accepted,
                filled_qty: Decimal::ZERO,
                avg_price: None,
                fee: None,
            });
        }
        Err(ExchangeError::unknown(format!(
            "oanda: unexpected order reply {}; the order {coid} may have been placed",
            http::snippet(&v.to_string())
        )))
    }

    /// Send an order-creating request and read the result.
    async fn write_order(
        &self,
        method: Method,
        path: &str,
        body: Value,
        prefix: &str,
        symbol: &Symbol,
        coid: &str,
    ) -> Result<OrderAck, ExchangeError> {
        match self.call(method, path, Some(body), Call::Write).await {
            Ok(v) => self.order_result(&v, prefix, symbol, coid).await,
            Err(f) if f.error.class == ErrorClass::Permanent && id_already_used(&f.body) => {
                self.already_placed(symbol, coid, &f.error.message).await
            }
            Err(f) => Err(f.error),
        }
    }
}

fn fill_ack(fill: &Value, coid: &str) -> Result<OrderAck, ExchangeError> {
    let units = dec(&fill["units"]).unwrap_or_default().abs();
    let price = dec(&fill["fullVWAP"])
        .or_else(|| dec(&fill["price"]))
        .filter(|p| *p > Decimal::ZERO);
    let order_id = id_text(&fill["orderID"])
        .or_else(|| id_text(&fill["id"]))
        .unwrap_or_default();
    Ok(OrderAck {
        exchange_order_id: order_id,
        client_order_id: fill["clientOrderID"].as_str().unwrap_or(coid).to_string(),
        state: OrderState::Filled,
        filled_qty: units.normalize(),
        avg_price: price,
        fee: fill_fee(fill),
    })
}

/// What a fill cost the account, in its home currency: `commission` ("always positive, however it
/// reduces the balance") plus `guaranteedExecutionFee`, minus `financing` (negative when paid).
/// `None` when the fill carries none of them; a sum that does not fit is left out too (a fee is
/// never a reason to fail an order that filled).
fn fill_fee(fill: &Value) -> Option<Decimal> {
    let parts = [
        dec(&fill["commission"]),
        dec(&fill["guaranteedExecutionFee"]),
        dec(&fill["financing"]).map(|f| -f),
    ];
    if parts.iter().all(Option::is_none) {
        return None;
    }
    parts
        .into_iter()
        .flatten()
        .try_fold(Decimal::ZERO, |sum, x| sum.checked_add(x))
        .map(|f| f.normalize())
}

fn side_units(side: OrderSide, qty: Decimal) -> String {
    let q = qty.normalize();
    match side {
        OrderSide::Buy => q.to_string(),
        OrderSide::Sell => (-q).to_string(),
    }
}

#[async_trait]
impl Exchange for OandaClient {
    /// Stop-loss and take-profit ride on the opening order (`stopLossOnFill` /
    /// `takeProfitOnFill`), so a position is never open without them.
    fn protects_on_fill(&self) -> bool {
        true
    }

    fn kind(&self) -> ExchangeKind {
        ExchangeKind::Oanda
    }

    async fn symbol_rules(&self, symbol: &Symbol) -> Result<SymbolRules, ExchangeError> {
        self.rules(symbol).await
    }

    async fn price(&self, symbol: &Symbol) -> Result<Decimal, ExchangeError> {
        let v = self.get(&format!("/pricing?instruments={symbol}")).await?;
        let p = v["prices"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["instrument"] == symbol.as_str()))
            .ok_or_else(|| {
                ExchangeError::permanent(format!("oanda: no price for instrument {symbol}"))
            })?;
        let bid = dec(&p["bids"][0]["price"]).or_else(|| dec(&p["closeoutBid"]));
        let ask = dec(&p["asks"][0]["price"]).or_else(|| dec(&p["closeoutAsk"]));
        match (bid, ask) {
            (Some(b), Some(a)) => Ok(crate::money::midpoint(b, a)?),
            (Some(x), None) | (None, Some(x)) => Ok(x),
            (None, None) => Err(http::unexpected(NAME, "price without bids or asks")),
        }
    }

    async fn position(&self, symbol: &Symbol) -> Result<Option<ExPosition>, ExchangeError> {
        let v = self.get("/openPositions").await?;
        let Some(p) = v["positions"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["instrument"] == symbol.as_str()))
        else {
            return Ok(None);
        };
        let long = dec(&p["long"]["units"]).unwrap_or_default();
        let short = dec(&p["short"]["units"]).unwrap_or_default();
        let net = crate::money::add(long, short)?;
        if net.is_zero() {
            return Ok(None);
        }
        let (side, entry) = if net > Decimal::ZERO {
            (Side::Long, dec(&p["long"]["averagePrice"]))
        } else {
            (Side::Short, dec(&p["short"]["averagePrice"]))
        };
        Ok(Some(ExPosition {
            side,
            quantity: net.abs().normalize(),
            entry_price: entry,
        }))
    }

    async fn place_order(&self, o: &OrderRequest) -> Result<OrderAck, ExchangeError> {
        let rules = self.rules(&o.symbol).await?;
        let qty = round_down(o.quantity, rules.step)?;
        if qty <= Decimal::ZERO || qty < rules.min_qty {
            return Err(ExchangeError::permanent(format!(
                "oanda: order too small: {} {} rounds down to {qty} units (precision {}), below the minimum trade size {}",
                o.quantity, o.symbol, rules.step, rules.min_qty
            )));
        }
        let ext = json!({"id": o.client_order_id, "tag": TAG});
        let mut order = json!({
            "instrument": o.symbol.as_str(),
            "units": side_units(o.side, qty),
            "positionFill": if o.reduce_only { "REDUCE_ONLY" } else { "DEFAULT" },
            "clientExtensions": ext,
        });
        if !o.reduce_only {
            order["tradeClientExtensions"] = ext.clone();
        }
        // Stop-loss / take-profit on fill: OANDA creates them with the trade, atomically; if it
        // cannot (e.g. a level on the wrong side of the price), it cancels the order and says why.
        if let Some(f) = &o.on_fill {
            for (key, leg, price) in [
                ("stopLossOnFill", Leg::StopLoss, f.stop_loss),
                ("takeProfitOnFill", Leg::TakeProfit, f.take_profit),
            ] {
                if let Some(price) = price {
                    let coid = sibling_client_order_id(&o.client_order_id, leg);
                    order[key] = json!({
                        "price": round_to_tick(price, rules.tick)?.normalize().to_string(),
                        "timeInForce": "GTC",
                        "clientExtensions": {"id": coid, "tag": TAG},
                    });
                }
            }
        }
        if let Some(t) = o.on_fill.as_ref().and_then(|f| f.trailing_stop) {
            let distance = match t {
                TrailingStop::Distance(d) => d,
                TrailingStop::Pips(p) => crate::money::mul(p, self.pip_size(&o.symbol).await?)?,
                TrailingStop::Percent(_) => {
                    return Err(ExchangeError::permanent(
                        "oanda: a trailing stop on fill needs a price distance (the executor converts percents)",
                    ))
                }
            };
            let coid = sibling_client_order_id(&o.client_order_id, Leg::StopLoss);
            let coid = format!("{}r", &coid[..coid.len() - 1]);
            order["trailingStopLossOnFill"] = json!({
                "distance": round_to_tick(distance, rules.tick)?.normalize().to_string(),
                "timeInForce": "GTC",
                "clientExtensions": {"id": coid, "tag": TAG},
            });
        }
        match o.order_type {
            OrderType::Market => {
                order["type"] = json!("MARKET");
                order["timeInForce"] = json!("FOK");
            }
            OrderType::Limit => {
                let p = o.limit_price.ok_or_else(|| {
                    ExchangeError::permanent("oanda: a limit order needs a price")
                })?;
                order["type"] = json!("LIMIT");
                order["timeInForce"] = json!("GTC");
                order["price"] = json!(round_to_tick(p, rules.tick)?.normalize().to_string());
            }
        }
        self.write_order(
            Method::POST,
            "/orders",
            json!({ "order": order }),
            "",
            &o.symbol,
            &o.client_order_id,
        )
        .await
    }

    async fn close_position(
        &self,
        symbol: &Symbol,
        position: &ExPosition,
        client_order_id: &str,
    ) -> Result<OrderAck, ExchangeError> {
        let ext = json!({"id": client_order_id, "tag": TAG});
        let (prefix, body) = match position.side {
            Side::Long => (
                "long",
                json!({"longUnits": "ALL", "longClientExtensions": ext}),
            ),
            Side::Short => (
                "short",
                json!({"shortUnits": "ALL", "shortClientExtensions": ext}),
            ),
        };
        self.write_order(
            Method::PUT,
            &format!("/positions/{symbol}/close"),
            body,
            prefix,
            symbol,
            client_order_id,
        )
        .await
    }

    async fn find_order(
        &self,
        _symbol: &Symbol,
        client_order_id: &str,
    ) -> Result<Option<OrderAck>, ExchangeError> {
        let v = match self
            .call(
                Method::GET,
                &format!("/orders/@{client_order_id}"),
                None,
                Call::Read,
            )
            .await
        {
            Ok(v) => v,
            Err(f) if f.status == Some(404) => return Ok(None),
            Err(f) => return Err(f.error),
        };
        let o = &v["order"];
        let id = id_text(&o["id"]).unwrap_or_default();
        match o["state"].as_str().unwrap_or_default() {
            "FILLED" => {
                let fill_id = id_text(&o["fillingTransactionID"])
                    .ok_or_else(|| http::unexpected(NAME, "filled order without a fill"))?;
                let fill = self.transaction(&fill_id).await?;
                let mut ack = fill_ack(&fill, client_order_id)?;
                ack.exchange_order_id = id;
                ack.client_order_id = client_order_id.to_string();
                Ok(Some(ack))
            }
            // Cancelled with nothing filled (by OANDA: a limit whose time ran out, a dependent
            // stop-loss / take-profit whose trade closed, LINKED_TRADE_CLOSED; or by Sparky): it
            // had no effect, as Aster's and Tradier's look-ups say of theirs. A leg looked up
            // this way may be sent again; if OANDA refuses its client id a second time, the send
            // ends as "already used, but no order can be found" (permanent, nothing placed).
            "CANCELLED" => Ok(None),
            _ => Ok(Some(OrderAck {
                exchange_order_id: id,
                client_order_id: client_order_id.to_string(),
                state: OrderState::Accepted,
                filled_qty: Decimal::ZERO,
                avg_price: None,
                fee: None,
            })),
        }
    }

    async fn equity(&self) -> Result<Decimal, ExchangeError> {
        let v = self.get("/summary").await?;
        http::dec_field(NAME, &v["account"], "NAV")
    }

    async fn protect(&self, p: &Protection) -> Result<Vec<RestingOrder>, ExchangeError> {
        let trade_id = client_order_id(p.job_id, Leg::Open);
        let mut body = json!({});
        let mut wanted = Vec::new();
        let mut resting = Vec::new();
        for (leg, key, price) in [
            (Leg::StopLoss, "stopLoss", p.stop_loss),
            (Leg::TakeProfit, "takeProfit", p.take_profit),
        ] {
            let Some(price) = price else { continue };
            let coid = client_order_id(p.job_id, leg);
            body[key] = json!({
                "price": price.normalize().to_string(),
                "timeInForce": "GTC",
                "clientExtensions": {"id": coid, "tag": TAG},
            });
            resting.push(RestingOrder {
                leg,
                client_order_id: coid.clone(),
                exchange_order_id: None,
                side: OrderSide::closing(p.position_side),
                quantity: p.quantity,
                price: Some(price),
            });
            wanted.push(coid);
        }
        if wanted.is_empty() {
            return Ok(resting);
        }
        let body = &body;
        place_once(
            || async {
                self.call(
                    Method::PUT,
                    &format!("/trades/@{trade_id}/orders"),
                    Some(body.clone()),
                    Call::Write,
                )
                .await
                .map(|_| resting.clone())
                .map_err(|f| f.error)
            },
            || async {
                // Placed when every wanted order is found.
                for coid in &wanted {
                    if self.find_order(&p.symbol, coid).await?.is_none() {
                        return Ok(None);
                    }
                }
                Ok(Some(resting.clone()))
            },
        )
        .await
    }

    /// `GET /pendingOrders`, this instrument's: entries (LIMIT, STOP, MARKET_IF_TOUCHED) and the
    /// trades' dependent STOP_LOSS / TAKE_PROFIT orders.
    async fn open_orders(&self, symbol: &Symbol) -> Result<Vec<OpenOrder>, ExchangeError> {
        let v = self.get("/pendingOrders").await?;
        let Some(orders) = v["orders"].as_array() else {
            return Err(http::unexpected(NAME, "pendingOrders without `orders`"));
        };
        // A dependent order (a trade's STOP_LOSS / TAKE_PROFIT) names neither its instrument, nor
        // units, nor side: it belongs to this instrument only if its trade does, and it closes its
        // trade, so its side is the opposite of the trade's (read once, only when there is one).
        let trade_sides = if orders.iter().any(|o| o["tradeID"].is_string()) {
            self.trade_sides(symbol.as_str()).await?
        } else {
            HashMap::new()
        };
        let mut open = Vec::new();
        for o in orders {
            let kind = o["type"].as_str().unwrap_or_default();
            let instrument = o["instrument"].as_str();
            // Dependent orders carry no instrument: their trade decides (below).
            if instrument.is_some_and(|i| i != symbol.as_str()) {
                continue;
            }
            let Some(id) = id_text(&o["id"]) else {
                return Err(http::unexpected(NAME, "pending order without `id`"));
            };
            let price = dec(&o["price"]);
            let units = dec(&o["units"]).unwrap_or_default();
            let side = match id_text(&o["tradeID"]) {
                Some(trade) => match trade_sides.get(&trade) {
                    Some(side) => OrderSide::closing(*side),
                    // Its trade is another instrument's, or closed meanwhile (OANDA cancels it
                    // with the trade).
                    None => continue,
                },
                None if units < Decimal::ZERO => OrderSide::Sell,
                None => OrderSide::Buy,
            };
            open.push(OpenOrder {
                exchange_order_id: id,
                client_order_id: o["clientExtensions"]["id"].as_str().map(str::to_string),
                side,
                quantity: (!units.is_zero()).then(|| units.abs()),
                stop_loss: price.filter(|_| kind == "STOP_LOSS"),
                take_profit: price.filter(|_| kind == "TAKE_PROFIT"),
                limit_price: price
                    .filter(|_| matches!(kind, "LIMIT" | "STOP" | "MARKET_IF_TOUCHED")),
            });
        }
        Ok(open)
    }

    async fn cancel_order(&self, _symbol: &Symbol, order: &OpenOrder) -> Result<(), ExchangeError> {
        match self
            .call(
                Method::PUT,
                &format!("/orders/{}/cancel", order.exchange_order_id),
                None,
                Call::Write,
            )
            .await
        {
            Ok(_) => Ok(()),
            // ORDER_DOESNT_EXIST: filled or cancelled meanwhile (the caller lists again).
            Err(f) if f.status == Some(404) => Ok(()),
            Err(f) => Err(f.error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn units_are_signed_decimal_strings() {
        assert_eq!(side_units(OrderSide::Buy, dec!(92.000)), "92");
        assert_eq!(side_units(OrderSide::Sell, dec!(92.5)), "-92.5");
    }

    #[test]
    fn steps_from_precision() {
        assert_eq!(step_of(&json!(0)), Some(dec!(1)));
        assert_eq!(step_of(&json!(2)), Some(dec!(0.01)));
        assert_eq!(step_of(&json!("x")), None);
    }

    #[test]
    fn error_text_keeps_oanda_words() {
        let v = json!({
            "errorMessage": "The Client Order ID specified is already in use",
            "errorCode": "CLIENT_ORDER_ID_ALREADY_EXISTS",
            "orderRejectTransaction": {"rejectReason": "CLIENT_ORDER_ID_ALREADY_EXISTS"}
        });
        assert_eq!(
            error_text(&v, ""),
            "The Client Order ID specified is already in use (CLIENT_ORDER_ID_ALREADY_EXISTS)"
        );
        assert!(id_already_used(&v));
        assert_eq!(error_text(&Value::Null, " oops "), "oops");
    }

    #[test]
    fn fills_are_read_exactly() {
        let fill = json!({"type": "ORDER_FILL", "orderID": "6372", "clientOrderID": "abc",
            "units": "-92", "fullVWAP": "1.08512", "price": "1.08500"});
        let a = fill_ack(&fill, "abc").unwrap();
        assert_eq!(a.exchange_order_id, "6372");
        assert_eq!(a.filled_qty, dec!(92));
        assert_eq!(a.avg_price, Some(dec!(1.08512)));
        assert_eq!(a.fee, None, "no fee fields: unknown, not 0");
    }

    #[test]
    fn a_fills_fee_is_commission_and_guaranteed_fee_minus_financing() {
        let fill = json!({"units": "10", "fullVWAP": "1.1", "commission": "0.2500",
            "guaranteedExecutionFee": "0.05", "financing": "-0.1000"});
        assert_eq!(fill_ack(&fill, "x").unwrap().fee, Some(dec!(0.4)));
        let free = json!({"units": "10", "commission": "0.0000", "financing": "0.0000"});
        assert_eq!(fill_ack(&free, "x").unwrap().fee, Some(dec!(0)));
        // Financing collected lowers the cost.
        let credit = json!({"units": "10", "commission": "0.1", "financing": "0.3"});
        assert_eq!(fill_ack(&credit, "x").unwrap().fee, Some(dec!(-0.2)));
    }
}
