//! The discrete-event simulator: replays a [`Trace`] on a [`Fleet`] through the real
//! placement core ([`Scheduler`]) on simulated time.
//!
//! Model, and why:
//! - **Hosts** run builds by processor sharing: each running build progresses at
//!   `speed * min(1, slots / running)`. A host given more builds than slots (stock Nix, or
//!   load from outside the scheduler) gets no more work done, it only stretches every build
//!   on it. With [`SimConfig::oversubscription_loss`] `L > 0` an oversubscribed host also
//!   loses efficiency: running `k = running / slots > 1` times its slots it does a fraction
//!   `1 - L * (1 - 1/k)` of its full-speed work, a loss that grows with `k` but never
//!   exceeds `L` (cache and memory-bandwidth contention saturate; measured by
//!   `benches/oversub-calibrate.sh`, see `docs/benchmarks/oversubscription.md`). It does
//!   not model memory exhaustion (OOM kills, swapping) or failed SSH starts, which are a
//!   cliff rather than a slope, so it still flatters the policies that oversubscribe.
//! - **Agents** report every `report_interval` at a per-host phase drawn from the seed, with
//!   the number of builds running on the host (scheduled and outside ones): what the
//!   scheduler knows of outside load is up to one interval old.
//! - **Clients** are Nix daemons with `max-jobs = 0`: a build is asked for the moment it is
//!   ready. Under nixdispatch's policies (every policy that sees global load) the hook waits
//!   as it does today: a build that finds no host waits on `WaitForLease`, that is in the
//!   core's queue (`Scheduler::wait`), and starts the instant the core hands it a slot
//!   (`Scheduler::take_handouts`, drained after every core call that can free one). Stock
//!   Nix, and nixdispatch with old hooks ([`Variant::Polling`]), poll: a postponed build
//!   waits in the daemon's `waitingForAWhile` list, which the daemon wakes every
//!   `poll_interval` (Nix's `build-poll-interval`, 5 s) and retries in order.
//! - **Derivations** are `/nix/store/<hash>-b<i>-<id>.drv` (build `i` of the trace): the
//!   core learns each name's duration from its releases, and falls back to a name's pname
//!   (the name without its version); names and pnames are unique to a build, so within one
//!   run nothing is learned per name or pname (only the overall mean). With
//!   [`SimConfig::known_durations`] the core starts with every build's duration already
//!   learned (as the scheduler's database has it for derivations built before), each off
//!   by a seeded lognormal error.
//! - **Leases** are released the instant the build finishes; their TTL is set beyond the
//!   simulated horizon, so keep-alives are not modelled (they do not affect placement).
//!
//! Determinism: all randomness comes from the seed (the core's tie-breaks, the report phases);
//! simultaneous events run in the order they were scheduled.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::Duration;

use anyhow::bail;
use nixdispatch_scheduler::core::{
    BuildOutcome, Candidate, ClientId, CoreConfig, Decision, DurationStat, Feature, HostId,
    HostReport, HostSpec, LeaseId, LeaseRequest, Policy, PolicyKind, QueueSnapshot, Quotas,
    Scheduler, SplitMix64, System, Time, WaitAnswer, WaiterId,
};

use crate::trace::{Fleet, Trace};

/// What runs in the core: one of its policies, or a variant measured for comparison.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Variant {
    /// A policy of the core, exactly as the scheduler would run it.
    Core(PolicyKind),
    /// nixdispatch's policy with agents reporting on every change instead of every
    /// `report_interval`: what fixing the staleness of `running_builds` would give (see
    /// `docs/BENCHMARKS.md`).
    FreshReports,
    /// [`FastestFree`], a policy proposed by these benchmarks, plugged into the real core
    /// through its public [`Policy`] trait.
    FastestFree,
    /// nixdispatch's policy with old hooks that poll (`Acquire` answered `postpone`, asked
    /// again every 5 s) instead of waiting in the queue: first come, first served at poll
    /// time, as nixdispatch was before the waiting queue.
    Polling,
}

impl Variant {
    /// Every variant, in table order: the core's policies, then the comparisons.
    pub fn all() -> Vec<Variant> {
        let mut v: Vec<Variant> = PolicyKind::ALL.iter().map(|&k| Variant::Core(k)).collect();
        v.push(Variant::FreshReports);
        v.push(Variant::FastestFree);
        v.push(Variant::Polling);
        v
    }

    /// The name used in tables and on the command line.
    pub fn label(self) -> &'static str {
        match self {
            Variant::Core(k) => k.as_str(),
            Variant::FreshReports => "least-loaded+fresh",
            Variant::FastestFree => "fastest-free",
            Variant::Polling => "least-loaded+poll",
        }
    }

    fn policy(self) -> Box<dyn Policy> {
        match self {
            Variant::Core(k) => k.build(),
            Variant::FreshReports | Variant::Polling => PolicyKind::LeastLoaded.build(),
            Variant::FastestFree => Box::new(FastestFree),
        }
    }

    /// Whether its clients wait in the core's queue (today's hook) rather than poll:
    /// nixdispatch's policies do, stock Nix and [`Variant::Polling`] do not.
    pub fn waits(self) -> bool {
        match self {
            Variant::Polling => false,
            v => v.policy().sees_global_load(),
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Variant::all()
            .into_iter()
            .find(|v| v.label() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Variant::all().iter().map(|v| v.label()).collect();
                format!("unknown policy `{s}`, expected one of {}", names.join(", "))
            })
    }
}

/// A proposed policy: the host on which the new build would progress fastest,
/// `speed * min(1, slots / (used + 1))` (its rate under processor sharing), ties to the
/// emptiest host (`used / slots`), then at random.
///
/// Unlike [`nixdispatch_scheduler::core::LeastLoaded`], which divides by `slots * speed`,
/// it does not prefer a big slow host with free slots over a small fast one with free
/// slots: a build runs on one slot, so the host's slot count does not make it finish sooner.
#[derive(Debug, Default, Clone, Copy)]
pub struct FastestFree;

impl Policy for FastestFree {
    fn name(&self) -> &'static str {
        "fastest-free"
    }

    fn choose(&mut self, candidates: &[Candidate], rng: &mut SplitMix64) -> usize {
        let key = |c: &Candidate| {
            let slots = f64::from(c.slots);
            let used = f64::from(c.used);
            (-(c.speed * (slots / (used + 1.0)).min(1.0)), used / slots)
        };
        let mut best = 0;
        let mut ties = 1;
        for i in 1..candidates.len() {
            let (a, b) = (key(&candidates[i]), key(&candidates[best]));
            if a.0 < b.0 - 1e-9 || ((a.0 - b.0).abs() <= 1e-9 && a.1 < b.1 - 1e-9) {
                best = i;
                ties = 1;
            } else if (a.0 - b.0).abs() <= 1e-9 && (a.1 - b.1).abs() <= 1e-9 {
                ties += 1;
                if rng.below(ties) == 0 {
                    best = i;
                }
            }
        }
        best
    }
}

/// Knobs of a simulation run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// What the core runs.
    pub variant: Variant,
    /// Seeds the core's tie-breaks and the agents' report phases.
    pub seed: u64,
    /// How often agents report (the core's `report_interval` too).
    pub report_interval: Duration,
    /// How often a client retries its postponed builds.
    pub poll_interval: Duration,
    /// Stop with an error when simulated time passes this (a bound on the loop).
    pub horizon: Duration,
    /// The most efficiency an oversubscribed host loses, `L` in `[0, 1)`: running
    /// `k = running / slots > 1` times its slots, its total rate is `1 - L * (1 - 1/k)` of
    /// its full-speed rate (cache and memory contention). 0 charges nothing.
    pub oversubscription_loss: f64,
    /// `Some(sigma)`: the core starts knowing every build's duration (as learned from
    /// earlier builds of the same derivation), each multiplied by `exp(sigma * N(0,1))`;
    /// `None`: it learns only from this run's releases.
    pub known_durations: Option<f64>,
    /// The core's quotas (e.g. a default per-member maximum of slots).
    pub quotas: Quotas,
    /// The core's `aging_factor`; `None`: the core's default.
    pub aging_factor: Option<u32>,
    /// The core's `max_age`; `None`: the core's default.
    pub max_age: Option<Duration>,
}

impl SimConfig {
    /// The defaults used by the published figures: 10 s reports, 5 s polls, 30 days horizon.
    pub fn new(variant: Variant, seed: u64) -> Self {
        Self {
            variant,
            seed,
            report_interval: Duration::from_secs(10),
            poll_interval: Duration::from_secs(5),
            horizon: Duration::from_secs(30 * 86_400),
            oversubscription_loss: 0.0,
            known_durations: None,
            quotas: Quotas::default(),
            aging_factor: None,
            max_age: None,
        }
    }
}

/// What happened to one scheduled build.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JobRecord {
    /// Index in the trace.
    pub job: usize,
    /// When it became ready (arrived and dependencies done), seconds.
    pub ready: f64,
    /// When it started on a host, seconds.
    pub start: f64,
    /// When it finished, seconds.
    pub finish: f64,
    /// The host (index in the fleet).
    pub host: usize,
    /// How many times the client asked before the grant.
    pub asks: u32,
}

/// The outcome of a run.
#[derive(Clone, Debug)]
pub struct SimResult {
    /// What ran.
    pub variant: Variant,
    /// One record per scheduled build that finished, in finishing order.
    pub records: Vec<JobRecord>,
    /// Scheduled builds that never finished (declined permanently, or their dependencies).
    pub unfinished: usize,
    /// Work done per host until the last scheduled build finished, speed-1 seconds
    /// (scheduled and outside builds).
    pub work_done: Vec<f64>,
    /// When the last scheduled build finished, seconds.
    pub end: f64,
    /// Leases the core still held at the end (must be 0).
    pub leases_left: usize,
    /// Acquire calls made.
    pub acquires: u64,
    /// The most builds any host ran at once, against its slots: `(running, slots)`.
    pub peak_oversubscription: Vec<(u32, u32)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A build arrives (index).
    Arrive(usize),
    /// The next build on a host may finish; `(host, version)`: stale versions are ignored.
    Complete(usize, u64),
    /// A client wakes its postponed builds.
    Wake(usize),
    /// A host's agent reports.
    Report(usize),
}

struct HostRt {
    id: HostId,
    generation: nixdispatch_scheduler::core::Generation,
    slots: u32,
    speed: f64,
    /// `(job, remaining work in speed-1 ms)`.
    running: Vec<(usize, f64)>,
    last: u64,
    version: u64,
    work_done_ms: f64,
    peak: u32,
    /// [`SimConfig::oversubscription_loss`].
    loss: f64,
}

impl HostRt {
    fn rate(&self) -> f64 {
        let n = self.running.len() as f64;
        if n == 0.0 {
            0.0
        } else {
            let slots = f64::from(self.slots);
            let share = (slots / n).min(1.0);
            // `share = 1/k`: the loss is `L * (1 - 1/k)`, 0 up to the slots, at most `L`.
            self.speed * share * (1.0 - self.loss * (1.0 - share))
        }
    }

    /// Advances every running build to `now`.
    fn advance(&mut self, now: u64) {
        let dt = now.saturating_sub(self.last) as f64;
        if dt > 0.0 && !self.running.is_empty() {
            let r = self.rate();
            let n = self.running.len() as f64;
            for (_, rem) in &mut self.running {
                *rem -= dt * r;
            }
            self.work_done_ms += dt * r * n;
        }
        self.last = now;
    }

    /// When the next build finishes at the current rate.
    fn next_completion(&self, now: u64) -> Option<u64> {
        let r = self.rate();
        self.running
            .iter()
            .map(|(_, rem)| rem.max(0.0))
            .min_by(f64::total_cmp)
            .map(|rem| now + (rem / r).ceil() as u64)
    }
}

struct JobRt {
    system: System,
    features: BTreeSet<Feature>,
    client: usize,
    drv: String,
    missing_deps: usize,
    arrived: bool,
    ready: u64,
    start: u64,
    asks: u32,
    lease: Option<LeaseId>,
    host: usize,
}

struct Sim<'a> {
    trace: &'a Trace,
    cfg: &'a SimConfig,
    core: Scheduler,
    hosts: Vec<HostRt>,
    host_index: HashMap<HostId, usize>,
    jobs: Vec<JobRt>,
    dependents: Vec<Vec<usize>>,
    clients: Vec<ClientId>,
    /// Per client: postponed builds in the order they were postponed.
    postponed: Vec<Vec<usize>>,
    wake_pending: Vec<bool>,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    seq: u64,
    records: Vec<JobRecord>,
    remaining: usize,
    acquires: u64,
    /// Under a waiting variant: the build each queued waiter is.
    waiting: HashMap<WaiterId, usize>,
}

/// Runs `trace` on `fleet` under `cfg`.
pub fn simulate(trace: &Trace, fleet: &Fleet, cfg: &SimConfig) -> anyhow::Result<SimResult> {
    fleet.validate()?;
    trace.check_against(fleet)?;
    let core_cfg = CoreConfig {
        report_interval: cfg.report_interval,
        lease_ttl: cfg.horizon * 2,
        postpone_retry: cfg.poll_interval,
        // A simulated fleet starts in steady state, not after a restart.
        startup_window: Duration::ZERO,
        startup_hold: Duration::ZERO,
        quotas: cfg.quotas.clone(),
        ..CoreConfig::default()
    };
    let core_cfg = CoreConfig {
        aging_factor: cfg.aging_factor.unwrap_or(core_cfg.aging_factor),
        max_age: cfg.max_age.unwrap_or(core_cfg.max_age),
        ..core_cfg
    };
    let mut core = Scheduler::new(core_cfg, cfg.variant.policy(), cfg.seed);
    if let Some(sigma) = cfg.known_durations {
        let mut rng = SplitMix64::new(cfg.seed ^ 0x0d0e_a710);
        let durations = trace
            .jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| j.host.is_none())
            .map(|(i, j)| {
                let err = (sigma * standard_normal(&mut rng)).exp();
                let stat = DurationStat {
                    mean_millis: j.duration_s * 1000.0 * err,
                    samples: 1,
                };
                (drv_name_of(i, &j.id), stat)
            })
            .collect();
        core.restore_queue(QueueSnapshot {
            quotas: cfg.quotas.clone(),
            durations,
            usage: Vec::new(),
        });
    }
    let mut hosts = Vec::with_capacity(fleet.hosts.len());
    let mut host_index = HashMap::new();
    for (k, h) in fleet.hosts.iter().enumerate() {
        let id = HostId::new(&h.id);
        let generation = core.connect(
            Time::ZERO,
            HostSpec {
                id: id.clone(),
                store_uri: format!("ssh-ng://{}", h.id),
                public_key: String::new(),
                systems: h.systems.iter().map(System::new).collect(),
                supported_features: h.features.iter().map(Feature::new).collect(),
                mandatory_features: h.mandatory_features.iter().map(Feature::new).collect(),
                max_jobs: h.slots,
                speed_factor: h.speed,
                cpu_count: h.cpus,
                total_memory_bytes: 0,
                agent_version: "sim".into(),
            },
        );
        host_index.insert(id.clone(), k);
        hosts.push(HostRt {
            id,
            generation,
            slots: h.slots,
            speed: h.speed,
            running: Vec::new(),
            last: 0,
            version: 0,
            work_done_ms: 0.0,
            peak: 0,
            loss: cfg.oversubscription_loss,
        });
    }

    let mut clients = Vec::new();
    let mut client_index: HashMap<&str, usize> = HashMap::new();
    let mut jobs = Vec::with_capacity(trace.jobs.len());
    let mut dependents = vec![Vec::new(); trace.jobs.len()];
    let mut remaining = 0;
    for (i, j) in trace.jobs.iter().enumerate() {
        let client = if j.host.is_some() {
            usize::MAX
        } else {
            remaining += 1;
            *client_index.entry(j.client.as_str()).or_insert_with(|| {
                clients.push(ClientId::new(&j.client));
                clients.len() - 1
            })
        };
        for &d in &trace.deps[i] {
            dependents[d].push(i);
        }
        jobs.push(JobRt {
            system: System::new(&j.system),
            features: j.features.iter().map(Feature::new).collect(),
            client,
            drv: format!("/nix/store/{:032}-{}.drv", i, drv_name_of(i, &j.id)),
            missing_deps: trace.deps[i].len(),
            arrived: false,
            ready: 0,
            start: 0,
            asks: 0,
            lease: None,
            host: j
                .host
                .as_ref()
                .map(|h| host_index[&HostId::new(h)])
                .unwrap_or(usize::MAX),
        });
    }
    let n_clients = clients.len();
    let sim = Sim {
        trace,
        cfg,
        core,
        hosts,
        host_index,
        jobs,
        dependents,
        clients,
        postponed: vec![Vec::new(); n_clients],
        wake_pending: vec![false; n_clients],
        events: BinaryHeap::new(),
        seq: 0,
        records: Vec::new(),
        remaining,
        acquires: 0,
        waiting: HashMap::new(),
    };
    sim.run()
}

/// The derivation name of build `i`: `b<i>-` and its id, made a valid store path name (ids
/// are free text in traces). The prefix makes both the name and its pname (the core's
/// fallback for a new version of a known name: the part before the first `-` followed by a
/// digit) unique to the build, so a cold run learns nothing per name or per pname (ids such
/// as `mass-12` would otherwise share the pname `mass`).
fn drv_name_of(i: usize, id: &str) -> String {
    let clean: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+-._?=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("b{i}-{clean}")
}

/// A standard normal deviate (Box-Muller).
fn standard_normal(rng: &mut SplitMix64) -> f64 {
    let u1 = rng.unit().max(1e-12);
    let u2 = rng.unit();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn ms(s: f64) -> u64 {
    (s * 1000.0).round() as u64
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

impl Sim<'_> {
    fn push(&mut self, at: u64, e: Event) {
        self.seq += 1;
        self.events.push(Reverse((at, self.seq, e)));
    }

    fn run(mut self) -> anyhow::Result<SimResult> {
        let interval = self.cfg.report_interval.as_millis() as u64;
        let mut rng = SplitMix64::new(self.cfg.seed ^ 0x005e_ed0f_a9e7);
        for k in 0..self.hosts.len() {
            // Each agent reports at its own phase, as real agents started at different times.
            let phase = rng.below(interval.max(1));
            self.push(phase, Event::Report(k));
        }
        for (i, j) in self.trace.jobs.iter().enumerate() {
            self.push(ms(j.arrival_s), Event::Arrive(i));
        }
        let horizon = self.cfg.horizon.as_millis() as u64;
        let mut now = 0;
        while self.remaining > 0 {
            let Some(Reverse((at, _, e))) = self.events.pop() else {
                break;
            };
            now = at;
            if now > horizon {
                bail!(
                    "{}: simulated time passed the horizon of {} s with {} builds unfinished",
                    self.cfg.variant.label(),
                    self.cfg.horizon.as_secs(),
                    self.remaining
                );
            }
            match e {
                Event::Arrive(i) => {
                    self.jobs[i].arrived = true;
                    if self.jobs[i].missing_deps == 0 {
                        self.ready(now, i);
                    }
                }
                Event::Complete(h, v) => {
                    if self.hosts[h].version == v {
                        self.complete(now, h);
                    }
                }
                Event::Wake(c) => self.wake(now, c),
                Event::Report(h) => {
                    self.send_report(now, h)?;
                    self.push(now + interval, Event::Report(h));
                }
            }
        }
        let mut work_done = Vec::with_capacity(self.hosts.len());
        let mut peak = Vec::with_capacity(self.hosts.len());
        for h in &mut self.hosts {
            h.advance(now);
            work_done.push(h.work_done_ms / 1000.0);
            peak.push((h.peak, h.slots));
        }
        let end = self.records.iter().map(|r| r.finish).fold(0.0, f64::max);
        Ok(SimResult {
            variant: self.cfg.variant,
            unfinished: self.remaining,
            records: self.records,
            work_done,
            end,
            leases_left: self.core.lease_count(),
            acquires: self.acquires,
            peak_oversubscription: peak,
        })
    }

    fn send_report(&mut self, now: u64, h: usize) -> anyhow::Result<()> {
        let host = &self.hosts[h];
        let report = HostReport {
            running_builds: Some(host.running.len() as u32),
            ..HostReport::default()
        };
        self.core
            .report(Time::from_millis(now), &host.id, host.generation, report)?;
        self.start_handed_out(now);
        Ok(())
    }

    /// Starts the builds the core handed a slot to since the last call (their hooks claim
    /// the grant at once).
    fn start_handed_out(&mut self, now: u64) {
        for h in self.core.take_handouts() {
            let Some(i) = self.waiting.remove(&h.waiter) else {
                continue;
            };
            self.core
                .keep_alive(Time::from_millis(now), &h.grant.lease_id)
                .expect("a grant is claimed within its claim window");
            let host = self.host_index[&h.grant.host.id];
            self.jobs[i].lease = Some(h.grant.lease_id);
            self.start(now, i, host);
        }
    }

    fn ready(&mut self, now: u64, i: usize) {
        self.jobs[i].ready = now;
        if self.jobs[i].client == usize::MAX {
            let h = self.jobs[i].host;
            self.start(now, i, h);
        } else {
            self.ask(now, i);
        }
    }

    /// One `Acquire`; returns whether the build was postponed.
    fn ask(&mut self, now: u64, i: usize) -> bool {
        let job = &self.jobs[i];
        let req = LeaseRequest {
            system: job.system.clone(),
            required_features: job.features.clone(),
            drv_path: job.drv.clone(),
            client: self.clients[job.client].clone(),
            can_build_locally: false,
            exclude_hosts: BTreeSet::new(),
            pin_host: None,
        };
        self.acquires += 1;
        self.jobs[i].asks += 1;
        if self.cfg.variant.waits() {
            return match self.core.wait(Time::from_millis(now), &req, None) {
                WaitAnswer::Granted(g) => {
                    let h = self.host_index[&g.host.id];
                    self.jobs[i].lease = Some(g.lease_id);
                    self.start(now, i, h);
                    false
                }
                WaitAnswer::Queued { waiter, .. } => {
                    self.waiting.insert(waiter, i);
                    true
                }
                // Cannot build locally, and validated against the fleet: as above.
                WaitAnswer::Decline { .. } | WaitAnswer::DeclinePermanently { .. } => false,
            };
        }
        match self.core.acquire(Time::from_millis(now), &req) {
            Decision::Granted(g) => {
                let h = self.host_index[&g.host.id];
                self.jobs[i].lease = Some(g.lease_id);
                self.start(now, i, h);
                false
            }
            Decision::Postpone { .. } | Decision::Decline { .. } => {
                let c = self.jobs[i].client;
                self.postponed[c].push(i);
                if !self.wake_pending[c] {
                    self.wake_pending[c] = true;
                    let at = now + self.cfg.poll_interval.as_millis() as u64;
                    self.push(at, Event::Wake(c));
                }
                true
            }
            Decision::DeclinePermanently { .. } => {
                // Validation against the fleet rules this out for live hosts; if it happens
                // the build (and what depends on it) stays unfinished and is reported.
                false
            }
        }
    }

    fn wake(&mut self, now: u64, c: usize) {
        self.wake_pending[c] = false;
        let waiting = std::mem::take(&mut self.postponed[c]);
        // Within one wake-up nothing changes between two asks that are postponed, so a
        // second ask of the same (system, features) by the same client gets the same answer
        // (a grant would have changed the state; policies advance only on a grant). Skipping
        // it keeps a 10,000-build mass rebuild tractable without changing any placement.
        let mut refused: Vec<usize> = Vec::new();
        let mut still = Vec::new();
        for i in waiting {
            let same = |k: &usize| {
                self.jobs[*k].system == self.jobs[i].system
                    && self.jobs[*k].features == self.jobs[i].features
            };
            if refused.iter().any(same) {
                still.push(i);
                continue;
            }
            if self.ask(now, i) {
                // `ask` queued it again; keep the order by moving it to `still`.
                self.postponed[c].pop();
                still.push(i);
                refused.push(i);
            }
        }
        if !still.is_empty() {
            self.postponed[c] = still;
            if !self.wake_pending[c] {
                self.wake_pending[c] = true;
                let at = now + self.cfg.poll_interval.as_millis() as u64;
                self.push(at, Event::Wake(c));
            }
        }
    }

    fn start(&mut self, now: u64, i: usize, h: usize) {
        self.jobs[i].start = now;
        self.jobs[i].host = h;
        let work = self.trace.jobs[i].duration_s * 1000.0;
        let host = &mut self.hosts[h];
        host.advance(now);
        host.running.push((i, work));
        host.peak = host.peak.max(host.running.len() as u32);
        self.reschedule(now, h);
        if self.cfg.variant == Variant::FreshReports {
            self.send_report(now, h)
                .expect("a connected host takes reports");
        }
    }

    fn reschedule(&mut self, now: u64, h: usize) {
        let host = &mut self.hosts[h];
        host.version += 1;
        let v = host.version;
        if let Some(at) = host.next_completion(now) {
            self.push(at, Event::Complete(h, v));
        }
    }

    fn complete(&mut self, now: u64, h: usize) {
        let host = &mut self.hosts[h];
        host.advance(now);
        // Builds within a millisecond of done finish now (completion times are rounded up).
        let rate = host.rate();
        let mut done = Vec::new();
        host.running.retain(|&(i, rem)| {
            let fin = rem <= rate.max(1e-9);
            if fin {
                done.push(i);
            }
            !fin
        });
        done.sort_unstable();
        self.reschedule(now, h);
        if self.cfg.variant == Variant::FreshReports {
            // Before the releases, as an agent would see the build processes end first.
            self.send_report(now, h)
                .expect("a connected host takes reports");
        }
        for i in done {
            if let Some(lease) = self.jobs[i].lease.take() {
                // The core knows every lease it granted; a failure here is a core bug.
                self.core
                    .release(Time::from_millis(now), &lease, BuildOutcome::Succeeded)
                    .expect("a granted lease is released once");
                self.start_handed_out(now);
            }
            if self.jobs[i].client != usize::MAX {
                self.remaining -= 1;
                let j = &self.jobs[i];
                self.records.push(JobRecord {
                    job: i,
                    ready: secs(j.ready),
                    start: secs(j.start),
                    finish: secs(now),
                    host: h,
                    asks: j.asks,
                });
            }
            for k in std::mem::take(&mut self.dependents[i]) {
                self.jobs[k].missing_deps -= 1;
                if self.jobs[k].missing_deps == 0 && self.jobs[k].arrived {
                    self.ready(now, k);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(slots: u32, running: usize, loss: f64) -> HostRt {
        HostRt {
            id: HostId::new("h"),
            generation: nixdispatch_scheduler::core::Generation(1),
            slots,
            speed: 2.0,
            running: (0..running).map(|j| (j, 1000.0)).collect(),
            last: 0,
            version: 0,
            work_done_ms: 0.0,
            peak: 0,
            loss,
        }
    }

    /// Processor sharing: up to its slots each build runs at full speed; beyond, the host's
    /// total stays `slots * speed` without a loss, and with one shrinks by `L * (1 - 1/k)`,
    /// never by more than `L` however many builds it runs.
    #[test]
    fn oversubscription_rate() {
        assert_eq!(host(4, 2, 0.5).rate(), 2.0);
        assert_eq!(host(4, 4, 0.5).rate(), 2.0);
        assert_eq!(host(4, 8, 0.0).rate(), 1.0);
        // 8 builds on 4 slots: half speed each, and 1 - 0.5 * (1 - 1/2) of that.
        assert!((host(4, 8, 0.5).rate() - 0.75).abs() < 1e-12);
        // Bounded: 4,000 builds on 4 slots do at least (1 - L) of the host's work.
        let h = host(4, 4000, 0.5);
        let total = h.rate() * 4000.0;
        assert!(total > 8.0 * 0.5 && total < 8.0 * 0.501, "{total}");
    }
}
