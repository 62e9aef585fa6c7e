//! Placement policies: given the hosts that may take a build now, pick one.
//!
//! The scheduler runs [`LeastLoaded`]; the others exist so that the benchmarks compare the
//! alternatives on the same core: stock Nix's `build-remote` (each client counts only its own
//! builds), Hydra's queue runner (first fit over a static ranking), and the textbook
//! baselines (random, round robin, power of two choices). `docs/BENCHMARKS.md` compares them.
//! A policy sees only [`Candidate`]s, which the core has already filtered for eligibility
//! (system, features, liveness, drain, admission gates and free slots).

use std::fmt;
use std::str::FromStr;

use super::rng::SplitMix64;

/// One host that could take the build, as a policy sees it.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Build slots of the host.
    pub slots: u32,
    /// Slots in use as the scheduler counts them: its live leases plus the builds the agent
    /// saw running beyond the leases held at that report (builds that bypass the scheduler).
    pub used: u32,
    /// Of the scheduler's leases on this host, how many belong to the asking client.
    /// Counted only for policies that do not see global load (stock Nix); 0 otherwise.
    pub own: u32,
    /// Relative speed of a slot.
    pub speed: f64,
    /// A static strength of the host, `speed * cpus` (Hydra's ranking).
    pub rank: f64,
}

impl Candidate {
    /// nixdispatch's score, lower is better: the expected load after placing one more build,
    /// normalised by capacity and speed (shortest expected delay).
    pub fn score(&self) -> f64 {
        (f64::from(self.used) + 1.0) / (f64::from(self.slots) * self.speed)
    }
}

/// A placement rule.
pub trait Policy: Send + fmt::Debug {
    /// The policy's name, as used in configuration and benchmark tables.
    fn name(&self) -> &'static str;

    /// Picks one of `candidates` (never empty), returning its index.
    fn choose(&mut self, candidates: &[Candidate], rng: &mut SplitMix64) -> usize;

    /// Whether the policy sees the load of every client. Stock Nix does not: each client
    /// counts only its own builds, so for it the core gates slots on `own < slots`
    /// instead of `used < slots`, and hosts get oversubscribed as they do today.
    fn sees_global_load(&self) -> bool {
        true
    }

    /// Whether the policy picks the lowest [`Candidate::score`] and nothing else, so that the
    /// core may answer from its score index without offering every candidate (ties are then
    /// broken by a random key the index draws whenever a host's load changes).
    fn least_loaded(&self) -> bool {
        false
    }
}

/// The names of the policies, for configuration.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// [`LeastLoaded`], the default.
    LeastLoaded,
    /// [`PowerOfTwo`].
    PowerOfTwo,
    /// [`StockNix`].
    StockNix,
    /// [`FirstFit`].
    FirstFit,
    /// [`Random`].
    Random,
    /// [`RoundRobin`].
    RoundRobin,
}

impl PolicyKind {
    /// Every policy, in the order benchmark tables list them.
    pub const ALL: [PolicyKind; 6] = [
        PolicyKind::LeastLoaded,
        PolicyKind::PowerOfTwo,
        PolicyKind::StockNix,
        PolicyKind::FirstFit,
        PolicyKind::Random,
        PolicyKind::RoundRobin,
    ];

    /// A fresh instance of the policy.
    pub fn build(self) -> Box<dyn Policy> {
        match self {
            PolicyKind::LeastLoaded => Box::new(LeastLoaded),
            PolicyKind::PowerOfTwo => Box::new(PowerOfTwo),
            PolicyKind::StockNix => Box::new(StockNix),
            PolicyKind::FirstFit => Box::new(FirstFit),
            PolicyKind::Random => Box::new(Random),
            PolicyKind::RoundRobin => Box::new(RoundRobin::default()),
        }
    }

    /// The configuration name.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::LeastLoaded => "least-loaded",
            PolicyKind::PowerOfTwo => "power-of-two",
            PolicyKind::StockNix => "stock-nix",
            PolicyKind::FirstFit => "first-fit",
            PolicyKind::Random => "random",
            PolicyKind::RoundRobin => "round-robin",
        }
    }
}

impl FromStr for PolicyKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = PolicyKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown policy `{s}`, expected one of {}", names.join(", "))
            })
    }
}

/// Scores closer than this are ties.
const TIE: f64 = 1e-9;

/// Picks uniformly among the indices whose key is minimal (within [`TIE`]).
fn argmin_random_tie(
    candidates: &[Candidate],
    rng: &mut SplitMix64,
    key: impl Fn(&Candidate) -> f64,
) -> usize {
    let mut best = 0;
    let mut best_key = key(&candidates[0]);
    let mut ties = 1u64;
    for (i, c) in candidates.iter().enumerate().skip(1) {
        let k = key(c);
        if k < best_key - TIE {
            best = i;
            best_key = k;
            ties = 1;
        } else if (k - best_key).abs() <= TIE {
            // Reservoir sampling: each tied candidate ends up chosen with probability 1/ties.
            ties += 1;
            if rng.below(ties) == 0 {
                best = i;
            }
        }
    }
    best
}

/// nixdispatch's policy: the lowest [`Candidate::score`], ties broken at random so that
/// concurrent requests spread instead of piling onto the first host of a list.
///
/// Because every lease counts against its host the instant it is granted, the scores the
/// scheduler sees for its own placements are never stale; only builds from outside the
/// scheduler are as old as the last agent report.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeastLoaded;

impl Policy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least-loaded"
    }

    fn choose(&mut self, candidates: &[Candidate], rng: &mut SplitMix64) -> usize {
        argmin_random_tie(candidates, rng, Candidate::score)
    }

    fn least_loaded(&self) -> bool {
        true
    }
}

/// Power of two choices (Mitzenmacher): the better of two candidates drawn at random.
/// Robust when load information is stale; shown in benchmarks for comparison.
#[derive(Debug, Default, Clone, Copy)]
pub struct PowerOfTwo;

impl Policy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power-of-two"
    }

    fn choose(&mut self, candidates: &[Candidate], rng: &mut SplitMix64) -> usize {
        let n = candidates.len() as u64;
        let a = rng.below(n) as usize;
        let b = rng.below(n) as usize;
        if candidates[b].score() < candidates[a].score() {
            b
        } else {
            a
        }
    }
}

/// Stock Nix's build-remote: each client sees only its own builds; the lowest
/// `own / speed` wins, then the higher speed, then the lower own load, then the first in
/// the machines list (NixOS/nix `build-remote.cc`).
#[derive(Debug, Default, Clone, Copy)]
pub struct StockNix;

impl Policy for StockNix {
    fn name(&self) -> &'static str {
        "stock-nix"
    }

    fn choose(&mut self, candidates: &[Candidate], _rng: &mut SplitMix64) -> usize {
        let mut best = 0;
        for (i, c) in candidates.iter().enumerate().skip(1) {
            let b = &candidates[best];
            let (lc, lb) = (f64::from(c.own) / c.speed, f64::from(b.own) / b.speed);
            let better = lc < lb
                || (lc == lb && c.speed > b.speed)
                || (lc == lb && c.speed == b.speed && c.own < b.own);
            if better {
                best = i;
            }
        }
        best
    }

    fn sees_global_load(&self) -> bool {
        false
    }
}

/// Hydra's queue runner: first fit over a static ranking (strongest host first), which packs
/// the strongest box instead of spreading the load.
#[derive(Debug, Default, Clone, Copy)]
pub struct FirstFit;

impl Policy for FirstFit {
    fn name(&self) -> &'static str {
        "first-fit"
    }

    fn choose(&mut self, candidates: &[Candidate], _rng: &mut SplitMix64) -> usize {
        let mut best = 0;
        for (i, c) in candidates.iter().enumerate().skip(1) {
            if c.rank > candidates[best].rank {
                best = i;
            }
        }
        best
    }
}

/// Uniformly at random.
#[derive(Debug, Default, Clone, Copy)]
pub struct Random;

impl Policy for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn choose(&mut self, candidates: &[Candidate], rng: &mut SplitMix64) -> usize {
        rng.below(candidates.len() as u64) as usize
    }
}

/// Each request takes the next candidate in turn.
#[derive(Debug, Default, Clone, Copy)]
pub struct RoundRobin {
    next: usize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn choose(&mut self, candidates: &[Candidate], _rng: &mut SplitMix64) -> usize {
        let i = self.next % candidates.len();
        self.next = self.next.wrapping_add(1);
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(slots: u32, used: u32, speed: f64) -> Candidate {
        Candidate {
            slots,
            used,
            own: 0,
            speed,
            rank: speed * f64::from(slots),
        }
    }

    /// Least-loaded prefers the host with more free capacity per unit of speed.
    #[test]
    fn least_loaded_prefers_lowest_normalised_load() {
        let cs = [cand(6, 5, 1.0), cand(20, 5, 1.0), cand(2, 0, 1.0)];
        let mut rng = SplitMix64::new(1);
        assert_eq!(LeastLoaded.choose(&cs, &mut rng), 1);
    }

    /// Ties are broken at random: equal hosts all get chosen over many draws.
    #[test]
    fn least_loaded_spreads_ties() {
        let cs = [cand(4, 1, 1.0), cand(4, 1, 1.0), cand(4, 1, 1.0)];
        let mut rng = SplitMix64::new(7);
        let mut seen = [0u32; 3];
        for _ in 0..300 {
            seen[LeastLoaded.choose(&cs, &mut rng)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    /// Stock Nix looks only at the asking client's own builds.
    #[test]
    fn stock_nix_ignores_other_clients() {
        let mut a = cand(6, 6, 1.0);
        a.own = 0;
        let mut b = cand(6, 0, 1.0);
        b.own = 1;
        let mut rng = SplitMix64::new(1);
        assert_eq!(StockNix.choose(&[a, b], &mut rng), 0);
        assert!(!StockNix.sees_global_load());
    }

    /// First fit always packs the strongest host while it has a slot.
    #[test]
    fn first_fit_packs_strongest() {
        let cs = [cand(2, 0, 1.0), cand(20, 19, 1.0), cand(6, 0, 1.0)];
        let mut rng = SplitMix64::new(1);
        assert_eq!(FirstFit.choose(&cs, &mut rng), 1);
    }

    /// Every policy name parses back to its kind, and an unknown one is refused by name.
    #[test]
    fn policy_names_round_trip() {
        for k in PolicyKind::ALL {
            assert_eq!(k.as_str().parse::<PolicyKind>(), Ok(k));
            assert_eq!(k.build().name(), k.as_str());
        }
        let err = "fastest".parse::<PolicyKind>().unwrap_err();
        assert!(err.contains("`fastest`"), "{err}");
    }
}
