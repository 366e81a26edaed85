//! The built-in paper exchange: the local default, so the whole pipeline runs with no broker account.
//!
//! - Prices and lot sizes are deterministic per symbol: a few well-known symbols have fixed values
//!   ([`KNOWN`]); any other symbol gets a price derived from a hash of its name (so a test or a demo
//!   always sees the same numbers).
//! - Market orders fill at once at the paper price. Limit orders fill at once at the paper price when
//!   they are marketable (buy limit >= price, sell limit <= price); a paper exchange keeps no order
//!   book, so a non-marketable limit order is rejected with a message saying so.
//! - Orders below the minimum quantity or notional, or not a multiple of the step, are rejected.
//! - Its account is the user's **paper account** in Sparky's own tables: the position it reports is
//!   the stored row of the account (user, `paper`, environment) and nothing else — never a row of a
//!   live account (Aster, OANDA, Tradier) in the same symbol — and an order look-up by client order
//!   id reads `trades`. Since those rows are written in the same transaction as the job's final
//!   state, a paper order that was "placed" by a worker that crashed before committing never
//!   existed, and a redelivery places it again: exactly once. (Keeping the paper book in the same
//!   commit also keeps the paper pipeline at one transaction per job; a separate paper ledger would
//!   add a second.) Within the job, the client (built per job) adds the orders it filled so far to
//!   the committed book, so a position read after a close sees the close, as on a real broker.

use async_trait::async_trait;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

use super::{
    ExPosition, Exchange, ExchangeError, OpenOrder, OrderAck, OrderRequest, OrderState, Protection,
    RestingOrder, SymbolRules,
};
use crate::credentials::Credentials;
use crate::domain::{Account, ExchangeKind, OrderSide, OrderType, Symbol};
use crate::store::{PositionRow, Store};

/// (symbol, price, step, min notional)
pub const KNOWN: &[(&str, Decimal, Decimal, Decimal)] = &[
    ("BTCUSDT", dec!(65000), dec!(0.001), dec!(5)),
    ("ETHUSDT", dec!(3000), dec!(0.001), dec!(5)),
    ("SOLUSDT", dec!(150), dec!(0.01), dec!(5)),
    ("EUR_USD", dec!(1.0850), dec!(1), dec!(0)),
    ("GBP_USD", dec!(1.2700), dec!(1), dec!(0)),
    ("USD_JPY", dec!(150.25), dec!(1), dec!(0)),
    ("AAPL", dec!(190), dec!(1), dec!(0)),
    ("SPY", dec!(500), dec!(1), dec!(0)),
];

/// The paper rules and price of a symbol.
pub fn paper_market(symbol: &str) -> (Decimal, SymbolRules) {
    if let Some((_, price, step, min_notional)) = KNOWN.iter().find(|(s, ..)| *s == symbol) {
        return (
            *price,
            SymbolRules {
                step: *step,
                min_qty: *step,
                min_notional: *min_notional,
                tick: dec!(0.01),
            },
        );
    }
    // FNV-1a of the name: a stable price between 1.00 and 999.99, step 0.01, min notional 1.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in symbol.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    let cents = 100 + (h % 99_900);
    (
        Decimal::new(cents as i64, 2),
        SymbolRules {
            step: dec!(0.01),
            min_qty: dec!(0.01),
            min_notional: dec!(1),
            tick: dec!(0.01),
        },
    )
}

pub struct PaperExchange {
    store: Store,
    account: Account,
    /// The orders this client filled (this job's, not committed yet): symbol, client order id,
    /// signed quantity (positive buys), price.
    filled: std::sync::Mutex<Vec<(String, OrderAck, Decimal)>>,
    /// The stored position of one symbol, read by the job with its risk limits
    /// ([`Exchange::prime_stored_position`]): read from the store no more.
    primed: std::sync::Mutex<Option<(Symbol, Option<PositionRow>)>>,
    /// Simulated order latency, uniformly in `min..=max` ms (`extra_config.latency_ms`).
    latency_ms: Option<(u64, u64)>,
    /// The starting balance (`extra_config.balance`).
    balance: Decimal,
}

/// The paper account's starting balance when `extra_config.balance` does not set one.
pub const PAPER_BALANCE: Decimal = dec!(10000);

impl PaperExchange {
    /// `extra_config.latency_ms` (a number, or `[min, max]`) makes every order take that long, to
    /// stand in for a real broker in tests and benchmarks.
    pub fn new(store: Store, creds: &Credentials) -> Self {
        let latency_ms = match creds.extra_config.get("latency_ms") {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| (v, v)),
            Some(serde_json::Value::Array(a)) if a.len() == 2 => {
                match (a[0].as_u64(), a[1].as_u64()) {
                    (Some(lo), Some(hi)) if lo <= hi => Some((lo, hi)),
                    _ => None,
                }
            }
            _ => None,
        };
        let balance = creds
            .extra_config
            .get("balance")
            .and_then(|v| match v {
                serde_json::Value::Number(n) => crate::domain::parse_decimal(&n.to_string()),
                serde_json::Value::String(s) => crate::domain::parse_decimal(s),
                _ => None,
            })
            .filter(|b| *b >= Decimal::ZERO)
            .unwrap_or(PAPER_BALANCE);
        PaperExchange {
            store,
            account: Account {
                user_id: creds.user_id,
                exchange: ExchangeKind::Paper,
                environment: creds.environment,
            },
            filled: std::sync::Mutex::new(Vec::new()),
            primed: std::sync::Mutex::new(None),
            latency_ms,
            balance,
        }
    }

    async fn simulate_latency(&self) {
        if let Some((lo, hi)) = self.latency_ms {
            let ms = if hi > lo {
                rand::Rng::gen_range(&mut rand::thread_rng(), lo..=hi)
            } else {
                lo
            };
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }

    fn fill(
        &self,
        symbol: &Symbol,
        side: OrderSide,
        client_order_id: &str,
        qty: Decimal,
        price: Decimal,
    ) -> OrderAck {
        let ack = OrderAck {
            exchange_order_id: format!("paper-{client_order_id}"),
            client_order_id: client_order_id.to_string(),
            state: OrderState::Filled,
            filled_qty: qty,
            avg_price: Some(price),
            fee: None,
        };
        let signed = match side {
            OrderSide::Buy => qty,
            OrderSide::Sell => -qty,
        };
        self.filled.lock().unwrap_or_else(|e| e.into_inner()).push((
            symbol.to_string(),
            ack.clone(),
            signed,
        ));
        ack
    }

    /// The stored position primed for `symbol`, if it was (`Some(None)`: primed flat).
    fn primed_position(&self, symbol: &Symbol) -> Option<Option<PositionRow>> {
        match &*self.primed.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((s, stored)) if s == symbol => Some(stored.clone()),
            _ => None,
        }
    }

    /// The net quantity this client filled in `symbol` (signed) and the last fill's price.
    fn own_fills(&self, symbol: &Symbol) -> Result<(Decimal, Option<Decimal>), ExchangeError> {
        let filled = self.filled.lock().unwrap_or_else(|e| e.into_inner());
        let mut net = Decimal::ZERO;
        let mut price = None;
        for (_, ack, signed) in filled.iter().filter(|(s, ..)| s == symbol.as_str()) {
            net = crate::money::add(net, *signed)?;
            price = ack.avg_price;
        }
        Ok((net, price))
    }
}

fn db_error(e: crate::store::StoreError) -> ExchangeError {
    ExchangeError::transient(format!("paper exchange storage: {e}"))
}

#[async_trait]
impl Exchange for PaperExchange {
    fn kind(&self) -> ExchangeKind {
        ExchangeKind::Paper
    }

    fn prime_stored_position(&self, symbol: &Symbol, stored: Option<PositionRow>) {
        *self.primed.lock().unwrap_or_else(|e| e.into_inner()) = Some((symbol.clone(), stored));
    }

    async fn symbol_rules(&self, symbol: &Symbol) -> Result<SymbolRules, ExchangeError> {
        Ok(paper_market(symbol.as_str()).1)
    }

    async fn price(&self, symbol: &Symbol) -> Result<Decimal, ExchangeError> {
        Ok(paper_market(symbol.as_str()).0)
    }

    async fn position(&self, symbol: &Symbol) -> Result<Option<ExPosition>, ExchangeError> {
        let p = match self.primed_position(symbol) {
            Some(stored) => stored,
            None => self
                .store
                .position(&self.account, symbol.as_str())
                .await
                .map_err(db_error)?,
        };
        let committed = match &p {
            Some(p) if p.side == crate::domain::Side::Long => p.quantity,
            Some(p) => -p.quantity,
            None => Decimal::ZERO,
        };
        let (own, last_price) = self.own_fills(symbol)?;
        let net = crate::money::add(committed, own)?;
        // The committed entry price while the side is the committed one; a side this job opened
        // entered at its fill.
        let entry = match &p {
            Some(p) if (net > Decimal::ZERO) == (committed > Decimal::ZERO) => Some(p.entry_price),
            _ => last_price,
        };
        Ok(ExPosition::from_signed(net, entry))
    }

    async fn place_order(&self, o: &OrderRequest) -> Result<OrderAck, ExchangeError> {
        self.simulate_latency().await;
        let (price, rules) = paper_market(o.symbol.as_str());
        if o.quantity <= Decimal::ZERO || !(o.quantity % rules.step).is_zero() {
            return Err(ExchangeError::permanent(format!(
                "paper: quantity {} of {} is not a positive multiple of the step {}",
                o.quantity, o.symbol, rules.step
            )));
        }
        if !o.reduce_only {
            if o.quantity < rules.min_qty {
                return Err(ExchangeError::permanent(format!(
                    "paper: quantity {} of {} is below the minimum {}",
                    o.quantity, o.symbol, rules.min_qty
                )));
            }
            let notional = crate::money::mul(o.quantity, price)?;
            if notional < rules.min_notional {
                return Err(ExchangeError::permanent(format!(
                    "paper: notional {} of {} is below the minimum {}",
                    notional, o.symbol, rules.min_notional
                )));
            }
        }
        if o.order_type == OrderType::Limit {
            let limit = o
                .limit_price
                .ok_or_else(|| ExchangeError::permanent("paper: a limit order needs a price"))?;
            let marketable = match o.side {
                OrderSide::Buy => limit >= price,
                OrderSide::Sell => limit <= price,
            };
            if !marketable {
                return Err(ExchangeError::permanent(format!(
                    "paper: limit {} {} at {} is not marketable against the paper price {}; the paper exchange keeps no resting orders",
                    o.side.as_str(),
                    o.symbol,
                    limit,
                    price
                )));
            }
        }
        Ok(self.fill(&o.symbol, o.side, &o.client_order_id, o.quantity, price))
    }

    async fn close_position(
        &self,
        symbol: &Symbol,
        position: &ExPosition,
        client_order_id: &str,
    ) -> Result<OrderAck, ExchangeError> {
        self.simulate_latency().await;
        let (price, _) = paper_market(symbol.as_str());
        let side = OrderSide::closing(position.side);
        Ok(self.fill(symbol, side, client_order_id, position.quantity, price))
    }

    async fn find_order(
        &self,
        _symbol: &Symbol,
        client_order_id: &str,
    ) -> Result<Option<OrderAck>, ExchangeError> {
        let own = self
            .filled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(_, ack, _)| ack.client_order_id == client_order_id)
            .map(|(_, ack, _)| ack.clone());
        if own.is_some() {
            return Ok(own);
        }
        let t = self
            .store
            .trade_by_client_order_id(self.account.user_id, client_order_id)
            .await
            .map_err(db_error)?;
        Ok(t.map(|t| OrderAck {
            exchange_order_id: t
                .exchange_order_id
                .unwrap_or_else(|| format!("paper-{client_order_id}")),
            client_order_id: t.client_order_id,
            state: OrderState::Filled,
            filled_qty: t.quantity,
            avg_price: t.price,
            fee: None,
        }))
    }

    /// The paper account's equity: `extra_config.balance` (default [`PAPER_BALANCE`]) plus the
    /// realized PnL recorded on the user's paper trades. Open positions are valued at entry (the
    /// paper price does not move), so there is no unrealized PnL.
    async fn equity(&self) -> Result<Decimal, ExchangeError> {
        let pnl = self
            .store
            .realized_pnl_total(self.account.user_id, ExchangeKind::Paper)
            .await
            .map_err(db_error)?;
        crate::money::add(self.balance, pnl).map_err(Into::into)
    }

    async fn protect(&self, _protection: &Protection) -> Result<Vec<RestingOrder>, ExchangeError> {
        // The paper exchange has no triggers to run; the levels are recorded on the position row.
        Ok(vec![])
    }

    async fn open_orders(&self, _symbol: &Symbol) -> Result<Vec<OpenOrder>, ExchangeError> {
        // Nothing rests on the paper exchange: every order fills at once or is rejected.
        Ok(vec![])
    }

    async fn cancel_order(&self, symbol: &Symbol, order: &OpenOrder) -> Result<(), ExchangeError> {
        Err(ExchangeError::permanent(format!(
            "paper: no order {} rests in {symbol}",
            order.exchange_order_id
        )))
    }
}
