//! Operator read models: hosts, leases, capacity per system and placement explanations, as
//! operators and the admin API see them. Built from the state; nothing here changes it
//! (except that `capacity` sweeps waiters that stopped asking, so that it counts only live
//! ones).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::eligibility::{self, Ask};
use super::policy::{Candidate, LeastLoaded, Policy};
use super::registry::Host;
use super::{
    ClientId, Feature, HostId, HostReport, HostSpec, HostState, LeaseId, Scheduler, System, Time,
};

/// A host as operators see it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostView {
    /// As registered.
    pub spec: HostSpec,
    /// The last report.
    pub report: HostReport,
    /// Liveness now.
    pub state: HostState,
    /// Drained by an operator.
    pub draining: bool,
    /// Live leases on it.
    pub leases: u32,
    /// Slots counted as busy.
    pub slots_used: u32,
    /// Time since the last registration or report.
    pub since_last_report: Duration,
    /// Why it would not take a lease for a system it builds now (`None`: it would).
    pub unavailable_reason: Option<String>,
    /// The breaker of the scheduler's SSH probe of it.
    pub probe: super::Breaker,
}

/// A lease as operators see it.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseView {
    /// Its id.
    pub id: LeaseId,
    /// Its host.
    pub host: HostId,
    /// Its holder.
    pub client: ClientId,
    /// The system asked for.
    pub system: System,
    /// The derivation.
    pub drv_path: String,
    /// Since granted.
    pub age: Duration,
    /// Until it expires.
    pub expires_in: Duration,
}

/// A waiting request as operators (all of them) and its member (its own) see it.
#[derive(Clone, Debug, PartialEq)]
pub struct WaitingView {
    /// The member it waits for.
    pub client: ClientId,
    /// The system asked for.
    pub system: System,
    /// The features asked for.
    pub features: BTreeSet<Feature>,
    /// The derivation.
    pub drv_path: String,
    /// Where it stands (see `WaitStatus`).
    pub status: super::WaitStatus,
    /// Since it started waiting.
    pub waited: Duration,
    /// The one host it may take, for a builder-side gate's request.
    pub pin: Option<HostId>,
    /// Whether it waits on a `WaitForLease` stream (else by polling `Acquire`).
    pub streaming: bool,
}

/// Where a page of [`Scheduler::waiting_page`] starts: after this request, in the listing's
/// order (member, system, derivation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitingCursor {
    /// The member of the last request listed.
    pub client: ClientId,
    /// Its system.
    pub system: System,
    /// Its derivation.
    pub drv_path: String,
}

/// Capacity of one system.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CapacityView {
    /// The system.
    pub system: String,
    /// Hosts building it.
    pub hosts: u32,
    /// Of those, hosts that would take a lease now.
    pub hosts_available: u32,
    /// Slots of the available hosts.
    pub slots_total: u32,
    /// Free slots of the available hosts.
    pub slots_free: u32,
    /// Live leases on hosts building it.
    pub leases: u32,
    /// Requests waiting for it.
    pub waiting: u32,
}

/// The verdict on one host for an explained request.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// The host.
    pub host: HostId,
    /// `Ok(score)` when eligible, `Err(reason)` when not.
    pub result: Result<f64, String>,
}

/// The answer to `ExplainPlacement`.
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation {
    /// Every host, by id.
    pub verdicts: Vec<Verdict>,
    /// The host a request would get (ties broken at random).
    pub chosen: Option<HostId>,
    /// What a client that cannot build locally would be answered: `granted`, `postpone`,
    /// or `decline-permanently`.
    pub outcome: &'static str,
}

impl Scheduler {
    /// Every known host, by id.
    pub fn hosts(&self, now: Time) -> Vec<HostView> {
        self.registry.iter().map(|h| self.view(now, h)).collect()
    }

    /// Up to `limit` hosts after `after` (from the first for `None`), by id: a page of
    /// [`Self::hosts`], so that a reader of a large fleet can let go of the core between
    /// pages instead of holding it for the whole list.
    pub fn hosts_page(&self, now: Time, after: Option<&HostId>, limit: usize) -> Vec<HostView> {
        self.registry
            .after(after)
            .take(limit)
            .map(|h| self.view(now, h))
            .collect()
    }

    /// One host.
    pub fn host(&self, now: Time, id: &HostId) -> Option<HostView> {
        self.registry.get(id).map(|h| self.view(now, h))
    }

    fn view(&self, now: Time, h: &Host) -> HostView {
        HostView {
            spec: h.spec.clone(),
            report: h.report.clone(),
            state: h.state(now, &self.config),
            draining: h.draining,
            leases: h.leases,
            slots_used: h.used(),
            since_last_report: now.since(h.last_seen),
            unavailable_reason: eligibility::unavailable(
                now,
                &self.config,
                self.policy.sees_global_load(),
                h,
            ),
            probe: h.probe.breaker(now),
        }
    }

    /// Live leases, oldest first.
    pub fn leases(&self, now: Time) -> Vec<LeaseView> {
        let mut v: Vec<_> = self
            .ledger
            .iter()
            .map(|(id, l)| LeaseView {
                id: id.clone(),
                host: l.host.clone(),
                client: l.client.clone(),
                system: l.system.clone(),
                drv_path: l.drv_path.clone(),
                age: now.since(l.granted_at),
                expires_in: l.expires_at.since(now),
            })
            .collect();
        v.sort_by(|a, b| b.age.cmp(&a.age).then_with(|| a.id.cmp(&b.id)));
        v
    }

    /// Up to `limit` of the requests waiting in the queue after `after` (from the first for
    /// `None`), of `only` that member when given, sorted by member, system and derivation:
    /// a page, so that a reader of a long queue lets go of the core between pages. The
    /// order is by the request's identity, not by its position, because positions move
    /// while the queue is read page by page: a cursor on them would skip or repeat
    /// requests. Sweeps pollers that stopped asking first, like [`Self::capacity`].
    /// `O(waiters)` to pick the page, `O(limit × (members + √n))` for its positions. Returns
    /// the page, and where the next one starts when more requests follow.
    pub fn waiting_page(
        &mut self,
        now: Time,
        only: Option<&ClientId>,
        after: Option<&WaitingCursor>,
        limit: usize,
    ) -> (Vec<WaitingView>, Option<WaitingCursor>) {
        self.waiters.expire(now, self.config.waiter_ttl);
        let mut page: Vec<_> = self
            .waiters
            .all()
            .filter(|(_, w)| only.is_none_or(|m| w.client == *m))
            .filter_map(|(id, w)| {
                let system = &self.waiters.class(w.class)?.class.system;
                let key = (&w.client, system, w.drv_path.as_str());
                after
                    .is_none_or(|a| key > (&a.client, &a.system, a.drv_path.as_str()))
                    .then_some((key, id))
            })
            .collect();
        let more = page.len() > limit;
        if more {
            page.select_nth_unstable(limit);
            page.truncate(limit);
        }
        page.sort_unstable();
        let next = page
            .last()
            .filter(|_| more)
            .map(|((client, system, drv), _)| WaitingCursor {
                client: (*client).clone(),
                system: (*system).clone(),
                drv_path: (*drv).to_owned(),
            });
        let ids: Vec<_> = page.into_iter().map(|(_, id)| id).collect();
        // Each member's fair key once, not once per waiter and member.
        let keys: std::collections::HashMap<ClientId, super::accounts::FairKey> = self
            .waiters
            .members()
            .map(|m| (m.clone(), self.accounts.fair_key(m)))
            .collect();
        let mut v = Vec::with_capacity(ids.len());
        for id in ids {
            let position = self.waiters.position(id, |m| {
                keys.get(m)
                    .copied()
                    .unwrap_or_else(|| self.accounts.fair_key(m))
            });
            let Some(status) = self.status_at(now, id, position) else {
                continue;
            };
            let Some(w) = self.waiters.get(id) else {
                continue;
            };
            let Some(q) = self.waiters.class(w.class) else {
                continue;
            };
            v.push(WaitingView {
                client: w.client.clone(),
                system: q.class.system.clone(),
                features: q.class.features.clone(),
                drv_path: w.drv_path.clone(),
                status,
                waited: now.since(w.since),
                pin: q.class.pin.clone(),
                streaming: w.via == super::waiters::Via::Stream,
            });
        }
        (v, next)
    }

    /// Capacity per system, sorted by system.
    pub fn capacity(&mut self, now: Time) -> Vec<CapacityView> {
        self.waiters.expire(now, self.config.waiter_ttl);
        let mut by_system: BTreeMap<String, CapacityView> = BTreeMap::new();
        for h in self.registry.iter() {
            let available = eligibility::open(now, &self.config, h).is_ok();
            for s in &h.spec.systems {
                let c = by_system
                    .entry(s.to_string())
                    .or_insert_with(|| CapacityView {
                        system: s.to_string(),
                        ..Default::default()
                    });
                c.hosts += 1;
                c.leases += h.leases;
                if available {
                    c.hosts_available += 1;
                    c.slots_total += h.spec.max_jobs;
                    c.slots_free += h.spec.max_jobs.saturating_sub(h.used());
                }
            }
        }
        for (system, n) in self.waiters.per_system() {
            by_system
                .entry(system.to_string())
                .or_insert_with(|| CapacityView {
                    system: system.to_string(),
                    ..Default::default()
                })
                .waiting = n;
        }
        by_system.into_values().collect()
    }

    /// Explains where a request would go now, changing nothing (the random tie-break uses a
    /// copy of the generator).
    pub fn explain(&self, now: Time, system: &System, features: &BTreeSet<Feature>) -> Explanation {
        let none = BTreeSet::new();
        let ask = Ask {
            system,
            mask: self.registry.system_bits().request_mask(system),
            features,
            client: None,
            exclude: &none,
        };
        let global = self.policy.sees_global_load();
        let mut verdicts = Vec::with_capacity(self.registry.iter().len());
        let mut candidates = Vec::new();
        for h in self.registry.iter() {
            let result = match eligibility::assess(now, &self.config, global, h, &ask) {
                Ok(c) => {
                    candidates.push((h.spec.id.clone(), c));
                    Ok(c.score())
                }
                Err(unfit) => Err(eligibility::describe(
                    now,
                    &self.config,
                    h,
                    unfit,
                    system,
                    features,
                )),
            };
            verdicts.push(Verdict {
                host: h.spec.id.clone(),
                result,
            });
        }
        let chosen = (!candidates.is_empty()).then(|| {
            let cs: Vec<Candidate> = candidates.iter().map(|(_, c)| *c).collect();
            let mut rng = self.rng.clone();
            // Explain with nixdispatch's rule whatever policy runs: a policy with state
            // (round robin) must not advance on a read-only call.
            candidates[LeastLoaded.choose(&cs, &mut rng)].0.clone()
        });
        let outcome = if chosen.is_some() {
            "granted"
        } else if self.could_ever_build(now, system, features) {
            "postpone"
        } else {
            "decline-permanently"
        };
        Explanation {
            verdicts,
            chosen,
            outcome,
        }
    }

    /// Hosts whose leases are counted, for invariant checks: `(host, leases, slots)`.
    pub fn lease_counts(&self) -> impl Iterator<Item = (&HostId, u32, u32)> {
        self.registry
            .iter()
            .map(|h| (&h.spec.id, h.leases, h.spec.max_jobs))
    }
}
