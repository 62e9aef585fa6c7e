//! The lease ledger: every live lease, when each expires, and how recently ended ones ended
//! (so that a repeated `Release` is answered as a repeat rather than `NotFound`).
//!
//! The ledger knows nothing of hosts' slot counts: the scheduler counts a lease on its host
//! when the ledger grants it and uncounts it when the ledger ends it.

use std::collections::{BTreeSet, HashMap};
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
    /// Recently ended leases, for idempotent release (see [`Ended`]).
    ended: Ended,
    /// Where lease ids come from: the operating system's random source in the server, so
    /// that an id cannot be guessed from another (one's own lease reveals nothing about the
    /// neighbours'), and unique across restarts without a counter; a seeded generator in
    /// tests and the simulator.
    ids: Box<dyn LeaseIds>,
    /// Live leases per holder, for the per-member cap.
    per_client: HashMap<ClientId, usize>,
    /// The live lease that a request pinned to a host may attach to, by host and
    /// derivation: every lease that was not itself pinned (a member's build hook chose the
    /// host), so that a builder-side gate finds the hook's lease for the build arriving
    /// there without a scan. Maintained on grant, reattach and end; a later attachable
    /// lease for the same key replaces the entry.
    attachable: HashMap<(HostId, String), LeaseId>,
}

impl Ledger {
    /// An empty ledger; `remembered` ended leases are kept for idempotent release.
    pub(super) fn new(ids: Box<dyn LeaseIds>, remembered: usize) -> Self {
        Self {
            leases: HashMap::new(),
            expiries: BTreeSet::new(),
            ended: Ended::new(remembered),
            ids,
            per_client: HashMap::new(),
            attachable: HashMap::new(),
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
        // A collision of 128 random bits does not happen; a broken source that repeats must
        // still never hand out a live lease's id twice.
        let id = loop {
            let id = LeaseId::new(format!("{:032x}", self.ids.next_id()));
            if !self.leases.contains_key(&id) {
                break id;
            }
        };
        *self.per_client.entry(client.clone()).or_default() += 1;
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

    /// Records a lease granted before a restart under its old `id`, expiring `ttl` from
    /// `now`. The caller checked that `id` is neither live nor ended in this run. A lease
    /// re-attached is attachable: its holder does not say whether it was pinned, and a
    /// build hook (the usual holder that outlives a restart) is the case worth serving; a
    /// second gate session that attaches to a first one's lease runs a build that Nix's
    /// output lock serialises on that host anyway.
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
        self.attachable
            .insert((host.clone(), drv_path.clone()), id.clone());
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

    /// The live, attachable lease for `drv_path` on `host`, if any.
    pub(super) fn attachable(&self, host: &HostId, drv_path: &str) -> Option<(&LeaseId, &Lease)> {
        // The key is owned; this runs once per pinned request, not per host.
        let id = self.attachable.get(&(host.clone(), drv_path.to_owned()))?;
        self.leases.get(id).map(|l| (id, l))
    }

    /// Entries of the attachable index; at most [`Self::len`] (checked by the tests).
    #[cfg(test)]
    pub(super) fn attachable_entries(&self) -> usize {
        self.attachable.len()
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
        if let Some(n) = self.per_client.get_mut(&lease.client) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&lease.client);
            }
        }
        if let Some(bits) = Self::bits_of(id) {
            self.ended.insert(bits as u64, end);
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
        self.ended.get(Self::bits_of(id)? as u64)
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

/// How many entries of a set of [`Ended`] share one index.
const WAYS: usize = 4;

/// Recently ended leases: a 4-way set-associative table of fixed size, allocated once,
/// holding each ended lease's outcome under a 64-bit fingerprint of its id (its low half;
/// ids are random). A new entry replaces the oldest of its set, so an outcome is forgotten
/// only after about `remembered` later ends (sooner only if four later ones land in its set
/// of `remembered / 4`, which within a thousand ends has odds below one in a billion). Its
/// memory is fixed, 16 bytes an entry (1 MiB at the default 65,536), however fast leases
/// come and go; a false "already released" for an id never granted needs a 64-bit
/// collision (odds about 2^-48).
#[derive(Debug)]
struct Ended {
    slots: Vec<EndedSlot>,
    /// Sets - 1 (a power of two minus one); unused when `slots` is empty.
    mask: usize,
    /// Stamps entries to find the oldest of a set (wrapping).
    clock: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct EndedSlot {
    fingerprint: u64,
    stamp: u32,
    end: Option<LeaseEnd>,
}

impl Ended {
    /// Room for about `remembered` ended leases (none for 0).
    fn new(remembered: usize) -> Self {
        let sets = if remembered == 0 {
            0
        } else {
            remembered.div_ceil(WAYS).next_power_of_two()
        };
        Ended {
            slots: vec![EndedSlot::default(); sets * WAYS],
            mask: sets.saturating_sub(1),
            clock: 0,
        }
    }

    fn set(&self, fingerprint: u64) -> std::ops::Range<usize> {
        let base = (fingerprint as usize & self.mask) * WAYS;
        base..base + WAYS
    }

    fn insert(&mut self, fingerprint: u64, end: LeaseEnd) {
        if self.slots.is_empty() {
            return;
        }
        self.clock = self.clock.wrapping_add(1);
        let (clock, range) = (self.clock, self.set(fingerprint));
        let set = &mut self.slots[range];
        let way = set
            .iter()
            .position(|s| s.end.is_some() && s.fingerprint == fingerprint)
            .or_else(|| set.iter().position(|s| s.end.is_none()))
            .unwrap_or_else(|| {
                (0..WAYS)
                    .max_by_key(|w| clock.wrapping_sub(set[*w].stamp))
                    .unwrap_or(0)
            });
        set[way] = EndedSlot {
            fingerprint,
            stamp: clock,
            end: Some(end),
        };
    }

    fn get(&self, fingerprint: u64) -> Option<LeaseEnd> {
        if self.slots.is_empty() {
            return None;
        }
        self.slots[self.set(fingerprint)]
            .iter()
            .find(|s| s.end.is_some() && s.fingerprint == fingerprint)
            .and_then(|s| s.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table remembers the latest ends, replaces the oldest of a full set, keeps its
    /// size whatever comes through, and remembers nothing at size zero.
    #[test]
    fn ended_leases_are_remembered_in_fixed_room() {
        let mut e = Ended::new(8);
        assert_eq!(e.slots.len(), 8);
        // Fingerprints 0, 2, 4, ... all land in set 0 (two sets of four).
        for k in 0..4u64 {
            e.insert(k * 2, LeaseEnd::Expired);
        }
        assert!((0..4u64).all(|k| e.get(k * 2) == Some(LeaseEnd::Expired)));
        e.insert(8, LeaseEnd::Released(BuildOutcome::Succeeded));
        assert_eq!(e.get(0), None, "the oldest of the set made room");
        assert_eq!(e.get(8), Some(LeaseEnd::Released(BuildOutcome::Succeeded)));
        assert_eq!(e.get(2), Some(LeaseEnd::Expired));
        assert_eq!(e.get(1), None, "never ended");
        for k in 0..100_000u64 {
            e.insert(k, LeaseEnd::Expired);
        }
        assert_eq!(e.slots.len(), 8);
        let mut none = Ended::new(0);
        none.insert(1, LeaseEnd::Expired);
        assert_eq!(none.get(1), None);
    }
}
