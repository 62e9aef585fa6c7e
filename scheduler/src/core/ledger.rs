//! The lease ledger: every live lease, when each expires, and how recently ended ones ended
//! (so that a repeated `Release` is answered as a repeat rather than `NotFound`).
//!
//! The ledger knows nothing of hosts' slot counts: the scheduler counts a lease on its host
//! when the ledger grants it and uncounts it when the ledger ends it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

use super::{BuildOutcome, ClientId, Error, HostId, LeaseId, System, Time};

/// One live lease.
#[derive(Clone, Debug)]
pub(super) struct Lease {
    pub(super) host: HostId,
    pub(super) client: ClientId,
    pub(super) system: System,
    pub(super) drv_path: String,
    pub(super) granted_at: Time,
    pub(super) expires_at: Time,
}

/// What ended a remembered lease.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Released by its holder with this outcome.
    Released(BuildOutcome),
    /// Not kept alive.
    Expired,
}

/// Live and recently ended leases.
#[derive(Debug)]
pub(super) struct Ledger {
    leases: HashMap<LeaseId, Lease>,
    /// Lease expiry times, soonest first; entries made stale by keep-alives or releases are
    /// skipped when popped (lazy deletion keeps every operation `O(log n)`).
    expiries: BinaryHeap<Reverse<(Time, LeaseId)>>,
    /// Recently ended leases, for idempotent release, bounded by `remembered`.
    ended: HashMap<LeaseId, LeaseEnd>,
    ended_order: VecDeque<LeaseId>,
    remembered: usize,
    /// Makes lease ids unique across restarts, so a hook holding a lease from before a
    /// restart gets `NotFound`, never somebody else's lease.
    boot_nonce: u64,
    next_lease: u64,
}

impl Ledger {
    /// An empty ledger; `remembered` ended leases are kept for idempotent release.
    pub(super) fn new(boot_nonce: u64, remembered: usize) -> Self {
        Self {
            leases: HashMap::new(),
            expiries: BinaryHeap::new(),
            ended: HashMap::new(),
            ended_order: VecDeque::new(),
            remembered,
            boot_nonce,
            next_lease: 0,
        }
    }

    /// Records a new lease that expires `ttl` from `now`; returns its id.
    pub(super) fn grant(
        &mut self,
        now: Time,
        ttl: Duration,
        host: HostId,
        client: ClientId,
        system: System,
        drv_path: String,
    ) -> LeaseId {
        self.next_lease += 1;
        let id = LeaseId::new(format!("{:016x}-{}", self.boot_nonce, self.next_lease));
        let expires_at = now.after(ttl);
        self.leases.insert(
            id.clone(),
            Lease {
                host,
                client,
                system,
                drv_path,
                granted_at: now,
                expires_at,
            },
        );
        self.expiries.push(Reverse((expires_at, id.clone())));
        id
    }

    /// Records a lease granted before a restart under its old `id`, expiring `ttl` from
    /// `now`. The caller checked that `id` is neither live nor ended in this run.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn reattach(
        &mut self,
        now: Time,
        ttl: Duration,
        id: LeaseId,
        host: HostId,
        client: ClientId,
        system: System,
        drv_path: String,
    ) {
        let expires_at = now.after(ttl);
        self.expiries.push(Reverse((expires_at, id.clone())));
        self.leases.insert(
            id,
            Lease {
                host,
                client,
                system,
                drv_path,
                granted_at: now,
                expires_at,
            },
        );
    }

    /// Lease `id`, if live.
    pub(super) fn get(&self, id: &LeaseId) -> Option<&Lease> {
        self.leases.get(id)
    }

    /// Extends lease `id` to expire `ttl` from `now`.
    pub(super) fn keep_alive(
        &mut self,
        now: Time,
        id: &LeaseId,
        ttl: Duration,
    ) -> Result<(), Error> {
        let lease = self.leases.get_mut(id).ok_or_else(|| Error::UnknownLease {
            lease_id: id.to_string(),
        })?;
        lease.expires_at = now.after(ttl);
        self.expiries.push(Reverse((lease.expires_at, id.clone())));
        Ok(())
    }

    /// Ends lease `id` and remembers how; returns it if it was live.
    pub(super) fn end(&mut self, id: &LeaseId, end: LeaseEnd) -> Option<Lease> {
        let lease = self.leases.remove(id)?;
        self.ended.insert(id.clone(), end);
        self.ended_order.push_back(id.clone());
        while self.ended_order.len() > self.remembered {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
        Some(lease)
    }

    /// Ends the next lease whose expiry is at or before `now`, if any, and returns it.
    pub(super) fn pop_expired(&mut self, now: Time) -> Option<Lease> {
        while let Some(Reverse((at, _))) = self.expiries.peek() {
            if *at > now {
                return None;
            }
            let Reverse((at, id)) = self.expiries.pop()?;
            // Skip entries superseded by a keep-alive or a release.
            if self.leases.get(&id).is_some_and(|l| l.expires_at == at) {
                return self.end(&id, LeaseEnd::Expired);
            }
        }
        None
    }

    /// How a remembered lease ended.
    pub(super) fn ended(&self, id: &LeaseId) -> Option<LeaseEnd> {
        self.ended.get(id).copied()
    }

    /// Live leases.
    pub(super) fn len(&self) -> usize {
        self.leases.len()
    }

    /// Every live lease, in no order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&LeaseId, &Lease)> {
        self.leases.iter()
    }
}
