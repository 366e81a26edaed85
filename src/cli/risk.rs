//! `sparky risk set|show` (issue 14; the rules are in [`crate::risk`]).

use chrono::{NaiveTime, Utc};
use clap::{Args, Subcommand};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::risk::RiskLimits;
use crate::store::Store;

// Parsed once per run: the size of the `set` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum RiskCommand {
    /// Set limits (per user, or per strategy with `--strategy`). Only the given limits change;
    /// `--clear` unsets limits.
    Set(SetRisk),
    /// Show a user's limits.
    Show {
        #[arg(long)]
        user: Uuid,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct SetRisk {
    #[arg(long)]
    pub user: Uuid,
    /// Limits for this strategy's jobs only (its name); without it, for all of the user's jobs.
    #[arg(long)]
    pub strategy: Option<String>,
    /// on|off: block every opening order.
    #[arg(long)]
    pub kill_switch: Option<OnOff>,
    #[arg(long)]
    pub max_open_positions: Option<u32>,
    /// USD value of one order.
    #[arg(long)]
    pub max_position_usd: Option<Decimal>,
    /// Realized loss per day, in the account currency.
    #[arg(long)]
    pub max_daily_loss: Option<Decimal>,
    #[arg(long)]
    pub max_trades_per_day: Option<u32>,
    /// HH:MM-HH:MM in --time-zone (the end is excluded; start > end spans midnight).
    #[arg(long)]
    pub trading_hours: Option<String>,
    /// IANA time zone of the day's reset and the trading hours (default UTC).
    #[arg(long)]
    pub time_zone: Option<String>,
    /// Comma-separated symbols, in the exchange's form (ETHUSDT, EUR_USD, AAPL).
    #[arg(long)]
    pub allow_symbols: Option<String>,
    #[arg(long)]
    pub deny_symbols: Option<String>,
    #[arg(long)]
    pub cooldown_secs: Option<u32>,
    /// Block opens after this many failed (rejected/dead) jobs in a row.
    #[arg(long)]
    pub max_consecutive_failures: Option<u32>,
    /// Forget the failures so far (the breaker counts from now).
    #[arg(long)]
    pub reset_breaker: bool,
    /// Unset limits: max_open_positions, max_position_usd, max_daily_loss, max_trades_per_day,
    /// trading_hours, allow_symbols, deny_symbols, cooldown_secs, max_consecutive_failures.
    #[arg(long, num_args = 1..)]
    pub clear: Vec<String>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

fn positive(flag: &str, d: Option<Decimal>) -> anyhow::Result<Option<Decimal>> {
    match d {
        Some(v) if v <= Decimal::ZERO => anyhow::bail!("--{flag}: must be greater than 0"),
        other => Ok(other),
    }
}

fn to_i32(flag: &str, v: Option<u32>) -> anyhow::Result<Option<i32>> {
    v.map(|n| i32::try_from(n).map_err(|_| anyhow::anyhow!("--{flag}: too large")))
        .transpose()
}

/// `HH:MM-HH:MM`.
pub fn parse_hours(s: &str) -> anyhow::Result<(NaiveTime, NaiveTime)> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| anyhow::anyhow!("--trading-hours: expected HH:MM-HH:MM, got `{s}`"))?;
    let t = |x: &str| {
        NaiveTime::parse_from_str(x.trim(), "%H:%M")
            .map_err(|_| anyhow::anyhow!("--trading-hours: `{x}` is not HH:MM"))
    };
    let (start, end) = (t(a)?, t(b)?);
    if start == end {
        anyhow::bail!("--trading-hours: start and end are the same");
    }
    Ok((start, end))
}

fn symbols(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_ascii_uppercase())
        .filter(|x| !x.is_empty())
        .collect()
}

impl SetRisk {
    /// The limits after this command: `current` with the given ones changed.
    pub fn apply(&self, current: Option<RiskLimits>) -> anyhow::Result<RiskLimits> {
        let mut l = current.unwrap_or(RiskLimits {
            user_id: self.user,
            strategy: self.strategy.clone(),
            time_zone: "UTC".into(),
            ..RiskLimits::default()
        });
        for c in &self.clear {
            match c.as_str() {
                "max_open_positions" => l.max_open_positions = None,
                "max_position_usd" => l.max_position_usd = None,
                "max_daily_loss" => l.max_daily_loss = None,
                "max_trades_per_day" => l.max_trades_per_day = None,
                "trading_hours" => l.trading_hours = None,
                "allow_symbols" => l.allow_symbols = None,
                "deny_symbols" => l.deny_symbols = None,
                "cooldown_secs" => l.cooldown_secs = None,
                "max_consecutive_failures" => l.max_consecutive_failures = None,
                other => anyhow::bail!("--clear: unknown limit `{other}`"),
            }
        }
        if let Some(k) = self.kill_switch {
            l.kill_switch = matches!(k, OnOff::On);
        }
        if let Some(v) = to_i32("max-open-positions", self.max_open_positions)? {
            l.max_open_positions = Some(v);
        }
        if let Some(v) = positive("max-position-usd", self.max_position_usd)? {
            l.max_position_usd = Some(v);
        }
        if let Some(v) = positive("max-daily-loss", self.max_daily_loss)? {
            l.max_daily_loss = Some(v);
        }
        if let Some(v) = to_i32("max-trades-per-day", self.max_trades_per_day)? {
            l.max_trades_per_day = Some(v);
        }
        if let Some(h) = &self.trading_hours {
            l.trading_hours = Some(parse_hours(h)?);
        }
        if let Some(tz) = &self.time_zone {
            l.time_zone = tz.trim().to_string();
        }
        if let Some(s) = &self.allow_symbols {
            l.allow_symbols = Some(symbols(s));
        }
        if let Some(s) = &self.deny_symbols {
            l.deny_symbols = Some(symbols(s));
        }
        match to_i32("cooldown-secs", self.cooldown_secs)? {
            Some(0) => {
                anyhow::bail!("--cooldown-secs: must be greater than 0 (or --clear cooldown_secs)")
            }
            Some(v) => l.cooldown_secs = Some(v),
            None => {}
        }
        match to_i32("max-consecutive-failures", self.max_consecutive_failures)? {
            Some(0) => anyhow::bail!("--max-consecutive-failures: must be greater than 0"),
            Some(v) => l.max_consecutive_failures = Some(v),
            None => {}
        }
        if self.reset_breaker {
            l.breaker_reset_at = Some(Utc::now());
        }
        Ok(l)
    }
}

fn describe(l: &RiskLimits) -> String {
    let o = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    format!(
        "{scope}: kill_switch={ks} max_open_positions={mop} max_position_usd={mpu} max_daily_loss={mdl} max_trades_per_day={mtd} trading_hours={th} time_zone={tz} allow_symbols={al} deny_symbols={de} cooldown_secs={cd} max_consecutive_failures={mcf}",
        scope = l.strategy.as_deref().map_or("all jobs".into(), |s| format!("strategy {s}")),
        ks = if l.kill_switch { "on" } else { "off" },
        mop = o(l.max_open_positions.map(|v| v.to_string())),
        mpu = o(l.max_position_usd.map(|v| v.normalize().to_string())),
        mdl = o(l.max_daily_loss.map(|v| v.normalize().to_string())),
        mtd = o(l.max_trades_per_day.map(|v| v.to_string())),
        th = o(l.trading_hours.map(|(a, b)| format!("{}-{}", a.format("%H:%M"), b.format("%H:%M")))),
        tz = l.time_zone,
        al = o(l.allow_symbols.as_ref().map(|v| v.join(","))),
        de = o(l.deny_symbols.as_ref().map(|v| v.join(","))),
        cd = o(l.cooldown_secs.map(|v| v.to_string())),
        mcf = o(l.max_consecutive_failures.map(|v| v.to_string())),
    )
}

pub async fn run(store: &Store, cmd: RiskCommand) -> anyhow::Result<()> {
    store.check_migrated().await?;
    match cmd {
        RiskCommand::Set(set) => {
            let current = store
                .risk_limits(set.user)
                .await?
                .into_iter()
                .find(|l| l.strategy == set.strategy);
            let l = set.apply(current)?;
            store.upsert_risk_limits(&l).await.map_err(|e| {
                anyhow::anyhow!("saving the limits failed (is --time-zone an IANA zone?): {e}")
            })?;
            println!("saved limits of user {}: {}", l.user_id, describe(&l));
        }
        RiskCommand::Show { user, json } => {
            let all = store.risk_limits(user).await?;
            if json {
                println!("{}", serde_json::to_string(&all)?);
            } else if all.is_empty() {
                println!("user {user} has no risk limits");
            } else {
                for l in &all {
                    println!("{}", describe(l));
                }
            }
        }
    }
    Ok(())
}
