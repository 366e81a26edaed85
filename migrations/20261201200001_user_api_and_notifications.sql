-- Issue 15: per-user API tokens, the notification channels, the outbox and its delivery log.

-- API tokens (`sparky user token create|revoke`), separate from the webhook secret (which sits in
-- TradingView alert bodies). Only the SHA-256 hex of a token is stored, as for webhook secrets.
CREATE TABLE api_tokens (
    token_id    uuid PRIMARY KEY,
    token_hash  text NOT NULL UNIQUE,
    user_id     uuid NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    label       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);

-- The user API pages jobs newest first by job id (a UUIDv7: time-ordered), per user.
CREATE INDEX jobs_user_job ON jobs (user_id, job_id);
CREATE INDEX trades_user_id ON trades (user_id, id);

-- Notification channels (`sparky notify add`). `destination` (the webhook URL, or the Telegram chat
-- id) and `secret` (the `whsec_` signing secret, or the Telegram bot token) are encrypted under
-- SPARKY_MASTER_KEY like credentials (`enc:v1:...`, bound to the user and the channel);
-- `display` is what `notify list` shows (no secret in it).
CREATE TABLE notification_channels (
    channel_id  uuid PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users (user_id) ON DELETE CASCADE,
    kind        text NOT NULL CHECK (kind IN ('webhook', 'discord', 'slack', 'telegram')),
    destination text NOT NULL,
    secret      text,
    display     text NOT NULL,
    events      text[] NOT NULL,
    label       text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notification_channels_user ON notification_channels (user_id);

-- The outbox: one row per event, written in the same transaction as what caused it (a job's
-- outcome, or later a reconciliation), and only when the user has a channel that wants it.
CREATE TABLE notification_outbox (
    event_id    uuid PRIMARY KEY,
    user_id     uuid NOT NULL,
    kind        text NOT NULL,
    job_id      uuid,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX notification_outbox_user ON notification_outbox (user_id, created_at);

-- One row per (event, channel): what the dispatcher delivers. A dispatcher claims due rows with
-- `FOR UPDATE SKIP LOCKED` and sets a lease; a dispatcher that dies mid-delivery leaves the lease
-- to expire, and the row is claimed again (at least once).
CREATE TABLE notification_deliveries (
    delivery_id     bigserial PRIMARY KEY,
    event_id        uuid NOT NULL REFERENCES notification_outbox (event_id) ON DELETE CASCADE,
    channel_id      uuid NOT NULL REFERENCES notification_channels (channel_id) ON DELETE CASCADE,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    lease_owner     text,
    lease_until     timestamptz,
    last_error      text,
    delivered_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, channel_id)
);
CREATE INDEX notification_deliveries_due ON notification_deliveries (next_attempt_at) WHERE status = 'pending';

-- The delivery log: every attempt, its answer and how long it took.
CREATE TABLE notification_attempts (
    id           bigserial PRIMARY KEY,
    delivery_id  bigint NOT NULL REFERENCES notification_deliveries (delivery_id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    ok           boolean NOT NULL,
    http_status  integer,
    error        text,
    duration_ms  bigint NOT NULL
);
CREATE INDEX notification_attempts_delivery ON notification_attempts (delivery_id);
