//! The wait queue: requests that found no host and wait for a slot.
//!
//! A waiter waits either on a stream (`WaitForLease`: the service pushes its grant the
//! moment it is made) or by polling (`Acquire` answered `postpone`: Nix asks again every
//! `build-poll-interval`). Both wait in the same queue and are served in the same order;
//! a poller's grant is held for it until it asks again (see [`Held`]).
//!
//! Waiters are grouped by **class**, what a host must offer to take them (system, features,
//! the one host a request is pinned to), and within a class by **member**.
//!
//! **Shortest expected first, with aging.** Which member is served first is decided per
//! freed slot by the scheduler (fair order, see `super::dispatch` and `super::accounts`);
//! within a member's queue of a class:
//! 1. **Overdue waiters first, earliest deadline first.** A waiter's *deadline* is when it
//!    started waiting plus its *slack*, `min(aging_factor × expected duration, max_age)`
//!    (`CoreConfig::aging_factor`, `CoreConfig::max_age`); past it the waiter is overdue.
//!    A later arrival's deadline lies after its arrival, so once a waiter is overdue none of
//!    its member's later builds can pass it: a long build cannot starve behind a stream of
//!    its member's short ones. It waits at most its slack plus its member's turns for the
//!    finitely many waiters overdue before it.
//! 2. **Then the shortest expected build,** then arrival.
//!
//! Cost: a mass rebuild queues tens of thousands of waiters, so nothing here walks the
//! queue. Enqueue, removal and the head of a member's queue are `O(log n)` or `O(√n)`
//! (`super::ranked`), a member's earliest deadline `O(log n)`; a position is
//! `O(members + √n)`; pollers that stopped asking are found
//! in order of their last request.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use super::accounts::FairKey;
use super::ranked::Ranked;
use super::{ClientId, Feature, Grant, HostId, System, Time};

/// Identifies one waiter for the service that waits on it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WaiterId(pub u64);

/// What a host must offer to take a waiter.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Class {
    pub(super) system: System,
    pub(super) features: BTreeSet<Feature>,
    /// Only this host may take it (a builder-side gate waiting for its own host).
    pub(super) pin: Option<HostId>,
}

/// How a waiter waits.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Via {
    /// On a stream: its grant is pushed.
    Stream,
    /// By polling `Acquire`: its grant is held until it asks again.
    Poll,
}

/// A waiter's place in its member's queue: expected milliseconds, arrival sequence, id.
pub(super) type Key = (u64, u64, u64);

/// A waiter's place in its member's deadline order: deadline (milliseconds since the clock's
/// epoch), arrival sequence, id.
pub(super) type DeadlineKey = (u64, u64, u64);

/// A waiter's slack: `min(factor × expected, max_age)`. Its deadline is when it started
/// waiting plus this.
pub(super) fn slack(expected: Duration, factor: u32, max_age: Duration) -> Duration {
    expected.saturating_mul(factor).min(max_age)
}

/// One waiting request.
#[derive(Clone, Debug)]
pub(super) struct Waiter {
    pub(super) client: ClientId,
    pub(super) class: u32,
    pub(super) drv_path: String,
    pub(super) exclude: BTreeSet<HostId>,
    pub(super) key: Key,
    /// Its deadline: when it started waiting plus its slack (milliseconds).
    pub(super) deadline: u64,
    /// When it started waiting (kept across a poller's repeats and a stream's re-connect).
    pub(super) since: Time,
    /// Its slack: its deadline is `since` plus this. Kept only for the property tests'
    /// oracle, which computes the deadline without reading `deadline`.
    #[cfg(test)]
    pub(super) slack: Duration,
    pub(super) via: Via,
    pub(super) last_seen: Time,
}

/// The waiters of one class.
#[derive(Debug)]
pub(super) struct ClassQueue {
    pub(super) class: Class,
    /// Each member's waiters, shortest expected first.
    pub(super) members: HashMap<ClientId, Ranked<Key>>,
    /// The same waiters by deadline, earliest first: the head of a member's is overdue
    /// when its deadline has passed.
    pub(super) deadlines: HashMap<ClientId, BTreeSet<DeadlineKey>>,
    len: usize,
}

/// A grant made to a waiter on a stream, for the service to push.
#[derive(Clone, Debug, PartialEq)]
pub struct Handout {
    /// The waiter.
    pub waiter: WaiterId,
    /// Its lease. The holder MUST keep it alive within `grant.ttl` (the claim window).
    pub grant: Grant,
    /// How long it waited.
    pub waited: Duration,
}

/// Every waiter, and the grants waiting for their pollers.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    by_id: HashMap<WaiterId, Waiter>,
    by_request: HashMap<(ClientId, String), WaiterId>,
    /// Waiters per member, for the cap on a member's waiting requests.
    per_member: HashMap<ClientId, usize>,
    classes: HashMap<u32, ClassQueue>,
    class_ids: HashMap<Class, u32>,
    next_class: u32,
    next: u64,
    /// Pollers by their last request, oldest first.
    polls: BTreeSet<(Time, WaiterId)>,
    /// Grants held for pollers, by `(client, drv path)`.
    held: HashMap<(ClientId, String), Grant>,
    /// Grants for stream waiters, not yet taken by the service.
    pub(super) outbox: Vec<Handout>,
    /// Whether the hosts fitting one class are a strict subset of those fitting another,
    /// by spec; cleared when a host registers or changes its spec.
    narrower: HashMap<(Class, Class), bool>,
    /// Slots serving each class, and when they were counted (for estimates: counting walks
    /// every host, so it is done at most once per [`SLOTS_FRESH`] per class).
    slots: HashMap<u32, (Time, u32)>,
}

/// How long a class's slot count is reused for estimates.
const SLOTS_FRESH: Duration = Duration::from_secs(1);

/// A new waiter, as [`Waiters::enqueue`] takes it.
pub(super) struct NewWaiter<'a> {
    pub(super) client: &'a ClientId,
    pub(super) class: Class,
    pub(super) drv_path: &'a str,
    pub(super) exclude: &'a BTreeSet<HostId>,
    pub(super) expected: Duration,
    /// Its slack ([`slack`]): its deadline is when it started waiting plus this.
    pub(super) slack: Duration,
    pub(super) via: Via,
}

impl Waiters {
    /// Adds a waiter, or refreshes the one already waiting for the same `(client, drv)`:
    /// a repeated poll, or a stream re-connecting. A repeat keeps its place; anything else
    /// about it (class, exclusions, how it waits) is taken from the new request. Returns its
    /// id (new when the way of waiting changed, so that a stale stream cannot cancel it).
    pub(super) fn enqueue(&mut self, now: Time, w: NewWaiter<'_>) -> WaiterId {
        let request = (w.client.clone(), w.drv_path.to_owned());
        let (seq, since, same) = match self.by_request.get(&request).copied() {
            Some(old) => {
                let o = self.by_id.get(&old).expect("indexed waiters exist");
                let keep = self.class_ids.get(&w.class) == Some(&o.class)
                    && o.via == Via::Poll
                    && w.via == Via::Poll
                    && o.exclude == *w.exclude;
                let r = (o.key.1, o.since, keep.then_some(old));
                if !keep {
                    self.remove(old);
                }
                r
            }
            None => {
                self.next += 1;
                (self.next, now, None)
            }
        };
        if let Some(id) = same {
            self.touch(now, id);
            return id;
        }
        self.next += 1;
        let id = WaiterId(self.next);
        let class = match self.class_ids.get(&w.class) {
            Some(c) => *c,
            None => {
                self.next_class = self.next_class.wrapping_add(1);
                while self.classes.contains_key(&self.next_class) {
                    self.next_class = self.next_class.wrapping_add(1);
                }
                let c = self.next_class;
                self.class_ids.insert(w.class.clone(), c);
                self.classes.insert(
                    c,
                    ClassQueue {
                        class: w.class,
                        members: HashMap::new(),
                        deadlines: HashMap::new(),
                        len: 0,
                    },
                );
                c
            }
        };
        let expected = u64::try_from(w.expected.as_millis()).unwrap_or(u64::MAX);
        let key = (expected, seq, id.0);
        let deadline = since.after(w.slack).as_millis();
        let q = self.classes.get_mut(&class).expect("created above");
        q.members.entry(w.client.clone()).or_default().insert(key);
        q.deadlines
            .entry(w.client.clone())
            .or_default()
            .insert((deadline, seq, id.0));
        q.len += 1;
        if w.via == Via::Poll {
            self.polls.insert((now, id));
        }
        self.by_request.insert(request, id);
        *self.per_member.entry(w.client.clone()).or_default() += 1;
        self.by_id.insert(
            id,
            Waiter {
                client: w.client.clone(),
                class,
                drv_path: w.drv_path.to_owned(),
                exclude: w.exclude.clone(),
                key,
                deadline,
                since,
                #[cfg(test)]
                slack: w.slack,
                via: w.via,
                last_seen: now,
            },
        );
        id
    }

    /// A poller asked again.
    fn touch(&mut self, now: Time, id: WaiterId) {
        if let Some(w) = self.by_id.get_mut(&id) {
            if w.via == Via::Poll {
                self.polls.remove(&(w.last_seen, id));
                self.polls.insert((now, id));
            }
            w.last_seen = now;
        }
    }

    /// Waiter `id`.
    pub(super) fn get(&self, id: WaiterId) -> Option<&Waiter> {
        self.by_id.get(&id)
    }

    /// The waiter of `(client, drv)`, if any.
    pub(super) fn find(&self, client: &ClientId, drv: &str) -> Option<WaiterId> {
        if self.by_request.is_empty() {
            return None;
        }
        self.by_request
            .get(&(client.clone(), drv.to_owned()))
            .copied()
    }

    /// Removes waiter `id` (served, cancelled or gone); returns it.
    pub(super) fn remove(&mut self, id: WaiterId) -> Option<Waiter> {
        let w = self.by_id.remove(&id)?;
        self.by_request
            .remove(&(w.client.clone(), w.drv_path.clone()));
        if let Some(n) = self.per_member.get_mut(&w.client) {
            *n -= 1;
            if *n == 0 {
                self.per_member.remove(&w.client);
            }
        }
        if w.via == Via::Poll {
            self.polls.remove(&(w.last_seen, id));
        }
        if let Some(q) = self.classes.get_mut(&w.class) {
            if let Some(mq) = q.members.get_mut(&w.client) {
                mq.remove(&w.key);
                if mq.is_empty() {
                    q.members.remove(&w.client);
                }
            }
            if let Some(dq) = q.deadlines.get_mut(&w.client) {
                dq.remove(&(w.deadline, w.key.1, w.key.2));
                if dq.is_empty() {
                    q.deadlines.remove(&w.client);
                }
            }
            q.len -= 1;
            if q.len == 0 {
                let q = self.classes.remove(&w.class).expect("present");
                self.class_ids.remove(&q.class);
                self.slots.remove(&w.class);
            }
        }
        Some(w)
    }

    /// Forgets the waiter of `(client, drv)`, if any.
    pub(super) fn remove_request(&mut self, client: &ClientId, drv: &str) {
        if let Some(id) = self.find(client, drv) {
            self.remove(id);
        }
    }

    /// Removes pollers that have not asked for longer than `ttl`.
    pub(super) fn expire(&mut self, now: Time, ttl: Duration) -> usize {
        let mut n = 0;
        while let Some(&(seen, id)) = self.polls.first() {
            if now.since(seen) <= ttl {
                break;
            }
            self.remove(id);
            n += 1;
        }
        n
    }

    /// Every class with waiters.
    pub(super) fn classes(&self) -> impl Iterator<Item = (u32, &ClassQueue)> {
        self.classes.iter().map(|(c, q)| (*c, q))
    }

    /// Class `c`.
    pub(super) fn class(&self, c: u32) -> Option<&ClassQueue> {
        self.classes.get(&c)
    }

    /// Waiters of `member`.
    pub(super) fn waiting_of(&self, member: &ClientId) -> usize {
        self.per_member.get(member).copied().unwrap_or(0)
    }

    /// The members with waiters, in no order.
    pub(super) fn members(&self) -> impl Iterator<Item = &ClientId> {
        self.per_member.keys()
    }

    /// Every waiter, in no order.
    pub(super) fn all(&self) -> impl Iterator<Item = (WaiterId, &Waiter)> {
        self.by_id.iter().map(|(id, w)| (*id, w))
    }

    /// Waiters.
    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// 1-based position of waiter `id` among the waiters of its class, in fair order.
    ///
    /// An honest approximation, `O(members)`: fair order takes turns between members, so
    /// before my member reaches me (`r` of its waiters are ahead of me), each other member
    /// is served about `min(its queue, r)` times, once more if it comes before mine in fair
    /// order now. Exact for round robin among equals while nothing finishes and nobody is
    /// overdue; weights, builds that end meanwhile and overdue waiters (which go first
    /// within their member) make it an estimate.
    pub(super) fn position(&self, id: WaiterId, fair: impl Fn(&ClientId) -> FairKey) -> u32 {
        let Some(w) = self.by_id.get(&id) else {
            return 0;
        };
        let Some(q) = self.classes.get(&w.class) else {
            return 0;
        };
        let r = q.members.get(&w.client).map_or(0, |m| m.rank(&w.key)) as u64;
        let mine = fair(&w.client);
        let mut pos = r + 1;
        for (m, mq) in &q.members {
            if *m == w.client {
                continue;
            }
            let ahead = u64::from(fair(m).cmp(&mine).is_lt());
            pos += (mq.len() as u64).min(r + ahead);
        }
        u32::try_from(pos).unwrap_or(u32::MAX)
    }

    /// The slots serving class `c` as counted at most [`SLOTS_FRESH`] ago, else counted
    /// anew by `count`.
    pub(super) fn slots(&mut self, now: Time, c: u32, count: impl FnOnce() -> u32) -> u32 {
        match self.slots.get(&c) {
            Some(&(at, n)) if now.since(at) < SLOTS_FRESH => n,
            _ => {
                let n = count();
                self.slots.insert(c, (now, n));
                n
            }
        }
    }

    /// Waiters per system.
    pub(super) fn per_system(&self) -> BTreeMap<System, u32> {
        let mut m: BTreeMap<System, u32> = BTreeMap::new();
        for q in self.classes.values() {
            *m.entry(q.class.system.clone()).or_default() +=
                u32::try_from(q.len).unwrap_or(u32::MAX);
        }
        m
    }

    /// Holds `grant` for the poller `(client, drv)` until it asks again.
    pub(super) fn hold(&mut self, client: &ClientId, drv: &str, grant: Grant) {
        self.held.insert((client.clone(), drv.to_owned()), grant);
    }

    /// The grant held for `(client, drv)`, taken.
    pub(super) fn take_held(&mut self, client: &ClientId, drv: &str) -> Option<Grant> {
        if self.held.is_empty() {
            return None;
        }
        self.held.remove(&(client.clone(), drv.to_owned()))
    }

    /// A lease of `(client, drv)` on `host` ended: a grant held for it is void.
    pub(super) fn lease_ended(&mut self, client: &ClientId, drv: &str, host: &HostId) {
        if self.held.is_empty() {
            return;
        }
        let k = (client.clone(), drv.to_owned());
        if self.held.get(&k).is_some_and(|g| g.host.id == *host) {
            self.held.remove(&k);
        }
    }

    /// The cached "hosts of `a` ⊊ hosts of `b`", if known.
    pub(super) fn narrower(&self, a: &Class, b: &Class) -> Option<bool> {
        self.narrower.get(&(a.clone(), b.clone())).copied()
    }

    /// Caches "hosts of `a` ⊊ hosts of `b`".
    pub(super) fn set_narrower(&mut self, a: Class, b: Class, v: bool) {
        if self.narrower.len() > 4096 {
            self.narrower.clear();
        }
        self.narrower.insert((a, b), v);
    }

    /// A host registered or changed: which classes are narrower than which may differ.
    pub(super) fn hosts_changed(&mut self) {
        self.narrower.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> ClientId {
        ClientId::new(s)
    }

    fn class(system: &str) -> Class {
        Class {
            system: System::new(system),
            features: BTreeSet::new(),
            pin: None,
        }
    }

    fn add(w: &mut Waiters, now: u64, client: &str, drv: &str, secs: u64, via: Via) -> WaiterId {
        w.enqueue(
            Time::from_millis(now),
            NewWaiter {
                client: &c(client),
                class: class("x86_64-linux"),
                drv_path: drv,
                exclude: &BTreeSet::new(),
                expected: Duration::from_secs(secs),
                slack: slack(Duration::from_secs(secs), 8, Duration::from_secs(3600)),
                via,
            },
        )
    }

    /// Positions take turns between members: with equal shares, my third waiter comes
    /// after two of every other member's; a repeated poll keeps its place; removal and
    /// expiry move the others up.
    #[test]
    fn positions_take_turns_between_members() {
        let mut w = Waiters::default();
        let a: Vec<_> = (0..3)
            .map(|i| add(&mut w, 0, "a", &format!("a{i}"), 10, Via::Stream))
            .collect();
        let b1 = add(&mut w, 0, "b", "b1", 10, Via::Poll);
        add(&mut w, 0, "b", "b2", 10, Via::Stream);
        // `a` arrived first: it is ahead of `b` in fair order.
        let fair = |m: &ClientId| {
            let mut acc = super::super::accounts::Accounts::default();
            acc.arrive(&c("a"));
            acc.arrive(&c("b"));
            acc.fair_key(m)
        };
        assert_eq!(w.position(a[0], fair), 1);
        assert_eq!(w.position(b1, fair), 2);
        assert_eq!(w.position(a[2], fair), 5);
        assert_eq!(add(&mut w, 5, "b", "b1", 10, Via::Poll), b1);
        w.remove(a[0]);
        assert_eq!(w.position(b1, fair), 2);
        assert_eq!(
            w.expire(Time::from_millis(30_006), Duration::from_secs(30)),
            1
        );
        assert_eq!(w.len(), 3);
        assert_eq!(w.per_system().values().sum::<u32>(), 3);
    }

    /// Within a member, the shortest expected build is first whatever the arrival order.
    #[test]
    fn shortest_expected_first_within_a_member() {
        let mut w = Waiters::default();
        add(&mut w, 0, "a", "long", 600, Via::Stream);
        let short = add(&mut w, 1, "a", "short", 5, Via::Stream);
        let (_, q) = w.classes().next().unwrap();
        assert_eq!(q.members[&c("a")].first().map(|k| k.2), Some(short.0));
    }
}
