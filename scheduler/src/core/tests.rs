//! Tests of the scheduling core: one unit test per rule, and property tests of the
//! invariants (never more leases than slots, never a lease on an ineligible host, expired
//! leases free their slots, a reconnect within the grace keeps state).

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

fn spec(id: &str, systems: &[&str], slots: u32) -> HostSpec {
    HostSpec {
        id: HostId::new(id),
        store_uri: format!("ssh-ng://{id}"),
        public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample".into(),
        systems: systems.iter().map(|s| System::new(*s)).collect(),
        supported_features: BTreeSet::new(),
        mandatory_features: BTreeSet::new(),
        max_jobs: slots,
        speed_factor: 1.0,
        cpu_count: slots,
        total_memory_bytes: 0,
        agent_version: "test".into(),
    }
}

fn req(system: &str, client: &str, drv: &str) -> LeaseRequest {
    LeaseRequest {
        system: System::new(system),
        required_features: BTreeSet::new(),
        drv_path: format!("/nix/store/{drv}.drv"),
        client: ClientId::new(client),
        can_build_locally: false,
        exclude_hosts: BTreeSet::new(),
        pin_host: None,
    }
}

fn features(fs: &[&str]) -> BTreeSet<Feature> {
    fs.iter().map(|f| Feature::new(*f)).collect()
}

fn sched() -> Scheduler {
    Scheduler::new(CoreConfig::default(), PolicyKind::LeastLoaded.build(), 1)
}

fn t(ms: u64) -> Time {
    Time::from_millis(ms)
}

fn granted(d: Decision) -> Grant {
    match d {
        Decision::Granted(g) => g,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// A lease counts at once: two requests between reports go to two different hosts.
#[test]
fn leases_count_immediately_so_clients_do_not_herd() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    s.connect(t(0), spec("b", &["x86_64-linux"], 1));
    let g1 = granted(s.acquire(t(1), &req("x86_64-linux", "c1", "one")));
    let g2 = granted(s.acquire(t(1), &req("x86_64-linux", "c2", "two")));
    assert_ne!(g1.host.id, g2.host.id);
    assert!(matches!(
        s.acquire(t(1), &req("x86_64-linux", "c3", "three")),
        Decision::Postpone { position: 1, .. }
    ));
}

/// Placement normalises by capacity: a 20-slot host takes more than a 2-slot host.
#[test]
fn least_loaded_normalises_by_slots() {
    let mut s = sched();
    s.connect(t(0), spec("small", &["x86_64-linux"], 2));
    s.connect(t(0), spec("big", &["x86_64-linux"], 20));
    let mut on_big = 0;
    for i in 0..11 {
        let g = granted(s.acquire(t(1), &req("x86_64-linux", "c", &format!("d{i}"))));
        if g.host.id.as_str() == "big" {
            on_big += 1;
        }
    }
    assert!(on_big >= 9, "big got only {on_big} of 11");
}

/// Builds the agent sees but the scheduler did not lease still occupy slots.
#[test]
fn observed_builds_count_as_load() {
    let mut s = sched();
    let ga = s.connect(t(0), spec("a", &["x86_64-linux"], 2));
    s.connect(t(0), spec("b", &["x86_64-linux"], 2));
    s.report(
        t(1),
        &HostId::new("a"),
        ga,
        HostReport {
            running_builds: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..2 {
        let g = granted(s.acquire(t(2), &req("x86_64-linux", "c", &format!("d{i}"))));
        assert_eq!(g.host.id.as_str(), "b");
    }
    assert!(matches!(
        s.acquire(t(2), &req("x86_64-linux", "c", "d3")),
        Decision::Postpone { .. }
    ));
}

/// A released slot is free at once even though the last report still saw its build, and
/// builds beyond our leases at that report keep counting as outside load.
#[test]
fn released_slot_is_free_before_the_next_report() {
    let mut s = sched();
    let id = HostId::new("a");
    let g = s.connect(t(0), spec("a", &["x86_64-linux"], 3));
    let ours = granted(s.acquire(t(1), &req("x86_64-linux", "c", "ours")));
    // The agent sees our build and two from a member who bypasses the scheduler.
    s.report(
        t(2),
        &id,
        g,
        HostReport {
            running_builds: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(s.host(t(3), &id).unwrap().slots_used, 3);
    assert!(matches!(
        s.acquire(t(3), &req("x86_64-linux", "c", "x")),
        Decision::Postpone { .. }
    ));
    s.release(t(4), &ours.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    assert_eq!(s.host(t(5), &id).unwrap().slots_used, 2);
    granted(s.acquire(t(5), &req("x86_64-linux", "c", "x")));
}

/// `builtin` matches every host; an unknown system is declined permanently.
#[test]
fn builtin_matches_any_host_and_unknown_system_is_permanent() {
    let mut s = sched();
    s.connect(t(0), spec("mac", &["aarch64-darwin", "x86_64-darwin"], 2));
    granted(s.acquire(t(1), &req("builtin", "c", "fetch")));
    granted(s.acquire(t(1), &req("x86_64-darwin", "c", "rosetta")));
    assert!(matches!(
        s.acquire(t(1), &req("riscv64-linux", "c", "x")),
        Decision::DeclinePermanently { .. }
    ));
}

/// A host serving two systems has one pool of slots for both.
#[test]
fn systems_of_one_host_share_slots() {
    let mut s = sched();
    s.connect(t(0), spec("mac", &["aarch64-darwin", "x86_64-darwin"], 2));
    granted(s.acquire(t(1), &req("aarch64-darwin", "c", "a")));
    granted(s.acquire(t(1), &req("x86_64-darwin", "c", "b")));
    assert!(matches!(
        s.acquire(t(1), &req("aarch64-darwin", "c", "c")),
        Decision::Postpone { .. }
    ));
}

/// Placement stays exact past 64 distinct systems, where the system bitmask runs out and
/// the string comparison takes over.
#[test]
fn more_systems_than_mask_bits() {
    let mut s = sched();
    for i in 0..70 {
        s.connect(t(0), spec(&format!("h{i}"), &[&format!("sys{i}-linux")], 1));
    }
    s.connect(t(0), spec("multi", &["sys3-linux", "sys68-linux"], 1));
    for i in [0, 63, 64, 69] {
        let g = granted(s.acquire(t(1), &req(&format!("sys{i}-linux"), "c", &format!("d{i}"))));
        assert_eq!(g.host.id.to_string(), format!("h{i}"));
    }
    // Two hosts build sys68: its own and the multi-system one (the tie is broken at random).
    let mut got: Vec<String> = ["a", "b"]
        .iter()
        .map(|d| {
            granted(s.acquire(t(1), &req("sys68-linux", "c", d)))
                .host
                .id
                .to_string()
        })
        .collect();
    got.sort();
    assert_eq!(got, ["h68", "multi"]);
    assert!(matches!(
        s.acquire(t(1), &req("sys99-linux", "c", "x")),
        Decision::DeclinePermanently { .. }
    ));
    granted(s.acquire(t(1), &req("builtin", "c", "fetch")));
}

/// Features: required ⊆ supported ∪ mandatory, and mandatory ⊆ required.
#[test]
fn feature_rules() {
    let mut s = sched();
    let mut kvm = spec("kvm", &["x86_64-linux"], 4);
    kvm.supported_features = features(&["kvm", "big-parallel"]);
    let mut bench = spec("bench", &["x86_64-linux"], 4);
    bench.mandatory_features = features(&["benchmark"]);
    s.connect(t(0), kvm);
    s.connect(t(0), bench);
    let mut r = req("x86_64-linux", "c", "vm-test");
    r.required_features = features(&["kvm"]);
    assert_eq!(granted(s.acquire(t(1), &r)).host.id.as_str(), "kvm");
    // Nothing required: only `kvm` qualifies, `bench` insists on `benchmark`.
    assert_eq!(
        granted(s.acquire(t(1), &req("x86_64-linux", "c", "plain")))
            .host
            .id
            .as_str(),
        "kvm"
    );
    let mut r = req("x86_64-linux", "c", "bm");
    r.required_features = features(&["benchmark"]);
    assert_eq!(granted(s.acquire(t(1), &r)).host.id.as_str(), "bench");
    let mut r = req("x86_64-linux", "c", "gpu");
    r.required_features = features(&["cuda"]);
    assert!(matches!(
        s.acquire(t(1), &r),
        Decision::DeclinePermanently { .. }
    ));
}

/// No free slot: decline when the client can build locally, postpone when it cannot.
#[test]
fn full_fleet_declines_or_postpones() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    granted(s.acquire(t(1), &req("x86_64-linux", "c", "a")));
    let mut local = req("x86_64-linux", "c", "b");
    local.can_build_locally = true;
    assert!(matches!(s.acquire(t(1), &local), Decision::Decline { .. }));
    match s.acquire(t(1), &req("x86_64-linux", "c", "c")) {
        Decision::Postpone {
            retry_after,
            position,
            reason,
        } => {
            assert_eq!(retry_after, Duration::from_secs(5));
            assert_eq!(position, 1);
            assert!(reason.contains("no free slot"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

/// Queue positions follow the order in which requests first waited, and repeats keep theirs.
#[test]
fn queue_positions_are_first_come_first_served() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    granted(s.acquire(t(1), &req("x86_64-linux", "c", "busy")));
    let pos = |s: &mut Scheduler, now, client, drv| match s
        .acquire(t(now), &req("x86_64-linux", client, drv))
    {
        Decision::Postpone { position, .. } => position,
        other => panic!("{other:?}"),
    };
    assert_eq!(pos(&mut s, 2, "c1", "x"), 1);
    assert_eq!(pos(&mut s, 3, "c2", "y"), 2);
    assert_eq!(pos(&mut s, 4, "c1", "x"), 1);
    assert_eq!(pos(&mut s, 5, "c2", "y"), 2);
    let cap = s.capacity(t(6));
    assert_eq!(cap[0].waiting, 2);
    // A waiter that stops asking leaves the queue.
    assert_eq!(s.capacity(t(40_000))[0].waiting, 0);
}

/// A released slot is free again; releasing twice is a repeat, an unknown id is NotFound.
#[test]
fn release_is_idempotent_and_unknown_is_not_found() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    let g = granted(s.acquire(t(1), &req("x86_64-linux", "c", "a")));
    assert!(
        !s.release(t(2), &g.lease_id, BuildOutcome::Succeeded)
            .unwrap()
    );
    assert!(
        s.release(t(3), &g.lease_id, BuildOutcome::Succeeded)
            .unwrap()
    );
    assert!(matches!(
        s.release(t(3), &LeaseId::new("nope"), BuildOutcome::Succeeded),
        Err(Error::UnknownLease { .. })
    ));
    granted(s.acquire(t(4), &req("x86_64-linux", "c", "b")));
}

/// A lease that is not kept alive expires and frees its slot; a kept one survives.
#[test]
fn leases_expire_unless_kept_alive() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 2));
    let kept = granted(s.acquire(t(0), &req("x86_64-linux", "c", "kept")));
    let lost = granted(s.acquire(t(0), &req("x86_64-linux", "c", "lost")));
    // Keep the agent fresh so only lease expiry is tested.
    let g = s.connect(t(30_000), spec("a", &["x86_64-linux"], 2));
    s.keep_alive(t(30_000), &kept.lease_id).unwrap();
    s.report(t(59_000), &HostId::new("a"), g, HostReport::default())
        .unwrap();
    assert_eq!(s.expire(t(60_001)), 1);
    assert_eq!(s.lease_end(&lost.lease_id), Some(LeaseEnd::Expired));
    assert!(s.keep_alive(t(60_001), &lost.lease_id).is_err());
    assert_eq!(s.lease_count(), 1);
    // Releasing an expired lease is answered as a repeat.
    assert!(
        s.release(t(60_002), &lost.lease_id, BuildOutcome::Succeeded)
            .unwrap()
    );
    granted(s.acquire(t(60_003), &req("x86_64-linux", "c", "next")));
}

/// Draining stops new leases at once and keeps the running ones; undrain reopens.
#[test]
fn drain_and_undrain() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 4));
    let g = granted(s.acquire(t(1), &req("x86_64-linux", "c", "running")));
    s.set_draining(&HostId::new("a"), true);
    assert!(matches!(
        s.acquire(t(2), &req("x86_64-linux", "c", "new")),
        Decision::Postpone { .. }
    ));
    assert_eq!(s.lease_count(), 1);
    s.keep_alive(t(3), &g.lease_id).unwrap();
    s.set_draining(&HostId::new("a"), false);
    granted(s.acquire(t(4), &req("x86_64-linux", "c", "new")));
}

/// A drain of a host that never connected is kept and applies when it connects; undrain
/// before it connects leaves it open.
#[test]
fn drain_before_connect_applies_at_connect() {
    let mut s = sched();
    let id = HostId::new("later");
    s.set_draining(&id, true);
    assert!(s.is_draining(&id));
    assert!(
        s.host(t(0), &id).is_none(),
        "a drain alone registers no host"
    );
    s.connect(t(1), spec("later", &["x86_64-linux"], 4));
    assert!(s.host(t(1), &id).unwrap().draining);
    assert!(matches!(
        s.acquire(t(2), &req("x86_64-linux", "c", "x")),
        Decision::Postpone { .. }
    ));
    let other = HostId::new("other");
    s.set_draining(&other, true);
    s.set_draining(&other, false);
    s.connect(t(3), spec("other", &["x86_64-linux"], 4));
    assert!(!s.host(t(3), &other).unwrap().draining);
    granted(s.acquire(t(4), &req("x86_64-linux", "c", "x")));
}

/// A host late beyond deadline + grace gets no leases; reporting again reopens it.
#[test]
fn stale_host_gets_no_leases_until_it_reports() {
    let mut s = sched();
    let g = s.connect(t(0), spec("a", &["x86_64-linux"], 4));
    granted(s.acquire(t(29_999), &req("x86_64-linux", "c", "ok")));
    let d = s.acquire(t(30_001), &req("x86_64-linux", "c", "late"));
    assert!(
        matches!(&d, Decision::Postpone { reason, .. } if reason.contains("late")),
        "{d:?}"
    );
    s.report(t(30_002), &HostId::new("a"), g, HostReport::default())
        .unwrap();
    granted(s.acquire(t(30_003), &req("x86_64-linux", "c", "late")));
}

/// A disconnected host gets no new leases; reconnecting within the grace restores it with
/// its leases and drain state; after the grace it is gone.
#[test]
fn reconnect_within_grace_keeps_state() {
    let mut s = sched();
    let id = HostId::new("a");
    let g1 = s.connect(t(0), spec("a", &["x86_64-linux"], 2));
    let lease = granted(s.acquire(t(1), &req("x86_64-linux", "c", "x")));
    s.set_draining(&id, true);
    s.disconnect(t(2), &id, g1);
    assert_eq!(s.host(t(3), &id).unwrap().state, HostState::Disconnected);
    let g2 = s.connect(t(10_000), spec("a", &["x86_64-linux"], 2));
    let view = s.host(t(10_000), &id).unwrap();
    assert_eq!(
        (view.state, view.leases, view.draining),
        (HostState::Ready, 1, true)
    );
    s.keep_alive(t(10_001), &lease.lease_id).unwrap();
    // The old stream can no longer change anything.
    assert!(matches!(
        s.report(t(10_002), &id, g1, HostReport::default()),
        Err(Error::Superseded { .. })
    ));
    s.disconnect(t(10_003), &id, g1);
    assert_eq!(s.host(t(10_004), &id).unwrap().state, HostState::Ready);
    s.disconnect(t(11_000), &id, g2);
    assert_eq!(s.host(t(31_001), &id).unwrap().state, HostState::Gone);
}

/// A host whose agent says goodbye stops getting leases at once.
#[test]
fn goodbye_closes_host_at_once() {
    let mut s = sched();
    let g = s.connect(t(0), spec("a", &["x86_64-linux"], 2));
    s.goodbye(&HostId::new("a"), g).unwrap();
    assert!(matches!(
        s.acquire(t(1), &req("x86_64-linux", "c", "x")),
        Decision::DeclinePermanently { .. }
    ));
}

/// Admission gates: a full store or memory pressure closes a host; unknown values do not.
#[test]
fn admission_gates() {
    let mut s = sched();
    let ga = s.connect(t(0), spec("a", &["x86_64-linux"], 4));
    let gb = s.connect(t(0), spec("b", &["x86_64-linux"], 4));
    let full = DiskSpace {
        free_bytes: 1 << 20,
        total_bytes: 1 << 40,
    };
    s.report(
        t(1),
        &HostId::new("a"),
        ga,
        HostReport {
            store: Some(full),
            ..Default::default()
        },
    )
    .unwrap();
    let squeezed = Pressure {
        memory_full: Some(35.0),
        ..Default::default()
    };
    s.report(
        t(1),
        &HostId::new("b"),
        gb,
        HostReport {
            pressure: Some(squeezed),
            ..Default::default()
        },
    )
    .unwrap();
    let e = s.explain(t(2), &System::new("x86_64-linux"), &BTreeSet::new());
    assert_eq!(e.chosen, None);
    assert_eq!(e.outcome, "postpone");
    let reasons: Vec<String> = e
        .verdicts
        .iter()
        .map(|v| v.result.clone().unwrap_err())
        .collect();
    assert!(reasons[0].contains("store has"), "{reasons:?}");
    assert!(reasons[1].contains("memory full pressure"), "{reasons:?}");
    // A report without pressure or disk numbers reopens both.
    s.report(t(3), &HostId::new("a"), ga, HostReport::default())
        .unwrap();
    s.report(t(3), &HostId::new("b"), gb, HostReport::default())
        .unwrap();
    granted(s.acquire(t(4), &req("x86_64-linux", "c", "x")));
}

/// Excluded hosts (unreachable for this client) are skipped.
#[test]
fn excluded_hosts_are_skipped() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 4));
    s.connect(t(0), spec("b", &["x86_64-linux"], 1));
    let mut r = req("x86_64-linux", "c", "x");
    r.exclude_hosts.insert(HostId::new("a"));
    assert_eq!(granted(s.acquire(t(1), &r)).host.id.as_str(), "b");
}

/// A host a client reported unreachable is not offered to that client again for the
/// cooldown; once two clients report it, nobody gets it; after the cooldown it is back.
#[test]
fn unreachable_reports_hold_a_host_back() {
    let mut s = sched();
    s.connect(t(0), spec("dead", &["x86_64-linux"], 8));
    s.connect(t(0), spec("ok", &["x86_64-linux"], 1));
    let unreachable = |s: &mut Scheduler, client: &str, drv: &str| {
        // `dead` has more free capacity, so it is chosen first.
        let g = granted(s.acquire(t(1), &req("x86_64-linux", client, drv)));
        assert_eq!(g.host.id.as_str(), "dead");
        s.release(t(2), &g.lease_id, BuildOutcome::HostUnreachable)
            .unwrap();
    };
    unreachable(&mut s, "alice", "a1");
    // Alice is sent elsewhere; Bob still gets the box she could not reach.
    assert_eq!(
        granted(s.acquire(t(3), &req("x86_64-linux", "alice", "a2")))
            .host
            .id
            .as_str(),
        "ok"
    );
    unreachable(&mut s, "bob", "b1");
    let e = s.explain(t(4), &System::new("x86_64-linux"), &BTreeSet::new());
    assert_eq!(
        e.verdicts[0].result,
        Err("unreachable from 2 clients recently".into())
    );
    assert!(matches!(
        s.acquire(t(4), &req("x86_64-linux", "carol", "c1")),
        Decision::Postpone { .. }
    ));
    // After the cooldown the reports age out (the agents kept reporting meanwhile).
    s.connect(t(60_000), spec("dead", &["x86_64-linux"], 8));
    s.connect(t(60_000), spec("ok", &["x86_64-linux"], 1));
    assert_eq!(
        granted(s.acquire(t(60_003), &req("x86_64-linux", "carol", "c1")))
            .host
            .id
            .as_str(),
        "dead"
    );
}

/// Explain names every host with its reason and changes nothing.
#[test]
fn explain_reports_every_host_without_side_effects() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    s.connect(t(0), spec("mac", &["aarch64-darwin"], 2));
    granted(s.acquire(t(1), &req("x86_64-linux", "c", "x")));
    let e = s.explain(t(2), &System::new("x86_64-linux"), &BTreeSet::new());
    assert_eq!(e.verdicts.len(), 2);
    assert_eq!(e.verdicts[0].result, Err("no free slot (1/1 used)".into()));
    assert_eq!(
        e.verdicts[1].result,
        Err("does not build x86_64-linux".into())
    );
    assert_eq!(s.lease_count(), 1);
    let e = s.explain(t(2), &System::new("aarch64-darwin"), &BTreeSet::new());
    assert_eq!(e.chosen, Some(HostId::new("mac")));
    assert_eq!(e.verdicts[1].result, Ok(0.5));
}

/// One step of a random scenario for the property tests.
#[derive(Clone, Debug)]
enum Op {
    Acquire {
        system: usize,
        client: u8,
        local: bool,
    },
    Release(usize),
    KeepAlive(usize),
    Report {
        host: usize,
        running: Option<u32>,
    },
    Drain(usize, bool),
    Disconnect(usize),
    Reconnect(usize),
    Advance(u64),
}

const SYSTEMS: [&str; 4] = ["x86_64-linux", "aarch64-linux", "aarch64-darwin", "builtin"];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..SYSTEMS.len(), 0u8..4, any::<bool>())
            .prop_map(|(system, client, local)| Op::Acquire { system, client, local }),
        2 => (0usize..64).prop_map(Op::Release),
        1 => (0usize..64).prop_map(Op::KeepAlive),
        1 => (0usize..3, proptest::option::of(0u32..8)).prop_map(|(host, running)| Op::Report { host, running }),
        1 => (0usize..3, any::<bool>()).prop_map(|(h, d)| Op::Drain(h, d)),
        1 => (0usize..3).prop_map(Op::Disconnect),
        1 => (0usize..3).prop_map(Op::Reconnect),
        1 => (0u64..40_000).prop_map(Op::Advance),
    ]
}

fn fleet() -> Vec<HostSpec> {
    vec![
        spec("linux", &["x86_64-linux"], 6),
        spec("arm", &["aarch64-linux"], 3),
        spec("mac", &["aarch64-darwin", "x86_64-darwin"], 2),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever happens: no host ever has more leases than slots; every grant goes to a
    /// host that was eligible at that instant (ready, not drained, builds the system, a
    /// free slot counting observed builds); a reconnect keeps leases; and after every lease
    /// has expired no slot stays taken.
    #[test]
    fn core_invariants(ops in proptest::collection::vec(op(), 1..200), seed in any::<u64>()) {
        let mut s = Scheduler::new(CoreConfig::default(), PolicyKind::LeastLoaded.build(), seed);
        let specs = fleet();
        let mut gens: Vec<Generation> = specs.iter().map(|h| s.connect(Time::ZERO, h.clone())).collect();
        let mut now = 0u64;
        let mut held: Vec<LeaseId> = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                Op::Acquire { system, client, local } => {
                    let mut r = req(SYSTEMS[system], &format!("c{client}"), &format!("d{i}"));
                    r.can_build_locally = local;
                    // `acquire` first expires due leases; look at the fleet as it will.
                    s.expire(t(now));
                    let before = s.hosts(t(now));
                    if let Decision::Granted(g) = s.acquire(t(now), &r) {
                        let h = before.iter().find(|h| h.spec.id == g.host.id).unwrap();
                        prop_assert_eq!(h.state, HostState::Ready);
                        prop_assert!(!h.draining);
                        prop_assert!(h.spec.systems.contains(&r.system) || r.system.is_builtin());
                        prop_assert!(h.slots_used < h.spec.max_jobs, "granted on a full host");
                        held.push(g.lease_id);
                    }
                }
                Op::Release(k) if !held.is_empty() => {
                    let id = held.remove(k % held.len());
                    let _ = s.release(t(now), &id, BuildOutcome::Succeeded);
                }
                Op::KeepAlive(k) if !held.is_empty() => {
                    let _ = s.keep_alive(t(now), &held[k % held.len()]);
                }
                Op::Report { host, running } => {
                    let _ = s.report(t(now), &specs[host].id, gens[host], HostReport { running_builds: running, ..Default::default() });
                }
                Op::Drain(h, d) => s.set_draining(&specs[h].id, d),
                Op::Disconnect(h) => s.disconnect(t(now), &specs[h].id, gens[h]),
                Op::Reconnect(h) => {
                    let before = s.host(t(now), &specs[h].id).unwrap();
                    gens[h] = s.connect(t(now), specs[h].clone());
                    let after = s.host(t(now), &specs[h].id).unwrap();
                    prop_assert_eq!(before.leases, after.leases);
                    prop_assert_eq!(before.draining, after.draining);
                }
                Op::Advance(ms) => now += ms,
                _ => {}
            }
            for (id, leases, slots) in s.lease_counts() {
                prop_assert!(leases <= slots, "{} has {} leases for {} slots", id, leases, slots);
            }
        }
        now += CoreConfig::default().lease_ttl.as_millis() as u64 + 1;
        s.expire(t(now));
        prop_assert_eq!(s.lease_count(), 0);
        for (_, leases, _) in s.lease_counts() {
            prop_assert_eq!(leases, 0);
        }
    }

    /// With every client able to see global load, a burst never puts a lease on a full host
    /// and fills the fleet exactly to its slot count, whatever the policy.
    #[test]
    fn every_global_policy_fills_exactly_to_capacity(kind in prop::sample::select(vec![
        PolicyKind::LeastLoaded, PolicyKind::PowerOfTwo, PolicyKind::FirstFit,
        PolicyKind::Random, PolicyKind::RoundRobin,
    ]), seed in any::<u64>()) {
        let mut s = Scheduler::new(CoreConfig::default(), kind.build(), seed);
        s.connect(Time::ZERO, spec("a", &["x86_64-linux"], 6));
        s.connect(Time::ZERO, spec("b", &["x86_64-linux"], 20));
        let mut granted = 0;
        for i in 0..40 {
            if let Decision::Granted(_) = s.acquire(t(1), &req("x86_64-linux", "c", &format!("d{i}"))) {
                granted += 1;
            }
        }
        prop_assert_eq!(granted, 26);
    }
}

/// One step of [`index_agrees_with_a_full_scan`].
#[derive(Clone, Debug)]
enum IndexOp {
    Acquire {
        shape: usize,
        client: u8,
        exclude: Option<usize>,
    },
    Release {
        k: usize,
        unreachable: bool,
    },
    KeepAlive(usize),
    Report {
        host: usize,
        running: Option<u32>,
        full_disk: bool,
    },
    Drain(usize, bool),
    Disconnect(usize),
    Reconnect(usize),
    Goodbye(usize),
    Advance(u64),
}

/// Request shapes: plain and featured, on systems some hosts share.
const SHAPES: [(&str, &[&str]); 6] = [
    ("x86_64-linux", &[]),
    ("x86_64-linux", &["kvm"]),
    ("aarch64-linux", &[]),
    ("x86_64-linux", &["big-parallel"]),
    ("builtin", &[]),
    ("riscv64-linux", &[]),
];

fn index_op() -> impl Strategy<Value = IndexOp> {
    prop_oneof![
        6 => (0..SHAPES.len(), 0u8..3, proptest::option::of(0usize..8))
            .prop_map(|(shape, client, exclude)| IndexOp::Acquire { shape, client, exclude }),
        3 => (0usize..64, any::<bool>()).prop_map(|(k, unreachable)| IndexOp::Release { k, unreachable }),
        1 => (0usize..64).prop_map(IndexOp::KeepAlive),
        2 => (0usize..8, proptest::option::of(0u32..6), proptest::bool::weighted(0.1))
            .prop_map(|(host, running, full_disk)| IndexOp::Report { host, running, full_disk }),
        1 => (0usize..8, any::<bool>()).prop_map(|(h, d)| IndexOp::Drain(h, d)),
        1 => (0usize..8).prop_map(IndexOp::Disconnect),
        1 => (0usize..8).prop_map(IndexOp::Reconnect),
        1 => (0usize..8).prop_map(IndexOp::Goodbye),
        1 => (0u64..40_000).prop_map(IndexOp::Advance),
    ]
}

/// Eight hosts in a few capability classes, with different slots and speeds.
fn index_fleet() -> Vec<HostSpec> {
    let mut v = Vec::new();
    for k in 0..8u32 {
        let mut h = match k % 4 {
            0 => spec(&format!("h{k}"), &["x86_64-linux"], 2 + k),
            1 => spec(&format!("h{k}"), &["x86_64-linux", "i686-linux"], 1 + k % 3),
            2 => spec(&format!("h{k}"), &["aarch64-linux"], 3),
            _ => spec(&format!("h{k}"), &["x86_64-linux"], 1),
        };
        if k % 4 == 1 {
            h.supported_features = features(&["kvm", "big-parallel"]);
        }
        if k % 4 == 3 {
            h.mandatory_features = features(&["kvm"]);
            h.supported_features = features(&["kvm"]);
        }
        h.speed_factor = 1.0 + f64::from(k % 3);
        v.push(h);
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The host index and a full scan of every host agree, whatever happens: the index
    /// offers a host exactly when the scan finds one eligible, and its choice has the scan's
    /// lowest least-loaded score. And the expiry queue never holds more than the live
    /// leases.
    #[test]
    fn index_agrees_with_a_full_scan(ops in proptest::collection::vec(index_op(), 1..200), seed in any::<u64>()) {
        let mut s = Scheduler::new(CoreConfig::default(), PolicyKind::LeastLoaded.build(), seed);
        let specs = index_fleet();
        let mut gens: Vec<Generation> = specs.iter().map(|h| s.connect(Time::ZERO, h.clone())).collect();
        let mut now = 0u64;
        let mut held: Vec<LeaseId> = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                IndexOp::Acquire { shape, client, exclude } => {
                    let (system, fs) = SHAPES[shape];
                    let mut r = req(system, &format!("c{client}"), &format!("d{i}"));
                    r.required_features = features(fs);
                    if let Some(x) = exclude {
                        r.exclude_hosts.insert(specs[x].id.clone());
                    }
                    s.expire(t(now));
                    let scan = s.scan_best_score(t(now), &r);
                    let indexed = s.choose_indexed(t(now), &r);
                    let indexed_score = indexed.as_ref().and_then(|id| s.score_of(id));
                    prop_assert_eq!(scan.is_some(), indexed_score.is_some(), "scan {:?}, index {:?}", scan, indexed);
                    if let (Some(a), Some(b)) = (scan, indexed_score) {
                        prop_assert!((a - b).abs() < 1e-9, "scan best {} but index chose {:?} at {}", a, indexed, b);
                    }
                    if let Decision::Granted(g) = s.acquire(t(now), &r) {
                        held.push(g.lease_id);
                    }
                }
                IndexOp::Release { k, unreachable } if !held.is_empty() => {
                    let id = held.remove(k % held.len());
                    let outcome = if unreachable { BuildOutcome::HostUnreachable } else { BuildOutcome::Succeeded };
                    let _ = s.release(t(now), &id, outcome);
                }
                IndexOp::KeepAlive(k) if !held.is_empty() => {
                    let _ = s.keep_alive(t(now), &held[k % held.len()]);
                }
                IndexOp::Report { host, running, full_disk } => {
                    let store = full_disk.then_some(DiskSpace { free_bytes: 1, total_bytes: 1 << 40 });
                    let _ = s.report(t(now), &specs[host].id, gens[host], HostReport { running_builds: running, store, ..Default::default() });
                }
                IndexOp::Drain(h, d) => s.set_draining(&specs[h].id, d),
                IndexOp::Disconnect(h) => s.disconnect(t(now), &specs[h].id, gens[h]),
                IndexOp::Reconnect(h) => gens[h] = s.connect(t(now), specs[h].clone()),
                IndexOp::Goodbye(h) => { let _ = s.goodbye(&specs[h].id, gens[h]); }
                IndexOp::Advance(ms) => now += ms,
                _ => {}
            }
            prop_assert!(s.expiry_entries() <= s.lease_count());
        }
    }
}

/// A host whose agent is gone is forgotten after the retention, unless it still holds a
/// lease; its drain outlives it and holds again when it comes back.
#[test]
fn gone_hosts_are_forgotten_after_the_retention() {
    let cfg = CoreConfig::default();
    let retention = cfg.forget_gone_after.as_millis() as u64;
    let mut s = Scheduler::new(cfg, PolicyKind::LeastLoaded.build(), 1);
    let ga = s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    let gb = s.connect(t(0), spec("b", &["x86_64-linux"], 1));
    s.set_draining(&HostId::new("a"), true);
    let held = granted(s.acquire(t(0), &req("x86_64-linux", "c", "d")));
    assert_eq!(held.host.id, HostId::new("b"));
    s.disconnect(t(1), &HostId::new("a"), ga);
    s.goodbye(&HostId::new("b"), gb).unwrap();
    // Keep b's lease alive past the retention and the sweep interval: b stays while it
    // holds it.
    for ms in (30_000..=retention + 70_000).step_by(30_000) {
        s.keep_alive(t(ms), &held.lease_id).unwrap();
        if ms == retention / 2 {
            assert_eq!(s.hosts(t(ms)).len(), 2, "kept within the retention");
        }
    }
    s.expire(t(retention + 70_000));
    let ids: Vec<_> = s
        .hosts(t(retention + 70_000))
        .into_iter()
        .map(|h| h.spec.id.to_string())
        .collect();
    assert_eq!(ids, vec!["b"]);
    s.release(
        t(retention + 70_000),
        &held.lease_id,
        BuildOutcome::Succeeded,
    )
    .unwrap();
    s.expire(t(retention + 140_000));
    assert!(s.hosts(t(retention + 140_000)).is_empty());
    assert_eq!(
        s.acquire(t(retention + 140_000), &req("x86_64-linux", "c", "e")),
        Decision::DeclinePermanently {
            reason: "no live builder builds x86_64-linux".into()
        }
    );
    s.connect(t(retention + 140_000), spec("a", &["x86_64-linux"], 1));
    assert!(s.is_draining(&HostId::new("a")));
}

/// Reading the hosts in pages gives exactly the whole list, in order.
#[test]
fn host_pages_add_up_to_the_whole_list() {
    let mut s = sched();
    for k in 0..10 {
        s.connect(t(0), spec(&format!("h{k:02}"), &["x86_64-linux"], 1));
    }
    let mut paged = Vec::new();
    let mut after: Option<HostId> = None;
    loop {
        let page = s.hosts_page(t(1), after.as_ref(), 3);
        after = page.last().map(|h| h.spec.id.clone());
        let done = page.len() < 3;
        paged.extend(page);
        if done {
            break;
        }
    }
    assert_eq!(paged, s.hosts(t(1)));
}
