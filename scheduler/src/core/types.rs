//! Validated domain types of the scheduling core.
//!
//! Values of these types are valid by construction: the gRPC boundary
//! (`crate::service::convert`) builds them from wire messages and rejects bad input there, so
//! the core never re-checks them and never sees a prost type.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

/// A point in time: milliseconds since the epoch of the [`Clock`](super::Clock) in use.
///
/// The core never reads a clock itself; every operation takes `now`, so tests and the
/// simulator drive time by hand.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(u64);

impl Time {
    /// The epoch of the clock.
    pub const ZERO: Time = Time(0);

    /// `millis` milliseconds after the epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Time(millis)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// The time `d` later (saturating).
    pub fn after(self, d: Duration) -> Self {
        Time(
            self.0
                .saturating_add(d.as_millis().min(u64::MAX as u128) as u64),
        )
    }

    /// How long after `earlier` this is; zero when `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Wraps a string that the caller has already validated.
            pub fn new(s: impl Into<String>) -> Self {
                Self(s.into())
            }

            /// The string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// A host's stable identifier (`[A-Za-z0-9._-]{1,128}`).
    HostId
);
string_id!(
    /// A lease identifier, unique within one run of the scheduler and across its restarts.
    LeaseId
);
string_id!(
    /// Who asks for builds: one identity per member's machine. Self-declared until
    /// credentials are enforced; the core only needs it to be a stable key.
    ClientId
);
string_id!(
    /// A Nix system type such as `x86_64-linux`; [`System::BUILTIN`] matches every host.
    System
);
string_id!(
    /// A Nix system feature such as `kvm` or `big-parallel`.
    Feature
);

impl System {
    /// The pseudo-system of `builtin:fetchurl` and friends: any host can build it.
    pub const BUILTIN: &'static str = "builtin";

    /// Whether this is the `builtin` pseudo-system.
    pub fn is_builtin(&self) -> bool {
        self.0 == Self::BUILTIN
    }
}

/// What a host is, as its agent registered it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostSpec {
    /// Stable id.
    pub id: HostId,
    /// Store URI clients use (`ssh://` or `ssh-ng://`).
    pub store_uri: String,
    /// The OpenSSH public key line of the host, pinned by clients.
    pub public_key: String,
    /// Systems built, sharing one pool of slots. Never empty.
    pub systems: BTreeSet<System>,
    /// Supported features.
    pub supported_features: BTreeSet<Feature>,
    /// Mandatory features (a derivation must require all of them).
    pub mandatory_features: BTreeSet<Feature>,
    /// Build slots, at least 1.
    pub max_jobs: u32,
    /// Relative speed of a slot, finite and positive.
    pub speed_factor: f64,
    /// Logical CPUs (0: unknown).
    pub cpu_count: u32,
    /// Physical memory in bytes (0: unknown).
    pub total_memory_bytes: u64,
    /// Agent version, for operators.
    pub agent_version: String,
}

/// Load averages.
#[derive(Copy, Clone, Debug, PartialEq, Default)]
pub struct LoadAverage {
    /// Over 1 minute.
    pub load1: f64,
    /// Over 5 minutes.
    pub load5: f64,
    /// Over 15 minutes.
    pub load15: f64,
}

/// Pressure stall information, `avg10` percentages; `None` where the OS does not report it.
#[derive(Copy, Clone, Debug, PartialEq, Default)]
pub struct Pressure {
    /// CPU, some.
    pub cpu_some: Option<f64>,
    /// Memory, some.
    pub memory_some: Option<f64>,
    /// Memory, full.
    pub memory_full: Option<f64>,
    /// IO, some.
    pub io_some: Option<f64>,
    /// IO, full.
    pub io_full: Option<f64>,
}

/// Space of one file system; `free_bytes <= total_bytes`, `total_bytes > 0`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes free for unprivileged writers.
    pub free_bytes: u64,
    /// Size of the file system in bytes.
    pub total_bytes: u64,
}

impl DiskSpace {
    /// Free space in percent of the total, 0 to 100.
    pub fn free_percent(&self) -> f64 {
        // The ratio first: `free <= total` stays `<= 1.0` in floating point, whereas
        // `free * 100.0 / total` can round to just above 100 (found by fuzzing).
        100.0 * (self.free_bytes as f64 / self.total_bytes as f64)
    }
}

/// What a host is doing, from one agent report. Absent values are unknown, never zero.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct HostReport {
    /// Builds running on the host as the host sees them (ours and everybody else's).
    pub running_builds: Option<u32>,
    /// Load averages.
    pub load: Option<LoadAverage>,
    /// Pressure.
    pub pressure: Option<Pressure>,
    /// Memory available for new work, bytes.
    pub available_memory_bytes: Option<u64>,
    /// Store file system.
    pub store: Option<DiskSpace>,
    /// Build directory file system.
    pub build_dir: Option<DiskSpace>,
}

/// A request for a host for one derivation.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseRequest {
    /// The system needed.
    pub system: System,
    /// Features required.
    pub required_features: BTreeSet<Feature>,
    /// The derivation's store path.
    pub drv_path: String,
    /// Who asks.
    pub client: ClientId,
    /// Whether the client could build it locally now.
    pub can_build_locally: bool,
    /// Hosts the client could not reach for this build.
    pub exclude_hosts: BTreeSet<HostId>,
    /// The only host the request may be granted (a builder-side gate asking for its own
    /// host); `None`: any host.
    pub pin_host: Option<HostId>,
}

/// A granted lease, with everything a client needs to reach the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    /// The new lease.
    pub lease_id: LeaseId,
    /// The host, as registered.
    pub host: HostSpec,
    /// The lease expires this long from now unless kept alive.
    pub ttl: Duration,
    /// Slots in use on the host, this lease included.
    pub slots_used: u32,
    /// Slots of the host.
    pub slots_total: u32,
    /// Not a new lease: the live lease of another client for the same derivation on the
    /// pinned host, which its owner keeps and releases (see [`LeaseRequest::pin_host`]).
    pub attached: bool,
}

/// The answer to a [`LeaseRequest`].
// A grant is the common answer and is converted to the wire at once; boxing it would cost
// an allocation per grant to save stack space in a value that never sits in a collection.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// A host was leased.
    Granted(Grant),
    /// Nothing free; the client cannot build locally: ask again.
    Postpone {
        /// Ask again after this long.
        retry_after: Duration,
        /// 1-based position among the requests waiting for the same system.
        position: u32,
        /// Why, for the user.
        reason: String,
    },
    /// Nothing free; the client can build locally.
    Decline {
        /// Why, for the user.
        reason: String,
    },
    /// No live host can ever build this.
    DeclinePermanently {
        /// Why, for the user.
        reason: String,
    },
}

/// How a leased build ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum BuildOutcome {
    /// Built and copied back.
    Succeeded,
    /// The build failed.
    BuildFailed,
    /// The client could not reach the host.
    HostUnreachable,
    /// Abandoned.
    Cancelled,
}

impl BuildOutcome {
    /// A short, stable label (for logs and metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            BuildOutcome::Succeeded => "succeeded",
            BuildOutcome::BuildFailed => "build_failed",
            BuildOutcome::HostUnreachable => "host_unreachable",
            BuildOutcome::Cancelled => "cancelled",
        }
    }
}

/// Liveness of a host's agent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum HostState {
    /// Connected, reporting on time.
    Ready,
    /// Connected, but late beyond the grace period.
    Stale,
    /// Stream gone, within the grace period.
    Disconnected,
    /// Gone for longer than the grace period, or said goodbye.
    Gone,
}

/// Identifies one agent connection of a host, so that a stream that was replaced by a newer
/// one cannot change the host's state any more.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Generation(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `scheduler_convert` fuzz target: with free space equal (or nearly) to the
    /// total, `free * 100 / total` rounded to just above 100 %.
    #[test]
    fn free_percent_never_exceeds_100() {
        for (free_bytes, total_bytes) in [
            (432_331_587_474_779, 432_331_587_474_779),
            (26_569_479_694_355_079, 26_569_479_694_355_081),
            (u64::MAX, u64::MAX),
        ] {
            let d = DiskSpace {
                free_bytes,
                total_bytes,
            };
            assert!((0.0..=100.0).contains(&d.free_percent()), "{d:?}");
        }
    }
}
