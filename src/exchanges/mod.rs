//! The exchange boundary: one [`Exchange`] trait the executor uses, one error type with the taxonomy
//! every client maps its failures into, and the factory that turns a `bot_credentials` row into a
//! client.
//!
//! Error taxonomy ([`ErrorClass`]):
//! - `Transient`: nothing was executed (connect error, timeout before sending, 5xx, 429/418) -> retry
//!   with backoff, honouring `retry_after`.
//! - `Unknown`: the request may have been executed (timeout after sending, 503, Aster -1007) -> look
//!   the order up by its client order id and resend only if it does not exist.
//! - `Permanent`: retrying cannot help (auth, margin, invalid symbol, precision, min notional) -> the
//!   job is `rejected` with the broker's own message.

pub mod aster;
pub mod http;
pub mod metered;
pub mod oanda;
mod once;
pub mod paper;
pub mod recorded;
pub mod tradier;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use crate::config::Config;
use crate::credentials::Credentials;
use crate::domain::{ExchangeKind, OrderSide, OrderType, Side, Symbol, TrailingStop};
use crate::store::Store;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorClass {
    Transient,
    Unknown,
    Permanent,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Unknown => "unknown",
            ErrorClass::Permanent => "permanent",
        }
    }
}

impl From<ErrorClass> for crate::job::FailureClass {
    fn from(c: ErrorClass) -> Self {
        match c {
            ErrorClass::Transient => crate::job::FailureClass::Transient,
            ErrorClass::Unknown => crate::job::FailureClass::Unknown,
            ErrorClass::Permanent => crate::job::FailureClass::Permanent,
        }
    }
}

/// A failure of an exchange call. `message` is the broker's own text where there is one; it never
/// contains credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangeError {
    pub class: ErrorClass,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ExchangeError {
    pub fn transient(message: impl Into<String>) -> Self {
        ExchangeError {
            class: ErrorClass::Transient,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn unknown(message: impl Into<String>) -> Self {
        ExchangeError {
            class: ErrorClass::Unknown,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        ExchangeError {
            class: ErrorClass::Permanent,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// Arithmetic on an order's numbers that does not fit a decimal: the order cannot be made, ever.
impl From<crate::money::Overflow> for ExchangeError {
    fn from(e: crate::money::Overflow) -> Self {
        ExchangeError::permanent(format!("order arithmetic failed: {e}"))
    }
}

impl fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.class.as_str(), self.message)
    }
}

impl std::error::Error for ExchangeError {}

/// Which order of a job this is. Part of the client order id, so every retry of one leg carries the
/// same id and a job can never produce two orders for one leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Leg {
    Open,
    Close,
    /// A second close order, for what the first one left open (a partial fill).
    Close2,
    /// The third and last close order of a job.
    Close3,
    StopLoss,
    TakeProfit,
}

impl Leg {
    /// The close orders one job may send, in order: a close that fills only partly is followed by
    /// the next, for what remains, until the position is where the job wants it (at most three).
    pub const CLOSES: [Leg; 3] = [Leg::Close, Leg::Close2, Leg::Close3];

    pub fn as_str(self) -> &'static str {
        match self {
            Leg::Open => "open",
            Leg::Close => "close",
            Leg::Close2 => "close2",
            Leg::Close3 => "close3",
            Leg::StopLoss => "sl",
            Leg::TakeProfit => "tp",
        }
    }

    pub fn is_close(self) -> bool {
        matches!(self, Leg::Close | Leg::Close2 | Leg::Close3)
    }

    pub fn is_protective(self) -> bool {
        matches!(self, Leg::StopLoss | Leg::TakeProfit)
    }
}

/// The client order id of a job's leg: `sp` + the job id as 32 hex digits + one letter for the leg
/// (`o`pen, `c`lose, `d`/`e` the second and third close, `s`top-loss, `t`ake-profit): 35
/// characters, letters and digits only, so it is valid for Aster (`^[.A-Z:/a-z0-9_-]{1,36}$`),
/// OANDA client ids and Tradier tags alike. [`parse_client_order_id`] reads it back: an order at
/// the broker is Sparky's exactly when its id parses.
pub fn client_order_id(job_id: Uuid, leg: Leg) -> String {
    format!("sp{}{}", job_id.simple(), leg_letter(leg))
}

const LEG_LETTERS: [(Leg, char); 6] = [
    (Leg::Open, 'o'),
    (Leg::Close, 'c'),
    (Leg::Close2, 'd'),
    (Leg::Close3, 'e'),
    (Leg::StopLoss, 's'),
    (Leg::TakeProfit, 't'),
];

fn leg_letter(leg: Leg) -> char {
    LEG_LETTERS
        .iter()
        .find(|(l, _)| *l == leg)
        .map(|(_, c)| *c)
        .expect("every leg has a letter")
}

/// The job and leg of a Sparky client order id; `None` for any other id (an order the user placed
/// by hand, or another program's).
pub fn parse_client_order_id(id: &str) -> Option<(Uuid, Leg)> {
    let rest = id.strip_prefix("sp")?;
    if rest.len() != 33 || !rest.is_ascii() {
        return None;
    }
    let (hex, letter) = rest.split_at(32);
    let letter = letter.chars().next()?;
    let leg = LEG_LETTERS.iter().find(|(_, c)| *c == letter)?.0;
    let job = Uuid::try_parse(hex).ok()?;
    Some((job, leg))
}

/// When the job behind a client order id was created, read from the id itself: `sp` + a UUIDv7 as
/// 32 hex digits (+ leg letters), and a UUIDv7 starts with its Unix time in milliseconds (48 bits,
/// RFC 9562). `None` for an id of another shape or another UUID version. Job ids are made when the
/// alert is accepted, so this is the earliest time any order of the job can exist.
pub fn client_order_id_time(client_order_id: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let hex = client_order_id.strip_prefix("sp")?.get(..32)?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = Uuid::try_parse(hex).ok()?;
    if id.get_version_num() != 7 {
        return None;
    }
    let b = id.as_bytes();
    let ms = b[..6]
        .iter()
        .fold(0i64, |acc, x| (acc << 8) | i64::from(*x));
    chrono::DateTime::from_timestamp_millis(ms)
}

/// The client order id of another leg of the same job as `client_order_id`.
pub fn sibling_client_order_id(client_order_id: &str, leg: Leg) -> String {
    let stem = client_order_id
        .strip_suffix(|c: char| c.is_ascii_lowercase())
        .unwrap_or(client_order_id);
    format!("{stem}{}", leg_letter(leg))
}

/// Trading rules of a symbol (defined with the rounding that applies them, in [`crate::sizing`]).
pub use crate::sizing::SymbolRules;

/// An open position as the exchange reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExPosition {
    pub side: Side,
    pub quantity: Decimal,
    pub entry_price: Option<Decimal>,
}

impl ExPosition {
    /// A position from a signed net quantity (positive long, negative short); `None` when flat.
    pub fn from_signed(net: Decimal, entry_price: Option<Decimal>) -> Option<ExPosition> {
        if net.is_zero() {
            return None;
        }
        Some(ExPosition {
            side: if net > Decimal::ZERO {
                Side::Long
            } else {
                Side::Short
            },
            quantity: net.abs().normalize(),
            entry_price,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderRequest {
    pub symbol: Symbol,
    pub side: OrderSide,
    pub quantity: Decimal,
    pub order_type: OrderType,
    pub limit_price: Option<Decimal>,
    pub reduce_only: bool,
    pub leg: Leg,
    pub client_order_id: String,
    /// Stop-loss / take-profit prices to attach to the fill, for exchanges that
    /// [`Exchange::protects_on_fill`] (OANDA's `stopLossOnFill` / `takeProfitOnFill`).
    pub on_fill: Option<OnFill>,
}

/// Protective prices sent with an opening order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnFill {
    pub stop_loss: Option<Decimal>,
    pub take_profit: Option<Decimal>,
    /// A trailing stop-loss: a price distance ([`TrailingStop::Distance`], the executor turns a
    /// percent into one at the reference price) or pips (the client knows the pip size).
    pub trailing_stop: Option<TrailingStop>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderState {
    /// Completely filled.
    Filled,
    /// Final with only part filled (`filled_qty` < ordered): the rest was cancelled or expired and
    /// will never fill (an Aster market order `EXPIRED` with a partial `executedQty`; a Tradier
    /// order `canceled` after `partially_filled`).
    PartiallyFilled,
    /// Accepted and still working at the broker: nothing or only part filled so far (a resting
    /// limit order, a Tradier order outside market hours).
    Accepted,
}

impl OrderState {
    /// Is the order final (nothing more will fill)?
    pub fn is_final(self) -> bool {
        !matches!(self, OrderState::Accepted)
    }
}

/// An order resting at the broker (not final), as [`Exchange::open_orders`] lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenOrder {
    pub exchange_order_id: String,
    /// The client order id (Aster `clientOrderId`, OANDA `clientExtensions.id`, Tradier `tag`).
    pub client_order_id: Option<String>,
    pub side: OrderSide,
    /// `None` for an order that closes whatever is open (Aster `closePosition=true`).
    pub quantity: Option<Decimal>,
    /// What the order does: protective levels (a Tradier OCO carries both), or an entry's limit.
    pub stop_loss: Option<Decimal>,
    pub take_profit: Option<Decimal>,
    pub limit_price: Option<Decimal>,
}

impl OpenOrder {
    /// The Sparky job and leg that placed it; `None` when Sparky did not.
    pub fn sparky_leg(&self) -> Option<(Uuid, Leg)> {
        self.client_order_id
            .as_deref()
            .and_then(parse_client_order_id)
    }
}

/// An order a job leaves resting at the broker (a protective order, or a working entry): recorded
/// in `broker_orders` with the job's commit, so later jobs, the working-order follower and the
/// reconciliation know what is Sparky's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RestingOrder {
    pub leg: Leg,
    pub client_order_id: String,
    pub exchange_order_id: Option<String>,
    pub side: OrderSide,
    pub quantity: Decimal,
    /// The trigger (stop-loss, take-profit) or limit (entry) price.
    pub price: Option<Decimal>,
}

/// The exchange's answer to an order (or to a look-up of one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderAck {
    pub exchange_order_id: String,
    pub client_order_id: String,
    pub state: OrderState,
    pub filled_qty: Decimal,
    pub avg_price: Option<Decimal>,
    /// What the broker charged for what filled, in the account currency (a cost is positive),
    /// where it says: OANDA's fill `commission` + `guaranteedExecutionFee` - `financing`; Aster's
    /// `userTrades` commissions in the quote asset. `None` where the broker does not say (Tradier,
    /// paper) or it could not be read.
    pub fee: Option<Decimal>,
}

/// Protective orders to attach to a newly opened position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protection {
    pub symbol: Symbol,
    /// The side of the position they protect.
    pub position_side: Side,
    pub quantity: Decimal,
    pub stop_loss: Option<Decimal>,
    pub take_profit: Option<Decimal>,
    /// A native trailing stop, as the alert gave it (the ingress checked the broker can run it).
    pub trailing_stop: Option<TrailingStop>,
    pub job_id: Uuid,
}

/// What the executor needs from an exchange.
#[async_trait]
pub trait Exchange: Send + Sync {
    fn kind(&self) -> ExchangeKind;
    async fn symbol_rules(&self, symbol: &Symbol) -> Result<SymbolRules, ExchangeError>;
    /// The current price (last trade or mid).
    async fn price(&self, symbol: &Symbol) -> Result<Decimal, ExchangeError>;
    /// The open position in `symbol`, if any.
    async fn position(&self, symbol: &Symbol) -> Result<Option<ExPosition>, ExchangeError>;
    async fn place_order(&self, order: &OrderRequest) -> Result<OrderAck, ExchangeError>;
    /// Close `position` entirely (reduce-only) with the given client order id.
    async fn close_position(
        &self,
        symbol: &Symbol,
        position: &ExPosition,
        client_order_id: &str,
    ) -> Result<OrderAck, ExchangeError>;
    /// Look an order up by its client order id; `None` if the exchange has no such order, or it
    /// ended with nothing filled (cancelled, expired, rejected: it had no effect).
    async fn find_order(
        &self,
        symbol: &Symbol,
        client_order_id: &str,
    ) -> Result<Option<OrderAck>, ExchangeError>;
    /// The account's equity in its currency (balance plus unrealized PnL: Aster
    /// `totalMarginBalance`, OANDA `NAV`, Tradier `total_equity`; paper: its simulated balance),
    /// for `percent_of_equity` and `risk_percent` sizing.
    async fn equity(&self) -> Result<Decimal, ExchangeError>;
    /// Place exchange-native stop-loss / take-profit orders for a position (with the client order
    /// ids of the job's `sl` / `tp` legs); returns what now rests at the broker.
    async fn protect(&self, protection: &Protection) -> Result<Vec<RestingOrder>, ExchangeError>;
    /// The orders resting at the broker in `symbol` (anyone's: callers pick Sparky's by
    /// [`OpenOrder::sparky_leg`]).
    async fn open_orders(&self, symbol: &Symbol) -> Result<Vec<OpenOrder>, ExchangeError>;
    /// Does [`Exchange::open_orders`] list every order still working, whenever it was placed?
    /// Tradier's listing is the current session's (`GET /orders`), so a GTC order placed on an
    /// earlier day may be missing from it: callers then also look up, by id, the orders Sparky
    /// recorded as resting ([`Exchange::open_order_by_id`], [`recorded::RecordedOrders`]).
    fn lists_every_open_order(&self) -> bool {
        true
    }
    /// The order with this broker id, if it is still working (`None`: final, or unknown). Only
    /// needed where [`Exchange::lists_every_open_order`] is false; elsewhere the listing has it.
    async fn open_order_by_id(
        &self,
        symbol: &Symbol,
        exchange_order_id: &str,
    ) -> Result<Option<OpenOrder>, ExchangeError> {
        let _ = (symbol, exchange_order_id);
        Ok(None)
    }
    /// Cancel one resting order. An order that is already final (filled or cancelled meanwhile) is
    /// not an error: callers confirm with [`Exchange::open_orders`] and read the position.
    async fn cancel_order(&self, symbol: &Symbol, order: &OpenOrder) -> Result<(), ExchangeError>;
    /// Does this exchange attach stop-loss / take-profit to the opening order itself
    /// ([`OrderRequest::on_fill`]) instead of placing them after the fill with [`Exchange::protect`]?
    fn protects_on_fill(&self) -> bool {
        false
    }
    /// The account's position in `symbol` as Sparky's store holds it, read by the caller together
    /// with other data (issue 17: a paper buy or sell reads it with its risk limits). An
    /// exchange whose book is that store (paper) uses it for this client's life (one job) instead
    /// of reading it again; any other ignores it.
    fn prime_stored_position(&self, symbol: &Symbol, stored: Option<crate::store::PositionRow>) {
        let _ = (symbol, stored);
    }
}

/// What the factory needs besides the credentials.
#[derive(Clone)]
pub struct ExchangeContext {
    pub store: Store,
    pub http: reqwest::Client,
    pub aster_base_url: Option<String>,
    pub oanda_base_url: Option<String>,
    pub tradier_base_url: Option<String>,
    /// State that outlives one job's client (clients are built per job): symbol rules and the
    /// Aster clock offset.
    pub shared: Arc<SharedState>,
}

/// How long fetched symbol rules (Aster `exchangeInfo`, OANDA instruments) are reused.
pub const RULES_TTL: Duration = Duration::from_secs(600);

/// A small TTL cache shared by every client of one worker.
pub struct TtlCache<V> {
    entries: Mutex<HashMap<String, (Instant, V)>>,
    ttl: Duration,
}

impl<V: Clone> TtlCache<V> {
    pub fn new(ttl: Duration) -> Self {
        TtlCache {
            entries: Mutex::new(HashMap::new()),
            ttl,
        }
    }
    pub fn get(&self, key: &str) -> Option<V> {
        let map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, v)| v.clone())
    }
    pub fn put(&self, key: String, value: V) {
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(key, (Instant::now(), value));
    }
}

/// Caches shared by all clients built from one [`ExchangeContext`].
pub struct SharedState {
    /// `{base url}|{symbol}` -> Aster filters.
    pub aster_rules: TtlCache<aster::AsterRules>,
    /// `{base url}` -> server time minus local time, in ms (Aster -1021 handling).
    pub aster_clock_offset_ms: TtlCache<i64>,
    /// `{base url}|{account}|{instrument}` -> OANDA instrument rules.
    pub oanda_rules: TtlCache<SymbolRules>,
}

impl Default for SharedState {
    fn default() -> Self {
        SharedState {
            aster_rules: TtlCache::new(RULES_TTL),
            aster_clock_offset_ms: TtlCache::new(Duration::from_secs(3600)),
            oanda_rules: TtlCache::new(RULES_TTL),
        }
    }
}

impl ExchangeContext {
    pub fn new(config: &Config, store: Store) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(config.exchange_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .expect("the HTTP client builds");
        ExchangeContext {
            store,
            http,
            aster_base_url: config.aster_base_url.clone(),
            oanda_base_url: config.oanda_base_url.clone(),
            tradier_base_url: config.tradier_base_url.clone(),
            shared: Arc::new(SharedState::default()),
        }
    }
}

/// Builds the client for one job from the user's credentials. The worker's factory is the
/// [`ExchangeContext`] (the real clients and the paper exchange); tests put in their own to inject
/// behaviour no real broker shows on demand (a client that panics, one that blocks).
pub trait ExchangeFactory: Send + Sync {
    fn build(&self, creds: &Credentials) -> Result<Box<dyn Exchange>, ExchangeError>;

    /// Whether the clients this builds for `exchange` keep their orders in Sparky's own database,
    /// written by the job's commit (the paper exchange), so that no order exists before the
    /// commit does: a first delivery of such a job needs no start recorded before it executes
    /// (`worker::job::Start`).
    fn orders_are_commits(&self, exchange: ExchangeKind) -> bool;
}

impl ExchangeFactory for ExchangeContext {
    fn build(&self, creds: &Credentials) -> Result<Box<dyn Exchange>, ExchangeError> {
        build_exchange(creds, self)
    }

    fn orders_are_commits(&self, exchange: ExchangeKind) -> bool {
        exchange.is_in_postgres()
    }
}

/// Build the client for a user's credentials.
pub fn build_exchange(
    creds: &Credentials,
    ctx: &ExchangeContext,
) -> Result<Box<dyn Exchange>, ExchangeError> {
    match creds.exchange {
        ExchangeKind::Paper => Ok(Box::new(paper::PaperExchange::new(
            ctx.store.clone(),
            creds,
        ))),
        ExchangeKind::Aster => Ok(Box::new(aster::AsterClient::new(creds, ctx)?)),
        ExchangeKind::Oanda => Ok(Box::new(oanda::OandaClient::new(creds, ctx)?)),
        ExchangeKind::Tradier => Ok(recorded::RecordedOrders::wrap(
            Box::new(tradier::TradierClient::new(creds, ctx)?),
            ctx.store.clone(),
            creds,
        )),
    }
}

/// The bearer token of a token-based broker (OANDA, Tradier): `api_key`, or `api_secret` when
/// `api_key` is empty (rows written with the token in the secret column still work).
pub(crate) fn bearer_token(
    creds: &Credentials,
) -> Result<crate::secrets::SecretString, ExchangeError> {
    let t = if creds.api_key.expose().trim().is_empty() {
        &creds.api_secret
    } else {
        &creds.api_key
    };
    if t.expose().trim().is_empty() {
        return Err(ExchangeError::permanent(format!(
            "the {} credentials have no access token (set it as the api key)",
            creds.exchange
        )));
    }
    Ok(crate::secrets::SecretString::new(t.expose().trim()))
}

/// The account id a broker needs (OANDA, Tradier), from `bot_credentials.account_id`.
pub(crate) fn account_id(creds: &Credentials) -> Result<String, ExchangeError> {
    match creds.account_id.as_deref().map(str::trim) {
        Some(a) if !a.is_empty() => Ok(a.to_string()),
        _ => Err(ExchangeError::permanent(format!(
            "the {} credentials have no account id; set it with `sparky credentials set --account-id`",
            creds.exchange
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_order_ids_fit_every_exchange() {
        let job = Uuid::now_v7();
        for (leg, _) in LEG_LETTERS {
            let id = client_order_id(job, leg);
            assert!(id.len() <= 36, "{id}");
            assert!(id.chars().all(|c| c.is_ascii_alphanumeric()), "{id}");
            assert_eq!(id, client_order_id(job, leg), "deterministic");
            assert_eq!(parse_client_order_id(&id), Some((job, leg)));
        }
        for other in [
            "",
            "sp",
            "abc",
            "sp123",
            &format!("sp{}x", job.simple()),
            &format!("xx{}o", job.simple()),
            "spé",
        ] {
            assert_eq!(parse_client_order_id(other), None, "{other}");
        }
        assert_ne!(
            client_order_id(job, Leg::Open),
            client_order_id(job, Leg::Close)
        );
        assert_eq!(
            sibling_client_order_id(&client_order_id(job, Leg::Open), Leg::StopLoss),
            client_order_id(job, Leg::StopLoss)
        );
    }

    #[test]
    fn a_client_order_id_tells_when_its_job_was_created() {
        // A fixed UUIDv7 whose first 48 bits are 0x0193_7a3c_2a00 ms = 2024-11-29T23:23:03.552Z.
        let job = Uuid::parse_str("01937a3c-2a00-7abc-8def-0123456789ab").unwrap();
        let t = client_order_id_time(&client_order_id(job, Leg::StopLoss)).unwrap();
        assert_eq!(t.timestamp_millis(), 0x0193_7a3c_2a00);
        assert_eq!(t.to_rfc3339(), "2024-11-29T23:23:03.552+00:00");
        // A fresh job id: now, to the millisecond.
        let before = chrono::Utc::now().timestamp_millis();
        let id = client_order_id(Uuid::now_v7(), Leg::Open);
        let t = client_order_id_time(&id).unwrap().timestamp_millis();
        assert!(t >= before && t <= chrono::Utc::now().timestamp_millis());
        // Not one of Sparky's ids, or not a UUIDv7: no time.
        assert_eq!(client_order_id_time("x1"), None);
        assert_eq!(client_order_id_time("spxau"), None);
        assert_eq!(
            client_order_id_time(&client_order_id(Uuid::new_v4(), Leg::Open)),
            None
        );
        assert_eq!(
            client_order_id_time("sp01937a3c2a007abc8def0123456789zz"),
            None
        );
    }
}
