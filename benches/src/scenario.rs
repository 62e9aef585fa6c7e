//! The built-in scenarios, generated from a seed into the trace and fleet formats of
//! [`crate::trace`] (write them out with `simulate --emit DIR` and replay or edit them).
//!
//! - **community**: the nix-community builders as they are (`build01` x86_64-linux with 6
//!   slots, `aarch64-build-box` with 20, `darwin01` serving aarch64-darwin and x86_64-darwin
//!   from 2 slots), Hydra/buildbot load on the Linux boxes from outside the scheduler, ~30
//!   members submitting a few builds each over three hours, and one member starting a mass
//!   rebuild (a dependency graph of 600 builds) 15 minutes in.
//! - **large**: 120 heterogeneous hosts (slots 2 to 32, speeds 0.5 to 2.0, a 4x spread), 60
//!   clients, a 12,000-build mass rebuild, outside load on a fifth of the hosts.
//!
//! Durations are heavy-tailed: a lognormal body (median 40 s, most builds seconds to minutes)
//! plus 1 % of builds taking one to three hours; `kvm` builds (NixOS tests) take longer.

use nixdispatch_scheduler::core::SplitMix64;

use crate::trace::{Fleet, FleetHost, Trace, TraceJob};

/// A named scenario: its fleet and trace.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Name, as given to `--scenario`.
    pub name: String,
    /// One line for the report.
    pub description: String,
    /// The builders.
    pub fleet: Fleet,
    /// The workload.
    pub trace: Trace,
}

/// The names of the built-in scenarios.
pub const BUILT_IN: [&str; 2] = ["community", "large"];

/// Generates the built-in scenario `name` from `seed`.
pub fn built_in(name: &str, seed: u64) -> anyhow::Result<Scenario> {
    match name {
        "community" => Ok(community(seed)),
        "large" => Ok(large(seed)),
        "fairness" => Ok(fairness(seed, true)),
        "fairness-baseline" => Ok(fairness(seed, false)),
        other => anyhow::bail!(
            "unknown scenario `{other}`, expected one of {}",
            BUILT_IN.join(", ")
        ),
    }
}

/// A standard normal deviate (Box-Muller).
fn normal(rng: &mut SplitMix64) -> f64 {
    let u1 = rng.unit().max(1e-12);
    let u2 = rng.unit();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// An exponential deviate with the given mean.
fn exponential(rng: &mut SplitMix64, mean: f64) -> f64 {
    -mean * (1.0 - rng.unit()).max(1e-12).ln()
}

/// A heavy-tailed build duration, seconds at speed 1.
fn duration(rng: &mut SplitMix64, features: &[String]) -> f64 {
    if rng.unit() < 0.01 {
        return 3600.0 + rng.unit() * 7200.0;
    }
    let median = if features.iter().any(|f| f == "kvm") {
        240.0
    } else {
        40.0
    };
    (median * (1.3 * normal(rng)).exp()).clamp(2.0, 3.0 * 3600.0)
}

fn pick<'a>(rng: &mut SplitMix64, weighted: &'a [(&'a str, f64)]) -> &'a str {
    let total: f64 = weighted.iter().map(|w| w.1).sum();
    let mut x = rng.unit() * total;
    for (name, w) in weighted {
        if x < *w {
            return name;
        }
        x -= w;
    }
    weighted[weighted.len() - 1].0
}

fn features_for(rng: &mut SplitMix64, system: &str) -> Vec<String> {
    let mut f = Vec::new();
    let linux = system.ends_with("-linux");
    let x = rng.unit();
    if linux && x < 0.05 {
        f.push("kvm".to_string());
        f.push("nixos-test".to_string());
    } else if x < 0.08 {
        f.push("big-parallel".to_string());
    }
    f
}

fn strings(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

/// Members submitting a few builds each: `sessions` Poisson arrivals over `window_s`, each a
/// short chain or fan of 1 to 8 builds.
fn background(
    rng: &mut SplitMix64,
    jobs: &mut Vec<TraceJob>,
    clients: usize,
    sessions: usize,
    window_s: f64,
    systems: &[(&str, f64)],
) {
    let mut t = 0.0;
    let gap = window_s / sessions as f64;
    for s in 0..sessions {
        t += exponential(rng, gap);
        let client = format!("member{:02}", rng.below(clients as u64));
        let system = pick(rng, systems);
        let n = 1 + rng.below(8) as usize;
        let first = jobs.len();
        for k in 0..n {
            let features = features_for(rng, system);
            // The last build of a session depends on the others (a closure with its deps).
            let deps = if k + 1 == n && n > 1 {
                (first..first + k).map(|d| jobs[d].id.clone()).collect()
            } else {
                Vec::new()
            };
            jobs.push(TraceJob {
                id: format!("s{s}-{k}"),
                arrival_s: round_ms(t),
                client: client.clone(),
                system: system.to_string(),
                duration_s: round_ms(duration(rng, &features)),
                features,
                deps,
                host: None,
            });
        }
    }
}

/// A mass rebuild: `n` builds submitted at once in `layers` layers, each build depending on
/// up to three builds of earlier layers (like a staging rebuild of nixpkgs).
fn mass_rebuild(
    rng: &mut SplitMix64,
    jobs: &mut Vec<TraceJob>,
    client: &str,
    at_s: f64,
    n: usize,
    systems: &[(&str, f64)],
) {
    let layers = 6;
    let first = jobs.len();
    for k in 0..n {
        let layer = k * layers / n;
        let layer_start = first + layer * n / layers;
        let system = pick(rng, systems);
        let features = features_for(rng, system);
        let mut deps = Vec::new();
        if layer > 0 {
            for _ in 0..1 + rng.below(3) {
                let d = first + rng.below((layer_start - first) as u64) as usize;
                let id = jobs[d].id.clone();
                if !deps.contains(&id) {
                    deps.push(id);
                }
            }
        }
        jobs.push(TraceJob {
            id: format!("mass-{k}"),
            arrival_s: at_s,
            client: client.to_string(),
            system: system.to_string(),
            duration_s: round_ms(duration(rng, &features)),
            features,
            deps,
            host: None,
        });
    }
}

/// Builds that bypass the scheduler on `host`: Poisson arrivals keeping about `concurrency`
/// builds running on average over `window_s`.
fn outside_load(
    rng: &mut SplitMix64,
    jobs: &mut Vec<TraceJob>,
    host: &FleetHost,
    concurrency: f64,
    window_s: f64,
) {
    let mean_duration = 300.0;
    let gap = mean_duration / concurrency;
    let mut t = exponential(rng, gap);
    let mut k = 0;
    while t < window_s {
        jobs.push(TraceJob {
            id: format!("ci-{}-{k}", host.id),
            arrival_s: round_ms(t),
            client: String::new(),
            system: host.systems[0].clone(),
            features: Vec::new(),
            duration_s: round_ms(exponential(rng, mean_duration).max(5.0)),
            deps: Vec::new(),
            host: Some(host.id.clone()),
        });
        k += 1;
        t += exponential(rng, gap);
    }
}

fn round_ms(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

/// Sorts by arrival while keeping every dependency on an earlier line.
fn finish(mut jobs: Vec<TraceJob>) -> Trace {
    // Generated dependencies never point to a later arrival, so a stable sort by arrival
    // keeps the order within a session or a mass rebuild.
    jobs.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    Trace::from_jobs(jobs).expect("generated traces are valid")
}

/// The community model.
pub fn community(seed: u64) -> Scenario {
    let fleet = Fleet {
        hosts: vec![
            FleetHost {
                id: "build01".into(),
                systems: strings(&["x86_64-linux"]),
                features: strings(&["kvm", "nixos-test", "big-parallel", "benchmark"]),
                mandatory_features: vec![],
                slots: 6,
                speed: 1.0,
                cpus: 24,
            },
            FleetHost {
                id: "aarch64-build-box".into(),
                systems: strings(&["aarch64-linux"]),
                features: strings(&["kvm", "nixos-test", "big-parallel"]),
                mandatory_features: vec![],
                slots: 20,
                speed: 1.0,
                cpus: 80,
            },
            FleetHost {
                id: "darwin01".into(),
                systems: strings(&["aarch64-darwin", "x86_64-darwin"]),
                features: strings(&["big-parallel"]),
                mandatory_features: vec![],
                slots: 2,
                speed: 1.5,
                cpus: 10,
            },
        ],
    };
    let mut rng = SplitMix64::new(seed);
    let mut jobs = Vec::new();
    let window = 3.0 * 3600.0;
    background(
        &mut rng,
        &mut jobs,
        30,
        90,
        window,
        &[
            ("x86_64-linux", 0.45),
            ("aarch64-linux", 0.30),
            ("aarch64-darwin", 0.15),
            ("x86_64-darwin", 0.10),
        ],
    );
    mass_rebuild(
        &mut rng,
        &mut jobs,
        "member-mass",
        900.0,
        600,
        &[("aarch64-linux", 0.75), ("x86_64-linux", 0.25)],
    );
    outside_load(&mut rng, &mut jobs, &fleet.hosts[0], 1.0, window);
    outside_load(&mut rng, &mut jobs, &fleet.hosts[1], 3.0, window);
    Scenario {
        name: "community".into(),
        description: "nix-community today: build01 (x86_64-linux, 6 slots), aarch64-build-box \
                      (20 slots), darwin01 (aarch64- and x86_64-darwin, 2 slots); 30 members \
                      submitting a few builds each over 3 h, one mass rebuild of 600 builds \
                      at 15 min, Hydra/buildbot load on the Linux boxes"
            .into(),
        fleet,
        trace: finish(jobs),
    }
}

/// Issue 10's fairness scenario: one x86_64-linux builder with 6 slots; with `flood`, one
/// member submits 500 independent builds at once; ten other members submit 5 builds each,
/// at random times over the first 30 minutes. Comparing the ten members' waits with and
/// without the flood says how much one member's mass rebuild costs everybody else. Not one
/// of the built-in report scenarios.
pub fn fairness(seed: u64, flood: bool) -> Scenario {
    let fleet = Fleet {
        hosts: vec![FleetHost {
            id: "builder".into(),
            systems: strings(&["x86_64-linux"]),
            features: vec![],
            mandatory_features: vec![],
            slots: 6,
            speed: 1.0,
            cpus: 24,
        }],
    };
    let mut rng = SplitMix64::new(seed ^ 0xfa1e);
    let mut jobs = Vec::new();
    if flood {
        for k in 0..500 {
            jobs.push(TraceJob {
                id: format!("flood-{k}"),
                arrival_s: 0.0,
                client: "flood".into(),
                system: "x86_64-linux".into(),
                features: vec![],
                duration_s: round_ms(duration(&mut rng, &[])),
                deps: vec![],
                host: None,
            });
        }
    }
    // The same draws for the others with and without the flood.
    let mut rng = SplitMix64::new(seed ^ 0x07e5);
    for m in 0..10 {
        for k in 0..5 {
            jobs.push(TraceJob {
                id: format!("m{m}-{k}"),
                arrival_s: round_ms(60.0 + rng.unit() * 1800.0),
                client: format!("member{m}"),
                system: "x86_64-linux".into(),
                features: vec![],
                duration_s: round_ms(duration(&mut rng, &[])),
                deps: vec![],
                host: None,
            });
        }
    }
    Scenario {
        name: if flood {
            "fairness"
        } else {
            "fairness-baseline"
        }
        .into(),
        description: format!(
            "one 6-slot builder; ten members submit 5 builds each over 30 min{}",
            if flood {
                ", while one member floods 500 builds at once"
            } else {
                ""
            }
        ),
        fleet,
        trace: finish(jobs),
    }
}

/// The large heterogeneous fleet.
pub fn large(seed: u64) -> Scenario {
    let mut rng = SplitMix64::new(seed ^ 0x1a29e);
    let mut hosts = Vec::new();
    for k in 0..120 {
        let (systems, features): (&[&str], &[&str]) = match k % 15 {
            0..=7 => (&["x86_64-linux"], &["kvm", "nixos-test", "big-parallel"]),
            8..=12 => (&["aarch64-linux"], &["kvm", "nixos-test", "big-parallel"]),
            _ => (&["aarch64-darwin", "x86_64-darwin"], &["big-parallel"]),
        };
        // Not every Linux host has KVM.
        let features: Vec<&str> = if k % 3 == 0 {
            features
                .iter()
                .copied()
                .filter(|f| *f == "big-parallel")
                .collect()
        } else {
            features.to_vec()
        };
        let slots = [2u32, 4, 8, 16, 32][rng.below(5) as usize];
        let speed = round_ms(0.5 + 1.5 * rng.unit());
        hosts.push(FleetHost {
            id: format!("host{k:03}"),
            systems: strings(systems),
            features: strings(&features),
            mandatory_features: vec![],
            slots,
            speed,
            cpus: slots * 2,
        });
    }
    let fleet = Fleet { hosts };
    let mut jobs = Vec::new();
    let window = 2.0 * 3600.0;
    background(
        &mut rng,
        &mut jobs,
        60,
        1500,
        window,
        &[
            ("x86_64-linux", 0.50),
            ("aarch64-linux", 0.30),
            ("aarch64-darwin", 0.12),
            ("x86_64-darwin", 0.08),
        ],
    );
    mass_rebuild(
        &mut rng,
        &mut jobs,
        "member-mass",
        600.0,
        12_000,
        &[("x86_64-linux", 0.6), ("aarch64-linux", 0.4)],
    );
    for k in (0..fleet.hosts.len()).step_by(5) {
        let c = f64::from(fleet.hosts[k].slots) * 0.5;
        outside_load(&mut rng, &mut jobs, &fleet.hosts[k], c, window);
    }
    Scenario {
        name: "large".into(),
        description: "120 hosts (64 x86_64-linux, 40 aarch64-linux, 16 darwin; slots 2-32, \
                      speeds 0.5-2.0), 60 clients submitting a few builds each over 2 h, one \
                      mass rebuild of 12,000 builds at 10 min, outside load on every fifth host"
            .into(),
        fleet,
        trace: finish(jobs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same seed generates the same scenario; a different seed a different one.
    #[test]
    fn generation_is_seeded() {
        let a = community(1);
        let b = community(1);
        let c = community(2);
        assert_eq!(a.trace.jobs, b.trace.jobs);
        assert_ne!(a.trace.jobs, c.trace.jobs);
        a.trace.check_against(&a.fleet).unwrap();
    }

    /// Generated traces survive being written out and read back.
    #[test]
    fn generated_trace_round_trips() {
        let s = community(3);
        let t = Trace::parse(&s.trace.to_jsonl()).unwrap();
        assert_eq!(t.jobs, s.trace.jobs);
        assert_eq!(Fleet::parse(&s.fleet.to_json()).unwrap(), s.fleet);
    }
}
