//! Placement core speed: a scheduler with `n` hosts and a steady state of leases, and one
//! decision (acquire then release) as the measured unit.

use std::collections::BTreeSet;
use std::time::Duration;

use nixdispatch_scheduler::core::{
    BuildOutcome, ClientId, CoreConfig, Decision, Feature, HostId, HostReport, HostSpec,
    LeaseRequest, PolicyKind, Scheduler, System, Time,
};

/// A scheduler with `hosts` hosts (x86_64-linux and aarch64-linux alternating, 8 slots
/// each, speeds 1 to 4) that have all reported, and each about half full.
#[derive(Debug)]
pub struct CoreBench {
    /// The scheduler under test.
    pub core: Scheduler,
    /// Simulated now, ms; advanced by one per decision.
    pub now: u64,
    requests: Vec<LeaseRequest>,
    next: usize,
}

/// The systems of [`add_fleet`]'s hosts, alternating.
pub const SYSTEMS: [&str; 2] = ["x86_64-linux", "aarch64-linux"];

/// Registers `hosts` 8-slot hosts (`host00000`, ...; x86_64-linux and aarch64-linux
/// alternating, speeds 1 to 4, `big-parallel`), each reporting `running(k)` builds.
pub fn add_fleet(core: &mut Scheduler, hosts: usize, running: impl Fn(usize) -> Option<u32>) {
    for k in 0..hosts {
        let id = HostId::new(format!("host{k:05}"));
        let g = core.connect(
            Time::ZERO,
            HostSpec {
                id: id.clone(),
                store_uri: format!("ssh-ng://host{k}"),
                public_key: String::new(),
                systems: [System::new(SYSTEMS[k % 2])].into(),
                supported_features: [Feature::new("big-parallel")].into(),
                mandatory_features: BTreeSet::new(),
                max_jobs: 8,
                speed_factor: 1.0 + (k % 4) as f64,
                cpu_count: 16,
                total_memory_bytes: 0,
                agent_version: "bench".into(),
            },
        );
        core.report(
            Time::ZERO,
            &id,
            g,
            HostReport {
                running_builds: running(k),
                ..HostReport::default()
            },
        )
        .expect("a fresh host takes a report");
    }
}

impl CoreBench {
    /// Sets up `hosts` hosts under `policy`.
    pub fn new(hosts: usize, policy: PolicyKind) -> CoreBench {
        let cfg = CoreConfig {
            // Nothing goes stale during a benchmark.
            report_interval: Duration::from_secs(86_400 * 365),
            ..CoreConfig::default()
        };
        let mut core = Scheduler::new(cfg, policy.build(), 1);
        add_fleet(&mut core, hosts, |k| Some((k % 5) as u32));
        let requests = (0..64)
            .map(|i| LeaseRequest {
                system: System::new(SYSTEMS[i % 2]),
                required_features: BTreeSet::new(),
                drv_path: format!("/nix/store/{i:032}-bench.drv"),
                client: ClientId::new(format!("client{}", i % 8)),
                can_build_locally: false,
                exclude_hosts: BTreeSet::new(),
                pin_host: None,
            })
            .collect();
        let mut b = CoreBench {
            core,
            now: 1,
            requests,
            next: 0,
        };
        // Fill about half the slots with long-lived leases.
        let target = hosts * 4;
        let mut granted = 0;
        for _ in 0..target {
            if let Decision::Granted(_) = b.acquire() {
                granted += 1;
            }
        }
        debug_assert!(granted > 0);
        b
    }

    fn acquire(&mut self) -> Decision {
        let req = &self.requests[self.next % self.requests.len()];
        self.next += 1;
        self.now += 1;
        self.core.acquire(Time::from_millis(self.now), req)
    }

    /// One decision: acquire a host, release the lease at once (so the state stays the
    /// same). Returns whether it was granted.
    pub fn decide(&mut self) -> bool {
        match self.acquire() {
            Decision::Granted(g) => {
                self.core
                    .release(
                        Time::from_millis(self.now),
                        &g.lease_id,
                        BuildOutcome::Succeeded,
                    )
                    .expect("a fresh lease releases");
                true
            }
            _ => false,
        }
    }
}
