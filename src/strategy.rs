//! Strategies: a user's named defaults for alerts (issues 14 and 19).
//!
//! A strategy belongs to one user and is found by `strategy_id` or by `name` (the alert's
//! `strategy` field, unique per user). It may set the exchange (and credential environment), a
//! default size in any [`SizingMode`], stop-loss / take-profit percents, a trailing-stop percent and
//! the order type. An alert that names none uses the user's strategy named [`DEFAULT_NAME`], if
//! there is one (the original Sparky's `config.json` trade amount).
//!
//! # Where it is resolved: in the ingress
//! The ingress resolves the strategy and puts the *resolved* values into the job (the stream entry),
//! so the worker executes exactly what was accepted, and everything the alert leaves out can be
//! answered with a 400 at once (no exchange, no size, an unknown strategy name): TradingView shows
//! the sender nothing of a job that fails later. Alert fields override the strategy's field by field
//! ([`Strategy::fill`]), on the JSON body, before the one parser sees it.
//!
//! Cost on the hot path: strategies are cached per ingress process ([`StrategyCache`], entries for
//! `SPARKY_SECRET_CACHE_TTL_SECS`, unknown names too), so a user's alerts cost one indexed Postgres
//! read per strategy name per TTL, none otherwise. The reads use a pool of their own
//! (`SPARKY_SECRET_LOOKUP_CONCURRENCY` connections, `SPARKY_SECRET_LOOKUP_WAIT_MS` to get one), so
//! they never take a connection from the job API or `/readyz`; a read that cannot get one answers
//! 503 (nothing accepted). Only authenticated requests reach it. A change made with `sparky strategy set` reaches
//! the ingress within that TTL. The `enabled` flag is read again by the worker at execution
//! ([`crate::risk`]): `sparky strategy disable` blocks the strategy's next opens at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::domain::{CredentialEnv, ExchangeKind, OrderType, Sizing, SizingMode};
use crate::store::{Store, StoreError};

/// The strategy used by alerts that name none.
pub const DEFAULT_NAME: &str = "default";

/// One user's strategy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Strategy {
    pub user_id: Uuid,
    pub name: String,
    pub strategy_id: Option<String>,
    pub exchange: Option<ExchangeKind>,
    pub environment: Option<CredentialEnv>,
    #[serde(skip)]
    pub sizing: Option<Sizing>,
    pub stop_loss_percent: Option<Decimal>,
    pub take_profit_percent: Option<Decimal>,
    pub trailing_stop_percent: Option<Decimal>,
    pub order_type: Option<OrderType>,
    pub enabled: bool,
}

/// How an alert names its strategy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StrategyRef {
    /// `strategy_id` (wins when both are given).
    Id(String),
    /// `strategy`: the name.
    Name(String),
    /// Neither: the user's [`DEFAULT_NAME`] strategy, if it exists.
    Default,
}

impl StrategyRef {
    /// The reference of a (canonical) webhook body. Text the parser will refuse (a placeholder,
    /// control characters, too long, not text) refers to nothing: the parser names the problem.
    pub fn of(body: &Map<String, Value>) -> StrategyRef {
        let usable = |k: &str| -> Option<String> {
            let s = match body.get(k)? {
                Value::String(s) => s.trim().to_string(),
                Value::Number(n) => n.to_string(),
                _ => return None,
            };
            let ok = !s.is_empty() && !s.contains("{{") && crate::domain::bounds::text(&s).is_ok();
            ok.then_some(s)
        };
        if let Some(id) = usable("strategy_id") {
            StrategyRef::Id(id)
        } else if let Some(name) = usable("strategy") {
            StrategyRef::Name(name)
        } else {
            StrategyRef::Default
        }
    }

    /// The field that named it, for a 400.
    pub fn field(&self) -> &'static str {
        match self {
            StrategyRef::Id(_) => "strategy_id",
            StrategyRef::Name(_) | StrategyRef::Default => "strategy",
        }
    }
}

impl Strategy {
    /// The sizing fields of a webhook ([`SizingMode`]).
    fn has_size(body: &Map<String, Value>) -> bool {
        SizingMode::ALL.iter().any(|m| given(body, m.as_str()))
    }

    /// `body` (canonical: no original-Sparky aliases) with this strategy's defaults where the
    /// alert gives nothing: the exchange (with its environment), a size (only if the alert gives
    /// none in any mode), stop-loss and take-profit (unless the alert gives a percent or a price),
    /// the trailing stop (unless the alert gives any trailing field) and the order type. An alert
    /// without a `strategy` gets the strategy's name there (so a job found by `strategy_id`, or by
    /// the `default` strategy, is recorded and risk-limited under its name).
    pub fn fill(&self, body: &Map<String, Value>) -> Map<String, Value> {
        let mut out = body.clone();
        let text = |s: &str| Value::String(s.to_string());
        let num = |d: Decimal| Value::String(d.to_string());
        if let Some(ex) = self.exchange {
            if !given(body, "exchange") {
                out.insert("exchange".into(), text(ex.as_str()));
                if let (Some(env), false) = (self.environment, given(body, "environment")) {
                    out.insert("environment".into(), text(env.as_str()));
                }
            }
        }
        if let Some(s) = self.sizing {
            if !Self::has_size(body) {
                out.insert(s.mode.as_str().into(), num(s.amount));
            }
        }
        let defaults = [
            (
                self.stop_loss_percent,
                "stop_loss_percent",
                "stop_loss_price",
            ),
            (
                self.take_profit_percent,
                "take_profit_percent",
                "take_profit_price",
            ),
        ];
        for (v, pct, abs) in defaults {
            if let (Some(v), false) = (v, given(body, pct) || given(body, abs)) {
                out.insert(pct.into(), num(v));
            }
        }
        let trailing = [
            "useTrailingStop",
            "trailing_stop_percent",
            "trailing_stop_distance",
            "trailing_stop_pips",
        ];
        if let Some(t) = self.trailing_stop_percent {
            if !trailing.iter().any(|k| body.contains_key(*k)) {
                out.insert("trailing_stop_percent".into(), num(t));
            }
        }
        if let (Some(o), false) = (self.order_type, given(body, "order_type")) {
            out.insert("order_type".into(), text(o.as_str()));
        }
        if !given(body, "strategy") {
            out.insert("strategy".into(), text(&self.name));
        }
        out
    }
}

fn given(body: &Map<String, Value>, key: &str) -> bool {
    match body.get(key) {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.trim().is_empty(),
        Some(_) => true,
    }
}

/// Strategies per ingress process: `(user, reference)` -> the strategy or its absence, for a TTL.
/// Bounded: past [`MAX_CACHED`] entries the stale ones are dropped, then all.
pub struct StrategyCache {
    store: Store,
    ttl: Duration,
    map: Mutex<HashMap<(Uuid, StrategyRef), Cached>>,
}

/// When it was read, and what was found.
type Cached = (Instant, Option<Arc<Strategy>>);

/// The most strategies (and unknown names) one ingress caches.
pub const MAX_CACHED: usize = 50_000;

impl StrategyCache {
    pub fn new(store: Store, ttl: Duration) -> Self {
        StrategyCache {
            store,
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The strategy `r` names for `user`: cached, else read from Postgres.
    pub async fn get(
        &self,
        user: Uuid,
        r: &StrategyRef,
    ) -> Result<Option<Arc<Strategy>>, StoreError> {
        let key = (user, r.clone());
        if let Some((at, s)) = self.map.lock().expect("cache lock").get(&key) {
            if at.elapsed() < self.ttl {
                return Ok(s.clone());
            }
        }
        let found = self.store.find_strategy(user, r).await?.map(Arc::new);
        let mut map = self.map.lock().expect("cache lock");
        if map.len() >= MAX_CACHED {
            let ttl = self.ttl;
            map.retain(|_, (at, _)| at.elapsed() < ttl);
            if map.len() >= MAX_CACHED {
                map.clear();
            }
        }
        map.insert(key, (Instant::now(), found.clone()));
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;
    use serde_json::json;

    fn strategy() -> Strategy {
        Strategy {
            user_id: Uuid::nil(),
            name: "trend".into(),
            strategy_id: Some("s1".into()),
            exchange: Some(ExchangeKind::Oanda),
            environment: Some(CredentialEnv::Sandbox),
            sizing: Some(Sizing {
                mode: SizingMode::RiskUsd,
                amount: dec!(50),
            }),
            stop_loss_percent: Some(dec!(1)),
            take_profit_percent: Some(dec!(2)),
            trailing_stop_percent: None,
            order_type: Some(OrderType::Market),
            enabled: true,
        }
    }

    #[test]
    fn alert_fields_override_the_strategy() {
        let body = json!({"action": "buy", "symbol": "EURUSD", "quantity": 10,
            "stop_loss_price": "1.07", "strategy_id": "s1"});
        let out = strategy().fill(body.as_object().unwrap());
        assert_eq!(out["exchange"], "oanda");
        assert_eq!(out["environment"], "sandbox");
        assert_eq!(out["quantity"], 10, "the alert's size stays");
        assert!(!out.contains_key("risk_usd"), "no second size");
        assert!(
            !out.contains_key("stop_loss_percent"),
            "the alert's price wins"
        );
        assert_eq!(out["take_profit_percent"], "2");
        assert_eq!(out["strategy"], "trend");
    }

    #[test]
    fn references() {
        let r = |v: Value| StrategyRef::of(v.as_object().unwrap());
        assert_eq!(
            r(json!({"strategy": "a", "strategy_id": "b"})),
            StrategyRef::Id("b".into())
        );
        assert_eq!(r(json!({"strategy": " a "})), StrategyRef::Name("a".into()));
        assert_eq!(
            r(json!({"strategy": "{{strategy.order.comment}}"})),
            StrategyRef::Default
        );
        assert_eq!(r(json!({"strategy": ""})), StrategyRef::Default);
    }
}
