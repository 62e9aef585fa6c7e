//! The simulator's input: a workload trace (JSON lines) and a fleet (one JSON document).
//!
//! Both are plain data so that anyone can replay their own workload; the built-in scenarios
//! ([`crate::scenario`]) are generated into exactly these formats.
//!
//! ## Trace: one JSON object per line
//!
//! ```json
//! {"id":"a1","arrival_s":0.0,"client":"alice","system":"x86_64-linux","duration_s":42.0}
//! {"id":"a2","arrival_s":0.0,"client":"alice","system":"x86_64-linux","features":["kvm"],"duration_s":600.0,"deps":["a1"]}
//! {"id":"ci1","arrival_s":5.0,"system":"x86_64-linux","duration_s":900.0,"host":"build01"}
//! ```
//!
//! | field        | meaning                                                                  |
//! |--------------|--------------------------------------------------------------------------|
//! | `id`         | unique name of the build, REQUIRED                                       |
//! | `arrival_s`  | when the client submits it, seconds from the start, `>= 0`, REQUIRED     |
//! | `client`     | who submits it (a member's machine); REQUIRED unless `host` is set       |
//! | `system`     | Nix system, e.g. `aarch64-linux` (`builtin` runs anywhere), REQUIRED     |
//! | `features`   | required system features, e.g. `["kvm","big-parallel"]`, default none    |
//! | `duration_s` | build time on a slot of speed 1, seconds, `> 0`, REQUIRED                |
//! | `deps`       | ids of builds that must finish first; they MUST appear on earlier lines  |
//! | `host`       | load from outside the scheduler: the build bypasses it and starts on this host at its arrival (Hydra, buildbot, a member using SSH directly) |
//!
//! Empty lines and lines starting with `#` are ignored. A build becomes *ready* when it has
//! arrived and all its dependencies have finished.
//!
//! ## Fleet: one JSON document
//!
//! ```json
//! {"hosts":[{"id":"build01","systems":["x86_64-linux"],"features":["kvm","big-parallel"],
//!            "slots":6,"speed":1.0,"cpus":24}]}
//! ```
//!
//! `mandatory_features` (default none) and `cpus` (default 0, unknown) are optional.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// One build of a trace, as written in the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceJob {
    /// Unique name.
    pub id: String,
    /// Submission time, seconds from the start of the trace.
    pub arrival_s: f64,
    /// The submitting client; empty for outside load.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client: String,
    /// Nix system.
    pub system: String,
    /// Required features.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    /// Build time at speed 1, seconds.
    pub duration_s: f64,
    /// Builds that must finish first (earlier lines).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deps: Vec<String>,
    /// Set for load from outside the scheduler: the host it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// A parsed, validated trace: builds in file order, dependencies resolved to indices.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// The builds, in file order.
    pub jobs: Vec<TraceJob>,
    /// `deps[i]`: indices of the builds job `i` depends on (all `< i`).
    pub deps: Vec<Vec<usize>>,
    /// `lines[i]`: the 1-based line job `i` came from (0 for generated traces).
    pub lines: Vec<usize>,
}

/// A parse or validation error naming the offending line.
#[derive(Debug)]
pub struct TraceError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "trace line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for TraceError {}

impl Trace {
    /// Parses JSON lines (see the module documentation).
    pub fn parse(text: &str) -> Result<Trace, TraceError> {
        let mut jobs = Vec::new();
        let mut lines = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let t = raw.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let job: TraceJob = serde_json::from_str(t).map_err(|e| TraceError {
                line: i + 1,
                message: e.to_string(),
            })?;
            jobs.push(job);
            lines.push(i + 1);
        }
        Trace::from_jobs_with_lines(jobs, lines)
    }

    /// Validates generated builds (line numbers count from 1 in order, as if written out).
    pub fn from_jobs(jobs: Vec<TraceJob>) -> Result<Trace, TraceError> {
        let lines = (1..=jobs.len()).collect();
        Trace::from_jobs_with_lines(jobs, lines)
    }

    fn from_jobs_with_lines(jobs: Vec<TraceJob>, lines: Vec<usize>) -> Result<Trace, TraceError> {
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(jobs.len());
        let mut deps = Vec::with_capacity(jobs.len());
        for (i, j) in jobs.iter().enumerate() {
            let err = |message: String| TraceError {
                line: lines[i],
                message,
            };
            if j.id.is_empty() {
                return Err(err("`id` is empty".into()));
            }
            if !(j.arrival_s.is_finite() && j.arrival_s >= 0.0) {
                return Err(err(format!(
                    "`arrival_s` must be >= 0, got {}",
                    j.arrival_s
                )));
            }
            if !(j.duration_s.is_finite() && j.duration_s > 0.0) {
                return Err(err(format!(
                    "`duration_s` must be > 0, got {}",
                    j.duration_s
                )));
            }
            if j.system.is_empty() {
                return Err(err("`system` is empty".into()));
            }
            if j.client.is_empty() && j.host.is_none() {
                return Err(err("`client` is required unless `host` is set".into()));
            }
            let mut ds = Vec::with_capacity(j.deps.len());
            for d in &j.deps {
                match index.get(d.as_str()) {
                    Some(&k) => ds.push(k),
                    None => {
                        return Err(err(format!(
                            "dependency `{d}` is not the id of a build on an earlier line"
                        )));
                    }
                }
            }
            if index.insert(j.id.as_str(), i).is_some() {
                return Err(err(format!("duplicate id `{}`", j.id)));
            }
            deps.push(ds);
        }
        Ok(Trace { jobs, deps, lines })
    }

    /// Reads and parses a trace file.
    pub fn read(path: &Path) -> anyhow::Result<Trace> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Trace::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The trace as JSON lines.
    pub fn to_jsonl(&self) -> String {
        let mut s = String::new();
        for j in &self.jobs {
            s.push_str(&serde_json::to_string(j).expect("a trace job serialises"));
            s.push('\n');
        }
        s
    }

    /// Checks that every build can run somewhere in `fleet` and that outside load names a
    /// known host.
    pub fn check_against(&self, fleet: &Fleet) -> anyhow::Result<()> {
        for (i, j) in self.jobs.iter().enumerate() {
            match &j.host {
                Some(h) => {
                    if !fleet.hosts.iter().any(|x| &x.id == h) {
                        bail!(
                            "trace line {}: host `{h}` is not in the fleet",
                            self.lines[i]
                        );
                    }
                }
                None => {
                    if !fleet.hosts.iter().any(|h| h.eligible(j)) {
                        bail!(
                            "trace line {}: no host of the fleet builds {} with features [{}]",
                            self.lines[i],
                            j.system,
                            j.features.join(",")
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

/// One builder of a fleet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetHost {
    /// Host id.
    pub id: String,
    /// Systems built, from one pool of slots.
    pub systems: Vec<String>,
    /// Supported features.
    #[serde(default)]
    pub features: Vec<String>,
    /// Mandatory features.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mandatory_features: Vec<String>,
    /// Build slots.
    pub slots: u32,
    /// Relative speed of one slot.
    pub speed: f64,
    /// Logical CPUs (0: unknown); Hydra's ranking uses it.
    #[serde(default)]
    pub cpus: u32,
}

impl FleetHost {
    /// Whether this host can ever build `job` (the core's eligibility rule).
    pub fn eligible(&self, job: &TraceJob) -> bool {
        let builds = job.system == "builtin" || self.systems.contains(&job.system);
        let supported = job
            .features
            .iter()
            .all(|f| self.features.contains(f) || self.mandatory_features.contains(f));
        let mandatory = self
            .mandatory_features
            .iter()
            .all(|f| job.features.contains(f));
        builds && supported && mandatory
    }

    /// Capacity in speed-1 slot-seconds per second.
    pub fn capacity(&self) -> f64 {
        f64::from(self.slots) * self.speed
    }
}

/// A fleet of builders.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fleet {
    /// The hosts.
    pub hosts: Vec<FleetHost>,
}

impl Fleet {
    /// Parses and validates a fleet document.
    pub fn parse(text: &str) -> anyhow::Result<Fleet> {
        let fleet: Fleet = serde_json::from_str(text).context("parsing the fleet")?;
        fleet.validate()?;
        Ok(fleet)
    }

    /// Reads a fleet file.
    pub fn read(path: &Path) -> anyhow::Result<Fleet> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Fleet::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Checks ids are unique and every host has systems, slots and a positive speed.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut seen = BTreeSet::new();
        if self.hosts.is_empty() {
            bail!("the fleet has no hosts");
        }
        for h in &self.hosts {
            if !seen.insert(&h.id) {
                bail!("fleet host `{}` appears twice", h.id);
            }
            if h.systems.is_empty() || h.slots == 0 || !(h.speed.is_finite() && h.speed > 0.0) {
                bail!(
                    "fleet host `{}` needs systems, slots >= 1 and a speed > 0",
                    h.id
                );
            }
        }
        Ok(())
    }

    /// The fleet as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a fleet serialises") + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A malformed line is reported with its 1-based line number.
    #[test]
    fn bad_line_names_the_line() {
        let text = "# comment\n\
            {\"id\":\"a\",\"arrival_s\":0,\"client\":\"c\",\"system\":\"x\",\"duration_s\":1}\n\
            \n\
            {\"id\":\"b\",\"arrival_s\":0,\"client\":\"c\",\"system\":\"x\",\"duration_s\":\"long\"}\n";
        let err = Trace::parse(text).unwrap_err();
        assert_eq!(err.line, 4);
        assert!(err.to_string().starts_with("trace line 4:"), "{err}");
    }

    /// A dependency must name a build on an earlier line, which also rules out cycles.
    #[test]
    fn forward_dependency_is_refused() {
        let text = "{\"id\":\"a\",\"arrival_s\":0,\"client\":\"c\",\"system\":\"x\",\"duration_s\":1,\"deps\":[\"b\"]}\n\
            {\"id\":\"b\",\"arrival_s\":0,\"client\":\"c\",\"system\":\"x\",\"duration_s\":1}\n";
        let err = Trace::parse(text).unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.message.contains("`b`"), "{err}");
    }

    /// Unknown fields, duplicate ids and non-positive durations are refused.
    #[test]
    fn invalid_values_are_refused() {
        let unknown = "{\"id\":\"a\",\"arrival_s\":0,\"client\":\"c\",\"system\":\"x\",\"duration_s\":1,\"prio\":3}";
        assert_eq!(Trace::parse(unknown).unwrap_err().line, 1);
        let dup = "{\"id\":\"a\",\"arrival_s\":0,\"client\":\"c\",\"system\":\"x\",\"duration_s\":1}\n\
            {\"id\":\"a\",\"arrival_s\":0,\"client\":\"c\",\"system\":\"x\",\"duration_s\":1}";
        assert!(Trace::parse(dup).unwrap_err().message.contains("duplicate"));
        let zero =
            "{\"id\":\"a\",\"arrival_s\":0,\"client\":\"c\",\"system\":\"x\",\"duration_s\":0}";
        assert!(
            Trace::parse(zero)
                .unwrap_err()
                .message
                .contains("duration_s")
        );
    }

    /// Writing a trace and parsing it back gives the same builds.
    #[test]
    fn jsonl_round_trip() {
        let text = "{\"id\":\"a\",\"arrival_s\":1.5,\"client\":\"c\",\"system\":\"x\",\"features\":[\"kvm\"],\"duration_s\":2.0}\n\
            {\"id\":\"b\",\"arrival_s\":0.0,\"system\":\"x\",\"duration_s\":3.0,\"deps\":[\"a\"],\"host\":\"h\"}\n";
        let t = Trace::parse(text).unwrap();
        assert_eq!(t.deps, vec![vec![], vec![0]]);
        assert_eq!(Trace::parse(&t.to_jsonl()).unwrap().jobs, t.jobs);
    }
}
