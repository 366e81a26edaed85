//! Partition ownership: which live worker consumes which partition.
//!
//! A consumer group alone does not keep one user's jobs in order (Redis hands a stream's entries to
//! any consumer), so each partition is owned by at most one live worker at a time, through an
//! expiring lease:
//!
//! - **Membership**: every worker heartbeats into `{ns}:workers` (a sorted set scored by the
//!   heartbeat's expiry, on the Redis clock), every `lease_ttl / 3`. The live workers are the members
//!   whose expiry is in the future; expired ones are pruned by whoever heartbeats next.
//! - **Fair share**: all workers sort the live ids the same way; partition `p` belongs to
//!   `live[p % live.len()]` ([`assignment`]). When a worker joins, leaves or dies, every worker
//!   computes the new assignment at its next heartbeat.
//! - **Lease** `{ns}:{pN}:lease` = owner id, `PX lease_ttl`. Acquired with `SET NX PX` (only when
//!   free), renewed and released only by its owner (compare-and-set scripts: a worker can never
//!   extend or delete another worker's lease). A worker that fails to renew (the value is no longer
//!   its id) has lost the partition and stops touching it at once.
//! - **Hand-over**: a worker that is no longer assigned a partition stops reading it, drops the
//!   entries it read but did not start (they stay pending), waits for the started ones to be
//!   committed and acked, and only then releases the lease. The new owner first claims every pending
//!   entry (`XAUTOCLAIM`) and runs them in stream order, then reads new entries. A dead worker's
//!   leases simply expire (takeover within `lease_ttl` + one heartbeat).
//!
//! All keys of a partition share its hash tag `{pN}`, so this runs on Redis Cluster unchanged.

use redis::Script;

use crate::queue::{Queue, QueueError};

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

/// The partitions `me` should own when `live` (sorted) are the live workers.
pub fn assignment(me: &str, live: &[String], partitions: u32) -> Vec<u32> {
    let Some(i) = live.iter().position(|w| w == me) else {
        return vec![];
    };
    (0..partitions)
        .filter(|p| *p as usize % live.len() == i)
        .collect()
}

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
        Ok(self
            .heartbeat
            .key(self.queue.keys.workers())
            .arg(&self.me)
            .arg(self.ttl_ms)
            .invoke_async(&mut self.queue.conn())
            .await?)
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
        self.cas(&self.acquire, partition, true).await
    }

    /// `false`: the lease is no longer ours.
    pub async fn renew(&self, partition: u32) -> Result<bool, QueueError> {
        self.cas(&self.renew, partition, true).await
    }

    pub async fn release(&self, partition: u32) -> Result<bool, QueueError> {
        self.cas(&self.release, partition, false).await
    }

    async fn cas(&self, script: &Script, partition: u32, ttl: bool) -> Result<bool, QueueError> {
        let mut inv = script.key(self.queue.keys.lease(partition));
        inv.arg(&self.me);
        if ttl {
            inv.arg(self.ttl_ms);
        }
        let r: i64 = inv.invoke_async(&mut self.queue.conn()).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_is_a_fair_partition_of_all_partitions() {
        let live: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut all: Vec<u32> = live.iter().flat_map(|w| assignment(w, &live, 16)).collect();
        all.sort();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
        for w in &live {
            let n = assignment(w, &live, 16).len();
            assert!((5..=6).contains(&n), "{w}: {n}");
        }
        assert!(assignment("zz", &live, 16).is_empty());
    }
}
