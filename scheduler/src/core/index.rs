//! The host index: hosts grouped by capability class (the same systems, supported and
//! mandatory features), and in each class the hosts that take leases now, ordered by the
//! least-loaded score. It makes the production policy's decision cost grow with the number
//! of classes and the logarithm of the fleet, not with the fleet:
//! - a grant looks at the best entry of each class that can serve the request: `O(classes ·
//!   log hosts)`;
//! - "nothing free" is an empty free set in every such class: `O(classes)`.
//!
//! The index is a filter, not the judge: what it cannot know without a clock (an agent that
//! fell silent, a client's own unreachable report, the request's excluded hosts) is checked
//! by `eligibility::assess` on the entries it offers, and a host found late leaves the free
//! set until its next report. Everything that changes a host's openness or load calls
//! [`HostIndex::update`] (through `Scheduler::reindex`); the property tests check that the
//! index and a full scan always agree.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use super::eligibility::features_fit;
use super::registry::{Host, Link};
use super::rng::SplitMix64;
use super::{Feature, HostId, System};

/// A class's identity: what a host can build.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ClassKey {
    systems: BTreeSet<System>,
    supported: BTreeSet<Feature>,
    mandatory: BTreeSet<Feature>,
}

impl ClassKey {
    fn of(host: &Host) -> Self {
        ClassKey {
            systems: host.spec.systems.clone(),
            supported: host.spec.supported_features.clone(),
            mandatory: host.spec.mandatory_features.clone(),
        }
    }

    fn serves(&self, system: &System, features: &BTreeSet<Feature>) -> bool {
        (system.is_builtin() || self.systems.contains(system))
            && features_fit(&self.supported, &self.mandatory, features)
    }
}

/// Position in a class's free set: the score (a positive finite `f64`, whose bits order as
/// the number does), a random tie-break drawn anew at every change so that equally loaded
/// hosts share the work, and the id to make entries unique.
pub(super) type FreeKey = (u64, u64, HostId);

#[derive(Debug)]
struct Class {
    key: ClassKey,
    /// Every host of the class, whatever its state.
    members: BTreeSet<HostId>,
    /// Hosts that take leases now as far as events tell, best first.
    free: BTreeSet<FreeKey>,
}

/// A request shape and the classes that serve it.
type Shape = (System, BTreeSet<Feature>, Arc<[usize]>);

/// Where a host stands in the index.
#[derive(Debug)]
struct Entry {
    class: usize,
    free: Option<FreeKey>,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub(super) struct HostIndex {
    classes: Vec<Class>,
    by_key: HashMap<ClassKey, usize>,
    /// Request shapes (system, features) → the classes that serve them, keyed by a hash of
    /// the shape so that a lookup allocates nothing; the full shape is compared on a hit.
    /// Cleared whenever a class appears.
    shapes: HashMap<u64, Vec<Shape>>,
    entries: HashMap<HostId, Entry>,
}

/// Whether `host` takes leases as far as events tell: connected, not drained, its SSH probe's
/// breaker closed, gates open, a free slot. What changes with time alone (lateness, clients' unreachable reports ageing
/// out) is left to `eligibility::assess` at lookup.
fn takes_leases(host: &Host) -> bool {
    matches!(host.link, Link::Connected(_))
        && !host.draining
        && !host.probe.open
        && !host.gate_closed
        && host.used() < host.spec.max_jobs
}

/// The least-loaded score of `host` as an orderable key (see [`super::Candidate::score`]).
fn score_bits(host: &Host) -> u64 {
    let score =
        (f64::from(host.used()) + 1.0) / (f64::from(host.spec.max_jobs) * host.spec.speed_factor);
    score.to_bits()
}

impl HostIndex {
    /// Brings `host`'s entry up to date after anything about it changed.
    pub(super) fn update(&mut self, host: &Host, rng: &mut SplitMix64) {
        let id = &host.spec.id;
        let class = self.class_of(host);
        let entry = self
            .entries
            .entry(id.clone())
            .or_insert(Entry { class, free: None });
        if entry.class != class {
            if let Some(k) = entry.free.take() {
                self.classes[entry.class].free.remove(&k);
            }
            self.classes[entry.class].members.remove(id);
            entry.class = class;
        }
        self.classes[class].members.insert(id.clone());
        let want = takes_leases(host).then(|| score_bits(host));
        match (&entry.free, want) {
            (Some(k), Some(bits)) if k.0 == bits => {}
            (old, want) => {
                if let Some(k) = old {
                    self.classes[class].free.remove(k);
                }
                entry.free = want.map(|bits| (bits, rng.next_u64(), id.clone()));
                if let Some(k) = &entry.free {
                    self.classes[class].free.insert(k.clone());
                }
            }
        }
    }

    /// Takes `id` out of the free set until its next update (it was found late).
    pub(super) fn close(&mut self, id: &HostId) {
        if let Some(e) = self.entries.get_mut(id)
            && let Some(k) = e.free.take()
        {
            self.classes[e.class].free.remove(&k);
        }
    }

    /// Forgets `id` entirely.
    pub(super) fn remove(&mut self, id: &HostId) {
        if let Some(e) = self.entries.remove(id) {
            if let Some(k) = e.free {
                self.classes[e.class].free.remove(&k);
            }
            self.classes[e.class].members.remove(id);
        }
    }

    fn class_of(&mut self, host: &Host) -> usize {
        let key = ClassKey::of(host);
        if let Some(c) = self.by_key.get(&key) {
            return *c;
        }
        let c = self.classes.len();
        self.classes.push(Class {
            key: key.clone(),
            members: BTreeSet::new(),
            free: BTreeSet::new(),
        });
        self.by_key.insert(key, c);
        self.shapes.clear();
        c
    }

    /// The classes that serve a request shape.
    pub(super) fn classes_for(
        &mut self,
        system: &System,
        features: &BTreeSet<Feature>,
    ) -> Arc<[usize]> {
        let mut h = DefaultHasher::new();
        system.hash(&mut h);
        features.hash(&mut h);
        let bucket = self.shapes.entry(h.finish()).or_default();
        let i = match bucket
            .iter()
            .position(|(s, f, _)| s == system && f == features)
        {
            Some(i) => i,
            None => {
                let serving = self
                    .classes
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.key.serves(system, features))
                    .map(|(i, _)| i)
                    .collect();
                bucket.push((system.clone(), features.clone(), serving));
                bucket.len() - 1
            }
        };
        bucket[i].2.clone()
    }

    /// The classes that serve a request shape, computed afresh (for read-only callers).
    pub(super) fn classes_serving<'a>(
        &'a self,
        system: &'a System,
        features: &'a BTreeSet<Feature>,
    ) -> impl Iterator<Item = usize> + 'a {
        self.classes
            .iter()
            .enumerate()
            .filter(move |(_, c)| c.key.serves(system, features))
            .map(|(i, _)| i)
    }

    /// Class `c`'s free hosts, best first.
    pub(super) fn free(&self, c: usize) -> impl Iterator<Item = &FreeKey> {
        self.classes[c].free.iter()
    }

    /// Every host of class `c`.
    pub(super) fn members(&self, c: usize) -> impl Iterator<Item = &HostId> {
        self.classes[c].members.iter()
    }
}
