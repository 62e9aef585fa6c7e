//! The wait queue: requests that were postponed and are expected to ask again.
//!
//! Nix re-asks a postponed derivation every `build-poll-interval` (5 s by default) from the
//! same hook process, so a waiter is identified by `(client, drv path)` and stays in the queue
//! while it keeps asking. Today the queue only informs (queue positions, `waiting` counts);
//! grants stay first come, first served. It is the place where fair queueing with per-member
//! quotas will decide who gets a freed slot.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::{ClientId, System, Time};

#[derive(Clone, Debug)]
struct Waiter {
    system: System,
    /// When it first asked: the queue order.
    since: Time,
    /// Tie-break for requests that first asked in the same millisecond.
    seq: u64,
    last_seen: Time,
}

/// Postponed requests, keyed by `(client, drv path)`.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    waiting: HashMap<(ClientId, String), Waiter>,
    seq: u64,
}

impl Waiters {
    /// Records that `(client, drv)` asked again (or for the first time) and returns its
    /// 1-based position among the waiters for the same system.
    pub(super) fn touch(
        &mut self,
        now: Time,
        client: &ClientId,
        drv: &str,
        system: &System,
    ) -> u32 {
        let key = (client.clone(), drv.to_owned());
        let seq = &mut self.seq;
        let w = self.waiting.entry(key).or_insert_with(|| {
            *seq += 1;
            Waiter {
                system: system.clone(),
                since: now,
                seq: *seq,
                last_seen: now,
            }
        });
        w.last_seen = now;
        w.system = system.clone();
        let me = (w.since, w.seq);
        let ahead = self
            .waiting
            .values()
            .filter(|o| &o.system == system && (o.since, o.seq) < me)
            .count();
        u32::try_from(ahead + 1).unwrap_or(u32::MAX)
    }

    /// Forgets `(client, drv)` (granted, or sent elsewhere).
    pub(super) fn remove(&mut self, client: &ClientId, drv: &str) {
        if !self.waiting.is_empty() {
            self.waiting.remove(&(client.clone(), drv.to_owned()));
        }
    }

    /// Forgets waiters that stopped asking more than `ttl` ago.
    pub(super) fn expire(&mut self, now: Time, ttl: Duration) {
        self.waiting.retain(|_, w| now.since(w.last_seen) <= ttl);
    }

    /// Waiters per system.
    pub(super) fn per_system(&self) -> BTreeMap<&System, u32> {
        let mut m = BTreeMap::new();
        for w in self.waiting.values() {
            *m.entry(&w.system).or_insert(0) += 1;
        }
        m
    }
}
