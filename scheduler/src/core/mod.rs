//! The scheduling core: hosts, slots, leases, the wait queue and the placement policy.
//!
//! **Architecture invariant:** this module performs no I/O, knows nothing of tonic, tokio or
//! sockets, and never reads a clock: every operation takes `now`. The gRPC service is a thin
//! adapter around [`Scheduler`], and the benchmark simulator drives the very same code on
//! simulated time.
//!
//! One module per kind of state, and [`Scheduler`] composing them:
//! - `registry`: hosts as registered and reported, their liveness and per-host counts;
//! - `eligibility`: whether one host can take one request now (systems, features, admission
//!   gates, slots), and why not;
//! - `ledger`: live leases, their expiry, recently ended ones;
//! - [`OperatorState`] (`operator`): what operators decided (drains), keyed by host id;
//! - `waiters`: the requests that were postponed;
//! - `placement`: find candidates → admit → choose, with the [`Policy`] in `policy`;
//! - `views`: the read models operators see.
//!
//! Accounting rules:
//! - A lease counts against its host the instant it is granted, so concurrent clients never
//!   herd onto one host between two agent reports.
//! - A host's used slots are its live leases plus the builds its agent last saw beyond the
//!   leases held at that report: builds from members who bypass the scheduler load the box
//!   too, and a released slot is free at once, not after the next report.
//! - Leases belong to the build hooks, not to the agents: a host whose agent disconnects keeps
//!   its leases (the builds run over SSH regardless); a lease ends when it is released or
//!   when its hook stops keeping it alive.

mod eligibility;
mod error;
mod index;
mod ledger;
mod operator;
mod pinned;
mod placement;
mod policy;
mod registry;
mod rng;
mod types;
mod views;
mod waiters;

use std::fmt;
use std::time::Duration;

pub use eligibility::Admission;
pub use error::Error;
pub use ledger::LeaseEnd;
pub use operator::OperatorState;
pub use policy::{
    Candidate, FirstFit, LeastLoaded, Policy, PolicyKind, PowerOfTwo, Random, RoundRobin, StockNix,
};
pub use rng::SplitMix64;
pub use types::*;
pub use views::{CapacityView, Explanation, HostView, LeaseView, Verdict};

use index::HostIndex;
use ledger::Ledger;
use registry::Registry;
use waiters::Waiters;

/// A source of [`Time`]. The service injects a real clock, tests and the simulator their own.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now.
    fn now(&self) -> Time;
}

/// Tunables of the core. Defaults are the scheduler's embedded defaults; see
/// `crate::config` for the reasons behind each.
#[derive(Clone, Debug, PartialEq)]
pub struct CoreConfig {
    /// How often agents must report.
    pub report_interval: Duration,
    /// How late past its deadline a report may be, and how long a disconnected host's state
    /// is kept, before the host counts as stale or gone.
    pub grace: Duration,
    /// Lease lifetime without a keep-alive.
    pub lease_ttl: Duration,
    /// What `Postpone` tells clients to wait.
    pub postpone_retry: Duration,
    /// A postponed request not repeated for this long leaves the wait queue.
    pub waiter_ttl: Duration,
    /// Admission gates.
    pub admission: Admission,
    /// How many released or expired lease ids are remembered, so that a repeated `Release`
    /// is answered as a repeat instead of `NotFound`.
    pub remembered_leases: usize,
    /// After a client reports a host unreachable, that client gets no lease on it for this
    /// long; when [`UNREACHABLE_QUORUM`] distinct clients report it within this time, nobody
    /// does until the reports age out.
    pub unreachable_cooldown: Duration,
    /// A host whose agent has been gone this long, and that holds no lease, is forgotten.
    pub forget_gone_after: Duration,
}

/// How many distinct clients must report a host unreachable before it is held back for
/// everyone: one client's broken network must not close a builder for all members.
pub const UNREACHABLE_QUORUM: usize = 2;

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            report_interval: Duration::from_secs(10),
            grace: Duration::from_secs(20),
            lease_ttl: Duration::from_secs(60),
            postpone_retry: Duration::from_secs(5),
            waiter_ttl: Duration::from_secs(30),
            admission: Admission::default(),
            remembered_leases: 65_536,
            unreachable_cooldown: Duration::from_secs(60),
            forget_gone_after: Duration::from_secs(3600),
        }
    }
}

/// The scheduling state machine. See the module documentation.
#[derive(Debug)]
pub struct Scheduler {
    config: CoreConfig,
    registry: Registry,
    /// Hosts by capability class and load, for the least-loaded policy's fast path.
    index: HostIndex,
    ledger: Ledger,
    operator: OperatorState,
    waiters: Waiters,
    policy: Box<dyn Policy>,
    rng: SplitMix64,
}

impl Scheduler {
    /// A scheduler with no hosts. `seed` drives tie-breaking and the lease id nonce.
    pub fn new(config: CoreConfig, policy: Box<dyn Policy>, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let boot_nonce = rng.next_u64();
        Self {
            ledger: Ledger::new(boot_nonce, config.remembered_leases),
            config,
            registry: Registry::default(),
            index: HostIndex::default(),
            operator: OperatorState::default(),
            waiters: Waiters::default(),
            policy,
            rng,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    /// The policy's name.
    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    /// Attaches an agent stream to a host, registering it or updating its spec. A host that
    /// was already known keeps its drain state and its leases; a previous stream of the same
    /// host is superseded (its later calls fail with `Error::Superseded`).
    pub fn connect(&mut self, now: Time, spec: HostSpec) -> Generation {
        let draining = self.operator.is_draining(&spec.id);
        let id = spec.id.clone();
        let generation = self.registry.connect(now, spec, draining);
        self.reindex(&id);
        generation
    }

    /// Brings host `id`'s index entry up to date; called after anything about it changed.
    fn reindex(&mut self, id: &HostId) {
        if let Some(host) = self.registry.get(id) {
            self.index.update(host, &mut self.rng);
        }
    }

    /// Records a report from the stream `generation` of host `id`.
    pub fn report(
        &mut self,
        now: Time,
        id: &HostId,
        generation: Generation,
        report: HostReport,
    ) -> Result<(), Error> {
        let host = self.registry.connected_mut(id, generation)?;
        host.report = report;
        host.gate_closed = host.gate(&self.config.admission).is_some();
        host.leases_at_report = host.leases;
        host.last_seen = now;
        self.reindex(id);
        Ok(())
    }

    /// The stream `generation` of host `id` ended without a goodbye. No-op for a superseded
    /// stream.
    pub fn disconnect(&mut self, now: Time, id: &HostId, generation: Generation) {
        if let Ok(host) = self.registry.connected_mut(id, generation) {
            host.link = registry::Link::Disconnected { since: now };
            self.reindex(id);
        }
    }

    /// The agent of host `id` is leaving: no new leases from now on.
    pub fn goodbye(&mut self, id: &HostId, generation: Generation) -> Result<(), Error> {
        let host = self.registry.connected_mut(id, generation)?;
        // Its last message is the goodbye's moment, near enough for forgetting it later.
        host.link = registry::Link::Left {
            since: host.last_seen,
        };
        self.reindex(id);
        Ok(())
    }

    /// Sets or clears the operator drain of host `id`, whether or not its agent ever
    /// connected: a drain of a host not registered yet applies when it connects. The
    /// service restores persisted drains at start through this too.
    pub fn set_draining(&mut self, id: &HostId, draining: bool) {
        if let Some(host) = self.registry.get_mut(id) {
            host.draining = draining;
        }
        self.operator.set_draining(id, draining);
        self.reindex(id);
    }

    /// Whether host `id` is drained (known or not).
    pub fn is_draining(&self, id: &HostId) -> bool {
        self.operator.is_draining(id)
    }

    /// Operators' decisions, as the service layer persists them.
    pub fn operator_state(&self) -> &OperatorState {
        &self.operator
    }

    /// Extends lease `id` by the TTL from `now`; returns the TTL.
    pub fn keep_alive(&mut self, now: Time, id: &LeaseId) -> Result<Duration, Error> {
        self.expire(now);
        let ttl = self.config.lease_ttl;
        self.ledger.keep_alive(now, id, ttl)?;
        Ok(ttl)
    }

    /// Ends lease `id`. Returns `true` when it had already ended (a repeated release, or an
    /// expiry), `Err(UnknownLease)` when it is not known at all.
    pub fn release(
        &mut self,
        now: Time,
        id: &LeaseId,
        outcome: BuildOutcome,
    ) -> Result<bool, Error> {
        self.expire(now);
        if let Some(lease) = self.ledger.get(id) {
            if outcome == BuildOutcome::HostUnreachable {
                let until = now.after(self.config.unreachable_cooldown);
                let client = lease.client.clone();
                if let Some(host) = self.registry.get_mut(&lease.host) {
                    host.note_unreachable(now, client, until);
                }
            }
            self.end_lease(id, LeaseEnd::Released(outcome));
            return Ok(false);
        }
        if self.ledger.ended(id).is_some() {
            return Ok(true);
        }
        Err(Error::UnknownLease {
            lease_id: id.to_string(),
        })
    }

    /// Ends a live lease in the ledger and frees its slot.
    fn end_lease(&mut self, id: &LeaseId, end: LeaseEnd) {
        if let Some(lease) = self.ledger.end(id, end) {
            self.uncount(&lease);
        }
    }

    fn uncount(&mut self, lease: &ledger::Lease) {
        if let Some(host) = self.registry.get_mut(&lease.host) {
            host.uncount_lease(&lease.client);
            self.reindex(&lease.host);
        }
    }

    /// Expires every lease not kept alive until `now`, and forgets hosts gone for longer
    /// than the retention; returns how many leases expired.
    pub fn expire(&mut self, now: Time) -> usize {
        let mut n = 0;
        while let Some(lease) = self.ledger.pop_expired(now) {
            self.uncount(&lease);
            n += 1;
        }
        for id in self
            .registry
            .forget_gone(now, self.config.forget_gone_after)
        {
            self.index.remove(&id);
        }
        n
    }

    /// How a remembered lease ended.
    pub fn lease_end(&self, id: &LeaseId) -> Option<LeaseEnd> {
        self.ledger.ended(id)
    }

    /// Live leases.
    pub fn lease_count(&self) -> usize {
        self.ledger.len()
    }

    /// Entries in the lease expiry queue: never more than the live leases.
    pub fn expiry_entries(&self) -> usize {
        self.ledger.expiry_entries()
    }
}

#[cfg(test)]
mod tests;
