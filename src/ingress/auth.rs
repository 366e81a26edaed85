//! Authenticating webhooks on the open internet: who owns a presented secret, and what failed
//! authentications cost the sender.
//!
//! # The rules
//! 1. **A presented secret is always verified.** Failures only change the answer to a secret that
//!    does not verify (`401`, or `429` with `Retry-After` once its source is blocked), never whether
//!    a valid secret is accepted. Otherwise anyone could lock a user out by sending bad secrets in
//!    their name, or lock every TradingView user out by sending bad secrets from TradingView.
//! 2. **Failures are counted per (source, claimed `user_id`)** and, for sources that are not shared,
//!    per source ([`AuthFailures`]). A source is an IPv4 address or an IPv6 /64
//!    ([`crate::net::Source`]). A shared source (`SPARKY_SHARED_SOURCES`, default TradingView's four
//!    addresses, plus `SPARKY_IP_ALLOWLIST`) carries many users' alerts and is never blocked as a
//!    whole. The counts live in Redis (fixed windows of `SPARKY_AUTH_FAIL_WINDOW_SECS`), shared by
//!    every replica; each replica notes locally which sources it found over the limit, so checking
//!    costs nothing on the hot path.
//! 3. **Unknown secrets are cheap** ([`SecretCache`]). Owners are cached for
//!    `SPARKY_SECRET_CACHE_TTL_SECS` and unknown secrets for at most 5 s (the negative cache). A
//!    secret in neither goes to one bounded look-up queue (`SPARKY_SECRET_LOOKUP_QUEUE`, default
//!    4096 waiting secrets), drained by at most `SPARKY_SECRET_LOOKUP_CONCURRENCY` (default 2)
//!    Postgres queries at a time, each answering up to [`LOOKUP_BATCH`] secrets with one indexed
//!    `= ANY($1)` query, on a pool of its own of that many connections
//!    ([`crate::store::Store::sibling`]). A flood of random secrets therefore costs one query per
//!    batch, not one per secret, and can never take a connection from the job API or `/readyz`;
//!    known users' first look-ups after a restart wait in the same queue and are answered with the
//!    next batch.
//! 4. **When the queue is full** (or a look-up takes longer than `SPARKY_SECRET_LOOKUP_WAIT_MS`,
//!    default 2 s), the request gets `503` with `Retry-After: 1` and nothing is enqueued, never a
//!    pool time-out. Requests from a blocked source or pair are second in line: they may only queue
//!    while the queue is less than half full, so a flood that got itself blocked leaves the other
//!    half to everyone else.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Semaphore};
use uuid::Uuid;

use crate::net::{IpNet, Source};
use crate::queue::Queue;
use crate::secrets::hash_webhook_secret;
use crate::store::Store;

/// The most secrets one look-up query asks for.
pub const LOOKUP_BATCH: usize = 512;

/// Failed authentications per (source, claimed `user_id`) and per source, counted in Redis
/// (shared by all replicas, fixed window), with a local note of what was found over the limit.
/// A replica learns that a pair or source is over the limit on its next failure there.
pub struct AuthFailures {
    limit: u32,
    window: Duration,
    shared: Vec<IpNet>,
    blocked_pairs: Mutex<HashMap<(Source, Option<Uuid>), Instant>>,
    blocked_sources: Mutex<HashMap<Source, Instant>>,
    script: redis::Script,
}

/// Where a request comes from, as far as failed authentications are concerned.
#[derive(Clone, Copy, Debug)]
pub struct Origin {
    pub source: Source,
    /// A shared source (never blocked as a whole).
    pub shared: bool,
    /// The `user_id` the request claims (unverified), if any.
    pub claimed: Option<Uuid>,
}

// KEYS[1] the (source, user) counter, KEYS[2] the source's counter (absent for a shared source);
// ARGV[1] window (ms). Returns {pair count, pair ms left, source count, source ms left}.
const AUTH_FAIL_LUA: &str = r#"
local function hit(key)
  local n = redis.call('INCR', key)
  if n == 1 then redis.call('PEXPIRE', key, ARGV[1]) end
  local left = redis.call('PTTL', key)
  if left < 0 then
    redis.call('PEXPIRE', key, ARGV[1])
    left = tonumber(ARGV[1])
  end
  return n, left
end
local n1, l1 = hit(KEYS[1])
if KEYS[2] then
  local n2, l2 = hit(KEYS[2])
  return {n1, l1, n2, l2}
end
return {n1, l1, 0, 0}
"#;

/// Local notes are bounded: past this many entries the expired ones are dropped, and if that is
/// not enough, all of them (the counts in Redis stay, and a note comes back with the next failure).
const MAX_NOTES: usize = 10_000;

fn note<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, Instant>>, key: K, left: Duration) {
    let mut map = map.lock().expect("blocked lock");
    if map.len() >= MAX_NOTES {
        let now = Instant::now();
        map.retain(|_, until| *until > now);
        if map.len() >= MAX_NOTES {
            map.clear();
        }
    }
    map.insert(key, Instant::now() + left);
}

fn left<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, Instant>>, key: &K) -> Option<Duration> {
    let until = *map.lock().expect("blocked lock").get(key)?;
    until.checked_duration_since(Instant::now())
}

impl AuthFailures {
    /// `limit` failures per `window` (0 = no limit); `shared` are the shared sources.
    pub fn new(limit: u32, window: Duration, shared: Vec<IpNet>) -> Self {
        AuthFailures {
            limit,
            window,
            shared,
            blocked_pairs: Mutex::new(HashMap::new()),
            blocked_sources: Mutex::new(HashMap::new()),
            script: redis::Script::new(AUTH_FAIL_LUA),
        }
    }

    /// The origin of a request from `ip` claiming `claimed`.
    pub fn origin(&self, ip: IpAddr, claimed: Option<Uuid>) -> Origin {
        Origin {
            source: Source::of(ip),
            shared: self.shared.iter().any(|n| n.contains(ip)),
            claimed,
        }
    }

    /// How long `origin` stays blocked (its pair, or its whole source if not shared), if it is.
    pub fn blocked(&self, origin: &Origin) -> Option<Duration> {
        if self.limit == 0 {
            return None;
        }
        let pair = left(&self.blocked_pairs, &(origin.source, origin.claimed));
        let source = if origin.shared {
            None
        } else {
            left(&self.blocked_sources, &origin.source)
        };
        pair.max(source)
    }

    /// Count a failure of `origin`; returns how long it is blocked when this failure put its pair
    /// or its source over the limit. A Redis error is logged and the failure not counted (the
    /// request is refused anyway).
    pub async fn record(&self, queue: &Queue, origin: &Origin) -> Option<Duration> {
        if self.limit == 0 {
            return None;
        }
        // The source is the hash tag: both counters live in one Redis Cluster slot.
        let source_key = format!("{}:authfail:{{{}}}", queue.keys.ns, origin.source);
        let pair_key = match origin.claimed {
            Some(u) => format!("{source_key}:{u}"),
            None => format!("{source_key}:-"),
        };
        let mut inv = self.script.key(pair_key);
        if !origin.shared {
            inv.key(source_key);
        }
        let res: Result<(u64, u64, u64, u64), _> = inv
            .arg(self.window.as_millis() as u64)
            .invoke_async(&mut queue.conn())
            .await;
        let (pair_n, pair_left, source_n, source_left) = match res {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "could not count a failed authentication");
                return None;
            }
        };
        let limit = u64::from(self.limit);
        let mut blocked = None;
        if pair_n > limit {
            let d = Duration::from_millis(pair_left.max(1));
            note(&self.blocked_pairs, (origin.source, origin.claimed), d);
            blocked = Some(d);
            if pair_n == limit + 1 {
                tracing::warn!(source = %origin.source, claimed_user = ?origin.claimed, failures = pair_n,
                    "too many failed authentications for this user_id from this source; its secrets are still verified");
            }
        }
        if !origin.shared && source_n > limit {
            let d = Duration::from_millis(source_left.max(1));
            note(&self.blocked_sources, origin.source, d);
            blocked = blocked.max(Some(d));
            if source_n == limit + 1 {
                tracing::warn!(source = %origin.source, failures = source_n,
                    "too many failed authentications from this source; its secrets are still verified");
            }
        }
        blocked
    }
}

/// How uncached secret look-ups are bounded (see the module note).
#[derive(Clone, Copy, Debug)]
pub struct LookupLimits {
    /// Postgres queries at once.
    pub concurrency: usize,
    /// Secrets waiting for a query.
    pub queue: usize,
    /// How long a request waits for its answer.
    pub wait: Duration,
}

/// Why a secret could not be verified right now. Nothing was enqueued; the sender retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupError {
    /// The look-up queue is full or slow: retry after this.
    Busy(Duration),
    /// Postgres failed the look-up.
    Unavailable,
}

/// What the look-ups of one [`SecretCache`] did (for tests and the benchmark).
#[derive(Debug, Default)]
pub struct LookupStats {
    /// Postgres queries run.
    pub queries: AtomicU64,
    /// Secrets asked for in them.
    pub secrets: AtomicU64,
    /// The most queries that ran at once.
    pub max_in_flight: AtomicU64,
    in_flight: AtomicU64,
    /// Requests answered `Busy` (queue full or wait exceeded).
    pub busy: AtomicU64,
    /// Queries that failed.
    pub errors: AtomicU64,
}

type Reply = oneshot::Sender<Result<Option<Uuid>, LookupError>>;

struct CacheMap {
    ttl: Duration,
    negative_ttl: Duration,
    map: Mutex<HashMap<String, (Option<Uuid>, Instant)>>,
}

impl CacheMap {
    /// The cached answer for `hash`, if fresh (owners for `ttl`, unknown secrets for `negative_ttl`).
    fn get(&self, hash: &str) -> Option<Option<Uuid>> {
        let (owner, at) = *self.map.lock().expect("cache lock").get(hash)?;
        let ttl = if owner.is_some() {
            self.ttl
        } else {
            self.negative_ttl
        };
        (at.elapsed() < ttl).then_some(owner)
    }

    fn put_all(&self, answers: impl IntoIterator<Item = (String, Option<Uuid>)>) {
        let now = Instant::now();
        let mut map = self.map.lock().expect("cache lock");
        for (hash, owner) in answers {
            if map.len() >= MAX_CACHED {
                // Random secrets fill the negative cache: drop what is stale, then unknown secrets,
                // and only then known ones (so a flood does not evict the users it competes with).
                map.retain(|_, (o, at)| {
                    let ttl = if o.is_some() {
                        self.ttl
                    } else {
                        self.negative_ttl
                    };
                    at.elapsed() < ttl
                });
                if map.len() >= MAX_CACHED {
                    map.retain(|_, (o, _)| o.is_some());
                }
                if map.len() >= MAX_CACHED {
                    map.clear();
                }
            }
            map.insert(hash, (owner, now));
        }
    }
}

/// The most secrets (known and unknown) one replica caches.
const MAX_CACHED: usize = 100_000;

/// Webhook secret hash -> owner, cached for a short TTL (unknown secrets too, for at most 5 s),
/// with uncached secrets answered through a bounded, batched look-up queue (see the module note).
pub struct SecretCache {
    cache: Arc<CacheMap>,
    queue: mpsc::Sender<(String, Reply)>,
    limits: LookupLimits,
    stats: Arc<LookupStats>,
}

impl SecretCache {
    /// A cache over `store` (give it a pool of its own, `limits.concurrency` connections). Spawns the look-up task on the current Tokio runtime; it ends when the
    /// cache is dropped.
    pub fn new(store: Store, ttl: Duration, limits: LookupLimits) -> Self {
        let limits = LookupLimits {
            concurrency: limits.concurrency.max(1),
            queue: limits.queue.max(1),
            wait: limits.wait,
        };
        let cache = Arc::new(CacheMap {
            ttl,
            negative_ttl: ttl.min(Duration::from_secs(5)),
            map: Mutex::new(HashMap::new()),
        });
        let stats = Arc::new(LookupStats::default());
        let (tx, rx) = mpsc::channel(limits.queue);
        tokio::spawn(run_lookups(
            store,
            cache.clone(),
            rx,
            limits.concurrency,
            stats.clone(),
        ));
        SecretCache {
            cache,
            queue: tx,
            limits,
            stats,
        }
    }

    pub fn stats(&self) -> &LookupStats {
        &self.stats
    }

    /// The owner of `secret`, or `None` if it is not a valid secret. `second_in_line` (the request
    /// comes from a blocked source or pair) may only queue while the queue is less than half full.
    pub async fn owner(
        &self,
        secret: &str,
        second_in_line: bool,
    ) -> Result<Option<Uuid>, LookupError> {
        let hash = hash_webhook_secret(secret);
        if let Some(answer) = self.cache.get(&hash) {
            return Ok(answer);
        }
        let busy = |stats: &LookupStats| {
            stats.busy.fetch_add(1, Ordering::Relaxed);
            Err(LookupError::Busy(Duration::from_secs(1)))
        };
        if second_in_line && self.queue.capacity() * 2 < self.limits.queue {
            return busy(&self.stats);
        }
        let (tx, rx) = oneshot::channel();
        match self.queue.try_send((hash, tx)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return busy(&self.stats),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(LookupError::Unavailable),
        }
        match tokio::time::timeout(self.limits.wait, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(LookupError::Unavailable),
            // The look-up still runs (and fills the cache for the retry).
            Err(_) => busy(&self.stats),
        }
    }
}

/// Add a waiting request to the batch. A request that gave up (timed out, client gone) needs no
/// answer; one whose secret an earlier batch answered meanwhile is answered from the cache.
fn add_to_batch(
    batch: &mut HashMap<String, Vec<Reply>>,
    cache: &CacheMap,
    (hash, reply): (String, Reply),
) {
    if reply.is_closed() {
        return;
    }
    if let Some(answer) = cache.get(&hash) {
        let _ = reply.send(Ok(answer));
        return;
    }
    batch.entry(hash).or_default().push(reply);
}

/// The look-up task: take what is waiting (up to [`LOOKUP_BATCH`] distinct secrets), ask Postgres
/// for all of it in one query, answer and cache. At most `concurrency` queries run at once; while
/// they do, new secrets gather in the queue for the next batch.
async fn run_lookups(
    store: Store,
    cache: Arc<CacheMap>,
    mut rx: mpsc::Receiver<(String, Reply)>,
    concurrency: usize,
    stats: Arc<LookupStats>,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch: HashMap<String, Vec<Reply>> = HashMap::new();
        add_to_batch(&mut batch, &cache, first);
        while batch.len() < LOOKUP_BATCH {
            match rx.try_recv() {
                Ok(r) => add_to_batch(&mut batch, &cache, r),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let store = store.clone();
        let cache = cache.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let n = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            stats.max_in_flight.fetch_max(n, Ordering::Relaxed);
            stats.queries.fetch_add(1, Ordering::Relaxed);
            stats
                .secrets
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let hashes: Vec<String> = batch.keys().cloned().collect();
            let found = store.secret_owners(&hashes).await;
            stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            match found {
                Ok(rows) => {
                    let owners: HashMap<String, Uuid> = rows.into_iter().collect();
                    let answers: Vec<(String, Option<Uuid>)> = hashes
                        .into_iter()
                        .map(|h| {
                            let o = owners.get(&h).copied();
                            (h, o)
                        })
                        .collect();
                    for (hash, owner) in &answers {
                        for reply in batch.remove(hash).unwrap_or_default() {
                            let _ = reply.send(Ok(*owner));
                        }
                    }
                    cache.put_all(answers);
                }
                Err(e) => {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %e, secrets = batch.len(), "secret look-up failed");
                    for reply in batch.into_values().flatten() {
                        let _ = reply.send(Err(LookupError::Unavailable));
                    }
                }
            }
        });
    }
}
