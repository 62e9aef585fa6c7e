//! The scheduler's configuration: a TOML file, every key optional, unknown keys rejected.
//!
//! With no file at all the scheduler runs on [`Config::default`], the embedded defaults
//! below. Each default says why it is what it is.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::Error;
use crate::auth::AuthConfig;
use crate::core::{
    Admission, ClientId, CoreConfig, MemberQuota, PolicyKind, ProbePolicy, Quotas, System,
};
use crate::tls::TlsConfig;

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the gRPC server. Default `127.0.0.1:50051`: loopback until an operator
    /// decides to expose it (TLS and credentials come with their own issue), on gRPC's
    /// customary port.
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint. Default: none (off), so that two
    /// schedulers on one machine, e.g. in tests, never fight over a port.
    pub metrics_listen: Option<SocketAddr>,
    /// Agent liveness.
    pub agents: AgentsConfig,
    /// Lease lifetimes.
    pub leases: LeasesConfig,
    /// Admission gates (`[admission]`; each key is documented on [`Admission`]).
    pub admission: Admission,
    /// Placement.
    pub placement: PlacementConfig,
    /// Input limits.
    pub limits: LimitsConfig,
    /// The wait queue and its quotas.
    pub queue: QueueConfig,
    /// Where operator state (drains) is kept across restarts.
    pub state: StateConfig,
    /// Who may call (`[auth]`, see [`crate::auth`]). Default: none, the **open mode**: no
    /// credential is checked and every caller may do everything. Why: the quick start runs
    /// on loopback with no file at all; the server refuses to start open on any address
    /// that is not loopback, and logs a warning when it starts open.
    pub auth: Option<AuthConfig>,
    /// TLS (`[tls]`, see [`crate::tls`]). Default: none (plaintext), allowed only on
    /// loopback unless `tls.allow_plaintext` says otherwise.
    pub tls: TlsConfig,
    /// The scheduler's own SSH probes of builders.
    pub probe: ProbeConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: None,
            agents: AgentsConfig::default(),
            leases: LeasesConfig::default(),
            admission: Admission::default(),
            placement: PlacementConfig::default(),
            limits: LimitsConfig::default(),
            state: StateConfig::default(),
            auth: None,
            tls: TlsConfig::default(),
            probe: ProbeConfig::default(),
            queue: QueueConfig::default(),
        }
    }
}

/// The longest pause between two keep-alives of a lease that clients keep (the protocol's
/// rule, see `Granted.lease_ttl_millis`, which the hook follows), milliseconds: a lease
/// granted before a restart re-attaches within this of the scheduler's start.
pub const KEEP_ALIVE_EVERY_MAX_MILLIS: u64 = 5_000;

/// `[queue]`: waiting for a lease, and quotas.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// A grant made to a waiter must be claimed within this, milliseconds: a `WaitForLease`
    /// client keeps it alive, a polling hook asks again. Default 10000: two of Nix's
    /// 5-second polls, and far more than a stream needs; a grant lost in transit keeps its
    /// slot idle at most this long.
    pub claim_millis: u64,
    /// How often a waiting stream gets its position and estimate when they changed,
    /// milliseconds. Default 5000: often enough for a person watching, rare enough that
    /// 100,000 waiters cost little.
    pub progress_interval_millis: u64,
    /// After a start, no slot goes to a waiting request for this long, milliseconds, while
    /// the holders of leases granted before a restart re-attach them with their keep-alives
    /// (every third of the lease TTL, at most 5 s apart: the protocol's rule, see
    /// `Granted.lease_ttl_millis`); `Acquire` is not held. Default: that keep-alive period
    /// plus 1000 (6000 at the default TTL). A host's slots also wait for its agent's first
    /// report, which shows the builds still running there.
    pub restart_hold_millis: Option<u64>,
    /// Most live leases one member may hold at once, on every system together; past it its
    /// requests wait (or are declined when they can build locally), also pinned ones; a
    /// gate attaching to its member's own lease takes no lease and is never refused. This is
    /// the one per-member cap: it replaces `auth.limits.max_live_leases_per_member`, still
    /// read as a deprecated alias when this is left out. Default (left out): 64 with an
    /// `[auth]` section, since the community's whole Linux fleet has about 26 build slots,
    /// so one member can use all of it when nobody else builds (the fair order shares it
    /// when others do), yet a runaway script cannot pin thousands of leases; none in the open
    /// mode, where a client id is a label any caller picks, so a cap per label would bound
    /// nothing (and load tests hold a whole fleet under one). `SetQuota` changes it at run
    /// time, where an operator may also lift it.
    pub default_member_max_slots: Option<u32>,
    /// Most requests one member may have waiting in the queue at once (`WaitForLease`
    /// streams and postponed `Acquire`s asked again); a new one past it is answered
    /// `RESOURCE_EXHAUSTED`. Default 256: a member's Nix asks for at most `max-jobs` builds
    /// at once per machine, so a few busy machines stay far below it, while one caller can
    /// no longer queue tens of thousands of requests and slow the queue for everyone.
    pub max_waiting_per_member: usize,
    /// Aging of the queue's shortest-expected-first order. Each waiting request gets a
    /// deadline, its arrival plus `min(aging_factor × its expected duration,
    /// max_age_millis)`. Within a member (across members fair order decides) requests
    /// past their deadline go first, earliest deadline first, and the rest shortest expected
    /// first: that lowers the mean wait, and a build past its deadline is passed by no later
    /// arrival of its member, so a long build cannot starve behind a stream of short ones.
    /// Default 32: on the simulator's community model the mean wait stays within a few per
    /// cent of no aging at all, where 8 costs up to 10 % (`docs/BENCHMARKS.md`). 0 serves
    /// each member's requests first come, first served.
    pub aging_factor: u32,
    /// The most any waiting request's deadline lies after its arrival, however long its
    /// expected build. Default 3600000 (one hour): a build expected to take hours waits at
    /// most an hour before no later arrival of its member passes it.
    pub max_age_millis: u64,
    /// Members' own quotas and priorities (`[queue.members."alice-laptop"]`).
    pub members: BTreeMap<String, MemberQuotaConfig>,
    /// Most live leases for builds of a system (`[queue.systems] "x86_64-linux" = 20`).
    pub systems: BTreeMap<String, u32>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            claim_millis: 10_000,
            progress_interval_millis: 5_000,
            restart_hold_millis: None,
            default_member_max_slots: None,
            max_waiting_per_member: 256,
            aging_factor: 32,
            max_age_millis: 3_600_000,
            members: BTreeMap::new(),
            systems: BTreeMap::new(),
        }
    }
}

/// `[queue.members.<client id>]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemberQuotaConfig {
    /// Most live leases of this member; default: `queue.default_member_max_slots`.
    pub max_slots: Option<u32>,
    /// Fair-order weight, -10000 to 10000: `-100` doubles the member's share, `100` halves
    /// it. Default 0.
    pub priority: i32,
}

/// `queue.default_member_max_slots` when it is left out and `[auth]` is configured (see
/// there).
pub const DEFAULT_MEMBER_MAX_SLOTS: u32 = 64;

impl QueueConfig {
    /// The core's quotas; `fallback` is the default member quota when
    /// `default_member_max_slots` is left out.
    fn quotas(&self, fallback: Option<u32>) -> Quotas {
        Quotas {
            default_member_max_slots: self.default_member_max_slots.or(fallback),
            members: self
                .members
                .iter()
                .map(|(m, q)| {
                    (
                        ClientId::new(m.as_str()),
                        MemberQuota {
                            max_slots: q.max_slots,
                            priority: q.priority,
                        },
                    )
                })
                .collect(),
            systems: self
                .systems
                .iter()
                .map(|(s, n)| (System::new(s.as_str()), *n))
                .collect(),
        }
    }
}

/// `[agents]`: how often agents report and how late they may be.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// Agents must report at least this often, milliseconds. Default 10000: Hydra's
    /// builders report every 10 s; PSI `avg10` changes on that scale too.
    pub report_interval_millis: u64,
    /// How late past its deadline a report may be, and how long a disconnected agent's
    /// host is kept, milliseconds. Default 20000: two missed reports, so one lost packet or
    /// a slow agent never closes a host.
    pub grace_millis: u64,
    /// How long a new stream may take to send its registration, milliseconds. Default 10000.
    pub register_timeout_millis: u64,
    /// How long a host whose agent is gone stays listed before the scheduler forgets it,
    /// milliseconds (a host with live leases is kept until they end; drains are operator
    /// state and outlive this). Default 3600000 (one hour): long enough for an operator to
    /// see a dead builder in `nixdispatch hosts` (alerts fire on host state within minutes,
    /// and history lives in Prometheus), short enough that hosts renamed or retired do not
    /// pile up.
    pub forget_gone_after_millis: u64,
}

impl Default for AgentsConfig {
    fn default() -> Self {
        Self {
            report_interval_millis: 10_000,
            grace_millis: 20_000,
            register_timeout_millis: 10_000,
            forget_gone_after_millis: 3_600_000,
        }
    }
}

/// `[leases]`: lifetimes.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeasesConfig {
    /// A lease not kept alive for this long expires, milliseconds. Default 60000: the hook
    /// keeps alive every 20 s, so two lost keep-alives are survived, and a slot held by a
    /// killed hook comes back within a minute.
    pub ttl_millis: u64,
    /// What `Postpone` tells clients to wait, milliseconds. Default 5000: Nix re-asks after
    /// its `build-poll-interval`, 5 s by default, whatever we say.
    pub postpone_retry_millis: u64,
    /// A postponed request that is not repeated for this long leaves the wait queue,
    /// milliseconds. Default 30000: six missed polls.
    pub waiter_ttl_millis: u64,
    /// After a client reports a host unreachable, it gets no lease there for this long, and
    /// once two clients have reported it nobody does, milliseconds. Default 60000: long
    /// enough that a dead box is not offered to every following derivation (each costs the
    /// client a failed SSH attempt), short enough that a rebooted one is back within a minute.
    pub unreachable_cooldown_millis: u64,
}

impl Default for LeasesConfig {
    fn default() -> Self {
        Self {
            ttl_millis: 60_000,
            postpone_retry_millis: 5_000,
            waiter_ttl_millis: 30_000,
            unreachable_cooldown_millis: 60_000,
        }
    }
}

/// `[placement]`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    /// The policy. Default `least-loaded`, nixdispatch's own; the others exist for
    /// comparison (`power-of-two`, `stock-nix`, `first-fit`, `random`, `round-robin`).
    pub policy: PolicyKind,
    /// Seed of the tie-breaking generator. Default: none, taken from the time at start.
    pub seed: Option<u64>,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            policy: PolicyKind::LeastLoaded,
            seed: None,
        }
    }
}

/// `[limits]`: bounds on input.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest gRPC message accepted, bytes. Default 65536: the largest legitimate message
    /// (a registration with every field at its limit) is about 10 KiB.
    pub max_message_bytes: usize,
    /// Connections open at once; past it new connections are closed at once. Default
    /// 4096: a hundred members' hooks and CLIs and a few hundred agents fit many times over,
    /// and it stays well below the 65536 descriptors the shipped unit allows, so that a
    /// flood of idle connections cannot take the process's last descriptor.
    pub max_connections: usize,
    /// How long a new connection may stay silent before its first bytes (the HTTP/2
    /// preface), milliseconds. Default 10000: a real client speaks within milliseconds; a
    /// peer that only opens sockets is dropped.
    pub handshake_timeout_millis: u64,
    /// How often the server pings each HTTP/2 connection, milliseconds. Default 10000.
    pub http2_keepalive_interval_millis: u64,
    /// How long a ping may go unanswered before the connection is dropped, milliseconds.
    /// Default 5000: with the interval, a frozen or vanished agent loses its stream (and its
    /// host stops getting leases) within 15 s, before its report deadline and grace (30 s)
    /// would notice.
    pub http2_keepalive_timeout_millis: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 64 * 1024,
            max_connections: 4096,
            handshake_timeout_millis: 10_000,
            http2_keepalive_interval_millis: 10_000,
            http2_keepalive_timeout_millis: 5_000,
        }
    }
}

impl LimitsConfig {
    /// The bounds on accepted connections.
    pub(crate) fn bounds(&self) -> crate::incoming::Bounds {
        crate::incoming::Bounds {
            max_connections: self.max_connections,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_millis),
        }
    }

    /// HTTP/2 ping interval.
    pub(crate) fn keepalive_interval(&self) -> Duration {
        Duration::from_millis(self.http2_keepalive_interval_millis)
    }

    /// HTTP/2 ping timeout.
    pub(crate) fn keepalive_timeout(&self) -> Duration {
        Duration::from_millis(self.http2_keepalive_timeout_millis)
    }
}

/// `[state]`: the operator state database (see `crate::store`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// The SQLite file holding what operators decided (drains), created on first start.
    /// Default: none, which means `$STATE_DIRECTORY/scheduler.sqlite3` when systemd sets
    /// `STATE_DIRECTORY` (the unit's `StateDirectory=`, `/var/lib/nixdispatch-scheduler`),
    /// and otherwise memory only, lost when the scheduler stops (the log says so). Why: a
    /// fixed default path would be shared by every scheduler started without a
    /// configuration on one machine (trials, tests), so a drain set on one would silently
    /// hold on another; under systemd the state directory is the service's own.
    pub database: Option<PathBuf>,
    /// How long an access waits for a lock another process holds on the file, milliseconds.
    /// Default 5000: an online backup of this small database holds it for milliseconds, so
    /// a longer wait means another scheduler is using the same file, which is an error.
    pub busy_timeout_millis: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            database: None,
            busy_timeout_millis: 5_000,
        }
    }
}

/// `[probe]`: the scheduler connects to every builder's sshd itself, checks that it presents
/// the host key its agent registered (the key members pin) and, with a probe key, that
/// `command` runs; a builder that fails is taken out of placement until it answers again
/// (a circuit breaker per host: see `crate::core` and `docs/OPERATIONS.md`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeConfig {
    /// Whether to probe. Default `false`: the scheduler must reach each builder at the
    /// address of its store URI, which is not so where store URIs name members' ssh_config
    /// aliases or builders accept SSH only from members' networks, and there a probe that
    /// cannot connect would take every builder out. Turn it on where the scheduler sees the
    /// builders as members do (the NixOS module's example does).
    pub enabled: bool,
    /// Time between two probes of a healthy builder, milliseconds. Default 10000: the
    /// agents' report interval, so a dead sshd is found about as fast as a dead agent.
    pub interval_millis: u64,
    /// A probe that has not finished in this time fails, milliseconds. Default 5000: an SSH
    /// login and `nix-store --version` take well under a second on a healthy builder; one
    /// that needs five is not one to send builds to.
    pub timeout_millis: u64,
    /// Consecutive failures that take a builder out. Default 2: one lost connection does
    /// not close a builder, a second one within `backoff_initial_millis` does. A host key
    /// other than the pinned one takes it out at the first probe whatever this says.
    pub failures_to_open: u32,
    /// How long a builder taken out waits for its first retry, milliseconds; each failed
    /// retry doubles it. Default 5000: a restarted sshd is back in placement within seconds.
    pub backoff_initial_millis: u64,
    /// The longest wait between retries, milliseconds. Default 300000 (five minutes): a
    /// builder down for maintenance costs one connection attempt per five minutes.
    pub backoff_max_millis: u64,
    /// Builders probed at once. Default 32: probes mostly wait on the network.
    pub concurrency: usize,
    /// An unencrypted OpenSSH private key to log in with, read at start. Default: none,
    /// and then a probe only connects and checks the host key. With systemd, pass it with
    /// `LoadCredential=` and name `/run/credentials/nixdispatch-scheduler.service/<name>`.
    pub key_file: Option<PathBuf>,
    /// The user to log in as. Default: none, meaning the user of the store URI, else
    /// `root` (the user build-remote logs in as then).
    pub user: Option<String>,
    /// What to run after logging in; a zero exit status passes. Default
    /// `nix-store --version`: it proves a login shell finds Nix, as build-remote needs.
    pub command: String,
    /// The port for store URIs that name none. Default 22.
    pub default_port: u16,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            interval_millis: 10_000,
            timeout_millis: 5_000,
            failures_to_open: 2,
            backoff_initial_millis: 5_000,
            backoff_max_millis: 300_000,
            concurrency: 32,
            key_file: None,
            user: None,
            command: "nix-store --version".into(),
            default_port: 22,
        }
    }
}

impl ProbeConfig {
    /// The core's view.
    fn policy(&self) -> ProbePolicy {
        ProbePolicy {
            enabled: self.enabled,
            interval: Duration::from_millis(self.interval_millis),
            failures_to_open: self.failures_to_open,
            backoff_initial: Duration::from_millis(self.backoff_initial_millis),
            backoff_max: Duration::from_millis(self.backoff_max_millis),
        }
    }
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            what: format!("reading {}", path.display()),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            Error::ConfigParse { source, .. } => Error::ConfigParse {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let config: Config = toml::from_str(text).map_err(|e| Error::ConfigParse {
            path: "<text>".into(),
            source: Box::new(e),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the ranges that serde cannot.
    pub fn validate(&self) -> Result<(), Error> {
        let positive = |key: &str, v: u64| {
            if v == 0 {
                Err(Error::Config {
                    key: key.into(),
                    reason: "must be greater than 0".into(),
                })
            } else {
                Ok(())
            }
        };
        positive(
            "agents.report_interval_millis",
            self.agents.report_interval_millis,
        )?;
        positive(
            "agents.register_timeout_millis",
            self.agents.register_timeout_millis,
        )?;
        positive("leases.ttl_millis", self.leases.ttl_millis)?;
        positive(
            "leases.postpone_retry_millis",
            self.leases.postpone_retry_millis,
        )?;
        positive("leases.waiter_ttl_millis", self.leases.waiter_ttl_millis)?;
        positive(
            "limits.handshake_timeout_millis",
            self.limits.handshake_timeout_millis,
        )?;
        positive(
            "limits.http2_keepalive_interval_millis",
            self.limits.http2_keepalive_interval_millis,
        )?;
        positive(
            "limits.http2_keepalive_timeout_millis",
            self.limits.http2_keepalive_timeout_millis,
        )?;
        positive("limits.max_connections", self.limits.max_connections as u64)?;
        positive("probe.interval_millis", self.probe.interval_millis)?;
        positive("probe.timeout_millis", self.probe.timeout_millis)?;
        positive("probe.failures_to_open", self.probe.failures_to_open.into())?;
        positive(
            "probe.backoff_initial_millis",
            self.probe.backoff_initial_millis,
        )?;
        positive("probe.concurrency", self.probe.concurrency as u64)?;
        if self.probe.backoff_max_millis < self.probe.backoff_initial_millis {
            return Err(Error::Config {
                key: "probe.backoff_max_millis".into(),
                reason: "must be at least probe.backoff_initial_millis".into(),
            });
        }
        if self.probe.command.trim().is_empty() {
            return Err(Error::Config {
                key: "probe.command".into(),
                reason: "must not be empty".into(),
            });
        }
        if self
            .state
            .database
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            return Err(Error::Config {
                key: "state.database".into(),
                reason: "must not be empty (leave it out for the default)".into(),
            });
        }
        positive("queue.claim_millis", self.queue.claim_millis)?;
        positive(
            "queue.max_waiting_per_member",
            self.queue.max_waiting_per_member as u64,
        )?;
        if self.queue.default_member_max_slots == Some(0) {
            return Err(Error::Config {
                key: "queue.default_member_max_slots".into(),
                reason: "must be greater than 0 (leave it out for the default)".into(),
            });
        }
        if let (Some(new), Some(old)) = (
            self.queue.default_member_max_slots,
            self.deprecated_member_cap(),
        ) && new != old
        {
            return Err(Error::Config {
                key: "auth.limits.max_live_leases_per_member".into(),
                reason: format!(
                    "is deprecated and says {old}, but queue.default_member_max_slots says \
                     {new}: remove the deprecated key"
                ),
            });
        }
        positive(
            "queue.progress_interval_millis",
            self.queue.progress_interval_millis,
        )?;
        for (m, q) in &self.queue.members {
            if m.is_empty() || m.len() > 128 || !m.chars().all(|c| c.is_ascii_graphic()) {
                return Err(Error::Config {
                    key: format!("queue.members.{m:?}"),
                    reason: "a client id is 1 to 128 printable ASCII characters".into(),
                });
            }
            if !(-10_000..=10_000).contains(&q.priority) {
                return Err(Error::Config {
                    key: format!("queue.members.{m:?}.priority"),
                    reason: format!("{} is outside -10000 to 10000", q.priority),
                });
            }
        }
        if self.limits.max_message_bytes < 4096 {
            return Err(Error::Config {
                key: "limits.max_message_bytes".into(),
                reason: "must be at least 4096 (a full registration must fit)".into(),
            });
        }
        if let Some(auth) = &self.auth {
            auth.validate()?;
        }
        self.tls.validate()?;
        let a = &self.admission;
        for (key, v) in [
            ("admission.min_free_store_percent", a.min_free_store_percent),
            (
                "admission.min_free_build_dir_percent",
                a.min_free_build_dir_percent,
            ),
            ("admission.max_cpu_some_pressure", a.max_cpu_some_pressure),
            (
                "admission.max_memory_full_pressure",
                a.max_memory_full_pressure,
            ),
            ("admission.max_io_full_pressure", a.max_io_full_pressure),
        ] {
            if !(0.0..=100.0).contains(&v) {
                return Err(Error::Config {
                    key: key.into(),
                    reason: format!("{v} is not a percentage (0 to 100)"),
                });
            }
        }
        Ok(())
    }

    /// The quotas the configuration sets (operators' `SetQuota` changes, once stored,
    /// replace them): `[queue]`, where a `default_member_max_slots` left out is the
    /// deprecated alias `auth.limits.max_live_leases_per_member` if set, else
    /// [`DEFAULT_MEMBER_MAX_SLOTS`] with `[auth]` and none in the open mode.
    pub fn quotas(&self) -> Quotas {
        let fallback = self
            .deprecated_member_cap()
            .or(self.auth.is_some().then_some(DEFAULT_MEMBER_MAX_SLOTS));
        self.queue.quotas(fallback)
    }

    /// The deprecated `auth.limits.max_live_leases_per_member`, when set.
    pub fn deprecated_member_cap(&self) -> Option<u32> {
        self.auth
            .as_ref()
            .and_then(|a| a.limits.max_live_leases_per_member)
            .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// The core's view of this configuration.
    pub fn core(&self) -> CoreConfig {
        CoreConfig {
            report_interval: Duration::from_millis(self.agents.report_interval_millis),
            grace: Duration::from_millis(self.agents.grace_millis),
            lease_ttl: Duration::from_millis(self.leases.ttl_millis),
            postpone_retry: Duration::from_millis(self.leases.postpone_retry_millis),
            waiter_ttl: Duration::from_millis(self.leases.waiter_ttl_millis),
            unreachable_cooldown: Duration::from_millis(self.leases.unreachable_cooldown_millis),
            claim_ttl: Duration::from_millis(self.queue.claim_millis),
            startup_window: Duration::from_millis(
                self.agents.report_interval_millis + self.agents.grace_millis,
            ),
            startup_hold: Duration::from_millis(
                self.queue.restart_hold_millis.unwrap_or(
                    (self.leases.ttl_millis / 3).min(KEEP_ALIVE_EVERY_MAX_MILLIS) + 1000,
                ),
            ),
            quotas: self.quotas(),
            max_waiting_per_member: self.queue.max_waiting_per_member,
            aging_factor: self.queue.aging_factor,
            max_age: Duration::from_millis(self.queue.max_age_millis),
            admission: self.admission.clone(),
            forget_gone_after: Duration::from_millis(self.agents.forget_gone_after_millis),
            probe: self.probe.policy(),
            ..CoreConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The restart hold is one keep-alive period of the hooks (a third of the lease TTL, at
    /// most 5 s) plus a second, unless set.
    #[test]
    fn the_restart_hold_follows_the_keep_alive_period() {
        let mut c = Config::default();
        assert_eq!(c.core().startup_hold, Duration::from_secs(6));
        c.leases.ttl_millis = 3_000;
        assert_eq!(c.core().startup_hold, Duration::from_secs(2));
        c.queue.restart_hold_millis = Some(0);
        assert_eq!(c.core().startup_hold, Duration::ZERO);
    }

    /// An empty file is the embedded defaults, and they agree with the core's defaults.
    #[test]
    fn empty_file_is_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.core(), CoreConfig::default());
        // With `[auth]`, a member's quota is 64 unless set.
        let c = Config::parse("[auth]").unwrap();
        assert_eq!(
            c.core().quotas.member_max(&ClientId::new("m")),
            Some(DEFAULT_MEMBER_MAX_SLOTS)
        );
    }

    /// Every key can be set.
    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            r#"
            listen = "0.0.0.0:6000"
            metrics_listen = "127.0.0.1:9464"
            [agents]
            report_interval_millis = 500
            grace_millis = 1000
            register_timeout_millis = 2000
            forget_gone_after_millis = 60000
            [leases]
            ttl_millis = 3000
            postpone_retry_millis = 1000
            waiter_ttl_millis = 9000
            [admission]
            max_memory_full_pressure = 10.0
            [placement]
            policy = "power-of-two"
            seed = 7
            [limits]
            max_message_bytes = 8192
            max_connections = 100
            handshake_timeout_millis = 500
            http2_keepalive_interval_millis = 1000
            http2_keepalive_timeout_millis = 1000
            [state]
            database = "/var/lib/nixdispatch-scheduler/scheduler.sqlite3"
            busy_timeout_millis = 100
            [probe]
            enabled = true
            interval_millis = 2000
            timeout_millis = 1000
            failures_to_open = 1
            backoff_initial_millis = 500
            backoff_max_millis = 8000
            concurrency = 4
            key_file = "/run/credentials/nixdispatch-scheduler.service/probe-key"
            user = "nix-probe"
            command = "nix-store --version"
            default_port = 2222
            [queue]
            claim_millis = 4000
            progress_interval_millis = 1000
            default_member_max_slots = 4
            [queue.members."alice-laptop"]
            max_slots = 8
            priority = -100
            [queue.systems]
            "x86_64-linux" = 20
            "#,
        )
        .unwrap();
        let q = c.core().quotas;
        assert_eq!(q.member_max(&ClientId::new("alice-laptop")), Some(8));
        assert_eq!(q.priority(&ClientId::new("alice-laptop")), -100);
        assert_eq!(q.member_max(&ClientId::new("bob")), Some(4));
        assert_eq!(q.systems[&System::new("x86_64-linux")], 20);
        assert_eq!(c.core().claim_ttl, Duration::from_secs(4));
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.placement.policy, PolicyKind::PowerOfTwo);
        assert_eq!(c.core().lease_ttl, Duration::from_secs(3));
        assert!(c.core().probe.enabled);
        assert_eq!(c.core().probe.backoff_max, Duration::from_secs(8));
        assert_eq!(
            c.state.database.as_deref(),
            Some(Path::new(
                "/var/lib/nixdispatch-scheduler/scheduler.sqlite3"
            ))
        );
    }

    /// An unknown key is rejected with its name, also in a section.
    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse("listn = \"1.2.3.4:5\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("listn"), "{e}");
        let e = Config::parse("[leases]\nttl_seconds = 5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ttl_seconds"), "{e}");
        let e = Config::parse("[placement]\npolicy = \"fastest\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fastest"), "{e}");
    }

    /// The example file in `deploy/` parses, is a secure deployment (a network address,
    /// TLS, `[auth]`), and otherwise states exactly the embedded defaults, so it cannot drift
    /// from the code.
    #[test]
    fn deployed_example_is_the_defaults() {
        let text = include_str!("../../deploy/scheduler/scheduler.example.toml");
        let example = Config::parse(text).unwrap();
        assert!(!example.listen.ip().is_loopback());
        assert!(example.tls.enabled() && !example.tls.allow_plaintext);
        let auth = example.auth.clone().expect("the example configures [auth]");
        assert_eq!(auth.limits, crate::auth::config::IdentityLimits::default());
        assert_eq!(
            example.quotas().default_member_max_slots,
            Some(DEFAULT_MEMBER_MAX_SLOTS)
        );
        assert!(!auth.open_reads);
        let rest = Config {
            listen: Config::default().listen,
            tls: TlsConfig::default(),
            auth: None,
            ..example
        };
        assert_eq!(rest, Config::default());
    }

    /// `auth.limits.max_live_leases_per_member` is read as the deprecated alias of
    /// `queue.default_member_max_slots`, the one per-member cap; set to another value next
    /// to the new key, it is refused with both names; 0 is refused.
    #[test]
    fn the_old_member_cap_is_an_alias_of_the_queue_quota() {
        let c = Config::parse("[auth.limits]\nmax_live_leases_per_member = 5").unwrap();
        assert_eq!(c.quotas().default_member_max_slots, Some(5));
        assert_eq!(c.core().quotas.member_max(&ClientId::new("m")), Some(5));
        let c = Config::parse(
            "[queue]\ndefault_member_max_slots = 5\n[auth.limits]\nmax_live_leases_per_member = 5",
        )
        .unwrap();
        assert_eq!(c.quotas().default_member_max_slots, Some(5));
        let e = Config::parse(
            "[queue]\ndefault_member_max_slots = 6\n[auth.limits]\nmax_live_leases_per_member = 5",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("auth.limits.max_live_leases_per_member")
                && e.contains("queue.default_member_max_slots"),
            "{e}"
        );
        let e = Config::parse("[queue]\ndefault_member_max_slots = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("queue.default_member_max_slots"), "{e}");
        let e = Config::parse("[queue]\nmax_waiting_per_member = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("queue.max_waiting_per_member"), "{e}");
    }

    /// Out-of-range values are rejected with their dotted key.
    #[test]
    fn bad_values_are_named() {
        let e = Config::parse("[leases]\nttl_millis = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("leases.ttl_millis"), "{e}");
        let e = Config::parse("[admission]\nmax_io_full_pressure = 250.0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("admission.max_io_full_pressure"), "{e}");
        let e = Config::parse("[queue.members.m]\npriority = 20000")
            .unwrap_err()
            .to_string();
        assert!(e.contains("queue.members.\"m\".priority"), "{e}");
        let e = Config::parse("[state]\ndatabase = \"\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("state.database"), "{e}");
    }
}
