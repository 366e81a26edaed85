-- Sparky schema. bot_credentials keeps the columns of the original system (the SignalStudio front end
-- writes them); api_key/api_secret hold `enc:v1:...` ciphertext (or legacy plaintext, see
-- `sparky credentials encrypt-existing`).

CREATE TABLE users (
    user_id     uuid PRIMARY KEY,
    label       text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Webhook secrets, stored only as SHA-256 hex. A user may briefly have more than one (rotation).
CREATE TABLE webhook_secrets (
    secret_hash text PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX webhook_secrets_user ON webhook_secrets (user_id);

CREATE TABLE bot_credentials (
    id           bigserial PRIMARY KEY,
    user_id      uuid NOT NULL,
    exchange     text NOT NULL,
    api_key      text NOT NULL,
    api_secret   text NOT NULL,
    account_id   text,
    environment  text NOT NULL DEFAULT 'production' CHECK (environment IN ('production', 'sandbox')),
    extra_config jsonb DEFAULT '{}'::jsonb,
    label        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, exchange, environment)
);

-- One row per accepted webhook that a worker has picked up. job_id is the ingress's UUIDv7.
CREATE TABLE jobs (
    job_id       uuid PRIMARY KEY,
    user_id      uuid NOT NULL,
    partition    integer NOT NULL,
    entry_id     text NOT NULL,
    exchange     text NOT NULL,
    action       text NOT NULL,
    symbol       text NOT NULL,
    alert        jsonb NOT NULL,
    status       text NOT NULL CHECK (status IN ('queued', 'executing', 'succeeded',
                     'succeeded_unprotected', 'skipped', 'rejected', 'dead')),
    attempts     integer NOT NULL DEFAULT 0,
    error_class  text,
    error        text,
    -- every failed attempt: [{"at", "class", "message"}]
    history      jsonb NOT NULL DEFAULT '[]'::jsonb,
    accepted_at  timestamptz NOT NULL,
    started_at   timestamptz,
    finished_at  timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_user ON jobs (user_id, accepted_at);
CREATE INDEX jobs_failed ON jobs (status, accepted_at) WHERE status IN ('rejected', 'dead');

-- Every order leg a job placed. UNIQUE (job_id, leg): a job can never record two orders for one leg.
CREATE TABLE trades (
    id                bigserial PRIMARY KEY,
    job_id            uuid NOT NULL REFERENCES jobs (job_id),
    user_id           uuid NOT NULL,
    exchange          text NOT NULL,
    symbol            text NOT NULL,
    leg               text NOT NULL CHECK (leg IN ('open', 'close', 'sl', 'tp')),
    side              text NOT NULL CHECK (side IN ('buy', 'sell')),
    quantity          numeric NOT NULL CHECK (quantity > 0),
    price             numeric,
    client_order_id   text NOT NULL,
    exchange_order_id text,
    status            text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job_id, leg)
);
CREATE INDEX trades_user ON trades (user_id, created_at);
CREATE INDEX trades_client_order ON trades (user_id, client_order_id);

-- Open positions, one per user and symbol; the row is deleted when the position is closed.
CREATE TABLE positions (
    user_id           uuid NOT NULL,
    symbol            text NOT NULL,
    exchange          text NOT NULL,
    side              text NOT NULL CHECK (side IN ('long', 'short')),
    quantity          numeric NOT NULL CHECK (quantity > 0),
    entry_price       numeric NOT NULL,
    stop_loss_price   numeric,
    take_profit_price numeric,
    opened_at         timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    last_job_id       uuid,
    UNIQUE (user_id, symbol)
);
