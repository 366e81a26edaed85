//! Domain types, and the webhook parser that turns untrusted JSON into them once, at the edge.
//!
//! Parse, don't validate: after [`parse_alert`] the rest of the system handles typed values
//! ([`ExchangeKind`], [`Action`], [`Symbol`], `Decimal` sizes) and never re-checks them. The parser
//! collects every problem (not just the first) as [`FieldError`]s naming the field.
//!
//! Numbers are read exactly: `serde_json` keeps the literal text of JSON numbers
//! (`arbitrary_precision`), which goes straight into `rust_decimal`; nothing passes through `f64`.
//! Numeric strings are accepted too (TradingView placeholders render as text).
//!
//! Every value also has bounds ([`bounds`]): text without control characters (Postgres cannot
//! store NUL) and of bounded length, sizes and prices in ranges whose arithmetic fits a decimal,
//! times within sane years. The parser applies them per field; [`Alert::check_bounds`] applies the
//! same functions to an alert read back from a stream entry (replays, entries older than a bound),
//! so no alert that breaks one ever reaches the worker's arithmetic or the database.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    Aster,
    Oanda,
    Tradier,
    Paper,
}

impl ExchangeKind {
    pub const ALL: [ExchangeKind; 4] = [
        ExchangeKind::Aster,
        ExchangeKind::Oanda,
        ExchangeKind::Tradier,
        ExchangeKind::Paper,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Aster => "aster",
            ExchangeKind::Oanda => "oanda",
            ExchangeKind::Tradier => "tradier",
            ExchangeKind::Paper => "paper",
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExchangeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "aster" => Ok(ExchangeKind::Aster),
            "oanda" => Ok(ExchangeKind::Oanda),
            "tradier" => Ok(ExchangeKind::Tradier),
            "paper" => Ok(ExchangeKind::Paper),
            other => Err(format!(
                "unknown exchange `{other}`: expected one of aster, oanda, tradier, paper"
            )),
        }
    }
}

/// What the alert asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Buy,
    Sell,
    Close,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Buy => "buy",
            Action::Sell => "sell",
            Action::Close => "close",
        }
    }
    /// The position side a buy/sell opens.
    pub fn side(self) -> Option<Side> {
        match self {
            Action::Buy => Some(Side::Long),
            Action::Sell => Some(Side::Short),
            Action::Close => None,
        }
    }
}

impl FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "buy" | "long" => Ok(Action::Buy),
            "sell" | "short" => Ok(Action::Sell),
            "close" | "exit" | "flat" => Ok(Action::Close),
            other => Err(format!(
                "unknown action `{other}`: expected buy, sell or close (aliases long, short, exit, flat)"
            )),
        }
    }
}

/// The side of a position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Long,
    Short,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Long => "long",
            Side::Short => "short",
        }
    }
    pub fn opposite(self) -> Side {
        match self {
            Side::Long => Side::Short,
            Side::Short => Side::Long,
        }
    }
}

impl FromStr for Side {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "long" => Ok(Side::Long),
            "short" => Ok(Side::Short),
            other => Err(format!("unknown side `{other}`")),
        }
    }
}

/// The direction of one order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderSide {
    Buy,
    Sell,
}

impl OrderSide {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderSide::Buy => "buy",
            OrderSide::Sell => "sell",
        }
    }
    /// The order that opens (or adds to) a position of `side`.
    pub fn opening(side: Side) -> OrderSide {
        match side {
            Side::Long => OrderSide::Buy,
            Side::Short => OrderSide::Sell,
        }
    }
    /// The order that reduces a position of `side`.
    pub fn closing(side: Side) -> OrderSide {
        match side {
            Side::Long => OrderSide::Sell,
            Side::Short => OrderSide::Buy,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OrderType {
    #[default]
    Market,
    Limit,
}

/// Which credential row (`bot_credentials.environment`) a job uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum CredentialEnv {
    Production,
    Sandbox,
}

impl CredentialEnv {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialEnv::Production => "production",
            CredentialEnv::Sandbox => "sandbox",
        }
    }
}

impl FromStr for CredentialEnv {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "production" | "live" => Ok(CredentialEnv::Production),
            "sandbox" | "practice" | "paper" => Ok(CredentialEnv::Sandbox),
            other => Err(format!(
                "unknown environment `{other}`: expected production or sandbox"
            )),
        }
    }
}

/// One broker account of a user: where positions and orders live. Two credential rows of one user
/// (paper and Aster, or an Aster production and sandbox key) are two accounts, and a symbol open
/// on one is unrelated to the same symbol on the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Account {
    pub user_id: Uuid,
    pub exchange: ExchangeKind,
    pub environment: CredentialEnv,
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.user_id,
            self.exchange,
            self.environment.as_str()
        )
    }
}

/// A trading symbol in the exchange's own form (`ETHUSDT`, `EUR_USD`, `AAPL`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Symbol(String);

impl Symbol {
    /// Normalise what an alert sends: strip a `PREFIX:` (`BINANCE:ETHUSDT`), upper-case, and for
    /// OANDA turn `EURUSD` into `EUR_USD`.
    pub fn parse(raw: &str, exchange: ExchangeKind) -> Result<Symbol, String> {
        let s = raw.trim();
        let s = s.rsplit_once(':').map(|(_, s)| s).unwrap_or(s).trim();
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        let mut s = s.to_ascii_uppercase();
        if s.len() > 32
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-'))
        {
            return Err(format!(
                "`{raw}` is not a symbol (letters, digits, `_`, `.`, `/`, `-`; at most 32)"
            ));
        }
        if exchange == ExchangeKind::Oanda {
            s = s.replace('/', "_");
            if !s.contains('_') && s.len() == 6 && s.chars().all(|c| c.is_ascii_alphabetic()) {
                s = format!("{}_{}", &s[..3], &s[3..]);
            }
        }
        Ok(Symbol(s))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Symbol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated alert: what a job asks the worker to do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub user_id: Uuid,
    pub exchange: ExchangeKind,
    pub action: Action,
    pub symbol: Symbol,
    pub order_type: OrderType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position_size_usd: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_loss_percent: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub take_profit_percent: Option<Decimal>,
    /// Close only this share of the open position (0 < x <= 100); the rest stays open with its
    /// protection resized. Absent: a close closes it all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_percent: Option<Decimal>,
    /// How long an entry that rests unfilled at the broker is followed before it is cancelled
    /// (1 s to 30 days; default [`crate::executor::DEFAULT_LIMIT_TTL_SECS`], one day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_ttl_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<CredentialEnv>,
}

/// One problem with one field of a webhook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The JSON object of a webhook body, or the problem with it.
pub fn parse_body(body: &[u8]) -> Result<Map<String, Value>, FieldError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(FieldError {
            field: "body".into(),
            message: "must be a JSON object".into(),
        }),
        Err(e) => Err(FieldError {
            field: "body".into(),
            message: format!("is not valid JSON ({e})"),
        }),
    }
}

/// The webhook secret from the body (`secret`), or `None`.
pub fn body_secret(body: &Map<String, Value>) -> Option<&str> {
    body.get("secret")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// The bounds of every alert value, shared by the parser and [`Alert::check_bounds`].
pub mod bounds {
    use chrono::{DateTime, Utc};
    use rust_decimal::Decimal;

    /// Longest free text (`strategy`, `strategy_id`, `alert_id`), in characters.
    pub const MAX_TEXT: usize = 256;
    /// Largest `position_size_usd`: 1 billion.
    pub const MAX_USD: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);
    /// Largest `price`: 1 billion.
    pub const MAX_PRICE: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);
    /// Smallest `price`: 1e-12.
    pub const MIN_PRICE: Decimal = Decimal::from_parts(1, 0, 0, false, 12);
    /// Longest `max_lag_secs`: 30 days.
    pub const MAX_LAG_SECS: u64 = 30 * 24 * 3600;
    /// `timestamp` must lie in [2000-01-01, 2100-01-01).
    pub const MIN_TIMESTAMP_MS: i64 = 946_684_800_000;
    pub const MAX_TIMESTAMP_MS: i64 = 4_102_444_800_000;

    /// Free text: at most [`MAX_TEXT`] characters, no control characters (NUL and the like).
    pub fn text(s: &str) -> Result<(), String> {
        if s.chars().count() > MAX_TEXT {
            return Err(format!("is longer than {MAX_TEXT} characters"));
        }
        if let Some(c) = s.chars().find(|c| c.is_control()) {
            return Err(format!(
                "must not contain control characters (found U+{:04X})",
                c as u32
            ));
        }
        Ok(())
    }

    pub fn usd(d: Decimal) -> Result<(), String> {
        if d > Decimal::ZERO && d <= MAX_USD {
            Ok(())
        } else {
            Err(format!(
                "must be greater than 0 and at most {MAX_USD}, got {d}"
            ))
        }
    }

    pub fn price(d: Decimal) -> Result<(), String> {
        if d >= MIN_PRICE && d <= MAX_PRICE {
            Ok(())
        } else {
            Err(format!(
                "must be between {MIN_PRICE} and {MAX_PRICE}, got {d}"
            ))
        }
    }

    pub fn percent(d: Decimal) -> Result<(), String> {
        if d > Decimal::ZERO && d < Decimal::ONE_HUNDRED {
            Ok(())
        } else {
            Err(format!("must be between 0 and 100 (exclusive), got {d}"))
        }
    }

    /// `close_percent`: 0 < x <= 100 (100 closes everything).
    pub fn close_percent(d: Decimal) -> Result<(), String> {
        if d > Decimal::ZERO && d <= Decimal::ONE_HUNDRED {
            Ok(())
        } else {
            Err(format!("must be greater than 0 and at most 100, got {d}"))
        }
    }

    pub fn max_lag_secs(n: u64) -> Result<(), String> {
        if (1..=MAX_LAG_SECS).contains(&n) {
            Ok(())
        } else {
            Err(format!(
                "must be a whole number of seconds from 1 to {MAX_LAG_SECS} (30 days), got {n}"
            ))
        }
    }

    pub fn timestamp(t: DateTime<Utc>) -> Result<(), String> {
        let ms = t.timestamp_millis();
        if (MIN_TIMESTAMP_MS..MAX_TIMESTAMP_MS).contains(&ms) {
            Ok(())
        } else {
            Err(format!("`{t}` is outside the years 2000 to 2099"))
        }
    }
}

impl Alert {
    /// The bounds the parser enforces, applied to an alert that did not just come through it
    /// (read back from a stream entry or the database). Every problem is named.
    pub fn check_bounds(&self) -> Result<(), Vec<FieldError>> {
        let mut errs = Vec::new();
        let mut check = |field: &str, r: Result<(), String>| {
            if let Err(message) = r {
                errs.push(FieldError {
                    field: field.into(),
                    message,
                });
            }
        };
        check(
            "symbol",
            Symbol::parse(self.symbol.as_str(), self.exchange).and_then(|s| {
                if s == self.symbol {
                    Ok(())
                } else {
                    Err(format!("`{}` is not in its normal form", self.symbol))
                }
            }),
        );
        let texts = [
            ("strategy_id", &self.strategy_id),
            ("strategy", &self.strategy),
            ("alert_id", &self.alert_id),
        ];
        for (field, value) in texts {
            if let Some(v) = value {
                check(field, bounds::text(v));
            }
        }
        if let Some(p) = self.price {
            check("price", bounds::price(p));
        }
        if let Some(u) = self.position_size_usd {
            check("position_size_usd", bounds::usd(u));
        }
        if let Some(p) = self.stop_loss_percent {
            check("stop_loss_percent", bounds::percent(p));
        }
        if let Some(p) = self.take_profit_percent {
            check("take_profit_percent", bounds::percent(p));
        }
        if let Some(p) = self.close_percent {
            check("close_percent", bounds::close_percent(p));
        }
        if let Some(t) = self.timestamp {
            check("timestamp", bounds::timestamp(t));
        }
        if let Some(n) = self.max_lag_secs {
            check("max_lag_secs", bounds::max_lag_secs(n));
        }
        if let Some(n) = self.limit_ttl_secs {
            check("limit_ttl_secs", bounds::max_lag_secs(n));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }
}

/// Validate every field of a webhook body. `idempotency_key` is the `Idempotency-Key` header, used
/// when the body has no `alert_id`.
pub fn parse_alert(
    body: &Map<String, Value>,
    idempotency_key: Option<&str>,
) -> Result<Alert, Vec<FieldError>> {
    let mut errs = Vec::new();
    let mut bad = |field: &str, message: String| {
        errs.push(FieldError {
            field: field.into(),
            message,
        })
    };

    let user_id = match text(body, "user_id") {
        Ok(Some(s)) => match Uuid::parse_str(&s) {
            Ok(u) => Some(u),
            Err(_) => {
                bad("user_id", format!("`{s}` is not a UUID"));
                None
            }
        },
        Ok(None) => {
            bad("user_id", "is required".into());
            None
        }
        Err(m) => {
            bad("user_id", m);
            None
        }
    };
    let exchange = required_parse::<ExchangeKind>(body, "exchange", &mut bad);
    let action = required_parse::<Action>(body, "action", &mut bad);
    let symbol = match (text(body, "symbol"), exchange) {
        (Ok(Some(s)), Some(ex)) => match Symbol::parse(&s, ex) {
            Ok(sym) => Some(sym),
            Err(m) => {
                bad("symbol", m);
                None
            }
        },
        (Ok(Some(s)), None) => Symbol::parse(&s, ExchangeKind::Paper)
            .map_err(|m| bad("symbol", m))
            .ok(),
        (Ok(None), _) => {
            bad("symbol", "is required".into());
            None
        }
        (Err(m), _) => {
            bad("symbol", m);
            None
        }
    };
    let order_type = match text(body, "order_type") {
        Ok(None) => Some(OrderType::Market),
        Ok(Some(s)) => match s.to_ascii_lowercase().as_str() {
            "market" => Some(OrderType::Market),
            "limit" => Some(OrderType::Limit),
            _ => {
                bad(
                    "order_type",
                    format!("unknown order type `{s}`: expected market or limit"),
                );
                None
            }
        },
        Err(m) => {
            bad("order_type", m);
            None
        }
    };
    let price = bounded_decimal(body, "price", bounds::price, &mut bad);
    if order_type == Some(OrderType::Limit) && price.is_none() && !body_has(body, "price") {
        bad("price", "is required for limit orders".into());
    }
    let position_size_usd = bounded_decimal(body, "position_size_usd", bounds::usd, &mut bad);
    if matches!(action, Some(Action::Buy | Action::Sell))
        && position_size_usd.is_none()
        && !body_has(body, "position_size_usd")
    {
        bad("position_size_usd", "is required for buy and sell".into());
    }
    let stop_loss_percent = bounded_decimal(body, "stop_loss_percent", bounds::percent, &mut bad);
    let take_profit_percent =
        bounded_decimal(body, "take_profit_percent", bounds::percent, &mut bad);
    let close_percent = bounded_decimal(body, "close_percent", bounds::close_percent, &mut bad);
    let strategy_id = short_text(body, "strategy_id", &mut bad);
    let strategy = short_text(body, "strategy", &mut bad);
    let alert_id = match short_text(body, "alert_id", &mut bad) {
        Some(a) => Some(a),
        None if !body_has(body, "alert_id") => match idempotency_key.map(str::trim) {
            Some(k) if !k.is_empty() => match bounds::text(k) {
                Ok(()) => Some(k.to_string()),
                Err(m) => {
                    bad("Idempotency-Key", m);
                    None
                }
            },
            _ => None,
        },
        None => None,
    };
    let timestamp = match body.get("timestamp") {
        None | Some(Value::Null) => None,
        Some(v) => match parse_timestamp(v).and_then(|t| bounds::timestamp(t).map(|()| t)) {
            Ok(t) => Some(t),
            Err(m) => {
                bad("timestamp", m);
                None
            }
        },
    };
    let max_lag_secs = match body.get("max_lag_secs") {
        None | Some(Value::Null) => None,
        Some(v) => match number_text(v).and_then(|s| s.parse::<u64>().ok()) {
            Some(n) => bounds::max_lag_secs(n)
                .map(|()| n)
                .map_err(|m| bad("max_lag_secs", m))
                .ok(),
            None => {
                bad(
                    "max_lag_secs",
                    format!(
                        "must be a whole number of seconds from 1 to {}",
                        bounds::MAX_LAG_SECS
                    ),
                );
                None
            }
        },
    };
    let limit_ttl_secs = match body.get("limit_ttl_secs") {
        None | Some(Value::Null) => None,
        Some(v) => match number_text(v).and_then(|s| s.parse::<u64>().ok()) {
            Some(n) => bounds::max_lag_secs(n)
                .map(|()| n)
                .map_err(|m| bad("limit_ttl_secs", m))
                .ok(),
            None => {
                bad(
                    "limit_ttl_secs",
                    format!(
                        "must be a whole number of seconds from 1 to {}",
                        bounds::MAX_LAG_SECS
                    ),
                );
                None
            }
        },
    };
    let environment = match text(body, "environment") {
        Ok(None) => None,
        Ok(Some(s)) => s
            .parse::<CredentialEnv>()
            .map_err(|m| bad("environment", m))
            .ok(),
        Err(m) => {
            bad("environment", m);
            None
        }
    };

    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Alert {
        user_id: user_id.expect("checked"),
        exchange: exchange.expect("checked"),
        action: action.expect("checked"),
        symbol: symbol.expect("checked"),
        order_type: order_type.expect("checked"),
        price,
        position_size_usd,
        stop_loss_percent,
        take_profit_percent,
        close_percent,
        strategy_id,
        strategy,
        alert_id,
        timestamp,
        max_lag_secs,
        limit_ttl_secs,
        environment,
    })
}

/// Was `key` sent with a value? Missing, `null` and blank text (an empty TradingView placeholder)
/// are not a value: a required field sent blank is missing.
fn body_has(body: &Map<String, Value>, key: &str) -> bool {
    match body.get(key) {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.trim().is_empty(),
        Some(_) => true,
    }
}

/// A string field (numbers are accepted and turned into their text). `Ok(None)` when absent/null/blank.
fn text(body: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(format!("must be a string, got {}", type_name(other))),
    }
}

fn required_parse<T: FromStr<Err = String>>(
    body: &Map<String, Value>,
    key: &str,
    bad: &mut impl FnMut(&str, String),
) -> Option<T> {
    match text(body, key) {
        Ok(Some(s)) => s.parse::<T>().map_err(|m| bad(key, m)).ok(),
        Ok(None) => {
            bad(key, "is required".into());
            None
        }
        Err(m) => {
            bad(key, m);
            None
        }
    }
}

fn short_text(
    body: &Map<String, Value>,
    key: &str,
    bad: &mut impl FnMut(&str, String),
) -> Option<String> {
    match text(body, key) {
        Ok(Some(s)) => match bounds::text(&s) {
            Ok(()) => Some(s),
            Err(m) => {
                bad(key, m);
                None
            }
        },
        Ok(None) => None,
        Err(m) => {
            bad(key, m);
            None
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The literal text of a JSON number or numeric string.
fn number_text(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.trim().to_string()),
        _ => None,
    }
}

/// Parse a decimal exactly from its text (plain or scientific notation).
pub fn parse_decimal(s: &str) -> Option<Decimal> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    Decimal::from_str(s)
        .ok()
        .or_else(|| {
            if s.contains(['e', 'E']) {
                Decimal::from_scientific(s).ok()
            } else {
                None
            }
        })
        .map(|d| d.normalize())
}

fn decimal_field(body: &Map<String, Value>, key: &str) -> Result<Option<Decimal>, String> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(v @ (Value::Number(_) | Value::String(_))) => {
            let t = number_text(v).unwrap_or_default();
            parse_decimal(&t)
                .map(Some)
                .ok_or_else(|| format!("`{t}` is not a decimal number"))
        }
        Some(other) => Err(format!("must be a number, got {}", type_name(other))),
    }
}

/// A decimal field within `bound` (a function of [`bounds`]).
fn bounded_decimal(
    body: &Map<String, Value>,
    key: &str,
    bound: fn(Decimal) -> Result<(), String>,
    bad: &mut impl FnMut(&str, String),
) -> Option<Decimal> {
    match decimal_field(body, key) {
        Ok(Some(d)) => bound(d).map(|()| d).map_err(|m| bad(key, m)).ok(),
        Ok(None) => None,
        Err(m) => {
            bad(key, m);
            None
        }
    }
}

fn parse_timestamp(v: &Value) -> Result<DateTime<Utc>, String> {
    let t = number_text(v).ok_or("must be RFC 3339 text or unix milliseconds")?;
    if let Ok(ms) = t.parse::<i64>() {
        return Utc
            .timestamp_millis_opt(ms)
            .single()
            .ok_or_else(|| format!("`{t}` is out of range"));
    }
    DateTime::parse_from_rfc3339(&t)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|_| format!("`{t}` is neither RFC 3339 nor unix milliseconds"))
}

/// A job: an accepted alert with the id and time the ingress gave it. This is what the partition
/// stream entry carries (as JSON in its `job` field).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: Uuid,
    pub accepted_at: DateTime<Utc>,
    pub alert: Alert,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn base() -> Value {
        json!({"user_id": "0195f3d0-0000-7000-8000-000000000001", "exchange": "Paper",
               "action": "LONG", "symbol": "BINANCE:ethusdt", "position_size_usd": 100})
    }

    #[test]
    fn parses_and_normalises() {
        let a = parse_alert(&obj(base()), None).unwrap();
        assert_eq!(a.exchange, ExchangeKind::Paper);
        assert_eq!(a.action, Action::Buy);
        assert_eq!(a.symbol.as_str(), "ETHUSDT");
        assert_eq!(a.order_type, OrderType::Market);
        assert_eq!(a.position_size_usd, Some(Decimal::from(100)));
    }

    #[test]
    fn decimals_are_exact() {
        let body: Map<String, Value> = serde_json::from_str(
            r#"{"user_id":"0195f3d0-0000-7000-8000-000000000001","exchange":"aster","action":"buy",
                "symbol":"BTCUSDT","position_size_usd":0.1000000000000000055511151231257827,
                "order_type":"limit","price":"65000.10"}"#,
        )
        .unwrap();
        let a = parse_alert(&body, None).unwrap();
        assert_eq!(
            a.position_size_usd.unwrap().to_string(),
            "0.1000000000000000055511151231"
        );
        assert_eq!(a.price.unwrap().to_string(), "65000.1");
    }

    #[test]
    fn oanda_symbols() {
        assert_eq!(
            Symbol::parse("OANDA:eurusd", ExchangeKind::Oanda)
                .unwrap()
                .as_str(),
            "EUR_USD"
        );
        assert_eq!(
            Symbol::parse("EUR_USD", ExchangeKind::Oanda)
                .unwrap()
                .as_str(),
            "EUR_USD"
        );
        assert_eq!(
            Symbol::parse("EUR/USD", ExchangeKind::Oanda)
                .unwrap()
                .as_str(),
            "EUR_USD"
        );
    }

    #[test]
    fn every_problem_is_named() {
        let errs = parse_alert(
            &obj(
                json!({"user_id": "nope", "exchange": "kraken", "action": "hold",
                        "position_size_usd": -5, "order_type": "limit", "stop_loss_percent": 150}),
            ),
            None,
        )
        .unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "user_id",
            "exchange",
            "action",
            "symbol",
            "price",
            "position_size_usd",
            "stop_loss_percent",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }

    #[test]
    fn timestamps() {
        let mut b = base();
        b["timestamp"] = json!(1_700_000_000_000i64);
        assert!(parse_alert(&obj(b.clone()), None)
            .unwrap()
            .timestamp
            .is_some());
        b["timestamp"] = json!("2026-01-01T00:00:00Z");
        assert!(parse_alert(&obj(b.clone()), None)
            .unwrap()
            .timestamp
            .is_some());
        b["timestamp"] = json!("yesterday");
        assert_eq!(
            parse_alert(&obj(b), None).unwrap_err()[0].field,
            "timestamp"
        );
    }

    #[test]
    fn idempotency_header_is_the_fallback_alert_id() {
        let a = parse_alert(&obj(base()), Some("k1")).unwrap();
        assert_eq!(a.alert_id.as_deref(), Some("k1"));
        let mut b = base();
        b["alert_id"] = json!("a1");
        let a = parse_alert(&obj(b), Some("k1")).unwrap();
        assert_eq!(a.alert_id.as_deref(), Some("a1"));
    }
}
