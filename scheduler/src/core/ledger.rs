//! The lease ledger: every live lease, when each expires, and how recently ended ones ended
//! (so that a repeated `Release` is answered as a repeat rather than `NotFound`).
//!
//! The ledger knows nothing of hosts' slot counts: the scheduler counts a lease on its host
//! when the ledger grants it and uncounts it when the ledger ends it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use super::{BuildOutcome, ClientId, Error, HostId, LeaseId, LeaseIds, System, Time};

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
    /// Recently ended leases, for idempotent release, bounded by `remembered`. Keyed by a
    /// 64-bit fingerprint of the id (its low half; the ids are random) rather than the id
    /// string, so that the default 65,536 remembered leases cost about 2.5 MiB, not ten: a
    /// false "already released" for an id never granted needs a 64-bit collision among
    /// them (odds about 2^-48).
    ended: HashMap<u64, LeaseEnd>,
    ended_order: VecDeque<u64>,
    remembered: usize,
    /// Where lease ids come from: the operating system's random source in the server, so
    /// that an id cannot be guessed from another (one's own lease reveals nothing about the
    /// neighbours'), and unique across restarts without a counter; a seeded generator in
    /// tests and the simulator.
    ids: Box<dyn LeaseIds>,
    /// Live leases per holder, for the per-member cap.
    per_client: HashMap<ClientId, usize>,
}

impl Ledger {
    /// An empty ledger; `remembered` ended leases are kept for idempotent release.
    pub(super) fn new(ids: Box<dyn LeaseIds>, remembered: usize) -> Self {
        Self {
            leases: HashMap::new(),
            expiries: BTreeSet::new(),
            ended: HashMap::new(),
            ended_order: VecDeque::new(),
            remembered,
            ids,
            per_client: HashMap::new(),
        }
    }

    /// Replaces the source of lease ids (the server injects the OS random source).
    pub(super) fn set_ids(&mut self, ids: Box<dyn LeaseIds>) {
        self.ids = ids;
    }

    /// Live leases held by `client`.
    pub(super) fn held_by(&self, client: &ClientId) -> usize {
        self.per_client.get(client).copied().unwrap_or(0)
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
        // A collision of 128 random bits does not happen; a broken source that repeats must
        // still never hand out a live lease's id twice.
        let id = loop {
            let id = LeaseId::new(format!("{:032x}", self.ids.next_id()));
            if !self.leases.contains_key(&id) {
                break id;
            }
        };
        *self.per_client.entry(client.clone()).or_default() += 1;
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
        *self.per_client.entry(client.clone()).or_default() += 1;
        let expires_at = now.after(ttl);
        self.expiries.insert((expires_at, id.clone()));
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
        self.expiries.remove(&(lease.expires_at, id.clone()));
        lease.expires_at = now.after(ttl);
        self.expiries.insert((lease.expires_at, id.clone()));
        Ok(())
    }

    /// Ends lease `id` and remembers how; returns it if it was live.
    pub(super) fn end(&mut self, id: &LeaseId, end: LeaseEnd) -> Option<Lease> {
        let lease = self.leases.remove(id)?;
        self.expiries.remove(&(lease.expires_at, id.clone()));
        if let Some(n) = self.per_client.get_mut(&lease.client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&lease.client);
            }
        }
        if let Some(bits) = Self::bits_of(id) {
            let fingerprint = bits as u64;
            self.ended.insert(fingerprint, end);
            self.ended_order.push_back(fingerprint);
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
        self.ended.get(&(Self::bits_of(id)? as u64)).copied()
    }

    /// The 128 bits of a lease id this ledger could have issued (32 lowercase hex digits);
    /// `None` for any other string.
    fn bits_of(id: &LeaseId) -> Option<u128> {
        let s = id.as_str();
        (s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| u128::from_str_radix(s, 16).ok())
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
