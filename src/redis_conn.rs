//! One connection type for both Redis deployments: a single Redis (`REDIS_URL`) or a Redis
//! Cluster (`REDIS_CLUSTER_URLS`, seed nodes).
//!
//! [`RedisConn`] implements `redis::aio::ConnectionLike`, so every command and script of the queue,
//! the leases, the credential cache and the auth counters is written once. On a cluster the
//! connection (`redis::cluster_async::ClusterConnection`) routes each command to the master of its
//! key's slot, follows `MOVED`/`ASK`, and re-reads the slot map after a failover.
//!
//! What a cluster changes for the callers:
//! - **One slot per command and script.** Every key of a partition carries the hash tag `{pN}`, so
//!   each script (enqueue, lease acquire/renew/release) and each stream command touches one slot.
//!   Global keys (`{ns}:workers`, `{ns}:meta:partitions`, `{ns}:dlq`, the credential cache) are
//!   each used alone by a command or script.
//! - **Reads per partition.** A multi-stream `XREADGROUP` is `CROSSSLOT` on a cluster (each `{pN}`
//!   is its own slot), so [`crate::queue::Queue::read`] reads each partition with its own command
//!   (concurrently, pipelined per node) and polls instead of blocking: a blocking read would hold
//!   the multiplexed node connection that every other partition's read shares.
//! - **Commands without a key** (`SCAN`, `CLUSTER NODES`, `INFO`, `CONFIG GET`) are sent to each
//!   master by address ([`RedisConn::masters`]).

use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// Where Redis is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis (possibly with replicas behind it): `REDIS_URL`.
    Single(String),
    /// A Redis Cluster, by its seed nodes: `REDIS_CLUSTER_URLS`.
    Cluster(Vec<String>),
}

impl From<&str> for RedisTarget {
    fn from(url: &str) -> Self {
        RedisTarget::Single(url.to_string())
    }
}
impl From<&String> for RedisTarget {
    fn from(url: &String) -> Self {
        RedisTarget::Single(url.clone())
    }
}
impl From<String> for RedisTarget {
    fn from(url: String) -> Self {
        RedisTarget::Single(url)
    }
}
impl From<&RedisTarget> for RedisTarget {
    fn from(t: &RedisTarget) -> Self {
        t.clone()
    }
}

impl RedisTarget {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster(_))
    }
}

/// A client for either deployment; makes [`RedisConn`]s.
#[derive(Clone)]
pub enum RedisClient {
    Single(Client),
    Cluster(Box<ClusterClient>),
}

impl RedisClient {
    pub fn open(target: &RedisTarget, response_timeout: Duration) -> RedisResult<RedisClient> {
        Ok(match target {
            RedisTarget::Single(url) => RedisClient::Single(Client::open(url.as_str())?),
            RedisTarget::Cluster(seeds) => RedisClient::Cluster(Box::new(
                ClusterClientBuilder::new(seeds.iter().map(String::as_str))
                    .connection_timeout(Duration::from_secs(2))
                    .response_timeout(response_timeout)
                    // A failover (a master's replica promoted) takes about cluster-node-timeout
                    // plus an election: retries with a short backoff follow the new slot map
                    // instead of failing every command meanwhile; the caller's own timeout and
                    // retry loops bound the rest.
                    .overall_response_timeout(Some(response_timeout))
                    .retries(4)
                    .min_retry_wait(50)
                    .max_retry_wait(500)
                    .build()?,
            )),
        })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisClient::Cluster(_))
    }

    /// The shared connection: reconnects by itself (a `ConnectionManager` on a single Redis; a
    /// cluster connection re-reads the slot map and reconnects to the nodes it needs).
    pub async fn shared(&self, response_timeout: Duration) -> RedisResult<RedisConn> {
        Ok(match self {
            RedisClient::Single(c) => {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(response_timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                RedisConn::Managed(c.get_connection_manager_with_config(cfg).await?)
            }
            RedisClient::Cluster(c) => RedisConn::Cluster(c.get_async_connection().await?),
        })
    }

    /// A connection of its own (for blocking reads on a single Redis: a blocking command would
    /// stall every other command multiplexed on a shared connection).
    pub async fn dedicated(&self, response_timeout: Duration) -> RedisResult<RedisConn> {
        Ok(match self {
            RedisClient::Single(c) => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(2)))
                    .set_response_timeout(Some(response_timeout));
                RedisConn::Direct(c.get_multiplexed_async_connection_with_config(&cfg).await?)
            }
            RedisClient::Cluster(c) => RedisConn::Cluster(c.get_async_connection().await?),
        })
    }
}

/// A connection to either deployment. Cheap to clone (all variants are multiplexed handles).
#[derive(Clone)]
pub enum RedisConn {
    Managed(ConnectionManager),
    Direct(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Managed(c) => c.req_packed_command(cmd),
            RedisConn::Direct(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Managed(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Direct(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Managed(c) => c.get_db(),
            RedisConn::Direct(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// One node of a cluster, as `CLUSTER NODES` describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ClusterNode {
    pub id: String,
    /// `host:port` (the cluster bus port stripped).
    pub addr: String,
    /// `master` or `replica`.
    pub role: String,
    /// For a replica: the id of its master.
    pub master_id: Option<String>,
    /// Failure flags (`fail`, `fail?`, `handshake`, `noaddr`) or empty when healthy.
    pub flags: Vec<String>,
    /// `connected` or `disconnected` (the answering node's link to it).
    pub link: String,
    /// Slot ranges served (masters), inclusive.
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    pub fn is_healthy(&self) -> bool {
        self.flags.is_empty() && self.link == "connected"
    }
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }
    fn host_port(&self) -> Option<(String, u16)> {
        let (h, p) = self.addr.rsplit_once(':')?;
        Some((h.to_string(), p.parse().ok()?))
    }
}

/// Parse a `CLUSTER NODES` reply. Lines that do not parse are skipped (never a panic).
pub fn parse_cluster_nodes(text: &str) -> Vec<ClusterNode> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        // <id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
        let addr = f[1].split(['@', ',']).next().unwrap_or("").to_string();
        let flags: Vec<&str> = f[2].split(',').collect();
        let role = if flags.contains(&"master") {
            "master"
        } else if flags.contains(&"slave") || flags.contains(&"replica") {
            "replica"
        } else {
            "unknown"
        };
        let bad: Vec<String> = flags
            .iter()
            .filter(|x| matches!(**x, "fail" | "fail?" | "handshake" | "noaddr"))
            .map(|x| x.to_string())
            .collect();
        let slots = f[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|x| (x, x)),
            })
            .collect();
        out.push(ClusterNode {
            id: f[0].to_string(),
            addr,
            role: role.to_string(),
            master_id: Some(f[3].to_string()).filter(|m| m != "-"),
            flags: bad,
            link: f[7].to_string(),
            slots,
        });
    }
    out.sort_by(|a, b| a.addr.cmp(&b.addr));
    out
}

/// The cluster slot of a key (CRC16/XMODEM of the key or of its `{hash tag}`, mod 16384).
pub fn slot_of(key: &str) -> u16 {
    let b = key.as_bytes();
    let tagged = b.iter().position(|&c| c == b'{').and_then(|open| {
        let close = b[open + 1..].iter().position(|&c| c == b'}')?;
        (close > 0).then(|| &b[open + 1..open + 1 + close])
    });
    crc16(tagged.unwrap_or(b)) % 16384
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }

    /// The cluster's nodes (`CLUSTER NODES` from any node); `None` on a single Redis.
    pub async fn cluster_nodes(&mut self) -> RedisResult<Option<Vec<ClusterNode>>> {
        if !self.is_cluster() {
            return Ok(None);
        }
        let text: String = redis::cmd("CLUSTER").arg("NODES").query_async(self).await?;
        Ok(Some(parse_cluster_nodes(&text)))
    }

    /// Run `cmd` on one node by address (cluster), or on the one Redis.
    pub async fn on_node(&mut self, node: Option<&ClusterNode>, cmd: &Cmd) -> RedisResult<Value> {
        match (self, node.and_then(ClusterNode::host_port)) {
            (RedisConn::Cluster(c), Some((host, port))) => {
                c.route_command(
                    cmd.clone(),
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port }),
                )
                .await
            }
            (c, _) => cmd.query_async(c).await,
        }
    }

    /// The masters to send a keyless command to: every healthy master of a cluster, or `[None]`
    /// (the one Redis) on a single Redis.
    pub async fn masters(&mut self) -> RedisResult<Vec<Option<ClusterNode>>> {
        Ok(match self.cluster_nodes().await? {
            None => vec![None],
            Some(nodes) => nodes
                .into_iter()
                .filter(|n| n.role == "master" && n.is_healthy() && !n.slots.is_empty())
                .map(Some)
                .collect(),
        })
    }

    /// Every key matching `pattern` (SCAN, on every master of a cluster).
    pub async fn scan_match(&mut self, pattern: &str) -> RedisResult<Vec<String>> {
        let mut out = Vec::new();
        for node in self.masters().await? {
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(500);
                let v = self.on_node(node.as_ref(), &cmd).await?;
                let (next, keys): (u64, Vec<String>) = redis::from_redis_value(v)?;
                out.extend(keys);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        assert_eq!(slot_of("ns:{p3}:stream"), slot_of("p3"));
        assert_eq!(slot_of("ns:{p3}:lease"), slot_of("ns:{p3}:idem:x:y"));
        // An empty tag is no tag.
        assert_eq!(slot_of("a{}b"), crc16(b"a{}b") % 16384);
    }

    #[test]
    fn cluster_nodes_parse_and_bad_lines_are_skipped() {
        let text = "07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host replica e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected\n\
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922\n\
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]\n\
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 slave,fail 67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 0 1426238316232 5 disconnected\n\
garbage\n";
        let n = parse_cluster_nodes(text);
        assert_eq!(n.len(), 4);
        let m1 = n.iter().find(|x| x.addr == "127.0.0.1:30001").unwrap();
        assert_eq!(m1.role, "master");
        assert_eq!(m1.slots, vec![(0, 5460)]);
        assert!(m1.is_healthy() && m1.serves(5460) && !m1.serves(5461));
        let r = n.iter().find(|x| x.addr == "127.0.0.1:30004").unwrap();
        assert_eq!(r.role, "replica");
        assert_eq!(
            r.master_id.as_deref(),
            Some("e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca")
        );
        let f = n.iter().find(|x| x.addr == "127.0.0.1:30005").unwrap();
        assert!(!f.is_healthy());
        assert_eq!(f.flags, vec!["fail".to_string()]);
        assert_eq!(f.host_port(), Some(("127.0.0.1".into(), 30005)));
    }
}
