//! The lease scripts: heartbeat, acquire, renew and release, each owner-checked (compare-and-set),
//! so a worker can never extend or delete another worker's lease. See the module above for the protocol.

use redis::Script;

use crate::queue::{Queue, QueueError, ScriptCall};

// KEYS[1] workers zset; ARGV[1] me, ARGV[2] ttl ms. Returns the live members (sorted).
const HEARTBEAT_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local live = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
table.sort(live)
return live
"#;

// KEYS[1] lease; ARGV[1] me, ARGV[2] ttl ms. 1 = acquired or already mine (renewed), 0 = another's.
const ACQUIRE_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
"#;

// KEYS[1] lease; ARGV[1] me, ARGV[2] ttl ms. 1 = renewed, 0 = not mine (lost).
const RENEW_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
"#;

// KEYS[1] lease; ARGV[1] me. 1 = released, 0 = not mine (nothing done).
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// Lease operations for one worker id.
#[derive(Clone)]
pub struct Leases {
    queue: Queue,
    pub me: String,
    pub ttl_ms: u64,
    heartbeat: Script,
    acquire: Script,
    renew: Script,
    release: Script,
}

impl Leases {
    pub fn new(queue: Queue, me: String, ttl_ms: u64) -> Self {
        Leases {
            queue,
            me,
            ttl_ms,
            heartbeat: Script::new(HEARTBEAT_LUA),
            acquire: Script::new(ACQUIRE_LUA),
            renew: Script::new(RENEW_LUA),
            release: Script::new(RELEASE_LUA),
        }
    }

    /// Announce this worker alive for another `ttl`; returns the live workers, sorted.
    pub async fn heartbeat(&self) -> Result<Vec<String>, QueueError> {
        let mut call = ScriptCall::new(&self.heartbeat, HEARTBEAT_LUA);
        call.key(self.queue.keys.workers());
        call.arg(&self.me).arg(self.ttl_ms);
        // Not replicated: a lost heartbeat only makes the others rebalance one period early.
        self.queue.eval(&call, false).await
    }

    /// Leave the member set (graceful shutdown), so others rebalance at once.
    pub async fn leave(&self) -> Result<(), QueueError> {
        let _: i64 = redis::cmd("ZREM")
            .arg(self.queue.keys.workers())
            .arg(&self.me)
            .query_async(&mut self.queue.conn())
            .await?;
        Ok(())
    }

    pub async fn try_acquire(&self, partition: u32) -> Result<bool, QueueError> {
        self.cas(&self.acquire, ACQUIRE_LUA, partition, true).await
    }

    /// `false`: the lease is no longer ours.
    pub async fn renew(&self, partition: u32) -> Result<bool, QueueError> {
        self.cas(&self.renew, RENEW_LUA, partition, true).await
    }

    pub async fn release(&self, partition: u32) -> Result<bool, QueueError> {
        self.cas(&self.release, RELEASE_LUA, partition, false).await
    }

    /// Acquire and renew are *replicated* writes: with `SPARKY_REDIS_WAIT_REPLICAS` they count
    /// only once the replicas hold them (pipelined `WAIT`), so a replica promoted after its master
    /// died never has an older lease expiry than the one this worker acts on. Release is not
    /// (a lost release only delays the next owner by one TTL).
    async fn cas(
        &self,
        script: &Script,
        source: &'static str,
        partition: u32,
        ttl: bool,
    ) -> Result<bool, QueueError> {
        let mut call = ScriptCall::new(script, source);
        call.key(self.queue.keys.lease(partition));
        call.arg(&self.me);
        if ttl {
            call.arg(self.ttl_ms);
        }
        let r: i64 = self.queue.eval(&call, ttl).await?;
        Ok(r == 1)
    }

    /// Who owns `partition` now (for status and tests).
    pub async fn owner(&self, partition: u32) -> Result<Option<String>, QueueError> {
        Ok(redis::cmd("GET")
            .arg(self.queue.keys.lease(partition))
            .query_async(&mut self.queue.conn())
            .await?)
    }
}
