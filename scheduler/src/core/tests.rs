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

/// A scheduler long past its start: no startup window (see `CoreConfig::startup_window`).
fn sched() -> Scheduler {
    Scheduler::new(started(), PolicyKind::LeastLoaded.build(), 1)
}

/// The default configuration, long past the start (no startup window or hold).
fn started() -> CoreConfig {
    CoreConfig {
        startup_window: Duration::ZERO,
        startup_hold: Duration::ZERO,
        ..CoreConfig::default()
    }
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
    // The released slot is free at once: it goes straight to the postponed request (held
    // for it until it asks again), so the host is full again without waiting for a report.
    s.release(t(4), &ours.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    assert_eq!(s.host(t(5), &id).unwrap().leases, 1);
    assert_eq!(s.host(t(5), &id).unwrap().slots_used, 3);
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
    // After the cooldown the reports age out (the agents kept reporting meanwhile). Carol's
    // postponed request waits in the queue and takes the slot of Alice's expiring lease;
    // Dave, asking next, gets the box that is back.
    s.connect(t(60_000), spec("dead", &["x86_64-linux"], 8));
    s.connect(t(60_000), spec("ok", &["x86_64-linux"], 1));
    assert_eq!(
        granted(s.acquire(t(60_003), &req("x86_64-linux", "carol", "c1")))
            .host
            .id
            .as_str(),
        "ok"
    );
    assert_eq!(
        granted(s.acquire(t(60_003), &req("x86_64-linux", "dave", "d1")))
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
                    // Never fewer; more when the reconnect handed a slot to a waiter.
                    prop_assert!(after.leases >= before.leases);
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

// ---------------------------------------------------------------------------------------
// The wait queue: hand-over at once, fair order, quotas, the last slot rule, durations.
// ---------------------------------------------------------------------------------------

use super::dispatch::fits;
use super::waiters::Class;

/// A waiter's deadline, from when it started waiting and its slack.
fn deadline(w: &waiters::Waiter) -> Time {
    w.since.after(w.slack)
}

/// Test oracle for `Scheduler::pick`: a brute-force scan of every waiter, sharing none of
/// the queue's indexes. Among the waiters host `id` fits (not excluded, member not reporting
/// it unreachable, member and system under quota), and on the host's last free slot not of a
/// class broader than another such waiter's: the member first in fair order (smallest
/// weight, then served least recently, then arrived first); of its waiters, one past its
/// deadline, the earliest first, else the shortest expected; then the earliest arrival.
pub(super) fn oracle_pick(s: &Scheduler, now: Time, id: &HostId, free: u32) -> Option<WaiterId> {
    let host = s.registry.get(id)?;
    let cands: Vec<(WaiterId, &waiters::Waiter, &Class)> = s
        .waiters
        .all()
        .filter_map(|(wid, w)| {
            let class = &s.waiters.class(w.class)?.class;
            (fits(host, class)
                && s.accounts.admits(&w.client, &class.system).is_ok()
                && !host.unreachable_for(now, &w.client)
                && !w.exclude.contains(id))
            .then_some((wid, w, class))
        })
        .collect();
    let strictly_inside = |a: &Class, b: &Class| {
        let (mut sub, mut strict) = (true, false);
        for h in s.registry.iter() {
            let (fa, fb) = (fits(h, a), fits(h, b));
            sub &= !fa || fb;
            strict |= fb && !fa;
        }
        sub && strict
    };
    let broad = |c: &Class| {
        free == 1
            && cands
                .iter()
                .any(|(_, _, k)| *k != c && strictly_inside(k, c))
    };
    // The member first in fair order (weight, least recently served, first arrived); its
    // overdue waiters (deadline passed) first, by deadline; the rest shortest expected
    // first; then by arrival.
    let rank = |w: &waiters::Waiter| {
        let d = deadline(w);
        if d <= now {
            (0u8, d.as_millis(), w.key.1)
        } else {
            (1, w.key.0, w.key.1)
        }
    };
    cands
        .iter()
        .filter(|(_, _, c)| !broad(c))
        .min_by(|a, b| {
            let (fa, fb) = (
                s.accounts.fair_key(&a.1.client),
                s.accounts.fair_key(&b.1.client),
            );
            fa.cmp(&fb).then(rank(a.1).cmp(&rank(b.1)))
        })
        .map(|x| x.0)
}

fn queued(a: WaitAnswer) -> WaiterId {
    match a {
        WaitAnswer::Queued { waiter, .. } => waiter,
        other => panic!("expected to be queued, got {other:?}"),
    }
}

fn wait_granted(a: WaitAnswer) -> Grant {
    match a {
        WaitAnswer::Granted(g) => g,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// A slot freed by a release goes to the waiting stream within the same call.
#[test]
fn a_release_hands_the_slot_to_the_waiter_at_once() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    let first = wait_granted(s.wait(t(1), &req("x86_64-linux", "alice", "one"), None));
    let w = queued(s.wait(t(2), &req("x86_64-linux", "bob", "two"), None));
    assert!(s.take_handouts().is_empty());
    s.release(t(3), &first.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    let h = s.take_handouts();
    assert_eq!(h.len(), 1);
    assert_eq!((h[0].waiter, h[0].grant.host.id.as_str()), (w, "a"));
    assert_eq!(h[0].grant.ttl, CoreConfig::default().claim_ttl);
    // Claiming it with a keep-alive extends it to the full TTL.
    assert_eq!(
        s.keep_alive(t(4), &h[0].grant.lease_id).unwrap(),
        CoreConfig::default().lease_ttl
    );
    assert_eq!(s.waiting(), 0);
    assert!(s.audit.is_empty(), "{:?}", s.audit);
}

/// A member flooding the queue does not starve one that asks later: the freed slot goes
/// to the member running fewer builds.
#[test]
fn fair_order_across_members() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 2));
    let f0 = wait_granted(s.wait(t(1), &req("x86_64-linux", "flood", "f0"), None));
    let f1 = wait_granted(s.wait(t(1), &req("x86_64-linux", "flood", "f1"), None));
    let flood: Vec<WaiterId> = (2..7)
        .map(|i| queued(s.wait(t(2), &req("x86_64-linux", "flood", &format!("f{i}")), None)))
        .collect();
    let o1 = queued(s.wait(t(3), &req("x86_64-linux", "other", "o1"), None));
    assert_eq!(s.wait_status(t(3), o1).unwrap().position, 1);
    // `flood` still runs one build, `other` none: the freed slot is `other`'s although its
    // request came last.
    s.release(t(4), &f0.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    assert_eq!(s.take_handouts()[0].waiter, o1);
    // Both run one now; `flood` was served least recently, so the next slot is its.
    s.release(t(5), &f1.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    assert_eq!(s.take_handouts()[0].waiter, flood[0]);
    assert!(s.audit.is_empty(), "{:?}", s.audit);
}

/// Across members, fair order decides (the least recently served at equal weight), not the
/// builds' sizes; within a member the shortest expected build goes first, except a waiter
/// past its deadline (arrival + `aging_factor` × expected), which then goes before the
/// member's later short builds.
#[test]
fn members_take_turns_and_a_members_long_build_ages_past_its_short_ones() {
    let far = Duration::from_secs(1 << 30);
    let cfg = CoreConfig {
        aging_factor: 2,
        max_age: Duration::from_secs(3600),
        report_interval: far,
        lease_ttl: far,
        claim_ttl: far,
        ..started()
    };
    let mut s = Scheduler::new(cfg, PolicyKind::LeastLoaded.build(), 1);
    s.durations.learn("long-1.0", Duration::from_secs(600));
    s.durations.learn("short-1.0", Duration::from_secs(5));
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    let drv = |n: u32, name: &str| format!("{n:032}-{name}");
    let x86 = "x86_64-linux";
    let busy = wait_granted(s.wait(t(0), &req(x86, "x", &drv(0, "x")), None));
    // Two members of equal weight: the one that arrived first goes first, whatever the
    // sizes (`short-1.1` is expected to take 5 s, its pname's mean).
    let long = queued(s.wait(t(1), &req(x86, "m", &drv(1, "long-1.1")), None));
    let other = queued(s.wait(t(2), &req(x86, "o", &drv(2, "short-1.1")), None));
    assert_eq!(s.wait_status(t(2), long).unwrap().position, 1);
    assert_eq!(s.wait_status(t(2), other).unwrap().position, 2);
    // `m`'s own short build goes before its long one.
    let mine = queued(s.wait(t(3), &req(x86, "m", &drv(3, "short-1.2")), None));
    s.release(t(4), &busy.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    let h = s.take_handouts();
    assert_eq!(h[0].waiter, mine);
    s.release(t(5), &h[0].grant.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    let h = s.take_handouts();
    assert_eq!(h[0].waiter, other, "the members take turns");
    // `long` waits past its deadline (1 ms + 2 × 600 s); `m`'s short build arriving then
    // waits behind it.
    let now = 1_300_000;
    let late = queued(s.wait(t(now), &req(x86, "m", &drv(4, "short-1.3")), None));
    assert!(s.take_handouts().is_empty());
    s.release(t(now + 1), &h[0].grant.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    assert_eq!(s.take_handouts()[0].waiter, long);
    assert!(s.wait_status(t(now + 1), late).is_some());
    assert!(s.audit.is_empty(), "{:?}", s.audit);
}

/// Within a member, the build expected to be shortest (learned from earlier releases of
/// the same derivation name) goes first.
#[test]
fn shortest_expected_build_first_within_a_member() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    for (drv, ms) in [
        ("0123456789abcdfghijklmnpqrsvwxyz-long", 600_000),
        ("0123456789abcdfghijklmnpqrsvwxyz-short", 5_000),
    ] {
        let g = wait_granted(s.wait(t(0), &req("x86_64-linux", "m", drv), None));
        s.release(t(ms), &g.lease_id, BuildOutcome::Succeeded)
            .unwrap();
        s.connect(t(ms), spec("a", &["x86_64-linux"], 1));
        s.durations.learn("unused", Duration::ZERO);
    }
    let now = 700_000;
    s.connect(t(now), spec("a", &["x86_64-linux"], 1));
    let busy = wait_granted(s.wait(t(now), &req("x86_64-linux", "x", "busy"), None));
    queued(s.wait(
        t(now),
        &req("x86_64-linux", "m", "9999999999abcdfghijklmnpqrsvwxyz-long"),
        None,
    ));
    let short = queued(s.wait(
        t(now + 1),
        &req(
            "x86_64-linux",
            "m",
            "8888888888abcdfghijklmnpqrsvwxyz-short",
        ),
        None,
    ));
    s.release(t(now + 2), &busy.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    assert_eq!(s.take_handouts()[0].waiter, short);
}

/// The last slot rule: a plain build first in fair order does not get the last slot of the
/// only `kvm` host while a `kvm` build waits; it gets the next plain slot instead.
#[test]
fn a_plain_build_leaves_the_last_kvm_slot_to_a_waiting_kvm_build() {
    let mut s = sched();
    s.connect(t(0), spec("plain", &["x86_64-linux"], 1));
    let mut kvm = spec("kvm", &["x86_64-linux"], 1);
    kvm.supported_features = features(&["kvm"]);
    s.connect(t(0), kvm);
    let g1 = wait_granted(s.wait(t(1), &req("x86_64-linux", "busy", "b1"), None));
    let g2 = wait_granted(s.wait(t(1), &req("x86_64-linux", "busy", "b2"), None));
    let (on_kvm, on_plain) = if g1.host.id.as_str() == "kvm" {
        (g1, g2)
    } else {
        (g2, g1)
    };
    // `alice` (plain) arrives before `bob` (kvm), so she is first in fair order.
    let plain = queued(s.wait(t(2), &req("x86_64-linux", "alice", "plain"), None));
    let mut r = req("x86_64-linux", "bob", "vm-test");
    r.required_features = features(&["kvm"]);
    let vm = queued(s.wait(t(3), &r, None));
    s.release(t(4), &on_kvm.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    let h = s.take_handouts();
    assert_eq!((h[0].waiter, h[0].grant.host.id.as_str()), (vm, "kvm"));
    s.release(t(5), &on_plain.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    assert_eq!(s.take_handouts()[0].waiter, plain);
    assert!(s.audit.is_empty(), "{:?}", s.audit);
}

/// The last slot rule in the choose stage too: a new plain request is not placed on the
/// last slot of the kvm host while a kvm waiter that could use it waits (here because the
/// kvm waiter excluded nothing but its member was at quota until now).
#[test]
fn a_new_plain_request_skips_a_protected_last_slot() {
    let mut s = sched();
    let mut kvm = spec("kvm", &["x86_64-linux"], 1);
    kvm.supported_features = features(&["kvm"]);
    s.connect(t(0), spec("plain", &["x86_64-linux"], 1));
    s.connect(t(0), kvm);
    // A kvm waiter exists while the kvm slot is busy; the plain host is busy as well.
    let mut q = Quotas::default();
    q.members.insert(
        ClientId::new("bob"),
        MemberQuota {
            max_slots: Some(0),
            priority: 0,
        },
    );
    s.set_quotas(t(0), q);
    let mut r = req("x86_64-linux", "bob", "vm-test");
    r.required_features = features(&["kvm"]);
    queued(s.wait(t(1), &r, None));
    // Bob at quota: his waiter does not protect anything, a plain request may take kvm.
    let g = wait_granted(s.wait(t(2), &req("x86_64-linux", "alice", "a"), None));
    let g2 = wait_granted(s.wait(t(2), &req("x86_64-linux", "alice", "b"), None));
    assert_ne!(g.host.id, g2.host.id);
    // Bob's quota is lifted: with every slot busy nothing is handed out yet.
    s.set_quotas(t(3), Quotas::default());
    assert!(s.take_handouts().is_empty());
    let plain_lease = if g.host.id.as_str() == "plain" {
        &g
    } else {
        &g2
    };
    let kvm_lease = if g.host.id.as_str() == "kvm" { &g } else { &g2 };
    s.release(t(4), &kvm_lease.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    assert_eq!(s.take_handouts()[0].grant.host.id.as_str(), "kvm");
    s.release(t(5), &plain_lease.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    // Now nothing waits: a plain request takes the plain host.
    let g3 = wait_granted(s.wait(t(6), &req("x86_64-linux", "alice", "c"), None));
    assert_eq!(g3.host.id.as_str(), "plain");
}

/// The cap on a member's waiting requests: past `max_waiting_per_member` the capped entry
/// points refuse a request that would wait (streams and pollers counted together) and do
/// not queue it; a poller repeating a waiting request, a request that is granted, one that
/// declines and another member are not refused; a served waiter frees room; the uncapped
/// entry points (the simulator's) never refuse.
#[test]
fn a_members_waiting_requests_are_capped() {
    let mut cfg = started();
    cfg.max_waiting_per_member = 2;
    let mut s = Scheduler::new(cfg, PolicyKind::LeastLoaded.build(), 1);
    s.connect(t(0), spec("x", &["x86_64-linux"], 1));
    let first = granted(
        s.acquire_capped(t(1), &req("x86_64-linux", "m", "a"))
            .unwrap(),
    );
    assert!(matches!(
        s.acquire_capped(t(1), &req("x86_64-linux", "m", "p")),
        Ok(Decision::Postpone { .. })
    ));
    assert!(matches!(
        s.wait_capped(t(1), &req("x86_64-linux", "m", "w"), None),
        Ok(WaitAnswer::Queued { .. })
    ));
    assert_eq!(s.waiting_of(&ClientId::new("m")), 2);
    let over = Error::TooManyWaiting {
        member: "m".into(),
        limit: 2,
    };
    assert_eq!(
        s.wait_capped(t(2), &req("x86_64-linux", "m", "w2"), None),
        Err(over.clone())
    );
    assert_eq!(
        s.acquire_capped(t(2), &req("x86_64-linux", "m", "p2")),
        Err(over)
    );
    assert_eq!(s.waiting_of(&ClientId::new("m")), 2, "nothing was queued");
    // The poller asking again keeps its place; one that may build locally declines.
    assert!(matches!(
        s.acquire_capped(t(3), &req("x86_64-linux", "m", "p")),
        Ok(Decision::Postpone { .. })
    ));
    let local = LeaseRequest {
        can_build_locally: true,
        ..req("x86_64-linux", "m", "l")
    };
    assert!(matches!(
        s.acquire_capped(t(3), &local),
        Ok(Decision::Decline { .. })
    ));
    // The slot frees: the first waiter is served, so `m` may queue one more.
    s.release(t(4), &first.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    assert_eq!(s.waiting_of(&ClientId::new("m")), 1);
    assert!(
        s.wait_capped(t(5), &req("x86_64-linux", "m", "w2"), None)
            .is_ok()
    );
    // Uncapped: the simulator's entry point queues past the cap.
    assert!(matches!(
        s.wait(t(6), &req("x86_64-linux", "m", "w3"), None),
        WaitAnswer::Queued { .. }
    ));
    assert_eq!(s.waiting_of(&ClientId::new("m")), 3);
    // Another member is not affected.
    assert!(matches!(
        s.wait_capped(t(7), &req("x86_64-linux", "n", "w"), None),
        Ok(WaitAnswer::Queued { .. })
    ));
}

/// Member and system quotas refuse at the limit with a reason naming it; an operator
/// raising the quota hands out the waiting builds at once.
#[test]
fn quotas_cap_members_and_systems_and_change_at_run_time() {
    let mut cfg = started();
    cfg.quotas.default_member_max_slots = Some(1);
    cfg.quotas.systems.insert(System::new("aarch64-linux"), 1);
    let mut s = Scheduler::new(cfg, PolicyKind::LeastLoaded.build(), 1);
    s.connect(t(0), spec("x", &["x86_64-linux"], 4));
    s.connect(t(0), spec("arm", &["aarch64-linux"], 4));
    wait_granted(s.wait(t(1), &req("x86_64-linux", "m", "a"), None));
    match s.wait(t(1), &req("x86_64-linux", "m", "b"), None) {
        WaitAnswer::Queued { reason, .. } => assert!(reason.contains("quota of 1"), "{reason}"),
        other => panic!("{other:?}"),
    }
    wait_granted(s.wait(t(1), &req("aarch64-linux", "n", "c"), None));
    match s.acquire(t(1), &req("aarch64-linux", "o", "d")) {
        Decision::Postpone { reason, .. } => {
            assert!(reason.contains("aarch64-linux builds hold"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let mut q = s.quotas().clone();
    q.default_member_max_slots = Some(2);
    s.set_quotas(t(2), q);
    assert_eq!(s.take_handouts().len(), 1);
    let m = s
        .members()
        .into_iter()
        .find(|v| v.member.as_str() == "m")
        .unwrap();
    assert_eq!((m.running, m.max_slots), (2, Some(2)));
}

/// A poller's turn comes while it is not asking: its grant is held and given when it asks
/// again; a poller that does not come back within the claim TTL loses it to the next one.
#[test]
fn pollers_share_the_queue_and_their_grants_are_held() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    let g = granted(s.acquire(t(0), &req("x86_64-linux", "x", "busy")));
    assert!(matches!(
        s.acquire(t(1), &req("x86_64-linux", "p", "one")),
        Decision::Postpone { position: 1, .. }
    ));
    let stream = queued(s.wait(t(2), &req("x86_64-linux", "q", "two"), None));
    s.release(t(3), &g.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    // The poller was first: nothing for the stream yet, the slot is held for the poller.
    assert!(s.take_handouts().is_empty());
    assert_eq!(s.lease_count(), 1);
    let mine = granted(s.acquire(t(4), &req("x86_64-linux", "p", "one")));
    assert_eq!(mine.ttl, CoreConfig::default().lease_ttl);
    s.release(t(5), &mine.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    assert_eq!(s.take_handouts()[0].waiter, stream);

    // A poller that never comes back: its held grant expires after the claim TTL.
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    let g = granted(s.acquire(t(0), &req("x86_64-linux", "x", "busy")));
    assert!(matches!(
        s.acquire(t(1), &req("x86_64-linux", "p", "gone")),
        Decision::Postpone { .. }
    ));
    let stream = queued(s.wait(t(2), &req("x86_64-linux", "q", "two"), None));
    s.release(t(3), &g.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    assert!(s.take_handouts().is_empty());
    s.connect(t(10_000), spec("a", &["x86_64-linux"], 1));
    s.expire(t(13_001));
    assert_eq!(s.take_handouts()[0].waiter, stream);
}

/// A waiter whose stream broke never gets a slot; a grant made to it but not delivered goes
/// back and on to the next waiter.
#[test]
fn dropped_waiters_never_hold_a_slot() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    let g = wait_granted(s.wait(t(0), &req("x86_64-linux", "x", "busy"), None));
    let gone = queued(s.wait(t(1), &req("x86_64-linux", "a", "one"), None));
    let late = queued(s.wait(t(2), &req("x86_64-linux", "b", "two"), None));
    let next = queued(s.wait(t(3), &req("x86_64-linux", "c", "three"), None));
    assert!(s.cancel_wait(t(4), gone));
    s.release(t(5), &g.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    // `late` got it, but its stream broke before the service delivered it.
    assert!(s.cancel_wait(t(6), late));
    let h = s.take_handouts();
    assert_eq!(h.iter().map(|h| h.waiter).collect::<Vec<_>>(), vec![next]);
    assert_eq!(s.lease_count(), 1);
    // The service may also find the stream gone only when pushing: the grant goes back.
    s.return_grant(t(7), &h[0].grant.lease_id);
    assert_eq!(s.lease_count(), 0);
    assert!(!s.cancel_wait(t(8), gone));
    // A returned grant is no build: nothing is counted in the member's usage.
    assert!(s.members().iter().all(|m| m.usage.builds <= 1));
}

/// A pinned waiter (a builder-side gate) waits for its own host even when others are free.
#[test]
fn a_pinned_waiter_waits_for_its_host() {
    let mut s = sched();
    s.connect(t(0), spec("gate", &["x86_64-linux"], 1));
    s.connect(t(0), spec("other", &["x86_64-linux"], 4));
    let pin = HostId::new("gate");
    let g = wait_granted(s.wait(t(1), &req("x86_64-linux", "m", "one"), Some(&pin)));
    assert_eq!(g.host.id, pin);
    let w = queued(s.wait(t(2), &req("x86_64-linux", "m", "two"), Some(&pin)));
    // A plain build does not take the gate host's last slot from the pinned waiter...
    let plain = wait_granted(s.wait(t(3), &req("x86_64-linux", "n", "three"), None));
    assert_eq!(plain.host.id.as_str(), "other");
    s.release(t(4), &g.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    let h = s.take_handouts();
    assert_eq!((h[0].waiter, &h[0].grant.host.id), (w, &pin));
    // ...and a pin to an unknown host is declined once the start-up window is over.
    let late = t(31_000);
    s.connect(late, spec("other", &["x86_64-linux"], 4));
    assert!(matches!(
        s.wait(
            late,
            &req("x86_64-linux", "m", "four"),
            Some(&HostId::new("nope"))
        ),
        WaitAnswer::DeclinePermanently { .. }
    ));
}

/// Right after a start nothing is declined permanently (agents have not registered yet):
/// the request waits; no slot is handed out during the startup hold (leases from before a
/// restart re-attach meanwhile), nor on a host before its first report (which shows what
/// still runs there); then it is served.
#[test]
fn waiters_survive_the_start_up_window() {
    let cfg = CoreConfig {
        startup_hold: Duration::from_secs(3),
        ..CoreConfig::default()
    };
    let mut s = Scheduler::new(cfg, PolicyKind::LeastLoaded.build(), 1);
    let w = queued(s.wait(t(100), &req("x86_64-linux", "m", "one"), None));
    let g = s.connect(t(2_000), spec("a", &["x86_64-linux"], 1));
    s.report(t(2_001), &HostId::new("a"), g, HostReport::default())
        .unwrap();
    assert!(s.take_handouts().is_empty(), "held");
    let g2 = s.connect(t(3_500), spec("b", &["x86_64-linux"], 1));
    s.dispatch(t(3_500));
    let h = s.take_handouts();
    assert_eq!((h[0].waiter, h[0].grant.host.id.as_str()), (w, "a"));
    // `b` has not reported: a waiter for it stays queued.
    let w2 = queued(s.wait(t(3_600), &req("x86_64-linux", "m", "two"), None));
    s.dispatch(t(3_700));
    assert!(s.take_handouts().is_empty());
    s.report(t(3_800), &HostId::new("b"), g2, HostReport::default())
        .unwrap();
    assert_eq!(s.take_handouts()[0].waiter, w2);
    assert!(matches!(
        s.wait(t(40_000), &req("riscv64-linux", "m", "two"), None),
        WaitAnswer::DeclinePermanently { .. }
    ));
    let mut local = req("x86_64-linux", "m", "three");
    local.can_build_locally = true;
    assert!(matches!(
        s.wait(t(40_000), &local, None),
        WaitAnswer::Decline { .. }
    ));
}

/// Positions and estimates: the second waiter of the same class stands second, and its
/// estimate is its position times the mean duration over the slots.
#[test]
fn waiters_learn_their_position_and_an_estimate() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 2));
    wait_granted(s.wait(t(0), &req("x86_64-linux", "x", "b1"), None));
    wait_granted(s.wait(t(0), &req("x86_64-linux", "x", "b2"), None));
    let w1 = queued(s.wait(t(1), &req("x86_64-linux", "m", "one"), None));
    let w2 = queued(s.wait(t(1), &req("x86_64-linux", "n", "two"), None));
    assert_eq!(s.wait_status(t(2), w1).unwrap().position, 1);
    let st = s.wait_status(t(2), w2).unwrap();
    assert_eq!(st.position, 2);
    // Mean 60 s (nothing learned yet) × 2 / 2 slots.
    assert_eq!(st.estimate, Duration::from_secs(60));
    assert!(s.cancel_wait(t(3), w1));
    assert_eq!(s.wait_status(t(3), w1), None);
}

/// After a restart, a holder's keep-alive re-attaches its lease: it counts against the host
/// and its member at once, so the host is not over-committed; an id that ended in this run
/// is not revived.
#[test]
fn leases_re_attach_after_a_restart() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    let old = LeaseId::new("0123456789abcdef0123456789abcdef");
    let (h, c, sys) = (
        HostId::new("a"),
        ClientId::new("m"),
        System::new("x86_64-linux"),
    );
    assert!(s.keep_alive(t(1), &old).is_err());
    s.reattach(t(1), &old, &h, &c, &sys, "/nix/store/x.drv")
        .unwrap();
    assert_eq!(s.host(t(1), &h).unwrap().leases, 1);
    queued(s.wait(t(2), &req("x86_64-linux", "n", "new"), None));
    s.keep_alive(t(3), &old).unwrap();
    s.release(t(4), &old, BuildOutcome::Succeeded).unwrap();
    assert_eq!(s.take_handouts().len(), 1);
    assert!(matches!(
        s.reattach(t(5), &old, &h, &c, &sys, "/nix/store/x.drv"),
        Err(Error::UnknownLease { .. })
    ));
    assert!(matches!(
        s.reattach(
            t(5),
            &LeaseId::new("z-1"),
            &HostId::new("nope"),
            &c,
            &sys,
            "/nix/store/x.drv"
        ),
        Err(Error::UnknownHost { .. })
    ));
}

/// Quotas, durations and usage survive a snapshot and restore.
#[test]
fn the_queue_state_round_trips_through_a_snapshot() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    let mut q = Quotas::default();
    q.systems.insert(System::new("x86_64-linux"), 3);
    s.set_quotas(t(0), q.clone());
    let g = wait_granted(s.wait(
        t(0),
        &req(
            "x86_64-linux",
            "m",
            "0123456789abcdfghijklmnpqrsvwxyz-hello",
        ),
        None,
    ));
    let w = queued(s.wait(t(0), &req("x86_64-linux", "n", "two"), None));
    s.release(t(4_000), &g.lease_id, BuildOutcome::Succeeded)
        .unwrap();
    assert_eq!(s.take_handouts()[0].waiter, w);
    let snap = s.queue_snapshot();
    assert_eq!(snap.quotas, q);
    assert_eq!(
        snap.durations,
        vec![(
            "hello".to_owned(),
            DurationStat {
                mean_millis: 4000.0,
                samples: 1
            }
        )]
    );
    assert_eq!(
        snap.usage,
        vec![
            (
                ClientId::new("m"),
                Usage {
                    builds: 1,
                    build_millis: 4000,
                    wait_millis: 0
                }
            ),
            (
                ClientId::new("n"),
                Usage {
                    builds: 0,
                    build_millis: 0,
                    wait_millis: 4000
                }
            ),
        ]
    );
    let mut r = sched();
    r.restore_queue(snap.clone());
    assert_eq!(r.queue_snapshot(), snap);
}

/// One step of a random queue scenario.
#[derive(Clone, Debug)]
enum QOp {
    Wait { class: usize, client: u8, pin: bool },
    Poll { class: usize, client: u8 },
    Release(usize),
    Cancel(usize),
    Report { host: usize, running: Option<u32> },
    Drain(usize, bool),
    Advance(u64),
}

/// (system, features) of the random requests.
const QCLASSES: [(&str, &[&str]); 3] = [
    ("x86_64-linux", &[]),
    ("x86_64-linux", &["kvm"]),
    ("aarch64-linux", &[]),
];

fn qop() -> impl Strategy<Value = QOp> {
    prop_oneof![
        4 => (0..QCLASSES.len(), 0u8..5, proptest::bool::weighted(0.15)).prop_map(|(class, client, pin)| QOp::Wait { class, client, pin }),
        2 => (0..QCLASSES.len(), 0u8..5).prop_map(|(class, client)| QOp::Poll { class, client }),
        3 => (0usize..64).prop_map(QOp::Release),
        1 => (0usize..64).prop_map(QOp::Cancel),
        1 => (0usize..3, proptest::option::of(0u32..4)).prop_map(|(host, running)| QOp::Report { host, running }),
        1 => (0usize..3, any::<bool>()).prop_map(|(h, d)| QOp::Drain(h, d)),
        1 => (0u64..3_000).prop_map(QOp::Advance),
    ]
}

fn qfleet() -> Vec<HostSpec> {
    let mut kvm = spec("kvm", &["x86_64-linux"], 2);
    kvm.supported_features = features(&["kvm"]);
    vec![
        spec("linux", &["x86_64-linux"], 3),
        kvm,
        spec("arm", &["aarch64-linux"], 2),
    ]
}

fn qreq(class: usize, client: u8, drv: usize) -> LeaseRequest {
    let (system, fs) = QCLASSES[class];
    let mut r = req(
        system,
        &format!("m{client}"),
        &format!("{:032}-d{}", drv, drv % 7),
    );
    r.required_features = features(fs);
    r
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    /// Whatever happens to the queue: every hand-out is the brute-force oracle's choice (no
    /// grant skips a waiter ahead in fair order that could use the slot, the last slot rule
    /// aside); no member ever runs above its quota; no host above its slots; a cancelled
    /// waiter never gets a grant; and once the chaos stops and builds keep finishing, every
    /// waiter is served.
    #[test]
    fn queue_invariants(
        ops in proptest::collection::vec(qop(), 1..160),
        quota in proptest::option::of(1u32..4),
        seed in any::<u64>(),
    ) {
        let mut cfg = started();
        cfg.quotas.default_member_max_slots = quota;
        let mut s = Scheduler::new(cfg, PolicyKind::LeastLoaded.build(), seed);
        let specs = qfleet();
        let gens: Vec<Generation> = specs.iter().map(|h| s.connect(Time::ZERO, h.clone())).collect();
        let mut now = 0u64;
        let mut held: Vec<LeaseId> = Vec::new();
        let mut streams: std::collections::BTreeMap<WaiterId, usize> = Default::default();
        let mut cancelled: BTreeSet<WaiterId> = BTreeSet::new();
        let mut polls: Vec<LeaseRequest> = Vec::new();
        let take = |s: &mut Scheduler, now: u64, held: &mut Vec<LeaseId>, streams: &mut std::collections::BTreeMap<WaiterId, usize>, cancelled: &BTreeSet<WaiterId>| -> Result<(), TestCaseError> {
            for h in s.take_handouts() {
                prop_assert!(!cancelled.contains(&h.waiter), "a cancelled waiter got {:?}", h.grant.lease_id);
                prop_assert!(streams.remove(&h.waiter).is_some(), "unknown waiter {:?}", h.waiter);
                s.keep_alive(t(now), &h.grant.lease_id).unwrap();
                held.push(h.grant.lease_id);
            }
            Ok(())
        };
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                QOp::Wait { class, client, pin } => {
                    let r = qreq(class, client, i);
                    let p = pin.then(|| specs[if class == 2 { 2 } else { class }].id.clone());
                    match s.wait(t(now), &r, p.as_ref()) {
                        WaitAnswer::Granted(g) => held.push(g.lease_id),
                        WaitAnswer::Queued { waiter, .. } => { streams.insert(waiter, class); }
                        other => prop_assert!(false, "{:?}", other),
                    }
                }
                QOp::Poll { class, client } => {
                    let r = qreq(class, client, i);
                    if let Decision::Granted(g) = s.acquire(t(now), &r) { held.push(g.lease_id) } else { polls.push(r) }
                }
                QOp::Release(k) if !held.is_empty() => {
                    let id = held.remove(k % held.len());
                    let _ = s.release(t(now), &id, BuildOutcome::Succeeded);
                }
                QOp::Cancel(k) if !streams.is_empty() => {
                    let id = *streams.keys().nth(k % streams.len()).unwrap();
                    streams.remove(&id);
                    cancelled.insert(id);
                    s.cancel_wait(t(now), id);
                }
                QOp::Report { host, running } => {
                    s.report(t(now), &specs[host].id, gens[host], HostReport { running_builds: running, ..Default::default() }).unwrap();
                }
                QOp::Drain(h, d) => { s.set_draining(&specs[h].id, d); s.dispatch(t(now)); }
                QOp::Advance(ms) => {
                    now += ms;
                    for l in &held { let _ = s.keep_alive(t(now), l); }
                    for (h, g) in specs.iter().zip(&gens) { s.report(t(now), &h.id, *g, HostReport::default()).unwrap(); }
                    for r in std::mem::take(&mut polls) {
                        if let Decision::Granted(g) = s.acquire(t(now), &r) { held.push(g.lease_id) } else { polls.push(r) }
                    }
                }
                _ => {}
            }
            take(&mut s, now, &mut held, &mut streams, &cancelled)?;
            prop_assert!(s.audit.is_empty(), "{:?}", s.audit);
            if let Some(q) = quota {
                for m in s.members() {
                    prop_assert!(m.running <= q, "{} runs {} above its quota {}", m.member, m.running, q);
                }
            }
            for (id, leases, slots) in s.lease_counts() {
                prop_assert!(leases <= slots, "{} has {} leases for {} slots", id, leases, slots);
            }
        }
        // Calm: every host open and honest, builds finish one by one; every stream waiter
        // must be served (each class has a host, every quota is at least 1).
        for (i, h) in specs.iter().enumerate() {
            s.set_draining(&h.id, false);
            s.report(t(now), &h.id, gens[i], HostReport::default()).unwrap();
        }
        s.dispatch(t(now));
        take(&mut s, now, &mut held, &mut streams, &cancelled)?;
        let mut rounds = 0;
        while !streams.is_empty() {
            rounds += 1;
            prop_assert!(rounds < 1000, "waiters starve: {:?}", streams);
            now += 100;
            for (i, h) in specs.iter().enumerate() {
                s.report(t(now), &h.id, gens[i], HostReport::default()).unwrap();
            }
            // Pollers ask again: they take the grants held for them, or keep waiting.
            for r in std::mem::take(&mut polls) {
                if let Decision::Granted(g) = s.acquire(t(now), &r) { held.push(g.lease_id) } else { polls.push(r) }
            }
            prop_assert!(!held.is_empty(), "waiters {:?} but no lease to finish", streams);
            let id = held.remove(0);
            let _ = s.release(t(now), &id, BuildOutcome::Succeeded);
            for l in &held { let _ = s.keep_alive(t(now), l); }
            take(&mut s, now, &mut held, &mut streams, &cancelled)?;
            prop_assert!(s.audit.is_empty(), "{:?}", s.audit);
        }
    }
}
/// Expected durations of the aging property's builds, seconds: short, medium, long.
const AGING_SECS: [u64; 4] = [2, 20, 200, 2_000];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Aging: every waiter is served within its bound while capacity exists, however many
    /// shorter builds its member keeps sending. One member (across members fair order takes
    /// turns), one host of `slots` slots, durations known exactly
    /// and every build taking exactly its expected time (at most `D` = the longest). A
    /// waiter `W` with deadline `d` (arrival + `min(factor × expected, max_age)`) that finds
    /// `E` waiters with an earlier deadline not yet served at `d` is granted by
    /// `max(d, arrival) + ceil((E + 1) / slots) × D`: after `d` no later arrival can pass it
    /// (its deadline lies after `d`), and within each `D` every slot frees at least once.
    #[test]
    fn every_waiter_is_served_within_its_aging_bound(
        arrivals in proptest::collection::vec((0u64..20_000, 0usize..AGING_SECS.len()), 1..120),
        slots in 1u32..4,
        factor in 1u32..16,
        max_age_s in 1u64..5_000,
        seed in any::<u64>(),
    ) {
        let far = Duration::from_secs(1 << 30);
        let cfg = CoreConfig {
            aging_factor: factor,
            max_age: Duration::from_secs(max_age_s),
            report_interval: far,
            lease_ttl: far,
            claim_ttl: far,
            ..started()
        };
        let mut s = Scheduler::new(cfg, PolicyKind::LeastLoaded.build(), seed);
        s.restore_queue(QueueSnapshot {
            quotas: Quotas::default(),
            durations: AGING_SECS
                .iter()
                .map(|d| (format!("b{d}"), DurationStat { mean_millis: (d * 1000) as f64, samples: 1 }))
                .collect(),
            usage: Vec::new(),
        });
        s.connect(Time::ZERO, spec("h", &["x86_64-linux"], slots));
        // Arrivals a few ms apart at most, in order: (time ms, duration ms).
        let mut jobs: Vec<(u64, u64)> = Vec::new();
        let mut at = 0;
        for (gap, c) in &arrivals {
            at += gap;
            jobs.push((at, AGING_SECS[*c] * 1000));
        }
        let d_max = jobs.iter().map(|j| j.1).max().unwrap();
        let deadline = |j: usize| jobs[j].0 + (jobs[j].1 * u64::from(factor)).min(max_age_s * 1000);
        let drv = |j: usize| format!("{j:032}-b{}", jobs[j].1 / 1000);
        let mut granted: Vec<Option<u64>> = vec![None; jobs.len()];
        let mut by_waiter: std::collections::HashMap<WaiterId, usize> = Default::default();
        // Running builds: (finish ms, job, lease).
        let mut running: Vec<(u64, usize, LeaseId)> = Vec::new();
        let mut next = 0;
        while next < jobs.len() || !running.is_empty() {
            let finish = running.iter().map(|r| r.0).min();
            let arrive = jobs.get(next).map(|j| j.0);
            // Completions before arrivals at the same instant.
            let now = match (finish, arrive) {
                (Some(f), Some(a)) if f <= a => f,
                (Some(f), None) => f,
                (_, Some(a)) => a,
                (None, None) => unreachable!(),
            };
            if finish == Some(now) {
                let i = running.iter().position(|r| r.0 == now).unwrap();
                let (_, _, lease) = running.swap_remove(i);
                s.release(t(now), &lease, BuildOutcome::Succeeded).unwrap();
            } else {
                let j = next;
                next += 1;
                match s.wait(t(now), &req("x86_64-linux", "m", &drv(j)), None) {
                    WaitAnswer::Granted(g) => {
                        granted[j] = Some(now);
                        running.push((now + jobs[j].1, j, g.lease_id));
                    }
                    WaitAnswer::Queued { waiter, .. } => { by_waiter.insert(waiter, j); }
                    other => prop_assert!(false, "{:?}", other),
                }
            }
            for h in s.take_handouts() {
                let j = by_waiter.remove(&h.waiter).expect("a known waiter");
                granted[j] = Some(now);
                running.push((now + jobs[j].1, j, h.grant.lease_id));
            }
            prop_assert!(s.audit.is_empty(), "{:?}", s.audit);
        }
        for w in 0..jobs.len() {
            let g = granted[w];
            prop_assert!(g.is_some(), "build {} was never served", w);
            let d = deadline(w);
            let earlier = (0..jobs.len())
                .filter(|&x| x != w && (deadline(x), x) < (d, w) && granted[x].is_none_or(|gx| gx > d))
                .count() as u64;
            let bound = d.max(jobs[w].0) + (earlier + 1).div_ceil(u64::from(slots)) * d_max;
            prop_assert!(
                g.unwrap() <= bound,
                "build {} (arrived {}, {} ms, deadline {}) granted at {}, past its bound {} ({} ahead at its deadline)",
                w, jobs[w].0, jobs[w].1, d, g.unwrap(), bound, earlier
            );
        }
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
    Probe(usize, bool),
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
        1 => (0usize..8, any::<bool>()).prop_map(|(h, ok)| IndexOp::Probe(h, ok)),
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
        let cfg = CoreConfig { probe: probing(), ..CoreConfig::default() };
        let mut s = Scheduler::new(cfg, PolicyKind::LeastLoaded.build(), seed);
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
                IndexOp::Probe(h, ok) => {
                    let verdict = if ok { ProbeVerdict::Ok } else { probe_failed(ProbeFailure::Connect) };
                    s.probe_result(t(now), &target(&specs[h]), verdict);
                }
                _ => {}
            }
            prop_assert!(s.expiry_entries() <= s.lease_count());
            prop_assert!(s.ledger.attachable_entries() <= s.lease_count());
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

/// Probes on, a breaker that opens at the first failure.
fn probing() -> ProbePolicy {
    ProbePolicy {
        enabled: true,
        failures_to_open: 1,
        ..ProbePolicy::default()
    }
}

fn probe_failed(kind: ProbeFailure) -> ProbeVerdict {
    ProbeVerdict::Failed {
        kind,
        detail: "connection refused".into(),
    }
}

fn target(h: &HostSpec) -> ProbeTarget {
    ProbeTarget {
        id: h.id.clone(),
        store_uri: h.store_uri.clone(),
        public_key: h.public_key.clone(),
    }
}

/// A host whose probe failed gets no lease, whoever asks and however many ask, and
/// `ExplainPlacement`, the host list and the refusal cause say why; a successful probe brings
/// it back.
#[test]
fn failed_probe_takes_host_out_until_it_answers() {
    let cfg = CoreConfig {
        probe: probing(),
        ..CoreConfig::default()
    };
    let mut s = Scheduler::new(cfg, PolicyKind::LeastLoaded.build(), 1);
    let dead = spec("dead", &["x86_64-linux"], 8);
    s.connect(t(0), dead.clone());
    s.connect(t(0), spec("live", &["x86_64-linux"], 2));
    s.probe_result(t(10), &target(&dead), probe_failed(ProbeFailure::Connect));
    for i in 0..2 {
        let g = granted(s.acquire(
            t(20),
            &req("x86_64-linux", &format!("c{i}"), &format!("d{i}")),
        ));
        assert_eq!(g.host.id.as_str(), "live");
    }
    assert!(matches!(
        s.acquire(t(20), &req("x86_64-linux", "c9", "d9")),
        Decision::Postpone { .. }
    ));
    let e = s.explain(t(20), &System::new("x86_64-linux"), &BTreeSet::new());
    let why = e.verdicts[0].result.clone().unwrap_err();
    assert!(
        why.contains("SSH probe failed (connect: connection refused)"),
        "{why}"
    );
    // One host's reason: the live one is full, the dead one out.
    assert!(
        ["no_slot", "probe_failed"].contains(&s.refusal_cause()),
        "{}",
        s.refusal_cause()
    );
    assert!(matches!(
        s.acquire(t(20), &req("riscv64-linux", "c9", "r")),
        Decision::DeclinePermanently { .. }
    ));
    assert_eq!(s.refusal_cause(), "no_builder");
    let view = s.host(t(20), &dead.id).unwrap();
    assert_eq!(view.probe, Breaker::Open);
    assert!(
        view.unavailable_reason
            .unwrap()
            .contains("SSH probe failed")
    );
    assert_eq!(
        s.probe_result(t(30), &target(&dead), ProbeVerdict::Ok),
        Some(BreakerChange::Closed)
    );
    let g = granted(s.acquire(t(40), &req("x86_64-linux", "c9", "d9")));
    assert_eq!(g.host.id.as_str(), "dead");
}

/// A host is due for a probe when it connects, again after the interval when healthy and
/// after the back-off when not; disconnected hosts are not probed, and a verdict about a key
/// the host no longer registers is dropped.
#[test]
fn probes_are_scheduled_by_connect_interval_and_backoff() {
    let policy = probing();
    let cfg = CoreConfig {
        probe: policy.clone(),
        ..CoreConfig::default()
    };
    let mut s = Scheduler::new(cfg, PolicyKind::LeastLoaded.build(), 1);
    let h = spec("a", &["x86_64-linux"], 1);
    let g = s.connect(t(0), h.clone());
    let due = s.probes_due(t(0), 10);
    assert_eq!(due, vec![target(&h)]);
    assert!(
        s.probes_due(t(0), 10).is_empty(),
        "a running probe is not due again"
    );
    s.probe_result(t(5), &due[0], ProbeVerdict::Ok);
    let interval = policy.interval.as_millis() as u64;
    assert!(s.probes_due(t(5 + interval - 1), 10).is_empty());
    let due = s.probes_due(t(5 + interval), 10);
    assert_eq!(due.len(), 1);
    let failed_at = 5 + interval;
    s.probe_result(t(failed_at), &due[0], probe_failed(ProbeFailure::Timeout));
    let backoff = policy.backoff_initial.as_millis() as u64;
    assert!(s.probes_due(t(failed_at + backoff - 1), 10).is_empty());
    assert_eq!(
        s.host(t(failed_at + backoff), &h.id).unwrap().probe,
        Breaker::HalfOpen
    );
    s.disconnect(t(failed_at + 1), &h.id, g);
    assert!(s.probes_due(t(failed_at + backoff), 10).is_empty());
    // The host comes back with another key: the old breaker says nothing about it.
    let mut rekeyed = h.clone();
    rekeyed.public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther".into();
    s.connect(t(failed_at + backoff + 1), rekeyed.clone());
    assert_eq!(
        s.host(t(failed_at + backoff + 1), &h.id).unwrap().probe,
        Breaker::Closed
    );
    assert_eq!(
        s.probe_result(
            t(failed_at + backoff + 2),
            &target(&h),
            probe_failed(ProbeFailure::HostKey)
        ),
        None
    );
    assert_eq!(
        s.probes_due(t(failed_at + backoff + 2), 10),
        vec![target(&rekeyed)]
    );
}

/// With probes off (the default) nothing is ever due and breakers stay closed.
#[test]
fn probes_off_schedule_nothing() {
    let mut s = sched();
    s.connect(t(0), spec("a", &["x86_64-linux"], 1));
    assert!(s.probes_due(t(1_000_000), 10).is_empty());
}
