//! A scripted exchange for worker tests: an in-process [`Exchange`] (no HTTP) that keeps positions
//! per symbol, records every order in the order it arrived, and on demand panics (symbol
//! `PANICUSDT`), blocks an order until the test releases it (a gate per symbol), or quotes a price
//! whose arithmetic overflows. Jobs reach it through [`Worker::with_exchanges`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use sparky::credentials::Credentials;
use sparky::domain::{ExchangeKind, OrderSide, Side, Symbol};
use sparky::exchanges::{
    ExPosition, Exchange, ExchangeError, ExchangeFactory, OpenOrder, OrderAck, OrderRequest,
    OrderState, Protection, RestingOrder, SymbolRules,
};
use tokio::sync::{Notify, Semaphore};

/// An order that reached the scripted broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    pub symbol: String,
    pub client_order_id: String,
    pub side: OrderSide,
    pub quantity: Decimal,
}

/// Holds orders of one symbol until released.
pub struct Gate {
    pub entered: Notify,
    release: Semaphore,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            entered: Notify::new(),
            release: Semaphore::new(0),
        }
    }
}

impl Gate {
    /// Let `n` held (or future) orders through.
    pub fn release(&self, n: usize) {
        self.release.add_permits(n);
    }
}

#[derive(Default)]
pub struct Scripted {
    positions: Mutex<HashMap<String, (Side, Decimal)>>,
    orders: Mutex<Vec<Placed>>,
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    prices: Mutex<HashMap<String, Decimal>>,
    /// symbol -> the fraction of a position a close fills (the rest stays open).
    partial_closes: Mutex<HashMap<String, std::collections::VecDeque<Decimal>>>,
}

impl Scripted {
    pub fn new() -> Arc<Scripted> {
        Arc::new(Scripted::default())
    }
    /// Hold every order of `symbol` until [`Gate::release`].
    pub fn gate(&self, symbol: &str) -> Arc<Gate> {
        self.gates
            .lock()
            .unwrap()
            .entry(symbol.to_string())
            .or_default()
            .clone()
    }
    pub fn set_price(&self, symbol: &str, price: Decimal) {
        self.prices.lock().unwrap().insert(symbol.into(), price);
    }
    /// The next closes of `symbol` fill only these fractions of the position, one each, in order
    /// (later closes fill completely).
    pub fn partial_closes(&self, symbol: &str, fractions: &[Decimal]) {
        self.partial_closes
            .lock()
            .unwrap()
            .insert(symbol.into(), fractions.iter().copied().collect());
    }
    pub fn position_of(&self, symbol: &str) -> Option<(Side, Decimal)> {
        self.positions.lock().unwrap().get(symbol).copied()
    }
    pub fn orders(&self) -> Vec<Placed> {
        self.orders.lock().unwrap().clone()
    }
    pub fn orders_of(&self, symbol: &str) -> Vec<Placed> {
        self.orders()
            .into_iter()
            .filter(|o| o.symbol == symbol)
            .collect()
    }
    /// A factory that hands this exchange to every job.
    pub fn factory(self: &Arc<Self>) -> Arc<dyn ExchangeFactory> {
        Arc::new(Factory(self.clone()))
    }

    async fn fill(&self, symbol: &str, id: &str, side: OrderSide, qty: Decimal) -> OrderAck {
        let gate = self.gates.lock().unwrap().get(symbol).cloned();
        if let Some(g) = gate {
            g.entered.notify_one();
            g.release.acquire().await.unwrap().forget();
        }
        self.orders.lock().unwrap().push(Placed {
            symbol: symbol.into(),
            client_order_id: id.into(),
            side,
            quantity: qty,
        });
        ack(id, qty)
    }
}

fn ack(id: &str, qty: Decimal) -> OrderAck {
    OrderAck {
        exchange_order_id: format!("x-{id}"),
        client_order_id: id.into(),
        state: OrderState::Filled,
        filled_qty: qty,
        avg_price: Some(dec!(100)),
        fee: None,
    }
}

struct Factory(Arc<Scripted>);

impl ExchangeFactory for Factory {
    fn build(&self, _creds: &Credentials) -> Result<Box<dyn Exchange>, ExchangeError> {
        Ok(Box::new(Client(self.0.clone())))
    }

    /// A scripted broker stands in for a remote one, whatever the alert's exchange says: its
    /// orders exist before the job's commit.
    fn orders_are_commits(&self, _exchange: ExchangeKind) -> bool {
        false
    }
}

/// One job's client.
pub struct Client(pub Arc<Scripted>);

#[async_trait]
impl Exchange for Client {
    fn kind(&self) -> ExchangeKind {
        ExchangeKind::Paper
    }
    async fn symbol_rules(&self, _symbol: &Symbol) -> Result<SymbolRules, ExchangeError> {
        Ok(SymbolRules {
            step: dec!(0.001),
            min_qty: dec!(0.001),
            min_notional: Decimal::ZERO,
            tick: dec!(0.01),
        })
    }
    async fn price(&self, symbol: &Symbol) -> Result<Decimal, ExchangeError> {
        Ok(*self
            .0
            .prices
            .lock()
            .unwrap()
            .get(symbol.as_str())
            .unwrap_or(&dec!(100)))
    }
    async fn position(&self, symbol: &Symbol) -> Result<Option<ExPosition>, ExchangeError> {
        Ok(self
            .0
            .positions
            .lock()
            .unwrap()
            .get(symbol.as_str())
            .map(|(side, q)| ExPosition {
                side: *side,
                quantity: *q,
                entry_price: Some(dec!(100)),
            }))
    }
    async fn equity(&self) -> Result<Decimal, ExchangeError> {
        Ok(dec!(10000))
    }
    async fn place_order(&self, order: &OrderRequest) -> Result<OrderAck, ExchangeError> {
        let sym = order.symbol.as_str();
        if sym == "PANICUSDT" {
            panic!("scripted broker reply crashed the client");
        }
        let a = self
            .0
            .fill(sym, &order.client_order_id, order.side, order.quantity)
            .await;
        let side = match order.side {
            OrderSide::Buy => Side::Long,
            OrderSide::Sell => Side::Short,
        };
        let mut positions = self.0.positions.lock().unwrap();
        match positions.get(sym).copied() {
            // A reduce-only order (a partial close) takes from the position.
            Some((held, q)) if order.reduce_only && held != side => {
                if order.quantity >= q {
                    positions.remove(sym);
                } else {
                    positions.insert(sym.into(), (held, q - order.quantity));
                }
            }
            _ => {
                positions.insert(sym.into(), (side, order.quantity));
            }
        }
        Ok(a)
    }
    async fn close_position(
        &self,
        symbol: &Symbol,
        position: &ExPosition,
        client_order_id: &str,
    ) -> Result<OrderAck, ExchangeError> {
        let side = OrderSide::closing(position.side);
        let fraction = self
            .0
            .partial_closes
            .lock()
            .unwrap()
            .get_mut(symbol.as_str())
            .and_then(|q| q.pop_front());
        let filled = fraction.map_or(position.quantity, |f| (position.quantity * f).round_dp(3));
        let a = self
            .0
            .fill(symbol.as_str(), client_order_id, side, filled)
            .await;
        let mut positions = self.0.positions.lock().unwrap();
        if filled < position.quantity {
            positions.insert(
                symbol.as_str().into(),
                (position.side, position.quantity - filled),
            );
        } else {
            positions.remove(symbol.as_str());
        }
        Ok(a)
    }
    async fn find_order(
        &self,
        _symbol: &Symbol,
        client_order_id: &str,
    ) -> Result<Option<OrderAck>, ExchangeError> {
        Ok(self
            .0
            .orders()
            .iter()
            .find(|o| o.client_order_id == client_order_id)
            .map(|o| ack(&o.client_order_id, o.quantity)))
    }
    async fn protect(&self, _protection: &Protection) -> Result<Vec<RestingOrder>, ExchangeError> {
        Ok(vec![])
    }
    async fn open_orders(&self, _symbol: &Symbol) -> Result<Vec<OpenOrder>, ExchangeError> {
        Ok(vec![])
    }
    async fn cancel_order(
        &self,
        _symbol: &Symbol,
        _order: &OpenOrder,
    ) -> Result<(), ExchangeError> {
        Ok(())
    }
}
