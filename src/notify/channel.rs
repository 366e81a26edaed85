//! A user's notification channels (`sparky notify add|list|remove|test`).
//!
//! A channel's `destination` (the webhook URL, or the Telegram chat id) and `secret` (the `whsec_`
//! signing secret, or the Telegram bot token) are sealed with [`crate::secrets::MasterKey`] like
//! credentials: `enc:v1:...`, bound to the user, the channel and the column (a value copied to
//! another row does not decrypt). Without `SPARKY_MASTER_KEY` they are stored in plaintext (dev),
//! as credentials are. Discord and Slack webhook URLs are bearer secrets themselves, hence the URL
//! is sealed too; `display` (the scheme and host) is what listings show.
//!
//! URLs must be `https`, except `http` to a loopback host (a local receiver, tests). Channels are
//! added by the operator's CLI, not through the public API, so the destination is trusted input.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use uuid::Uuid;

use super::EventKind;
use crate::secrets::{open, MasterKey, SecretString};
use crate::store::{Store, StoreError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// Any HTTPS endpoint, signed per the Standard Webhooks spec.
    Webhook,
    Discord,
    Slack,
    Telegram,
}

impl ChannelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Webhook => "webhook",
            ChannelKind::Discord => "discord",
            ChannelKind::Slack => "slack",
            ChannelKind::Telegram => "telegram",
        }
    }
}

impl fmt::Display for ChannelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ChannelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "webhook" => Ok(ChannelKind::Webhook),
            "discord" => Ok(ChannelKind::Discord),
            "slack" => Ok(ChannelKind::Slack),
            "telegram" => Ok(ChannelKind::Telegram),
            other => Err(format!(
                "unknown channel kind `{other}`: expected webhook, discord, slack or telegram"
            )),
        }
    }
}

/// What `notify add` asks for. `Debug` never shows the destination or the secret.
pub struct NewChannel {
    pub kind: ChannelKind,
    /// The URL (webhook, Discord, Slack) or the chat id (Telegram).
    pub destination: SecretString,
    /// The `whsec_` secret of a webhook (generated when absent) or the Telegram bot token.
    pub secret: Option<SecretString>,
    pub events: Vec<EventKind>,
    pub label: Option<String>,
}

impl fmt::Debug for NewChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewChannel")
            .field("kind", &self.kind)
            .field("destination", &"[redacted]")
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("events", &self.events)
            .field("label", &self.label)
            .finish()
    }
}

/// A channel as listings show it (no secret).
#[derive(Debug, Clone, Serialize)]
pub struct ChannelInfo {
    pub channel_id: Uuid,
    pub user_id: Uuid,
    pub kind: ChannelKind,
    pub display: String,
    pub events: Vec<EventKind>,
    pub label: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A channel ready to send to (secrets opened). `Debug` is redacted.
pub struct OpenChannel {
    pub channel_id: Uuid,
    pub kind: ChannelKind,
    pub destination: SecretString,
    pub secret: Option<SecretString>,
}

impl fmt::Debug for OpenChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "OpenChannel({} {}, [redacted])",
            self.kind, self.channel_id
        )
    }
}

/// The associated data that binds a sealed value to its user, channel and column.
fn aad(user: Uuid, channel: Uuid, column: &str) -> String {
    format!("{user}:notify:{channel}:{column}")
}

/// `scheme://host` of a URL that is allowed as a destination, or why it is not.
pub fn check_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    let (scheme, rest) = url
        .split_once("://")
        .ok_or("must be an absolute URL (https://...)")?;
    let host_port = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = host_port.rsplit_once('@').map_or(host_port, |(_, h)| h);
    let host = if let Some(h) = host_port.strip_prefix('[') {
        h.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    if host.is_empty() {
        return Err("the URL has no host".into());
    }
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match scheme.to_ascii_lowercase().as_str() {
        "https" => {}
        "http" if loopback => {}
        "http" => return Err("must be https (plain http only to a loopback host)".into()),
        other => return Err(format!("unsupported scheme `{other}`: use https")),
    }
    Ok(format!("{}://{host_port}", scheme.to_ascii_lowercase()))
}

/// Add a channel for `user`. Returns it, and the webhook's signing secret when one was generated
/// (shown once; only its ciphertext is stored).
pub async fn add(
    store: &Store,
    key: Option<&MasterKey>,
    user: Uuid,
    new: NewChannel,
) -> anyhow::Result<(ChannelInfo, Option<SecretString>)> {
    let dest = new.destination.expose().trim().to_string();
    let (display, secret, generated) = match new.kind {
        ChannelKind::Webhook => {
            let display = check_url(&dest).map_err(|e| anyhow::anyhow!("--url: {e}"))?;
            let (secret, generated) = match new.secret {
                Some(s) => {
                    super::format::check_signing_secret(s.expose())
                        .map_err(|e| anyhow::anyhow!("--secret: {e}"))?;
                    (s, None)
                }
                None => {
                    let s = super::format::generate_signing_secret();
                    (s.clone(), Some(s))
                }
            };
            (display, Some(secret), generated)
        }
        ChannelKind::Discord | ChannelKind::Slack => {
            let display = check_url(&dest).map_err(|e| anyhow::anyhow!("--url: {e}"))?;
            if new.secret.is_some() {
                anyhow::bail!("--secret: only webhook channels are signed");
            }
            (display, None, None)
        }
        ChannelKind::Telegram => {
            if dest.is_empty()
                || dest.len() > 64
                || !(dest.starts_with('@')
                    || dest
                        .trim_start_matches('-')
                        .chars()
                        .all(|c| c.is_ascii_digit()))
            {
                anyhow::bail!("--chat-id: a numeric chat id (e.g. -1001234567890) or @channelname");
            }
            let Some(token) = new.secret.filter(|t| !t.expose().trim().is_empty()) else {
                anyhow::bail!("--bot-token: required for a telegram channel");
            };
            (format!("telegram chat {dest}"), Some(token), None)
        }
    };
    let channel_id = Uuid::now_v7();
    let seal = |plain: &str, column: &str| match key {
        Some(k) => k.encrypt(plain, &aad(user, channel_id, column)),
        None => plain.to_string(),
    };
    let events: Vec<&str> = new.events.iter().map(|e| e.as_str()).collect();
    let row = sqlx::query(
        "INSERT INTO notification_channels (channel_id, user_id, kind, destination, secret, display, events, label)
         SELECT $1, user_id, $3, $4, $5, $6, $7, $8 FROM users WHERE user_id = $2
         RETURNING created_at",
    )
    .bind(channel_id)
    .bind(user)
    .bind(new.kind.as_str())
    .bind(seal(&dest, "destination"))
    .bind(secret.as_ref().map(|s| seal(s.expose(), "secret")))
    .bind(&display)
    .bind(&events)
    .bind(&new.label)
    .fetch_optional(&store.pool)
    .await
    .map_err(StoreError::from)?;
    let Some(row) = row else {
        anyhow::bail!("--user: no user {user}");
    };
    Ok((
        ChannelInfo {
            channel_id,
            user_id: user,
            kind: new.kind,
            display,
            events: new.events,
            label: new.label,
            created_at: row.get("created_at"),
        },
        generated,
    ))
}

/// The user's channels, oldest first.
pub async fn list(store: &Store, user: Uuid) -> Result<Vec<ChannelInfo>, StoreError> {
    let rows = sqlx::query(
        "SELECT channel_id, user_id, kind, display, events, label, created_at
         FROM notification_channels WHERE user_id = $1 ORDER BY channel_id",
    )
    .bind(user)
    .fetch_all(&store.pool)
    .await?;
    rows.iter()
        .map(|r| {
            let kind: String = r.try_get("kind")?;
            let events: Vec<String> = r.try_get("events")?;
            Ok(ChannelInfo {
                channel_id: r.try_get("channel_id")?,
                user_id: r.try_get("user_id")?,
                kind: kind.parse().unwrap_or(ChannelKind::Webhook),
                display: r.try_get("display")?,
                events: events.iter().filter_map(|e| e.parse().ok()).collect(),
                label: r.try_get("label")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(StoreError::from)
}

/// Remove a channel of `user` (its pending deliveries go with it). `false`: no such channel.
pub async fn remove(store: &Store, user: Uuid, channel: Uuid) -> Result<bool, StoreError> {
    Ok(
        sqlx::query("DELETE FROM notification_channels WHERE user_id = $1 AND channel_id = $2")
            .bind(user)
            .bind(channel)
            .execute(&store.pool)
            .await?
            .rows_affected()
            > 0,
    )
}

/// Open a stored channel's sealed columns.
pub fn open_row(
    keys: &[&MasterKey],
    user: Uuid,
    channel_id: Uuid,
    kind: &str,
    destination: &str,
    secret: Option<&str>,
) -> Result<OpenChannel, String> {
    let kind: ChannelKind = kind.parse()?;
    let destination = open(destination, &aad(user, channel_id, "destination"), keys)
        .map_err(|e| format!("channel destination: {e}"))?;
    let secret = secret
        .map(|s| open(s, &aad(user, channel_id, "secret"), keys))
        .transpose()
        .map_err(|e| format!("channel secret: {e}"))?;
    Ok(OpenChannel {
        channel_id,
        kind,
        destination,
        secret,
    })
}

/// One channel of `user`, opened (for `notify test`).
pub async fn load(
    store: &Store,
    keys: &[&MasterKey],
    user: Uuid,
    channel: Uuid,
) -> anyhow::Result<OpenChannel> {
    let r = sqlx::query(
        "SELECT kind, destination, secret FROM notification_channels WHERE user_id = $1 AND channel_id = $2",
    )
    .bind(user)
    .bind(channel)
    .fetch_optional(&store.pool)
    .await
    .map_err(StoreError::from)?;
    let Some(r) = r else {
        anyhow::bail!("--channel: user {user} has no channel {channel}");
    };
    open_row(
        keys,
        user,
        channel,
        r.get("kind"),
        r.get("destination"),
        r.get("secret"),
    )
    .map_err(|e| anyhow::anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_destination_or_secret() {
        let c = NewChannel {
            kind: ChannelKind::Telegram,
            destination: SecretString::new("-100999"),
            secret: Some(SecretString::new("123:TOKENVALUE")),
            events: vec![EventKind::Dead],
            label: None,
        };
        let o = OpenChannel {
            channel_id: Uuid::nil(),
            kind: ChannelKind::Discord,
            destination: SecretString::new("https://discord.com/api/webhooks/1/SECRETPART"),
            secret: None,
        };
        let dbg = format!("{c:?} {o:?}");
        for s in ["-100999", "TOKENVALUE", "SECRETPART"] {
            assert!(!dbg.contains(s), "{dbg}");
        }
    }

    #[test]
    fn urls_must_be_https_except_to_loopback() {
        assert_eq!(
            check_url("https://discord.com/api/webhooks/1/abc").unwrap(),
            "https://discord.com"
        );
        assert_eq!(
            check_url("http://127.0.0.1:8080/hook").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(check_url("http://example.com/hook")
            .unwrap_err()
            .contains("https"));
        assert!(check_url("ftp://example.com").is_err());
        assert!(check_url("example.com").is_err());
        assert!(check_url("https:///x").is_err());
    }
}
