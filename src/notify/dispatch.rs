//! The dispatcher: delivers outbox events to channels, at least once, with backoff and a log.
//!
//! Runs as its own task in every `sparky-worker` process (see `worker/src/main.rs`), on a Postgres
//! pool of its own (two connections), so it never takes a connection or a lane from trading.
//! Several dispatchers (one per worker process) share the work safely:
//!
//! 1. **claim**: one statement picks due deliveries (`pending`, `next_attempt_at <= now()`, no live
//!    lease) with `FOR UPDATE SKIP LOCKED`, sets `lease_owner`/`lease_until` and counts the attempt.
//!    Two dispatchers never claim the same row while its lease lives.
//! 2. **send** each claimed delivery (bounded by the batch size, each request time-limited).
//! 3. **record**, fenced by the lease owner: `delivered`, or back to `pending` at
//!    `now() + backoff(attempts)`, or `failed` after `max_attempts` (or at once on a 4xx other
//!    than 408/429: the receiver said no). Every attempt is logged in `notification_attempts`.
//!
//! A dispatcher killed between claim and record (a crash, a cancelled task) leaves the lease to
//! expire; the delivery is then claimed again and sent again, with the same `webhook-id`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::Utc;
use serde_json::{json, Value};
use sqlx::Row;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::channel::{open_row, ChannelKind, OpenChannel};
use super::format::{sign, summary};
use crate::secrets::MasterKey;
use crate::store::{Store, StoreError};

/// How a dispatcher runs. The defaults are the production values.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// How long a claimed delivery is this dispatcher's before another may take it. Longer than
    /// `request_timeout`, so a live dispatcher's delivery is never sent twice at once.
    pub lease: Duration,
    /// Deliveries claimed (and sent concurrently) per round.
    pub batch: i64,
    /// How long to wait when nothing was due.
    pub idle_wait: Duration,
    /// Attempts before a delivery is `failed` (kept, with its log, for an operator).
    pub max_attempts: i32,
    /// The backoff after the first failure; it doubles (with jitter) up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub request_timeout: Duration,
    /// The Telegram Bot API (tests point it at a local server).
    pub telegram_base_url: String,
    /// Events older than this whose deliveries are all settled (delivered or failed) are deleted
    /// with their deliveries and log, about once an hour.
    pub retention: Duration,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            lease: Duration::from_secs(60),
            batch: 16,
            idle_wait: Duration::from_secs(1),
            max_attempts: 12,
            min_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(10),
            telegram_base_url: "https://api.telegram.org".into(),
            retention: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// One claimed delivery.
struct Claimed {
    delivery_id: i64,
    attempt: i32,
    event_id: Uuid,
    payload: Value,
    user_id: Uuid,
    channel_id: Uuid,
    kind: String,
    destination: String,
    secret: Option<String>,
}

/// The answer of one attempt.
#[derive(Debug)]
pub struct Attempt {
    pub ok: bool,
    pub http_status: Option<u16>,
    /// Why it failed (never a secret: URLs are not included).
    pub error: Option<String>,
    /// The receiver refused for good (a 4xx other than 408/429, or the channel cannot be opened).
    pub permanent: bool,
}

pub struct Dispatcher {
    store: Store,
    keys: Vec<MasterKey>,
    http: reqwest::Client,
    config: DispatcherConfig,
    owner: String,
    metrics: Option<crate::metrics::Metrics>,
}

impl Dispatcher {
    /// A dispatcher over `store` (give it a pool of its own: [`Store::sibling`]) that opens channel
    /// secrets with `keys` (the current master key, carrying the retired ones).
    pub fn new(store: Store, keys: Vec<MasterKey>, config: DispatcherConfig) -> Dispatcher {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a reqwest client");
        Dispatcher {
            store,
            keys,
            http,
            config,
            owner: format!("dispatcher-{}", Uuid::now_v7().simple()),
            metrics: None,
        }
    }

    /// Count every attempt in `sparky_notification_attempts_total{channel, outcome}`.
    pub fn with_metrics(mut self, metrics: crate::metrics::Metrics) -> Dispatcher {
        self.metrics = Some(metrics);
        self
    }

    /// Deliver until `shutdown`. Database errors are logged and waited out (backoff).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut delays = crate::retry::schedule();
        let mut last_purge = Instant::now();
        loop {
            if last_purge.elapsed() > Duration::from_secs(3600) {
                last_purge = Instant::now();
                match self.purge().await {
                    Ok(n) if n > 0 => tracing::info!(
                        events = n,
                        "purged settled notifications past their retention"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "purging old notifications failed"),
                }
            }
            let wait = match self.run_once().await {
                Ok(0) => self.config.idle_wait,
                Ok(_) => {
                    delays = crate::retry::schedule();
                    Duration::ZERO
                }
                Err(e) => {
                    let d = delays.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %e, "notification dispatcher: claiming failed; retrying in {d:?}");
                    d
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Claim one batch of due deliveries and attempt each. Returns how many were claimed.
    pub async fn run_once(&self) -> Result<usize, StoreError> {
        let claimed = self.claim().await?;
        let n = claimed.len();
        futures::future::join_all(claimed.into_iter().map(|c| self.deliver(c))).await;
        Ok(n)
    }

    /// Delete events older than `retention` whose deliveries are all settled (none pending), with
    /// their deliveries and attempt log. Returns how many events went.
    pub async fn purge(&self) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM notification_outbox o
             WHERE o.created_at < now() - make_interval(secs => $1)
               AND NOT EXISTS (SELECT 1 FROM notification_deliveries d
                               WHERE d.event_id = o.event_id AND d.status = 'pending')",
        )
        .bind(self.config.retention.as_secs_f64())
        .execute(&self.store.pool)
        .await?
        .rows_affected())
    }

    async fn claim(&self) -> Result<Vec<Claimed>, StoreError> {
        let rows = sqlx::query(
            "WITH due AS (
                 SELECT delivery_id FROM notification_deliveries
                 WHERE status = 'pending' AND next_attempt_at <= now()
                   AND (lease_until IS NULL OR lease_until < now())
                 ORDER BY next_attempt_at
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED
             ), claimed AS (
                 UPDATE notification_deliveries d
                 SET lease_owner = $1, lease_until = now() + make_interval(secs => $2),
                     attempts = d.attempts + 1
                 FROM due WHERE d.delivery_id = due.delivery_id
                 RETURNING d.delivery_id, d.attempts, d.event_id, d.channel_id
             )
             SELECT claimed.delivery_id, claimed.attempts, o.event_id, o.payload,
                    c.user_id, c.channel_id, c.kind, c.destination, c.secret
             FROM claimed
             JOIN notification_outbox o ON o.event_id = claimed.event_id
             JOIN notification_channels c ON c.channel_id = claimed.channel_id",
        )
        .bind(&self.owner)
        .bind(self.config.lease.as_secs_f64())
        .bind(self.config.batch)
        .fetch_all(&self.store.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Claimed {
                    delivery_id: r.try_get("delivery_id")?,
                    attempt: r.try_get("attempts")?,
                    event_id: r.try_get("event_id")?,
                    payload: r.try_get("payload")?,
                    user_id: r.try_get("user_id")?,
                    channel_id: r.try_get("channel_id")?,
                    kind: r.try_get("kind")?,
                    destination: r.try_get("destination")?,
                    secret: r.try_get("secret")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }

    async fn deliver(&self, c: Claimed) {
        let start = Instant::now();
        let keys: Vec<&MasterKey> = self.keys.iter().collect();
        let attempt = match open_row(
            &keys,
            c.user_id,
            c.channel_id,
            &c.kind,
            &c.destination,
            c.secret.as_deref(),
        ) {
            Ok(channel) => {
                send(
                    &self.http,
                    &self.config.telegram_base_url,
                    &channel,
                    &c.event_id.to_string(),
                    &c.payload,
                )
                .await
            }
            Err(e) => Attempt {
                ok: false,
                http_status: None,
                error: Some(e),
                permanent: true,
            },
        };
        let took = start.elapsed();
        if !attempt.ok {
            tracing::warn!(event_id = %c.event_id, channel_id = %c.channel_id, attempt = c.attempt,
                error = attempt.error.as_deref().unwrap_or(""), "notification delivery failed");
        }
        if let Some(m) = &self.metrics {
            let channel = c
                .kind
                .parse::<ChannelKind>()
                .map_or("unknown", ChannelKind::as_str);
            let gave_up = attempt.permanent || c.attempt >= self.config.max_attempts;
            let outcome = match (attempt.ok, gave_up) {
                (true, _) => "delivered",
                (false, true) => "failed",
                (false, false) => "retry",
            };
            m.notification_attempt(channel, outcome);
        }
        if let Err(e) = self.record(&c, &attempt, took).await {
            // The lease expires and the delivery is attempted again: at least once.
            tracing::warn!(error = %e, event_id = %c.event_id, "could not record a notification attempt");
        }
    }

    /// The delay before attempt `attempts + 1`.
    fn backoff(&self, attempts: i32) -> Duration {
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.config.min_backoff)
            .with_max_delay(self.config.max_backoff)
            .without_max_times()
            .build()
            .nth(attempts.saturating_sub(1).max(0) as usize)
            .unwrap_or(self.config.max_backoff)
    }

    async fn record(&self, c: &Claimed, a: &Attempt, took: Duration) -> Result<(), StoreError> {
        let mut tx = self.store.pool.begin().await?;
        let gave_up = a.permanent || c.attempt >= self.config.max_attempts;
        let status = match (a.ok, gave_up) {
            (true, _) => "delivered",
            (false, true) => "failed",
            (false, false) => "pending",
        };
        let next = Utc::now()
            + chrono::Duration::from_std(self.backoff(c.attempt))
                .unwrap_or(chrono::Duration::hours(1));
        sqlx::query(
            "UPDATE notification_deliveries
             SET status = $3, lease_owner = NULL, lease_until = NULL, last_error = $4,
                 next_attempt_at = CASE WHEN $3 = 'pending' THEN $5 ELSE next_attempt_at END,
                 delivered_at = CASE WHEN $3 = 'delivered' THEN now() ELSE delivered_at END
             WHERE delivery_id = $1 AND lease_owner = $2 AND status = 'pending'",
        )
        .bind(c.delivery_id)
        .bind(&self.owner)
        .bind(status)
        .bind(a.error.as_deref())
        .bind(next)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO notification_attempts (delivery_id, attempt, ok, http_status, error, duration_ms)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(c.delivery_id)
        .bind(c.attempt)
        .bind(a.ok)
        .bind(a.http_status.map(i32::from))
        .bind(a.error.as_deref())
        .bind(took.as_millis() as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Send one event to one channel (the dispatcher's attempt, and `sparky notify test`).
pub async fn send(
    http: &reqwest::Client,
    telegram_base_url: &str,
    channel: &OpenChannel,
    msg_id: &str,
    event: &Value,
) -> Attempt {
    let fail = |error: String, permanent: bool| Attempt {
        ok: false,
        http_status: None,
        error: Some(error),
        permanent,
    };
    let url = channel.destination.expose();
    let req = match channel.kind {
        ChannelKind::Webhook => {
            let body = serde_json::to_vec(event).expect("a JSON value serialises");
            let ts = Utc::now().timestamp();
            let Some(secret) = &channel.secret else {
                return fail("the webhook channel has no signing secret".into(), true);
            };
            let sig = match sign(secret.expose(), msg_id, ts, &body) {
                Ok(s) => s,
                Err(e) => return fail(format!("signing secret: {e}"), true),
            };
            http.post(url)
                .header("content-type", "application/json")
                .header("webhook-id", msg_id)
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", sig)
                .body(body)
        }
        ChannelKind::Discord => {
            let text: String = summary(event).chars().take(2000).collect();
            http.post(url).json(&json!({"content": text}))
        }
        ChannelKind::Slack => http.post(url).json(&json!({"text": summary(event)})),
        ChannelKind::Telegram => {
            let Some(token) = &channel.secret else {
                return fail("the telegram channel has no bot token".into(), true);
            };
            http.post(format!(
                "{}/bot{}/sendMessage",
                telegram_base_url.trim_end_matches('/'),
                token.expose()
            ))
            .json(&json!({"chat_id": url, "text": summary(event)}))
        }
    };
    match req.send().await {
        Ok(r) if r.status().is_success() => Attempt {
            ok: true,
            http_status: Some(r.status().as_u16()),
            error: None,
            permanent: false,
        },
        Ok(r) => {
            let s = r.status();
            let permanent = s.is_client_error() && s.as_u16() != 408 && s.as_u16() != 429;
            Attempt {
                ok: false,
                http_status: Some(s.as_u16()),
                error: Some(format!("the channel answered {s}")),
                permanent,
            }
        }
        // Without the URL: a Discord/Slack URL or a Telegram token is a secret.
        Err(e) => fail(format!("request failed: {}", e.without_url()), false),
    }
}

/// The envelope `sparky notify test` sends.
pub fn test_event(user: Uuid) -> Value {
    json!({
        "type": "test",
        "event_id": Uuid::now_v7(),
        "occurred_at": Utc::now(),
        "user_id": user,
        "data": {"message": "a test notification from Sparky"},
    })
}
