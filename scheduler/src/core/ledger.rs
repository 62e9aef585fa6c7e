//! The lease ledger: every live lease, when each expires, and how recently ended ones ended
//! (so that a repeated `Release` is answered as a repeat rather than `NotFound`).
//!
//! The ledger knows nothing of hosts' slot counts: the scheduler counts a lease on its host
//! when the ledger grants it and uncounts it when the ledger ends it.

use std::collections::{BTreeSet, HashMap, VecDeque};
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
    /// Every live lease's expiry, soonest first: exactly one entry per live lease (a
    /// keep-alive moves it, an end removes it), so its size is bounded by the live leases
    /// and not by the rate of grants and keep-alives.
    expiries: BTreeSet<(Time, LeaseId)>,
    /// Recently ended leases, for idempotent release, bounded by `remembered`. Keyed by the
    /// lease's sequence number rather than its id string, so that remembering the default
    /// 65,536 ended leases costs about 1 MiB rather than ten.
    ended: HashMap<u64, LeaseEnd>,
    ended_order: VecDeque<u64>,
    /// Live leases that a pinned request for the same host and derivation may attach to
    /// (every lease that was not itself pinned), so that a builder-side gate finds a member's
    /// hook lease without a scan.
    attachable: HashMap<(HostId, String), LeaseId>,
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
            expiries: BTreeSet::new(),
            ended: HashMap::new(),
            ended_order: VecDeque::new(),
            attachable: HashMap::new(),
            remembered,
            boot_nonce,
            next_lease: 0,
        }
    }

    /// Records a new lease that expires `ttl` from `now`; returns its id. An `attachable`
    /// lease can be found by [`Self::attachable`].
    #[allow(clippy::too_many_arguments)] // the lease's fields, as the core has them
    pub(super) fn grant(
        &mut self,
        now: Time,
        ttl: Duration,
        host: HostId,
        client: ClientId,
        system: System,
        drv_path: String,
        attachable: bool,
    ) -> LeaseId {
        self.next_lease += 1;
        let id = LeaseId::new(format!("{:016x}-{}", self.boot_nonce, self.next_lease));
        if attachable {
            self.attachable
                .insert((host.clone(), drv_path.clone()), id.clone());
        }
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
        self.expiries.insert((expires_at, id.clone()));
        id
    }

    /// The live, attachable lease for `drv_path` on `host`, if any.
    pub(super) fn attachable(&self, host: &HostId, drv_path: &str) -> Option<(&LeaseId, &Lease)> {
        // The key is owned; this runs once per pinned request, not per host.
        let id = self.attachable.get(&(host.clone(), drv_path.to_owned()))?;
        self.leases.get(id).map(|l| (id, l))
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
        self.expiries.remove(&(lease.expires_at, id.clone()));
        lease.expires_at = now.after(ttl);
        self.expiries.insert((lease.expires_at, id.clone()));
        Ok(())
    }

    /// Ends lease `id` and remembers how; returns it if it was live.
    pub(super) fn end(&mut self, id: &LeaseId, end: LeaseEnd) -> Option<Lease> {
        let lease = self.leases.remove(id)?;
        self.expiries.remove(&(lease.expires_at, id.clone()));
        let key = (lease.host.clone(), lease.drv_path.clone());
        if self.attachable.get(&key) == Some(id) {
            self.attachable.remove(&key);
        }
        if let Some(seq) = self.seq_of(id) {
            self.ended.insert(seq, end);
            self.ended_order.push_back(seq);
        }
        while self.ended_order.len() > self.remembered {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
        Some(lease)
    }

    /// Ends the next lease whose expiry is at or before `now`, if any, and returns it.
    pub(super) fn pop_expired(&mut self, now: Time) -> Option<Lease> {
        let (at, _) = self.expiries.first()?;
        if *at > now {
            return None;
        }
        let (_, id) = self.expiries.pop_first()?;
        self.end(&id, LeaseEnd::Expired)
    }

    /// Entries in the expiry queue; equal to [`Self::len`] (checked by the core's tests).
    pub(super) fn expiry_entries(&self) -> usize {
        self.expiries.len()
    }

    /// How a remembered lease ended.
    pub(super) fn ended(&self, id: &LeaseId) -> Option<LeaseEnd> {
        self.ended.get(&self.seq_of(id)?).copied()
    }

    /// The sequence number of a lease id this ledger issued (`<boot nonce>-<seq>`); `None`
    /// for any other string, including ids from before a restart.
    fn seq_of(&self, id: &LeaseId) -> Option<u64> {
        let (nonce, seq) = id.as_str().split_once('-')?;
        (u64::from_str_radix(nonce, 16).ok()? == self.boot_nonce && nonce.len() == 16)
            .then(|| seq.parse().ok())
            .flatten()
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
