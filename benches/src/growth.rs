//! How the core's costs grow with the fleet and the queue: the figures issue-level goals
//! are stated in (a granted decision at 10,000 hosts, a postponed re-ask at the back of a
//! deep queue, one poll round of 10,000 waiters, the heap left behind by a minute at full
//! rate with no live lease). Each measurement drives the real core on simulated time and
//! times it with a monotonic clock; the `growth` binary prints and writes them.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nixdispatch_scheduler::core::{
    BuildOutcome, ClientId, CoreConfig, Decision, LeaseRequest, PolicyKind, Scheduler, System, Time,
};

use crate::corebench::SYSTEMS;

/// A least-loaded core with `hosts` reported 8-slot hosts, half of each system, speeds 1
/// to 4, and nothing going stale for a year of simulated time.
pub fn fleet(hosts: usize) -> Scheduler {
    let cfg = CoreConfig {
        report_interval: Duration::from_secs(86_400 * 365),
        // Waiters stay queued for the whole measurement.
        waiter_ttl: Duration::from_secs(86_400 * 365),
        lease_ttl: Duration::from_secs(86_400 * 365),
        ..CoreConfig::default()
    };
    let mut core = Scheduler::new(cfg, PolicyKind::LeastLoaded.build(), 1);
    crate::corebench::add_fleet(&mut core, hosts, |_| None);
    core
}

/// A request of client `c` for derivation `n` of system `SYSTEMS[system]`.
pub fn request(system: usize, c: usize, n: usize) -> LeaseRequest {
    LeaseRequest {
        system: System::new(SYSTEMS[system % 2]),
        required_features: BTreeSet::new(),
        drv_path: format!("/nix/store/{n:032}-growth.drv"),
        client: ClientId::new(format!("client{}", c % 64)),
        can_build_locally: false,
        exclude_hosts: BTreeSet::new(),
        pin_host: None,
    }
}

/// Takes every slot of `core` (with leases that never expire during the measurement).
pub fn fill(core: &mut Scheduler, hosts: usize) {
    for n in 0..hosts * 8 {
        let r = request(n, n, usize::MAX - n);
        if !matches!(core.acquire(Time::from_millis(1), &r), Decision::Granted(_)) {
            break;
        }
    }
}

/// Mean time of `f` over `iters` calls.
fn per_call(iters: u32, mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed() / iters.max(1)
}

/// One granted decision (acquire, then release of that lease) at `hosts` hosts, about half
/// full.
pub fn granted_decision(hosts: usize) -> Duration {
    let mut core = fleet(hosts);
    for n in 0..hosts * 4 {
        core.acquire(Time::from_millis(1), &request(n, n, n));
    }
    let mut n = hosts * 4;
    per_call(20_000, || {
        n += 1;
        if let Decision::Granted(g) = core.acquire(Time::from_millis(2), &request(n, n, n)) {
            core.release(Time::from_millis(2), &g.lease_id, BuildOutcome::Succeeded)
                .expect("a fresh lease releases");
        }
    })
}

/// A postponed request re-asking at the back of a queue `depth` deep, on a full fleet of 10
/// hosts (the position is counted on every re-ask).
pub fn reask_at_depth(depth: usize) -> Duration {
    let mut core = fleet(10);
    fill(&mut core, 10);
    for n in 0..depth {
        core.acquire(Time::from_millis(2), &request(0, n, n));
    }
    let last = request(0, depth - 1, depth - 1);
    per_call(2_000, || {
        let d = core.acquire(Time::from_millis(3), &last);
        debug_assert!(matches!(d, Decision::Postpone { .. }));
    })
}

/// One poll round: each of `waiters` postponed requests re-asks once, on a full fleet of
/// `hosts` hosts. Returns the core time of the whole round.
pub fn poll_round(waiters: usize, hosts: usize) -> Duration {
    let mut core = fleet(hosts);
    fill(&mut core, hosts);
    let reqs: Vec<LeaseRequest> = (0..waiters).map(|n| request(n, n, n)).collect();
    for r in &reqs {
        core.acquire(Time::from_millis(2), r);
    }
    let t = Instant::now();
    for r in &reqs {
        core.acquire(Time::from_millis(3), r);
    }
    t.elapsed()
}

/// What [`heap_without_live_leases`] measured.
#[derive(Clone, Copy, Debug)]
pub struct HeapGrowth {
    /// Live heap bytes after the fleet was set up.
    pub before: usize,
    /// Live heap bytes after the run, with no live lease.
    pub after: usize,
    /// Decisions made.
    pub decisions: u64,
}

/// `seconds` of simulated time at `rate` decisions per second on 1,000 hosts, each decision
/// an acquire, a keep-alive and a release, as a hook whose build is very short does; `heap`
/// reads the process's live heap bytes.
pub fn heap_without_live_leases(rate: u64, seconds: u64, heap: &dyn Fn() -> usize) -> HeapGrowth {
    let mut core = fleet(1_000);
    let before = heap();
    let mut decisions = 0;
    for ms in 0..seconds * 1_000 {
        let now = Time::from_millis(10 + ms);
        for i in 0..rate / 1_000 {
            let n = decisions as usize;
            if let Decision::Granted(g) = core.acquire(now, &request(n, i as usize, n)) {
                core.keep_alive(now, &g.lease_id).expect("live");
                core.release(now, &g.lease_id, BuildOutcome::Succeeded)
                    .expect("live");
            }
            decisions += 1;
        }
    }
    assert_eq!(core.lease_count(), 0);
    HeapGrowth {
        before,
        after: heap(),
        decisions,
    }
}
