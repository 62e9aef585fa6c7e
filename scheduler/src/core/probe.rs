//! The scheduler's own SSH probes of builders: what they found, and the circuit breaker per
//! host that takes a builder out of placement while its SSH endpoint fails.
//!
//! The probing itself is I/O and lives in `crate::probe`; this module only records verdicts
//! (each with the time it was made) and decides, from them and the configuration:
//! - **closed**: the host takes leases; consecutive failures are counted, and at
//!   [`ProbePolicy::failures_to_open`] the breaker opens (a host key that differs from the
//!   pinned one opens it at once: that is not a hiccup);
//! - **open**: no leases; the next probe is due after the back-off, which starts at
//!   [`ProbePolicy::backoff_initial`] and doubles with every failed retry up to
//!   [`ProbePolicy::backoff_max`];
//! - **half-open**: the back-off ran out and a retry probe is due or running; still no
//!   leases (the trial is the probe, never a member's build). A success closes the breaker,
//!   a failure opens it again with the doubled back-off.
//!
//! Which hosts are due is a queue ordered by due time, so that finding them costs the due
//! hosts, not the fleet.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use super::{HostId, Time};

/// When and how often builders are probed: the `[probe]` section of the scheduler's
/// configuration as the core needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbePolicy {
    /// Whether probes run at all. Off: breakers stay closed and nothing is due.
    pub enabled: bool,
    /// Time between two probes of a healthy host.
    pub interval: Duration,
    /// Consecutive failures (other than a wrong host key) that open the breaker.
    pub failures_to_open: u32,
    /// The first back-off of an open breaker.
    pub backoff_initial: Duration,
    /// The longest back-off.
    pub backoff_max: Duration,
}

impl Default for ProbePolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: Duration::from_secs(10),
            failures_to_open: 2,
            backoff_initial: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
        }
    }
}

/// What kind of failure a probe met.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum ProbeFailure {
    /// No TCP connection, or no SSH handshake (refused, unresolvable, reset).
    Connect,
    /// The host presented a key other than the one its agent registered.
    HostKey,
    /// The probe key was not accepted.
    Login,
    /// The probe command could not run or exited with a failure.
    Command,
    /// The probe did not finish in time.
    Timeout,
}

impl ProbeFailure {
    /// A short stable name, for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::HostKey => "host_key",
            Self::Login => "login",
            Self::Command => "command",
            Self::Timeout => "timeout",
        }
    }
}

/// The verdict of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeVerdict {
    /// Connected, the host key matched, and (with a probe key) the command succeeded.
    Ok,
    /// It failed; `detail` says how, in words for operators.
    Failed {
        /// The kind.
        kind: ProbeFailure,
        /// What happened, e.g. `connection refused`.
        detail: String,
    },
}

/// A probe to run: the host, where it is and the key it must present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeTarget {
    /// The host.
    pub id: HostId,
    /// Its store URI (where to connect, and as whom).
    pub store_uri: String,
    /// The pinned host key line, `<type> <base64>`. A verdict is only recorded while the
    /// host still has this key: a probe of a key the host no longer registers says nothing.
    pub public_key: String,
}

/// The breaker's position, as operators see it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Breaker {
    /// Takes leases.
    Closed,
    /// Out of placement; the next probe is later.
    Open,
    /// Out of placement; a retry probe is due or running.
    HalfOpen,
}

impl fmt::Display for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        })
    }
}

/// A breaker's change caused by a verdict, for logs and metrics.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BreakerChange {
    /// The host left placement.
    Opened,
    /// The host is back.
    Closed,
}

/// One host's probe record.
#[derive(Clone, Debug, Default)]
pub(super) struct ProbeState {
    /// Failures since the last success.
    pub(super) failures: u32,
    /// Whether the breaker is open (or half-open).
    pub(super) open: bool,
    /// The back-off of the open breaker.
    pub(super) backoff: Duration,
    /// When the next probe is due; `None` while one runs (or probes are off).
    pub(super) due: Option<Time>,
    /// The last failure and when it was seen.
    pub(super) last_failure: Option<(Time, ProbeFailure, String)>,
    /// When the last verdict came.
    pub(super) last_at: Option<Time>,
}

impl ProbeState {
    /// The breaker's position now.
    pub(super) fn breaker(&self, now: Time) -> Breaker {
        match (self.open, self.due) {
            (false, _) => Breaker::Closed,
            (true, Some(due)) if due > now => Breaker::Open,
            (true, _) => Breaker::HalfOpen,
        }
    }

    /// Records a verdict made at `now`; returns the breaker's change, if any.
    pub(super) fn record(
        &mut self,
        now: Time,
        verdict: ProbeVerdict,
        policy: &ProbePolicy,
    ) -> Option<BreakerChange> {
        self.last_at = Some(now);
        match verdict {
            ProbeVerdict::Ok => {
                self.failures = 0;
                self.backoff = Duration::ZERO;
                self.due = Some(now.after(policy.interval));
                let was_open = std::mem::replace(&mut self.open, false);
                was_open.then_some(BreakerChange::Closed)
            }
            ProbeVerdict::Failed { kind, detail } => {
                self.failures = self.failures.saturating_add(1);
                self.last_failure = Some((now, kind, detail));
                let opens = kind == ProbeFailure::HostKey
                    || self.failures >= policy.failures_to_open.max(1);
                if !opens {
                    // Still closed: retry soon rather than after a whole interval, so that a
                    // dead host is confirmed within one back-off.
                    self.due = Some(now.after(policy.backoff_initial.min(policy.interval)));
                    return None;
                }
                self.backoff = if self.open {
                    (self.backoff * 2).clamp(policy.backoff_initial, policy.backoff_max)
                } else {
                    policy.backoff_initial.min(policy.backoff_max)
                };
                self.due = Some(now.after(self.backoff));
                let was_open = std::mem::replace(&mut self.open, true);
                (!was_open).then_some(BreakerChange::Opened)
            }
        }
    }

    /// Why the open breaker keeps the host out, in words.
    pub(super) fn describe(&self, now: Time) -> String {
        let (kind, detail) = self
            .last_failure
            .as_ref()
            .map_or(("unknown", ""), |(_, k, d)| (k.as_str(), d.as_str()));
        let next = match self.due {
            Some(due) if due > now => format!("next probe in {}s", due.since(now).as_secs()),
            _ => "retrying now".into(),
        };
        format!(
            "SSH probe failed ({kind}: {detail}); {} failure{} in a row, {next}",
            self.failures,
            if self.failures == 1 { "" } else { "s" }
        )
    }
}

/// Hosts by the time their next probe is due.
#[derive(Debug, Default)]
pub(super) struct ProbeQueue {
    due: BTreeSet<(Time, HostId)>,
}

impl ProbeQueue {
    /// Queues a probe of `id` at `at`. The host's [`ProbeState::due`] must say the same:
    /// entries that disagree with it are stale and skipped when popped.
    pub(super) fn push(&mut self, at: Time, id: HostId) {
        self.due.insert((at, id));
    }

    /// When the earliest entry is due.
    pub(super) fn next(&self) -> Option<Time> {
        self.due.first().map(|(t, _)| *t)
    }

    /// The earliest entry due at `now`, if any.
    pub(super) fn pop_due(&mut self, now: Time) -> Option<(Time, HostId)> {
        let first = self.due.first()?;
        if first.0 > now {
            return None;
        }
        self.due.pop_first()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(kind: ProbeFailure) -> ProbeVerdict {
        ProbeVerdict::Failed {
            kind,
            detail: "x".into(),
        }
    }

    fn at(s: u64) -> Time {
        Time::from_millis(s * 1000)
    }

    /// The breaker opens after the configured failures, backs off exponentially up to the
    /// bound while retries fail, and closes on the first success.
    #[test]
    fn breaker_opens_backs_off_and_closes() {
        let p = ProbePolicy {
            enabled: true,
            interval: Duration::from_secs(10),
            failures_to_open: 2,
            backoff_initial: Duration::from_secs(5),
            backoff_max: Duration::from_secs(20),
        };
        let mut s = ProbeState::default();
        assert_eq!(s.record(at(0), failed(ProbeFailure::Connect), &p), None);
        assert_eq!(s.breaker(at(0)), Breaker::Closed);
        assert_eq!(
            s.record(at(5), failed(ProbeFailure::Connect), &p),
            Some(BreakerChange::Opened)
        );
        assert_eq!(s.breaker(at(6)), Breaker::Open);
        assert_eq!(s.breaker(at(10)), Breaker::HalfOpen);
        let mut backoffs = Vec::new();
        let mut t = 10;
        for _ in 0..4 {
            assert_eq!(s.record(at(t), failed(ProbeFailure::Timeout), &p), None);
            backoffs.push(s.backoff.as_secs());
            t += s.backoff.as_secs();
        }
        assert_eq!(backoffs, [10, 20, 20, 20]);
        assert!(
            s.describe(at(t - 1)).contains("timeout"),
            "{}",
            s.describe(at(t))
        );
        assert_eq!(
            s.record(at(t), ProbeVerdict::Ok, &p),
            Some(BreakerChange::Closed)
        );
        assert_eq!(s.breaker(at(t)), Breaker::Closed);
        assert_eq!(s.failures, 0);
        assert_eq!(s.due, Some(at(t + 10)));
    }

    /// A host key other than the pinned one opens the breaker on the first probe.
    #[test]
    fn wrong_host_key_opens_at_once() {
        let p = ProbePolicy {
            failures_to_open: 5,
            ..ProbePolicy::default()
        };
        let mut s = ProbeState::default();
        assert_eq!(
            s.record(at(0), failed(ProbeFailure::HostKey), &p),
            Some(BreakerChange::Opened)
        );
        assert_eq!(s.breaker(at(1)), Breaker::Open);
    }
}
