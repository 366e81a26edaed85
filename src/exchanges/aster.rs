//! Aster perpetual futures (Binance USD-M compatible REST, V1 HMAC API keys).
//!
//! Signing: every TRADE/USER_DATA request carries `recvWindow` and `timestamp` (ms) and, as its
//! **last** parameter, `signature` = hex HMAC-SHA256 of the parameter string keyed by the API secret;
//! the key goes in `X-MBX-APIKEY`. Reads send the parameters as the query string, writes as a
//! form body; never both, so the signed string is exactly what is sent. A -1021 (timestamp outside
//! the receive window) re-reads the server clock (`/fapi/v1/time`), keeps the offset for later
//! requests of every client of this worker, and re-signs once.
//!
//! Rules: `exchangeInfo` is fetched once per [`super::RULES_TTL`] and cached per symbol (LOT_SIZE and
//! MARKET_LOT_SIZE step/min, MIN_NOTIONAL, PRICE_FILTER tick). `place_order` applies them again
//! before sending (quantity down to the step, limit price to the tick, too-small orders refused with
//! the numbers), so a mis-sized order never reaches the exchange.
//!
//! Exactly once: orders carry `newClientOrderId` (the job's deterministic id). Aster only documents
//! that id as unique among *open* orders and does not document -4116 (duplicate id); a market order
//! is not open for long. So after an unknown outcome the executor looks the order up
//! (`GET /fapi/v1/order?origClientOrderId=`) and only resends on -2013; a -4116, should Aster send it,
//! is treated as "already placed" and answered by the same look-up.
//!
//! Positions come from `/fapi/v2/positionRisk` (one-way mode; hedge-mode positions are refused,
//! since reduce-only orders are not allowed there). Closes are reduce-only MARKET orders.
//! Stop-loss / take-profit are STOP_MARKET / TAKE_PROFIT_MARKET orders with `closePosition=true`.
//! `extra_config.leverage` (1-125), when set, is applied to the symbol before each opening order.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use reqwest::Method;
use rust_decimal::Decimal;
use serde_json::Value;
use sha2::Sha256;

use super::http::{self, dec, id_text, Call, Reply};
use super::once::{place_once, poll_until_final, Polled};
use super::{
    client_order_id, ErrorClass, ExPosition, Exchange, ExchangeContext, ExchangeError, Leg,
    OpenOrder, OrderAck, OrderRequest, OrderState, Protection, RestingOrder, SharedState,
    SymbolRules,
};
use crate::credentials::Credentials;
use crate::domain::{CredentialEnv, ExchangeKind, OrderSide, OrderType, Symbol, TrailingStop};
use crate::secrets::SecretString;
use crate::sizing::{round_down, round_to_tick};

pub const PRODUCTION_URL: &str = "https://fapi.asterdex.com";
/// Aster's maximum is 60000; 5000 is the Binance default.
pub const RECV_WINDOW_MS: u64 = 5000;
const NAME: &str = "aster";

/// HMAC-SHA256 request signing, isolated so it can be checked against the published vectors.
pub struct HmacSigner {
    secret: SecretString,
}

impl HmacSigner {
    pub fn new(secret: SecretString) -> Self {
        HmacSigner { secret }
    }

    /// The lowercase hex HMAC-SHA256 of `total_params` (query string followed directly by the body).
    pub fn sign(&self, total_params: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.secret.expose().as_bytes())
            .expect("HMAC takes keys of any length");
        mac.update(total_params.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

impl fmt::Debug for HmacSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HmacSigner([redacted])")
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `k1=v1&k2=v2` in the given order.
pub fn encode_params(params: &[(&str, String)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The filters of one symbol, as `exchangeInfo` gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsterRules {
    pub lot_step: Decimal,
    pub lot_min: Decimal,
    /// MARKET_LOT_SIZE (falls back to LOT_SIZE when absent or zero).
    pub market_step: Decimal,
    pub market_min: Decimal,
    pub min_notional: Decimal,
    pub tick: Decimal,
}

impl AsterRules {
    fn for_type(&self, t: OrderType) -> (Decimal, Decimal) {
        match t {
            OrderType::Market => (self.market_step, self.market_min),
            OrderType::Limit => (self.lot_step, self.lot_min),
        }
    }

    /// One set of rules for the executor: the coarser step and the larger minimum of the two lot
    /// filters, so a quantity sized with them is valid for a market or a limit order.
    pub fn summary(&self) -> SymbolRules {
        SymbolRules {
            step: self.lot_step.max(self.market_step),
            min_qty: self.lot_min.max(self.market_min),
            min_notional: self.min_notional,
            tick: self.tick,
        }
    }

    /// Parse one entry of `exchangeInfo.symbols`.
    pub fn parse(sym: &Value) -> Option<AsterRules> {
        let filters = sym["filters"].as_array()?;
        let find = |t: &str| filters.iter().find(|f| f["filterType"] == t);
        let lot = find("LOT_SIZE")?;
        let lot_step = dec(&lot["stepSize"])?;
        let lot_min = dec(&lot["minQty"]).unwrap_or_default();
        let (market_step, market_min) = match find("MARKET_LOT_SIZE") {
            Some(m) => {
                let step = dec(&m["stepSize"]).filter(|d| *d > Decimal::ZERO);
                let min = dec(&m["minQty"]).filter(|d| *d > Decimal::ZERO);
                (step.unwrap_or(lot_step), min.unwrap_or(lot_min))
            }
            None => (lot_step, lot_min),
        };
        let min_notional = find("MIN_NOTIONAL")
            .and_then(|f| dec(&f["notional"]).or_else(|| dec(&f["minNotional"])))
            .unwrap_or_default();
        let tick = find("PRICE_FILTER")
            .and_then(|f| dec(&f["tickSize"]))
            .unwrap_or_default();
        Some(AsterRules {
            lot_step: lot_step.normalize(),
            lot_min: lot_min.normalize(),
            market_step: market_step.normalize(),
            market_min: market_min.normalize(),
            min_notional: min_notional.normalize(),
            tick: tick.normalize(),
        })
    }
}

/// An Aster failure with its API code (when the body had one).
#[derive(Debug)]
struct AsterError {
    code: Option<i64>,
    error: ExchangeError,
}

impl From<AsterError> for ExchangeError {
    fn from(e: AsterError) -> Self {
        e.error
    }
}

impl From<ExchangeError> for AsterError {
    fn from(error: ExchangeError) -> Self {
        AsterError { code: None, error }
    }
}

/// The class of an Aster error code (Binance semantics), or `None` to go by the HTTP status.
fn code_class(code: i64, call: Call) -> Option<ErrorClass> {
    match code {
        // Backend timeout / unexpected response / unknown error: execution status unknown.
        -1007 | -1006 | -1000 => Some(match call {
            Call::Write => ErrorClass::Unknown,
            Call::Read => ErrorClass::Transient,
        }),
        // Internal error, rate limits, too many orders, service busy, timestamp drift.
        -1001 | -1003 | -1004 | -1008 | -1015 | -1016 | -1021 => Some(ErrorClass::Transient),
        _ => None,
    }
}

/// Turn a reply into its JSON, or an error keeping Aster's code and message.
fn check(reply: Reply, call: Call) -> Result<Value, AsterError> {
    let code = reply.json.get("code").and_then(Value::as_i64);
    let api_error = code.filter(|c| *c < 0);
    if reply.status.is_success() && api_error.is_none() {
        return Ok(reply.json);
    }
    let msg = reply
        .json
        .get("msg")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| http::snippet(&reply.text));
    let message = match api_error {
        Some(c) => format!("{msg} (code {c})"),
        None => msg,
    };
    let mut error = http::status_error(NAME, &reply, call, &message);
    if let Some(class) = api_error.and_then(|c| code_class(c, call)) {
        error.class = class;
    } else if api_error.is_some() && reply.status.is_success() {
        error.class = ErrorClass::Permanent;
    }
    Err(AsterError {
        code: api_error,
        error,
    })
}

pub struct AsterClient {
    http: reqwest::Client,
    base: String,
    api_key: SecretString,
    signer: HmacSigner,
    leverage: Option<u32>,
    shared: Arc<SharedState>,
    /// How long to wait for a market order that was accepted but not yet reported filled.
    fill_poll: Duration,
}

impl fmt::Debug for AsterClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsterClient")
            .field("base", &self.base)
            .field("api_key", &"[redacted]")
            .field("signer", &self.signer)
            .field("leverage", &self.leverage)
            .finish()
    }
}

impl AsterClient {
    pub fn new(creds: &Credentials, ctx: &ExchangeContext) -> Result<AsterClient, ExchangeError> {
        let base = match (&ctx.aster_base_url, creds.environment) {
            (Some(u), _) => http::base_url(u, ""),
            (None, CredentialEnv::Production) => PRODUCTION_URL.to_string(),
            (None, CredentialEnv::Sandbox) => {
                return Err(ExchangeError::permanent(
                    "aster: there is no testnet for V1 (HMAC) API keys (Aster documents its testnet for the V3 API only); use environment `production`, or point ASTER_BASE_URL at a test server",
                ))
            }
        };
        if creds.api_key.expose().trim().is_empty() || creds.api_secret.expose().is_empty() {
            return Err(ExchangeError::permanent(
                "aster: the credentials need both an API key and an API secret",
            ));
        }
        let leverage = match creds.extra_config.get("leverage") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let lev = dec(v)
                    .filter(|d| {
                        d.fract().is_zero() && *d >= Decimal::ONE && *d <= Decimal::from(125)
                    })
                    .and_then(|d| u32::try_from(d.trunc().mantissa()).ok());
                match lev {
                    Some(l) => Some(l),
                    None => {
                        return Err(ExchangeError::permanent(format!(
                            "aster: extra_config.leverage must be a whole number from 1 to 125, not {v}"
                        )))
                    }
                }
            }
        };
        Ok(AsterClient {
            http: ctx.http.clone(),
            base,
            api_key: SecretString::new(creds.api_key.expose().trim()),
            signer: HmacSigner::new(creds.api_secret.clone()),
            leverage,
            shared: ctx.shared.clone(),
            fill_poll: Duration::from_millis(1500),
        })
    }

    fn now_ms(&self) -> i64 {
        let offset = self
            .shared
            .aster_clock_offset_ms
            .get(&self.base)
            .unwrap_or(0);
        chrono::Utc::now().timestamp_millis() + offset
    }

    /// Re-read the server clock after a -1021.
    async fn sync_clock(&self) -> Result<(), ExchangeError> {
        let before = chrono::Utc::now().timestamp_millis();
        let v = self.public("/fapi/v1/time", &[]).await?;
        let after = chrono::Utc::now().timestamp_millis();
        let server = v["serverTime"]
            .as_i64()
            .ok_or_else(|| http::unexpected(NAME, "`serverTime` missing"))?;
        let offset = server - (before + after) / 2;
        tracing::info!(
            offset_ms = offset,
            "aster: clock offset re-read after -1021"
        );
        self.shared
            .aster_clock_offset_ms
            .put(self.base.clone(), offset);
        Ok(())
    }

    /// An unsigned market-data GET.
    async fn public(&self, path: &str, params: &[(&str, String)]) -> Result<Value, AsterError> {
        let mut url = format!("{}{path}", self.base);
        if !params.is_empty() {
            url = format!("{url}?{}", encode_params(params));
        }
        let req = self.http.get(url);
        let reply = http::send(NAME, req, Call::Read).await?;
        check(reply, Call::Read)
    }

    /// A signed request: parameters + `recvWindow` + `timestamp`, then `signature` last; in the
    /// query for GET/DELETE, in a form body otherwise.
    async fn signed(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, String)],
        call: Call,
    ) -> Result<Value, AsterError> {
        let mut resynced = false;
        loop {
            let mut all: Vec<(&str, String)> = params.to_vec();
            all.push(("recvWindow", RECV_WINDOW_MS.to_string()));
            all.push(("timestamp", self.now_ms().to_string()));
            let payload = encode_params(&all);
            let signed = format!("{payload}&signature={}", self.signer.sign(&payload));
            let url = format!("{}{path}", self.base);
            let req = if method == Method::GET || method == Method::DELETE {
                self.http.request(method.clone(), format!("{url}?{signed}"))
            } else {
                self.http
                    .request(method.clone(), url)
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(signed)
            };
            let req = req.header("X-MBX-APIKEY", self.api_key.expose());
            let reply = http::send(NAME, req, call).await?;
            match check(reply, call) {
                Err(e) if e.code == Some(-1021) && !resynced => {
                    // The request was refused for its timestamp, so nothing happened: safe to
                    // re-sign and send again once the clock offset is known.
                    resynced = true;
                    self.sync_clock().await?;
                }
                other => return other,
            }
        }
    }

    async fn rules(&self, symbol: &Symbol) -> Result<AsterRules, ExchangeError> {
        let key = format!("{}|{}", self.base, symbol);
        if let Some(r) = self.shared.aster_rules.get(&key) {
            return Ok(r);
        }
        let info = self.public("/fapi/v1/exchangeInfo", &[]).await?;
        let symbols = info["symbols"]
            .as_array()
            .ok_or_else(|| http::unexpected(NAME, "exchangeInfo has no `symbols`"))?;
        let mut found = None;
        for s in symbols {
            let Some(name) = s["symbol"].as_str() else {
                continue;
            };
            if let Some(r) = AsterRules::parse(s) {
                if name == symbol.as_str() {
                    found = Some(r.clone());
                }
                self.shared
                    .aster_rules
                    .put(format!("{}|{name}", self.base), r);
            }
        }
        found.ok_or_else(|| {
            ExchangeError::permanent(format!(
                "aster: unknown symbol {symbol} (not in exchangeInfo)"
            ))
        })
    }

    /// Make `order` valid for `rules`, or refuse it with the numbers.
    async fn size(
        &self,
        order: &OrderRequest,
        rules: &AsterRules,
    ) -> Result<(Decimal, Option<Decimal>), ExchangeError> {
        let (step, min) = rules.for_type(order.order_type);
        let qty = round_down(order.quantity, step)?;
        if qty <= Decimal::ZERO || qty < min {
            return Err(ExchangeError::permanent(format!(
                "aster: order too small: {} {} rounds down to {qty} (step {step}), below the minimum quantity {min}",
                order.quantity, order.symbol
            )));
        }
        let limit = match order.order_type {
            OrderType::Limit => Some(round_to_tick(
                order.limit_price.ok_or_else(|| {
                    ExchangeError::permanent("aster: a limit order needs a price")
                })?,
                rules.tick,
            )?),
            OrderType::Market => None,
        };
        if !order.reduce_only && rules.min_notional > Decimal::ZERO {
            let price = match limit {
                Some(p) => p,
                None => self.price(&order.symbol).await?,
            };
            let notional = crate::money::mul(qty, price)?;
            if notional < rules.min_notional {
                return Err(ExchangeError::permanent(format!(
                    "aster: order too small: {qty} {} at {price} is {} notional, below the minimum {}",
                    order.symbol,
                    notional.normalize(),
                    rules.min_notional
                )));
            }
        }
        Ok((qty, limit))
    }

    async fn set_leverage(&self, symbol: &Symbol, leverage: u32) -> Result<(), ExchangeError> {
        // Setting the leverage is idempotent, so a lost reply is simply asked again.
        self.signed(
            Method::POST,
            "/fapi/v1/leverage",
            &[
                ("symbol", symbol.to_string()),
                ("leverage", leverage.to_string()),
            ],
            Call::Read,
        )
        .await
        .map_err(|e| {
            let mut e = e.error;
            e.message = format!("setting leverage {leverage} on {symbol}: {}", e.message);
            e
        })?;
        Ok(())
    }

    /// Send one order. A -4116 (duplicate client order id) means it was placed before: the existing
    /// order is returned.
    async fn send_order(
        &self,
        symbol: &Symbol,
        params: Vec<(&str, String)>,
        coid: &str,
        wait_for_fill: bool,
    ) -> Result<OrderAck, ExchangeError> {
        match self
            .signed(Method::POST, "/fapi/v1/order", &params, Call::Write)
            .await
        {
            Ok(v) => {
                let ack = parse_order(&v).map_err(|e| {
                    ExchangeError::unknown(format!(
                        "{}; the order {coid} may have been placed",
                        e.message
                    ))
                })?;
                match ack {
                    Parsed::Live(ack) if wait_for_fill && !ack.state.is_final() => {
                        self.await_fill(symbol, ack).await
                    }
                    Parsed::Live(ack) => Ok(self.with_fee(symbol, ack, &v).await),
                    Parsed::Dead { status, .. } => Err(ExchangeError::permanent(format!(
                        "aster: order {coid} ended {status} with nothing filled"
                    ))),
                }
            }
            Err(e) if e.code == Some(-4116) => match self.find_order(symbol, coid).await? {
                Some(ack) => Ok(ack),
                None => Err(ExchangeError::unknown(format!(
                    "aster: {} but the order {coid} cannot be found",
                    e.error.message
                ))),
            },
            Err(e) => Err(e.error),
        }
    }

    /// `ack` with its fee when it is final with something filled: the commissions of the order's
    /// executions (`GET /fapi/v1/userTrades`, weight 5, from the order's time; Aster has no
    /// `orderId` filter, so they are matched here). One request per filled order looked at, never
    /// for a working one. Commissions are summed as absolute values (the docs show them negative;
    /// the real sign is unverified) and only when every one is in the symbol's quote asset;
    /// otherwise, or when the request fails, the fee stays unknown: a fee is never a reason to
    /// fail an order that filled.
    async fn with_fee(&self, symbol: &Symbol, mut ack: OrderAck, order: &Value) -> OrderAck {
        if !ack.state.is_final() || ack.filled_qty <= Decimal::ZERO {
            return ack;
        }
        let mut params = vec![("symbol", symbol.to_string()), ("limit", "1000".into())];
        if let Some(t) = order["time"].as_i64().filter(|t| *t > 0) {
            params.push(("startTime", t.to_string()));
        }
        match self
            .signed(Method::GET, "/fapi/v1/userTrades", &params, Call::Read)
            .await
        {
            Ok(v) => ack.fee = commission_of(&v, &ack.exchange_order_id, symbol.as_str()),
            Err(e) => tracing::warn!(
                order = %ack.exchange_order_id,
                error = %e.error,
                "aster: the order's commission could not be read; its fee stays unknown"
            ),
        }
        ack
    }

    /// A market order acknowledged as NEW: poll it briefly until it reports its fill.
    async fn await_fill(&self, symbol: &Symbol, ack: OrderAck) -> Result<OrderAck, ExchangeError> {
        let coid = ack.client_order_id.clone();
        // The order was placed: a failed look is no reason to call it failed (the ack stands).
        poll_until_final(self.fill_poll, ack, || async {
            Ok(match self.find_order(symbol, &coid).await {
                Ok(Some(found)) if found.state.is_final() => Polled::Final(found),
                Ok(Some(found)) => Polled::Working(found),
                Ok(None) | Err(_) => Polled::Unseen,
            })
        })
        .await
    }

    /// Place a protective order exactly once: retry transient failures a few times, resolve an
    /// unknown outcome by looking the order up.
    async fn place_protective(
        &self,
        symbol: &Symbol,
        params: Vec<(&str, String)>,
        coid: &str,
    ) -> Result<OrderAck, ExchangeError> {
        place_once(
            || self.send_order(symbol, params.clone(), coid, false),
            || self.find_order(symbol, coid),
        )
        .await
    }
}

enum Parsed {
    Live(OrderAck),
    /// Canceled / expired / rejected with nothing filled: the order had no effect.
    Dead {
        status: String,
    },
}

fn parse_order(v: &Value) -> Result<Parsed, ExchangeError> {
    let status = v["status"]
        .as_str()
        .ok_or_else(|| http::unexpected(NAME, "order without `status`"))?;
    let exchange_order_id =
        id_text(&v["orderId"]).ok_or_else(|| http::unexpected(NAME, "order without `orderId`"))?;
    let client_order_id = v["clientOrderId"].as_str().unwrap_or_default().to_string();
    let filled_qty = dec(&v["executedQty"]).unwrap_or_default();
    let avg_price = dec(&v["avgPrice"]).filter(|p| *p > Decimal::ZERO);
    let state = match status {
        "FILLED" => OrderState::Filled,
        "NEW" | "PARTIALLY_FILLED" => OrderState::Accepted,
        // Final (EXPIRED, CANCELED) with a partial fill: what filled is the position.
        _ if filled_qty > Decimal::ZERO => OrderState::PartiallyFilled,
        other => {
            return Ok(Parsed::Dead {
                status: other.to_string(),
            })
        }
    };
    Ok(Parsed::Live(OrderAck {
        exchange_order_id,
        client_order_id,
        state,
        filled_qty,
        avg_price,
        fee: None,
    }))
}

/// The total commission of order `order_id` in `trades` (a `userTrades` reply), if it has
/// executions there and all of them are charged in the quote asset of `symbol`.
fn commission_of(trades: &Value, order_id: &str, symbol: &str) -> Option<Decimal> {
    let mine: Vec<&Value> = trades
        .as_array()?
        .iter()
        .filter(|t| id_text(&t["orderId"]).as_deref() == Some(order_id))
        .collect();
    if mine.is_empty() {
        return None;
    }
    mine.into_iter()
        .try_fold(Decimal::ZERO, |sum, t| {
            let asset = t["commissionAsset"].as_str()?;
            if asset.is_empty() || !symbol.ends_with(asset) {
                return None;
            }
            sum.checked_add(dec(&t["commission"])?.abs())
        })
        .map(|f| f.normalize())
}

fn side_param(side: OrderSide) -> String {
    match side {
        OrderSide::Buy => "BUY".into(),
        OrderSide::Sell => "SELL".into(),
    }
}

/// The client order id of a trailing stop placed beside a fixed stop-loss: `sp` + the job id + `r`
/// (the format of [`client_order_id`], a letter no other leg uses).
fn trailing_client_order_id(job_id: uuid::Uuid) -> String {
    format!("sp{}r", job_id.simple())
}

#[async_trait]
impl Exchange for AsterClient {
    fn kind(&self) -> ExchangeKind {
        ExchangeKind::Aster
    }

    async fn symbol_rules(&self, symbol: &Symbol) -> Result<SymbolRules, ExchangeError> {
        Ok(self.rules(symbol).await?.summary())
    }

    async fn price(&self, symbol: &Symbol) -> Result<Decimal, ExchangeError> {
        let v = self
            .public("/fapi/v1/ticker/price", &[("symbol", symbol.to_string())])
            .await?;
        http::dec_field(NAME, &v, "price")
    }

    async fn position(&self, symbol: &Symbol) -> Result<Option<ExPosition>, ExchangeError> {
        let v = self
            .signed(
                Method::GET,
                "/fapi/v2/positionRisk",
                &[("symbol", symbol.to_string())],
                Call::Read,
            )
            .await?;
        let rows = v
            .as_array()
            .ok_or_else(|| http::unexpected(NAME, "positionRisk is not a list"))?;
        let mut net = Decimal::ZERO;
        let mut entry = None;
        for r in rows.iter().filter(|r| r["symbol"] == symbol.as_str()) {
            let amt = dec(&r["positionAmt"]).unwrap_or_default();
            if amt.is_zero() {
                continue;
            }
            if matches!(r["positionSide"].as_str(), Some("LONG") | Some("SHORT")) {
                return Err(ExchangeError::permanent(format!(
                    "aster: the account holds a hedge-mode position in {symbol}; Sparky trades one-way mode only (switch the account to one-way position mode)"
                )));
            }
            net += amt;
            entry = dec(&r["entryPrice"]).filter(|p| *p > Decimal::ZERO);
        }
        Ok(ExPosition::from_signed(net, entry))
    }

    async fn place_order(&self, order: &OrderRequest) -> Result<OrderAck, ExchangeError> {
        let rules = self.rules(&order.symbol).await?;
        let (qty, limit) = self.size(order, &rules).await?;
        if let (Some(l), false) = (self.leverage, order.reduce_only) {
            self.set_leverage(&order.symbol, l).await?;
        }
        let mut params = vec![
            ("symbol", order.symbol.to_string()),
            ("side", side_param(order.side)),
        ];
        match limit {
            Some(p) => {
                params.push(("type", "LIMIT".into()));
                params.push(("timeInForce", "GTC".into()));
                params.push(("quantity", qty.normalize().to_string()));
                params.push(("price", p.normalize().to_string()));
            }
            None => {
                params.push(("type", "MARKET".into()));
                params.push(("quantity", qty.normalize().to_string()));
            }
        }
        if order.reduce_only {
            params.push(("reduceOnly", "true".into()));
        }
        params.push(("newClientOrderId", order.client_order_id.clone()));
        params.push(("newOrderRespType", "RESULT".into()));
        self.send_order(
            &order.symbol,
            params,
            &order.client_order_id,
            order.order_type == OrderType::Market,
        )
        .await
    }

    async fn close_position(
        &self,
        symbol: &Symbol,
        position: &ExPosition,
        client_order_id: &str,
    ) -> Result<OrderAck, ExchangeError> {
        let params = vec![
            ("symbol", symbol.to_string()),
            ("side", side_param(OrderSide::closing(position.side))),
            ("type", "MARKET".into()),
            ("quantity", position.quantity.normalize().to_string()),
            ("reduceOnly", "true".into()),
            ("newClientOrderId", client_order_id.to_string()),
            ("newOrderRespType", "RESULT".into()),
        ];
        self.send_order(symbol, params, client_order_id, true).await
    }

    async fn find_order(
        &self,
        symbol: &Symbol,
        client_order_id: &str,
    ) -> Result<Option<OrderAck>, ExchangeError> {
        let res = self
            .signed(
                Method::GET,
                "/fapi/v1/order",
                &[
                    ("symbol", symbol.to_string()),
                    ("origClientOrderId", client_order_id.to_string()),
                ],
                Call::Read,
            )
            .await;
        match res {
            Ok(v) => match parse_order(&v)? {
                Parsed::Live(ack) => Ok(Some(self.with_fee(symbol, ack, &v).await)),
                // It had no effect: the leg may be placed (again) under the same id.
                Parsed::Dead { .. } => Ok(None),
            },
            Err(e) if e.code == Some(-2013) => Ok(None),
            Err(e) => Err(e.error),
        }
    }

    async fn equity(&self) -> Result<Decimal, ExchangeError> {
        // V1's account endpoint (it read /fapi/v2/account before 2025-07); equity is
        // totalMarginBalance (wallet plus unrealized PnL), in USDT (exchanges.md).
        let v = self
            .signed(Method::GET, "/fapi/v4/account", &[], Call::Read)
            .await?;
        http::dec_field(NAME, &v, "totalMarginBalance")
    }

    async fn protect(&self, p: &Protection) -> Result<Vec<RestingOrder>, ExchangeError> {
        let order_side = OrderSide::closing(p.position_side);
        let side = side_param(order_side);
        let mut failures = Vec::new();
        let mut placed = Vec::new();
        // A trailing stop: TRAILING_STOP_MARKET with the percent as callbackRate (0.1 to 5),
        // reduce-only for the position's quantity (closePosition is documented only for
        // STOP_MARKET / TAKE_PROFIT_MARKET). Its client order id is the stop-loss leg's when there
        // is no fixed stop, else the open leg's id with a `r` suffix in place of the leg letter.
        if let Some(t) = p.trailing_stop {
            let coid = if p.stop_loss.is_none() {
                client_order_id(p.job_id, Leg::StopLoss)
            } else {
                trailing_client_order_id(p.job_id)
            };
            let trailing = match t {
                TrailingStop::Percent(rate) => {
                    let params = vec![
                        ("symbol", p.symbol.to_string()),
                        ("side", side.clone()),
                        ("type", "TRAILING_STOP_MARKET".to_string()),
                        ("callbackRate", rate.normalize().to_string()),
                        ("quantity", p.quantity.normalize().to_string()),
                        ("reduceOnly", "true".into()),
                        ("newClientOrderId", coid.clone()),
                    ];
                    self.place_protective(&p.symbol, params, &coid).await
                }
                other => Err(ExchangeError::permanent(format!(
                    "aster: a trailing stop takes a percent only, not {}",
                    other.field()
                ))),
            };
            match trailing {
                Ok(ack) => placed.push(RestingOrder {
                    leg: Leg::StopLoss,
                    client_order_id: coid,
                    exchange_order_id: Some(ack.exchange_order_id),
                    side: order_side,
                    quantity: p.quantity,
                    price: None,
                }),
                Err(e) => failures.push((Leg::StopLoss, e)),
            }
        }
        for (leg, kind, price) in [
            (Leg::StopLoss, "STOP_MARKET", p.stop_loss),
            (Leg::TakeProfit, "TAKE_PROFIT_MARKET", p.take_profit),
        ] {
            let Some(price) = price else { continue };
            let coid = client_order_id(p.job_id, leg);
            let params = vec![
                ("symbol", p.symbol.to_string()),
                ("side", side.clone()),
                ("type", kind.to_string()),
                ("stopPrice", price.normalize().to_string()),
                ("closePosition", "true".into()),
                ("newClientOrderId", coid.clone()),
            ];
            match self.place_protective(&p.symbol, params, &coid).await {
                Ok(ack) => placed.push(RestingOrder {
                    leg,
                    client_order_id: coid,
                    exchange_order_id: Some(ack.exchange_order_id),
                    side: order_side,
                    quantity: p.quantity,
                    price: Some(price),
                }),
                Err(e) => failures.push((leg, e)),
            }
        }
        match failures.len() {
            0 => Ok(placed),
            _ => {
                let class = failures
                    .iter()
                    .map(|(_, e)| e.class)
                    .find(|c| *c != ErrorClass::Permanent)
                    .unwrap_or(ErrorClass::Permanent);
                let message = failures
                    .iter()
                    .map(|(leg, e)| format!("{}: {}", leg.as_str(), e.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                Err(ExchangeError {
                    class,
                    message,
                    retry_after: None,
                })
            }
        }
    }

    async fn open_orders(&self, symbol: &Symbol) -> Result<Vec<OpenOrder>, ExchangeError> {
        let v = self
            .signed(
                Method::GET,
                "/fapi/v1/openOrders",
                &[("symbol", symbol.to_string())],
                Call::Read,
            )
            .await
            .map_err(|e| e.error)?;
        let list = v
            .as_array()
            .ok_or_else(|| http::unexpected(NAME, "openOrders is not a list"))?;
        list.iter().map(open_order).collect()
    }

    async fn cancel_order(&self, symbol: &Symbol, order: &OpenOrder) -> Result<(), ExchangeError> {
        let res = self
            .signed(
                Method::DELETE,
                "/fapi/v1/order",
                &[
                    ("symbol", symbol.to_string()),
                    ("orderId", order.exchange_order_id.clone()),
                ],
                Call::Write,
            )
            .await;
        match res {
            Ok(_) => Ok(()),
            // -2011 "Unknown order sent" / -2013 "Order does not exist": no longer open (filled
            // or cancelled meanwhile); the caller lists again and reads the position.
            Err(e) if matches!(e.code, Some(-2011 | -2013)) => Ok(()),
            Err(e) => Err(e.error),
        }
    }
}

/// One entry of `GET /fapi/v1/openOrders`.
fn open_order(v: &Value) -> Result<OpenOrder, ExchangeError> {
    let exchange_order_id =
        id_text(&v["orderId"]).ok_or_else(|| http::unexpected(NAME, "order without `orderId`"))?;
    let side = match v["side"].as_str() {
        Some("BUY") => OrderSide::Buy,
        Some("SELL") => OrderSide::Sell,
        _ => return Err(http::unexpected(NAME, "open order without a `side`")),
    };
    let kind = v["type"].as_str().unwrap_or_default();
    let stop = dec(&v["stopPrice"]).filter(|p| *p > Decimal::ZERO);
    let price = dec(&v["price"]).filter(|p| *p > Decimal::ZERO);
    let close_position = v["closePosition"].as_bool().unwrap_or(false);
    Ok(OpenOrder {
        exchange_order_id,
        client_order_id: v["clientOrderId"].as_str().map(str::to_string),
        side,
        quantity: if close_position {
            None
        } else {
            dec(&v["origQty"])
        },
        stop_loss: stop.filter(|_| matches!(kind, "STOP_MARKET" | "STOP")),
        take_profit: stop.filter(|_| matches!(kind, "TAKE_PROFIT_MARKET" | "TAKE_PROFIT")),
        limit_price: price.filter(|_| kind == "LIMIT"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;
    use serde_json::json;

    /// Binance USD-M general-info example 1 (repeated unchanged in Aster's V1 doc).
    #[test]
    fn signs_the_binance_futures_vector() {
        let signer = HmacSigner::new(SecretString::new(
            "2b5eb11e18796d12d88f13dc27dbbd02c2cc51ff7059765ed9821957d82bb4d9",
        ));
        let total = "symbol=BTCUSDT&side=BUY&type=LIMIT&quantity=1&price=9000&timeInForce=GTC&recvWindow=5000&timestamp=1591702613943";
        assert_eq!(
            signer.sign(total),
            "3c661234138461fcc7a7d8746c6558c9842d4e10870d2ecbedf7777cad694af9"
        );
    }

    /// The independent vector of binance-spot-api-docs `rest-api.md`.
    #[test]
    fn signs_the_binance_spot_vector() {
        let signer = HmacSigner::new(SecretString::new(
            "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j",
        ));
        let total = "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1&recvWindow=5000&timestamp=1499827319559";
        assert_eq!(
            signer.sign(total),
            "c8db56825ae71d6d79447849e617115f4a920fa2acdcab2b053c4b2838bd6b71"
        );
    }

    #[test]
    fn the_signed_string_is_the_parameters_in_order() {
        let params = [
            ("symbol", "BTCUSDT".to_string()),
            ("side", "BUY".into()),
            ("type", "LIMIT".into()),
            ("quantity", "1".into()),
            ("price", "9000".into()),
            ("timeInForce", "GTC".into()),
            ("recvWindow", "5000".into()),
            ("timestamp", "1591702613943".into()),
        ];
        assert_eq!(
            encode_params(&params),
            "symbol=BTCUSDT&side=BUY&type=LIMIT&quantity=1&price=9000&timeInForce=GTC&recvWindow=5000&timestamp=1591702613943"
        );
        assert_eq!(form_encode("a b/c:d"), "a+b%2Fc%3Ad");
    }

    #[test]
    fn signer_debug_is_redacted() {
        let s = HmacSigner::new(SecretString::new("topsecret"));
        assert!(!format!("{s:?}").contains("topsecret"));
    }

    #[test]
    fn parses_exchange_info_filters() {
        let sym = json!({
            "symbol": "ETHUSDT",
            "filters": [
                {"filterType": "PRICE_FILTER", "minPrice": "0.01", "maxPrice": "100000", "tickSize": "0.01000000"},
                {"filterType": "LOT_SIZE", "minQty": "0.001", "maxQty": "10000", "stepSize": "0.001"},
                {"filterType": "MARKET_LOT_SIZE", "minQty": "0.010", "maxQty": "2000", "stepSize": "0.010"},
                {"filterType": "MIN_NOTIONAL", "notional": "5"}
            ]
        });
        let r = AsterRules::parse(&sym).unwrap();
        assert_eq!(r.tick, dec!(0.01));
        assert_eq!((r.lot_step, r.lot_min), (dec!(0.001), dec!(0.001)));
        assert_eq!((r.market_step, r.market_min), (dec!(0.01), dec!(0.01)));
        assert_eq!(r.min_notional, dec!(5));
        let s = r.summary();
        assert_eq!((s.step, s.min_qty), (dec!(0.01), dec!(0.01)));
    }

    #[test]
    fn commissions_of_one_order_in_the_quote_asset() {
        let trades = json!([
            {"orderId": 7, "commission": "-0.0120", "commissionAsset": "USDT"},
            {"orderId": 8, "commission": "-5", "commissionAsset": "USDT"},
            {"orderId": 7, "commission": "0.0030", "commissionAsset": "USDT"},
        ]);
        assert_eq!(commission_of(&trades, "7", "ETHUSDT"), Some(dec!(0.015)));
        assert_eq!(
            commission_of(&trades, "9", "ETHUSDT"),
            None,
            "no executions"
        );
        let other = json!([
            {"orderId": 7, "commission": "-0.0120", "commissionAsset": "USDT"},
            {"orderId": 7, "commission": "-0.01", "commissionAsset": "BNB"},
        ]);
        assert_eq!(
            commission_of(&other, "7", "ETHUSDT"),
            None,
            "a commission in another asset cannot be added up"
        );
        assert_eq!(commission_of(&json!({}), "7", "ETHUSDT"), None);
    }

    #[test]
    fn order_states() {
        let filled = json!({"orderId": 22542179, "clientOrderId": "x", "status": "FILLED",
            "executedQty": "0.033", "avgPrice": "3000.10"});
        match parse_order(&filled).unwrap() {
            Parsed::Live(a) => {
                assert_eq!(a.state, OrderState::Filled);
                assert_eq!(a.exchange_order_id, "22542179");
                assert_eq!(a.filled_qty, dec!(0.033));
                assert_eq!(a.avg_price, Some(dec!(3000.10)));
            }
            Parsed::Dead { .. } => panic!("filled"),
        }
        let new = json!({"orderId": 1, "status": "NEW", "executedQty": "0", "avgPrice": "0.00000"});
        assert!(
            matches!(parse_order(&new).unwrap(), Parsed::Live(a) if a.state == OrderState::Accepted && a.avg_price.is_none())
        );
        let expired = json!({"orderId": 1, "status": "EXPIRED", "executedQty": "0"});
        assert!(matches!(
            parse_order(&expired).unwrap(),
            Parsed::Dead { .. }
        ));
    }

    #[test]
    fn error_codes() {
        assert_eq!(code_class(-1007, Call::Write), Some(ErrorClass::Unknown));
        assert_eq!(code_class(-1007, Call::Read), Some(ErrorClass::Transient));
        assert_eq!(code_class(-1021, Call::Write), Some(ErrorClass::Transient));
        assert_eq!(code_class(-2019, Call::Write), None);
    }
}
