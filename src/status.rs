//! `sparky status`: what the queue looks like right now, from Redis alone (it works while Postgres
//! is down): every partition with its owner, lag, pending count and oldest pending age; the live
//! workers; the dead-letter size; and the Redis settings that could lose jobs.

use serde::Serialize;

use crate::queue::{Queue, QueueError};
use crate::redis_conn::{slot_of, ClusterNode};

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub namespace: String,
    pub partitions: Vec<PartitionStatus>,
    pub workers: Vec<WorkerStatus>,
    pub dead_letter_size: u64,
    /// Sum of the partitions' lag (entries not read yet) and pending counts.
    pub total_lag: u64,
    pub total_pending: u64,
    /// Redis settings under which accepted jobs could be lost (see the start-up checks).
    pub warnings: Vec<String>,
    /// `single` or `cluster`.
    pub redis_mode: String,
    /// On a cluster: every node (from `CLUSTER NODES`) with the partitions it holds; empty on a
    /// single Redis.
    pub nodes: Vec<NodeStatus>,
    pub reconciliation: ReconcileStatus,
}

/// The reconciliation with the brokers (sweeps and `sparky reconcile`), as recorded in Redis.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReconcileStatus {
    /// When an account was last reconciled (RFC 3339); `None`: never.
    pub last_sweep_at: Option<String>,
    pub last_drift_at: Option<String>,
    /// Accounts reconciled, and how many of them stopped on an error.
    pub accounts: u64,
    pub errors: u64,
    /// Drift found, in all and by kind (`closed`, `resized`, `opened`, `flipped`).
    pub drift_total: u64,
    pub drift: std::collections::BTreeMap<String, u64>,
}

impl ReconcileStatus {
    fn from_fields(fields: std::collections::BTreeMap<String, String>) -> ReconcileStatus {
        let n = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        ReconcileStatus {
            last_sweep_at: fields.get("last_sweep_at").cloned(),
            last_drift_at: fields.get("last_drift_at").cloned(),
            accounts: n("accounts"),
            errors: n("errors"),
            drift_total: n("drift_total"),
            drift: fields
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("drift:")?.to_string(), v.parse().ok()?)))
                .collect(),
        }
    }
}

/// One Redis Cluster node as `sparky status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub addr: String,
    /// `master` or `replica`.
    pub role: String,
    /// For a replica: its master's address.
    pub replica_of: Option<String>,
    /// `ok`, or the failure flags the cluster reports (`fail`, `fail?`, ...) and a lost link.
    pub state: String,
    /// Hash slots served (masters).
    pub slots: u32,
    /// Partitions whose keys (hash tag `{pN}`) live on this node's shard (a replica: its
    /// master's).
    pub partitions: Vec<u32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub partition: u32,
    /// The worker holding the partition's lease (`None`: no live owner).
    pub owner: Option<String>,
    pub length: u64,
    pub lag: Option<u64>,
    pub pending: u64,
    pub oldest_pending_age_secs: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    pub id: String,
    /// Partitions whose lease it holds.
    pub partitions: Vec<u32>,
    /// Time left before its heartbeat expires (it is renewed every lease TTL / 3).
    pub heartbeat_expires_in_ms: u64,
}

/// Read the status of `queue`'s namespace.
pub async fn collect(queue: &Queue) -> Result<Status, QueueError> {
    let now = queue.redis_now_ms().await?;
    let mut partitions = Vec::with_capacity(queue.partitions as usize);
    for p in 0..queue.partitions {
        let s = queue.partition_stats(p, now).await?;
        partitions.push(PartitionStatus {
            partition: p,
            owner: queue.lease_owner(p).await?,
            length: s.length,
            lag: s.lag,
            pending: s.pending,
            oldest_pending_age_secs: s.oldest_pending_age_ms.map(|ms| ms as f64 / 1000.0),
        });
    }
    let workers = queue
        .live_workers(now)
        .await?
        .into_iter()
        .map(|(id, left)| WorkerStatus {
            partitions: partitions
                .iter()
                .filter(|p| p.owner.as_deref() == Some(id.as_str()))
                .map(|p| p.partition)
                .collect(),
            id,
            heartbeat_expires_in_ms: left,
        })
        .collect();
    let nodes = match queue.conn().cluster_nodes().await? {
        None => Vec::new(),
        Some(nodes) => node_statuses(&nodes, queue.partitions),
    };
    Ok(Status {
        redis_mode: if queue.is_cluster() {
            "cluster"
        } else {
            "single"
        }
        .into(),
        nodes,
        namespace: queue.keys.ns.clone(),
        total_lag: partitions.iter().filter_map(|p| p.lag).sum(),
        total_pending: partitions.iter().map(|p| p.pending).sum(),
        partitions,
        workers,
        dead_letter_size: queue.dlq_len().await?,
        warnings: queue.durability_warnings().await,
        reconciliation: ReconcileStatus::from_fields(queue.reconciliation().await?),
    })
}

/// The cluster's nodes with the partitions each shard holds.
pub fn node_statuses(nodes: &[ClusterNode], partitions: u32) -> Vec<NodeStatus> {
    let parts_of = |n: &ClusterNode| -> Vec<u32> {
        (0..partitions)
            .filter(|p| n.serves(slot_of(&format!("{{p{p}}}"))))
            .collect()
    };
    nodes
        .iter()
        .map(|n| {
            let master = n
                .master_id
                .as_ref()
                .and_then(|id| nodes.iter().find(|m| &m.id == id));
            let mut bad = n.flags.clone();
            if n.link != "connected" {
                bad.push(n.link.clone());
            }
            NodeStatus {
                addr: n.addr.clone(),
                role: n.role.clone(),
                replica_of: master.map(|m| m.addr.clone()),
                state: if bad.is_empty() {
                    "ok".into()
                } else {
                    bad.join(",")
                },
                slots: n.slots.iter().map(|(a, b)| u32::from(b - a) + 1).sum(),
                partitions: match (n.role.as_str(), master) {
                    ("master", _) => parts_of(n),
                    (_, Some(m)) => parts_of(m),
                    _ => Vec::new(),
                },
            }
        })
        .collect()
}

/// The human table `sparky status` prints.
pub fn render_table(s: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "namespace {}: {} workers alive, {} partitions, lag {}, pending {}, dead letters {}\n\n",
        s.namespace,
        s.workers.len(),
        s.partitions.len(),
        s.total_lag,
        s.total_pending,
        s.dead_letter_size
    ));
    out.push_str(&format!(
        "{:>9}  {:<40}  {:>8}  {:>8}  {:>8}  {:>14}\n",
        "partition", "owner", "length", "lag", "pending", "oldest pending"
    ));
    for p in &s.partitions {
        out.push_str(&format!(
            "{:>9}  {:<40}  {:>8}  {:>8}  {:>8}  {:>14}\n",
            p.partition,
            p.owner.as_deref().unwrap_or("-"),
            p.length,
            p.lag.map_or_else(|| "?".to_string(), |l| l.to_string()),
            p.pending,
            p.oldest_pending_age_secs
                .map_or_else(|| "-".to_string(), |a| format!("{a:.1}s")),
        ));
    }
    out.push_str("\nworkers:\n");
    if s.workers.is_empty() {
        out.push_str("  none alive\n");
    }
    for w in &s.workers {
        out.push_str(&format!(
            "  {}  partitions {:?}  heartbeat expires in {:.1}s\n",
            w.id,
            w.partitions,
            w.heartbeat_expires_in_ms as f64 / 1000.0
        ));
    }
    let r = &s.reconciliation;
    out.push_str(&format!(
        "\nreconciliation: last sweep {}, {} accounts ({} stopped on errors), drift {}{}\n",
        r.last_sweep_at.as_deref().unwrap_or("never"),
        r.accounts,
        r.errors,
        r.drift_total,
        if r.drift.is_empty() {
            String::new()
        } else {
            format!(
                " ({}; last {})",
                r.drift
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                r.last_drift_at.as_deref().unwrap_or("-")
            )
        }
    ));
    if !s.nodes.is_empty() {
        out.push_str("\nredis cluster nodes:\n");
        out.push_str(&format!(
            "  {:<21}  {:<7}  {:<21}  {:<12}  {:>5}  partitions\n",
            "node", "role", "replica of", "state", "slots"
        ));
        for n in &s.nodes {
            out.push_str(&format!(
                "  {:<21}  {:<7}  {:<21}  {:<12}  {:>5}  {:?}\n",
                n.addr,
                n.role,
                n.replica_of.as_deref().unwrap_or("-"),
                n.state,
                n.slots,
                n.partitions
            ));
        }
    }
    for w in &s.warnings {
        out.push_str(&format!("\nwarning: {w}\n"));
    }
    out
}
