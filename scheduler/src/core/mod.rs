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
//! - `waiters`: the requests waiting for a slot, on a stream or polling, per class and
//!   member; `dispatch`: who gets a freed slot, at once, in fair order;
//! - `accounts`: running counts, quotas and usage per member and system, and the fair key;
//!   `durations`: expected build durations learned per derivation name;
//! - `placement`: find candidates → admit (quotas, pin) → choose, with the [`Policy`] in
//!   `policy`;
//! - `probe`: the verdicts of the scheduler's SSH probes and each host's circuit breaker
//!   (the probing is the service's; it tells the core each verdict with its time);
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

mod accounts;
mod dispatch;
mod durations;
mod eligibility;
mod error;
mod index;
mod ledger;
mod operator;
mod pinned;
mod placement;
mod policy;
mod probe;
mod ranked;
mod registry;
mod rng;
mod types;
mod views;
mod waiters;

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

pub use accounts::{MemberQuota, MemberView, Quotas, Usage};
pub use dispatch::{WaitAnswer, WaitStatus};
pub use durations::DurationStat;
pub use eligibility::Admission;
pub use error::Error;
pub use ledger::LeaseEnd;
pub use operator::OperatorState;
pub use policy::{
    Candidate, FirstFit, LeastLoaded, Policy, PolicyKind, PowerOfTwo, Random, RoundRobin, StockNix,
};
pub use probe::{Breaker, BreakerChange, ProbeFailure, ProbePolicy, ProbeTarget, ProbeVerdict};
pub use rng::SplitMix64;
pub use types::*;
pub use views::{
    CapacityView, Explanation, HostView, LeaseView, Verdict, WaitingCursor, WaitingView,
};
pub use waiters::{Handout, WaiterId};

use accounts::Accounts;
use durations::Durations;
use index::HostIndex;
use ledger::Ledger;
use probe::ProbeQueue;
use registry::Registry;
use waiters::Waiters;

/// A source of [`Time`]. The service injects a real clock, tests and the simulator their own.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now.
    fn now(&self) -> Time;
}

/// A source of lease ids: 128 bits each, which must not be guessable from earlier ones in
/// the server (it injects the operating system's random source through
/// [`Scheduler::set_lease_ids`]); the core itself stays pure and uses a seeded generator.
pub trait LeaseIds: Send + fmt::Debug {
    /// The next id's bits.
    fn next_id(&mut self) -> u128;
}

impl LeaseIds for SplitMix64 {
    fn next_id(&mut self) -> u128 {
        (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())
    }
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
    /// A grant made to a waiter must be claimed (kept alive, or polled for) within this
    /// long, or it expires and its slot goes to the next waiter.
    pub claim_ttl: Duration,
    /// Quotas at start; operators change them at run time.
    pub quotas: Quotas,
    /// How long after the clock's epoch (the scheduler's start) agents may still be
    /// re-registering after a restart: meanwhile a host's slots go to waiters only once it
    /// has reported (its report shows builds granted before the restart), and a waiting
    /// request for which no host is known is not declined. `report_interval + grace`.
    pub startup_window: Duration,
    /// How long after the start no slot is handed to a waiter at all: builds granted before
    /// a restart that are still copying inputs show in no agent report, only in their
    /// holders' keep-alives, which re-attach them within a third of the lease TTL or 5 s,
    /// whichever is shorter (the protocol's rule). Default: that period plus a second.
    pub startup_hold: Duration,
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
    /// The scheduler's SSH probes of builders.
    pub probe: ProbePolicy,
    /// Most requests one member may have waiting in the queue (streams and pollers); a new
    /// one that would wait past it is refused with [`Error::TooManyWaiting`]. Applied by
    /// [`Scheduler::acquire_capped`] and [`Scheduler::wait_capped`], the server's entry
    /// points; [`Scheduler::acquire`] and [`Scheduler::wait`] leave it out, so that the
    /// simulator measures the queue itself.
    pub max_waiting_per_member: usize,
    /// Aging of the wait queue: a waiter's deadline is when it started waiting plus
    /// `min(aging_factor × its expected duration, max_age)`. Within a member (across members
    /// fair order decides), waiters past their deadline go first, earliest deadline
    /// first; the rest shortest expected first (see `waiters`). So a long build is passed by
    /// shorter ones only until its deadline, and by no later arrival after it. 0: first
    /// come, first served within a member. Default 32: within a few per cent of no aging
    /// for the community model's mean wait (`docs/BENCHMARKS.md`, "What the core does with
    /// the queue"), where 8 costs up to 10 %.
    pub aging_factor: u32,
    /// The most slack a waiter gets, however long its expected build: once it has waited
    /// this long no build of its member that arrives later passes it. Default one hour.
    pub max_age: Duration,
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
            claim_ttl: Duration::from_secs(10),
            quotas: Quotas::default(),
            startup_window: Duration::from_secs(30),
            startup_hold: Duration::from_secs(6),
            admission: Admission::default(),
            remembered_leases: 65_536,
            unreachable_cooldown: Duration::from_secs(60),
            forget_gone_after: Duration::from_secs(3600),
            probe: ProbePolicy::default(),
            max_waiting_per_member: 256,
            aging_factor: 32,
            max_age: Duration::from_secs(3600),
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
    accounts: Accounts,
    durations: Durations,
    /// Hosts that registered within the startup window and have not reported since.
    unreported: HashSet<HostId>,
    /// Hosts by the time their next SSH probe is due.
    probes: ProbeQueue,
    /// Why the last request that was not granted found no host (see
    /// [`Self::refusal_cause`]).
    refusal_cause: &'static str,
    policy: Box<dyn Policy>,
    rng: SplitMix64,
    /// Picks that differ from the brute-force oracle (tests only).
    #[cfg(test)]
    audit: Vec<String>,
}

/// The queue state worth keeping across restarts: quotas as operators left them, learned
/// durations, usage records. Plain data for the service to persist.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueSnapshot {
    /// Quotas in force.
    pub quotas: Quotas,
    /// Learned durations by derivation name, sorted by name.
    pub durations: Vec<(String, DurationStat)>,
    /// Usage records by member, sorted by member.
    pub usage: Vec<(ClientId, Usage)>,
}

impl Scheduler {
    /// A scheduler with no hosts. `seed` drives tie-breaking and the lease id nonce.
    pub fn new(config: CoreConfig, policy: Box<dyn Policy>, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let ids = SplitMix64::new(rng.next_u64());
        Self {
            ledger: Ledger::new(Box::new(ids), config.remembered_leases),
            accounts: Accounts::new(config.quotas.clone()),
            config,
            registry: Registry::default(),
            index: HostIndex::default(),
            operator: OperatorState::default(),
            waiters: Waiters::default(),
            durations: Durations::default(),
            unreported: HashSet::new(),
            probes: ProbeQueue::default(),
            refusal_cause: "none",
            policy,
            rng,
            #[cfg(test)]
            audit: Vec::new(),
        }
    }

    /// Takes lease ids from `ids` from now on (the server's unguessable source).
    pub fn set_lease_ids(&mut self, ids: Box<dyn LeaseIds>) {
        self.ledger.set_ids(ids);
    }

    /// Live leases held by `client`.
    pub fn leases_held_by(&self, client: &ClientId) -> usize {
        self.ledger.held_by(client)
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
        if self.config.probe.enabled
            && let Some(host) = self.registry.get_mut(&id)
            && host.probe.due.is_none_or(|due| due > now)
        {
            // A host that (re)connects is probed at once: a builder must not wait a whole
            // interval before its SSH endpoint is known to work or not.
            host.probe.due = Some(now);
            self.probes.push(now, id.clone());
        }
        self.reindex(&id);
        self.waiters.hosts_changed();
        // Right after a start, a host may still run builds granted before it, which only its
        // first report shows: its slots go to waiters from that report on.
        if self.starting(now)
            && self
                .registry
                .get(&id)
                .is_some_and(|h| h.report == HostReport::default())
        {
            self.unreported.insert(id.clone());
        }
        self.dispatch_host(now, &id);
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
        self.unreported.remove(id);
        self.dispatch_host(now, id);
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

    /// Extends lease `id` by the TTL from `now`; returns the TTL. Whoever holds it.
    pub fn keep_alive(&mut self, now: Time, id: &LeaseId) -> Result<Duration, Error> {
        self.keep_alive_by(now, id, None)
    }

    /// Extends lease `id` by the TTL from `now` for `holder`; returns the TTL. With a
    /// holder, a lease somebody else holds is refused with [`Error::NotHolder`]; `None`
    /// (no identities: the open mode) skips the check.
    pub fn keep_alive_by(
        &mut self,
        now: Time,
        id: &LeaseId,
        holder: Option<&ClientId>,
    ) -> Result<Duration, Error> {
        self.expire(now);
        self.check_holder(id, holder)?;
        let ttl = self.config.lease_ttl;
        self.ledger.keep_alive(now, id, ttl)?;
        Ok(ttl)
    }

    /// Refuses a live lease that `holder` (when given) does not hold.
    fn check_holder(&self, id: &LeaseId, holder: Option<&ClientId>) -> Result<(), Error> {
        match (self.ledger.get(id), holder) {
            (Some(lease), Some(holder)) if lease.client != *holder => Err(Error::NotHolder {
                lease_id: id.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Ends lease `id`, whoever holds it. Returns `true` when it had already ended (a
    /// repeated release, or an expiry), `Err(UnknownLease)` when it is not known at all.
    pub fn release(
        &mut self,
        now: Time,
        id: &LeaseId,
        outcome: BuildOutcome,
    ) -> Result<bool, Error> {
        self.release_by(now, id, None, outcome)
    }

    /// [`Self::release`] for `holder`: with a holder, a live lease somebody else holds is
    /// refused with [`Error::NotHolder`] and stays as it is.
    pub fn release_by(
        &mut self,
        now: Time,
        id: &LeaseId,
        holder: Option<&ClientId>,
        outcome: BuildOutcome,
    ) -> Result<bool, Error> {
        self.expire(now);
        self.check_holder(id, holder)?;
        if let Some(lease) = self.ledger.get(id) {
            if outcome == BuildOutcome::HostUnreachable {
                let until = now.after(self.config.unreachable_cooldown);
                let client = lease.client.clone();
                if let Some(host) = self.registry.get_mut(&lease.host) {
                    host.note_unreachable(now, client, until);
                }
            }
            self.end_lease(now, id, LeaseEnd::Released(outcome));
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
    fn end_lease(&mut self, now: Time, id: &LeaseId, end: LeaseEnd) {
        if let Some(lease) = self.ledger.end(id, end) {
            self.lease_over(now, &lease, end);
        }
    }

    /// Everything that follows the end of a lease: its host's and member's counts, the
    /// duration learned from a build that ran, a grant held for it voided, and its slot
    /// handed to the next waiter.
    fn lease_over(&mut self, now: Time, lease: &ledger::Lease, end: LeaseEnd) {
        if let Some(host) = self.registry.get_mut(&lease.host) {
            host.uncount_lease(&lease.client);
            self.reindex(&lease.host);
        }
        let held = now.since(lease.granted_at);
        let built = matches!(
            end,
            LeaseEnd::Released(BuildOutcome::Succeeded | BuildOutcome::BuildFailed)
        );
        // A member or system at its quota frees more than this host's slot: its waiters
        // may now take free slots anywhere.
        let capped = self.accounts.admits(&lease.client, &lease.system).is_err();
        self.accounts
            .count_end(&lease.client, &lease.system, held, built);
        if built {
            self.durations
                .learn(durations::drv_name(&lease.drv_path), held);
        }
        self.waiters
            .lease_ended(&lease.client, &lease.drv_path, &lease.host);
        if capped {
            self.dispatch_free(now);
        } else {
            self.dispatch_host(now, &lease.host);
        }
    }

    /// Expires every lease not kept alive until `now` (handing their slots to waiters),
    /// every poller that stopped asking, and forgets hosts gone for longer than the
    /// retention; returns how many leases expired.
    pub fn expire(&mut self, now: Time) -> usize {
        let mut n = 0;
        while let Some(lease) = self.ledger.pop_expired(now) {
            self.lease_over(now, &lease, LeaseEnd::Expired);
            n += 1;
        }
        self.waiters.expire(now, self.config.waiter_ttl);
        let mut forgotten = false;
        for id in self
            .registry
            .forget_gone(now, self.config.forget_gone_after)
        {
            self.index.remove(&id);
            forgotten = true;
        }
        if forgotten {
            self.waiters.hosts_changed();
        }
        if !self.unreported.is_empty() && !self.starting(now) {
            self.unreported.clear();
        }
        n
    }

    /// Re-attaches a lease this scheduler does not know, from a holder that keeps it alive
    /// after a restart (or after its expiry went unnoticed by the holder). The build is
    /// running, so the lease counts against its host at once even if that fills the host
    /// beyond its slots: the alternative is granting the same slot twice. Refused (as an
    /// unknown lease) for an id this run knows to have ended, and for an unknown host
    /// (`UnknownHost`: its agent has not registered yet; the holder keeps trying). Returns
    /// the TTL.
    pub fn reattach(
        &mut self,
        now: Time,
        id: &LeaseId,
        host: &HostId,
        client: &ClientId,
        system: &System,
        drv_path: &str,
    ) -> Result<Duration, Error> {
        self.expire(now);
        let ttl = self.config.lease_ttl;
        if self.ledger.get(id).is_some() {
            self.ledger.keep_alive(now, id, ttl)?;
            return Ok(ttl);
        }
        if self.ledger.ended(id).is_some() {
            return Err(Error::UnknownLease {
                lease_id: id.to_string(),
            });
        }
        let per_client = !self.policy.sees_global_load();
        let h = self
            .registry
            .get_mut(host)
            .ok_or_else(|| Error::UnknownHost {
                host_id: host.to_string(),
            })?;
        h.count_lease(client, per_client);
        // The build ran before this run; a report since the host registered counted it.
        if h.report.running_builds.is_some() {
            h.leases_at_report += 1;
        }
        self.ledger.reattach(
            now,
            ttl,
            id.clone(),
            host.clone(),
            client.clone(),
            system.clone(),
            drv_path.to_owned(),
        );
        self.accounts
            .count_grant(now, client, system, Duration::ZERO);
        self.reindex(host);
        Ok(ttl)
    }

    /// The quotas in force.
    pub fn quotas(&self) -> &Quotas {
        self.accounts.quotas()
    }

    /// Replaces the quotas (an operator's change) and hands out what a raised quota frees.
    /// Leases beyond a lowered quota run on; no new ones are granted until below it.
    pub fn set_quotas(&mut self, now: Time, quotas: Quotas) {
        self.accounts.set_quotas(quotas);
        self.dispatch(now);
    }

    /// Every member seen since the start, with its running leases, quota and usage.
    pub fn members(&self) -> Vec<MemberView> {
        self.accounts.views()
    }

    /// The learned durations and usage records that changed since the last call, for the
    /// service to persist (quotas are persisted when an operator changes them).
    pub fn take_queue_changes(&mut self) -> QueueSnapshot {
        QueueSnapshot {
            quotas: self.accounts.quotas().clone(),
            durations: self.durations.take_changed(),
            usage: self.accounts.take_changed_usage(),
        }
    }

    /// The state to persist (see [`QueueSnapshot`]).
    pub fn queue_snapshot(&self) -> QueueSnapshot {
        QueueSnapshot {
            quotas: self.accounts.quotas().clone(),
            durations: self.durations.snapshot(),
            usage: self.accounts.usage(),
        }
    }

    /// Restores persisted state at start: the quotas replace the configured ones, durations
    /// and usage add to what this run learned.
    pub fn restore_queue(&mut self, snapshot: QueueSnapshot) {
        self.accounts.set_quotas(snapshot.quotas);
        self.accounts.restore_usage(snapshot.usage);
        self.durations.restore(snapshot.durations);
    }

    /// Why the last [`Self::acquire`] that was not granted found no host, as a short stable
    /// name for metrics: `no_builder` (no live host could ever build it), else why one host
    /// that builds it could not take it (`no_slot`, `draining`, `probe_failed`, `late`,
    /// `gate`, `unreachable`, …; `none` when no host serves it at all). Read it under the
    /// same hold of the scheduler as the `acquire`.
    pub fn refusal_cause(&self) -> &'static str {
        self.refusal_cause
    }

    /// Up to `limit` probes due at `now`, each marked as running until its verdict comes
    /// through [`Self::probe_result`]. Only hosts whose agent is connected are probed; a host
    /// that reconnects is due at once again.
    pub fn probes_due(&mut self, now: Time, limit: usize) -> Vec<ProbeTarget> {
        let mut due = Vec::new();
        while due.len() < limit {
            let Some((at, id)) = self.probes.pop_due(now) else {
                break;
            };
            let Some(host) = self.registry.get_mut(&id) else {
                continue;
            };
            if host.probe.due != Some(at) {
                continue; // superseded by a later schedule
            }
            host.probe.due = None;
            if matches!(host.link, registry::Link::Connected(_)) {
                due.push(ProbeTarget {
                    id,
                    store_uri: host.spec.store_uri.clone(),
                    public_key: host.spec.public_key.clone(),
                });
            }
        }
        due
    }

    /// When the next probe may be due (an entry may turn out superseded: waking for it
    /// early costs one look).
    pub fn next_probe_due(&self) -> Option<Time> {
        self.probes.next()
    }

    /// Records the verdict of a probe of `target` made at `now`: the host's breaker moves
    /// (see `probe`), its next probe is scheduled, and the index learns whether it takes
    /// leases. A verdict about a host that is gone or registers another key now is dropped.
    pub fn probe_result(
        &mut self,
        now: Time,
        target: &ProbeTarget,
        verdict: ProbeVerdict,
    ) -> Option<BreakerChange> {
        let host = self.registry.get_mut(&target.id)?;
        if host.spec.public_key != target.public_key {
            return None;
        }
        let change = host.probe.record(now, verdict, &self.config.probe);
        if let Some(due) = host.probe.due {
            self.probes.push(due, target.id.clone());
        }
        self.reindex(&target.id);
        // A breaker that closes again opens the host's slots to waiters.
        self.dispatch_host(now, &target.id);
        change
    }

    /// The host of live lease `id`, if it is live.
    pub fn lease_host(&self, id: &LeaseId) -> Option<&HostId> {
        self.ledger.get(id).map(|l| &l.host)
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
