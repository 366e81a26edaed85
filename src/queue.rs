//! The job queue: Redis Streams partitioned by user.
//!
//! # Design
//! A user's partition is `fnv1a64(user_id as 16 bytes) % P` ([`partition_of`]); it never changes
//! while `P` (`SPARKY_PARTITIONS`) is unchanged, and every process checks `P` against the value
//! recorded in Redis at start-up ([`Queue::check_partitions`]) so two processes can never disagree on
//! where a user's jobs live. Each partition is one stream with one consumer group (`workers`).
//!
//! The ingress appends with one atomic script ([`Queue::enqueue_limited`]): the idempotency check,
//! the user's rate-limit token bucket and the `XADD` happen in one round trip, so a repeated
//! `alert_id` can never enqueue twice, every ingress replica draws from the same bucket, and a `202`
//! is only answered after the `XADD` returned. An alert with nothing to check (no `alert_id`, and
//! the rate limit off) is appended by a bare `XADD`: the script would run only that, at twice the
//! Redis time.
//!
//! Idempotency keys follow Stripe's semantics: the key remembers the first job's id *and* the
//! SHA-256 of the canonical alert ([`alert_fingerprint`]). The same key with the same alert is a
//! retry ([`Enqueued::Duplicate`], `200`); the same key with a different alert is a mistake (a
//! template with a static `alert_id`) and is refused ([`Enqueued::Conflict`], `409` naming the first
//! job), never silently dropped.
//!
//! A worker reads with `XREADGROUP` and acknowledges an entry (`XACK`) only after the job's final
//! state is committed to Postgres; an entry that is read but never acked stays in the group's pending
//! list and is delivered again: the next owner of the partition claims it before reading anything
//! new (see [`Queue::claim_all_pending`] and the `lease` module).
//!
//! # Redis keys (`{ns}` is `SPARKY_NAMESPACE`, `{pN}` the partition's Redis Cluster hash tag)
//! | key | type | meaning |
//! | --- | --- | --- |
//! | `{ns}:meta:partitions` | string | the partition count every process must agree on |
//! | `{ns}:{pN}:stream` | stream | the partition's jobs; field `job` = [`Job`] as JSON; group `workers` |
//! | `{ns}:{pN}:idem:{user}:{alert_id}` | string, TTL 24 h | `<job id> <alert fingerprint>` of the job first accepted for that key (a bare job id from before fingerprints counts as the same alert) |
//! | `{ns}:{pN}:rl:{user}` | hash `tokens`, `ts` (ms, Redis clock), TTL = time to refill | the user's webhook token bucket |
//! | `{ns}:{pN}:lease` | string, PX TTL | id of the worker that owns the partition (see `lease`) |
//! | `{ns}:workers` | sorted set | live workers, scored by heartbeat expiry (ms, Redis clock) |
//! | `{ns}:authfail:{<source>}` | string, TTL `SPARKY_AUTH_FAIL_WINDOW_SECS` | failed authentications of a source (IPv4 address or IPv6 /64; the braces are literal, a hash tag); not kept for shared sources (see `ingress::auth`) |
//! | `{ns}:authfail:{<source>}:<user_id or ->` | string, same TTL | failed authentications from a source claiming that `user_id` |
//! | `{ns}:dlq` | stream | dead-letter entries (rejected, dead, unreadable), replayable |
//! | `{ns}:cred:{user}:{exchange}:{env}` | string, TTL 60 s | credential cache (see `credentials`) |
//!
//! All keys of one partition share the hash tag `{pN}`, so the enqueue script touches one slot. The
//! global keys (`meta:partitions`, `workers`, `dlq`, `cred:*`, `authfail:*`) are each used alone by
//! their command or script, so every command and script stays in one slot of a Redis Cluster
//! (`REDIS_CLUSTER_URLS`, see `redis_conn`). What differs there: [`Queue::read`] reads each
//! partition with its own `XREADGROUP` (a multi-stream read is `CROSSSLOT`), polling instead of
//! blocking; keyless commands (`SCAN`, `CONFIG`, `INFO`) go to every master.
//!
//! With `SPARKY_REDIS_WAIT_REPLICAS=N` the enqueue script (and the lease acquire/renew scripts) are
//! pipelined with `WAIT N timeout` on the same node ([`Queue::eval`]): one round trip, and a `202`
//! only once N replicas hold the entry ([`QueueError::NotReplicated`] otherwise, answered `503`).

use std::time::Duration;

use redis::{Script, Value};
use uuid::Uuid;

use crate::domain::{Alert, Job};
pub use crate::redis_conn::{RedisClient, RedisConn, RedisTarget};

pub const GROUP: &str = "workers";
/// On a cluster, the longest a worker waits after a read of new entries found none (reads there
/// poll: see [`Queue::read`]). The cost: up to this much extra latency for a job arriving on an
/// idle worker, and one `XREADGROUP` per owned partition per interval while idle.
pub const CLUSTER_POLL: Duration = Duration::from_millis(20);

/// The wait after `idle` consecutive empty reads on a cluster: 1, 2, 4, 8, 16 ms, then
/// [`CLUSTER_POLL`]. A busy worker reads again almost at once; an idle one settles at the cap.
pub fn cluster_poll_delay(idle: u32) -> Duration {
    Duration::from_millis(1u64 << idle.min(5)).min(CLUSTER_POLL)
}

/// Connections the replicated writes are spread over when `SPARKY_REDIS_WAIT_REPLICAS` is on:
/// `WAIT` blocks the connection it is sent on until the replicas acknowledge, so on one
/// connection every enqueue would wait for the previous one's replication.
const WAIT_CONNECTIONS: usize = 8;
/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_TTL_SECS: u64 = 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("partition count mismatch: this process has SPARKY_PARTITIONS={configured}, but Redis namespace `{namespace}` was set up with {recorded}. Changing it would move users to other partitions and break per-user order; start every process with SPARKY_PARTITIONS={recorded} (or use a new SPARKY_NAMESPACE)")]
    PartitionMismatch {
        configured: u32,
        recorded: u32,
        namespace: String,
    },
    #[error("the write reached {acked} of the {wanted} replicas SPARKY_REDIS_WAIT_REPLICAS asks for within SPARKY_REDIS_WAIT_TIMEOUT_MS")]
    NotReplicated { wanted: u32, acked: u32 },
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
}

/// Stable partition of a user: FNV-1a (64 bit) over the UUID's 16 bytes, modulo `partitions`.
/// Written out here (rather than `std`'s hasher, which is not stable across releases) because the
/// value is persisted in effect: it decides which stream a user's jobs live in.
pub fn partition_of(user_id: &Uuid, partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in user_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    (h % u64::from(partitions)) as u32
}

/// Key names of one namespace.
#[derive(Clone, Debug)]
pub struct Keys {
    pub ns: String,
}

impl Keys {
    pub fn partitions_meta(&self) -> String {
        format!("{}:meta:partitions", self.ns)
    }
    pub fn stream(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:stream", self.ns)
    }
    pub fn idempotency(&self, partition: u32, user: &Uuid, alert_id: &str) -> String {
        format!("{}:{{p{partition}}}:idem:{user}:{alert_id}", self.ns)
    }
    pub fn lease(&self, partition: u32) -> String {
        format!("{}:{{p{partition}}}:lease", self.ns)
    }
    pub fn workers(&self) -> String {
        format!("{}:workers", self.ns)
    }
    /// The reconciliation's record for `sparky status`: last sweep time, drift counts.
    pub fn reconcile(&self) -> String {
        format!("{}:reconcile", self.ns)
    }
    pub fn dlq(&self) -> String {
        format!("{}:dlq", self.ns)
    }
    pub fn credentials(&self, user: &Uuid, exchange: &str, env: &str) -> String {
        format!("{}:cred:{user}:{exchange}:{env}", self.ns)
    }
}

/// One stream entry read by a worker.
#[derive(Debug, Clone)]
pub struct Entry {
    pub partition: u32,
    pub id: String,
    /// The job, or why the entry could not be read as one (it goes to the dead-letter stream).
    pub job: Result<Job, String>,
    /// The raw `job` field, kept for the dead-letter stream when it does not parse.
    pub raw: Option<String>,
    /// Set when an operator re-enqueued the job (`sparky replay`).
    pub replay: Option<Replay>,
    /// Read as a new entry (`XREADGROUP` with `>`): not delivered to a consumer of this group
    /// before (unless the group was created again after Redis lost it, or a replica that had not
    /// seen the delivery took over: the job's row, not this flag, keeps a job from being recorded
    /// twice). `false` for an entry read again from the consumer's pending list (a history pass
    /// after a takeover or a restart).
    pub first_delivery: bool,
}

/// The `replay` field of an entry written by `sparky replay`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Replay {
    pub at: chrono::DateTime<chrono::Utc>,
    /// Run it even though it is older than `SPARKY_MAX_SIGNAL_AGE_SECS` (or its `max_lag_secs`).
    pub allow_stale: bool,
}

/// The answer of [`Queue::enqueue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// Appended with this stream entry id.
    Queued { entry_id: String },
    /// The idempotency key was already used for the same alert; this is the first job's id.
    Duplicate { job_id: Uuid },
    /// The idempotency key was already used for a different alert; nothing was appended. This is
    /// the first job's id.
    Conflict { job_id: Uuid },
    /// The user's token bucket is empty; nothing was appended. A token is available after this.
    RateLimited { retry_after: Duration },
}

/// A per-user token bucket: `burst` requests at once, refilled at `per_sec` (`per_sec == 0`: no limit).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub per_sec: f64,
    pub burst: u32,
}

impl RateLimit {
    pub const NONE: RateLimit = RateLimit {
        per_sec: 0.0,
        burst: 0,
    };
    pub fn enabled(&self) -> bool {
        self.per_sec > 0.0
    }
}

// KEYS[1] stream, KEYS[2] the user's token bucket, KEYS[3] idempotency key (optional)
// ARGV[1] job id, ARGV[2] job JSON, ARGV[3] idempotency TTL (s), ARGV[4] tokens per second
// (0 = no limit), ARGV[5] burst, ARGV[6] the alert's fingerprint (hex)
// Returns {1, entry id} | {0, first job id} (duplicate) | {2, ms until a token is available}
// | {3, first job id} (the key was used for a different alert).
// The bucket uses the Redis clock (TIME), so replicas with skewed clocks still share one bucket.
// A duplicate is answered before the bucket is touched: a retried alert costs no token.
const ENQUEUE_LUA: &str = r#"
if KEYS[3] then
  local first = redis.call('GET', KEYS[3])
  if first then
    local id, fp = string.match(first, '^(%S+) (%x+)$')
    if not id then return {0, first} end
    if fp == ARGV[6] then return {0, id} end
    return {3, id}
  end
end
local rate = tonumber(ARGV[4])
if rate > 0 then
  local burst = tonumber(ARGV[5])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  if now > ts then
    tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
    ts = now
  end
  local ttl = math.ceil(burst * 1000 / rate) + 1000
  if tokens < 1 then
    redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'ts', tostring(ts))
    redis.call('PEXPIRE', KEYS[2], ttl)
    return {2, tostring(math.ceil((1 - tokens) * 1000 / rate))}
  end
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - 1), 'ts', tostring(ts))
  redis.call('PEXPIRE', KEYS[2], ttl)
end
local id = redis.call('XADD', KEYS[1], '*', 'job', ARGV[2])
if KEYS[3] then redis.call('SET', KEYS[3], ARGV[1] .. ' ' .. ARGV[6], 'EX', tonumber(ARGV[3])) end
return {1, id}
"#;

/// The fingerprint of an alert for its idempotency key: SHA-256 (hex) of the canonical alert, i.e.
/// the parsed [`Alert`] (not the raw body) serialised with its fields in declaration order and its
/// decimals normalised (`100`, `100.0` and `"100.00"` are one size). So two bodies that differ only
/// in spelling (aliases, case, `BINANCE:` prefix, key order, unknown fields, numbers as strings) are
/// the same alert, and any difference in what would be executed (action, symbol, size, stops,
/// strategy, timestamp, ...) is a different alert.
pub fn alert_fingerprint(alert: &Alert) -> String {
    use sha2::{Digest, Sha256};
    let mut a = alert.clone();
    // Fields Sparky ignores are not part of what the alert asks for.
    a.ignored_fields.clear();
    for d in [
        &mut a.price,
        &mut a.position_size_usd,
        &mut a.quantity,
        &mut a.percent_of_equity,
        &mut a.risk_usd,
        &mut a.risk_percent,
        &mut a.stop_loss_percent,
        &mut a.take_profit_percent,
        &mut a.stop_loss_price,
        &mut a.take_profit_price,
    ]
    .into_iter()
    .flatten()
    {
        *d = d.normalize();
    }
    let canonical = serde_json::to_vec(&a).expect("an alert serialises");
    hex::encode(Sha256::digest(canonical))
}

/// The Redis side of the pipeline. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    client: RedisClient,
    conn: RedisConn,
    pub keys: Keys,
    pub partitions: u32,
    enqueue_script: Script,
    /// `SPARKY_REDIS_WAIT_REPLICAS` (0 = off) and the `WAIT` timeout: see [`Queue::with_wait_replicas`].
    wait_replicas: u32,
    wait_timeout: Duration,
    /// Connections for replicated writes (see [`WAIT_CONNECTIONS`]); empty: the shared one.
    wait_conns: std::sync::Arc<Vec<RedisConn>>,
    next_wait_conn: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// A script call built by hand, so that it can be pipelined with `WAIT` (one round trip).
pub(crate) struct ScriptCall<'a> {
    script: &'a Script,
    /// The script's source (`redis::Script` does not give it back), for `EVAL`.
    source: &'static str,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl<'a> ScriptCall<'a> {
    pub(crate) fn new(script: &'a Script, source: &'static str) -> Self {
        ScriptCall {
            script,
            source,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
    pub(crate) fn key(&mut self, k: String) -> &mut Self {
        self.keys.push(k);
        self
    }
    pub(crate) fn arg(&mut self, a: impl redis::ToRedisArgs) -> &mut Self {
        self.args.extend(a.to_redis_args());
        self
    }
    /// `EVALSHA` (by hash) or `EVAL` (the source, which also loads it into the node's cache).
    fn cmd(&self, by_hash: bool) -> redis::Cmd {
        let mut c = if by_hash {
            let mut c = redis::cmd("EVALSHA");
            c.arg(self.script.get_hash());
            c
        } else {
            let mut c = redis::cmd("EVAL");
            c.arg(self.source);
            c
        };
        c.arg(self.keys.len()).arg(&self.keys);
        for a in &self.args {
            c.arg(a.as_slice());
        }
        c
    }
}

fn is_noscript(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        || e.code() == Some("NOSCRIPT")
}

impl Queue {
    /// Connect to a single Redis (a URL) or a cluster ([`RedisTarget::Cluster`]). Commands time
    /// out after `response_timeout` so a dead Redis gives a fast error (the ingress turns it into
    /// 503) instead of a hung request.
    pub async fn connect(
        target: impl Into<RedisTarget>,
        namespace: &str,
        partitions: u32,
        response_timeout: Duration,
    ) -> Result<Queue, QueueError> {
        let target = target.into();
        let client = RedisClient::open(&target, response_timeout)?;
        let conn = client.shared(response_timeout).await?;
        Ok(Queue {
            client,
            conn,
            keys: Keys {
                ns: namespace.to_string(),
            },
            partitions,
            enqueue_script: Script::new(ENQUEUE_LUA),
            wait_replicas: 0,
            wait_timeout: Duration::from_millis(500),
            wait_conns: Default::default(),
            next_wait_conn: Default::default(),
        })
    }

    /// Connect as `config` says: `REDIS_CLUSTER_URLS` or `REDIS_URL`, the namespace, the partition
    /// count and `SPARKY_REDIS_WAIT_REPLICAS`.
    pub async fn from_config(
        config: &crate::config::Config,
        response_timeout: Duration,
    ) -> Result<Queue, QueueError> {
        let mut queue = Queue::connect(
            config.redis_target(),
            &config.namespace,
            config.partitions,
            response_timeout,
        )
        .await?
        .with_wait_replicas(config.redis_wait_replicas, config.redis_wait_timeout);
        if queue.wait_replicas > 0 {
            let mut conns = Vec::with_capacity(WAIT_CONNECTIONS);
            for _ in 0..WAIT_CONNECTIONS {
                conns.push(queue.client.shared(response_timeout).await?);
            }
            queue.wait_conns = std::sync::Arc::new(conns);
        }
        Ok(queue)
    }

    /// Durable writes: an enqueue (and a lease acquire or renewal) counts only once `replicas`
    /// replicas of the key's master acknowledged it (`WAIT replicas timeout`, pipelined with the
    /// script: still one round trip). Fewer within `timeout`: [`QueueError::NotReplicated`].
    pub fn with_wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_replicas = replicas;
        self.wait_timeout = timeout;
        self
    }

    pub fn wait_replicas(&self) -> u32 {
        self.wait_replicas
    }

    pub fn is_cluster(&self) -> bool {
        self.client.is_cluster()
    }

    /// A shared multiplexed connection for ordinary commands.
    pub fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// A connection for the read loop. On a single Redis a dedicated one, for blocking reads (a
    /// blocking command would stall every other command multiplexed on a shared connection); on a
    /// cluster the shared one (reads there do not block, see [`Queue::read`]).
    pub async fn blocking_conn(&self, block: Duration) -> Result<RedisConn, QueueError> {
        if self.is_cluster() {
            return Ok(self.conn());
        }
        Ok(self
            .client
            .dedicated(block + Duration::from_secs(5))
            .await?)
    }

    /// Run a script; with `replicate` (and `SPARKY_REDIS_WAIT_REPLICAS` > 0) pipelined with `WAIT`
    /// on the same node, and refused unless enough replicas acknowledged. A node that does not
    /// have the script cached (after a failover or restart) is sent its source.
    pub(crate) async fn eval<T: redis::FromRedisValue>(
        &self,
        call: &ScriptCall<'_>,
        replicate: bool,
    ) -> Result<T, QueueError> {
        self.query(|by_hash| call.cmd(by_hash), replicate).await
    }

    /// One command (`cmd(by_hash)`, see [`ScriptCall`]; a command that is not a script ignores
    /// the flag), replicated as [`Queue::eval`] says.
    async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: impl Fn(bool) -> redis::Cmd,
        replicate: bool,
    ) -> Result<T, QueueError> {
        let mut c = self.conn();
        if !replicate || self.wait_replicas == 0 {
            return match cmd(true).query_async(&mut c).await {
                Err(e) if is_noscript(&e) => Ok(cmd(false).query_async(&mut c).await?),
                r => Ok(r?),
            };
        }
        if !self.wait_conns.is_empty() {
            let i = self
                .next_wait_conn
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            c = self.wait_conns[i % self.wait_conns.len()].clone();
        }
        let pipe = |by_hash: bool| {
            let mut p = redis::pipe();
            p.add_command(cmd(by_hash))
                .cmd("WAIT")
                .arg(self.wait_replicas)
                .arg(self.wait_timeout.as_millis() as u64);
            p
        };
        let (value, acked): (Value, i64) = match pipe(true).query_async(&mut c).await {
            Err(e) if is_noscript(&e) => pipe(false).query_async(&mut c).await?,
            r => r?,
        };
        if acked < i64::from(self.wait_replicas) {
            return Err(QueueError::NotReplicated {
                wanted: self.wait_replicas,
                acked: acked.max(0) as u32,
            });
        }
        Ok(redis::from_redis_value(value).map_err(redis::RedisError::from)?)
    }

    pub async fn ping(&self) -> Result<(), QueueError> {
        let _: String = redis::cmd("PING").query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Record the partition count on first use; refuse a different one afterwards.
    pub async fn check_partitions(&self) -> Result<(), QueueError> {
        let key = self.keys.partitions_meta();
        let mut c = self.conn();
        let _: Value = redis::cmd("SET")
            .arg(&key)
            .arg(self.partitions)
            .arg("NX")
            .query_async(&mut c)
            .await?;
        let recorded: u32 = redis::cmd("GET").arg(&key).query_async(&mut c).await?;
        if recorded != self.partitions {
            return Err(QueueError::PartitionMismatch {
                configured: self.partitions,
                recorded,
                namespace: self.keys.ns.clone(),
            });
        }
        Ok(())
    }

    pub fn partition_of(&self, user: &Uuid) -> u32 {
        partition_of(user, self.partitions)
    }

    /// Append a job to its user's partition, unless its idempotency key was seen in the last 24 h.
    /// No rate limit (for operators, e.g. replays); the ingress uses [`Queue::enqueue_limited`].
    pub async fn enqueue(&self, job: &Job) -> Result<(u32, Enqueued), QueueError> {
        self.enqueue_limited(job, RateLimit::NONE).await
    }

    /// [`Queue::enqueue`] that first takes a token from the user's bucket (`{ns}:{pN}:rl:{user}`),
    /// in the same script and round trip; an empty bucket answers [`Enqueued::RateLimited`].
    pub async fn enqueue_limited(
        &self,
        job: &Job,
        limit: RateLimit,
    ) -> Result<(u32, Enqueued), QueueError> {
        let user = &job.alert.user_id;
        let p = self.partition_of(user);
        let json = serde_json::to_string(job).expect("a job serialises");
        if job.alert.alert_id.is_none() && !limit.enabled() {
            // Nothing to check before the append (no idempotency key, no bucket): the script
            // would only run the `XADD`, so send the `XADD` (half the Redis time of the script).
            let stream = self.keys.stream(p);
            let entry_id: String = self
                .query(
                    |_| {
                        let mut c = redis::cmd("XADD");
                        c.arg(&stream).arg("*").arg("job").arg(&json);
                        c
                    },
                    true,
                )
                .await?;
            return Ok((p, Enqueued::Queued { entry_id }));
        }
        let mut call = ScriptCall::new(&self.enqueue_script, ENQUEUE_LUA);
        call.key(self.keys.stream(p));
        call.key(format!("{}:{{p{p}}}:rl:{user}", self.keys.ns));
        if let Some(a) = &job.alert.alert_id {
            call.key(self.keys.idempotency(p, user, a));
        }
        let (per_sec, burst) = if limit.enabled() {
            (limit.per_sec, limit.burst.max(1))
        } else {
            (0.0, 0)
        };
        call.arg(job.job_id.to_string())
            .arg(json)
            .arg(IDEMPOTENCY_TTL_SECS)
            .arg(per_sec)
            .arg(burst)
            .arg(if job.alert.alert_id.is_some() {
                alert_fingerprint(&job.alert)
            } else {
                String::new()
            });
        // With SPARKY_REDIS_WAIT_REPLICAS the script and `WAIT` go in one pipeline: a 202 (and a
        // `200 duplicate`) only once the replicas hold the entry.
        let (code, value): (i64, String) = self.eval(&call, true).await?;
        match code {
            1 => Ok((p, Enqueued::Queued { entry_id: value })),
            0 | 3 => {
                let job_id = Uuid::parse_str(&value).map_err(|_| {
                    QueueError::Protocol(format!("idempotency key holds `{value}`"))
                })?;
                Ok((
                    p,
                    if code == 0 {
                        Enqueued::Duplicate { job_id }
                    } else {
                        Enqueued::Conflict { job_id }
                    },
                ))
            }
            _ => {
                let ms: u64 = value
                    .parse()
                    .map_err(|_| QueueError::Protocol(format!("rate limit wait `{value}`")))?;
                Ok((
                    p,
                    Enqueued::RateLimited {
                        retry_after: Duration::from_millis(ms.max(1)),
                    },
                ))
            }
        }
    }

    /// Create the consumer group of every partition (idempotent).
    pub async fn ensure_groups(&self) -> Result<(), QueueError> {
        let mut c = self.conn();
        for p in 0..self.partitions {
            let r: Result<Value, _> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(self.keys.stream(p))
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut c)
                .await;
            match r {
                Ok(_) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Move every pending entry of `partition` (whoever it was delivered to) to `consumer`, so that
    /// the next read with id `0` returns them in stream order. Used when a worker takes a partition
    /// and once more after its history pass; returns the ids claimed (this consumer's own included),
    /// so the caller can tell entries it already holds from ones it has never seen.
    pub async fn claim_all_pending(
        &self,
        partition: u32,
        consumer: &str,
    ) -> Result<Vec<String>, QueueError> {
        let mut c = self.conn();
        let mut cursor = "0-0".to_string();
        let mut claimed = Vec::new();
        loop {
            let v: Value = redis::cmd("XAUTOCLAIM")
                .arg(self.keys.stream(partition))
                .arg(GROUP)
                .arg(consumer)
                .arg(0)
                .arg(&cursor)
                .arg("COUNT")
                .arg(500)
                .arg("JUSTID")
                .query_async(&mut c)
                .await?;
            let Value::Array(parts) = v else {
                return Err(QueueError::Protocol("XAUTOCLAIM reply".into()));
            };
            cursor = parts
                .first()
                .and_then(as_string)
                .unwrap_or_else(|| "0-0".into());
            if let Some(Value::Array(ids)) = parts.get(1) {
                claimed.extend(ids.iter().filter_map(as_string));
            }
            if cursor == "0-0" {
                return Ok(claimed);
            }
        }
    }

    /// `XREADGROUP` over several partitions. `cursors[i]` is `">"` for new entries or an id to
    /// re-read this consumer's pending entries after it.
    ///
    /// On a single Redis: one command over every partition, blocking up to `block` for new entries.
    /// On a cluster each partition is its own slot (a multi-stream read would be `CROSSSLOT`), so
    /// each partition gets its own non-blocking `XREADGROUP`, all sent at once (the cluster
    /// connection pipelines them per node), and the call returns at once: the caller polls
    /// ([`cluster_poll_delay`]) when nothing came back. A failed
    /// read of any partition fails the call: entries the others delivered stay pending for this
    /// consumer and are re-read (the read loop treats the whole read as lost).
    pub async fn read(
        &self,
        conn: &mut RedisConn,
        consumer: &str,
        cursors: &[(u32, String)],
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, QueueError> {
        if cursors.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(vec![]);
        }
        let command = |cursors: &[(u32, String)], block: Option<Duration>| {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(GROUP)
                .arg(consumer)
                .arg("COUNT")
                .arg(count);
            if let Some(b) = block {
                cmd.arg("BLOCK").arg(b.as_millis() as u64);
            }
            cmd.arg("STREAMS");
            for (p, _) in cursors {
                cmd.arg(self.keys.stream(*p));
            }
            for (_, id) in cursors {
                cmd.arg(id);
            }
            cmd
        };
        let mut out = if !conn.is_cluster() {
            let v: Value = command(cursors, Some(block)).query_async(conn).await?;
            self.parse_read(v)?
        } else {
            let reads = cursors.iter().map(|c| {
                let mut conn = conn.clone();
                let cmd = command(std::slice::from_ref(c), None);
                async move { cmd.query_async::<Value>(&mut conn).await }
            });
            let mut out = Vec::new();
            for v in futures::future::join_all(reads).await {
                out.extend(self.parse_read(v?)?);
            }
            out
        };
        for e in &mut out {
            e.first_delivery = cursors
                .iter()
                .any(|(p, cursor)| *p == e.partition && cursor == ">");
        }
        Ok(out)
    }

    fn parse_read(&self, v: Value) -> Result<Vec<Entry>, QueueError> {
        let mut out = Vec::new();
        let streams: Vec<(Value, Value)> = match v {
            Value::Nil => return Ok(out),
            Value::Array(items) => items
                .into_iter()
                .filter_map(|s| match s {
                    Value::Array(mut kv) if kv.len() == 2 => {
                        let entries = kv.pop().unwrap();
                        let key = kv.pop().unwrap();
                        Some((key, entries))
                    }
                    _ => None,
                })
                .collect(),
            Value::Map(kvs) => kvs,
            other => return Err(QueueError::Protocol(format!("XREADGROUP reply {other:?}"))),
        };
        for (key, entries) in streams {
            let key = as_string(&key).unwrap_or_default();
            let partition = self
                .partition_of_key(&key)
                .ok_or_else(|| QueueError::Protocol(format!("reply for unknown stream `{key}`")))?;
            let Value::Array(entries) = entries else {
                continue;
            };
            for e in entries {
                let Value::Array(mut parts) = e else { continue };
                if parts.is_empty() {
                    continue;
                }
                let fields = if parts.len() > 1 {
                    parts.pop().unwrap()
                } else {
                    Value::Nil
                };
                let id = as_string(&parts[0]).unwrap_or_default();
                let raw = field(&fields, "job");
                let job = match &raw {
                    Some(s) => serde_json::from_str::<Job>(s)
                        .map_err(|e| format!("entry is not a job: {e}")),
                    None => Err("entry has no `job` field (deleted or foreign)".to_string()),
                };
                let replay = field(&fields, "replay").and_then(|r| serde_json::from_str(&r).ok());
                out.push(Entry {
                    partition,
                    id,
                    job,
                    raw,
                    replay,
                    first_delivery: false,
                });
            }
        }
        Ok(out)
    }

    fn partition_of_key(&self, key: &str) -> Option<u32> {
        let rest = key.strip_prefix(&self.keys.ns)?.strip_prefix(":{p")?;
        rest.split_once('}')?.0.parse().ok()
    }

    /// Append a job for an operator replay: no idempotency check (the original `alert_id` was
    /// used by the first run) and no rate limit; the job keeps its id, so its client order ids.
    pub async fn append_replay(
        &self,
        job: &Job,
        replay: &Replay,
    ) -> Result<(u32, String), QueueError> {
        let p = self.partition_of(&job.alert.user_id);
        let id: String = redis::cmd("XADD")
            .arg(self.keys.stream(p))
            .arg("*")
            .arg("job")
            .arg(serde_json::to_string(job).expect("a job serialises"))
            .arg("replay")
            .arg(serde_json::to_string(replay).expect("replay serialises"))
            .query_async(&mut self.conn())
            .await?;
        Ok((p, id))
    }

    /// The jobs of a partition stream between two times (entry ids are millisecond timestamps).
    pub async fn range(
        &self,
        partition: u32,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<Entry>, QueueError> {
        let v: Value = redis::cmd("XRANGE")
            .arg(self.keys.stream(partition))
            .arg(since_ms.max(0))
            .arg(until_ms.max(0))
            .query_async(&mut self.conn())
            .await?;
        // Same shape as one stream of an XREADGROUP reply.
        self.parse_read(Value::Array(vec![Value::Array(vec![
            Value::BulkString(self.keys.stream(partition).into_bytes()),
            v,
        ])]))
    }

    /// Trim a partition stream to `retention`, never past an entry that is pending (delivered and
    /// not acked) or not yet delivered to the group. Returns the number of entries removed.
    pub async fn trim(&self, partition: u32, retention: Duration) -> Result<u64, QueueError> {
        let key = self.keys.stream(partition);
        let mut c = self.conn();
        let now_ms = chrono::Utc::now().timestamp_millis() as u64;
        // (ms, seq): XTRIM MINID removes every entry whose id is lower.
        let mut min = (now_ms.saturating_sub(retention.as_millis() as u64), 0u64);
        let pending: Value = redis::cmd("XPENDING")
            .arg(&key)
            .arg(GROUP)
            .query_async(&mut c)
            .await?;
        if let Value::Array(parts) = &pending {
            if let Some(oldest) = parts.get(1).and_then(as_string).and_then(|i| parse_id(&i)) {
                min = min.min(oldest);
            }
        }
        let groups: Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&key)
            .query_async(&mut c)
            .await?;
        let mut delivered = None;
        if let Value::Array(gs) = groups {
            for g in gs {
                if field(&g, "name").as_deref() == Some(GROUP) {
                    delivered = field(&g, "last-delivered-id").and_then(|l| parse_id(&l));
                }
            }
        }
        let Some((ms, seq)) = delivered else {
            return Ok(0);
        };
        // Everything after the last delivered entry is unread.
        min = min.min((ms, seq + 1));
        if min == (0, 0) {
            return Ok(0);
        }
        Ok(redis::cmd("XTRIM")
            .arg(&key)
            .arg("MINID")
            .arg(format!("{}-{}", min.0, min.1))
            .query_async(&mut c)
            .await?)
    }

    pub async fn ack(&self, partition: u32, id: &str) -> Result<(), QueueError> {
        let _: i64 = redis::cmd("XACK")
            .arg(self.keys.stream(partition))
            .arg(GROUP)
            .arg(id)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Append a dead-letter record (flat field/value pairs).
    pub async fn dead_letter(&self, fields: &[(&str, String)]) -> Result<String, QueueError> {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(self.keys.dlq()).arg("*");
        for (k, v) in fields {
            cmd.arg(*k).arg(v);
        }
        Ok(cmd.query_async(&mut self.conn()).await?)
    }

    /// Entries in a partition stream that were delivered and not yet acked.
    pub async fn pending_count(&self, partition: u32) -> Result<u64, QueueError> {
        let v: Value = redis::cmd("XPENDING")
            .arg(self.keys.stream(partition))
            .arg(GROUP)
            .query_async(&mut self.conn())
            .await?;
        match v {
            Value::Array(parts) => Ok(match parts.first() {
                Some(Value::Int(n)) => *n as u64,
                _ => 0,
            }),
            _ => Ok(0),
        }
    }

    /// Total entries in all partition streams (acked or not).
    pub async fn stream_len(&self, partition: u32) -> Result<u64, QueueError> {
        Ok(redis::cmd("XLEN")
            .arg(self.keys.stream(partition))
            .query_async(&mut self.conn())
            .await?)
    }
}

/// The state of one partition stream, as `sparky status` and the worker's gauges show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionStats {
    pub partition: u32,
    /// Entries in the stream (acked ones included, until trimmed).
    pub length: u64,
    /// Entries not yet read by any worker (`None` when Redis cannot tell, e.g. after deletions).
    pub lag: Option<u64>,
    /// Entries read and not yet acknowledged.
    pub pending: u64,
    /// Age of the oldest pending entry (from its id, i.e. since it was accepted), on the Redis clock.
    pub oldest_pending_age_ms: Option<u64>,
}

impl Queue {
    /// Milliseconds since the epoch on the Redis clock.
    pub async fn redis_now_ms(&self) -> Result<u64, QueueError> {
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut self.conn()).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Length, lag, pending count and oldest pending age of a partition stream.
    pub async fn partition_stats(
        &self,
        partition: u32,
        now_ms: u64,
    ) -> Result<PartitionStats, QueueError> {
        let key = self.keys.stream(partition);
        let mut stats = PartitionStats {
            partition,
            length: 0,
            lag: Some(0),
            pending: 0,
            oldest_pending_age_ms: None,
        };
        // One transaction, so the numbers are one snapshot (a worker reading between two separate
        // calls would count its entries both as lag and as pending).
        let snapshot: Result<(u64, Value, Value), _> = redis::pipe()
            .atomic()
            .cmd("XLEN")
            .arg(&key)
            .cmd("XINFO")
            .arg("GROUPS")
            .arg(&key)
            .cmd("XPENDING")
            .arg(&key)
            .arg(GROUP)
            .query_async(&mut self.conn())
            .await;
        let (length, groups, pending) = match snapshot {
            Ok(v) => v,
            // No stream or no group yet (nothing enqueued, no worker started): nothing to report.
            Err(e)
                if {
                    let m = e.to_string().to_lowercase();
                    m.contains("nogroup") || m.contains("no such key")
                } =>
            {
                let length: u64 = redis::cmd("XLEN")
                    .arg(&key)
                    .query_async(&mut self.conn())
                    .await?;
                stats.length = length;
                stats.lag = Some(length);
                return Ok(stats);
            }
            Err(e) => return Err(e.into()),
        };
        stats.length = length;
        stats.lag = None;
        if let Value::Array(gs) = groups {
            for g in gs {
                if field(&g, "name").as_deref() == Some(GROUP) {
                    stats.lag = field(&g, "lag").and_then(|l| l.parse().ok());
                }
            }
        }
        if let Value::Array(parts) = &pending {
            if let Some(Value::Int(n)) = parts.first() {
                stats.pending = *n as u64;
            }
            if let Some((ms, _)) = parts.get(1).and_then(as_string).and_then(|i| parse_id(&i)) {
                stats.oldest_pending_age_ms = Some(now_ms.saturating_sub(ms));
            }
        }
        Ok(stats)
    }

    /// Entries in the dead-letter stream.
    /// Record one account's reconciliation for `sparky status`: the time, and the drift it found
    /// by kind (`drift:{kind}` counters; `drift_total`).
    pub async fn record_reconciliation(
        &self,
        at: chrono::DateTime<chrono::Utc>,
        drift: &[&'static str],
        failed: bool,
    ) -> Result<(), QueueError> {
        let mut p = redis::pipe();
        p.atomic()
            .hset(self.keys.reconcile(), "last_sweep_at", at.to_rfc3339())
            .ignore()
            .hincr(self.keys.reconcile(), "accounts", 1)
            .ignore();
        if failed {
            p.hincr(self.keys.reconcile(), "errors", 1).ignore();
        }
        for kind in drift {
            p.hincr(self.keys.reconcile(), format!("drift:{kind}"), 1)
                .ignore()
                .hincr(self.keys.reconcile(), "drift_total", 1)
                .ignore()
                .hset(self.keys.reconcile(), "last_drift_at", at.to_rfc3339())
                .ignore();
        }
        let _: () = p.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// What [`Queue::record_reconciliation`] recorded (field -> value).
    pub async fn reconciliation(
        &self,
    ) -> Result<std::collections::BTreeMap<String, String>, QueueError> {
        Ok(redis::cmd("HGETALL")
            .arg(self.keys.reconcile())
            .query_async(&mut self.conn())
            .await?)
    }

    pub async fn dlq_len(&self) -> Result<u64, QueueError> {
        Ok(redis::cmd("XLEN")
            .arg(self.keys.dlq())
            .query_async(&mut self.conn())
            .await?)
    }

    /// The live workers (heartbeat not expired) with how long their heartbeat still lasts (ms).
    pub async fn live_workers(&self, now_ms: u64) -> Result<Vec<(String, u64)>, QueueError> {
        let v: Vec<(String, f64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.keys.workers())
            .arg(now_ms)
            .arg("+inf")
            .arg("WITHSCORES")
            .query_async(&mut self.conn())
            .await?;
        Ok(v.into_iter()
            .map(|(w, exp)| (w, (exp as u64).saturating_sub(now_ms)))
            .collect())
    }

    /// The worker holding a partition's lease, if any.
    pub async fn lease_owner(&self, partition: u32) -> Result<Option<String>, QueueError> {
        Ok(redis::cmd("GET")
            .arg(self.keys.lease(partition))
            .query_async(&mut self.conn())
            .await?)
    }

    /// Start-up check of the Redis server: settings under which an accepted job could be lost. Each
    /// item is a warning to log; a setting that cannot be read (managed Redis often disables
    /// `CONFIG`) is reported as unknown rather than failing start-up.
    pub async fn durability_warnings(&self) -> Vec<String> {
        let mut c = self.conn();
        // On a cluster every master is asked (each holds its own share of the jobs).
        let nodes = match c.masters().await {
            Ok(n) => n,
            Err(e) => return vec![format!("could not list the Redis Cluster nodes: {e}")],
        };
        let mut out = Vec::new();
        for node in nodes {
            let text = |v: Result<Value, redis::RedisError>| -> Option<String> {
                v.ok()
                    .and_then(|v| redis::from_redis_value::<String>(v).ok())
            };
            let list = |v: Result<Value, redis::RedisError>| -> Option<String> {
                v.ok()
                    .and_then(|v| redis::from_redis_value::<Vec<String>>(v).ok())
                    .and_then(|v| v.get(1).cloned())
            };
            let policy = list(
                c.on_node(
                    node.as_ref(),
                    redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"),
                )
                .await,
            );
            let info = text(
                c.on_node(node.as_ref(), redis::cmd("INFO").arg("persistence"))
                    .await,
            );
            let aof = info.as_deref().and_then(|i| info_field(i, "aof_enabled"));
            let save = list(
                c.on_node(node.as_ref(), redis::cmd("CONFIG").arg("GET").arg("save"))
                    .await,
            );
            for w in durability_risks(policy.as_deref(), aof.as_deref(), save.as_deref()) {
                out.push(match &node {
                    Some(n) => format!("node {}: {w}", n.addr),
                    None => w,
                });
            }
        }
        out
    }
}

/// The warnings for a Redis with these settings (`None` = could not be read).
pub fn durability_risks(
    maxmemory_policy: Option<&str>,
    aof_enabled: Option<&str>,
    save: Option<&str>,
) -> Vec<String> {
    let mut out = Vec::new();
    match maxmemory_policy {
        Some("noeviction") => {}
        Some(p) => out.push(format!(
            "Redis maxmemory-policy is `{p}`: under memory pressure Redis may evict stream entries, leases or idempotency keys, losing accepted jobs; set `maxmemory-policy noeviction`"
        )),
        None => out.push(
            "could not read Redis maxmemory-policy (CONFIG GET refused); make sure it is `noeviction`, or accepted jobs can be evicted".into(),
        ),
    }
    let aof = aof_enabled.map(|a| a.trim() == "1");
    let rdb = save.map(|s| !s.trim().is_empty());
    match (aof, rdb) {
        (Some(true), _) => {}
        (Some(false), Some(true)) => out.push(
            "Redis has no AOF (only RDB snapshots): a Redis crash loses the jobs accepted since the last snapshot; set `appendonly yes`".into(),
        ),
        (Some(false), Some(false)) => out.push(
            "Redis has no persistence (no AOF, no RDB snapshots): a Redis restart loses every queued job; set `appendonly yes`".into(),
        ),
        _ => out.push(
            "could not read the Redis persistence settings; make sure AOF is on (`appendonly yes`), or a Redis crash can lose accepted jobs".into(),
        ),
    }
    out
}

fn info_field(info: &str, name: &str) -> Option<String> {
    info.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(':')
            .map(|v| v.trim().to_string())
    })
}

/// A stream entry id (`1700000000000-3`) as (ms, seq).
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn field(fields: &Value, name: &str) -> Option<String> {
    match fields {
        Value::Array(kv) => kv
            .chunks(2)
            .find(|c| c.len() == 2 && as_string(&c[0]).as_deref() == Some(name))
            .and_then(|c| as_string(&c[1])),
        Value::Map(kv) => kv
            .iter()
            .find(|(k, _)| as_string(k).as_deref() == Some(name))
            .and_then(|(_, v)| as_string(v)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_and_in_range() {
        let u = Uuid::parse_str("0195f3d0-0000-7000-8000-000000000001").unwrap();
        // Pinned: changing the hash would move every user to another stream.
        assert_eq!(partition_of(&u, 16), partition_of(&u, 16));
        assert_eq!(partition_of(&u, 1), 0);
        let pinned = partition_of(&u, 1024);
        assert_eq!(pinned, 187, "partition hash changed");
        for _ in 0..1000 {
            assert!(partition_of(&Uuid::new_v4(), 16) < 16);
        }
    }

    #[test]
    fn durability_risks_name_what_is_wrong() {
        assert!(durability_risks(Some("noeviction"), Some("1"), Some("")).is_empty());
        let w = durability_risks(Some("allkeys-lru"), Some("1"), Some("3600 1"));
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("allkeys-lru") && w[0].contains("noeviction"),
            "{w:?}"
        );
        let w = durability_risks(Some("noeviction"), Some("0"), Some(""));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("no persistence"), "{w:?}");
        let w = durability_risks(Some("noeviction"), Some("0"), Some("3600 1 300 100"));
        assert!(w[0].contains("no AOF"), "{w:?}");
        assert_eq!(durability_risks(None, None, None).len(), 2);
        assert_eq!(
            info_field("# Persistence\r\naof_enabled:1\r\n", "aof_enabled").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn the_fingerprint_is_of_the_parsed_alert_not_the_body() {
        let parse = |v: serde_json::Value| {
            crate::domain::parse_alert(v.as_object().unwrap(), None).unwrap()
        };
        let user = "0195f3d0-0000-7000-8000-000000000001";
        let a = parse(
            serde_json::json!({"user_id": user, "exchange": "paper", "action": "buy",
            "symbol": "BINANCE:ETHUSDT", "position_size_usd": 100, "alert_id": "a1"}),
        );
        // Aliases, case, prefix, a numeric string with trailing zeros, unknown fields, key order.
        let same = parse(
            serde_json::json!({"alert_id": "a1", "position_size_usd": "100.00",
            "symbol": "ethusdt", "action": "LONG", "exchange": "Paper", "user_id": user,
            "comment": "ignored"}),
        );
        assert_eq!(alert_fingerprint(&a), alert_fingerprint(&same));
        assert_eq!(alert_fingerprint(&a).len(), 64);
        for other in [
            serde_json::json!({"action": "sell"}),
            serde_json::json!({"position_size_usd": 101}),
            serde_json::json!({"symbol": "BTCUSDT"}),
            serde_json::json!({"stop_loss_percent": 2}),
        ] {
            let mut v = serde_json::json!({"user_id": user, "exchange": "paper", "action": "buy",
                "symbol": "ETHUSDT", "position_size_usd": 100, "alert_id": "a1"});
            for (k, x) in other.as_object().unwrap() {
                v[k] = x.clone();
            }
            assert_ne!(
                alert_fingerprint(&a),
                alert_fingerprint(&parse(v.clone())),
                "{v}"
            );
        }
    }

    #[test]
    fn cluster_polls_back_off_to_the_cap() {
        let d: Vec<u64> = (0..8)
            .map(|i| cluster_poll_delay(i).as_millis() as u64)
            .collect();
        assert_eq!(d, vec![1, 2, 4, 8, 16, 20, 20, 20]);
        assert_eq!(cluster_poll_delay(u32::MAX), CLUSTER_POLL);
    }

    #[test]
    fn keys_share_the_partition_hash_tag() {
        let k = Keys { ns: "ns".into() };
        let u = Uuid::nil();
        assert_eq!(k.stream(3), "ns:{p3}:stream");
        assert!(k.idempotency(3, &u, "a").starts_with("ns:{p3}:"));
    }
}
