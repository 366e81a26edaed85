-- Strategies (issues 14 and 19): per user, found by `name` (the alert's `strategy`) or by
-- `strategy_id`. Each column is a default the alert's own field overrides. See `src/strategy.rs`.
CREATE TABLE strategies (
    user_id               uuid NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    name                  text NOT NULL CHECK (length(name) BETWEEN 1 AND 256),
    strategy_id           text CHECK (length(strategy_id) BETWEEN 1 AND 256),
    exchange              text CHECK (exchange IN ('aster', 'oanda', 'tradier', 'paper')),
    environment           text CHECK (environment IN ('production', 'sandbox')),
    sizing_mode           text CHECK (sizing_mode IN ('position_size_usd', 'quantity',
                              'percent_of_equity', 'risk_usd', 'risk_percent')),
    size                  numeric CHECK (size > 0),
    stop_loss_percent     numeric CHECK (stop_loss_percent > 0 AND stop_loss_percent < 100),
    take_profit_percent   numeric CHECK (take_profit_percent > 0 AND take_profit_percent < 100),
    trailing_stop_percent numeric CHECK (trailing_stop_percent > 0 AND trailing_stop_percent < 100),
    order_type            text CHECK (order_type IN ('market', 'limit')),
    enabled               boolean NOT NULL DEFAULT true,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, name),
    UNIQUE (user_id, strategy_id),
    CHECK ((sizing_mode IS NULL) = (size IS NULL))
);

-- Risk limits (issue 14): one row per user for all its jobs (`strategy` = ''), and optionally one
-- per strategy name. Every limit is optional (NULL = no limit). See `src/risk.rs`.
CREATE TABLE risk_limits (
    user_id                  uuid NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    strategy                 text NOT NULL DEFAULT '',
    kill_switch              boolean NOT NULL DEFAULT false,
    max_open_positions       integer CHECK (max_open_positions >= 0),
    max_position_usd         numeric CHECK (max_position_usd > 0),
    max_daily_loss           numeric CHECK (max_daily_loss > 0),
    max_trades_per_day       integer CHECK (max_trades_per_day >= 0),
    trading_start            time,
    trading_end              time,
    time_zone                text NOT NULL DEFAULT 'UTC',
    allow_symbols            text[],
    deny_symbols             text[],
    cooldown_secs            integer CHECK (cooldown_secs > 0),
    max_consecutive_failures integer CHECK (max_consecutive_failures > 0),
    breaker_reset_at         timestamptz,
    updated_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, strategy),
    CHECK ((trading_start IS NULL) = (trading_end IS NULL))
);

-- The per-day counts of the risk rules read the user's trades and jobs by time.
CREATE INDEX IF NOT EXISTS jobs_user_finished ON jobs (user_id, finished_at);
