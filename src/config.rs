//! Configuration from the environment (and `.env` when present).
//!
//! Every variable has the default of `design.md`; a value that does not parse stops start-up with one
//! line naming the variable (`ConfigError`), never a panic. `Config::from_env` is what the binaries
//! call; tests build a `Config` by hand (`Config::default()` plus the fields they care about).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use crate::net::{self, IpNet};
use crate::queue::RateLimit;
use crate::secrets::MasterKey;

/// A configuration value that could not be used. Its `Display` is the one line printed at start-up.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Which kind of deployment this is. Outside `dev`, a master key is required (credentials must be
/// encrypted at rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Environment {
    Dev,
    Production,
}

#[derive(Clone)]
pub struct Config {
    pub database_url: String,
    pub redis_url: String,
    /// Redis Cluster seed nodes (`REDIS_CLUSTER_URLS`, comma-separated). When not empty, every
    /// process talks to the cluster and `redis_url` is ignored.
    pub redis_cluster_urls: Vec<String>,
    /// `SPARKY_REDIS_WAIT_REPLICAS`: the ingress answers 202 only after this many replicas hold
    /// the entry (`WAIT`), and a worker counts a lease renewal only once it reached them (0 = off).
    pub redis_wait_replicas: u32,
    /// `SPARKY_REDIS_WAIT_TIMEOUT_MS`: how long one `WAIT` may take before the write counts as
    /// not replicated (the ingress answers 503 "may or may not have been accepted").
    pub redis_wait_timeout: Duration,
    /// Prefix of every Redis key (isolates deployments and tests).
    pub namespace: String,
    pub master_key: Option<MasterKey>,
    pub environment: Environment,
    /// Ingress port.
    pub port: u16,
    /// Worker health/metrics port.
    pub worker_port: u16,
    pub partitions: u32,
    pub worker_concurrency: usize,
    /// How long a worker's partition lease lasts without renewal (takeover time after a crash).
    pub lease_ttl: Duration,
    /// An entry delivered more often than this goes to the dead-letter stream as `poison`.
    pub max_deliveries: u32,
    /// Partition stream entries are kept this long (for `sparky replay --since`), never trimmed
    /// while pending or unread.
    pub stream_retention: Duration,
    pub max_signal_age: Duration,
    /// How long a webhook secret lookup is cached in the ingress (rotation takes effect within this).
    pub secret_cache_ttl: Duration,
    /// How long credentials stay in the Redis cache.
    pub credential_cache_ttl: Duration,
    /// How often each worker reconciles the accounts of the users in the partitions it owns with
    /// their brokers and follows their working entries (`SPARKY_RECONCILE_INTERVAL_SECS`, default
    /// 60; 0 disables the periodic sweep: `sparky reconcile` still works).
    pub reconcile_interval: Duration,
    /// Transient exchange failures are retried this many times (after the first attempt).
    pub exchange_retries: usize,
    /// ... and for at most this long in total.
    pub exchange_retry_max: Duration,
    /// Timeout of one HTTP request to an exchange (the slowest a single exchange call can be).
    pub exchange_timeout: Duration,
    /// On SIGTERM: how long the ingress waits for in-flight requests and the worker for started jobs.
    pub drain_timeout: Duration,
    /// Per-user webhook rate limit: a token bucket in Redis shared by every ingress replica.
    pub rate_limit: RateLimit,
    /// Failed authentications allowed per `auth_fail_window`, counted per (source, claimed
    /// `user_id`) and, for sources that are not shared, per source (0 = no limit). A source is an
    /// IPv4 address or an IPv6 /64.
    pub auth_fail_limit: u32,
    pub auth_fail_window: Duration,
    /// Sources that carry many users' alerts (`SPARKY_SHARED_SOURCES`, default TradingView's four
    /// addresses): never blocked as a whole, only per claimed `user_id`. `SPARKY_IP_ALLOWLIST`
    /// entries are shared sources too.
    pub shared_sources: Vec<IpNet>,
    /// Uncached webhook-secret look-ups: at most this many Postgres queries at once
    /// (`SPARKY_SECRET_LOOKUP_CONCURRENCY`); each query answers a batch of waiting secrets.
    pub secret_lookup_concurrency: usize,
    /// ... at most this many secrets waiting for one (`SPARKY_SECRET_LOOKUP_QUEUE`); beyond it a
    /// request gets `503` with `Retry-After`.
    pub secret_lookup_queue: usize,
    /// ... and a request waits at most this long for its look-up (`SPARKY_SECRET_LOOKUP_WAIT_MS`).
    pub secret_lookup_wait: Duration,
    /// Peers whose `X-Forwarded-For` is believed (load balancers in front of the ingress).
    pub trusted_proxies: Vec<IpNet>,
    /// When set, only these client addresses may `POST /webhook`.
    pub ip_allowlist: Option<Vec<IpNet>>,
    pub aster_base_url: Option<String>,
    pub oanda_base_url: Option<String>,
    pub tradier_base_url: Option<String>,
    pub log_level: String,
    pub log_format: LogFormat,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("redis_url", &redact_url(&self.redis_url))
            .field(
                "redis_cluster_urls",
                &self
                    .redis_cluster_urls
                    .iter()
                    .map(|u| redact_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("redis_wait_replicas", &self.redis_wait_replicas)
            .field("redis_wait_timeout", &self.redis_wait_timeout)
            .field("namespace", &self.namespace)
            .field(
                "master_key",
                &self.master_key.as_ref().map(|_| "[redacted]"),
            )
            .field("environment", &self.environment)
            .field("port", &self.port)
            .field("worker_port", &self.worker_port)
            .field("partitions", &self.partitions)
            .field("worker_concurrency", &self.worker_concurrency)
            .field("lease_ttl", &self.lease_ttl)
            .field("exchange_timeout", &self.exchange_timeout)
            .field("max_signal_age", &self.max_signal_age)
            .field("secret_cache_ttl", &self.secret_cache_ttl)
            .field("rate_limit", &self.rate_limit)
            .field("auth_fail_limit", &self.auth_fail_limit)
            .field("auth_fail_window", &self.auth_fail_window)
            .field("shared_sources", &self.shared_sources)
            .field("secret_lookup_concurrency", &self.secret_lookup_concurrency)
            .field("secret_lookup_queue", &self.secret_lookup_queue)
            .field("secret_lookup_wait", &self.secret_lookup_wait)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("ip_allowlist", &self.ip_allowlist)
            .finish_non_exhaustive()
    }
}

/// Hide the password of a `scheme://user:password@host` URL.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: "postgres://postgres@127.0.0.1:5432/sparky".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_cluster_urls: Vec::new(),
            redis_wait_replicas: 0,
            redis_wait_timeout: Duration::from_millis(500),
            namespace: "sparky".into(),
            master_key: None,
            environment: Environment::Dev,
            port: 3000,
            worker_port: 9100,
            partitions: 16,
            worker_concurrency: 64,
            lease_ttl: Duration::from_secs(12),
            max_deliveries: 5,
            stream_retention: Duration::from_secs(7 * 24 * 3600),
            max_signal_age: Duration::from_secs(60),
            secret_cache_ttl: Duration::from_secs(30),
            credential_cache_ttl: Duration::from_secs(60),
            reconcile_interval: Duration::from_secs(60),
            exchange_retries: 5,
            exchange_retry_max: Duration::from_secs(30),
            exchange_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            rate_limit: RateLimit {
                per_sec: 10.0,
                burst: 20,
            },
            auth_fail_limit: 20,
            auth_fail_window: Duration::from_secs(60),
            shared_sources: net::parse_list("tradingview").expect("static list"),
            secret_lookup_concurrency: 2,
            secret_lookup_queue: 4096,
            secret_lookup_wait: Duration::from_secs(2),
            trusted_proxies: Vec::new(),
            ip_allowlist: None,
            aster_base_url: None,
            oanda_base_url: None,
            tradier_base_url: None,
            log_level: "info".into(),
            log_format: LogFormat::Pretty,
        }
    }
}

impl Config {
    /// Reads `.env` (if present, without overriding the real environment), then the environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        let _ = dotenvy::dotenv();
        let vars: HashMap<String, String> = std::env::vars().collect();
        Self::from_map(&vars)
    }

    /// The parser behind `from_env`, over any map (unit-testable without touching the process env).
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Config, ConfigError> {
        let d = Config::default();
        let get = |k: &str| vars.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let environment = match get("SPARKY_ENV") {
            None | Some("dev") | Some("development") => Environment::Dev,
            Some("production") | Some("prod") => Environment::Production,
            Some(other) => {
                return Err(err(
                    "SPARKY_ENV",
                    format!("expected `dev` or `production`, got `{other}`"),
                ))
            }
        };
        let mut master_key = match get("SPARKY_MASTER_KEY") {
            Some(v) => Some(
                MasterKey::from_base64(v).map_err(|m| err("SPARKY_MASTER_KEY", m.to_string()))?,
            ),
            None => None,
        };
        if let Some(list) = get("SPARKY_OLD_MASTER_KEYS") {
            let Some(current) = master_key.take() else {
                return Err(err(
                    "SPARKY_OLD_MASTER_KEYS",
                    "set, but SPARKY_MASTER_KEY is not: old keys only decrypt, the current key encrypts".into(),
                ));
            };
            let mut old = Vec::new();
            for (i, item) in list.split(',').map(str::trim).enumerate() {
                if item.is_empty() {
                    continue;
                }
                // The error names the position, never the value.
                old.push(
                    MasterKey::from_base64(item).map_err(|m| {
                        err("SPARKY_OLD_MASTER_KEYS", format!("entry {}: {m}", i + 1))
                    })?,
                );
            }
            master_key = Some(current.with_retired(old));
        }
        if environment == Environment::Production && master_key.is_none() {
            return Err(err(
                "SPARKY_MASTER_KEY",
                "required when SPARKY_ENV=production (base64 of 32 random bytes, e.g. `openssl rand -base64 32`)".into(),
            ));
        }
        let namespace = get("SPARKY_NAMESPACE").unwrap_or(&d.namespace).to_string();
        if !namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        {
            return Err(err(
                "SPARKY_NAMESPACE",
                "only letters, digits, `_`, `-` and `.` are allowed".into(),
            ));
        }
        let log_format = match get("LOG_FORMAT") {
            None | Some("pretty") | Some("text") => LogFormat::Pretty,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(err(
                    "LOG_FORMAT",
                    format!("expected `pretty` or `json`, got `{other}`"),
                ))
            }
        };
        let url = |k: &'static str, default: &str| -> Result<String, ConfigError> {
            let v = get(k).unwrap_or(default).to_string();
            if !v.contains("://") {
                return Err(err(k, format!("`{v}` is not a URL")));
            }
            Ok(v)
        };
        let opt_url = |k: &'static str| -> Result<Option<String>, ConfigError> {
            match get(k) {
                Some(v) if v.starts_with("http://") || v.starts_with("https://") => {
                    Ok(Some(v.trim_end_matches('/').to_string()))
                }
                Some(v) => Err(err(k, format!("`{v}` is not an http(s) URL"))),
                None => Ok(None),
            }
        };
        let partitions: u32 = num(vars, "SPARKY_PARTITIONS", d.partitions)?;
        if partitions == 0 || partitions > 4096 {
            return Err(err(
                "SPARKY_PARTITIONS",
                "must be between 1 and 4096".into(),
            ));
        }
        let worker_concurrency: usize =
            num(vars, "SPARKY_WORKER_CONCURRENCY", d.worker_concurrency)?;
        if worker_concurrency == 0 {
            return Err(err(
                "SPARKY_WORKER_CONCURRENCY",
                "must be at least 1".into(),
            ));
        }
        let lease_ttl = Duration::from_millis(num(
            vars,
            "SPARKY_LEASE_TTL_MS",
            d.lease_ttl.as_millis() as u64,
        )?);
        if lease_ttl < Duration::from_millis(500) {
            return Err(err(
                "SPARKY_LEASE_TTL_MS",
                "must be at least 500 (ms)".into(),
            ));
        }
        let exchange_timeout = Duration::from_millis(num(
            vars,
            "SPARKY_EXCHANGE_TIMEOUT_MS",
            d.exchange_timeout.as_millis() as u64,
        )?);
        if exchange_timeout < Duration::from_millis(100) {
            return Err(err(
                "SPARKY_EXCHANGE_TIMEOUT_MS",
                "must be at least 100 (ms)".into(),
            ));
        }
        let secret_cache_ttl = Duration::from_secs(num(
            vars,
            "SPARKY_SECRET_CACHE_TTL_SECS",
            d.secret_cache_ttl.as_secs(),
        )?);
        if secret_cache_ttl > Duration::from_secs(60) {
            return Err(err(
                "SPARKY_SECRET_CACHE_TTL_SECS",
                "at most 60: a rotated or revoked secret must stop working within a minute".into(),
            ));
        }
        let per_sec: f64 = num(vars, "SPARKY_RATE_LIMIT_PER_SEC", d.rate_limit.per_sec)?;
        if !per_sec.is_finite() || per_sec < 0.0 {
            return Err(err(
                "SPARKY_RATE_LIMIT_PER_SEC",
                "must be a number >= 0 (0 turns the limit off)".into(),
            ));
        }
        let burst: u32 = num(vars, "SPARKY_RATE_LIMIT_BURST", d.rate_limit.burst)?;
        if burst == 0 && per_sec > 0.0 {
            return Err(err(
                "SPARKY_RATE_LIMIT_BURST",
                "must be at least 1 (to turn the limit off set SPARKY_RATE_LIMIT_PER_SEC=0)".into(),
            ));
        }
        let auth_fail_window = Duration::from_secs(num(
            vars,
            "SPARKY_AUTH_FAIL_WINDOW_SECS",
            d.auth_fail_window.as_secs(),
        )?);
        if auth_fail_window.is_zero() {
            return Err(err(
                "SPARKY_AUTH_FAIL_WINDOW_SECS",
                "must be at least 1".into(),
            ));
        }
        let nets = |k: &'static str| -> Result<Vec<IpNet>, ConfigError> {
            net::parse_list(get(k).unwrap_or("")).map_err(|m| err(k, m))
        };
        let trusted_proxies = nets("SPARKY_TRUSTED_PROXIES")?;
        let ip_allowlist = Some(nets("SPARKY_IP_ALLOWLIST")?).filter(|l| !l.is_empty());
        let shared_sources = match get("SPARKY_SHARED_SOURCES") {
            None => d.shared_sources.clone(),
            Some(v) if v.eq_ignore_ascii_case("none") => Vec::new(),
            Some(_) => nets("SPARKY_SHARED_SOURCES")?,
        };
        let secret_lookup_concurrency: usize = num(
            vars,
            "SPARKY_SECRET_LOOKUP_CONCURRENCY",
            d.secret_lookup_concurrency,
        )?;
        if !(1..=6).contains(&secret_lookup_concurrency) {
            return Err(err(
                "SPARKY_SECRET_LOOKUP_CONCURRENCY",
                "must be between 1 and 6: the ingress has 8 Postgres connections, and secret look-ups must leave some to the job API and /readyz".into(),
            ));
        }
        let secret_lookup_queue: usize =
            num(vars, "SPARKY_SECRET_LOOKUP_QUEUE", d.secret_lookup_queue)?;
        if secret_lookup_queue == 0 {
            return Err(err(
                "SPARKY_SECRET_LOOKUP_QUEUE",
                "must be at least 1".into(),
            ));
        }
        let secret_lookup_wait = Duration::from_millis(num(
            vars,
            "SPARKY_SECRET_LOOKUP_WAIT_MS",
            d.secret_lookup_wait.as_millis() as u64,
        )?);
        if secret_lookup_wait < Duration::from_millis(10) {
            return Err(err(
                "SPARKY_SECRET_LOOKUP_WAIT_MS",
                "must be at least 10 (ms)".into(),
            ));
        }
        let mut redis_cluster_urls = Vec::new();
        for item in get("REDIS_CLUSTER_URLS").unwrap_or("").split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            if !item.starts_with("redis://") && !item.starts_with("rediss://") {
                return Err(err(
                    "REDIS_CLUSTER_URLS",
                    format!(
                        "`{}` is not a redis:// URL (give comma-separated seed nodes, e.g. redis://10.0.0.1:7000,redis://10.0.0.2:7000)",
                        redact_url(item)
                    ),
                ));
            }
            redis_cluster_urls.push(item.to_string());
        }
        let redis_wait_replicas: u32 =
            num(vars, "SPARKY_REDIS_WAIT_REPLICAS", d.redis_wait_replicas)?;
        let redis_wait_timeout = Duration::from_millis(num(
            vars,
            "SPARKY_REDIS_WAIT_TIMEOUT_MS",
            d.redis_wait_timeout.as_millis() as u64,
        )?);
        if redis_wait_timeout < Duration::from_millis(10) {
            return Err(err(
                "SPARKY_REDIS_WAIT_TIMEOUT_MS",
                "must be at least 10 (ms); WAIT 0 would wait forever".into(),
            ));
        }
        Ok(Config {
            database_url: url("DATABASE_URL", &d.database_url)?,
            redis_url: url("REDIS_URL", &d.redis_url)?,
            redis_cluster_urls,
            redis_wait_replicas,
            redis_wait_timeout,
            namespace,
            master_key,
            environment,
            port: num(vars, "PORT", d.port)?,
            worker_port: num(vars, "WORKER_PORT", d.worker_port)?,
            partitions,
            worker_concurrency,
            lease_ttl,
            max_deliveries: num(vars, "SPARKY_MAX_DELIVERIES", d.max_deliveries)?,
            stream_retention: Duration::from_secs(num(
                vars,
                "SPARKY_STREAM_RETENTION_SECS",
                d.stream_retention.as_secs(),
            )?),
            max_signal_age: Duration::from_secs(num(
                vars,
                "SPARKY_MAX_SIGNAL_AGE_SECS",
                d.max_signal_age.as_secs(),
            )?),
            secret_cache_ttl,
            credential_cache_ttl: Duration::from_secs(num(
                vars,
                "SPARKY_CREDENTIAL_CACHE_TTL_SECS",
                d.credential_cache_ttl.as_secs(),
            )?),
            reconcile_interval: Duration::from_secs(num(
                vars,
                "SPARKY_RECONCILE_INTERVAL_SECS",
                d.reconcile_interval.as_secs(),
            )?),
            exchange_retries: num(vars, "SPARKY_EXCHANGE_RETRIES", d.exchange_retries)?,
            exchange_retry_max: Duration::from_secs(num(
                vars,
                "SPARKY_EXCHANGE_RETRY_MAX_SECS",
                d.exchange_retry_max.as_secs(),
            )?),
            exchange_timeout,
            drain_timeout: Duration::from_secs(num(
                vars,
                "SPARKY_DRAIN_TIMEOUT_SECS",
                d.drain_timeout.as_secs(),
            )?),
            rate_limit: RateLimit { per_sec, burst },
            auth_fail_limit: num(vars, "SPARKY_AUTH_FAIL_LIMIT", d.auth_fail_limit)?,
            auth_fail_window,
            shared_sources,
            secret_lookup_concurrency,
            secret_lookup_queue,
            secret_lookup_wait,
            trusted_proxies,
            ip_allowlist,
            aster_base_url: opt_url("ASTER_BASE_URL")?,
            oanda_base_url: opt_url("OANDA_BASE_URL")?,
            tradier_base_url: opt_url("TRADIER_BASE_URL")?,
            log_level: get("LOG_LEVEL").unwrap_or(&d.log_level).to_string(),
            log_format,
        })
    }

    /// Where Redis is: the cluster when `REDIS_CLUSTER_URLS` is set, else `REDIS_URL`.
    pub fn redis_target(&self) -> crate::redis_conn::RedisTarget {
        if self.redis_cluster_urls.is_empty() {
            crate::redis_conn::RedisTarget::Single(self.redis_url.clone())
        } else {
            crate::redis_conn::RedisTarget::Cluster(self.redis_cluster_urls.clone())
        }
    }

    /// How long after *sending* a successful renewal this worker may act on a partition: the
    /// lease TTL minus a fifth, for clock rate differences between this host and Redis.
    pub fn lease_validity(&self) -> Duration {
        self.lease_ttl - self.lease_ttl / 5
    }

    /// How often a worker heartbeats and renews its leases.
    pub fn renew_interval(&self) -> Duration {
        self.lease_ttl / 3
    }

    /// The worker's timing rule. A broker request is sent only if it can finish (the request
    /// timeout) before the lease validity ends, counted from the last renewal's send time. Just
    /// before a renewal, `validity - renewal interval` of that window is left; if it were shorter
    /// than one request timeout, requests would have to wait for every renewal. So:
    /// `0.8 x SPARKY_LEASE_TTL_MS - SPARKY_LEASE_TTL_MS / 3 >= SPARKY_EXCHANGE_TIMEOUT_MS`.
    /// Then no request is ever in flight once another worker could own the partition.
    pub fn check_worker_timing(&self) -> Result<(), ConfigError> {
        let window = self.lease_validity().saturating_sub(self.renew_interval());
        if window < self.exchange_timeout {
            return Err(err(
                "SPARKY_LEASE_TTL_MS",
                format!(
                    "{ttl} ms leaves too short a window for one broker request: validity 0.8 x {ttl} = {v} ms, minus the renewal interval {ttl} / 3 = {r} ms, is {w} ms, less than SPARKY_EXCHANGE_TIMEOUT_MS={t} ms. A request could still be in flight when another worker takes the partition; set SPARKY_LEASE_TTL_MS to at least {min} or lower the timeout",
                    ttl = self.lease_ttl.as_millis(),
                    v = self.lease_validity().as_millis(),
                    r = self.renew_interval().as_millis(),
                    w = window.as_millis(),
                    t = self.exchange_timeout.as_millis(),
                    // 0.8 T - T/3 = 7 T / 15
                    min = (self.exchange_timeout.as_millis() * 15).div_ceil(7),
                ),
            ));
        }
        Ok(())
    }
}

fn err(var: &'static str, message: String) -> ConfigError {
    ConfigError { var, message }
}

fn num<T: std::str::FromStr>(
    vars: &HashMap<String, String>,
    key: &'static str,
    default: T,
) -> Result<T, ConfigError> {
    match vars.get(key).map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| err(key, format!("`{v}` is not a valid non-negative number"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_design() {
        let c = Config::from_map(&HashMap::new()).unwrap();
        assert_eq!(c.port, 3000);
        assert_eq!(c.worker_port, 9100);
        assert_eq!(c.partitions, 16);
        assert_eq!(c.worker_concurrency, 64);
        assert_eq!(c.max_signal_age, Duration::from_secs(60));
        assert_eq!(c.namespace, "sparky");
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379");
        assert!(c.redis_cluster_urls.is_empty());
        assert_eq!(c.redis_wait_replicas, 0);
    }

    #[test]
    fn cluster_urls_switch_to_the_cluster_and_are_checked() {
        let c = Config::from_map(&map(&[(
            "REDIS_CLUSTER_URLS",
            " redis://127.0.0.1:7000, redis://127.0.0.1:7001 ,",
        )]))
        .unwrap();
        assert_eq!(
            c.redis_target(),
            crate::redis_conn::RedisTarget::Cluster(vec![
                "redis://127.0.0.1:7000".into(),
                "redis://127.0.0.1:7001".into()
            ])
        );
        let e = Config::from_map(&map(&[(
            "REDIS_CLUSTER_URLS",
            "redis://127.0.0.1:7000,http://u:hunter2@x:1",
        )]))
        .unwrap_err();
        assert_eq!(e.var, "REDIS_CLUSTER_URLS");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = Config::from_map(&map(&[("SPARKY_REDIS_WAIT_REPLICAS", "-1")])).unwrap_err();
        assert_eq!(e.var, "SPARKY_REDIS_WAIT_REPLICAS");
        let c = Config::from_map(&map(&[("SPARKY_REDIS_WAIT_REPLICAS", "1")])).unwrap();
        assert_eq!(c.redis_wait_replicas, 1);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = Config::from_map(&map(&[("SPARKY_PARTITIONS", "many")])).unwrap_err();
        assert_eq!(e.var, "SPARKY_PARTITIONS");
        assert!(e.to_string().contains("SPARKY_PARTITIONS"), "{e}");
        let e = Config::from_map(&map(&[("PORT", "-1")])).unwrap_err();
        assert_eq!(e.var, "PORT");
        let e = Config::from_map(&map(&[("LOG_FORMAT", "xml")])).unwrap_err();
        assert_eq!(e.var, "LOG_FORMAT");
        let e = Config::from_map(&map(&[("SPARKY_MASTER_KEY", "short")])).unwrap_err();
        assert_eq!(e.var, "SPARKY_MASTER_KEY");
        let e = Config::from_map(&map(&[("SPARKY_ENV", "production")])).unwrap_err();
        assert_eq!(e.var, "SPARKY_MASTER_KEY");
        let e = Config::from_map(&map(&[("SPARKY_PARTITIONS", "0")])).unwrap_err();
        assert_eq!(e.var, "SPARKY_PARTITIONS");
    }

    #[test]
    fn security_settings_parse_and_bad_ones_name_the_variable() {
        let c = Config::from_map(&HashMap::new()).unwrap();
        assert_eq!(c.rate_limit.per_sec, 10.0);
        assert_eq!(c.rate_limit.burst, 20);
        assert_eq!(c.auth_fail_limit, 20);
        assert!(c.ip_allowlist.is_none() && c.trusted_proxies.is_empty());
        assert_eq!(c.shared_sources, net::parse_list("tradingview").unwrap());
        assert_eq!(c.secret_lookup_concurrency, 2);
        let c = Config::from_map(&map(&[
            ("SPARKY_SHARED_SOURCES", "203.0.113.0/24, tradingview"),
            ("SPARKY_SECRET_LOOKUP_WAIT_MS", "500"),
        ]))
        .unwrap();
        assert_eq!(c.shared_sources.len(), 5);
        assert_eq!(c.secret_lookup_wait, Duration::from_millis(500));
        let c = Config::from_map(&map(&[("SPARKY_SHARED_SOURCES", "none")])).unwrap();
        assert!(c.shared_sources.is_empty());

        let k1 = MasterKey::generate_base64();
        let k2 = MasterKey::generate_base64();
        let c = Config::from_map(&map(&[
            ("SPARKY_MASTER_KEY", &k1),
            ("SPARKY_OLD_MASTER_KEYS", &format!("{k2}, {k1}")),
            ("SPARKY_RATE_LIMIT_PER_SEC", "0.5"),
            ("SPARKY_RATE_LIMIT_BURST", "3"),
            ("SPARKY_TRUSTED_PROXIES", "10.0.0.0/8"),
            ("SPARKY_IP_ALLOWLIST", "tradingview"),
        ]))
        .unwrap();
        let mk = c.master_key.unwrap();
        let old = MasterKey::from_base64(&k2).unwrap();
        assert_eq!(
            mk.retired_ids(),
            vec![old.id()],
            "the current key is not its own retired key"
        );
        assert_eq!(c.rate_limit.per_sec, 0.5);
        assert_eq!(c.ip_allowlist.unwrap().len(), 4);
        assert_eq!(c.trusted_proxies.len(), 1);

        for (pairs, var) in [
            (
                vec![("SPARKY_OLD_MASTER_KEYS", k2.as_str())],
                "SPARKY_OLD_MASTER_KEYS",
            ),
            (
                vec![
                    ("SPARKY_MASTER_KEY", k1.as_str()),
                    ("SPARKY_OLD_MASTER_KEYS", "c2hvcnQ="),
                ],
                "SPARKY_OLD_MASTER_KEYS",
            ),
            (
                vec![("SPARKY_SECRET_CACHE_TTL_SECS", "61")],
                "SPARKY_SECRET_CACHE_TTL_SECS",
            ),
            (
                vec![("SPARKY_RATE_LIMIT_PER_SEC", "fast")],
                "SPARKY_RATE_LIMIT_PER_SEC",
            ),
            (
                vec![("SPARKY_RATE_LIMIT_PER_SEC", "-1")],
                "SPARKY_RATE_LIMIT_PER_SEC",
            ),
            (
                vec![("SPARKY_RATE_LIMIT_PER_SEC", "NaN")],
                "SPARKY_RATE_LIMIT_PER_SEC",
            ),
            (
                vec![("SPARKY_RATE_LIMIT_BURST", "0")],
                "SPARKY_RATE_LIMIT_BURST",
            ),
            (
                vec![("SPARKY_AUTH_FAIL_LIMIT", "x")],
                "SPARKY_AUTH_FAIL_LIMIT",
            ),
            (
                vec![("SPARKY_AUTH_FAIL_WINDOW_SECS", "0")],
                "SPARKY_AUTH_FAIL_WINDOW_SECS",
            ),
            (
                vec![("SPARKY_SHARED_SOURCES", "tv.example")],
                "SPARKY_SHARED_SOURCES",
            ),
            (
                vec![("SPARKY_SECRET_LOOKUP_CONCURRENCY", "0")],
                "SPARKY_SECRET_LOOKUP_CONCURRENCY",
            ),
            (
                vec![("SPARKY_SECRET_LOOKUP_QUEUE", "0")],
                "SPARKY_SECRET_LOOKUP_QUEUE",
            ),
            (
                vec![("SPARKY_SECRET_LOOKUP_WAIT_MS", "1")],
                "SPARKY_SECRET_LOOKUP_WAIT_MS",
            ),
            (
                vec![("SPARKY_TRUSTED_PROXIES", "lb.internal")],
                "SPARKY_TRUSTED_PROXIES",
            ),
            (
                vec![("SPARKY_IP_ALLOWLIST", "1.2.3.4/40")],
                "SPARKY_IP_ALLOWLIST",
            ),
        ] {
            let e = Config::from_map(&map(&pairs)).unwrap_err();
            assert_eq!(e.var, var, "{e}");
            assert!(e.to_string().contains(var), "{e}");
            assert!(
                !e.to_string().contains(&k2) && !e.to_string().contains(&k1),
                "{e}"
            );
        }
        // the limit can be turned off
        let c = Config::from_map(&map(&[
            ("SPARKY_RATE_LIMIT_PER_SEC", "0"),
            ("SPARKY_RATE_LIMIT_BURST", "0"),
        ]))
        .unwrap();
        assert!(!c.rate_limit.enabled());
    }

    #[test]
    fn a_lease_window_shorter_than_one_request_is_refused() {
        let c = Config::from_map(&HashMap::new()).unwrap();
        assert_eq!(c.exchange_timeout, Duration::from_secs(5));
        c.check_worker_timing()
            .expect("the defaults are consistent");
        let c = Config::from_map(&map(&[("SPARKY_LEASE_TTL_MS", "2000")])).unwrap();
        let e = c.check_worker_timing().unwrap_err();
        assert_eq!(e.var, "SPARKY_LEASE_TTL_MS");
        assert!(
            e.to_string().contains("SPARKY_EXCHANGE_TIMEOUT_MS=5000")
                && e.to_string().contains("at least 10715"),
            "{e}"
        );
        let c = Config::from_map(&map(&[
            ("SPARKY_LEASE_TTL_MS", "2000"),
            ("SPARKY_EXCHANGE_TIMEOUT_MS", "900"),
        ]))
        .unwrap();
        c.check_worker_timing().unwrap();
        let e = Config::from_map(&map(&[("SPARKY_EXCHANGE_TIMEOUT_MS", "10")])).unwrap_err();
        assert_eq!(e.var, "SPARKY_EXCHANGE_TIMEOUT_MS");
    }

    #[test]
    fn debug_hides_passwords() {
        let c = Config {
            database_url: "postgres://u:hunter2@db/x".into(),
            ..Config::default()
        };
        let s = format!("{c:?}");
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("postgres://u:***@db/x"), "{s}");
    }
}
