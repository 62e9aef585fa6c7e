//! A structure-aware driver of the scheduling core (`nixdispatch_scheduler::core`):
//! sequences of connect, report, acquire, keep-alive, release, expire, drain, disconnect and
//! goodbye on a small fleet, with an arbitrary clock, under every placement policy and
//! arbitrary tunables, checked against a model after every step.
//!
//! Invariants:
//! - no panic;
//! - a grant goes only to a host that was eligible at that instant: ready, not drained, not
//!   held back by unreachable reports, building the system with fitting features, not
//!   excluded, and with a free slot (own slots for the stock-Nix policy), so no host gets more
//!   leases than slots unless its agent re-registered with fewer;
//! - with a clock that never went back, a request is granted whenever some host is eligible,
//!   and declined permanently exactly when no live host could ever build it;
//! - the core's lease accounting equals the model's at every step (per host, in total, in
//!   the expiry queue), keep-alive and release answer as the model says (including repeated
//!   releases and forgotten ones), and after the last lease's expiry nothing stays leased;
//! - stale agent streams change nothing; drains outlive disconnects; read-only views change
//!   nothing.

#![no_main]

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use nixdispatch_scheduler::core::{
    BuildOutcome, ClientId, CoreConfig, Decision, DiskSpace, Error, Feature, Generation, HostId,
    HostReport, HostSpec, HostState, HostView, LeaseId, LeaseRequest, PolicyKind, Pressure,
    Scheduler, System, Time,
};

const HOSTS: usize = 6;
const CLIENTS: u8 = 4;
const FEATURES: [&str; 4] = ["kvm", "big-parallel", "benchmark", "nixos-test"];
/// Most of the time a handful of real systems; past index 8 synthetic ones, so that a long
/// run registers more systems than the core's 64 mask bits.
fn system(i: u8) -> System {
    const REAL: [&str; 8] = [
        "x86_64-linux",
        "aarch64-linux",
        "i686-linux",
        "aarch64-darwin",
        "x86_64-darwin",
        "riscv64-linux",
        "armv7l-linux",
        "builtin",
    ];
    match REAL.get(usize::from(i % 80)) {
        Some(s) => System::new(*s),
        None => System::new(format!("sys{}", i % 80)),
    }
}

fn features(mask: u8) -> BTreeSet<Feature> {
    FEATURES
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, f)| Feature::new(*f))
        .collect()
}

fn host_id(h: u8) -> HostId {
    HostId::new(format!("h{}", usize::from(h) % HOSTS))
}

#[derive(Debug, Arbitrary)]
struct Shape {
    systems: Vec<u8>,
    supported: u8,
    mandatory: u8,
    slots: u8,
    speed: u8,
    cpus: u8,
}

impl Shape {
    fn spec(&self, h: u8) -> HostSpec {
        let mut systems: BTreeSet<System> = self
            .systems
            .iter()
            .take(16)
            .map(|s| system(*s))
            .filter(|s| !s.is_builtin())
            .collect();
        if systems.is_empty() {
            systems.insert(system(0));
        }
        const SPEEDS: [f64; 6] = [1.0, 0.5, 2.0, 3.7, f64::MIN_POSITIVE, 1000.0];
        let id = host_id(h);
        HostSpec {
            store_uri: format!("ssh-ng://{id}"),
            id,
            public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample".into(),
            systems,
            supported_features: features(self.supported),
            mandatory_features: features(self.mandatory),
            max_jobs: 1 + u32::from(self.slots % 8),
            speed_factor: SPEEDS[usize::from(self.speed) % SPEEDS.len()],
            cpu_count: u32::from(self.cpus),
            total_memory_bytes: 0,
            agent_version: String::new(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Clock {
    /// Milliseconds forward.
    Millis(u16),
    /// Seconds forward.
    Seconds(u8),
    /// Anywhere, backwards included (the core must survive a clock that jumps).
    Set(u32),
}

#[derive(Debug, Arbitrary)]
enum Op {
    Connect {
        host: u8,
        shape: Shape,
    },
    Report {
        host: u8,
        stale: bool,
        running: Option<u8>,
        full_disk: bool,
        memory_pressure: Option<u8>,
    },
    Disconnect {
        host: u8,
        stale: bool,
    },
    Goodbye {
        host: u8,
        stale: bool,
    },
    Acquire {
        system: u8,
        features: u8,
        client: u8,
        local: bool,
        exclude: u8,
        drv: u8,
    },
    KeepAlive(u8),
    Release(u8, u8),
    Expire,
    Drain {
        host: u8,
        on: bool,
    },
    Clock(Clock),
    View(u8, u8),
}

#[derive(Debug, Arbitrary)]
struct Input {
    policy: u8,
    seed: u64,
    report_interval_secs: u8,
    grace_secs: u8,
    lease_ttl_secs: u8,
    waiter_ttl_secs: u8,
    remembered: u8,
    cooldown_secs: u8,
    forget_secs: u16,
    ops: Vec<Op>,
}

/// A live lease in the model.
#[derive(Debug, Clone)]
struct Lease {
    host: HostId,
    client: ClientId,
    expires_at: Time,
}

/// What the core should hold, computed independently of it.
#[derive(Debug, Default)]
struct Model {
    live: HashMap<LeaseId, Lease>,
    /// Every ended lease, with how many leases had ended before it.
    ended: HashMap<LeaseId, u64>,
    /// How many leases have ended.
    ends: u64,
    remembered: usize,
    /// Every lease id ever granted, for keep-alives and releases.
    issued: Vec<LeaseId>,
    /// The connected generation of each host, if connected.
    current: HashMap<HostId, Generation>,
    /// Every generation ever handed out per host.
    old: HashMap<HostId, Vec<Generation>>,
    /// The operators' drains, by host id.
    drained: BTreeSet<HostId>,
    /// Until when each client is held off each host after reporting it unreachable.
    unreachable: HashMap<HostId, HashMap<ClientId, Time>>,
    /// Hosts whose re-registration left them with more leases than slots.
    shrunk: BTreeSet<HostId>,
}

impl Model {
    fn end(&mut self, id: LeaseId) {
        self.live.remove(&id);
        self.ended.insert(id, self.ends);
        self.ends += 1;
    }

    /// Ends every lease due at `now`, in the core's order (expiry time, then id); returns how
    /// many.
    fn expire(&mut self, now: Time) -> usize {
        let mut due: Vec<(Time, LeaseId)> = self
            .live
            .iter()
            .filter(|(_, l)| l.expires_at <= now)
            .map(|(id, l)| (l.expires_at, id.clone()))
            .collect();
        due.sort();
        let n = due.len();
        for (_, id) in due {
            self.end(id);
        }
        n
    }

    fn count(&self, host: &HostId) -> u32 {
        self.live.values().filter(|l| &l.host == host).count() as u32
    }

    fn own(&self, host: &HostId, client: &ClientId) -> u32 {
        self.live
            .values()
            .filter(|l| &l.host == host && &l.client == client)
            .count() as u32
    }

    fn lease(&self, k: u8) -> LeaseId {
        match self.issued.get(usize::from(k)) {
            Some(id) if usize::from(k) < self.issued.len() => id.clone(),
            // Never issued: a bogus id, or one of this run's shape from the future.
            _ if k % 2 == 0 => LeaseId::new(format!("x-{k}")),
            _ => self
                .issued
                .first()
                .map(|id| {
                    let nonce = id.as_str().split('-').next().unwrap_or_default();
                    LeaseId::new(format!("{nonce}-{}", 1000 + u32::from(k)))
                })
                .unwrap_or_else(|| LeaseId::new("0000000000000000-1")),
        }
    }

    fn generation(&self, id: &HostId, stale: bool) -> Generation {
        match (stale, self.current.get(id)) {
            (false, Some(g)) => *g,
            _ => self
                .old
                .get(id)
                .and_then(|gs| gs.first().copied())
                .unwrap_or(Generation(u64::MAX)),
        }
    }
}

/// Whether `h` (as the views show it at `now`) could take `req` now.
fn eligible(model: &Model, global: bool, now: Time, h: &HostView, req: &LeaseRequest) -> bool {
    let builds = req.system.is_builtin() || h.spec.systems.contains(&req.system);
    let fit = req
        .required_features
        .iter()
        .all(|f| h.spec.supported_features.contains(f) || h.spec.mandatory_features.contains(f))
        && h.spec
            .mandatory_features
            .iter()
            .all(|f| req.required_features.contains(f));
    let held_off = model
        .unreachable
        .get(&h.spec.id)
        .and_then(|m| m.get(&req.client))
        .is_some_and(|t| *t > now);
    let free = if global {
        h.slots_used < h.spec.max_jobs
    } else {
        model.own(&h.spec.id, &req.client) < h.spec.max_jobs
    };
    builds
        && fit
        && !req.exclude_hosts.contains(&h.spec.id)
        && h.state == HostState::Ready
        && !h.draining
        && h.unavailable_reason.is_none()
        && !held_off
        && free
}

/// Whether some live host could ever build `req` (drained and busy ones included).
fn could_ever(hosts: &[HostView], req: &LeaseRequest) -> bool {
    hosts.iter().any(|h| {
        h.state != HostState::Gone
            && (req.system.is_builtin() || h.spec.systems.contains(&req.system))
            && req.required_features.iter().all(|f| {
                h.spec.supported_features.contains(f) || h.spec.mandatory_features.contains(f)
            })
            && h.spec
                .mandatory_features
                .iter()
                .all(|f| req.required_features.contains(f))
    })
}

/// The core's lease accounting agrees with the model's.
fn check_accounting(s: &Scheduler, m: &mut Model, global: bool) {
    assert_eq!(s.lease_count(), m.live.len(), "live leases");
    assert_eq!(s.expiry_entries(), s.lease_count(), "expiry queue entries");
    let mut known = BTreeSet::new();
    for (id, leases, slots) in s.lease_counts() {
        known.insert(id.clone());
        assert_eq!(leases, m.count(id), "leases of {id}");
        if leases <= slots {
            m.shrunk.remove(id);
        }
        if global {
            assert!(
                leases <= slots || m.shrunk.contains(id),
                "{id} has {leases} leases for {slots} slots"
            );
        }
    }
    // A host only leaves the registry without leases; it comes back as new.
    for l in m.live.values() {
        assert!(
            known.contains(&l.host),
            "a lease on forgotten host {}",
            l.host
        );
    }
    m.unreachable.retain(|h, _| known.contains(h));
    m.current.retain(|h, _| known.contains(h));
}

fn config(input: &Input) -> CoreConfig {
    CoreConfig {
        report_interval: Duration::from_secs(1 + u64::from(input.report_interval_secs % 30)),
        grace: Duration::from_secs(u64::from(input.grace_secs % 60)),
        lease_ttl: Duration::from_secs(1 + u64::from(input.lease_ttl_secs % 120)),
        postpone_retry: Duration::from_secs(5),
        waiter_ttl: Duration::from_secs(1 + u64::from(input.waiter_ttl_secs % 60)),
        remembered_leases: usize::from(input.remembered % 17),
        unreachable_cooldown: Duration::from_secs(u64::from(input.cooldown_secs % 120)),
        forget_gone_after: Duration::from_secs(u64::from(input.forget_secs % 900)),
        ..CoreConfig::default()
    }
}

fuzz_target!(|input: Input| {
    let cfg = config(&input);
    let kind = PolicyKind::ALL[usize::from(input.policy) % PolicyKind::ALL.len()];
    let global = kind != PolicyKind::StockNix;
    let mut s = Scheduler::new(cfg.clone(), kind.build(), input.seed);
    let mut m = Model {
        remembered: cfg.remembered_leases,
        ..Model::default()
    };
    let mut now = Time::ZERO;
    // Whether the clock ever went back: liveness holds only for a clock that does not.
    let mut rewound = false;

    for (step, op) in input.ops.into_iter().enumerate().take(256) {
        match op {
            Op::Connect { host, shape } => {
                let spec = shape.spec(host);
                let id = spec.id.clone();
                let slots = spec.max_jobs;
                let g = s.connect(now, spec.clone());
                if let Some(old) = m.current.insert(id.clone(), g) {
                    assert_ne!(old, g);
                }
                m.old.entry(id.clone()).or_default().push(g);
                let view = s.host(now, &id).expect("a connected host is known");
                assert_eq!(view.spec, spec);
                assert_eq!(view.draining, m.drained.contains(&id), "drain of {id} lost");
                assert_eq!(
                    view.leases,
                    m.count(&id),
                    "leases of {id} lost on reconnect"
                );
                if view.leases > slots {
                    m.shrunk.insert(id);
                }
            }
            Op::Report {
                host,
                stale,
                running,
                full_disk,
                memory_pressure,
            } => {
                let id = host_id(host);
                let g = m.generation(&id, stale);
                let report = HostReport {
                    running_builds: running.map(u32::from),
                    store: full_disk.then_some(DiskSpace {
                        free_bytes: 1,
                        total_bytes: 1 << 40,
                    }),
                    pressure: memory_pressure.map(|p| Pressure {
                        memory_full: Some(f64::from(p % 101)),
                        ..Pressure::default()
                    }),
                    ..HostReport::default()
                };
                let result = s.report(now, &id, g, report);
                let expect_ok = m.current.get(&id) == Some(&g);
                assert_eq!(result.is_ok(), expect_ok, "report on {id}: {result:?}");
            }
            Op::Disconnect { host, stale } => {
                let id = host_id(host);
                let g = m.generation(&id, stale);
                s.disconnect(now, &id, g);
                if m.current.get(&id) == Some(&g) {
                    m.current.remove(&id);
                }
            }
            Op::Goodbye { host, stale } => {
                let id = host_id(host);
                let g = m.generation(&id, stale);
                let result = s.goodbye(&id, g);
                let expect_ok = m.current.get(&id) == Some(&g);
                assert_eq!(result.is_ok(), expect_ok, "goodbye of {id}: {result:?}");
                if expect_ok {
                    m.current.remove(&id);
                    let view = s.host(now, &id).expect("known");
                    assert_eq!(view.state, HostState::Gone);
                }
            }
            Op::Acquire {
                system: sys,
                features: fs,
                client,
                local,
                exclude,
                drv,
            } => {
                // This model knows placement, not the fair queue: a request that cannot be
                // built locally waits, and the queue hands it a slot (a held grant) when one
                // frees, which the model does not follow. So every request here can build
                // locally and is declined rather than queued; the queue's order, quotas and
                // hand-over are checked against an oracle by the core's `queue_invariants`.
                let _ = local;
                let local = true;
                let req = LeaseRequest {
                    system: system(sys),
                    required_features: features(fs),
                    drv_path: format!("/nix/store/{drv}-x.drv"),
                    client: ClientId::new(format!("c{}", client % CLIENTS)),
                    can_build_locally: local,
                    exclude_hosts: (0..HOSTS as u8)
                        .filter(|h| exclude & (1 << h) != 0)
                        .map(host_id)
                        .collect(),
                    // The driver's model places requests on any host; pinned requests are
                    // covered by the core's unit tests.
                    pin_host: None,
                };
                // `acquire` expires due leases first; look at the fleet as it will.
                assert_eq!(s.expire(now), m.expire(now));
                check_accounting(&s, &mut m, global);
                let before = s.hosts(now);
                let any_eligible = before.iter().any(|h| eligible(&m, global, now, h, &req));
                match s.acquire(now, &req) {
                    Decision::Granted(g) => {
                        let h = before
                            .iter()
                            .find(|h| h.spec.id == g.host.id)
                            .expect("granted host is known");
                        assert!(
                            eligible(&m, global, now, h, &req),
                            "step {step}: granted {:?} on ineligible host {h:?}",
                            req
                        );
                        assert_eq!(g.host, h.spec);
                        assert_eq!(g.ttl, cfg.lease_ttl);
                        assert_eq!(g.slots_total, h.spec.max_jobs);
                        assert_eq!(g.slots_used, h.slots_used + 1);
                        assert!(!m.live.contains_key(&g.lease_id), "lease id reused");
                        assert!(!m.issued.contains(&g.lease_id), "lease id reused");
                        m.live.insert(
                            g.lease_id.clone(),
                            Lease {
                                host: g.host.id.clone(),
                                client: req.client.clone(),
                                expires_at: now.after(cfg.lease_ttl),
                            },
                        );
                        m.issued.push(g.lease_id);
                    }
                    Decision::DeclinePermanently { .. } => {
                        assert!(!any_eligible, "step {step}: declined with a host eligible");
                        assert!(
                            !could_ever(&before, &req),
                            "step {step}: declined permanently though a live host builds {:?}",
                            req.system
                        );
                    }
                    d @ (Decision::Decline { .. } | Decision::Postpone { .. }) => {
                        assert!(
                            rewound || !any_eligible,
                            "step {step}: {req:?} not granted with a host eligible: {before:?}"
                        );
                        assert!(could_ever(&before, &req), "step {step}: no live host");
                        // Who can build locally is declined; who cannot waits in line.
                        match d {
                            Decision::Decline { .. } => assert!(local),
                            Decision::Postpone { position, .. } => {
                                assert!(!local);
                                assert!(position >= 1);
                            }
                            _ => unreachable!(),
                        }
                    }
                }
            }
            Op::KeepAlive(k) => {
                let id = m.lease(k);
                m.expire(now);
                let result = s.keep_alive(now, &id);
                match m.live.get_mut(&id) {
                    Some(l) => {
                        assert_eq!(result, Ok(cfg.lease_ttl));
                        l.expires_at = now.after(cfg.lease_ttl);
                    }
                    None => assert!(
                        matches!(result, Err(Error::UnknownLease { .. })),
                        "{result:?}"
                    ),
                }
            }
            Op::Release(k, outcome) => {
                let id = m.lease(k);
                let outcome = [
                    BuildOutcome::Succeeded,
                    BuildOutcome::BuildFailed,
                    BuildOutcome::HostUnreachable,
                    BuildOutcome::Cancelled,
                ][usize::from(outcome % 4)];
                m.expire(now);
                let result = s.release(now, &id, outcome);
                if let Some(l) = m.live.get(&id).cloned() {
                    assert_eq!(result, Ok(false));
                    if outcome == BuildOutcome::HostUnreachable {
                        let until = now.after(cfg.unreachable_cooldown);
                        let held = m.unreachable.entry(l.host.clone()).or_default();
                        held.retain(|_, t| *t > now);
                        held.insert(l.client.clone(), until);
                    }
                    m.end(id);
                } else if let Some(at) = m.ended.get(&id) {
                    // The core remembers ended leases in a 4-way set-associative table: one
                    // is certainly still there while fewer than four later ones ended (a set
                    // drops its oldest entry only when full); after that it may be
                    // forgotten, sooner than `remembered` if later ones shared its set.
                    let later = m.ends - at - 1;
                    if m.remembered > 0 && later < 4 {
                        assert_eq!(result, Ok(true), "a repeated release of {id}");
                    } else {
                        assert!(
                            matches!(result, Ok(true) | Err(Error::UnknownLease { .. })),
                            "a repeated release of {id}, {later} ends later: {result:?}"
                        );
                    }
                } else {
                    assert!(
                        matches!(result, Err(Error::UnknownLease { .. })),
                        "release of {id}: {result:?}"
                    );
                }
            }
            Op::Expire => {
                assert_eq!(s.expire(now), m.expire(now));
            }
            Op::Drain { host, on } => {
                // A drain is operator state keyed by host id: it holds whether or not the
                // host's agent ever connected, and applies when it does.
                let id = host_id(host);
                s.set_draining(&id, on);
                if on {
                    m.drained.insert(id.clone());
                } else {
                    m.drained.remove(&id);
                }
                assert_eq!(s.is_draining(&id), on);
            }
            Op::Clock(c) => {
                now = match c {
                    Clock::Millis(ms) => now.after(Duration::from_millis(ms.into())),
                    Clock::Seconds(secs) => now.after(Duration::from_secs(secs.into())),
                    Clock::Set(ms) => {
                        let t = Time::from_millis(ms.into());
                        rewound |= t < now;
                        t
                    }
                };
            }
            Op::View(kind, arg) => {
                let hosts = s.hosts(now);
                match kind % 5 {
                    0 => {
                        for h in &hosts {
                            assert_eq!(h.leases, m.count(&h.spec.id));
                            assert!(h.slots_used >= h.leases);
                            assert_eq!(h.draining, m.drained.contains(&h.spec.id));
                        }
                    }
                    1 => {
                        let after = (arg % 2 == 0).then(|| host_id(arg / 2));
                        let limit = usize::from(arg % 4);
                        let page = s.hosts_page(now, after.as_ref(), limit);
                        let want: Vec<&HostView> = hosts
                            .iter()
                            .filter(|h| after.as_ref().is_none_or(|a| &h.spec.id > a))
                            .take(limit)
                            .collect();
                        assert_eq!(page.iter().collect::<Vec<_>>(), want);
                    }
                    2 => {
                        let leases = s.leases(now);
                        assert_eq!(leases.len(), m.live.len());
                        for l in &leases {
                            let ml = &m.live[&l.id];
                            assert_eq!(l.host, ml.host);
                            assert_eq!(l.client, ml.client);
                        }
                    }
                    3 => {
                        for c in s.capacity(now) {
                            assert!(c.slots_free <= c.slots_total);
                            assert!(c.hosts_available <= c.hosts);
                        }
                    }
                    _ => {
                        let sys = system(arg);
                        let fs = features(arg >> 4);
                        let e = s.explain(now, &sys, &fs);
                        assert_eq!(e.verdicts.len(), hosts.len());
                        if let Some(chosen) = &e.chosen {
                            let v = e.verdicts.iter().find(|v| &v.host == chosen).unwrap();
                            assert!(v.result.is_ok());
                            assert_eq!(e.outcome, "granted");
                        }
                        assert_eq!(s.hosts(now), hosts, "explain changed the fleet");
                    }
                }
            }
        }
        check_accounting(&s, &mut m, global);
    }

    // Expiry frees everything: past the last lease's expiry no slot stays leased.
    let last = m.live.values().map(|l| l.expires_at).max().unwrap_or(now);
    let end = now.max(last).after(Duration::from_millis(1));
    assert_eq!(s.expire(end), m.expire(end));
    assert_eq!(s.lease_count(), 0);
    assert_eq!(s.expiry_entries(), 0);
    for (id, leases, _) in s.lease_counts() {
        assert_eq!(leases, 0, "{id} keeps a lease after every expiry");
    }
});
