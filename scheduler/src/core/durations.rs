//! Expected build durations, learned per derivation name (the store path name without its
//! hash: `/nix/store/<hash>-hello-2.12.drv` is `hello-2.12`) from how long released leases
//! held their slots. Used to serve each member's shortest builds first and to estimate waits.
//!
//! The slot time measured by the scheduler (grant to release) is what a waiter waits for, so
//! that is what is learned, not the client's build time: it includes copying closures.
//! Each name keeps an exponentially weighted mean (weight [`ALPHA`] on the newest build), so
//! a derivation that got slower is believed within a few builds.
//!
//! A name never built before is most often a version bump of one that was (`hello-2.13`
//! after `hello-2.12`): it is expected to take what builds of its **pname** took, the name
//! without its version, split as Nix's `builtins.parseDrvName` splits it (at the first `-`
//! followed by a digit). Only a name whose pname is unknown too is expected to take the mean
//! of all builds (weighted the same way, more slowly).
//!
//! Persisted: the per-name records only. The per-pname means are learned alongside them
//! while the scheduler runs and rebuilt from the per-name records at restore (each pname the
//! samples-weighted mean of its names' means), so the database holds nothing more.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// Weight of the newest duration in a name's mean.
const ALPHA: f64 = 0.3;
/// Weight of the newest duration in the mean over all builds.
const ALPHA_ALL: f64 = 0.02;
/// What an unknown build is expected to take before any build was measured.
const DEFAULT: Duration = Duration::from_secs(60);
/// Most names remembered; past it new names are not learned (their builds still update the
/// overall mean). Far above the distinct derivation names of a community's builds per day.
const MAX_NAMES: usize = 200_000;

/// What is known of one derivation name.
#[derive(Copy, Clone, Debug, PartialEq)]
pub struct DurationStat {
    /// Weighted mean slot time, milliseconds.
    pub mean_millis: f64,
    /// Builds measured.
    pub samples: u64,
}

/// Learned durations.
#[derive(Debug)]
pub(super) struct Durations {
    by_name: HashMap<String, DurationStat>,
    /// The same, per pname (the name without its version): the fallback for new versions.
    by_pname: HashMap<String, DurationStat>,
    overall_millis: f64,
    /// Names learned since the last [`Durations::take_changed`], for persistence.
    changed: HashSet<String>,
}

impl Default for Durations {
    fn default() -> Self {
        Self {
            by_name: HashMap::new(),
            by_pname: HashMap::new(),
            overall_millis: DEFAULT.as_millis() as f64,
            changed: HashSet::new(),
        }
    }
}

/// The derivation name of a `.drv` store path: the base name without the hash and `.drv`.
/// A path that does not look like a store path is its own name.
pub(super) fn drv_name(drv_path: &str) -> &str {
    let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
    let base = base.strip_suffix(".drv").unwrap_or(base);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 && !name.is_empty() => name,
        _ => base,
    }
}

/// The pname of a derivation name: the part before the first `-` that is followed by a
/// digit, as Nix's `builtins.parseDrvName` splits it (`hello-2.12` is `hello`,
/// `python3.12-requests-2.32.3` is `python3.12-requests`); a name without a version is its
/// own pname.
pub(super) fn pname(name: &str) -> &str {
    let b = name.as_bytes();
    (0..b.len())
        .find(|&i| b[i] == b'-' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        .map_or(name, |i| &name[..i])
}

impl Durations {
    /// What a build of `name` is expected to hold its slot for: its own mean, else its
    /// pname's, else the mean of all builds.
    pub(super) fn expected(&self, name: &str) -> Duration {
        let ms = self
            .by_name
            .get(name)
            .or_else(|| self.by_pname.get(pname(name)))
            .map_or(self.overall_millis, |s| s.mean_millis);
        Duration::from_millis(ms.max(0.0) as u64)
    }

    /// The mean over all builds.
    pub(super) fn overall(&self) -> Duration {
        Duration::from_millis(self.overall_millis.max(0.0) as u64)
    }

    /// A build of `name` held its slot for `took`.
    pub(super) fn learn(&mut self, name: &str, took: Duration) {
        let ms = took.as_millis() as f64;
        self.overall_millis += ALPHA_ALL * (ms - self.overall_millis);
        if learn_into(&mut self.by_name, name, ms) {
            self.changed.insert(name.to_owned());
        }
        learn_into(&mut self.by_pname, pname(name), ms);
    }

    /// Every name's record, for persistence, sorted by name.
    pub(super) fn snapshot(&self) -> Vec<(String, DurationStat)> {
        let mut v: Vec<_> = self.by_name.iter().map(|(k, s)| (k.clone(), *s)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The records learned since the last call, sorted by name.
    pub(super) fn take_changed(&mut self) -> Vec<(String, DurationStat)> {
        let mut v: Vec<_> = self
            .changed
            .drain()
            .filter_map(|k| self.by_name.get(&k).map(|s| (k, *s)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Restores records (after a restart); the overall mean restarts from their mean, and
    /// each pname's from the samples-weighted mean of its names'.
    pub(super) fn restore(&mut self, records: impl IntoIterator<Item = (String, DurationStat)>) {
        let mut sum = 0.0;
        let mut n = 0u64;
        // Per pname: sum of mean × samples, and samples.
        let mut pnames: HashMap<String, (f64, u64)> = HashMap::new();
        for (name, s) in records {
            if !s.mean_millis.is_finite() || s.mean_millis < 0.0 {
                continue;
            }
            sum += s.mean_millis;
            n += 1;
            let samples = s.samples.max(1);
            let p = pnames.entry(pname(&name).to_owned()).or_default();
            p.0 += s.mean_millis * samples as f64;
            p.1 = p.1.saturating_add(samples);
            if self.by_name.len() < MAX_NAMES || self.by_name.contains_key(&name) {
                self.by_name.insert(name, s);
            }
        }
        for (p, (weighted, samples)) in pnames {
            if self.by_pname.len() < MAX_NAMES || self.by_pname.contains_key(&p) {
                let mean_millis = weighted / samples as f64;
                self.by_pname.insert(
                    p,
                    DurationStat {
                        mean_millis,
                        samples,
                    },
                );
            }
        }
        if n > 0 {
            self.overall_millis = sum / n as f64;
        }
    }
}

/// Folds a build of `ms` into `key`'s weighted mean in `map`, a new record when there is
/// room; returns whether `map` changed.
fn learn_into(map: &mut HashMap<String, DurationStat>, key: &str, ms: f64) -> bool {
    if let Some(s) = map.get_mut(key) {
        s.mean_millis += ALPHA * (ms - s.mean_millis);
        s.samples += 1;
        true
    } else if map.len() < MAX_NAMES {
        map.insert(
            key.to_owned(),
            DurationStat {
                mean_millis: ms,
                samples: 1,
            },
        );
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The name drops the store directory, the 32-character hash and `.drv`.
    #[test]
    fn names_drop_hash_and_suffix() {
        assert_eq!(
            drv_name("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello-2.12.drv"),
            "hello-2.12"
        );
        assert_eq!(drv_name("/nix/store/x.drv"), "x");
        assert_eq!(drv_name("/nix/store/short-name.drv"), "short-name");
    }

    /// The pname is what precedes the first `-` followed by a digit, as `parseDrvName` has it.
    #[test]
    fn pnames_drop_the_version() {
        assert_eq!(pname("hello-2.12"), "hello");
        assert_eq!(pname("python3.12-requests-2.32.3"), "python3.12-requests");
        assert_eq!(pname("nixos-system-web-24.05.1"), "nixos-system-web");
        assert_eq!(pname("source"), "source");
        assert_eq!(pname("trailing-"), "trailing-");
        assert_eq!(pname("x-1"), "x");
    }

    /// A new version of a known derivation is expected to take what the earlier versions
    /// took, not the overall mean; its own builds then take over; another pname still gets
    /// the overall mean; the fallback survives a snapshot and restore, which holds only the
    /// per-name records.
    #[test]
    fn a_new_version_is_expected_to_take_what_its_pname_took() {
        let mut d = Durations::default();
        d.learn("hello-2.12", Duration::from_secs(10));
        d.learn("hello-2.11", Duration::from_secs(20));
        // The pname's mean: 10, then 10 + 0.3 × (20 - 10).
        assert_eq!(d.expected("hello-2.13"), Duration::from_secs(13));
        assert_eq!(d.expected("hello-2.12"), Duration::from_secs(10));
        let other = d.expected("firefox-130.0");
        assert_eq!(other, d.overall());
        d.learn("hello-2.13", Duration::from_secs(100));
        assert_eq!(d.expected("hello-2.13"), Duration::from_secs(100));
        let mut e = Durations::default();
        e.restore(d.snapshot());
        // Restored: the samples-weighted mean of 10, 20 and 100.
        assert_eq!(e.expected("hello-2.14"), Duration::from_millis(43_333));
        assert_eq!(e.expected("hello-2.12"), Duration::from_secs(10));
        assert!(d.snapshot().iter().all(|(n, _)| n.starts_with("hello-2.1")));
    }

    /// A name's mean follows its builds; an unknown name gets the overall mean; a snapshot
    /// restores to the same expectations.
    #[test]
    fn learns_a_weighted_mean_and_restores_it() {
        let mut d = Durations::default();
        assert_eq!(d.expected("new"), DEFAULT);
        d.learn("hello", Duration::from_secs(10));
        assert_eq!(d.expected("hello"), Duration::from_secs(10));
        d.learn("hello", Duration::from_secs(20));
        assert_eq!(d.expected("hello"), Duration::from_secs(13));
        let mut e = Durations::default();
        e.restore(d.snapshot());
        assert_eq!(e.expected("hello"), Duration::from_secs(13));
        assert_eq!(e.expected("other"), Duration::from_secs(13));
    }
}
