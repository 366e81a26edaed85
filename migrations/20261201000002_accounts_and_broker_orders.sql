-- Issue 12: positions belong to an account (user, exchange, environment), not to a user; the orders
-- Sparky leaves resting at a broker (protective stop-loss / take-profit orders, working entries) are
-- recorded with their broker id and state; a close may take more than one order (remainders).

ALTER TABLE positions ADD COLUMN environment text NOT NULL DEFAULT 'production'
    CHECK (environment IN ('production', 'sandbox'));
ALTER TABLE positions DROP CONSTRAINT positions_user_id_symbol_key;
ALTER TABLE positions ADD CONSTRAINT positions_account_symbol_key
    UNIQUE (user_id, exchange, environment, symbol);

ALTER TABLE trades ADD COLUMN environment text NOT NULL DEFAULT 'production';
ALTER TABLE trades DROP CONSTRAINT trades_leg_check;
ALTER TABLE trades ADD CONSTRAINT trades_leg_check
    CHECK (leg IN ('open', 'close', 'close2', 'close3', 'sl', 'tp'));

-- Orders Sparky placed that outlive the job that placed them. `state` follows the broker:
-- open -> filled | cancelled. Written in the job's commit; moved on by later jobs (a close cancels a
-- position's protective orders), the working-order follower and the reconciliation sweep.
CREATE TABLE broker_orders (
    client_order_id   text PRIMARY KEY,
    job_id            uuid NOT NULL REFERENCES jobs (job_id),
    user_id           uuid NOT NULL,
    exchange          text NOT NULL,
    environment       text NOT NULL,
    symbol            text NOT NULL,
    leg               text NOT NULL CHECK (leg IN ('open', 'sl', 'tp')),
    side              text NOT NULL CHECK (side IN ('buy', 'sell')),
    quantity          numeric NOT NULL CHECK (quantity > 0),
    price             numeric,
    exchange_order_id text,
    state             text NOT NULL CHECK (state IN ('open', 'filled', 'cancelled')),
    -- working entries: when the follower cancels it if it has not filled
    expires_at        timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX broker_orders_open ON broker_orders (user_id, exchange, environment, symbol)
    WHERE state = 'open';
