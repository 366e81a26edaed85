//! Tradier brokerage (US equities).
//!
//! - Hosts by `environment`: `sandbox` = `sandbox.tradier.com` (paper money), `production` =
//!   `api.tradier.com`; `TRADIER_BASE_URL` overrides both. `Authorization: Bearer <token>` (the
//!   credential's api key), the account id from `bot_credentials.account_id`, and always
//!   `Accept: application/json` (Tradier answers XML otherwise). Orders are form-encoded.
//! - Whole shares only: the rules say step 1, minimum 1, so less than one share is refused before
//!   anything is sent, with the numbers.
//! - The order side comes from the current position: buying while short is `buy_to_cover`, selling
//!   while long is `sell`, selling while flat is `sell_short`, otherwise `buy`.
//! - JSON quirks: a one-element list arrives as a single object and an empty one as the string
//!   `"null"`; [`list`] reads all three shapes.
//! - Rejections: a 200 whose body has `errors` is a rejection, not an order. `status: "ok"` only means
//!   accepted, so a market order is then read back until it reports `filled` (or `rejected`, with
//!   `reason_description`).
//! - Exactly once: Tradier has no idempotency key and no duplicate-order error. Every order carries
//!   the leg's client order id as its `tag`; after an unknown outcome the executor looks the order up
//!   by listing the orders (`includeTags=true`, every page) and only resends if no order has the tag.
//!   The default list is today's session only, so a miss there is followed by dated `filter=all`
//!   listings from the day the job was created (its UUIDv7 time, read from the tag; see
//!   [`lookup_range`]) to today, in windows of at most a month: a replay after midnight still finds
//!   yesterday's order.
//! - Rate limits: 429, and also a 400 "Quota Violation" (reported by one client; both are handled as
//!   transient, waiting for `Retry-After` or `X-Ratelimit-Expiry`).
//! - Stop-loss / take-profit: one OCO order (a sell/buy-to-cover `limit` at the take-profit and a
//!   `stop` at the stop-loss), or a single stop / limit order when only one is set; GTC.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{Days, NaiveDate};
use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::Value;

use super::http::{self, dec, id_text, Call, Reply};
use super::once::{place_once, poll_until_final, Polled};
use super::{
    client_order_id, ErrorClass, ExPosition, Exchange, ExchangeContext, ExchangeError, Leg,
    OpenOrder, OrderAck, OrderRequest, OrderState, Protection, RestingOrder, SymbolRules,
};
use crate::credentials::Credentials;
use crate::domain::{CredentialEnv, ExchangeKind, OrderSide, OrderType, Side, Symbol};
use crate::secrets::SecretString;
use crate::sizing::{round_to_tick, whole_units};

pub const PRODUCTION_URL: &str = "https://api.tradier.com";
pub const SANDBOX_URL: &str = "https://sandbox.tradier.com";
const NAME: &str = "tradier";
/// Orders asked for per page when listing (and the most pages read).
const PAGE: usize = 100;
const MAX_PAGES: usize = 20;

/// A `filter=all` look-up goes back at most this many days (a job is never replayed later).
pub const MAX_LOOKBACK_DAYS: u64 = 62;
/// How far back to look for a tag that carries no creation time (not one of Sparky's ids).
pub const DEFAULT_LOOKBACK_DAYS: u64 = 7;
/// Days in one `filter=all` window: Tradier returns "a maximum of 1 month of data".
pub const WINDOW_DAYS: u64 = 28;

/// The days (`start`, `end`, inclusive) on which the order tagged `tag` can have been created, as
/// of `today` (UTC): from the day its job was created ([`super::client_order_id_time`]) minus one
/// (Tradier's day is the US market's, which is behind UTC) to today; at most
/// [`MAX_LOOKBACK_DAYS`] back, [`DEFAULT_LOOKBACK_DAYS`] for a tag without a time.
pub fn lookup_range(tag: &str, today: NaiveDate) -> (NaiveDate, NaiveDate) {
    let earliest = today - Days::new(MAX_LOOKBACK_DAYS);
    let start = match super::client_order_id_time(tag) {
        Some(t) => t.date_naive() - Days::new(1),
        None => today - Days::new(DEFAULT_LOOKBACK_DAYS),
    };
    (start.clamp(earliest, today), today)
}

/// `start..=end` cut into windows of at most [`WINDOW_DAYS`] days, newest first.
pub fn lookup_windows(start: NaiveDate, end: NaiveDate) -> Vec<(NaiveDate, NaiveDate)> {
    let mut out = Vec::new();
    let mut to = end;
    while to >= start {
        let from = (to - Days::new(WINDOW_DAYS - 1)).max(start);
        out.push((from, to));
        match from.pred_opt() {
            Some(p) => to = p,
            None => break,
        }
    }
    out
}

/// The items of a Tradier collection: `"null"`/`null` (empty), one object, or a list.
pub fn list(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(a) => a.iter().collect(),
        Value::Object(_) => vec![v],
        _ => vec![],
    }
}

/// The messages of an `errors` property: `{"error": "msg"}` or `{"error": ["msg", ...]}`.
pub fn errors_of(v: &Value) -> Option<String> {
    let e = v.get("errors")?;
    if e.is_null() || e == "null" {
        return None;
    }
    let msgs: Vec<String> = list(&e["error"])
        .into_iter()
        .chain(e["error"].as_str().map(|_| &e["error"]))
        .filter_map(|m| m.as_str().map(str::to_string))
        .collect();
    Some(if msgs.is_empty() {
        e.to_string()
    } else {
        msgs.join("; ")
    })
}

pub struct TradierClient {
    http: reqwest::Client,
    base: String,
    token: SecretString,
    account: String,
    fill_poll: Duration,
}

impl fmt::Debug for TradierClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TradierClient")
            .field("base", &self.base)
            .field("account", &self.account)
            .field("token", &"[redacted]")
            .finish()
    }
}

fn check(reply: Reply, call: Call) -> Result<Value, ExchangeError> {
    let errors = errors_of(&reply.json);
    if reply.status.is_success() {
        return match errors {
            // A downstream rejection can come back as a 200.
            Some(msg) => Err(ExchangeError::permanent(format!("tradier rejected: {msg}"))),
            None => Ok(reply.json),
        };
    }
    let message = errors.unwrap_or_else(|| {
        reply.json["fault"]["faultstring"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| http::snippet(&reply.text))
    });
    let mut e = http::status_error(NAME, &reply, call, &message);
    if reply.text.to_ascii_lowercase().contains("quota violation") {
        e.class = ErrorClass::Transient;
    }
    if e.class == ErrorClass::Transient && e.retry_after.is_none() {
        e.retry_after = ratelimit_expiry(&reply.headers, chrono::Utc::now());
    }
    Err(e)
}

/// Time until `X-Ratelimit-Expiry` (epoch seconds or milliseconds).
pub fn ratelimit_expiry(
    headers: &reqwest::header::HeaderMap,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<Duration> {
    let v: i64 = headers
        .get("X-Ratelimit-Expiry")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let ms = if v > 100_000_000_000 { v } else { v * 1000 };
    let wait = ms - now.timestamp_millis();
    Some(Duration::from_millis(u64::try_from(wait.max(0)).ok()?).min(http::MAX_RETRY_AFTER))
}

enum Parsed {
    Live(OrderAck),
    /// Rejected / errored: the broker's reason.
    Rejected(String),
    /// Cancelled or expired with nothing filled.
    Dead(String),
}

/// What an order filled and at what average price. An advanced order (OCO: a protective pair)
/// carries its fills on its legs (`leg[]`, each with `exec_quantity` and `avg_fill_price`); the
/// parent's own fields are used when they say more (Tradier documents the order-level fields, not
/// whether an advanced order's parent carries its legs' fills).
fn fill_of(o: &Value) -> (Decimal, Option<Decimal>) {
    let own = |v: &Value| {
        (
            dec(&v["exec_quantity"]).unwrap_or_default().normalize(),
            dec(&v["avg_fill_price"]).filter(|p| *p > Decimal::ZERO),
        )
    };
    let parent = own(o);
    if parent.0 > Decimal::ZERO || !o["leg"].is_array() && !o["leg"].is_object() {
        return parent;
    }
    list(&o["leg"])
        .into_iter()
        .map(own)
        .find(|(q, _)| *q > Decimal::ZERO)
        .unwrap_or(parent)
}

/// An order of `/orders` as an [`OpenOrder`] if it is working (open, partially_filled, pending)
/// in `symbol`; an OCO order is one entry with both levels.
fn open_order(o: &Value, symbol: &Symbol) -> Result<Option<OpenOrder>, ExchangeError> {
    let status = o["status"].as_str().unwrap_or_default();
    if !matches!(status, "open" | "partially_filled" | "pending") {
        return Ok(None);
    }
    let legs: Vec<&Value> = if o["class"] == "oco" {
        list(&o["leg"])
    } else {
        vec![o]
    };
    if !legs.iter().any(|l| l["symbol"] == symbol.as_str()) {
        return Ok(None);
    }
    let Some(id) = id_text(&o["id"]) else {
        return Err(http::unexpected(NAME, "order without `id`"));
    };
    let client_order_id = o["tag"].as_str().map(str::to_string);
    let sparky_leg = client_order_id
        .as_deref()
        .and_then(super::parse_client_order_id)
        .map(|(_, leg)| leg);
    let mut order = OpenOrder {
        exchange_order_id: id,
        client_order_id,
        side: match legs[0]["side"].as_str() {
            Some("buy" | "buy_to_cover") => OrderSide::Buy,
            _ => OrderSide::Sell,
        },
        quantity: dec(&legs[0]["quantity"]),
        stop_loss: None,
        take_profit: None,
        limit_price: None,
    };
    for l in &legs {
        match l["type"].as_str() {
            Some("stop") | Some("stop_limit") => {
                order.stop_loss = dec(&l["stop_price"]).or(dec(&l["stop"]))
            }
            Some("limit") if sparky_leg == Some(Leg::TakeProfit) || o["class"] == "oco" => {
                order.take_profit = dec(&l["price"])
            }
            Some("limit") => order.limit_price = dec(&l["price"]),
            _ => {}
        }
    }
    Ok(Some(order))
}

fn parse_order(o: &Value, coid: &str) -> Result<Parsed, ExchangeError> {
    let id = id_text(&o["id"]).ok_or_else(|| http::unexpected(NAME, "order without `id`"))?;
    let status = o["status"].as_str().unwrap_or_default();
    let (filled_qty, avg_price) = fill_of(o);
    let ack = |state| OrderAck {
        exchange_order_id: id.clone(),
        client_order_id: o["tag"].as_str().unwrap_or(coid).to_string(),
        state,
        filled_qty,
        avg_price,
        fee: None,
    };
    Ok(match status {
        "filled" => Parsed::Live(ack(OrderState::Filled)),
        "open"
        | "partially_filled"
        | "pending"
        | "calculated"
        | "accepted_for_bidding"
        | "held" => Parsed::Live(ack(OrderState::Accepted)),
        "rejected" | "error" => Parsed::Rejected(format!(
            "tradier rejected order {id}: {}",
            o["reason_description"]
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or(status)
        )),
        // Canceled / expired after a partial fill: what filled is the position.
        _ if filled_qty > Decimal::ZERO => Parsed::Live(ack(OrderState::PartiallyFilled)),
        other => Parsed::Dead(format!("tradier order {id} is {other} with nothing filled")),
    })
}

/// US equities are priced in cents.
const TICK: Decimal = Decimal::from_parts(1, 0, 0, false, 2);

impl TradierClient {
    pub fn new(creds: &Credentials, ctx: &ExchangeContext) -> Result<TradierClient, ExchangeError> {
        let base = match (&ctx.tradier_base_url, creds.environment) {
            (Some(u), _) => http::base_url(u, "/v1"),
            (None, CredentialEnv::Production) => PRODUCTION_URL.to_string(),
            (None, CredentialEnv::Sandbox) => SANDBOX_URL.to_string(),
        };
        Ok(TradierClient {
            http: ctx.http.clone(),
            base,
            token: super::bearer_token(creds)?,
            account: super::account_id(creds)?,
            fill_poll: Duration::from_secs(3),
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        form: Option<&[(String, String)]>,
        call: Call,
    ) -> Result<Value, ExchangeError> {
        let mut req = self
            .http
            .request(method, format!("{}/v1{path}", self.base))
            .bearer_auth(self.token.expose())
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(f) = form {
            let body = f
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}={}",
                        super::aster::form_encode(k),
                        super::aster::form_encode(v)
                    )
                })
                .collect::<Vec<_>>()
                .join("&");
            req = req
                .header(
                    reqwest::header::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                )
                .body(body);
        }
        let reply = http::send(NAME, req, call).await?;
        check(reply, call)
    }

    async fn get(&self, path: &str) -> Result<Value, ExchangeError> {
        self.call(Method::GET, path, None, Call::Read).await
    }

    async fn order_by_id(&self, id: &str) -> Result<Value, ExchangeError> {
        let v = self
            .get(&format!(
                "/accounts/{}/orders/{id}?includeTags=true",
                self.account
            ))
            .await?;
        Ok(v["order"].clone())
    }

    /// Send an order form; for a market order wait (briefly) for its fill.
    async fn send_order(
        &self,
        form: Vec<(String, String)>,
        coid: &str,
        wait_for_fill: bool,
    ) -> Result<OrderAck, ExchangeError> {
        let v = self
            .call(
                Method::POST,
                &format!("/accounts/{}/orders", self.account),
                Some(&form),
                Call::Write,
            )
            .await?;
        let Some(id) = id_text(&v["order"]["id"]) else {
            return Err(ExchangeError::unknown(format!(
                "tradier: unexpected order reply {}; the order {coid} may have been placed",
                http::snippet(&v.to_string())
            )));
        };
        let ack = OrderAck {
            exchange_order_id: id.clone(),
            client_order_id: coid.to_string(),
            state: OrderState::Accepted,
            filled_qty: Decimal::ZERO,
            avg_price: None,
            fee: None,
        };
        if !wait_for_fill {
            return Ok(ack);
        }
        poll_until_final(self.fill_poll, ack, || async {
            let o = self.order_by_id(&id).await?;
            match parse_order(&o, coid)? {
                Parsed::Live(a) if a.state.is_final() => Ok(Polled::Final(a)),
                Parsed::Live(a) => Ok(Polled::Working(a)),
                Parsed::Rejected(msg) | Parsed::Dead(msg) => Err(ExchangeError::permanent(msg)),
            }
        })
        .await
    }

    /// The orders carrying `tag`, on every day its job could have placed them.
    ///
    /// `GET /orders` lists only the current session's orders, so after midnight a replay would not
    /// see yesterday's order and would send it again. So: today's list first (every page); if the
    /// tag is not there, `filter=all` windows from the day the job was created (read from the
    /// tag itself, [`lookup_range`]) to today, newest window first, each at most a month as
    /// Tradier allows, every page. Tradier asks apps not to poll `filter=all`; this runs only when a
    /// look-up misses today's list (an unknown outcome, a recovery, a protective-order retry).
    async fn orders_tagged(&self, tag: &str) -> Result<Vec<Value>, ExchangeError> {
        let has_tag = |o: &Value| o["tag"] == tag;
        let found = self.scan_orders("", has_tag).await?;
        if !found.is_empty() {
            return Ok(found);
        }
        let (start, end) = lookup_range(tag, chrono::Utc::now().date_naive());
        let mut found = Vec::new();
        for (from, to) in lookup_windows(start, end) {
            found.extend(
                self.scan_orders(&format!("&filter=all&start={from}&end={to}"), has_tag)
                    .await?,
            );
        }
        Ok(found)
    }

    /// The orders `keep` picks in one listing (`extra` is added to the query), every page.
    async fn scan_orders(
        &self,
        extra: &str,
        keep: impl Fn(&Value) -> bool,
    ) -> Result<Vec<Value>, ExchangeError> {
        let mut found = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for page in 1..=MAX_PAGES {
            let v = self
                .get(&format!(
                    "/accounts/{}/orders?includeTags=true&page={page}&limit={PAGE}{extra}",
                    self.account
                ))
                .await?;
            let orders = list(&v["orders"]["order"]);
            let mut new = 0;
            for o in orders {
                let id = id_text(&o["id"]).unwrap_or_default();
                if !seen.insert(id) {
                    continue;
                }
                new += 1;
                if keep(o) {
                    found.push(o.clone());
                }
            }
            // Stop at an empty page, or when a server that ignores paging sends the same orders
            // again. A short page is not the end: Tradier may cap `limit` below what was asked.
            if new == 0 {
                break;
            }
        }
        Ok(found)
    }

    fn form(
        symbol: &Symbol,
        side: &str,
        qty: Decimal,
        order_type: &str,
        duration: &str,
        tag: &str,
    ) -> Vec<(String, String)> {
        vec![
            ("class".into(), "equity".into()),
            ("symbol".into(), symbol.to_string()),
            ("side".into(), side.into()),
            ("quantity".into(), qty.to_string()),
            ("type".into(), order_type.into()),
            ("duration".into(), duration.into()),
            ("tag".into(), tag.into()),
        ]
    }

    async fn place_protective(
        &self,
        p: &Protection,
        form: Vec<(String, String)>,
        coid: &str,
    ) -> Result<OrderAck, ExchangeError> {
        place_once(
            || self.send_order(form.clone(), coid, false),
            || self.find_order(&p.symbol, coid),
        )
        .await
    }
}

#[async_trait]
impl Exchange for TradierClient {
    fn kind(&self) -> ExchangeKind {
        ExchangeKind::Tradier
    }

    async fn symbol_rules(&self, _symbol: &Symbol) -> Result<SymbolRules, ExchangeError> {
        Ok(SymbolRules {
            step: Decimal::ONE,
            min_qty: Decimal::ONE,
            min_notional: Decimal::ZERO,
            tick: TICK,
        })
    }

    async fn price(&self, symbol: &Symbol) -> Result<Decimal, ExchangeError> {
        let v = self
            .get(&format!("/markets/quotes?symbols={symbol}&greeks=false"))
            .await?;
        let quotes = &v["quotes"];
        let q = list(&quotes["quote"])
            .into_iter()
            .find(|q| q["symbol"] == symbol.as_str());
        let Some(q) = q else {
            return Err(ExchangeError::permanent(format!(
                "tradier: unknown symbol {symbol} (no quote)"
            )));
        };
        if let Some(last) = dec(&q["last"]).filter(|p| *p > Decimal::ZERO) {
            return Ok(last);
        }
        match (dec(&q["bid"]), dec(&q["ask"])) {
            (Some(b), Some(a)) if b > Decimal::ZERO && a > Decimal::ZERO => {
                Ok(crate::money::midpoint(b, a)?)
            }
            _ => Err(ExchangeError::permanent(format!(
                "tradier: no usable price for {symbol}"
            ))),
        }
    }

    async fn position(&self, symbol: &Symbol) -> Result<Option<ExPosition>, ExchangeError> {
        let v = self
            .get(&format!("/accounts/{}/positions", self.account))
            .await?;
        let Some(p) = list(&v["positions"]["position"])
            .into_iter()
            .find(|p| p["symbol"] == symbol.as_str())
        else {
            return Ok(None);
        };
        let qty = dec(&p["quantity"]).unwrap_or_default();
        if qty.is_zero() {
            return Ok(None);
        }
        let entry = dec(&p["cost_basis"])
            .and_then(|c| crate::money::div(c, qty.abs()).ok())
            .map(|e| e.round_dp(6).normalize())
            .filter(|e| *e > Decimal::ZERO);
        Ok(ExPosition::from_signed(qty, entry))
    }

    async fn place_order(&self, o: &OrderRequest) -> Result<OrderAck, ExchangeError> {
        let qty = whole_units(o.quantity)?;
        if qty < Decimal::ONE {
            return Err(ExchangeError::permanent(format!(
                "tradier: order too small: {} {} is less than one share (Tradier trades whole shares)",
                o.quantity.normalize(),
                o.symbol
            )));
        }
        let side = if o.reduce_only {
            match o.side {
                OrderSide::Buy => "buy_to_cover",
                OrderSide::Sell => "sell",
            }
        } else {
            let pos = self.position(&o.symbol).await?;
            match (o.side, pos.map(|p| p.side)) {
                (OrderSide::Buy, Some(Side::Short)) => "buy_to_cover",
                (OrderSide::Buy, _) => "buy",
                (OrderSide::Sell, Some(Side::Long)) => "sell",
                (OrderSide::Sell, _) => "sell_short",
            }
        };
        let (t, wait) = match o.order_type {
            OrderType::Market => ("market", true),
            OrderType::Limit => ("limit", false),
        };
        let mut form = Self::form(&o.symbol, side, qty, t, "day", &o.client_order_id);
        if o.order_type == OrderType::Limit {
            let p = o
                .limit_price
                .ok_or_else(|| ExchangeError::permanent("tradier: a limit order needs a price"))?;
            form.push((
                "price".into(),
                round_to_tick(p, TICK)?.normalize().to_string(),
            ));
        }
        self.send_order(form, &o.client_order_id, wait).await
    }

    async fn close_position(
        &self,
        symbol: &Symbol,
        position: &ExPosition,
        client_order_id: &str,
    ) -> Result<OrderAck, ExchangeError> {
        let side = match position.side {
            Side::Long => "sell",
            Side::Short => "buy_to_cover",
        };
        let form = Self::form(
            symbol,
            side,
            position.quantity.normalize(),
            "market",
            "day",
            client_order_id,
        );
        self.send_order(form, client_order_id, true).await
    }

    async fn find_order(
        &self,
        _symbol: &Symbol,
        client_order_id: &str,
    ) -> Result<Option<OrderAck>, ExchangeError> {
        let mut best = None;
        for o in self.orders_tagged(client_order_id).await? {
            match parse_order(&o, client_order_id)? {
                Parsed::Live(a) if a.state.is_final() => return Ok(Some(a)),
                Parsed::Live(a) => best = Some(a),
                // A rejected or cancelled order had no effect: the leg may be sent again.
                Parsed::Rejected(_) | Parsed::Dead(_) => {}
            }
        }
        Ok(best)
    }

    async fn equity(&self) -> Result<Decimal, ExchangeError> {
        let v = self
            .get(&format!("/accounts/{}/balances", self.account))
            .await?;
        http::dec_field(NAME, &v["balances"], "total_equity")
    }

    async fn protect(&self, p: &Protection) -> Result<Vec<RestingOrder>, ExchangeError> {
        if p.trailing_stop.is_some() {
            // The ingress refuses trailing stops for Tradier (its API has none); an older job
            // that carries one is protected by its fixed levels only, and says so.
            return Err(ExchangeError::permanent(
                "tradier: the API has no trailing-stop order; the trailing stop was not placed",
            ));
        }
        let qty = whole_units(p.quantity)?;
        let side = match p.position_side {
            Side::Long => "sell",
            Side::Short => "buy_to_cover",
        };
        let sym = p.symbol.to_string();
        let (form, coid) = match (p.stop_loss, p.take_profit) {
            (None, None) => return Ok(vec![]),
            (Some(sl), Some(tp)) => {
                let coid = client_order_id(p.job_id, Leg::StopLoss);
                let q = qty.to_string();
                let form: Vec<(String, String)> = vec![
                    ("class".into(), "oco".into()),
                    ("duration".into(), "gtc".into()),
                    ("tag".into(), coid.clone()),
                    ("symbol[0]".into(), sym.clone()),
                    ("side[0]".into(), side.into()),
                    ("quantity[0]".into(), q.clone()),
                    ("type[0]".into(), "limit".into()),
                    ("price[0]".into(), tp.normalize().to_string()),
                    ("symbol[1]".into(), sym),
                    ("side[1]".into(), side.into()),
                    ("quantity[1]".into(), q),
                    ("type[1]".into(), "stop".into()),
                    ("stop[1]".into(), sl.normalize().to_string()),
                ];
                (form, coid)
            }
            (Some(sl), None) => {
                let coid = client_order_id(p.job_id, Leg::StopLoss);
                let mut f = Self::form(&p.symbol, side, qty, "stop", "gtc", &coid);
                f.push(("stop".into(), sl.normalize().to_string()));
                (f, coid)
            }
            (None, Some(tp)) => {
                let coid = client_order_id(p.job_id, Leg::TakeProfit);
                let mut f = Self::form(&p.symbol, side, qty, "limit", "gtc", &coid);
                f.push(("price".into(), tp.normalize().to_string()));
                (f, coid)
            }
        };
        let ack = self.place_protective(p, form, &coid).await?;
        // One OCO order carries both levels under the stop-loss leg's id.
        let order_side = OrderSide::closing(p.position_side);
        let resting = |leg, price| RestingOrder {
            leg,
            client_order_id: client_order_id(p.job_id, leg),
            exchange_order_id: Some(ack.exchange_order_id.clone()),
            side: order_side,
            quantity: qty,
            price,
        };
        Ok(match (p.stop_loss, p.take_profit) {
            (Some(sl), _) => vec![resting(Leg::StopLoss, Some(sl))],
            (None, tp) => vec![resting(Leg::TakeProfit, tp)],
        })
    }

    /// The account's open orders in `symbol` (statuses open, partially_filled, pending), read from
    /// every page of the current session's `/orders`; an OCO order is one entry with both levels.
    /// A GTC order placed on an earlier day may be missing (see
    /// [`Exchange::lists_every_open_order`]).
    async fn open_orders(&self, symbol: &Symbol) -> Result<Vec<OpenOrder>, ExchangeError> {
        let mut open = Vec::new();
        for o in self.scan_orders("", |_| true).await? {
            if let Some(order) = open_order(&o, symbol)? {
                open.push(order);
            }
        }
        Ok(open)
    }

    fn lists_every_open_order(&self) -> bool {
        false
    }

    /// `GET /orders/{id}`: the order if it is still working in `symbol`.
    async fn open_order_by_id(
        &self,
        symbol: &Symbol,
        exchange_order_id: &str,
    ) -> Result<Option<OpenOrder>, ExchangeError> {
        match self.order_by_id(exchange_order_id).await {
            Ok(o) => open_order(&o, symbol),
            // Unknown to Tradier (404): nothing is working under that id.
            Err(e) if e.class == ErrorClass::Permanent => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn cancel_order(&self, _symbol: &Symbol, order: &OpenOrder) -> Result<(), ExchangeError> {
        match self
            .call(
                Method::DELETE,
                &format!(
                    "/accounts/{}/orders/{}",
                    self.account, order.exchange_order_id
                ),
                None,
                Call::Write,
            )
            .await
        {
            Ok(_) => Ok(()),
            // "order already in finalized state": filled or cancelled meanwhile.
            Err(e) if e.message.contains("finalized") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;
    use serde_json::json;

    #[test]
    fn collections_in_all_three_shapes() {
        let none: Value = json!({"positions": "null"});
        assert!(list(&none["positions"]["position"]).is_empty());
        let one = json!({"positions": {"position": {"symbol": "AAPL", "quantity": 10.0}}});
        assert_eq!(list(&one["positions"]["position"]).len(), 1);
        let many = json!({"positions": {"position": [{"symbol": "AAPL"}, {"symbol": "SPY"}]}});
        assert_eq!(list(&many["positions"]["position"]).len(), 2);
    }

    #[test]
    fn errors_in_both_shapes() {
        assert_eq!(
            errors_of(&json!({"errors": {"error": "Backoffice rejected override of the order."}})),
            Some("Backoffice rejected override of the order.".into())
        );
        assert_eq!(
            errors_of(&json!({"errors": {"error": ["a", "b"]}})),
            Some("a; b".into())
        );
        assert_eq!(errors_of(&json!({"order": {"id": 1}})), None);
    }

    #[test]
    fn order_states() {
        let o = json!({"id": 228175, "status": "filled", "exec_quantity": 10.0,
            "avg_fill_price": 190.25, "tag": "x"});
        match parse_order(&o, "x").unwrap() {
            Parsed::Live(a) => {
                assert_eq!(a.state, OrderState::Filled);
                assert_eq!(a.filled_qty, dec!(10));
                assert_eq!(a.avg_price, Some(dec!(190.25)));
                assert_eq!(a.exchange_order_id, "228175");
            }
            _ => panic!("filled"),
        }
        let r = json!({"id": 1, "status": "rejected", "reason_description": "Insufficient buying power"});
        assert!(
            matches!(parse_order(&r, "x").unwrap(), Parsed::Rejected(m) if m.contains("Insufficient buying power"))
        );
    }

    #[test]
    fn an_oco_orders_fill_is_read_from_the_leg_that_filled() {
        let o = json!({"id": 7, "status": "filled", "class": "oco", "tag": "x",
        "leg": [
            {"id": 8, "type": "limit", "status": "canceled", "exec_quantity": 0.0},
            {"id": 9, "type": "stop", "status": "filled", "exec_quantity": 5.0,
             "avg_fill_price": 171.0}
        ]});
        match parse_order(&o, "x").unwrap() {
            Parsed::Live(a) => {
                assert_eq!(a.state, OrderState::Filled);
                assert_eq!((a.filled_qty, a.avg_price), (dec!(5), Some(dec!(171))));
            }
            _ => panic!("filled"),
        }
    }

    #[test]
    fn look_ups_cover_every_day_since_the_job_was_created() {
        let day = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap();
        // A job created 2024-11-29 (UTC), looked up on 2024-12-01: from 11-28 (the US day can be
        // the day before) to today, one window.
        let job = uuid::Uuid::parse_str("01937a3c-2a00-7abc-8def-0123456789ab").unwrap();
        let tag = client_order_id(job, Leg::Open);
        let (start, end) = lookup_range(&tag, day("2024-12-01"));
        assert_eq!((start, end), (day("2024-11-28"), day("2024-12-01")));
        assert_eq!(lookup_windows(start, end), vec![(start, end)]);
        // The same job looked up the day it was created.
        assert_eq!(
            lookup_range(&tag, day("2024-11-29")),
            (day("2024-11-28"), day("2024-11-29"))
        );
        // Long ago: bounded, in windows of at most 28 days, newest first, with no gap.
        let (start, end) = lookup_range(&tag, day("2025-06-01"));
        assert_eq!(start, day("2025-06-01") - Days::new(MAX_LOOKBACK_DAYS));
        let w = lookup_windows(start, end);
        assert_eq!(w.len(), 3);
        assert_eq!(w[0], (day("2025-05-05"), day("2025-06-01")));
        assert_eq!(w.last().unwrap().0, start);
        for pair in w.windows(2) {
            assert_eq!(pair[1].1.succ_opt().unwrap(), pair[0].0);
        }
        assert!(w
            .iter()
            .all(|(a, b)| (*b - *a).num_days() < WINDOW_DAYS as i64));
        // A tag that is not one of Sparky's ids: the default look-back.
        assert_eq!(
            lookup_range("x1", day("2024-12-01")),
            (day("2024-11-24"), day("2024-12-01"))
        );
        // A creation time in the future (clock skew): today only.
        assert_eq!(
            lookup_range(&tag, day("2024-11-01")),
            (day("2024-11-01"), day("2024-11-01"))
        );
    }

    #[test]
    fn ratelimit_expiry_header() {
        let now = chrono::Utc::now();
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            "X-Ratelimit-Expiry",
            (now.timestamp_millis() + 2000).to_string().parse().unwrap(),
        );
        let d = ratelimit_expiry(&h, now).unwrap();
        assert!(d <= Duration::from_secs(2) && d >= Duration::from_millis(1900));
    }
}
