//! [`Table`]: one state machine per partition, the single owner of everything this worker knows
//! about a partition (its lease, its validity, its read cursor, the entries it holds).
//!
//! ```text
//!   Free --acquire (lease free, nothing of it still held)--> Recovering{cursor}
//!   Recovering --history read returned entries--> Recovering{last id}
//!   Recovering --history empty, final claim found nothing unseen--> Live
//!   Recovering --history empty, final claim found unseen entries--> Recovering{"0"}
//!   Live --a read failed (its reply may be lost)--> Recovering{last dispatched}
//!   any owned --reassigned--> HandingOver --a read completed and nothing held--> release --> Free
//!   any owned --renewal refused, or validity over--> revoke the fence --> Free (lost)
//! ```
//!
//! Two tasks drive it: the *keeper* ([`Table::keep`]: heartbeat, renew, acquire, hand over, expire,
//! on its own timer so a slow read never delays a renewal) and the worker's read loop
//! ([`Table::to_read`], [`Table::dispatch`], ...). Lanes report each entry they finish or drop
//! ([`Table::finish`]). A fence that went void is never extended again: the partition is lost, and
//! only a new ownership (after its held entries drained) reads its pending entries again.
//!
//! **Held entries.** Every entry read and not yet finished or dropped is *held*. A history read
//! (`XREADGROUP` with an id) returns this consumer's whole pending list, including entries that are
//! queued or running here: those are skipped, so a takeover's history pass is one pass, and the
//! final claim counts only entries this worker has never seen. A partition with entries still held
//! is not acquired again (after a loss) until they are all dropped or finished, so re-read copies
//! can never run behind newer entries still queued in a lane.
//!
//! **Generations.** Each acquisition gets a new generation and a new [`Fence`]. A read carries the
//! generation it was issued under; its entries are dispatched only if the partition is still owned
//! under that generation, so a read that raced a loss cannot slip old entries into a new ownership.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use super::assignment::assignment;
use super::fence::Fence;
use super::lease::Leases;
use crate::metrics::Metrics;
use crate::queue::Queue;

/// How often the keeper checks hand-overs and expiry (renewals run every `ttl / 3`).
const KEEPER_TICK: Duration = Duration::from_millis(50);
/// A partition is not read while this many of its entries are held (back-pressure).
pub const MAX_HELD_PER_PARTITION: usize = 1024;

/// Where an owned partition is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Re-reading this consumer's pending entries after `cursor` (the previous owner's, claimed,
    /// and any whose read reply was lost), in stream order, before anything new.
    Recovering { cursor: String },
    /// Reading new entries (`>`).
    Live,
    /// Reassigned: not read any more, no new job starts; released once a read has completed since
    /// (`after_read`) and nothing of it is held.
    HandingOver { after_read: u64 },
}

struct Ownership {
    phase: Phase,
    fence: Fence,
    renewed_at: Instant,
    last_dispatched: String,
}

impl Ownership {
    /// Still consumed here (not being handed over).
    fn consuming(&self) -> bool {
        !matches!(self.phase, Phase::HandingOver { .. })
    }
}

#[derive(Default)]
struct Slot {
    own: Option<Ownership>,
    held: HashSet<String>,
    generation: u64,
}

struct Inner {
    slots: Vec<Slot>,
    reads: u64,
    desired: Option<usize>,
}

/// One partition to read: from `cursor` (`>` or an id), under `generation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadSpec {
    pub partition: u32,
    pub cursor: String,
    pub generation: u64,
}

impl ReadSpec {
    pub fn is_history(&self) -> bool {
        self.cursor != ">"
    }
}

/// The partitions of one worker.
pub struct Table {
    inner: Mutex<Inner>,
    /// Set on shutdown: acquire nothing more.
    closing: std::sync::atomic::AtomicBool,
    leases: Leases,
    queue: Queue,
    metrics: Metrics,
    partitions: u32,
    ttl: Duration,
    validity: Duration,
    request_time: Duration,
}

impl Table {
    /// `validity`: how long after sending a renewal the lease may be used; `request_time`: the
    /// longest broker request (see [`Fence`]).
    pub fn new(
        leases: Leases,
        queue: Queue,
        metrics: Metrics,
        partitions: u32,
        validity: Duration,
        request_time: Duration,
    ) -> Table {
        Table {
            inner: Mutex::new(Inner {
                slots: (0..partitions).map(|_| Slot::default()).collect(),
                reads: 0,
                desired: None,
            }),
            closing: std::sync::atomic::AtomicBool::new(false),
            ttl: Duration::from_millis(leases.ttl_ms),
            leases,
            queue,
            metrics,
            partitions,
            validity,
            request_time,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock (no I/O, no arithmetic on input); a poisoned lock
        // still holds consistent state.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ---- the read loop's side ----

    /// The partitions to read now: owned, not handed over, valid for the whole blocking read, and
    /// not over the back-pressure bound.
    pub fn to_read(&self, block: Duration) -> Vec<ReadSpec> {
        let until = Instant::now() + block;
        let inner = self.lock();
        inner
            .slots
            .iter()
            .enumerate()
            .filter_map(|(p, s)| {
                let o = s.own.as_ref()?;
                let cursor = match &o.phase {
                    Phase::Recovering { cursor } => cursor.clone(),
                    Phase::Live => ">".to_string(),
                    Phase::HandingOver { .. } => return None,
                };
                let readable = o.fence.valid_at(until) && s.held.len() < MAX_HELD_PER_PARTITION;
                readable.then_some(ReadSpec {
                    partition: p as u32,
                    cursor,
                    generation: s.generation,
                })
            })
            .collect()
    }

    /// Take an entry read under `spec` into this worker: its fence if it is to be queued, `None`
    /// if it is already held here (a history read returns those again) or the partition changed
    /// hands since the read was issued (the entry stays pending for whoever owns it).
    pub fn dispatch(&self, spec: &ReadSpec, id: &str) -> Option<Fence> {
        let mut inner = self.lock();
        let slot = &mut inner.slots[spec.partition as usize];
        if slot.generation != spec.generation || slot.held.contains(id) {
            return None;
        }
        let o = slot.own.as_mut()?;
        if !o.consuming() {
            return None;
        }
        o.last_dispatched = id.to_string();
        let fence = o.fence.clone();
        slot.held.insert(id.to_string());
        Some(fence)
    }

    /// After a history read of `spec`: move the cursor past `last` (the last entry it returned).
    /// `true` when the pass is over (nothing returned): the caller claims once more and reports
    /// with [`Table::history_claimed`].
    pub fn history_read(&self, spec: &ReadSpec, last: Option<&str>) -> bool {
        let mut inner = self.lock();
        let slot = &mut inner.slots[spec.partition as usize];
        if slot.generation != spec.generation {
            return false;
        }
        let Some(o) = slot.own.as_mut() else {
            return false;
        };
        if !matches!(o.phase, Phase::Recovering { .. }) {
            return false;
        }
        match last {
            Some(id) => {
                o.phase = Phase::Recovering {
                    cursor: id.to_string(),
                };
                false
            }
            None => true,
        }
    }

    /// The final claim of a history pass returned `claimed`: entries this worker does not hold
    /// were delivered to a previous owner late, so read the history once more; otherwise go live.
    pub fn history_claimed(&self, spec: &ReadSpec, claimed: &[String]) {
        let mut inner = self.lock();
        let slot = &mut inner.slots[spec.partition as usize];
        if slot.generation != spec.generation {
            return;
        }
        let unseen = claimed.iter().filter(|id| !slot.held.contains(*id)).count();
        let Some(o) = slot.own.as_mut() else { return };
        if !matches!(o.phase, Phase::Recovering { .. }) {
            return;
        }
        if unseen > 0 {
            tracing::info!(
                partition = spec.partition,
                unseen,
                "claimed late pending entries of the previous owner; reading them first"
            );
            o.phase = Phase::Recovering { cursor: "0".into() };
        } else {
            tracing::info!(
                partition = spec.partition,
                "pending entries dispatched; reading new entries"
            );
            o.phase = Phase::Live;
        }
    }

    /// A read of `specs` failed: Redis may have delivered entries whose reply was lost (they are
    /// pending for this consumer now), so live partitions re-read their pending entries first.
    pub fn read_failed(&self, specs: &[ReadSpec]) {
        let mut inner = self.lock();
        for spec in specs {
            let slot = &mut inner.slots[spec.partition as usize];
            if slot.generation != spec.generation {
                continue;
            }
            if let Some(o) = slot.own.as_mut() {
                if o.phase == Phase::Live {
                    o.phase = Phase::Recovering {
                        cursor: o.last_dispatched.clone(),
                    };
                }
            }
        }
    }

    /// A read (and the dispatch of everything it returned) completed.
    pub fn read_done(&self) {
        self.lock().reads += 1;
    }

    /// An entry was finished (acked) or dropped (it stays pending): no longer held.
    pub fn finish(&self, partition: u32, id: &str) {
        self.lock().slots[partition as usize].held.remove(id);
    }

    /// Every owned partition reads new entries, and the worker owns its whole share.
    pub fn settled(&self) -> bool {
        let inner = self.lock();
        let owned: Vec<&Ownership> = inner.slots.iter().filter_map(|s| s.own.as_ref()).collect();
        owned.iter().all(|o| o.phase == Phase::Live) && inner.desired == Some(owned.len())
    }

    /// Nothing is held in any partition.
    pub fn nothing_held(&self) -> bool {
        self.lock().slots.iter().all(|s| s.held.is_empty())
    }

    /// The fence of `partition` if it is owned and live (its history pass done, so every entry a
    /// previous owner left has been queued before anything else starts): the reconciliation sweep
    /// queues its per-user work under it.
    pub fn fence_of(&self, partition: u32) -> Option<Fence> {
        let inner = self.lock();
        let own = inner.slots.get(partition as usize)?.own.as_ref()?;
        (own.phase == Phase::Live).then(|| own.fence.clone())
    }

    /// Partitions consumed now (owned and not handed over), for the gauges.
    pub fn consuming(&self) -> Vec<u32> {
        let inner = self.lock();
        (0..self.partitions)
            .filter(|p| {
                inner.slots[*p as usize]
                    .own
                    .as_ref()
                    .is_some_and(Ownership::consuming)
            })
            .collect()
    }

    /// (partitions consumed, partitions assigned) for readiness; assigned is `None` before the
    /// first heartbeat.
    pub fn counts(&self) -> (usize, Option<usize>) {
        let n = self.consuming().len();
        (n, self.lock().desired)
    }

    /// How many reads completed since the worker started (tests count them: an idle worker blocks
    /// in `XREADGROUP`, so this grows by about one per read block, never in a spin).
    pub fn reads_done(&self) -> u64 {
        self.lock().reads
    }

    /// The phase of `partition` (tests, status).
    pub fn phase(&self, partition: u32) -> Option<Phase> {
        self.lock().slots[partition as usize]
            .own
            .as_ref()
            .map(|o| o.phase.clone())
    }

    // ---- the keeper's side ----

    /// Heartbeat, renew, acquire, hand over and expire until `stop`.
    pub async fn keep(&self, stop: CancellationToken) {
        let mut next_renewal = Instant::now();
        loop {
            if Instant::now() >= next_renewal {
                next_renewal = Instant::now() + self.ttl / 3;
                self.rebalance().await;
            }
            self.expire();
            self.finish_handovers().await;
            tokio::select! {
                _ = tokio::time::sleep(KEEPER_TICK) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn rebalance(&self) {
        let live = match self.leases.heartbeat().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                vec![]
            }
        };
        self.renew_all().await;
        if live.is_empty() {
            return;
        }
        let desired = assignment(&self.leases.me, &live, self.partitions);
        self.lock().desired = Some(desired.len());
        for p in &desired {
            self.acquire(*p).await;
        }
        let mut inner = self.lock();
        let reads = inner.reads;
        for (p, slot) in inner.slots.iter_mut().enumerate() {
            let Some(o) = slot.own.as_mut() else { continue };
            if !desired.contains(&(p as u32)) && o.consuming() {
                tracing::info!(partition = p, "partition reassigned; handing it over");
                o.phase = Phase::HandingOver { after_read: reads };
                o.fence.stop_starting();
            }
        }
        drop(inner);
        self.metrics
            .partitions(self.consuming().len(), desired.len());
    }

    async fn renew_all(&self) {
        let owned: Vec<u32> = {
            let inner = self.lock();
            (0..self.partitions)
                .filter(|p| inner.slots[*p as usize].own.is_some())
                .collect()
        };
        for p in owned {
            let sent = Instant::now();
            let r = self.leases.renew(p).await;
            let mut inner = self.lock();
            let slot = &mut inner.slots[p as usize];
            let Some(o) = slot.own.as_mut() else { continue };
            match r {
                Ok(true) => {
                    if o.fence.extend(sent + self.validity) {
                        o.renewed_at = sent;
                    } else {
                        // Renewed in Redis, but too late: jobs may have stopped meanwhile.
                        lose(
                            slot,
                            p,
                            "the lease validity ran out before the renewal came back",
                        );
                    }
                }
                Ok(false) => lose(slot, p, "the lease is another worker's now"),
                Err(e) => tracing::warn!(partition = p, error = %e, "lease renewal failed"),
            }
        }
    }

    async fn acquire(&self, p: u32) {
        if self.closing.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        {
            let inner = self.lock();
            let slot = &inner.slots[p as usize];
            // Owned already, or entries of a lost ownership are still queued or running here.
            if slot.own.is_some() || !slot.held.is_empty() {
                return;
            }
        }
        let sent = Instant::now();
        match self.leases.try_acquire(p).await {
            Ok(true) => {}
            Ok(false) => return, // still held by its previous owner, who hands it over soon
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "lease acquisition failed");
                return;
            }
        }
        match self.queue.claim_all_pending(p, &self.leases.me).await {
            Ok(claimed) => {
                tracing::info!(
                    partition = p,
                    pending = claimed.len(),
                    "acquired partition; its pending entries run first"
                );
                if self.closing.load(std::sync::atomic::Ordering::Acquire) {
                    let _ = self.leases.release(p).await;
                    return;
                }
                let mut inner = self.lock();
                let slot = &mut inner.slots[p as usize];
                slot.generation += 1;
                slot.own = Some(Ownership {
                    phase: Phase::Recovering { cursor: "0".into() },
                    fence: Fence::new(sent + self.validity, self.request_time),
                    renewed_at: sent,
                    last_dispatched: "0".into(),
                });
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "could not claim pending entries; releasing for now");
                let _ = self.leases.release(p).await;
            }
        }
    }

    /// Partitions whose validity ran out without a renewal are lost, whatever Redis says later.
    fn expire(&self) {
        let mut inner = self.lock();
        for (p, slot) in inner.slots.iter_mut().enumerate() {
            if slot.own.as_ref().is_some_and(|o| o.fence.is_void()) {
                let since = slot.own.as_ref().map(|o| o.renewed_at.elapsed());
                tracing::debug!(partition = p, ?since, "lease validity over");
                lose(slot, p as u32, "the lease could not be renewed in time");
            }
        }
    }

    async fn finish_handovers(&self) {
        let done: Vec<u32> = {
            let mut inner = self.lock();
            let reads = inner.reads;
            let mut done = vec![];
            for (p, slot) in inner.slots.iter_mut().enumerate() {
                let ready = matches!(
                    slot.own.as_ref().map(|o| &o.phase),
                    Some(Phase::HandingOver { after_read }) if reads > *after_read
                ) && slot.held.is_empty();
                if ready {
                    if let Some(o) = slot.own.take() {
                        o.fence.revoke();
                    }
                    done.push(p as u32);
                }
            }
            done
        };
        for p in done {
            match self.leases.release(p).await {
                Ok(_) => tracing::info!(partition = p, "handed the partition over"),
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "could not release the lease; it expires by itself")
                }
            }
        }
    }

    /// Shutdown, step 1: start nothing new in any partition, and acquire no more partitions (the
    /// keeper goes on renewing the owned ones while their jobs finish).
    pub fn stop_starting(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Release);
        for slot in self.lock().slots.iter() {
            if let Some(o) = &slot.own {
                o.fence.stop_starting();
            }
        }
    }

    /// Shutdown, step 2 (after the lanes drained): release the leases and leave the member set.
    /// A partition with a job still running (the drain timed out) is not released: its lease
    /// expires by itself, so no new owner can start while a broker request may be in flight.
    pub async fn release_all(&self) {
        let owned: Vec<u32> = {
            let mut inner = self.lock();
            let mut owned = vec![];
            for (p, slot) in inner.slots.iter_mut().enumerate() {
                if let Some(o) = slot.own.take() {
                    o.fence.revoke();
                    if slot.held.is_empty() {
                        owned.push(p as u32);
                    } else {
                        tracing::warn!(
                            partition = p,
                            "jobs still running: leaving the lease to expire"
                        );
                    }
                }
            }
            owned
        };
        for p in owned {
            if let Err(e) = self.leases.release(p).await {
                tracing::warn!(partition = p, error = %e, "could not release the lease; it expires by itself");
            }
        }
        self.metrics.partitions(0, 0);
        if let Err(e) = self.leases.leave().await {
            tracing::warn!(error = %e, "could not leave the member set; the heartbeat expires by itself");
        }
    }
}

/// Stop touching a partition whose lease is (or may be) someone else's: nothing of it starts any
/// more and its running jobs send nothing more to the broker.
fn lose(slot: &mut Slot, p: u32, why: &str) {
    if let Some(o) = slot.own.take() {
        o.fence.revoke();
        tracing::error!(
            partition = p,
            reason = why,
            "lost the lease of a partition; stopped consuming it"
        );
    }
}
