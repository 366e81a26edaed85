//! [`RecordedOrders`]: an [`Exchange`] decorator for brokers whose open-order listing can miss a
//! working order ([`Exchange::lists_every_open_order`] false: Tradier's `GET /orders` is the
//! current session's, so a GTC OCO placed yesterday is not in it). Its
//! [`Exchange::open_orders`] is the broker's listing plus every order Sparky recorded as resting
//! in that account and symbol (`broker_orders`, state `open`, with a broker id) that the listing
//! lacks, looked up by id ([`Exchange::open_order_by_id`]) and kept if still working. So the
//! cancels of a close or a reversal, a later alert's cancel of a working entry and the
//! reconciliation's orphan check all see yesterday's orders.
//!
//! Cost: one indexed Postgres read per listing, and one broker request per recorded order the
//! listing lacks (usually none; after midnight, the position's one OCO order until it is gone).
//! Orders Sparky placed but never recorded (a crash between the broker and the commit) are only
//! found if the listing shows them; the client order id look-ups of a recovery find those.
//!
//! It forwards every other method unchanged (including those with a default body).

use async_trait::async_trait;
use rust_decimal::Decimal;
use uuid::Uuid;

use super::{
    ExPosition, Exchange, ExchangeError, OpenOrder, OrderAck, OrderRequest, Protection,
    RestingOrder, SymbolRules,
};
use crate::credentials::Credentials;
use crate::domain::{CredentialEnv, ExchangeKind, Symbol};
use crate::store::Store;

pub struct RecordedOrders {
    inner: Box<dyn Exchange>,
    store: Store,
    user_id: Uuid,
    environment: CredentialEnv,
}

impl RecordedOrders {
    /// `inner`, wrapped when its listing can miss orders; as it is otherwise.
    pub fn wrap(inner: Box<dyn Exchange>, store: Store, creds: &Credentials) -> Box<dyn Exchange> {
        if inner.lists_every_open_order() {
            return inner;
        }
        Box::new(RecordedOrders {
            inner,
            store,
            user_id: creds.user_id,
            environment: creds.environment,
        })
    }

    /// The broker ids of the orders Sparky recorded as resting in `symbol` of this account.
    async fn recorded_ids(&self, symbol: &Symbol) -> Result<Vec<String>, ExchangeError> {
        sqlx::query_scalar(
            "SELECT DISTINCT exchange_order_id FROM broker_orders
              WHERE user_id = $1 AND exchange = $2 AND environment = $3 AND symbol = $4
                AND state = 'open' AND exchange_order_id IS NOT NULL
              ORDER BY 1",
        )
        .bind(self.user_id)
        .bind(self.inner.kind().as_str())
        .bind(self.environment.as_str())
        .bind(symbol.as_str())
        .fetch_all(&self.store.pool)
        .await
        .map_err(|e| {
            ExchangeError::transient(format!(
                "reading the orders Sparky recorded as resting in {symbol}: {e}"
            ))
        })
    }
}

#[async_trait]
impl Exchange for RecordedOrders {
    fn kind(&self) -> ExchangeKind {
        self.inner.kind()
    }
    async fn symbol_rules(&self, symbol: &Symbol) -> Result<SymbolRules, ExchangeError> {
        self.inner.symbol_rules(symbol).await
    }
    async fn price(&self, symbol: &Symbol) -> Result<Decimal, ExchangeError> {
        self.inner.price(symbol).await
    }
    async fn position(&self, symbol: &Symbol) -> Result<Option<ExPosition>, ExchangeError> {
        self.inner.position(symbol).await
    }
    async fn place_order(&self, order: &OrderRequest) -> Result<OrderAck, ExchangeError> {
        self.inner.place_order(order).await
    }
    async fn close_position(
        &self,
        symbol: &Symbol,
        position: &ExPosition,
        client_order_id: &str,
    ) -> Result<OrderAck, ExchangeError> {
        self.inner
            .close_position(symbol, position, client_order_id)
            .await
    }
    async fn find_order(
        &self,
        symbol: &Symbol,
        client_order_id: &str,
    ) -> Result<Option<OrderAck>, ExchangeError> {
        self.inner.find_order(symbol, client_order_id).await
    }
    async fn equity(&self) -> Result<Decimal, ExchangeError> {
        self.inner.equity().await
    }
    async fn protect(&self, protection: &Protection) -> Result<Vec<RestingOrder>, ExchangeError> {
        self.inner.protect(protection).await
    }
    async fn open_orders(&self, symbol: &Symbol) -> Result<Vec<OpenOrder>, ExchangeError> {
        let mut open = self.inner.open_orders(symbol).await?;
        for id in self.recorded_ids(symbol).await? {
            if open.iter().any(|o| o.exchange_order_id == id) {
                continue;
            }
            if let Some(o) = self.inner.open_order_by_id(symbol, &id).await? {
                open.push(o);
            }
        }
        Ok(open)
    }
    async fn cancel_order(&self, symbol: &Symbol, order: &OpenOrder) -> Result<(), ExchangeError> {
        self.inner.cancel_order(symbol, order).await
    }
    fn protects_on_fill(&self) -> bool {
        self.inner.protects_on_fill()
    }
    fn lists_every_open_order(&self) -> bool {
        // This listing does (as far as Sparky's own orders go).
        true
    }
    async fn open_order_by_id(
        &self,
        symbol: &Symbol,
        exchange_order_id: &str,
    ) -> Result<Option<OpenOrder>, ExchangeError> {
        self.inner.open_order_by_id(symbol, exchange_order_id).await
    }
}
