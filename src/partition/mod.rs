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
//! - **Validity**: a worker acts on a partition only until `sent + 0.8 lease_ttl`, counted from when
//!   it *sent* its last successful renewal, and every broker request must be able to finish by then
//!   ([`fence`]); past it the partition is lost locally, whatever Redis answers later.
//!
//! Files: [`lease`] (the owner-checked scripts), [`assignment`] (the pure fair share), [`fence`]
//! (validity as jobs and broker requests see it), [`table`] (one state machine per partition:
//! acquire, renew, validity, history pass, hand-over, drain).
//!
//! All keys of a partition share its hash tag `{pN}`, so every lease script touches one slot of a
//! Redis Cluster; the membership set `{ns}:workers` is alone in the heartbeat script. With
//! `SPARKY_REDIS_WAIT_REPLICAS` acquisitions and renewals count only once replicated (see `lease`),
//! so a replica promoted after a master's death holds the lease expiry the owner acts on.

pub mod assignment;
pub mod fence;
pub mod lease;
pub mod table;

pub use assignment::assignment;
pub use fence::Fence;
pub use lease::Leases;
pub use table::{Phase, ReadSpec, Table};
