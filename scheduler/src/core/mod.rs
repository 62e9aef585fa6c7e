//! The scheduling core: hosts, slots, leases, the wait queue and the placement policy.
//!
//! **Architecture invariant:** this module performs no I/O, knows nothing of tonic, tokio or
//! sockets, and never reads a clock: every operation takes `now`. The gRPC service is a thin
//! adapter around [`Scheduler`], and the benchmark simulator drives the very same code on
//! simulated time.
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

mod policy;
mod rng;
mod types;
mod waiters;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::fmt::{self, Write as _};
use std::time::Duration;

pub use policy::{
    Candidate, FirstFit, LeastLoaded, Policy, PolicyKind, PowerOfTwo, Random, RoundRobin, StockNix,
};
pub use rng::SplitMix64;
pub use types::*;
use waiters::Waiters;

use crate::Error;

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
        }
    }
}

/// Thresholds that close a host to new leases whatever its free slots: the `[admission]`
/// section of the scheduler's configuration. A threshold applies only when the agent reports
/// the value; an unknown value never closes a host.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admission {
    /// Minimum free store space, percent. Default 2: below it builds start failing with
    /// "no space left" and garbage collection thrashes.
    pub min_free_store_percent: f64,
    /// Minimum free store space, bytes. Default 2 GiB: room for one large output.
    pub min_free_store_bytes: u64,
    /// Minimum free build directory space, percent. Default 2.
    pub min_free_build_dir_percent: f64,
    /// Minimum free build directory space, bytes. Default 1 GiB.
    pub min_free_build_dir_bytes: u64,
    /// Maximum CPU `some avg10` pressure, percent. Default 100 (off): a box with all slots
    /// busy legitimately has CPU pressure; slots already bound CPU use.
    pub max_cpu_some_pressure: f64,
    /// Maximum memory `full avg10` pressure, percent. Default 20: every task stalled on
    /// memory a fifth of the time means the box is thrashing; another build makes it worse.
    pub max_memory_full_pressure: f64,
    /// Maximum IO `full avg10` pressure, percent. Default 50.
    pub max_io_full_pressure: f64,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            min_free_store_percent: 2.0,
            min_free_store_bytes: 2 << 30,
            min_free_build_dir_percent: 2.0,
            min_free_build_dir_bytes: 1 << 30,
            max_cpu_some_pressure: 100.0,
            max_memory_full_pressure: 20.0,
            max_io_full_pressure: 50.0,
        }
    }
}

/// Whether an agent stream is attached to a host.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Link {
    Connected(Generation),
    Disconnected { since: Time },
    Left,
}

#[derive(Clone, Debug)]
struct Host {
    spec: HostSpec,
    report: HostReport,
    last_seen: Time,
    link: Link,
    draining: bool,
    leases: u32,
    /// `leases` when the last report arrived, to tell outside builds from ours.
    leases_at_report: u32,
    leases_by_client: HashMap<ClientId, u32>,
    /// Clients that reported the host unreachable, and until when that holds.
    unreachable_until: HashMap<ClientId, Time>,
    /// Whether an admission gate is closed, decided when the report arrives (it depends only
    /// on the report and the configuration), so requests do not recompute it per host.
    gate_closed: bool,
    /// The host's systems as bits of [`SystemBits`]: a cheap first test on the hot path.
    system_mask: u64,
}

impl Host {
    fn state(&self, now: Time, cfg: &CoreConfig) -> HostState {
        match self.link {
            Link::Connected(_) => {
                if now.since(self.last_seen) > cfg.report_interval + cfg.grace {
                    HostState::Stale
                } else {
                    HostState::Ready
                }
            }
            Link::Disconnected { since } => {
                if now.since(since) > cfg.grace {
                    HostState::Gone
                } else {
                    HostState::Disconnected
                }
            }
            Link::Left => HostState::Gone,
        }
    }

    /// Slots counted as busy.
    ///
    /// `leases + outside`, where `outside` is the builds the agent saw beyond the leases the
    /// scheduler held when that report was made: builds from members who bypass the
    /// scheduler. Our own leases count exactly and at once, so a released slot is free
    /// immediately rather than after the next report, while outside load is as fresh as the
    /// last report.
    fn used(&self) -> u32 {
        self.leases + self.outside_builds()
    }

    /// Builds on the host that are not the scheduler's, as of the last report.
    fn outside_builds(&self) -> u32 {
        self.report
            .running_builds
            .map_or(0, |n| n.saturating_sub(self.leases_at_report))
    }

    fn builds(&self, system: &System) -> bool {
        system.is_builtin() || self.spec.systems.contains(system)
    }

    /// Whether a request with these features may run here: required ⊆ supported ∪
    /// mandatory, and mandatory ⊆ required. Allocation-free, for the hot path.
    fn features_fit(&self, required: &BTreeSet<Feature>) -> bool {
        if required.is_empty() {
            return self.spec.mandatory_features.is_empty();
        }
        required.iter().all(|f| {
            self.spec.supported_features.contains(f) || self.spec.mandatory_features.contains(f)
        }) && self
            .spec
            .mandatory_features
            .iter()
            .all(|f| required.contains(f))
    }

    /// Why this host can never take a request with these features, if so.
    fn feature_mismatch(&self, required: &BTreeSet<Feature>) -> Option<String> {
        let missing: Vec<&str> = required
            .iter()
            .filter(|f| {
                !self.spec.supported_features.contains(*f)
                    && !self.spec.mandatory_features.contains(*f)
            })
            .map(Feature::as_str)
            .collect();
        if !missing.is_empty() {
            return Some(format!("lacks features {}", missing.join(",")));
        }
        let unasked: Vec<&str> = self
            .spec
            .mandatory_features
            .iter()
            .filter(|f| !required.contains(*f))
            .map(Feature::as_str)
            .collect();
        if !unasked.is_empty() {
            return Some(format!("only takes builds requiring {}", unasked.join(",")));
        }
        None
    }

    /// Why the admission gates are closed, if they are.
    fn gate(&self, a: &Admission) -> Option<String> {
        let disk = |name: &str, d: Option<DiskSpace>, pct: f64, bytes: u64| {
            let d = d?;
            (d.free_percent() < pct || d.free_bytes < bytes).then(|| {
                format!(
                    "{name} has {:.1}% ({} MiB) free, below {pct}% or {} MiB",
                    d.free_percent(),
                    d.free_bytes >> 20,
                    bytes >> 20
                )
            })
        };
        if let Some(r) = disk(
            "store",
            self.report.store,
            a.min_free_store_percent,
            a.min_free_store_bytes,
        ) {
            return Some(r);
        }
        if let Some(r) = disk(
            "build dir",
            self.report.build_dir,
            a.min_free_build_dir_percent,
            a.min_free_build_dir_bytes,
        ) {
            return Some(r);
        }
        let p = self.report.pressure.unwrap_or_default();
        let psi = |name: &str, v: Option<f64>, max: f64| {
            v.filter(|v| *v >= max)
                .map(|v| format!("{name} pressure {v:.1}% at or above {max}%"))
        };
        psi("cpu some", p.cpu_some, a.max_cpu_some_pressure)
            .or_else(|| psi("memory full", p.memory_full, a.max_memory_full_pressure))
            .or_else(|| psi("io full", p.io_full, a.max_io_full_pressure))
    }
}

/// Why a host cannot take a request now. Cheap to produce on the hot path; put into words
/// by `Scheduler::describe` only when somebody reads it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Unfit {
    /// It does not build the system.
    System,
    /// Features: a required one is missing, or a mandatory one was not asked for.
    Features,
    /// The client excluded it.
    Excluded,
    /// Its agent is late beyond the grace.
    Late,
    /// Its agent's stream is gone.
    Disconnected,
    /// Its agent has been gone too long, or left.
    Gone,
    /// Drained by an operator.
    Draining,
    /// An admission gate is closed.
    Gate,
    /// The asking client reported it unreachable recently.
    UnreachableForClient,
    /// Several clients reported it unreachable recently.
    Unreachable,
    /// No free slot.
    NoSlot,
}

#[derive(Clone, Debug)]
struct Lease {
    host: HostId,
    client: ClientId,
    system: System,
    drv_path: String,
    granted_at: Time,
    expires_at: Time,
}

/// What ended a remembered lease.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Released by its holder with this outcome.
    Released(BuildOutcome),
    /// Not kept alive.
    Expired,
}

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

/// Gives each system seen in a registration a bit, so that "does this host build that
/// system" is one AND on the hot path instead of a set lookup with string comparisons.
/// Bits are never reused. Past 64 systems (far more than Nix knows) new ones get no bit:
/// their masks are all ones and the exact comparison decides.
#[derive(Debug, Default)]
struct SystemBits {
    bits: HashMap<System, u32>,
}

impl SystemBits {
    /// The mask of a host's systems, assigning bits to new ones.
    fn mask<'a>(&mut self, systems: impl IntoIterator<Item = &'a System>) -> u64 {
        let mut mask = 0;
        for s in systems {
            let next = self.bits.len() as u32;
            let bit = match self.bits.get(s) {
                Some(b) => *b,
                None if next < 64 => {
                    self.bits.insert(s.clone(), next);
                    next
                }
                None => return u64::MAX,
            };
            mask |= 1 << bit;
        }
        mask
    }

    /// The mask a request's system must meet: every host for `builtin`, none for a system
    /// no host registered (unless the bits ran out: then every host, checked exactly).
    fn request_mask(&self, system: &System) -> u64 {
        if system.is_builtin() {
            return u64::MAX;
        }
        match self.bits.get(system) {
            Some(b) => 1 << b,
            None if self.bits.len() < 64 => 0,
            None => u64::MAX,
        }
    }
}

/// The scheduling state machine. See the module documentation.
#[derive(Debug)]
pub struct Scheduler {
    config: CoreConfig,
    hosts: BTreeMap<HostId, Host>,
    leases: HashMap<LeaseId, Lease>,
    /// Lease expiry times, soonest first; entries made stale by keep-alives or releases are
    /// skipped when popped (lazy deletion keeps every operation `O(log n)`).
    expiries: BinaryHeap<Reverse<(Time, LeaseId)>>,
    /// Recently ended leases, for idempotent release, bounded by `remembered_leases`.
    ended: HashMap<LeaseId, LeaseEnd>,
    ended_order: VecDeque<LeaseId>,
    waiters: Waiters,
    system_bits: SystemBits,
    policy: Box<dyn Policy>,
    rng: SplitMix64,
    /// Makes lease ids unique across restarts, so a hook holding a lease from before a
    /// restart gets `NotFound`, never somebody else's lease.
    boot_nonce: u64,
    next_lease: u64,
    next_generation: u64,
}

impl Scheduler {
    /// A scheduler with no hosts. `seed` drives tie-breaking and the lease id nonce.
    pub fn new(config: CoreConfig, policy: Box<dyn Policy>, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let boot_nonce = rng.next_u64();
        Self {
            config,
            hosts: BTreeMap::new(),
            leases: HashMap::new(),
            expiries: BinaryHeap::new(),
            ended: HashMap::new(),
            ended_order: VecDeque::new(),
            waiters: Waiters::default(),
            system_bits: SystemBits::default(),
            policy,
            rng,
            boot_nonce,
            next_lease: 0,
            next_generation: 0,
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
        self.next_generation += 1;
        let generation = Generation(self.next_generation);
        let id = spec.id.clone();
        let system_mask = self.system_bits.mask(&spec.systems);
        match self.hosts.get_mut(&id) {
            Some(host) => {
                host.system_mask = system_mask;
                host.spec = spec;
                host.last_seen = now;
                host.link = Link::Connected(generation);
            }
            None => {
                self.hosts.insert(
                    id,
                    Host {
                        spec,
                        report: HostReport::default(),
                        last_seen: now,
                        link: Link::Connected(generation),
                        draining: false,
                        leases: 0,
                        leases_at_report: 0,
                        leases_by_client: HashMap::new(),
                        unreachable_until: HashMap::new(),
                        gate_closed: false,
                        system_mask,
                    },
                );
            }
        }
        generation
    }

    fn connected_host(&mut self, id: &HostId, generation: Generation) -> Result<&mut Host, Error> {
        Self::connected_in(&mut self.hosts, id, generation)
    }

    /// [`Self::connected_host`] over the host table alone, so that callers can borrow the
    /// configuration at the same time.
    fn connected_in<'h>(
        hosts: &'h mut BTreeMap<HostId, Host>,
        id: &HostId,
        generation: Generation,
    ) -> Result<&'h mut Host, Error> {
        let host = hosts.get_mut(id).ok_or_else(|| Error::UnknownHost {
            host_id: id.to_string(),
        })?;
        if host.link != Link::Connected(generation) {
            return Err(Error::Superseded {
                host_id: id.to_string(),
            });
        }
        Ok(host)
    }

    /// Records a report from the stream `generation` of host `id`.
    pub fn report(
        &mut self,
        now: Time,
        id: &HostId,
        generation: Generation,
        report: HostReport,
    ) -> Result<(), Error> {
        let host = Self::connected_in(&mut self.hosts, id, generation)?;
        host.report = report;
        host.gate_closed = host.gate(&self.config.admission).is_some();
        host.leases_at_report = host.leases;
        host.last_seen = now;
        Ok(())
    }

    /// The stream `generation` of host `id` ended without a goodbye. No-op for a superseded
    /// stream.
    pub fn disconnect(&mut self, now: Time, id: &HostId, generation: Generation) {
        if let Ok(host) = self.connected_host(id, generation) {
            host.link = Link::Disconnected { since: now };
        }
    }

    /// The agent of host `id` is leaving: no new leases from now on.
    pub fn goodbye(&mut self, id: &HostId, generation: Generation) -> Result<(), Error> {
        let host = self.connected_host(id, generation)?;
        host.link = Link::Left;
        Ok(())
    }

    /// Sets or clears the operator drain of host `id`. Returns whether it is draining.
    pub fn set_draining(&mut self, id: &HostId, draining: bool) -> Result<bool, Error> {
        let host = self.hosts.get_mut(id).ok_or_else(|| Error::UnknownHost {
            host_id: id.to_string(),
        })?;
        host.draining = draining;
        Ok(host.draining)
    }

    /// Whether host `id` is drained, if known.
    pub fn is_draining(&self, id: &HostId) -> Option<bool> {
        self.hosts.get(id).map(|h| h.draining)
    }

    /// Whether `host` could take a request with `system` and `features` now, as a
    /// [`Candidate`], or why not.
    fn assess(
        &self,
        now: Time,
        host: &Host,
        (system, mask): (&System, u64),
        features: &BTreeSet<Feature>,
        client: Option<&ClientId>,
        exclude: &BTreeSet<HostId>,
    ) -> Result<Candidate, Unfit> {
        // The mask test is exact while fewer than 64 systems are known; past that, masks
        // are all ones and the string comparison decides.
        if host.system_mask & mask == 0
            || ((mask == u64::MAX || host.system_mask == u64::MAX) && !host.builds(system))
        {
            return Err(Unfit::System);
        }
        if !host.features_fit(features) {
            return Err(Unfit::Features);
        }
        if exclude.contains(&host.spec.id) {
            return Err(Unfit::Excluded);
        }
        self.assess_now(now, host, client)
    }

    /// Whether `host` takes new leases at all now: alive, not drained, gates open.
    fn open(&self, now: Time, host: &Host) -> Result<(), Unfit> {
        match host.state(now, &self.config) {
            HostState::Ready => {}
            HostState::Stale => return Err(Unfit::Late),
            HostState::Disconnected => return Err(Unfit::Disconnected),
            HostState::Gone => return Err(Unfit::Gone),
        }
        if host.draining {
            return Err(Unfit::Draining);
        }
        if !host.unreachable_until.is_empty()
            && host
                .unreachable_until
                .values()
                .filter(|t| **t > now)
                .count()
                >= UNREACHABLE_QUORUM
        {
            return Err(Unfit::Unreachable);
        }
        if host.gate_closed {
            return Err(Unfit::Gate);
        }
        Ok(())
    }

    /// The parts of [`Self::assess`] that do not depend on the request's system and features:
    /// [`Self::open`] and a free slot.
    fn assess_now(
        &self,
        now: Time,
        host: &Host,
        client: Option<&ClientId>,
    ) -> Result<Candidate, Unfit> {
        self.open(now, host)?;
        if let Some(c) = client
            && !host.unreachable_until.is_empty()
            && host.unreachable_until.get(c).is_some_and(|t| *t > now)
        {
            return Err(Unfit::UnreachableForClient);
        }
        let global = self.policy.sees_global_load();
        // Only a policy blind to other clients needs the asking client's own count; the
        // lookup hashes the client id, so skip it on the hot path of the others.
        let own = match client {
            Some(c) if !global => host.leases_by_client.get(c).copied().unwrap_or(0),
            _ => 0,
        };
        let used = host.used();
        let slots = host.spec.max_jobs;
        let busy = if global { used } else { own };
        if busy >= slots {
            return Err(Unfit::NoSlot);
        }
        Ok(Candidate {
            slots,
            used,
            own,
            speed: host.spec.speed_factor,
            rank: host.spec.speed_factor * f64::from(host.spec.cpu_count.max(1)),
        })
    }

    /// `unfit` in words, for users and operators.
    fn describe(
        &self,
        now: Time,
        host: &Host,
        unfit: Unfit,
        system: &System,
        features: &BTreeSet<Feature>,
    ) -> String {
        match unfit {
            Unfit::System => format!("does not build {system}"),
            Unfit::Features => host.feature_mismatch(features).unwrap_or_default(),
            Unfit::Excluded => "excluded by the client (unreachable)".into(),
            Unfit::Late => format!(
                "agent late: last report {}s ago",
                now.since(host.last_seen).as_secs()
            ),
            Unfit::Disconnected => "agent disconnected".into(),
            Unfit::Gone => "agent gone".into(),
            Unfit::Draining => "draining".into(),
            Unfit::Gate => host.gate(&self.config.admission).unwrap_or_default(),
            Unfit::UnreachableForClient => "unreachable from this client recently".into(),
            Unfit::Unreachable => format!(
                "unreachable from {} clients recently",
                host.unreachable_until
                    .values()
                    .filter(|t| **t > now)
                    .count()
            ),
            Unfit::NoSlot => format!("no free slot ({}/{} used)", host.used(), host.spec.max_jobs),
        }
    }

    /// Why `host` would take no lease now whatever the request, if so.
    fn unavailable(&self, now: Time, host: &Host) -> Option<String> {
        let unfit = self.assess_now(now, host, None).err()?;
        let any = System::new(System::BUILTIN);
        Some(self.describe(now, host, unfit, &any, &BTreeSet::new()))
    }

    /// Whether some host that is not gone (drained ones included) could ever build this.
    fn could_ever_build(&self, now: Time, system: &System, features: &BTreeSet<Feature>) -> bool {
        self.hosts.values().any(|h| {
            h.state(now, &self.config) != HostState::Gone
                && h.builds(system)
                && h.features_fit(features)
        })
    }

    /// Decides a request. See [`Decision`].
    pub fn acquire(&mut self, now: Time, req: &LeaseRequest) -> Decision {
        self.expire(now);
        let mut ids: Vec<&HostId> = Vec::new();
        let mut candidates: Vec<Candidate> = Vec::new();
        // One example of why a host that builds the system said no, rendered only if
        // nothing fits: under saturation most requests end here, so no string is built
        // per host.
        let mut example: Option<(&Host, Unfit)> = None;
        let mask = self.system_bits.request_mask(&req.system);
        for host in self.hosts.values() {
            match self.assess(
                now,
                host,
                (&req.system, mask),
                &req.required_features,
                Some(&req.client),
                &req.exclude_hosts,
            ) {
                Ok(c) => {
                    ids.push(&host.spec.id);
                    candidates.push(c);
                }
                Err(Unfit::System) => {}
                Err(unfit) => example = Some((host, unfit)),
            }
        }
        if candidates.is_empty() {
            let reason = example.map(|(host, unfit)| {
                format!(
                    "{}: {}",
                    host.spec.id,
                    self.describe(now, host, unfit, &req.system, &req.required_features)
                )
            });
            return self.no_host(now, req, reason);
        }
        let i = self.policy.choose(&candidates, &mut self.rng);
        let id = ids[i].clone();
        self.waiters.remove(&req.client, &req.drv_path);
        Decision::Granted(self.grant(now, &id, req))
    }

    fn no_host(&mut self, now: Time, req: &LeaseRequest, example: Option<String>) -> Decision {
        if !self.could_ever_build(now, &req.system, &req.required_features) {
            self.waiters.remove(&req.client, &req.drv_path);
            let mut reason = format!("no live builder builds {}", req.system);
            if !req.required_features.is_empty() {
                let fs: Vec<&str> = req.required_features.iter().map(Feature::as_str).collect();
                let _ = write!(reason, " with features {}", fs.join(","));
            }
            return Decision::DeclinePermanently { reason };
        }
        let reason = match example {
            Some(why) => format!("no builder free for {} (e.g. {why})", req.system),
            None => format!("no builder free for {}", req.system),
        };
        if req.can_build_locally {
            self.waiters.remove(&req.client, &req.drv_path);
            return Decision::Decline { reason };
        }
        self.waiters.expire(now, self.config.waiter_ttl);
        let position = self
            .waiters
            .touch(now, &req.client, &req.drv_path, &req.system);
        Decision::Postpone {
            retry_after: self.config.postpone_retry,
            position,
            reason,
        }
    }

    fn grant(&mut self, now: Time, host_id: &HostId, req: &LeaseRequest) -> Grant {
        self.next_lease += 1;
        let lease_id = LeaseId::new(format!("{:016x}-{}", self.boot_nonce, self.next_lease));
        let expires_at = now.after(self.config.lease_ttl);
        let host = self.hosts.get_mut(host_id).expect("candidate hosts exist");
        host.leases += 1;
        *host.leases_by_client.entry(req.client.clone()).or_default() += 1;
        let grant = Grant {
            lease_id: lease_id.clone(),
            host: host.spec.clone(),
            ttl: self.config.lease_ttl,
            slots_used: host.used(),
            slots_total: host.spec.max_jobs,
        };
        self.leases.insert(
            lease_id.clone(),
            Lease {
                host: host_id.clone(),
                client: req.client.clone(),
                system: req.system.clone(),
                drv_path: req.drv_path.clone(),
                granted_at: now,
                expires_at,
            },
        );
        self.expiries.push(Reverse((expires_at, lease_id)));
        grant
    }

    /// Extends lease `id` by the TTL from `now`; returns the TTL.
    pub fn keep_alive(&mut self, now: Time, id: &LeaseId) -> Result<Duration, Error> {
        self.expire(now);
        let ttl = self.config.lease_ttl;
        let lease = self.leases.get_mut(id).ok_or_else(|| Error::UnknownLease {
            lease_id: id.to_string(),
        })?;
        lease.expires_at = now.after(ttl);
        self.expiries.push(Reverse((lease.expires_at, id.clone())));
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
        if let Some(lease) = self.leases.get(id) {
            if outcome == BuildOutcome::HostUnreachable {
                let until = now.after(self.config.unreachable_cooldown);
                let client = lease.client.clone();
                if let Some(host) = self.hosts.get_mut(&lease.host) {
                    host.unreachable_until.retain(|_, t| *t > now);
                    host.unreachable_until.insert(client, until);
                }
            }
            self.end_lease(id, LeaseEnd::Released(outcome));
            return Ok(false);
        }
        if self.ended.contains_key(id) {
            return Ok(true);
        }
        Err(Error::UnknownLease {
            lease_id: id.to_string(),
        })
    }

    fn end_lease(&mut self, id: &LeaseId, end: LeaseEnd) {
        let Some(lease) = self.leases.remove(id) else {
            return;
        };
        if let Some(host) = self.hosts.get_mut(&lease.host) {
            host.leases -= 1;
            if let Some(n) = host.leases_by_client.get_mut(&lease.client) {
                *n -= 1;
                if *n == 0 {
                    host.leases_by_client.remove(&lease.client);
                }
            }
        }
        self.ended.insert(id.clone(), end);
        self.ended_order.push_back(id.clone());
        while self.ended_order.len() > self.config.remembered_leases {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
    }

    /// Expires every lease not kept alive until `now`; returns how many expired.
    pub fn expire(&mut self, now: Time) -> usize {
        let mut n = 0;
        while let Some(Reverse((at, _))) = self.expiries.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, id))) = self.expiries.pop() else {
                break;
            };
            // Skip entries superseded by a keep-alive or a release.
            if self.leases.get(&id).is_some_and(|l| l.expires_at == at) {
                self.end_lease(&id, LeaseEnd::Expired);
                n += 1;
            }
        }
        n
    }

    /// How a remembered lease ended.
    pub fn lease_end(&self, id: &LeaseId) -> Option<LeaseEnd> {
        self.ended.get(id).copied()
    }

    /// Live leases.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// Every known host, by id.
    pub fn hosts(&self, now: Time) -> Vec<HostView> {
        self.hosts.values().map(|h| self.view(now, h)).collect()
    }

    /// One host.
    pub fn host(&self, now: Time, id: &HostId) -> Option<HostView> {
        self.hosts.get(id).map(|h| self.view(now, h))
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
            unavailable_reason: self.unavailable(now, h),
        }
    }

    /// Live leases, oldest first.
    pub fn leases(&self, now: Time) -> Vec<LeaseView> {
        let mut v: Vec<_> = self
            .leases
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

    /// Capacity per system, sorted by system.
    pub fn capacity(&mut self, now: Time) -> Vec<CapacityView> {
        self.waiters.expire(now, self.config.waiter_ttl);
        let mut by_system: BTreeMap<String, CapacityView> = BTreeMap::new();
        for h in self.hosts.values() {
            let available = self.open(now, h).is_ok();
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
        let none = Default::default();
        let mask = self.system_bits.request_mask(system);
        let mut verdicts = Vec::with_capacity(self.hosts.len());
        let mut candidates = Vec::new();
        for h in self.hosts.values() {
            let result = match self.assess(now, h, (system, mask), features, None, &none) {
                Ok(c) => {
                    candidates.push((h.spec.id.clone(), c));
                    Ok(c.score())
                }
                Err(unfit) => Err(self.describe(now, h, unfit, system, features)),
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
        self.hosts
            .values()
            .map(|h| (&h.spec.id, h.leases, h.spec.max_jobs))
    }
}

#[cfg(test)]
mod tests;
