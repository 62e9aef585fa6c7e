//! Eligibility: whether one host can take one request now, and why not. Systems (as bits),
//! features (supported and mandatory), liveness, drain, the scheduler's SSH probe, clients'
//! unreachable reports, the admission gates (free disk, pressure) and free slots.
//!
//! Everything here is a pure function of one host, the request and the configuration, and
//! allocation-free on the hot path: a refusal is an [`Unfit`] code, put into words by
//! [`describe`] only when somebody reads it.

use std::collections::{BTreeSet, HashMap};

use super::policy::Candidate;
use super::registry::Host;
use super::{ClientId, CoreConfig, DiskSpace, Feature, HostId, HostState, System, Time};

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

/// Gives each system seen in a registration a bit, so that "does this host build that
/// system" is one AND on the hot path instead of a set lookup with string comparisons.
/// Bits are never reused. Past 64 systems (far more than Nix knows) new ones get no bit:
/// their masks are all ones and the exact comparison decides.
#[derive(Debug, Default)]
pub(super) struct SystemBits {
    bits: HashMap<System, u32>,
}

impl SystemBits {
    /// The mask of a host's systems, assigning bits to new ones.
    pub(super) fn mask<'a>(&mut self, systems: impl IntoIterator<Item = &'a System>) -> u64 {
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
    pub(super) fn request_mask(&self, system: &System) -> u64 {
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

/// Why a host cannot take a request now. Cheap to produce on the hot path; put into words
/// by [`describe`] only when somebody reads it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Unfit {
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
    /// The scheduler's SSH probe of it failed: its breaker is open (see `super::probe`).
    ProbeFailed,
    /// An admission gate is closed.
    Gate,
    /// The asking client reported it unreachable recently.
    UnreachableForClient,
    /// Several clients reported it unreachable recently.
    Unreachable,
    /// No free slot.
    NoSlot,
}

impl Unfit {
    /// A short stable name, for metrics labels.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Unfit::System => "system",
            Unfit::Features => "features",
            Unfit::Excluded => "excluded",
            Unfit::Late => "late",
            Unfit::Disconnected => "disconnected",
            Unfit::Gone => "gone",
            Unfit::Draining => "draining",
            Unfit::ProbeFailed => "probe_failed",
            Unfit::Gate => "gate",
            Unfit::UnreachableForClient => "unreachable_for_client",
            Unfit::Unreachable => "unreachable",
            Unfit::NoSlot => "no_slot",
        }
    }
}

/// What one request asks of a host, as [`assess`] needs it.
#[derive(Copy, Clone, Debug)]
pub(super) struct Ask<'a> {
    pub(super) system: &'a System,
    /// `SystemBits::request_mask` of `system`.
    pub(super) mask: u64,
    pub(super) features: &'a BTreeSet<Feature>,
    /// The asking client, or `None` for an operator's question.
    pub(super) client: Option<&'a ClientId>,
    pub(super) exclude: &'a BTreeSet<HostId>,
}

/// Whether a request with `required` features may run on a host with these: required ⊆
/// supported ∪ mandatory, and mandatory ⊆ required. Allocation-free, for the hot path.
pub(super) fn features_fit(
    supported: &BTreeSet<Feature>,
    mandatory: &BTreeSet<Feature>,
    required: &BTreeSet<Feature>,
) -> bool {
    if required.is_empty() {
        return mandatory.is_empty();
    }
    required
        .iter()
        .all(|f| supported.contains(f) || mandatory.contains(f))
        && mandatory.iter().all(|f| required.contains(f))
}

impl Host {
    /// Whether the host builds `system` (`builtin` is built everywhere).
    pub(super) fn builds(&self, system: &System) -> bool {
        system.is_builtin() || self.spec.systems.contains(system)
    }

    /// Whether a request with these features may run here (see [`features_fit`]).
    pub(super) fn features_fit(&self, required: &BTreeSet<Feature>) -> bool {
        features_fit(
            &self.spec.supported_features,
            &self.spec.mandatory_features,
            required,
        )
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
    pub(super) fn gate(&self, a: &Admission) -> Option<String> {
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

/// Whether `host` could take `ask` now, as a [`Candidate`], or why not. `global` is whether
/// the placement policy sees every client's load (see `Policy::sees_global_load`).
pub(super) fn assess(
    now: Time,
    cfg: &CoreConfig,
    global: bool,
    host: &Host,
    ask: &Ask<'_>,
) -> Result<Candidate, Unfit> {
    // The mask test is exact while fewer than 64 systems are known; past that, masks
    // are all ones and the string comparison decides.
    if host.system_mask & ask.mask == 0
        || ((ask.mask == u64::MAX || host.system_mask == u64::MAX) && !host.builds(ask.system))
    {
        return Err(Unfit::System);
    }
    if !host.features_fit(ask.features) {
        return Err(Unfit::Features);
    }
    if ask.exclude.contains(&host.spec.id) {
        return Err(Unfit::Excluded);
    }
    assess_now(now, cfg, global, host, ask.client)
}

/// Whether `host` takes new leases at all now: alive, not drained, gates open.
pub(super) fn open(now: Time, cfg: &CoreConfig, host: &Host) -> Result<(), Unfit> {
    match host.state(now, cfg) {
        HostState::Ready => {}
        HostState::Stale => return Err(Unfit::Late),
        HostState::Disconnected => return Err(Unfit::Disconnected),
        HostState::Gone => return Err(Unfit::Gone),
    }
    if host.draining {
        return Err(Unfit::Draining);
    }
    if host.probe.open {
        return Err(Unfit::ProbeFailed);
    }
    if host.unreachable_for_all(now) {
        return Err(Unfit::Unreachable);
    }
    if host.gate_closed {
        return Err(Unfit::Gate);
    }
    Ok(())
}

/// The parts of [`assess`] that do not depend on the request's system and features:
/// [`open`] and a free slot.
pub(super) fn assess_now(
    now: Time,
    cfg: &CoreConfig,
    global: bool,
    host: &Host,
    client: Option<&ClientId>,
) -> Result<Candidate, Unfit> {
    open(now, cfg, host)?;
    if let Some(c) = client
        && host.unreachable_for(now, c)
    {
        return Err(Unfit::UnreachableForClient);
    }
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
pub(super) fn describe(
    now: Time,
    cfg: &CoreConfig,
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
        Unfit::ProbeFailed => host.probe.describe(now),
        Unfit::Gate => host.gate(&cfg.admission).unwrap_or_default(),
        Unfit::UnreachableForClient => "unreachable from this client recently".into(),
        Unfit::Unreachable => format!(
            "unreachable from {} clients recently",
            host.unreachable_reports(now)
        ),
        Unfit::NoSlot => format!("no free slot ({}/{} used)", host.used(), host.spec.max_jobs),
    }
}

/// Why `host` would take no lease now whatever the request, if so.
pub(super) fn unavailable(
    now: Time,
    cfg: &CoreConfig,
    global: bool,
    host: &Host,
) -> Option<String> {
    let unfit = assess_now(now, cfg, global, host, None).err()?;
    let any = System::new(System::BUILTIN);
    Some(describe(now, cfg, host, unfit, &any, &BTreeSet::new()))
}
