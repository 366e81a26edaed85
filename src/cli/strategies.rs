//! `sparky strategy set|show|disable|enable` (issues 14 and 19; the model is in [`crate::strategy`]).

use clap::{Args, Subcommand};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::domain::{
    bounds, CredentialEnv, ExchangeKind, OrderType, Sizing, SizingMode, TrailingStop,
};
use crate::store::Store;
use crate::strategy::{Strategy, StrategyRef};

// Parsed once per run: the size of the `set` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum StrategyCommand {
    /// Create a strategy or change the given fields of one (the others keep their values; `--clear`
    /// unsets fields). Alert fields override the strategy's.
    Set(SetStrategy),
    /// Show a user's strategies (or one).
    Show {
        #[arg(long)]
        user: Uuid,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Disable a strategy: its alerts' opening orders end `blocked` (closes still run).
    Disable(Which),
    /// Enable a disabled strategy.
    Enable(Which),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("key").required(true).multiple(true).args(["strategy_id", "name"])))]
pub struct Which {
    #[arg(long)]
    pub user: Uuid,
    #[arg(long)]
    pub strategy_id: Option<String>,
    #[arg(long)]
    pub name: Option<String>,
}

impl Which {
    fn reference(&self) -> StrategyRef {
        match (&self.name, &self.strategy_id) {
            (Some(n), _) => StrategyRef::Name(n.clone()),
            (None, Some(id)) => StrategyRef::Id(id.clone()),
            (None, None) => StrategyRef::Default,
        }
    }
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("size").args(["position_size_usd", "quantity", "percent_of_equity", "risk_usd", "risk_percent"])))]
pub struct SetStrategy {
    #[command(flatten)]
    pub which: Which,
    #[arg(long)]
    pub exchange: Option<String>,
    #[arg(long)]
    pub environment: Option<String>,
    #[arg(long)]
    pub position_size_usd: Option<Decimal>,
    #[arg(long)]
    pub quantity: Option<Decimal>,
    #[arg(long)]
    pub percent_of_equity: Option<Decimal>,
    #[arg(long)]
    pub risk_usd: Option<Decimal>,
    #[arg(long)]
    pub risk_percent: Option<Decimal>,
    #[arg(long)]
    pub stop_loss_percent: Option<Decimal>,
    #[arg(long)]
    pub take_profit_percent: Option<Decimal>,
    #[arg(long)]
    pub trailing_stop_percent: Option<Decimal>,
    #[arg(long)]
    pub order_type: Option<String>,
    /// Unset fields: exchange, environment, size, stop_loss_percent, take_profit_percent,
    /// trailing_stop_percent, order_type (repeatable).
    #[arg(long, num_args = 1..)]
    pub clear: Vec<String>,
}

fn check(
    field: &str,
    v: Option<Decimal>,
    bound: fn(Decimal) -> Result<(), String>,
) -> anyhow::Result<Option<Decimal>> {
    if let Some(d) = v {
        bound(d).map_err(|m| anyhow::anyhow!("--{}: {m}", field.replace('_', "-")))?;
    }
    Ok(v)
}

impl SetStrategy {
    /// The strategy after this command: `current` (if any) with the given fields changed.
    pub fn apply(&self, current: Option<Strategy>) -> anyhow::Result<Strategy> {
        let w = &self.which;
        let name = match (&w.name, &current) {
            (Some(n), _) => n.clone(),
            (None, Some(c)) => c.name.clone(),
            (None, None) => w.strategy_id.clone().expect("clap requires a key"),
        };
        for (flag, v) in [
            ("--name", Some(&name)),
            ("--strategy-id", w.strategy_id.as_ref()),
        ] {
            if let Some(v) = v {
                if v.trim().is_empty() || v.trim() != v || v.contains("{{") {
                    anyhow::bail!(
                        "{flag}: must be non-blank text without surrounding spaces or placeholders"
                    );
                }
                bounds::text(v).map_err(|m| anyhow::anyhow!("{flag}: {m}"))?;
            }
        }
        let mut s = current.unwrap_or(Strategy {
            user_id: w.user,
            name: name.clone(),
            strategy_id: None,
            exchange: None,
            environment: None,
            sizing: None,
            stop_loss_percent: None,
            take_profit_percent: None,
            trailing_stop_percent: None,
            order_type: None,
            enabled: true,
        });
        s.name = name;
        if let Some(id) = &w.strategy_id {
            s.strategy_id = Some(id.clone());
        }
        for c in &self.clear {
            match c.as_str() {
                "exchange" => s.exchange = None,
                "environment" => s.environment = None,
                "size" => s.sizing = None,
                "stop_loss_percent" => s.stop_loss_percent = None,
                "take_profit_percent" => s.take_profit_percent = None,
                "trailing_stop_percent" => s.trailing_stop_percent = None,
                "order_type" => s.order_type = None,
                other => anyhow::bail!("--clear: unknown field `{other}`"),
            }
        }
        if let Some(e) = &self.exchange {
            s.exchange = Some(
                e.parse::<ExchangeKind>()
                    .map_err(|m| anyhow::anyhow!("--exchange: {m}"))?,
            );
        }
        if let Some(e) = &self.environment {
            s.environment = Some(
                e.parse::<CredentialEnv>()
                    .map_err(|m| anyhow::anyhow!("--environment: {m}"))?,
            );
        }
        if let Some(o) = &self.order_type {
            s.order_type = Some(
                o.parse::<OrderType>()
                    .map_err(|m| anyhow::anyhow!("--order-type: {m}"))?,
            );
        }
        let sizes = [
            (SizingMode::PositionSizeUsd, self.position_size_usd),
            (SizingMode::Quantity, self.quantity),
            (SizingMode::PercentOfEquity, self.percent_of_equity),
            (SizingMode::RiskUsd, self.risk_usd),
            (SizingMode::RiskPercent, self.risk_percent),
        ];
        for (mode, v) in sizes {
            if let Some(amount) = check(mode.as_str(), v, mode.bound())? {
                s.sizing = Some(Sizing { mode, amount });
            }
        }
        if let Some(v) = check("stop_loss_percent", self.stop_loss_percent, bounds::percent)? {
            s.stop_loss_percent = Some(v);
        }
        if let Some(v) = check(
            "take_profit_percent",
            self.take_profit_percent,
            bounds::percent,
        )? {
            s.take_profit_percent = Some(v);
        }
        if let Some(v) = check(
            "trailing_stop_percent",
            self.trailing_stop_percent,
            bounds::percent,
        )? {
            s.trailing_stop_percent = Some(v);
        }
        if let (Some(ex), Some(t)) = (s.exchange, s.trailing_stop_percent) {
            ex.honours_trailing(TrailingStop::Percent(t)).map_err(|m| {
                anyhow::anyhow!("--trailing-stop-percent: cannot be honoured on {ex}: {m}")
            })?;
        }
        if s.sizing.is_some_and(|z| z.mode.needs_stop_loss()) && s.stop_loss_percent.is_none() {
            eprintln!("note: a risk size needs a stop-loss; alerts of this strategy must send stop_loss_percent or stop_loss_price");
        }
        Ok(s)
    }
}

fn describe(s: &Strategy) -> String {
    let opt = |v: Option<Decimal>| v.map_or("-".into(), |d| d.normalize().to_string());
    format!(
        "{name}  id={id}  enabled={en}  exchange={ex}  environment={env}  size={size}  stop_loss_percent={sl}  take_profit_percent={tp}  trailing_stop_percent={tr}  order_type={ot}",
        name = s.name,
        id = s.strategy_id.as_deref().unwrap_or("-"),
        en = s.enabled,
        ex = s.exchange.map_or("-", |e| e.as_str()),
        env = s.environment.map_or("-", |e| e.as_str()),
        size = s.sizing.map_or("-".into(), |z| format!("{} {}", z.mode.as_str(), z.amount.normalize())),
        sl = opt(s.stop_loss_percent),
        tp = opt(s.take_profit_percent),
        tr = opt(s.trailing_stop_percent),
        ot = s.order_type.map_or("-", |o| o.as_str()),
    )
}

fn to_json(s: &Strategy) -> serde_json::Value {
    let mut v = serde_json::to_value(s).unwrap_or_default();
    if let Some(z) = s.sizing {
        v["sizing_mode"] = z.mode.as_str().into();
        v["size"] = z.amount.to_string().into();
    }
    v
}

pub async fn run(store: &Store, cmd: StrategyCommand) -> anyhow::Result<()> {
    store.check_migrated().await?;
    match cmd {
        StrategyCommand::Set(set) => {
            let current = match (&set.which.name, &set.which.strategy_id) {
                (Some(n), _) => {
                    store
                        .find_strategy(set.which.user, &StrategyRef::Name(n.clone()))
                        .await?
                }
                (None, Some(id)) => {
                    store
                        .find_strategy(set.which.user, &StrategyRef::Id(id.clone()))
                        .await?
                }
                (None, None) => None,
            };
            let s = set.apply(current)?;
            store.upsert_strategy(&s).await?;
            println!("saved strategy {}", describe(&s));
            println!("(ingress processes pick the change up within SPARKY_SECRET_CACHE_TTL_SECS)");
        }
        StrategyCommand::Show { user, name, json } => {
            let mut all = store.strategies(user).await?;
            if let Some(n) = &name {
                all.retain(|s| &s.name == n);
                if all.is_empty() {
                    anyhow::bail!("user {user} has no strategy `{n}`");
                }
            }
            if json {
                let v: Vec<_> = all.iter().map(to_json).collect();
                println!("{}", serde_json::Value::Array(v));
            } else if all.is_empty() {
                println!("user {user} has no strategies");
            } else {
                for s in &all {
                    println!("{}", describe(s));
                }
            }
        }
        StrategyCommand::Disable(w) => set_enabled(store, &w, false).await?,
        StrategyCommand::Enable(w) => set_enabled(store, &w, true).await?,
    }
    Ok(())
}

async fn set_enabled(store: &Store, w: &Which, enabled: bool) -> anyhow::Result<()> {
    if !store
        .set_strategy_enabled(w.user, &w.reference(), enabled)
        .await?
    {
        anyhow::bail!("user {} has no such strategy", w.user);
    }
    println!(
        "strategy {} {}",
        w.name.as_deref().or(w.strategy_id.as_deref()).unwrap_or(""),
        if enabled {
            "enabled"
        } else {
            "disabled: its opening orders are blocked, closes still run"
        }
    );
    Ok(())
}
