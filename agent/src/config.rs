//! The agent's configuration: a TOML file, every key optional, overridden by flags.
//!
//! [`Config`] is what the operator wrote (all defaults documented on the fields); it is
//! turned into [`Settings`] by [`Config::resolve`], which fills what was left unset from the
//! local Nix and the host, validates everything against the protocol's limits, and names the
//! key in every error. Settings given explicitly are never discovered, so an agent with
//! `systems` and `max_jobs` set (and `features`, `build_users_group`) starts without Nix.
//!
//! ```toml
//! scheduler = "https://scheduler.example.org:50051"
//! host_id = "builder-1"
//! store_uri = "ssh-ng://nix-remote@builder-1.example.org"
//! speed_factor = 2.0
//! [timing]
//! reconnect_max_millis = 60000
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use nixdispatch::client::{ClientConfig, ClientError, Prepared};
use nixdispatch::proto;
use serde::Deserialize;

use crate::discover;
use crate::error::{Error, Result};
use crate::sample::{self, SamplerConfig};

/// The configuration file, `--config FILE`. Unknown keys are errors.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC endpoint of the scheduler. Default `http://127.0.0.1:50051`, the scheduler's
    /// default listen address, so a scheduler and an agent on one machine need no config.
    pub scheduler: String,
    /// Stable id of this host, `[A-Za-z0-9._-]{1,128}`. Default: the host name, which is
    /// stable across restarts and unique among a community's builders in practice.
    pub host_id: Option<String>,
    /// Store URI clients use to reach this host. Default `ssh-ng://<hostname>`: the modern
    /// protocol, and the host name is what members usually already resolve.
    pub store_uri: Option<String>,
    /// The host's SSH public key file, pinned by clients. Default
    /// `/etc/ssh/ssh_host_ed25519_key.pub`, which every OpenSSH install generates.
    pub host_key_file: PathBuf,
    /// Nix systems built here. Default: the local Nix's `system` plus `extra-platforms`.
    pub systems: Option<Vec<String>>,
    /// Supported features. Default: the local Nix's `system-features` (empty if Nix cannot be
    /// asked, since features only widen what the host accepts).
    pub features: Option<Vec<String>>,
    /// Mandatory features. Default: none, as in a Nix machines line.
    pub mandatory_features: Vec<String>,
    /// Build slots. Default: the local Nix's `max-jobs` (`auto` is the CPU count), the number
    /// of builds the host's own Nix is willing to run at once.
    pub max_jobs: Option<u32>,
    /// Relative speed of a slot. Default 1.0, the neutral value of a Nix machines line.
    pub speed_factor: f64,
    /// The Nix store, for its free space. Default `/nix/store`.
    pub store_dir: PathBuf,
    /// The build directory, for its free space. Default `$TMPDIR` or `/tmp`, where the Nix
    /// daemon builds unless `build-dir` is set.
    pub build_dir: Option<PathBuf>,
    /// A file holding this host's token, which proves to the scheduler that the agent is this
    /// provisioned builder; its trimmed content is sent as `authorization: Bearer <token>`.
    /// Under systemd give it with `LoadCredential=` (the shipped unit reads
    /// `$CREDENTIALS_DIRECTORY/token`). Default: none, which only a scheduler in the open
    /// mode (no `[auth]`, loopback) accepts.
    pub credential_file: Option<PathBuf>,
    /// PEM file of the CA that signed the scheduler's certificate, the only CA trusted for an
    /// `https://` scheduler (required there). Default: none.
    pub ca_file: Option<PathBuf>,
    /// The name the scheduler's certificate carries, when the `scheduler` URL does not use
    /// it (e.g. an IP address). Default: none, the URL's host.
    pub tls_domain: Option<String>,
    /// The `nix` binary used for discovery. Default `nix`, from `PATH`.
    pub nix_bin: PathBuf,
    /// Group of the Nix build users, for counting builds. Default: the local Nix's
    /// `build-users-group`, or `nixbld` (the installers' name) if Nix cannot be asked. Set it to
    /// `""` for a host that runs builds without build users.
    pub build_users_group: Option<String>,
    /// Timing and back-off thresholds.
    pub timing: Timing,
    /// The local socket for the builder-side gate, `[gate]`.
    pub gate: GateSocketConfig,
}

/// `[gate]`: the Unix socket on which the agent serves the builder-side gate
/// (`nixdispatch-gate`, sshd's forced command for members), so that the gate, which runs
/// as the member, never holds this builder's credential. See `docs/gate.md`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateSocketConfig {
    /// The socket's path, e.g. `/run/nixdispatch-agent/gate.sock` (its directory must
    /// exist; systemd's `RuntimeDirectory=` makes it). Default none: no socket, and gates on
    /// this host must use the direct mode.
    pub socket: Option<PathBuf>,
    /// The socket's permission bits, e.g. `0o660` to let only the agent's group (where the
    /// gated members are) connect. Default `0o666`: any local user may connect, and the
    /// agent acts for each one only as the user it is (from the socket's peer credentials).
    pub mode: u32,
    /// Users whose gate may name the member it acts for (`nixdispatch-gate --member NAME`),
    /// for a shared login user whose `authorized_keys` entries name the member in the forced
    /// command. Default none: the member is always the connecting process's user name.
    /// Risk: anyone who can run a process as such a user can queue, keep alive and release
    /// as any member on this host.
    pub may_name_members: Vec<String>,
    /// Connections served at once. Default 256: one per gated SSH session, far above a
    /// builder's slots.
    pub max_connections: u32,
    /// Connections served at once for one user (uid). Default 32, so that one member cannot
    /// take every connection (the others' gates would then fail open).
    pub max_connections_per_user: u32,
    /// Bound on each call forwarded to the scheduler (for `WaitForLease`, on opening the
    /// stream). Default 5000.
    pub rpc_timeout_millis: u64,
}

impl Default for GateSocketConfig {
    fn default() -> Self {
        Self {
            socket: None,
            mode: 0o666,
            may_name_members: Vec::new(),
            max_connections: 256,
            max_connections_per_user: 32,
            rpc_timeout_millis: 5000,
        }
    }
}

impl GateSocketConfig {
    fn validate(&self) -> Result<()> {
        let invalid = |key, reason: &str| {
            Err(Error::InvalidConfig {
                key,
                reason: reason.into(),
            })
        };
        if let Some(p) = &self.socket
            && !p.is_absolute()
        {
            return invalid("gate.socket", "must be an absolute path");
        }
        if self.mode > 0o777 {
            return invalid("gate.mode", "must be permission bits, at most 0o777");
        }
        if self.max_connections == 0 {
            return invalid("gate.max_connections", "must be above 0");
        }
        if self.max_connections_per_user == 0 {
            return invalid("gate.max_connections_per_user", "must be above 0");
        }
        if self.rpc_timeout_millis == 0 {
            return invalid("gate.rpc_timeout_millis", "must be above 0");
        }
        for name in &self.may_name_members {
            if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_graphic()) {
                return invalid(
                    "gate.may_name_members",
                    "entries must be user names (1 to 128 printable ASCII characters)",
                );
            }
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            scheduler: "http://127.0.0.1:50051".into(),
            host_id: None,
            store_uri: None,
            host_key_file: PathBuf::from("/etc/ssh/ssh_host_ed25519_key.pub"),
            systems: None,
            features: None,
            mandatory_features: Vec::new(),
            max_jobs: None,
            speed_factor: 1.0,
            store_dir: PathBuf::from("/nix/store"),
            build_dir: None,
            credential_file: None,
            ca_file: None,
            tls_domain: None,
            nix_bin: PathBuf::from("nix"),
            build_users_group: None,
            timing: Timing::default(),
            gate: GateSocketConfig::default(),
        }
    }
}

/// Timing and back-off thresholds, `[timing]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timing {
    /// Fraction of the scheduler's deadline after which the next report is sent. Default 0.8,
    /// so a slow sample, a GC pause or a busy network never makes a report late.
    pub report_at_fraction: f64,
    /// Bound on connecting and on waiting for the answer to the registration. Default 5000.
    pub connect_timeout_millis: u64,
    /// First reconnect delay. Default 500: a restarting scheduler is usually back within a
    /// second or two.
    pub reconnect_initial_millis: u64,
    /// Largest reconnect delay (the delay doubles up to it, with jitter). Default 30000, so a
    /// scheduler that is down for long sees each agent only twice a minute.
    pub reconnect_max_millis: u64,
    /// Reconnect when the scheduler has sent nothing for this many of its own deadlines (a
    /// hung scheduler or a silently dead connection). Default 3.
    pub silent_deadlines: u32,
    /// How long to wait for the scheduler to acknowledge the goodbye on shutdown. Default 2000.
    pub goodbye_timeout_millis: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            report_at_fraction: 0.8,
            connect_timeout_millis: 5000,
            reconnect_initial_millis: 500,
            reconnect_max_millis: 30_000,
            silent_deadlines: 3,
            goodbye_timeout_millis: 2000,
        }
    }
}

impl Timing {
    fn validate(&self) -> Result<()> {
        let invalid = |key, reason: &str| {
            Err(Error::InvalidConfig {
                key,
                reason: reason.into(),
            })
        };
        if !(self.report_at_fraction > 0.0 && self.report_at_fraction <= 1.0) {
            return invalid("timing.report_at_fraction", "must be above 0 and at most 1");
        }
        if self.connect_timeout_millis == 0 {
            return invalid("timing.connect_timeout_millis", "must be above 0");
        }
        if self.reconnect_initial_millis == 0 {
            return invalid("timing.reconnect_initial_millis", "must be above 0");
        }
        if self.reconnect_max_millis < self.reconnect_initial_millis {
            return invalid(
                "timing.reconnect_max_millis",
                "must be at least reconnect_initial_millis",
            );
        }
        if self.silent_deadlines == 0 {
            return invalid("timing.silent_deadlines", "must be above 0");
        }
        Ok(())
    }
}

/// Everything the agent runs with, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The connection to the scheduler, prepared by the shared client module (endpoint,
    /// TLS with the pinned CA, credential, timeouts, HTTP/2 keepalive).
    pub client: Prepared,
    /// The registration, without the host facts (CPU count, memory) the sampler adds.
    pub register: proto::Register,
    /// What and where to sample.
    pub sampler: SamplerConfig,
    /// Timing.
    pub timing: Timing,
    /// The gate socket (`[gate]`); its `socket` is `None` when there is none.
    pub gate: GateSocketConfig,
}

impl Config {
    /// Reads and parses a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| Error::ParseConfig {
            path: path.to_owned(),
            source,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> std::result::Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Whether resolving needs to ask the local Nix.
    fn needs_nix(&self) -> bool {
        self.systems.is_none()
            || self.features.is_none()
            || self.max_jobs.is_none()
            || self.build_users_group.is_none()
    }

    /// Fills in the defaults (asking Nix only for what is unset), reads the host key and the
    /// credential, and validates everything.
    pub async fn resolve(self) -> Result<Settings> {
        self.timing.validate()?;
        self.gate.validate()?;
        let nix = if self.needs_nix() {
            let found = discover::run_nix_config(&self.nix_bin, sample::cpu_count()).await;
            if let Err(error) = &found {
                let error: &dyn std::error::Error = error;
                tracing::warn!(error, "cannot discover the local Nix settings");
            }
            found.map_err(|e| e.to_string())
        } else {
            Err("not asked".to_owned())
        };
        let hostname = discover::hostname();
        let undiscovered = |key, reason: &str| Error::Undiscovered {
            key,
            reason: reason.to_owned(),
        };

        let host_id = match self.host_id {
            Some(id) => id,
            None => hostname
                .clone()
                .ok_or_else(|| undiscovered("host_id", "the host name is unknown"))?,
        };
        nixdispatch::validate::host_id(&host_id).map_err(|e| Error::InvalidConfig {
            key: "host_id",
            reason: format!("{host_id:?} {}", e.0),
        })?;

        let store_uri = match self.store_uri {
            Some(uri) => uri,
            None => format!(
                "ssh-ng://{}",
                hostname.ok_or_else(|| undiscovered("store_uri", "the host name is unknown"))?
            ),
        };
        validate_store_uri(&store_uri)?;

        let systems = match self.systems {
            Some(systems) => systems,
            None => nix
                .as_ref()
                .map_err(|e| undiscovered("systems", e))?
                .systems(),
        };
        validate_list("systems", &systems, 1, 16, |c| {
            c.is_ascii_alphanumeric() || "_.-".contains(c)
        })?;

        let features = match self.features {
            Some(features) => features,
            None => nix
                .as_ref()
                .map(|n| n.system_features.clone())
                .unwrap_or_default(),
        };
        let feature_char = |c: char| c.is_ascii_alphanumeric() || "_.+-".contains(c);
        validate_list("features", &features, 0, 64, feature_char)?;
        validate_list(
            "mandatory_features",
            &self.mandatory_features,
            0,
            64,
            feature_char,
        )?;

        let max_jobs = match self.max_jobs {
            Some(n) => n,
            None => {
                nix.as_ref()
                    .map_err(|e| undiscovered("max_jobs", e))?
                    .max_jobs
            }
        };
        if !(1..=1024).contains(&max_jobs) {
            return Err(Error::InvalidConfig {
                key: "max_jobs",
                reason: format!(
                    "{max_jobs} is not between 1 and 1024 (a `max-jobs = 0` host must set it)"
                ),
            });
        }

        if !(self.speed_factor.is_finite()
            && self.speed_factor > 0.0
            && self.speed_factor <= 1000.0)
        {
            return Err(Error::InvalidConfig {
                key: "speed_factor",
                reason: format!("{} is not above 0 and at most 1000", self.speed_factor),
            });
        }

        let key_text =
            std::fs::read_to_string(&self.host_key_file).map_err(|source| Error::ReadFile {
                key: "host_key_file",
                path: self.host_key_file.clone(),
                source,
            })?;
        let host_public_key =
            discover::parse_host_key(&key_text).map_err(|reason| Error::InvalidConfig {
                key: "host_key_file",
                reason,
            })?;
        nixdispatch::validate::host_key(&host_public_key).map_err(|e| Error::InvalidConfig {
            key: "host_key_file",
            reason: e.0,
        })?;

        if !(self.scheduler.starts_with("http://") || self.scheduler.starts_with("https://")) {
            return Err(Error::InvalidConfig {
                key: "scheduler",
                reason: "must be an http:// or https:// URL".into(),
            });
        }
        let client = Prepared::new(&ClientConfig {
            endpoint: self.scheduler.clone(),
            credential_file: self.credential_file.clone(),
            connect_timeout: Duration::from_millis(self.timing.connect_timeout_millis),
            request_timeout: None,
            ca_file: self.ca_file.clone(),
            tls_domain: self.tls_domain.clone(),
            // HTTP/2 pings find a connection that died without a FIN (a partition, a host
            // that lost power) long before TCP would.
            keepalive: Some((Duration::from_secs(15), Duration::from_secs(10))),
        })
        .map_err(|e| match e {
            ClientError::Credential { path, source } => Error::ReadFile {
                key: "credential_file",
                path,
                source,
            },
            ClientError::Ca { path, source } => Error::ReadFile {
                key: "ca_file",
                path,
                source,
            },
            ClientError::BadToken { .. } => Error::InvalidConfig {
                key: "credential_file",
                reason: "the token is not one line of printable ASCII".into(),
            },
            other => Error::Client(other),
        })?;

        let build_users_group = match self.build_users_group {
            Some(group) => Some(group),
            None => match &nix {
                Ok(n) => n.build_users_group.clone(),
                Err(_) => Some("nixbld".to_owned()),
            },
        };
        let build_dir = self.build_dir.unwrap_or_else(|| {
            std::env::var_os("TMPDIR")
                .filter(|t| !t.is_empty())
                .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
        });
        let group = build_users_group.clone();
        let build_users =
            tokio::task::spawn_blocking(move || sample::resolve_build_users(group.as_deref()))
                .await
                .unwrap_or_default();

        Ok(Settings {
            client,
            register: proto::Register {
                host_id,
                store_uri,
                host_public_key,
                systems,
                supported_features: features,
                mandatory_features: self.mandatory_features,
                max_jobs,
                speed_factor: self.speed_factor,
                cpu_count: 0,
                total_memory_bytes: 0,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            },
            sampler: SamplerConfig {
                proc_root: PathBuf::from("/proc"),
                store_dir: self.store_dir,
                build_dir,
                build_users,
            },
            timing: self.timing,
            gate: self.gate,
        })
    }
}

fn validate_id(
    key: &'static str,
    value: &str,
    max: usize,
    ok: impl Fn(char) -> bool,
) -> Result<()> {
    if value.is_empty() || value.len() > max || !value.chars().all(ok) {
        return Err(Error::InvalidConfig {
            key,
            reason: format!("{value:?} must be 1 to {max} characters of the allowed set"),
        });
    }
    Ok(())
}

fn validate_list(
    key: &'static str,
    values: &[String],
    min: usize,
    max: usize,
    ok: impl Fn(char) -> bool + Copy,
) -> Result<()> {
    if values.len() < min || values.len() > max {
        return Err(Error::InvalidConfig {
            key,
            reason: format!("{} entries, must be {min} to {max}", values.len()),
        });
    }
    values.iter().try_for_each(|v| validate_id(key, v, 64, ok))
}

/// The protocol's rule (`nixdispatch::validate::store_uri`), the one the scheduler and the
/// hook apply: an agent never registers a URI the scheduler would refuse.
fn validate_store_uri(uri: &str) -> Result<()> {
    nixdispatch::validate::store_uri(uri).map_err(|e| Error::InvalidConfig {
        key: "store_uri",
        reason: format!("{uri:?}: {}", e.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explicit(dir: &Path) -> Config {
        let key = dir.join("host.pub");
        std::fs::write(
            &key,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0wF5n9l6V8vWqjYsFNeaUhgSJHdcD1t0Cg+2mWQn9R x\n",
        )
        .unwrap();
        Config {
            host_id: Some("b1".into()),
            store_uri: Some("ssh-ng://root@127.0.0.1:2222".into()),
            host_key_file: key,
            systems: Some(vec!["x86_64-linux".into()]),
            features: Some(vec![]),
            max_jobs: Some(2),
            build_users_group: Some(String::new()),
            nix_bin: PathBuf::from("/nonexistent/nix"),
            ..Config::default()
        }
    }

    /// An empty file is the embedded defaults, and every documented key parses.
    #[test]
    fn toml_defaults_and_keys() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
        let c = Config::from_toml(
            r#"
            scheduler = "http://s:1"
            host_id = "h"
            store_uri = "ssh://h"
            host_key_file = "/k"
            systems = ["x86_64-linux"]
            features = ["kvm"]
            mandatory_features = ["benchmark"]
            max_jobs = 3
            speed_factor = 2.5
            store_dir = "/nix/store"
            build_dir = "/build"
            credential_file = "/c"
            nix_bin = "/bin/nix"
            build_users_group = ""
            [timing]
            report_at_fraction = 0.5
            connect_timeout_millis = 1
            reconnect_initial_millis = 1
            reconnect_max_millis = 2
            silent_deadlines = 4
            goodbye_timeout_millis = 5
            "#,
        )
        .unwrap();
        assert_eq!(c.max_jobs, Some(3));
        assert_eq!(c.timing.silent_deadlines, 4);
    }

    /// Unknown keys and wrong types are errors naming the key.
    #[test]
    fn toml_errors_name_the_key() {
        let err = Config::from_toml("max_job = 3").unwrap_err().to_string();
        assert!(err.contains("max_job"), "{err}");
        let err = Config::from_toml("[timing]\nsilent_deadlines = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("silent_deadlines"), "{err}");
    }

    /// Explicit settings resolve without Nix (the binary is missing) into a valid registration.
    #[tokio::test]
    async fn explicit_settings_skip_nix() {
        let dir = tempfile::tempdir().unwrap();
        let s = explicit(dir.path()).resolve().await.unwrap();
        assert_eq!(s.register.host_id, "b1");
        assert_eq!(s.register.systems, ["x86_64-linux"]);
        assert_eq!(s.register.max_jobs, 2);
        assert!(s.register.host_public_key.starts_with("ssh-ed25519 "));
        assert_eq!(s.client.endpoint(), "http://127.0.0.1:50051");
    }

    /// Missing required settings without Nix name the key to set.
    #[tokio::test]
    async fn undiscoverable_names_key() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            systems: None,
            ..explicit(dir.path())
        };
        let err = config.resolve().await.unwrap_err();
        assert!(
            matches!(err, Error::Undiscovered { key: "systems", .. }),
            "{err}"
        );
        let config = Config {
            max_jobs: None,
            ..explicit(dir.path())
        };
        let err = config.resolve().await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Undiscovered {
                    key: "max_jobs",
                    ..
                }
            ),
            "{err}"
        );
    }

    /// Out-of-range values are refused with their key.
    #[tokio::test]
    async fn validation_names_key() {
        let dir = tempfile::tempdir().unwrap();
        let cases: Vec<(Config, &str)> = vec![
            (
                Config {
                    host_id: Some("a b".into()),
                    ..explicit(dir.path())
                },
                "host_id",
            ),
            (
                Config {
                    store_uri: Some("http://x".into()),
                    ..explicit(dir.path())
                },
                "store_uri",
            ),
            (
                Config {
                    systems: Some(vec![]),
                    ..explicit(dir.path())
                },
                "systems",
            ),
            (
                Config {
                    features: Some(vec!["a b".into()]),
                    ..explicit(dir.path())
                },
                "features",
            ),
            (
                Config {
                    max_jobs: Some(0),
                    ..explicit(dir.path())
                },
                "max_jobs",
            ),
            (
                Config {
                    speed_factor: f64::NAN,
                    ..explicit(dir.path())
                },
                "speed_factor",
            ),
            (
                Config {
                    scheduler: "not a url".into(),
                    ..explicit(dir.path())
                },
                "scheduler",
            ),
            (
                Config {
                    host_key_file: "/nonexistent".into(),
                    ..explicit(dir.path())
                },
                "host_key_file",
            ),
            (
                Config {
                    credential_file: Some("/nonexistent".into()),
                    ..explicit(dir.path())
                },
                "credential_file",
            ),
            (
                Config {
                    timing: Timing {
                        report_at_fraction: 1.5,
                        ..Timing::default()
                    },
                    ..explicit(dir.path())
                },
                "timing.report_at_fraction",
            ),
        ];
        for (config, key) in cases {
            let err = config.resolve().await.unwrap_err();
            let named = match &err {
                Error::InvalidConfig { key, .. } | Error::ReadFile { key, .. } => *key,
                _ => "",
            };
            assert_eq!(named, key, "{err}");
        }
    }

    /// The store URIs the scheduler refuses at registration (issue 9: `;`, a leading `-`,
    /// `?remote-program=`, and others outside the shared rule of `nixdispatch::validate`) are
    /// refused by the agent's config loader at start, naming `store_uri`, instead of
    /// registering and being refused later; the URIs it accepts pass.
    #[tokio::test]
    async fn store_uris_the_scheduler_refuses_fail_at_start() {
        let dir = tempfile::tempdir().unwrap();
        for uri in [
            "ssh-ng://b;x",
            "ssh://-oProxyCommand=x",
            "ssh-ng://b?remote-program=/tmp/evil",
            "ssh-ng://b,c",
            "ssh-ng://b/path",
            "",
        ] {
            let text = format!("store_uri = {uri:?}");
            let config = Config {
                store_uri: Config::from_toml(&text).unwrap().store_uri,
                ..explicit(dir.path())
            };
            assert!(
                nixdispatch::validate::store_uri(uri).is_err(),
                "the shared rule refuses {uri:?}"
            );
            let err = config.resolve().await.unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidConfig {
                        key: "store_uri",
                        ..
                    }
                ),
                "{uri:?}: {err}"
            );
            assert!(err.to_string().contains("store_uri"), "{err}");
        }
        for uri in [
            "ssh-ng://nix@build01.example.org",
            "ssh://root@127.0.0.1:2222",
        ] {
            let config = Config {
                store_uri: Some(uri.into()),
                ..explicit(dir.path())
            };
            assert_eq!(config.resolve().await.unwrap().register.store_uri, uri);
        }
    }

    /// The credential file is read at start (its header is the shared client's, tested
    /// there); a token that cannot be a header is refused naming `credential_file`.
    #[tokio::test]
    async fn credential_is_read_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let cred = dir.path().join("token");
        std::fs::write(&cred, "  s3cret\n").unwrap();
        let config = Config {
            credential_file: Some(cred.clone()),
            ..explicit(dir.path())
        };
        config.clone().resolve().await.unwrap();
        std::fs::write(&cred, "two words").unwrap();
        let e = config.resolve().await.unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidConfig {
                    key: "credential_file",
                    ..
                }
            ),
            "{e}"
        );
    }
}
