//! Loading a user's exchange credentials: Redis cache in front of Postgres `bot_credentials`.
//!
//! The cache key is `{ns}:cred:{user}:{exchange}:{environment or "default"}` with a TTL of
//! `SPARKY_CREDENTIAL_CACHE_TTL_SECS` (60 s). It holds the row exactly as stored in Postgres, i.e.
//! with `api_key`/`api_secret` still encrypted: plaintext secrets never reach Redis. Postgres is the
//! source of truth, and the fallback whenever the cache errors (a Redis hiccup costs a query, never a
//! trade). Decryption happens here, into [`SecretString`]s.

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use crate::domain::{CredentialEnv, ExchangeKind};
use crate::queue::Queue;
use crate::secrets::{self, CryptoError, MasterKey, SecretString};
use crate::store::{CredentialRow, Store, StoreError};

/// Decrypted credentials of one (user, exchange, environment).
#[derive(Clone, Debug)]
pub struct Credentials {
    pub user_id: Uuid,
    pub exchange: ExchangeKind,
    pub api_key: SecretString,
    pub api_secret: SecretString,
    pub account_id: Option<String>,
    pub environment: CredentialEnv,
    pub extra_config: Value,
    pub label: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// Postgres could not be asked: retry later.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The row exists but cannot be used (bad ciphertext, unknown key, bad environment).
    #[error("credentials of user {user_id} for {exchange} cannot be used: {message}")]
    Unusable {
        user_id: Uuid,
        exchange: ExchangeKind,
        message: String,
    },
}

/// The associated data that binds an encrypted credential to its row and column.
pub fn aad(user_id: &Uuid, exchange: &str, column: &str) -> String {
    format!("{user_id}:{}:{column}", exchange.to_ascii_lowercase())
}

/// Encrypt a credential row's secret columns in place (if a key is configured).
pub fn seal_row(row: &mut CredentialRow, key: Option<&MasterKey>) {
    if let Some(k) = key {
        if !secrets::is_encrypted(&row.api_key) {
            row.api_key = k.encrypt(&row.api_key, &aad(&row.user_id, &row.exchange, "api_key"));
        }
        if !secrets::is_encrypted(&row.api_secret) {
            row.api_secret = k.encrypt(
                &row.api_secret,
                &aad(&row.user_id, &row.exchange, "api_secret"),
            );
        }
    }
}

#[derive(Clone)]
pub struct CredentialLoader {
    store: Store,
    queue: Queue,
    ttl: Duration,
    keys: Vec<MasterKey>,
    metrics: crate::metrics::Metrics,
}

impl CredentialLoader {
    pub fn new(store: Store, queue: Queue, ttl: Duration, keys: Vec<MasterKey>) -> Self {
        CredentialLoader {
            metrics: crate::metrics::Metrics::new(&queue.keys.ns),
            store,
            queue,
            ttl,
            keys,
        }
    }

    /// The user's credentials for `exchange`, or `None` when there is no row.
    pub async fn load(
        &self,
        user_id: Uuid,
        exchange: ExchangeKind,
        environment: Option<CredentialEnv>,
    ) -> Result<Option<Credentials>, CredentialError> {
        let env = environment.map(|e| e.as_str());
        let key =
            self.queue
                .keys
                .credentials(&user_id, exchange.as_str(), env.unwrap_or("default"));
        let cached = self.cache_get(&key).await;
        self.metrics.credential_cache(matches!(cached, Ok(Some(_))));
        let row = match cached {
            Ok(Some(row)) => Some(row),
            Ok(None) => self.load_and_cache(&key, user_id, exchange, env).await?,
            Err(e) => {
                tracing::warn!(error = %e, "credential cache unavailable; reading Postgres");
                self.store
                    .load_credentials(user_id, exchange.as_str(), env)
                    .await?
            }
        };
        row.map(|r| self.open(r, exchange)).transpose()
    }

    async fn load_and_cache(
        &self,
        key: &str,
        user_id: Uuid,
        exchange: ExchangeKind,
        env: Option<&str>,
    ) -> Result<Option<CredentialRow>, CredentialError> {
        let row = self
            .store
            .load_credentials(user_id, exchange.as_str(), env)
            .await?;
        if let Some(r) = &row {
            let json = serde_json::to_string(r).expect("row serialises");
            let res: Result<(), redis::RedisError> = redis::cmd("SET")
                .arg(key)
                .arg(json)
                .arg("EX")
                .arg(self.ttl.as_secs().max(1))
                .query_async(&mut self.queue.conn())
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "could not fill the credential cache");
            }
        }
        Ok(row)
    }

    async fn cache_get(&self, key: &str) -> Result<Option<CredentialRow>, redis::RedisError> {
        let v: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.queue.conn())
            .await?;
        Ok(v.and_then(|s| serde_json::from_str(&s).ok()))
    }

    fn open(
        &self,
        r: CredentialRow,
        exchange: ExchangeKind,
    ) -> Result<Credentials, CredentialError> {
        let unusable = |message: String| CredentialError::Unusable {
            user_id: r.user_id,
            exchange,
            message,
        };
        let keys: Vec<&MasterKey> = self.keys.iter().collect();
        let open_col = |stored: &str, col: &str| {
            secrets::open(stored, &aad(&r.user_id, &r.exchange, col), &keys)
                .map_err(|e: CryptoError| unusable(format!("{col}: {e}")))
        };
        let api_key = open_col(&r.api_key, "api_key")?;
        let api_secret = open_col(&r.api_secret, "api_secret")?;
        let environment = r
            .environment
            .parse::<CredentialEnv>()
            .map_err(|e| unusable(format!("environment: {e}")))?;
        Ok(Credentials {
            user_id: r.user_id,
            exchange,
            api_key,
            api_secret,
            account_id: r.account_id.clone(),
            environment,
            extra_config: r.extra_config.clone(),
            label: r.label.clone(),
        })
    }
}
