//! Handing freed slots to waiters, in fair order, the moment they free.
//!
//! Every change that can free a slot (a release, an expiry, a host registering or
//! reporting, an undrain, a quota raised) calls [`Scheduler::dispatch_host`] for the host
//! concerned, or [`Scheduler::dispatch`] for all of them. So between two operations the
//! queue is **settled**: no waiter could be placed on any free slot. A new request that
//! finds a free slot therefore takes nothing a waiter could use, and the slot a release
//! frees goes to a waiter within the same call.
//!
//! Who gets a free slot of host `H`: among the waiters that `H` fits (system, features, pin;
//! not excluded by them, not reported unreachable by their member, their member and system
//! under quota), the member first in fair order (`super::accounts`), and that member's
//! waiter past its deadline, the earliest first, else its shortest expected build (see
//! `super::waiters`, "Shortest expected first, with aging"). One exception, the **last slot
//! rule**: when `H` has one free
//! slot left and waiters of a narrower class also fit it (the hosts that can serve them are
//! a strict subset of those that can serve the broader one, e.g. `kvm` builds against
//! plain ones, or builds pinned to `H`), the broader classes do not get that slot: their
//! builds can run elsewhere, the narrower ones cannot. The same rule applies to new
//! requests in the choose stage of placement.
//!
//! A stream waiter's grant goes to the outbox ([`Scheduler::take_handouts`]); a poller's is
//! held until it asks again. Both are leases with the short claim TTL: a grant nobody
//! claims expires and its slot goes to the next waiter.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use super::eligibility;
use super::registry::{Host, Registry};
use super::waiters::{self, Class, Handout, Key, NewWaiter, Via, WaiterId, Waiters};
use super::{BuildOutcome, durations};
use super::{
    ClientId, Error, Grant, HostId, HostState, LeaseEnd, LeaseId, LeaseRequest, Scheduler, Time,
};

/// How many of a member's waiters are looked at to find one that does not exclude a host.
/// Exclusions are rare (a retry after `HOST_UNREACHABLE`), so a member whose first few
/// waiters all exclude the host simply waits for another host.
const EXCLUDE_SCAN: usize = 16;

/// A member's candidate for a free slot of one class.
#[derive(Copy, Clone, Debug)]
enum Rank {
    /// Its earliest overdue waiter: deadline (ms), arrival sequence, waiter.
    Overdue { deadline: u64, seq: u64, w: u64 },
    /// Its shortest expected waiter (none overdue).
    Shortest(Key),
}

impl Rank {
    /// Between one member's candidates of several classes: overdue before the rest, by
    /// deadline; the rest shortest expected first; then arrival.
    fn order(&self) -> (u8, u64, u64) {
        match *self {
            Rank::Overdue { deadline, seq, .. } => (0, deadline, seq),
            Rank::Shortest(k) => (1, k.0, k.1),
        }
    }

    fn waiter(&self) -> WaiterId {
        match *self {
            Rank::Overdue { w, .. } => WaiterId(w),
            Rank::Shortest(k) => WaiterId(k.2),
        }
    }
}

/// The answer to [`Scheduler::wait`].
#[derive(Clone, Debug, PartialEq)]
pub enum WaitAnswer {
    /// A host was free: the lease is granted at once.
    Granted(Grant),
    /// Queued: its grant will come through [`Scheduler::take_handouts`].
    Queued {
        /// The waiter, to cancel it or ask its position.
        waiter: WaiterId,
        /// Where it stands, as [`WaitStatus`].
        status: WaitStatus,
        /// Why nothing was granted now, for the user.
        reason: String,
    },
    /// Nothing free and the client can build locally: it should.
    Decline {
        /// Why, for the user.
        reason: String,
    },
    /// No live host can ever build this.
    DeclinePermanently {
        /// Why, for the user.
        reason: String,
    },
}

/// Where a waiter stands.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct WaitStatus {
    /// 1-based position among the waiters of its class (system, features, pin), in fair
    /// order; an estimate (see `Waiters::position`).
    pub position: u32,
    /// About how long until its grant: `position × mean build duration / slots` of the
    /// hosts that can serve it.
    pub estimate: Duration,
}

/// Whether `host` fits `class` by spec: system, features and pin.
pub(super) fn fits(host: &Host, class: &Class) -> bool {
    class.pin.as_ref().is_none_or(|p| *p == host.spec.id)
        && host.builds(&class.system)
        && host.features_fit(&class.features)
}

/// Whether the hosts fitting `a` are a strict subset of those fitting `b` (by spec, every
/// registered host), cached in `waiters` until a host registers.
pub(super) fn narrower(registry: &Registry, waiters: &mut Waiters, a: &Class, b: &Class) -> bool {
    if let Some(v) = waiters.narrower(a, b) {
        return v;
    }
    let mut strict = false;
    let mut subset = true;
    for h in registry.iter() {
        let (fa, fb) = (fits(h, a), fits(h, b));
        if fa && !fb {
            subset = false;
            break;
        }
        strict |= fb && !fa;
    }
    let v = subset && strict;
    waiters.set_narrower(a.clone(), b.clone(), v);
    v
}

/// The class of a request.
pub(super) fn class_of(req: &LeaseRequest, pin: Option<&HostId>) -> Class {
    Class {
        system: req.system.clone(),
        features: req.required_features.clone(),
        pin: pin.cloned(),
    }
}

impl Scheduler {
    /// Waits for a lease: grants one now when a host is free (exactly like
    /// [`acquire`](Self::acquire)), else queues the request and returns its waiter, whose
    /// grant later comes out of [`take_handouts`](Self::take_handouts). With `pin`, only
    /// that host may be granted.
    ///
    /// Declines when the client can build locally and nothing is free, and declines
    /// permanently when no host that is not gone could ever build it, except in the startup
    /// window (`CoreConfig::startup_window`): agents may not have re-registered yet after a
    /// restart, and a member that cannot build locally must not fail for that. In that
    /// window, while a registered host has not reported yet, and during the startup hold,
    /// the request is queued rather than placed: a host may still run builds from before the
    /// restart that neither its report nor a re-attached lease shows yet.
    pub fn wait(&mut self, now: Time, req: &LeaseRequest, pin: Option<&HostId>) -> WaitAnswer {
        // Without a cap nothing is refused; the fallback only keeps the types honest.
        self.wait_in(now, req, pin, None)
            .unwrap_or_else(|e| WaitAnswer::Decline {
                reason: e.to_string(),
            })
    }

    /// [`wait`](Self::wait) under the member's cap on waiting requests
    /// (`CoreConfig::max_waiting_per_member`): a request that would queue while its member
    /// already has that many waiting is refused with [`Error::TooManyWaiting`] and not
    /// queued. A repeat of a request already waiting, a grant, an attach and a decline are
    /// never refused.
    pub fn wait_capped(
        &mut self,
        now: Time,
        req: &LeaseRequest,
        pin: Option<&HostId>,
    ) -> Result<WaitAnswer, Error> {
        let cap = self.config.max_waiting_per_member;
        self.wait_in(now, req, pin, Some(cap))
    }

    fn wait_in(
        &mut self,
        now: Time,
        req: &LeaseRequest,
        pin: Option<&HostId>,
        cap: Option<usize>,
    ) -> Result<WaitAnswer, Error> {
        // `pin` or the request's own `pin_host`: one pin, as `acquire` has it.
        let pin = pin.or(req.pin_host.as_ref());
        self.expire(now);
        self.accounts.arrive(&req.client);
        if let Some(g) = self.claim_held(now, req) {
            return Ok(WaitAnswer::Granted(g));
        }
        // Attaching takes no slot, so neither the startup hold nor the queue delays it.
        if let Some(g) = pin.and_then(|p| self.attach(now, p, req)) {
            self.waiters.remove_request(&req.client, &req.drv_path);
            return Ok(WaitAnswer::Granted(g));
        }
        let why = if self.holding(now) || (self.starting(now) && !self.unreported.is_empty()) {
            Some("builders are re-registering after the scheduler's start".to_owned())
        } else {
            match self.place(now, req, pin) {
                Ok(g) => {
                    self.waiters.remove_request(&req.client, &req.drv_path);
                    return Ok(WaitAnswer::Granted(g));
                }
                Err(why) => why,
            }
        };
        if !self.starting(now) && !self.could_ever_serve(now, req, pin) {
            self.waiters.remove_request(&req.client, &req.drv_path);
            return Ok(WaitAnswer::DeclinePermanently {
                reason: self.never_reason(req, pin),
            });
        }
        let reason = why.unwrap_or_else(|| format!("no builder free for {}", req.system));
        if req.can_build_locally {
            self.waiters.remove_request(&req.client, &req.drv_path);
            return Ok(WaitAnswer::Decline { reason });
        }
        self.check_waiting_cap(req, cap)?;
        let waiter = self.enqueue(now, req, pin, Via::Stream);
        let status = self
            .wait_status(now, waiter)
            .expect("the waiter was just queued");
        Ok(WaitAnswer::Queued {
            waiter,
            status,
            reason,
        })
    }

    /// Refuses to queue `req` when its member already has `cap` requests waiting and `req`
    /// is not one of them (a repeat keeps its place).
    pub(super) fn check_waiting_cap(
        &self,
        req: &LeaseRequest,
        cap: Option<usize>,
    ) -> Result<(), Error> {
        match cap {
            Some(limit)
                if self.waiters.find(&req.client, &req.drv_path).is_none()
                    && self.waiters.waiting_of(&req.client) >= limit =>
            {
                Err(Error::TooManyWaiting {
                    member: req.client.to_string(),
                    limit,
                })
            }
            _ => Ok(()),
        }
    }

    /// Requests `member` has waiting in the queue.
    pub fn waiting_of(&self, member: &ClientId) -> usize {
        self.waiters.waiting_of(member)
    }

    /// Whether `now` is within the startup hold (`CoreConfig::startup_hold`): no slot goes
    /// to a waiter yet, while holders of leases from before a restart re-attach them.
    pub(super) fn holding(&self, now: Time) -> bool {
        now.since(Time::ZERO) < self.config.startup_hold
    }

    /// Whether `now` is within the startup window after the clock's epoch (the scheduler's
    /// start), while agents may still be re-registering after a restart.
    pub(super) fn starting(&self, now: Time) -> bool {
        now.since(Time::ZERO) < self.config.startup_window
    }

    /// Queues `req` (or refreshes its waiter); returns the waiter.
    pub(super) fn enqueue(
        &mut self,
        now: Time,
        req: &LeaseRequest,
        pin: Option<&HostId>,
        via: Via,
    ) -> WaiterId {
        let expected = self.durations.expected(durations::drv_name(&req.drv_path));
        let slack = waiters::slack(expected, self.config.aging_factor, self.config.max_age);
        self.waiters.enqueue(
            now,
            NewWaiter {
                client: &req.client,
                class: class_of(req, pin),
                drv_path: &req.drv_path,
                exclude: &req.exclude_hosts,
                expected,
                slack,
                via,
            },
        )
    }

    /// 1-based position of waiter `id` in fair order (an estimate, see
    /// `Waiters::position`).
    pub(super) fn position(&self, id: WaiterId) -> u32 {
        self.waiters.position(id, |m| self.accounts.fair_key(m))
    }

    /// Where waiter `id` stands, or `None` when it is no longer waiting (served, cancelled,
    /// or gone).
    pub fn wait_status(&mut self, now: Time, id: WaiterId) -> Option<WaitStatus> {
        let position = self.position(id);
        self.status_at(now, id, position)
    }

    /// Waiter `id`'s status at `position`, with its estimate.
    pub(super) fn status_at(
        &mut self,
        now: Time,
        id: WaiterId,
        position: u32,
    ) -> Option<WaitStatus> {
        let c = self.waiters.get(id)?.class;
        let class = self.waiters.class(c)?.class.clone();
        // Slots of the hosts that serve the class now: `O(hosts)`, so counted at most once
        // a second per class however many waiters ask.
        let (registry, config) = (&self.registry, &self.config);
        let slots = self.waiters.slots(now, c, || {
            registry
                .iter()
                .filter(|h| fits(h, &class) && eligibility::open(now, config, h).is_ok())
                .map(|h| h.spec.max_jobs)
                .sum()
        });
        let mean = self.durations.overall();
        let estimate = mean.mul_f64(f64::from(position) / f64::from(slots.max(1)));
        Some(WaitStatus { position, estimate })
    }

    /// The waiter stopped waiting (its stream broke). A grant already made to it and not
    /// yet taken by the service goes back, and its slot to the next waiter. Returns whether
    /// it was still known.
    pub fn cancel_wait(&mut self, now: Time, id: WaiterId) -> bool {
        if self.waiters.remove(id).is_some() {
            return true;
        }
        let Some(i) = self.waiters.outbox.iter().position(|h| h.waiter == id) else {
            return false;
        };
        let h = self.waiters.outbox.swap_remove(i);
        self.return_grant(now, &h.grant.lease_id);
        true
    }

    /// A grant its waiter could not take (the stream was gone before it was delivered):
    /// the lease ends without counting as a build, and its slot goes to the next waiter.
    pub fn return_grant(&mut self, now: Time, lease: &LeaseId) {
        self.end_lease(now, lease, LeaseEnd::Released(BuildOutcome::Cancelled));
    }

    /// The grants made to stream waiters since the last call, for the service to push.
    pub fn take_handouts(&mut self) -> Vec<Handout> {
        std::mem::take(&mut self.waiters.outbox)
    }

    /// Waiters in the queue (streams and pollers).
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }

    /// Hands every free slot to waiters, the least loaded hosts first. For changes that
    /// are not tied to one host (a quota raised, an undrain, time passing).
    pub fn dispatch(&mut self, now: Time) {
        self.expire(now);
        self.dispatch_free(now);
    }

    /// [`dispatch`](Self::dispatch) without expiring first.
    pub(super) fn dispatch_free(&mut self, now: Time) {
        if self.waiters.len() == 0 {
            return;
        }
        let mut free: Vec<(f64, HostId)> = self
            .registry
            .iter()
            .filter_map(|h| {
                eligibility::assess_now(now, &self.config, true, h, None)
                    .ok()
                    .map(|c| (c.score(), h.spec.id.clone()))
            })
            .collect();
        free.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        for (_, id) in free {
            self.dispatch_host(now, &id);
        }
    }

    /// Hands the free slots of host `id` to waiters in fair order.
    ///
    /// Only for policies that see every client's load: under `stock-nix` a host is never
    /// full for the scheduler, and nothing waits in a fair order.
    pub(super) fn dispatch_host(&mut self, now: Time, id: &HostId) {
        if self.waiters.len() == 0 || !self.policy.sees_global_load() {
            return;
        }
        if self.holding(now) || (self.unreported.contains(id) && self.starting(now)) {
            return;
        }
        loop {
            let Some(host) = self.registry.get(id) else {
                return;
            };
            let Ok(c) = eligibility::assess_now(now, &self.config, true, host, None) else {
                return;
            };
            let free = c.slots - c.used;
            let Some(w) = self.pick(now, id, free) else {
                return;
            };
            #[cfg(test)]
            self.audit_pick(now, id, free, w);
            self.hand_out(now, w, id);
        }
    }

    /// The waiter that gets one free slot of host `id` (`free` slots are free), if any.
    pub(super) fn pick(&mut self, now: Time, id: &HostId, free: u32) -> Option<WaiterId> {
        let host = self.registry.get(id)?;
        let usable = |k: u64| {
            self.waiters
                .get(WaiterId(k))
                .is_some_and(|w| !w.exclude.contains(id))
        };
        // Each member's candidate per class: its earliest overdue waiter, else its shortest.
        let mut entries: Vec<(u32, ClientId, Rank)> = Vec::new();
        for (c, q) in self.waiters.classes() {
            if !fits(host, &q.class) {
                continue;
            }
            for (m, mq) in &q.members {
                if self.accounts.admits(m, &q.class.system).is_err() || host.unreachable_for(now, m)
                {
                    continue;
                }
                let overdue = q.deadlines.get(m).and_then(|dq| {
                    dq.iter()
                        .take(EXCLUDE_SCAN)
                        .take_while(|d| d.0 <= now.as_millis())
                        .find(|d| usable(d.2))
                });
                let rank = match overdue {
                    Some(&(deadline, seq, w)) => Rank::Overdue { deadline, seq, w },
                    None => match mq.iter().take(EXCLUDE_SCAN).find(|k| usable(k.2)) {
                        Some(k) => Rank::Shortest(k),
                        None => continue,
                    },
                };
                entries.push((c, m.clone(), rank));
            }
        }
        if free == 1 {
            let classes: BTreeSet<u32> = entries.iter().map(|e| e.0).collect();
            if classes.len() > 1 {
                let owned: Vec<(u32, Class)> = classes
                    .iter()
                    .filter_map(|c| self.waiters.class(*c).map(|q| (*c, q.class.clone())))
                    .collect();
                let mut broad = HashSet::new();
                for (a, ca) in &owned {
                    for (b, cb) in &owned {
                        if a != b && narrower(&self.registry, &mut self.waiters, ca, cb) {
                            broad.insert(*b);
                        }
                    }
                }
                entries.retain(|e| !broad.contains(&e.0));
            }
        }
        // The member first in fair order; its overdue waiter by deadline, else its shortest.
        entries
            .iter()
            .map(|e| (self.accounts.fair_key(&e.1), e.2))
            .min_by(|(fx, x), (fy, y)| fx.cmp(fy).then(x.order().cmp(&y.order())))
            .map(|(_, r)| r.waiter())
    }

    /// Leases host `host` to waiter `id` with the claim TTL.
    fn hand_out(&mut self, now: Time, id: WaiterId, host: &HostId) {
        let Some(w) = self.waiters.get(id) else {
            return;
        };
        let Some((system, pinned)) = self
            .waiters
            .class(w.class)
            .map(|q| (q.class.system.clone(), q.class.pin.is_some()))
        else {
            return;
        };
        let w = self.waiters.remove(id).expect("looked up above");
        let waited = now.since(w.since);
        let ttl = self.config.claim_ttl;
        let grant = self.grant_lease(
            now,
            host,
            &w.client,
            &system,
            &w.drv_path,
            ttl,
            waited,
            pinned,
        );
        match w.via {
            Via::Stream => self.waiters.outbox.push(Handout {
                waiter: id,
                grant,
                waited,
            }),
            Via::Poll => self.waiters.hold(&w.client, &w.drv_path, grant),
        }
    }

    /// The grant held for a poller that asks again, its lease now kept alive for the full
    /// TTL; `None` when none is held (or its claim ran out).
    pub(super) fn claim_held(&mut self, now: Time, req: &LeaseRequest) -> Option<Grant> {
        let held = self.waiters.take_held(&req.client, &req.drv_path)?;
        let ttl = self.config.lease_ttl;
        self.ledger.keep_alive(now, &held.lease_id, ttl).ok()?;
        Some(Grant { ttl, ..held })
    }

    /// Whether some host that is not gone could ever serve `req` (with `pin`, that host).
    pub(super) fn could_ever_serve(
        &self,
        now: Time,
        req: &LeaseRequest,
        pin: Option<&HostId>,
    ) -> bool {
        match pin {
            None => self.could_ever_build(now, &req.system, &req.required_features),
            Some(p) => self.registry.get(p).is_some_and(|h| {
                h.state(now, &self.config) != HostState::Gone
                    && h.builds(&req.system)
                    && h.features_fit(&req.required_features)
            }),
        }
    }

    pub(super) fn never_reason(&self, req: &LeaseRequest, pin: Option<&HostId>) -> String {
        match pin {
            Some(p) => format!("host {p} is not live or does not build {}", req.system),
            None => format!("no live builder builds {}", req.system),
        }
    }

    /// Test oracle: the choice [`pick`](Self::pick) made must be the one a brute-force scan
    /// of every waiter makes; a mismatch is recorded for the property tests.
    #[cfg(test)]
    fn audit_pick(&mut self, now: Time, id: &HostId, free: u32, chosen: WaiterId) {
        let expected = super::tests::oracle_pick(self, now, id, free);
        if expected != Some(chosen) {
            self.audit.push(format!(
                "on {id} with {free} free: picked {chosen:?}, oracle says {expected:?}"
            ));
        }
    }
}
