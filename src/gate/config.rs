//! The gate's configuration file (`/etc/nixdispatch/gate.toml`, the file named by
//! `NIXDISPATCH_GATE_CONFIG`, or `--config`). Every key has a default, so a builder runs the
//! gate with no file at all: a scheduler on `127.0.0.1:50051`, this machine's host name as
//! its host id, fail open. `deploy/gate/gate.toml` is the commented example (kept equal to
//! these defaults by a test).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::GateError;

/// Where the configuration is read from by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nixdispatch/gate.toml";

/// The environment variable naming another configuration file (sshd `SetEnv`).
pub const CONFIG_ENV: &str = "NIXDISPATCH_GATE_CONFIG";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// Whether to gate at all. Default true. With `false` every command, Nix's included, is
    /// handed to the member's shell unchanged: the switch to turn the gate off on a box
    /// without editing sshd's configuration.
    pub enabled: bool,
    /// The scheduler's gRPC endpoint. Default `http://127.0.0.1:50051`, the scheduler's own
    /// default listen address.
    pub scheduler: String,
    /// The agent's gate socket (its `[gate] socket`, e.g.
    /// `/run/nixdispatch-agent/gate.sock`). When set, the gate asks the agent, which knows
    /// the member from the socket's peer credentials and forwards with the builder's
    /// credential: `scheduler`, `credential_file`, `ca_file` and `tls_domain` are then not
    /// used. The recommended mode. Default none: the direct mode, asking the scheduler
    /// itself.
    pub agent_socket: Option<PathBuf>,
    /// The direct mode's credential (a file holding the builder's bearer token): the gate
    /// speaks to the scheduler for this host, stating the member. The gate runs as the
    /// member, so the member can read this file and act as the builder towards the
    /// scheduler: use `agent_socket` instead wherever members are not fully trusted (the
    /// gate logs a warning when it reads a credential as a user other than root). Default
    /// none, for schedulers that do not check credentials.
    pub credential_file: Option<PathBuf>,
    /// PEM file of the CA that signed the scheduler's certificate, the only one trusted for
    /// an `https://` scheduler (required there, as for the agent). Default none: a
    /// scheduler on loopback speaks plain HTTP/2.
    pub ca_file: Option<PathBuf>,
    /// The name the scheduler's certificate must carry, when it is not the endpoint's host.
    /// Default none: the endpoint's host.
    pub tls_domain: Option<String>,
    /// This builder's host id, exactly as its agent registers it. Default: the machine's host
    /// name, the agent's own default.
    pub host_id: Option<String>,
    /// Refuse builds when the scheduler cannot be asked. Default false (fail open): a dead
    /// scheduler must not stop the community's builds; the box then behaves as it did
    /// without the gate, and the gate's log says so.
    pub fail_closed: bool,
    /// The `nix-daemon` to run for ssh-ng sessions. Default none: the program the member's
    /// command names, found on `PATH` as sshd would.
    pub nix_daemon: Option<String>,
    /// The `nix-store` to run for ssh sessions. Default none, likewise.
    pub nix_store: Option<String>,
    /// The store directory: `.drv` files are only read below it. Default `/nix/store`.
    pub store_dir: PathBuf,
    /// The system asked for when a build operation does not carry it and its `.drv` cannot
    /// be read. Default `builtin`, which every host matches: the slot asked for is this
    /// host's anyway.
    pub fallback_system: String,
    /// Tracing log file. Default none: the gate's stderr reaches the member (and, for ssh
    /// stores, the build log), so nothing is logged unless a file is named.
    pub log_file: Option<PathBuf>,
    /// Tracing filter for `log_file`, `RUST_LOG` syntax. Default `info`.
    pub log_level: String,
    /// Time bounds.
    pub timeouts: GateTimeouts,
}

/// Time bounds, in milliseconds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateTimeouts {
    /// Connecting to the scheduler. Default 1000: a scheduler on the LAN answers in well
    /// under that, and the member's build is waiting.
    pub connect_millis: u64,
    /// Each `Acquire`, `KeepAlive` and `Release` call, connect included. Default 2000. Past
    /// it the scheduler counts as unreachable for that call (fail open or closed).
    pub rpc_millis: u64,
    /// Shortest pause between two `Acquire`s of a waiting build, with a scheduler that
    /// predates `WaitForLease` (the gate waits in its stream otherwise). Default 250: the scheduler
    /// answers in microseconds, and a freed slot should not sit idle.
    pub poll_min_millis: u64,
    /// Longest pause between two `Acquire`s, whatever the scheduler's `retry_after_millis`
    /// says. Default 2000, so that a freed slot is taken within about that.
    pub poll_max_millis: u64,
    /// How long a `WaitForLease` stream may stay silent before it counts as broken (and is
    /// opened again). Default 20000: four of the scheduler's default 5 s progress
    /// intervals, as the protocol advises.
    pub wait_silence_millis: u64,
    /// How often to show an unchanged queue position again. Default 30000.
    pub progress_every_millis: u64,
    /// After the member's client went away, how long the daemon may take to exit before it
    /// is killed. Default 10000.
    pub exit_grace_millis: u64,
}

impl Default for GateTimeouts {
    fn default() -> Self {
        GateTimeouts {
            connect_millis: 1000,
            rpc_millis: 2000,
            poll_min_millis: 250,
            poll_max_millis: 2000,
            wait_silence_millis: 20_000,
            progress_every_millis: 30_000,
            exit_grace_millis: 10_000,
        }
    }
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            enabled: true,
            scheduler: "http://127.0.0.1:50051".to_owned(),
            agent_socket: None,
            credential_file: None,
            ca_file: None,
            tls_domain: None,
            host_id: None,
            fail_closed: false,
            nix_daemon: None,
            nix_store: None,
            store_dir: PathBuf::from("/nix/store"),
            fallback_system: "builtin".to_owned(),
            log_file: None,
            log_level: "info".to_owned(),
            timeouts: GateTimeouts::default(),
        }
    }
}

/// Whether `id` is a valid host or member id (1 to 128 printable ASCII characters without
/// spaces, as the scheduler requires of ids).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic())
}

impl GateConfig {
    /// Parses and validates a configuration text; `path` only names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, GateError> {
        let config: GateConfig = toml::from_str(text).map_err(|source| GateError::ConfigParse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Loads `path`; a missing file gives the embedded defaults.
    pub fn load(path: &Path) -> Result<Self, GateError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(GateConfig::default()),
            Err(source) => Err(GateError::ConfigRead {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn validate(&self, path: &Path) -> Result<(), GateError> {
        let invalid = |key: &'static str, problem: &str| GateError::ConfigInvalid {
            path: path.to_owned(),
            key,
            problem: problem.to_owned(),
        };
        if !(self.scheduler.starts_with("http://") || self.scheduler.starts_with("https://")) {
            return Err(invalid("scheduler", "must be an http:// or https:// URL"));
        }
        // Through the agent's socket the scheduler's address is the agent's business.
        if self.agent_socket.is_none()
            && self.scheduler.starts_with("https://")
            && self.ca_file.is_none()
        {
            return Err(invalid(
                "ca_file",
                "is required for an https:// scheduler (the CA that signed its certificate)",
            ));
        }
        if let Some(socket) = &self.agent_socket {
            if !socket.is_absolute() {
                return Err(invalid("agent_socket", "must be an absolute path"));
            }
            if self.credential_file.is_some() {
                return Err(invalid(
                    "credential_file",
                    "must not be set with agent_socket: the agent holds the builder's credential, \
                     and a file the gate can read, the member can read",
                ));
            }
        }
        if let Some(id) = &self.host_id
            && !valid_id(id)
        {
            return Err(invalid(
                "host_id",
                "must be 1 to 128 printable ASCII characters without spaces",
            ));
        }
        if !self.store_dir.is_absolute() {
            return Err(invalid("store_dir", "must be an absolute path"));
        }
        if self.fallback_system.is_empty() {
            return Err(invalid("fallback_system", "must not be empty"));
        }
        let t = &self.timeouts;
        for (key, v) in [
            ("timeouts.connect_millis", t.connect_millis),
            ("timeouts.rpc_millis", t.rpc_millis),
            ("timeouts.poll_min_millis", t.poll_min_millis),
            ("timeouts.poll_max_millis", t.poll_max_millis),
            ("timeouts.wait_silence_millis", t.wait_silence_millis),
            ("timeouts.progress_every_millis", t.progress_every_millis),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if t.poll_min_millis > t.poll_max_millis {
            return Err(invalid(
                "timeouts.poll_min_millis",
                "must not exceed timeouts.poll_max_millis",
            ));
        }
        Ok(())
    }

    /// A duration from milliseconds.
    pub fn millis(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No file means the embedded defaults.
    #[test]
    fn missing_file_gives_defaults() {
        let c = GateConfig::load(Path::new("/nonexistent/gate.toml")).unwrap();
        assert_eq!(c, GateConfig::default());
        assert!(!c.fail_closed);
    }

    /// The shipped example is exactly the defaults, so it documents what runs.
    #[test]
    fn deploy_example_equals_defaults() {
        let text = include_str!("../../deploy/gate/gate.toml");
        let c = GateConfig::from_toml(text, Path::new("gate.toml")).unwrap();
        assert_eq!(c, GateConfig::default());
    }

    /// Unknown keys and bad values are refused, naming the key.
    #[test]
    fn bad_keys_are_named() {
        let e = GateConfig::from_toml("fail_open = true", Path::new("g")).unwrap_err();
        assert!(e.to_string().contains("fail_open"), "{e}");
        let e = GateConfig::from_toml("host_id = \"a b\"", Path::new("g")).unwrap_err();
        assert!(e.to_string().contains("host_id"), "{e}");
        let e =
            GateConfig::from_toml("[timeouts]\npoll_min_millis = 0", Path::new("g")).unwrap_err();
        assert!(e.to_string().contains("poll_min_millis"), "{e}");
    }

    /// With the agent's socket, a credential file is refused (the member could read it),
    /// the socket must be an absolute path, and an https:// scheduler needs no CA here.
    #[test]
    fn agent_socket_refuses_a_credential_file() {
        let e = GateConfig::from_toml(
            "agent_socket = \"/run/a/gate.sock\"\ncredential_file = \"/etc/t\"",
            Path::new("g"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("credential_file"), "{e}");
        let e = GateConfig::from_toml("agent_socket = \"gate.sock\"", Path::new("g")).unwrap_err();
        assert!(e.to_string().contains("agent_socket"), "{e}");
        // The scheduler's address, TLS included, is the agent's business then.
        let c = GateConfig::from_toml(
            "agent_socket = \"/run/a/gate.sock\"\nscheduler = \"https://s:1\"",
            Path::new("g"),
        )
        .unwrap();
        assert_eq!(
            c.agent_socket.as_deref(),
            Some(Path::new("/run/a/gate.sock"))
        );
    }
}
