//! The SQL of strategies (`src/strategy.rs`).

use rust_decimal::Decimal;
use sqlx::Row;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::{Sizing, SizingMode};
use crate::strategy::{Strategy, StrategyRef, DEFAULT_NAME};

const SELECT: &str = "SELECT user_id, name, strategy_id, exchange, environment, sizing_mode, size,
    stop_loss_percent, take_profit_percent, trailing_stop_percent, order_type, enabled
    FROM strategies";

fn decode<T: std::str::FromStr<Err = String>>(
    v: Option<String>,
    column: &str,
) -> Result<Option<T>, StoreError> {
    v.map(|s| {
        s.parse::<T>().map_err(|e| {
            StoreError::Db(sqlx::Error::ColumnDecode {
                index: column.into(),
                source: e.into(),
            })
        })
    })
    .transpose()
}

fn strategy_row(r: &sqlx::postgres::PgRow) -> Result<Strategy, StoreError> {
    let mode: Option<SizingMode> = decode(r.try_get("sizing_mode")?, "sizing_mode")?;
    let size: Option<Decimal> = r.try_get("size")?;
    Ok(Strategy {
        user_id: r.try_get("user_id")?,
        name: r.try_get("name")?,
        strategy_id: r.try_get("strategy_id")?,
        exchange: decode(r.try_get("exchange")?, "exchange")?,
        environment: decode(r.try_get("environment")?, "environment")?,
        sizing: mode.zip(size).map(|(mode, amount)| Sizing { mode, amount }),
        stop_loss_percent: r.try_get("stop_loss_percent")?,
        take_profit_percent: r.try_get("take_profit_percent")?,
        trailing_stop_percent: r.try_get("trailing_stop_percent")?,
        order_type: decode(r.try_get("order_type")?, "order_type")?,
        enabled: r.try_get("enabled")?,
    })
}

impl Store {
    /// The strategy `r` names for `user`, if it exists.
    pub async fn find_strategy(
        &self,
        user: Uuid,
        r: &StrategyRef,
    ) -> Result<Option<Strategy>, StoreError> {
        let (column, key) = match r {
            StrategyRef::Id(id) => ("strategy_id", id.as_str()),
            StrategyRef::Name(n) => ("name", n.as_str()),
            StrategyRef::Default => ("name", DEFAULT_NAME),
        };
        let row = sqlx::query(&format!("{SELECT} WHERE user_id = $1 AND {column} = $2"))
            .bind(user)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(strategy_row).transpose()
    }

    /// Every strategy of `user`, by name.
    pub async fn strategies(&self, user: Uuid) -> Result<Vec<Strategy>, StoreError> {
        let rows = sqlx::query(&format!("{SELECT} WHERE user_id = $1 ORDER BY name"))
            .bind(user)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(strategy_row).collect()
    }

    /// Create or replace the strategy `s.name` of `s.user_id`.
    pub async fn upsert_strategy(&self, s: &Strategy) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO strategies (user_id, name, strategy_id, exchange, environment, sizing_mode, size,
                stop_loss_percent, take_profit_percent, trailing_stop_percent, order_type, enabled)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (user_id, name) DO UPDATE SET strategy_id = EXCLUDED.strategy_id,
                exchange = EXCLUDED.exchange, environment = EXCLUDED.environment,
                sizing_mode = EXCLUDED.sizing_mode, size = EXCLUDED.size,
                stop_loss_percent = EXCLUDED.stop_loss_percent,
                take_profit_percent = EXCLUDED.take_profit_percent,
                trailing_stop_percent = EXCLUDED.trailing_stop_percent,
                order_type = EXCLUDED.order_type, enabled = EXCLUDED.enabled, updated_at = now()",
        )
        .bind(s.user_id)
        .bind(&s.name)
        .bind(&s.strategy_id)
        .bind(s.exchange.map(|e| e.as_str()))
        .bind(s.environment.map(|e| e.as_str()))
        .bind(s.sizing.map(|z| z.mode.as_str()))
        .bind(s.sizing.map(|z| z.amount))
        .bind(s.stop_loss_percent)
        .bind(s.take_profit_percent)
        .bind(s.trailing_stop_percent)
        .bind(s.order_type.map(|o| o.as_str()))
        .bind(s.enabled)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Enable or disable a strategy (by name or id); `false` if it does not exist.
    pub async fn set_strategy_enabled(
        &self,
        user: Uuid,
        r: &StrategyRef,
        enabled: bool,
    ) -> Result<bool, StoreError> {
        let (column, key) = match r {
            StrategyRef::Id(id) => ("strategy_id", id.as_str()),
            StrategyRef::Name(n) => ("name", n.as_str()),
            StrategyRef::Default => ("name", DEFAULT_NAME),
        };
        let n = sqlx::query(&format!(
            "UPDATE strategies SET enabled = $3, updated_at = now() WHERE user_id = $1 AND {column} = $2"
        ))
        .bind(user)
        .bind(key)
        .bind(enabled)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }
}
