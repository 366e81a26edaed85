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

    /// Is the broker Sparky's own database (the paper exchange)? Its orders are statements, so a
    /// job on it waits on nothing but Postgres.
    pub fn is_in_postgres(self) -> bool {
        self == ExchangeKind::Paper
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

impl FromStr for OrderType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "market" => Ok(OrderType::Market),
            "limit" => Ok(OrderType::Limit),
            other => Err(format!(
                "unknown order type `{other}`: expected market or limit"
            )),
        }
    }
}

impl OrderType {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderType::Market => "market",
            OrderType::Limit => "limit",
        }
    }
}

/// How an opening order's size is given. Exactly one per alert (or from its strategy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SizingMode {
    /// A notional in USD (the account currency): `quantity = usd / price`.
    PositionSizeUsd,
    /// Base units / contracts / shares / OANDA units, as given.
    Quantity,
    /// A share (0 < x <= 100) of the account's equity, spent as a USD notional.
    PercentOfEquity,
    /// The USD lost if the stop-loss is hit: `quantity = risk / stop distance`.
    RiskUsd,
    /// A share of equity (0 < x <= 100) lost if the stop-loss is hit.
    RiskPercent,
}

impl SizingMode {
    pub const ALL: [SizingMode; 5] = [
        SizingMode::PositionSizeUsd,
        SizingMode::Quantity,
        SizingMode::PercentOfEquity,
        SizingMode::RiskUsd,
        SizingMode::RiskPercent,
    ];
    /// The alert field (and `sizing_mode` column value) of this mode.
    pub fn as_str(self) -> &'static str {
        match self {
            SizingMode::PositionSizeUsd => "position_size_usd",
            SizingMode::Quantity => "quantity",
            SizingMode::PercentOfEquity => "percent_of_equity",
            SizingMode::RiskUsd => "risk_usd",
            SizingMode::RiskPercent => "risk_percent",
        }
    }
    /// The bound of the amount.
    pub fn bound(self) -> fn(Decimal) -> Result<(), String> {
        match self {
            SizingMode::PositionSizeUsd | SizingMode::RiskUsd => bounds::usd,
            SizingMode::Quantity => bounds::quantity,
            SizingMode::PercentOfEquity | SizingMode::RiskPercent => bounds::close_percent,
        }
    }
    /// Does this mode need a stop-loss to size?
    pub fn needs_stop_loss(self) -> bool {
        matches!(self, SizingMode::RiskUsd | SizingMode::RiskPercent)
    }
    /// Does this mode need the account's equity?
    pub fn needs_equity(self) -> bool {
        matches!(self, SizingMode::PercentOfEquity | SizingMode::RiskPercent)
    }
}

impl FromStr for SizingMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SizingMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown sizing mode `{s}`"))
    }
}

/// The size of an opening order: a mode and its amount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizing {
    pub mode: SizingMode,
    pub amount: Decimal,
}

/// A trailing stop-loss, as the alert gives its distance. Executed with the broker's native order
/// (OANDA `trailingStopLossOnFill`, Aster `TRAILING_STOP_MARKET`); see [`ExchangeKind::honours_trailing`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrailingStop {
    /// A percent of the price (`trailing_stop_percent`).
    Percent(Decimal),
    /// A distance in price units (`trailing_stop_distance`).
    Distance(Decimal),
    /// A distance in pips (`trailing_stop_pips`, OANDA: turned into a price distance with the
    /// instrument's `pipLocation`).
    Pips(Decimal),
}

impl TrailingStop {
    /// The alert field that gives it.
    pub fn field(self) -> &'static str {
        match self {
            TrailingStop::Percent(_) => "trailing_stop_percent",
            TrailingStop::Distance(_) => "trailing_stop_distance",
            TrailingStop::Pips(_) => "trailing_stop_pips",
        }
    }
}

impl ExchangeKind {
    /// Can this broker run `t` natively? `Err` says why not (the 400's message). Tradier's API has
    /// no trailing-stop order at all (exchanges.md); Aster's `TRAILING_STOP_MARKET` takes a callback
    /// rate in percent (0.1 to 5) only; OANDA takes a price distance (percent and pips are turned
    /// into one); paper records any of them (it runs no triggers).
    pub fn honours_trailing(self, t: TrailingStop) -> Result<(), String> {
        match (self, t) {
            (ExchangeKind::Tradier, _) => Err(
                "Tradier has no trailing-stop order; use stop_loss_percent or stop_loss_price".into(),
            ),
            (ExchangeKind::Aster, TrailingStop::Percent(p)) => {
                if p >= Decimal::new(1, 1) && p <= Decimal::from(5) {
                    Ok(())
                } else {
                    Err(format!("Aster's trailing stop takes a callback rate from 0.1 to 5 percent, got {p}"))
                }
            }
            (ExchangeKind::Aster, _) => Err(
                "Aster's trailing stop takes a percent only (trailing_stop_percent, 0.1 to 5)".into(),
            ),
            (ExchangeKind::Paper, TrailingStop::Pips(_)) => {
                Err("pips are an OANDA unit; on paper use trailing_stop_percent or trailing_stop_distance".into())
            }
            (ExchangeKind::Oanda | ExchangeKind::Paper, _) => Ok(()),
        }
    }
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
    /// The other sizing modes ([`SizingMode`]); at most one of these and `position_size_usd` is
    /// set ([`Alert::sizing`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantity: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent_of_equity: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk_usd: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk_percent: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_loss_percent: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub take_profit_percent: Option<Decimal>,
    /// Absolute protective prices (instead of the percents; never both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_loss_price: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub take_profit_price: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trailing_stop: Option<TrailingStop>,
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
    /// Fields of the webhook Sparky does not know: ignored, and listed here (in the job's record)
    /// so that a misspelt field is visible.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_fields: Vec<String>,
}

impl Alert {
    /// The size of the opening order, if the alert has one.
    pub fn sizing(&self) -> Option<Sizing> {
        let modes = [
            (SizingMode::PositionSizeUsd, self.position_size_usd),
            (SizingMode::Quantity, self.quantity),
            (SizingMode::PercentOfEquity, self.percent_of_equity),
            (SizingMode::RiskUsd, self.risk_usd),
            (SizingMode::RiskPercent, self.risk_percent),
        ];
        modes
            .into_iter()
            .find_map(|(mode, a)| a.map(|amount| Sizing { mode, amount }))
    }
    /// Does the alert ask for a stop-loss (a percent or a price)?
    pub fn has_stop_loss(&self) -> bool {
        self.stop_loss_percent.is_some() || self.stop_loss_price.is_some()
    }
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

    /// Largest `quantity`: 1 billion units.
    pub const MAX_QUANTITY: Decimal = Decimal::from_parts(1_000_000_000, 0, 0, false, 0);

    pub fn quantity(d: Decimal) -> Result<(), String> {
        if d > Decimal::ZERO && d <= MAX_QUANTITY {
            Ok(())
        } else {
            Err(format!(
                "must be greater than 0 and at most {MAX_QUANTITY}, got {d}"
            ))
        }
    }

    /// A trailing distance in price units or pips: like a price.
    pub fn distance(d: Decimal) -> Result<(), String> {
        price(d)
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
        let sizes = [
            (SizingMode::Quantity, self.quantity),
            (SizingMode::PercentOfEquity, self.percent_of_equity),
            (SizingMode::RiskUsd, self.risk_usd),
            (SizingMode::RiskPercent, self.risk_percent),
        ];
        for (m, v) in sizes {
            if let Some(v) = v {
                check(m.as_str(), m.bound()(v));
            }
        }
        let given = sizes.iter().filter(|(_, v)| v.is_some()).count()
            + usize::from(self.position_size_usd.is_some());
        if given > 1 {
            check(
                "position_size_usd",
                Err("only one size may be given".into()),
            );
        }
        for (field, p) in [
            ("stop_loss_price", self.stop_loss_price),
            ("take_profit_price", self.take_profit_price),
        ] {
            if let Some(p) = p {
                check(field, bounds::price(p));
            }
        }
        if let Some(t) = self.trailing_stop {
            let r = match t {
                TrailingStop::Percent(p) => bounds::percent(p),
                TrailingStop::Distance(d) | TrailingStop::Pips(d) => bounds::distance(d),
            };
            check(
                t.field(),
                r.and_then(|()| self.exchange.honours_trailing(t)),
            );
        }
        for f in &self.ignored_fields {
            check("ignored_fields", bounds::text(f));
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

/// The fields Sparky knows (besides the original Sparky's names in [`ALIASES`]). Any other field
/// is ignored and listed in [`Alert::ignored_fields`].
pub const KNOWN_FIELDS: &[&str] = &[
    "secret",
    "user_id",
    "exchange",
    "action",
    "symbol",
    "order_type",
    "price",
    "position_size_usd",
    "quantity",
    "percent_of_equity",
    "risk_usd",
    "risk_percent",
    "stop_loss_percent",
    "take_profit_percent",
    "stop_loss_price",
    "take_profit_price",
    "close_percent",
    "useTrailingStop",
    "trailing_stop_percent",
    "trailing_stop_distance",
    "trailing_stop_pips",
    "strategy_id",
    "strategy",
    "alert_id",
    "timestamp",
    "max_lag_secs",
    "environment",
];

/// The original Sparky's field names (and `sell_percentage`), and the field each stands for.
pub const ALIASES: &[(&str, &str)] = &[
    ("userId", "user_id"),
    ("orderType", "order_type"),
    ("positionSizeUsd", "position_size_usd"),
    ("stopLossPercent", "stop_loss_percent"),
    ("stopLoss", "stop_loss_percent"),
    ("takeProfitPercent", "take_profit_percent"),
    ("takeProfit", "take_profit_percent"),
    ("sell_percentage", "close_percent"),
];

/// The most unknown field names one job lists.
pub const MAX_IGNORED_FIELDS: usize = 32;

/// The body with the original Sparky's names ([`ALIASES`]) under Sparky's own. An alias and its
/// field both given with different values is an error naming both (never a silent choice).
pub fn canonical_body(
    body: &Map<String, Value>,
) -> Result<std::borrow::Cow<'_, Map<String, Value>>, Vec<FieldError>> {
    if !ALIASES.iter().any(|(alias, _)| body.contains_key(*alias)) {
        return Ok(std::borrow::Cow::Borrowed(body));
    }
    let mut out = body.clone();
    let mut errs = Vec::new();
    for (alias, field) in ALIASES {
        let Some(v) = out.remove(*alias) else {
            continue;
        };
        if !body_has_value(&v) {
            continue;
        }
        match out.get(*field) {
            Some(existing) if body_has_value(existing) && *existing != v => errs.push(FieldError {
                field: (*alias).into(),
                message: format!(
                    "is the original Sparky's name for `{field}`, which is also given with another value; send one of them"
                ),
            }),
            _ => {
                out.insert((*field).to_string(), v);
            }
        }
    }
    if errs.is_empty() {
        Ok(std::borrow::Cow::Owned(out))
    } else {
        Err(errs)
    }
}

/// Fields whose text still holds a TradingView placeholder (`{{strategy.order.action}}`): TradingView
/// did not replace it, which happens when a strategy template is pasted into a non-strategy alert.
pub fn unreplaced_placeholders(body: &Map<String, Value>) -> Vec<FieldError> {
    body.iter()
        .filter_map(|(k, v)| {
            let s = v.as_str()?;
            let open = s.find("{{")?;
            let close = s[open..].find("}}")? + open + 2;
            Some(FieldError {
                field: k.clone(),
                message: format!(
                    "holds the TradingView placeholder `{}`, which was not replaced: TradingView fills {{{{strategy.*}}}} placeholders only in alerts created from a strategy; send the value itself or create the alert from the strategy",
                    s[open..close].chars().take(64).collect::<String>()
                ),
            })
        })
        .collect()
}

/// Validate every field of a webhook body. `idempotency_key` is the `Idempotency-Key` header, used
/// when the body has no `alert_id`. `user_id` is required.
pub fn parse_alert(
    body: &Map<String, Value>,
    idempotency_key: Option<&str>,
) -> Result<Alert, Vec<FieldError>> {
    parse_alert_for(body, idempotency_key, None)
}

/// [`parse_alert`] for a webhook whose secret belongs to `owner`: an absent `user_id` is the
/// owner (a present one is parsed, and the caller checks that it is the owner).
pub fn parse_alert_for(
    body: &Map<String, Value>,
    idempotency_key: Option<&str>,
    owner: Option<Uuid>,
) -> Result<Alert, Vec<FieldError>> {
    let original = body;
    let body = canonical_body(original)?;
    let body: &Map<String, Value> = &body;
    let mut errs = unreplaced_placeholders(original);
    if !errs.is_empty() {
        // A placeholder makes every other problem of its field moot: name it alone.
        return Err(errs);
    }
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
        Ok(None) if owner.is_some() => owner,
        Ok(None) => {
            bad("user_id", "is required".into());
            None
        }
        Err(m) => {
            bad("user_id", m);
            None
        }
    };
    let exchange = match text(body, "exchange") {
        Ok(Some(s)) => s
            .parse::<ExchangeKind>()
            .map_err(|m| bad("exchange", m))
            .ok(),
        Ok(None) => {
            bad(
                "exchange",
                "is required: send `exchange` in the alert, or set it on the alert's strategy (`sparky strategy set --user U --name N --exchange E`)".into(),
            );
            None
        }
        Err(m) => {
            bad("exchange", m);
            None
        }
    };
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
        Ok(Some(s)) => s
            .parse::<OrderType>()
            .map_err(|m| bad("order_type", m))
            .ok(),
        Err(m) => {
            bad("order_type", m);
            None
        }
    };
    let price = bounded_decimal(body, "price", bounds::price, &mut bad);
    if order_type == Some(OrderType::Limit) && price.is_none() && !body_has(body, "price") {
        bad("price", "is required for limit orders".into());
    }
    let sizes: Vec<(SizingMode, Option<Decimal>)> = SizingMode::ALL
        .into_iter()
        .map(|m| (m, bounded_decimal(body, m.as_str(), m.bound(), &mut bad)))
        .collect();
    let given: Vec<SizingMode> = SizingMode::ALL
        .into_iter()
        .filter(|m| body_has(body, m.as_str()))
        .collect();
    if given.len() > 1 {
        let names: Vec<&str> = given.iter().map(|m| m.as_str()).collect();
        for m in &given[1..] {
            bad(
                m.as_str(),
                format!(
                    "only one size may be given, got {}; send one",
                    names.join(", ")
                ),
            );
        }
    }
    if matches!(action, Some(Action::Buy | Action::Sell)) && given.is_empty() {
        bad(
            "position_size_usd",
            "a buy or sell needs a size: send one of position_size_usd, quantity, percent_of_equity, risk_usd or risk_percent, or set a default size on the alert's strategy (`sparky strategy set --user U --name N --position-size-usd X`)".into(),
        );
    }
    let size_of = |m: SizingMode| sizes.iter().find(|(k, _)| *k == m).and_then(|(_, v)| *v);
    let stop_loss_percent = bounded_decimal(body, "stop_loss_percent", bounds::percent, &mut bad);
    let take_profit_percent =
        bounded_decimal(body, "take_profit_percent", bounds::percent, &mut bad);
    let stop_loss_price = bounded_decimal(body, "stop_loss_price", bounds::price, &mut bad);
    let take_profit_price = bounded_decimal(body, "take_profit_price", bounds::price, &mut bad);
    for (pct, abs) in [
        ("stop_loss_percent", "stop_loss_price"),
        ("take_profit_percent", "take_profit_price"),
    ] {
        if body_has(body, pct) && body_has(body, abs) {
            bad(abs, format!("give `{pct}` or `{abs}`, not both"));
        }
    }
    if matches!(action, Some(Action::Buy | Action::Sell)) {
        for m in &given {
            if m.needs_stop_loss()
                && !body_has(body, "stop_loss_percent")
                && !body_has(body, "stop_loss_price")
            {
                bad(
                    m.as_str(),
                    "sizes the order by what its stop-loss would lose, so it needs stop_loss_percent or stop_loss_price (in the alert or its strategy)".into(),
                );
            }
        }
    }
    let trailing_stop = parse_trailing(body, exchange, &mut bad);
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
        position_size_usd: size_of(SizingMode::PositionSizeUsd),
        quantity: size_of(SizingMode::Quantity),
        percent_of_equity: size_of(SizingMode::PercentOfEquity),
        risk_usd: size_of(SizingMode::RiskUsd),
        risk_percent: size_of(SizingMode::RiskPercent),
        stop_loss_percent,
        take_profit_percent,
        stop_loss_price,
        take_profit_price,
        trailing_stop,
        close_percent,
        strategy_id,
        strategy,
        alert_id,
        timestamp,
        max_lag_secs,
        limit_ttl_secs,
        environment,
        ignored_fields: ignored_fields(original),
    })
}

/// The trailing stop of an alert: Sparky's `trailing_stop_percent` / `trailing_stop_distance` /
/// `trailing_stop_pips`, or the original's `useTrailingStop: true` with one of them. With
/// `useTrailingStop: false` the distances are not used. One the broker cannot run is an error
/// naming the field ([`ExchangeKind::honours_trailing`]).
fn parse_trailing(
    body: &Map<String, Value>,
    exchange: Option<ExchangeKind>,
    bad: &mut impl FnMut(&str, String),
) -> Option<TrailingStop> {
    let wanted = match body.get("useTrailingStop") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("true") => Some(true),
        Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("false") => Some(false),
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(other) => {
            bad(
                "useTrailingStop",
                format!("must be true or false, got {}", type_name(other)),
            );
            return None;
        }
    };
    if wanted == Some(false) {
        return None;
    }
    type Make = fn(Decimal) -> TrailingStop;
    type Bound = fn(Decimal) -> Result<(), String>;
    let kinds: [(&str, Bound, Make); 3] = [
        (
            "trailing_stop_percent",
            bounds::percent,
            TrailingStop::Percent,
        ),
        (
            "trailing_stop_distance",
            bounds::distance,
            TrailingStop::Distance,
        ),
        ("trailing_stop_pips", bounds::distance, TrailingStop::Pips),
    ];
    let mut found = Vec::new();
    for (field, bound, make) in kinds {
        if let Some(d) = bounded_decimal(body, field, bound, bad) {
            found.push(make(d));
        }
    }
    if found.len() > 1 {
        bad(
            found[1].field(),
            "only one trailing-stop distance may be given".into(),
        );
        return None;
    }
    let Some(t) = found.pop() else {
        if wanted == Some(true) {
            bad(
                "useTrailingStop",
                "needs its distance: trailing_stop_pips, trailing_stop_percent or trailing_stop_distance".into(),
            );
        }
        return None;
    };
    if let Some(ex) = exchange {
        if let Err(m) = ex.honours_trailing(t) {
            bad(t.field(), format!("cannot be honoured on {ex}: {m}"));
            return None;
        }
    }
    Some(t)
}

/// The names of a body's fields that Sparky does not know (sorted; at most
/// [`MAX_IGNORED_FIELDS`], and only names that are printable text of bounded length).
fn ignored_fields(body: &Map<String, Value>) -> Vec<String> {
    let mut v: Vec<String> = body
        .keys()
        .filter(|k| !KNOWN_FIELDS.contains(&k.as_str()) && !ALIASES.iter().any(|(a, _)| a == k))
        .filter(|k| k.chars().count() <= 64 && bounds::text(k).is_ok())
        .take(MAX_IGNORED_FIELDS)
        .cloned()
        .collect();
    v.sort();
    v
}

/// A JSON value that counts as given (not null, not blank text).
fn body_has_value(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::String(s) => !s.trim().is_empty(),
        _ => true,
    }
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
    fn original_names_are_aliases_and_conflicts_are_named() {
        let a = parse_alert(
            &obj(json!({"userId": "0195f3d0-0000-7000-8000-000000000001", "exchange": "oanda",
                "action": "buy", "symbol": "EURUSD", "orderType": "limit", "price": "1.08",
                "positionSizeUsd": 100, "stopLoss": 1, "takeProfitPercent": 2, "sell_percentage": 50,
                "note": "x"})),
            None,
        )
        .unwrap();
        assert_eq!(a.order_type, OrderType::Limit);
        assert_eq!(a.position_size_usd, Some(Decimal::from(100)));
        assert_eq!(a.stop_loss_percent, Some(Decimal::ONE));
        assert_eq!(a.take_profit_percent, Some(Decimal::TWO));
        assert_eq!(a.close_percent, Some(Decimal::from(50)));
        assert_eq!(a.ignored_fields, vec!["note".to_string()]);
        let mut b = base();
        b["stopLoss"] = json!(1);
        b["stop_loss_percent"] = json!(2);
        assert_eq!(parse_alert(&obj(b), None).unwrap_err()[0].field, "stopLoss");
    }

    #[test]
    fn placeholders_and_trailing_stops() {
        let mut b = base();
        b["action"] = json!("{{strategy.order.action}}");
        let e = parse_alert(&obj(b), None).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].field, "action");
        assert!(e[0].message.contains("not replaced"), "{}", e[0].message);

        let mut b = base();
        b["exchange"] = json!("oanda");
        b["useTrailingStop"] = json!(true);
        b["trailing_stop_pips"] = json!(30);
        let a = parse_alert(&obj(b.clone()), None).unwrap();
        assert_eq!(a.trailing_stop, Some(TrailingStop::Pips(Decimal::from(30))));
        b["useTrailingStop"] = json!(false);
        assert_eq!(
            parse_alert(&obj(b.clone()), None).unwrap().trailing_stop,
            None
        );
        b["exchange"] = json!("tradier");
        b["useTrailingStop"] = json!("true");
        assert_eq!(
            parse_alert(&obj(b), None).unwrap_err()[0].field,
            "trailing_stop_pips"
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
