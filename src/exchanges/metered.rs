//! [`Metered`]: an [`Exchange`] decorator that times every call at the executor/exchange boundary
//! (`sparky_exchange_request_duration_seconds{exchange, op, outcome}`) and records the job's
//! acceptance-to-first-order latency (`sparky_accept_to_order_seconds`) when the first order of the
//! job is acknowledged. Every client gets it without any change to the client.
//!
//! It must forward every method of the trait, including those with a default body (a default left
//! unforwarded would silently change the wrapped client's behaviour).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::{
    ExPosition, Exchange, ExchangeError, OpenOrder, OrderAck, OrderRequest, Protection,
    RestingOrder, SymbolRules,
};
use crate::domain::{ExchangeKind, Symbol};
use crate::metrics::Metrics;

pub struct Metered {
    inner: Box<dyn Exchange>,
    metrics: Metrics,
    exchange: &'static str,
    accepted_at: DateTime<Utc>,
    ordered: AtomicBool,
}

impl Metered {
    /// Wrap the client built for one job accepted at `accepted_at`.
    pub fn new(inner: Box<dyn Exchange>, metrics: Metrics, accepted_at: DateTime<Utc>) -> Self {
        Metered {
            exchange: inner.kind().as_str(),
            inner,
            metrics,
            accepted_at,
            ordered: AtomicBool::new(false),
        }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, ExchangeError>>,
    ) -> Result<T, ExchangeError> {
        let start = Instant::now();
        let r = call.await;
        let outcome = match &r {
            Ok(_) => "ok",
            Err(e) => e.class.as_str(),
        };
        self.metrics
            .exchange_request(self.exchange, op, outcome, start.elapsed());
        r
    }

    fn order_acknowledged(&self) {
        if !self.ordered.swap(true, Ordering::AcqRel) {
            let elapsed = (Utc::now() - self.accepted_at).to_std().unwrap_or_default();
            self.metrics.accept_to_order(self.exchange, elapsed);
        }
    }
}

#[async_trait]
impl Exchange for Metered {
    fn kind(&self) -> ExchangeKind {
        self.inner.kind()
    }
    async fn symbol_rules(&self, symbol: &Symbol) -> Result<SymbolRules, ExchangeError> {
        self.timed("symbol_rules", self.inner.symbol_rules(symbol))
            .await
    }
    async fn price(&self, symbol: &Symbol) -> Result<Decimal, ExchangeError> {
        self.timed("price", self.inner.price(symbol)).await
    }
    async fn position(&self, symbol: &Symbol) -> Result<Option<ExPosition>, ExchangeError> {
        self.timed("position", self.inner.position(symbol)).await
    }
    async fn place_order(&self, order: &OrderRequest) -> Result<OrderAck, ExchangeError> {
        let r = self
            .timed("place_order", self.inner.place_order(order))
            .await;
        if r.is_ok() {
            self.order_acknowledged();
        }
        r
    }
    async fn close_position(
        &self,
        symbol: &Symbol,
        position: &ExPosition,
        client_order_id: &str,
    ) -> Result<OrderAck, ExchangeError> {
        let r = self
            .timed(
                "close_position",
                self.inner.close_position(symbol, position, client_order_id),
            )
            .await;
        if r.is_ok() {
            self.order_acknowledged();
        }
        r
    }
    async fn find_order(
        &self,
        symbol: &Symbol,
        client_order_id: &str,
    ) -> Result<Option<OrderAck>, ExchangeError> {
        self.timed("find_order", self.inner.find_order(symbol, client_order_id))
            .await
    }
    async fn equity(&self) -> Result<Decimal, ExchangeError> {
        self.timed("equity", self.inner.equity()).await
    }
    async fn protect(&self, protection: &Protection) -> Result<Vec<RestingOrder>, ExchangeError> {
        self.timed("protect", self.inner.protect(protection)).await
    }
    async fn open_orders(&self, symbol: &Symbol) -> Result<Vec<OpenOrder>, ExchangeError> {
        self.timed("open_orders", self.inner.open_orders(symbol))
            .await
    }
    async fn cancel_order(&self, symbol: &Symbol, order: &OpenOrder) -> Result<(), ExchangeError> {
        self.timed("cancel_order", self.inner.cancel_order(symbol, order))
            .await
    }
    fn protects_on_fill(&self) -> bool {
        self.inner.protects_on_fill()
    }
    fn prime_stored_position(&self, symbol: &Symbol, stored: Option<crate::store::PositionRow>) {
        self.inner.prime_stored_position(symbol, stored)
    }
    fn lists_every_open_order(&self) -> bool {
        self.inner.lists_every_open_order()
    }
    async fn open_order_by_id(
        &self,
        symbol: &Symbol,
        exchange_order_id: &str,
    ) -> Result<Option<OpenOrder>, ExchangeError> {
        self.timed(
            "open_order_by_id",
            self.inner.open_order_by_id(symbol, exchange_order_id),
        )
        .await
    }
}
