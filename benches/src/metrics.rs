//! Schedule-independent figures: the lower bound on the makespan, percentiles and Jain's
//! fairness index.

use std::collections::HashMap;

use crate::trace::{Fleet, Trace};

/// The lower bound on the makespan of any schedule of a trace on a fleet, and its parts.
///
/// Every part is a valid bound on its own, so their maximum is too. Times are seconds from the
/// first scheduled arrival. Outside load (`host` set) is left out: it only makes the bound
/// looser, never invalid.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LowerBound {
    /// Total work over total capacity (`sum duration / sum slots * speed`).
    pub work_over_capacity: f64,
    /// The longest build on the fastest host that can build it.
    pub longest_job: f64,
    /// The longest chain of dependent builds, each on its fastest eligible host, starting
    /// no earlier than its arrival.
    pub longest_chain: f64,
    /// The tightest capacity bound over the groups of hosts some builds are confined to
    /// (for example the single Apple host for darwin builds), with arrival times: for every
    /// `t`, `t + work arriving at or after t / capacity of the group`.
    pub confined_capacity: f64,
}

impl LowerBound {
    /// Computes the bound.
    pub fn compute(trace: &Trace, fleet: &Fleet) -> LowerBound {
        let sched: Vec<usize> = (0..trace.jobs.len())
            .filter(|&i| trace.jobs[i].host.is_none())
            .collect();
        if sched.is_empty() {
            return LowerBound::default();
        }
        let t0 = sched
            .iter()
            .map(|&i| trace.jobs[i].arrival_s)
            .fold(f64::INFINITY, f64::min);
        let total_cap: f64 = fleet.hosts.iter().map(|h| h.capacity()).sum();
        let total_work: f64 = sched.iter().map(|&i| trace.jobs[i].duration_s).sum();

        // Eligible host sets as bitsets, one per distinct set.
        let words = fleet.hosts.len().div_ceil(64);
        let mut elig: Vec<Vec<u64>> = vec![Vec::new(); trace.jobs.len()];
        let mut max_speed = vec![0.0f64; trace.jobs.len()];
        for &i in &sched {
            let mut bits = vec![0u64; words];
            for (k, h) in fleet.hosts.iter().enumerate() {
                if h.eligible(&trace.jobs[i]) {
                    bits[k / 64] |= 1 << (k % 64);
                    max_speed[i] = max_speed[i].max(h.speed);
                }
            }
            elig[i] = bits;
        }

        let mut longest_job: f64 = 0.0;
        // Earliest finish of each build along its dependency chain (file order is a
        // topological order).
        let mut ef = vec![0.0f64; trace.jobs.len()];
        for &i in &sched {
            let j = &trace.jobs[i];
            let run = j.duration_s / max_speed[i].max(f64::MIN_POSITIVE);
            longest_job = longest_job.max(run);
            let start = trace.deps[i]
                .iter()
                .map(|&d| ef[d])
                .fold(j.arrival_s, f64::max);
            ef[i] = start + run;
        }
        let longest_chain = sched.iter().map(|&i| ef[i]).fold(0.0, f64::max) - t0;

        let mut groups: HashMap<&[u64], ()> = HashMap::new();
        for &i in &sched {
            groups.insert(&elig[i], ());
        }
        let mut confined: f64 = 0.0;
        for g in groups.keys() {
            let cap: f64 = fleet
                .hosts
                .iter()
                .enumerate()
                .filter(|(k, _)| g[k / 64] & (1 << (k % 64)) != 0)
                .map(|(_, h)| h.capacity())
                .sum();
            if cap <= 0.0 {
                continue;
            }
            // Builds confined to this group: eligible set is a subset of it.
            let mut within: Vec<(f64, f64)> = sched
                .iter()
                .filter(|&&i| elig[i].iter().zip(g.iter()).all(|(a, b)| a & !b == 0))
                .map(|&i| (trace.jobs[i].arrival_s, trace.jobs[i].duration_s))
                .collect();
            within.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut suffix = 0.0;
            for (arrival, d) in within {
                suffix += d;
                confined = confined.max(arrival - t0 + suffix / cap);
            }
        }

        LowerBound {
            work_over_capacity: total_work / total_cap,
            longest_job,
            longest_chain,
            confined_capacity: confined,
        }
    }

    /// The bound: the largest part.
    pub fn value(&self) -> f64 {
        self.work_over_capacity
            .max(self.longest_job)
            .max(self.longest_chain)
            .max(self.confined_capacity)
    }
}

/// The `p`-th percentile (0..=100) of `sorted` by the nearest-rank method; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The mean of `xs`; 0 when empty.
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// Jain's fairness index `(sum x)^2 / (n * sum x^2)`: 1 when all are equal, `1/n` when one
/// gets everything. 1 for an empty or all-zero input (nobody is treated worse).
pub fn jain(xs: &[f64]) -> f64 {
    let s: f64 = xs.iter().sum();
    let s2: f64 = xs.iter().map(|x| x * x).sum();
    if xs.is_empty() || s2 == 0.0 {
        1.0
    } else {
        s * s / (xs.len() as f64 * s2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{FleetHost, TraceJob};

    fn host(id: &str, systems: &[&str], slots: u32, speed: f64) -> FleetHost {
        FleetHost {
            id: id.into(),
            systems: systems.iter().map(|s| s.to_string()).collect(),
            features: vec![],
            mandatory_features: vec![],
            slots,
            speed,
            cpus: 0,
        }
    }

    fn job(id: &str, arrival: f64, system: &str, d: f64, deps: &[&str]) -> TraceJob {
        TraceJob {
            id: id.into(),
            arrival_s: arrival,
            client: "c".into(),
            system: system.into(),
            features: vec![],
            duration_s: d,
            deps: deps.iter().map(|s| s.to_string()).collect(),
            host: None,
        }
    }

    /// Each part of the bound is computed as defined and the bound is their maximum.
    #[test]
    fn lower_bound_parts() {
        let fleet = Fleet {
            hosts: vec![host("x", &["x86"], 4, 1.0), host("d", &["darwin"], 1, 2.0)],
        };
        // 8 x 10 s on x86 (4 slots): 20 s; darwin: 2 x 30 s at speed 2 in series: 30 s;
        // chain a -> b: 10 + 10 = 20 s.
        let mut jobs: Vec<TraceJob> = (0..8)
            .map(|i| job(&format!("x{i}"), 0.0, "x86", 10.0, &[]))
            .collect();
        jobs.push(job("d1", 0.0, "darwin", 30.0, &[]));
        jobs.push(job("d2", 0.0, "darwin", 30.0, &["d1"]));
        let t = Trace::from_jobs(jobs).unwrap();
        let lb = LowerBound::compute(&t, &fleet);
        assert!((lb.work_over_capacity - 140.0 / 6.0).abs() < 1e-9, "{lb:?}");
        assert!((lb.longest_job - 15.0).abs() < 1e-9, "{lb:?}");
        assert!((lb.longest_chain - 30.0).abs() < 1e-9, "{lb:?}");
        assert!((lb.confined_capacity - 30.0).abs() < 1e-9, "{lb:?}");
        assert!((lb.value() - 30.0).abs() < 1e-9);
    }

    /// Work that arrives late bounds the makespan from its arrival on.
    #[test]
    fn lower_bound_respects_arrivals() {
        let fleet = Fleet {
            hosts: vec![host("x", &["x86"], 1, 1.0)],
        };
        let t = Trace::from_jobs(vec![
            job("a", 0.0, "x86", 1.0, &[]),
            job("b", 100.0, "x86", 5.0, &[]),
            job("c", 100.0, "x86", 5.0, &[]),
        ])
        .unwrap();
        let lb = LowerBound::compute(&t, &fleet);
        assert!((lb.value() - 110.0).abs() < 1e-9, "{lb:?}");
    }

    /// Jain's index is 1 for equal shares and 1/n when one client gets everything.
    #[test]
    fn jain_index() {
        assert!((jain(&[3.0, 3.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!((jain(&[1.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-12);
        assert_eq!(jain(&[]), 1.0);
    }

    /// Nearest-rank percentiles pick actual samples.
    #[test]
    fn percentiles() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 50.0), 50.0);
        assert_eq!(percentile(&xs, 99.0), 99.0);
        assert_eq!(percentile(&xs, 100.0), 100.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
    }
}
