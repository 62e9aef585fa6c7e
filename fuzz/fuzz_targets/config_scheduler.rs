//! Fuzzes the scheduler's TOML configuration: parsing and validation must never panic, and
//! a configuration they accept must give a core that runs (a scheduler built from it takes
//! a host, grants and expires a lease).

#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use nixdispatch_scheduler::config::Config;
use nixdispatch_scheduler::core::{
    ClientId, Decision, HostId, HostSpec, LeaseRequest, Scheduler, System, Time,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::parse(text) {
        Ok(config) => config,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let core = config.core();
    assert!(!core.lease_ttl.is_zero() && !core.report_interval.is_zero());
    for v in [
        core.admission.min_free_store_percent,
        core.admission.min_free_build_dir_percent,
        core.admission.max_cpu_some_pressure,
        core.admission.max_memory_full_pressure,
        core.admission.max_io_full_pressure,
    ] {
        assert!((0.0..=100.0).contains(&v));
    }
    let ttl = core.lease_ttl;
    let mut s = Scheduler::new(
        core,
        config.placement.policy.build(),
        config.placement.seed.unwrap_or(0),
    );
    s.connect(
        Time::ZERO,
        HostSpec {
            id: HostId::new("b1"),
            store_uri: "ssh-ng://b1".into(),
            public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample".into(),
            systems: [System::new("x86_64-linux")].into(),
            supported_features: BTreeSet::new(),
            mandatory_features: BTreeSet::new(),
            max_jobs: 1,
            speed_factor: 1.0,
            cpu_count: 1,
            total_memory_bytes: 0,
            agent_version: String::new(),
        },
    );
    let req = LeaseRequest {
        system: System::new("x86_64-linux"),
        required_features: BTreeSet::new(),
        drv_path: "/nix/store/x.drv".into(),
        client: ClientId::new("c"),
        can_build_locally: false,
        exclude_hosts: BTreeSet::new(),
        pin_host: None,
    };
    let Decision::Granted(g) = s.acquire(Time::ZERO, &req) else {
        panic!("a fresh host with a free slot was not granted");
    };
    assert_eq!(g.ttl, ttl);
    let later = Time::ZERO.after(ttl);
    assert_eq!(s.expire(later), 1);
    assert_eq!(s.lease_count(), 0);
});
