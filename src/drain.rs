//! `nixdispatch drain --wait`: when a drained host has nothing running any more.
//!
//! The CLI drains the host, then reads `ListHosts` every few seconds and feeds each answer
//! to [`DrainWatch::observe`]; this module is pure (it takes the time elapsed since the
//! watch began rather than reading a clock), so the rules are tested without a server.
//!
//! A host is drained when both counts the scheduler knows are zero:
//! - its **leases** (builds the scheduler placed there), exact at every answer; and
//! - the **builds its agent saw running** (also builds of members who bypass the
//!   scheduler), as of the agent's last report. That count must come from a report made
//!   *after* the leases were first seen at zero: an older one may miss a build that started
//!   since. So once the leases are gone the watch waits for the next report (at most one
//!   report interval, 10 s by default).
//!
//! When the agent is not connected, or cannot count builds, only the leases can be known;
//! the watch ends on them and says so.

use std::time::Duration;

use crate::proto::{self, HostState};

/// What one look at the host says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrainStep {
    /// Nothing runs there any more, as far as the scheduler can know; `caveat` says what it
    /// could not see.
    Done {
        /// What could not be checked, if anything.
        caveat: Option<String>,
    },
    /// Builds still run; the line says which (for progress output).
    Waiting {
        /// E.g. `2 leases, 3 builds running (reported 1s ago)`.
        progress: String,
    },
}

/// Follows one drain. See the module documentation.
#[derive(Debug, Default)]
pub struct DrainWatch {
    /// When (since the watch began) the leases were first seen at zero, in the current run
    /// of zeros.
    leases_zero_since: Option<Duration>,
}

impl DrainWatch {
    /// A watch beginning now.
    pub fn new() -> Self {
        Self::default()
    }

    /// Judges `host` (`None`: not listed) as seen `elapsed` after the watch began.
    pub fn observe(&mut self, elapsed: Duration, host: Option<&proto::HostStatus>) -> DrainStep {
        let Some(h) = host else {
            return DrainStep::Done {
                caveat: Some(
                    "no agent with this id has registered since the scheduler started: the \
                     scheduler knows of nothing running there"
                        .into(),
                ),
            };
        };
        let age = Duration::from_millis(h.millis_since_last_report);
        let running = match h.running_builds {
            Some(n) => format!("{n} build{} running", plural(n)),
            None => "running builds unknown".into(),
        };
        if h.leases > 0 {
            self.leases_zero_since = None;
            return DrainStep::Waiting {
                progress: format!(
                    "{} lease{}, {running} (reported {}s ago)",
                    h.leases,
                    plural(h.leases),
                    age.as_secs()
                ),
            };
        }
        let zero_since = *self.leases_zero_since.get_or_insert(elapsed);
        if !matches!(h.state(), HostState::Ready | HostState::Stale) {
            return DrainStep::Done {
                caveat: Some(
                    "its agent is not connected: builds that bypass the scheduler cannot be seen"
                        .into(),
                ),
            };
        }
        let Some(n) = h.running_builds else {
            return DrainStep::Done {
                caveat: Some(
                    "its agent cannot count running builds: only the scheduler's leases were \
                     checked"
                        .into(),
                ),
            };
        };
        // The report was made `age` before this answer: after the leases were seen at zero
        // only if that is no longer ago than the time since then.
        let fresh = age <= elapsed.saturating_sub(zero_since);
        match (n, fresh) {
            (0, true) => DrainStep::Done { caveat: None },
            (_, true) => DrainStep::Waiting {
                progress: format!("no leases, {running} (reported {}s ago)", age.as_secs()),
            },
            (_, false) => DrainStep::Waiting {
                progress: "no leases; waiting for the agent's next report".into(),
            },
        }
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(leases: u32, running: Option<u32>, report_age_ms: u64) -> proto::HostStatus {
        proto::HostStatus {
            host_id: "b".into(),
            state: HostState::Ready.into(),
            draining: true,
            leases,
            running_builds: running,
            millis_since_last_report: report_age_ms,
            ..Default::default()
        }
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// Leases keep the watch waiting; once they are gone it waits for a report made after
    /// that, and ends only when that report sees no build.
    #[test]
    fn waits_for_leases_then_a_fresh_report() {
        let mut w = DrainWatch::new();
        assert_eq!(
            w.observe(s(0), Some(&host(2, Some(3), 1000))),
            DrainStep::Waiting {
                progress: "2 leases, 3 builds running (reported 1s ago)".into()
            }
        );
        // Leases gone at 10 s; the report (8 s old) predates that.
        assert_eq!(
            w.observe(s(10), Some(&host(0, Some(0), 8000))),
            DrainStep::Waiting {
                progress: "no leases; waiting for the agent's next report".into()
            }
        );
        // A report 1 s old at 14 s was made at 13 s, after the leases went: it counts.
        assert_eq!(
            w.observe(s(14), Some(&host(0, Some(1), 1000))),
            DrainStep::Waiting {
                progress: "no leases, 1 build running (reported 1s ago)".into()
            }
        );
        assert_eq!(
            w.observe(s(20), Some(&host(0, Some(0), 500))),
            DrainStep::Done { caveat: None }
        );
    }

    /// A lease granted again (an undrain meanwhile) restarts the wait for a fresh report.
    #[test]
    fn a_new_lease_restarts_the_wait() {
        let mut w = DrainWatch::new();
        w.observe(s(0), Some(&host(0, Some(1), 0)));
        w.observe(s(5), Some(&host(1, Some(1), 0)));
        assert!(matches!(
            w.observe(s(9), Some(&host(0, Some(0), 5000))),
            DrainStep::Waiting { .. }
        ));
    }

    /// Without a connected agent, or without a build count, or for a host never
    /// registered, the watch ends on the leases and says what it could not see.
    #[test]
    fn ends_with_a_caveat_when_builds_cannot_be_seen() {
        let mut gone = host(0, Some(2), 60_000);
        gone.state = HostState::Gone.into();
        for h in [Some(&gone), Some(&host(0, None, 0)), None] {
            match DrainWatch::new().observe(s(0), h) {
                DrainStep::Done { caveat: Some(_) } => {}
                other => panic!("{other:?} for {h:?}"),
            }
        }
    }
}
