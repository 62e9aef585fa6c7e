//! The wait queue: requests that were postponed and are expected to ask again.
//!
//! Nix re-asks a postponed derivation every `build-poll-interval` (5 s by default) from the
//! same hook process, so a waiter is identified by `(client, drv path)` and stays in the queue
//! while it keeps asking. Today the queue only informs (queue positions, `waiting` counts);
//! grants stay first come, first served. It is the place where fair queueing with per-member
//! quotas will decide who gets a freed slot.
//!
//! Cost: a mass rebuild keeps thousands of derivations polling, so every operation here is
//! `O(log n)` or `O(position)`, and the sweep for waiters that stopped asking runs at most
//! once per [`SWEEP_EVERY`] of simulated or real time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use super::{ClientId, System, Time};

/// How often waiters that stopped asking are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
struct Waiter {
    system: System,
    /// Order of arrival: sequence numbers only grow, so they sort by first request.
    seq: u64,
    last_seen: Time,
}

/// Postponed requests, keyed by `(client, drv path)`.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    waiting: HashMap<(ClientId, String), Waiter>,
    /// Sequence numbers of the waiters of each system, in queue order.
    order: BTreeMap<System, BTreeSet<u64>>,
    seq: u64,
    last_sweep: Option<Time>,
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
        let w = match self.waiting.get_mut(&key) {
            Some(w) if &w.system == system => {
                w.last_seen = now;
                w.clone()
            }
            _ => {
                // New, or the same derivation now asked for under another system.
                self.remove(client, drv);
                self.seq += 1;
                let w = Waiter {
                    system: system.clone(),
                    seq: self.seq,
                    last_seen: now,
                };
                self.order.entry(system.clone()).or_default().insert(w.seq);
                self.waiting.insert(key, w.clone());
                w
            }
        };
        let ahead = self
            .order
            .get(system)
            .map_or(0, |q| q.range(..w.seq).count());
        u32::try_from(ahead + 1).unwrap_or(u32::MAX)
    }

    /// Forgets `(client, drv)` (granted, or sent elsewhere).
    pub(super) fn remove(&mut self, client: &ClientId, drv: &str) {
        if self.waiting.is_empty() {
            return;
        }
        if let Some(w) = self.waiting.remove(&(client.clone(), drv.to_owned())) {
            self.unlink(&w);
        }
    }

    fn unlink(&mut self, w: &Waiter) {
        if let Some(q) = self.order.get_mut(&w.system) {
            q.remove(&w.seq);
            if q.is_empty() {
                self.order.remove(&w.system);
            }
        }
    }

    /// Forgets waiters that stopped asking more than `ttl` ago. Sweeps at most once per
    /// [`SWEEP_EVERY`], so a waiter may outlive its `ttl` by that much.
    pub(super) fn expire(&mut self, now: Time, ttl: Duration) {
        if self.last_sweep.is_some_and(|t| now.since(t) < SWEEP_EVERY) {
            return;
        }
        self.last_sweep = Some(now);
        let mut gone = Vec::new();
        self.waiting.retain(|_, w| {
            let keep = now.since(w.last_seen) <= ttl;
            if !keep {
                gone.push(w.clone());
            }
            keep
        });
        for w in &gone {
            self.unlink(w);
        }
    }

    /// Waiters per system.
    pub(super) fn per_system(&self) -> impl Iterator<Item = (&System, u32)> {
        self.order
            .iter()
            .map(|(s, q)| (s, u32::try_from(q.len()).unwrap_or(u32::MAX)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> ClientId {
        ClientId::new(s)
    }

    /// Positions count only waiters of the same system that came first; removal and expiry
    /// move the others up.
    #[test]
    fn positions_per_system() {
        let mut w = Waiters::default();
        let x86 = System::new("x86_64-linux");
        let arm = System::new("aarch64-linux");
        let t = Time::from_millis;
        assert_eq!(w.touch(t(0), &c("a"), "1", &x86), 1);
        assert_eq!(w.touch(t(0), &c("b"), "2", &arm), 1);
        assert_eq!(w.touch(t(0), &c("b"), "3", &x86), 2);
        assert_eq!(w.touch(t(0), &c("c"), "4", &x86), 3);
        w.remove(&c("b"), "3");
        assert_eq!(w.touch(t(1000), &c("c"), "4", &x86), 2);
        // Only `c`'s request was repeated; the others expire.
        w.expire(t(40_000), Duration::from_secs(30));
        w.expire(t(41_500), Duration::from_secs(30));
        let counts: Vec<_> = w.per_system().map(|(s, n)| (s.to_string(), n)).collect();
        assert_eq!(counts, vec![]);
        assert_eq!(w.touch(t(42_000), &c("c"), "4", &x86), 1);
    }
}
