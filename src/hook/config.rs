//! The hook's configuration file (`/etc/nixdispatch/hook.toml`, or the file named by
//! `NIXDISPATCH_HOOK_CONFIG`). Every key has a default, so a missing file means "talk to a
//! scheduler on this machine"; see `docs/hook.md` for a commented example.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the configuration is read from when `NIXDISPATCH_HOOK_CONFIG` is not set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/nixdispatch/hook.toml";

/// The environment variable that overrides [`DEFAULT_CONFIG_PATH`]. Nix 2.8 gives the hook
/// no arguments of our choosing, so the daemon's environment is the only other channel.
pub const CONFIG_ENV: &str = "NIXDISPATCH_HOOK_CONFIG";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HookConfig {
    /// The scheduler's gRPC endpoint. Default `http://127.0.0.1:50051`: the scheduler's
    /// default listen address, so a single-machine setup needs no file at all.
    pub scheduler: String,
    /// A file holding the member's token, sent as `authorization: Bearer <token>`; the
    /// scheduler derives the member from it. Keep it readable by the nix-daemon only (or give
    /// it with systemd's `LoadCredential=`). Default none: only a scheduler in the open mode
    /// (no `[auth]`, loopback) accepts calls without one.
    pub credential_file: Option<PathBuf>,
    /// PEM file of the CA that signed the scheduler's certificate, the only CA trusted for an
    /// `https://` scheduler (required there). Default: none.
    pub ca_file: Option<PathBuf>,
    /// The name the scheduler's certificate carries, when the `scheduler` URL does not use
    /// it. Default: none, the URL's host.
    pub tls_domain: Option<String>,
    /// A label for this machine in the scheduler's logs. With credentials the scheduler
    /// derives the member from the token and uses this only as a label (it must not be
    /// another member's name); without, it is the client's identity. Default: the host name.
    pub client_id: Option<String>,
    /// The private key ssh uses for builders (third field of the machines line). Default
    /// none: ssh's own default identities and `NIX_SSHOPTS` apply.
    pub ssh_identity: Option<PathBuf>,
    /// The stock build-remote to hand accepted builds to, as program and leading arguments,
    /// e.g. `["/usr/libexec/nix/build-remote"]` (Nix 2.8/2.9) or `["nix", "__build-remote"]`
    /// (Nix 2.10 and later). Default: detected from the Nix that started the hook.
    pub build_remote: Option<Vec<String>>,
    /// Machines (Nix's machines format, or `@/path/to/file`) to use, through the stock
    /// build-remote, when the scheduler cannot be reached. Default none: builds go local.
    pub fallback_builders: Option<String>,
    /// How many hosts an accepted build tries before it fails because none could be reached.
    /// Default 3: enough to step over a dead host or two without stalling a build forever.
    pub max_host_attempts: u32,
    /// Tracing log file. Default none: the hook's fd 2 belongs to Nix, so logs go nowhere
    /// unless asked for.
    pub log_file: Option<PathBuf>,
    /// Tracing filter for `log_file`, `RUST_LOG` syntax. Default `info`.
    pub log_level: String,
    /// Time bounds.
    pub timeouts: Timeouts,
    /// Reusing SSH connections to builders.
    pub ssh_reuse: SshReuse,
}

/// One persistent OpenSSH master connection per builder, which the stock build-remote's ssh
/// joins (`ControlPath`), so that a build does not pay a new SSH connection (see
/// `docs/hook.md`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshReuse {
    /// Whether to keep and use master connections. Default true: a new connection costs a
    /// key exchange and a login per build (a few hundred ms on a LAN, more across the
    /// internet), while a builder slot sits idle. Off, every build connects anew, as stock
    /// Nix does.
    pub enabled: bool,
    /// How long a master stays open with no build using it (OpenSSH `ControlPersist`),
    /// whole seconds. Default 60: long enough to carry a burst of builds from one slot to
    /// the next, short enough not to keep a login open on every builder all day.
    pub persist_secs: u64,
    /// The directory of the control sockets, created mode 0700 and refused unless it is
    /// owned by the hook's user and closed to others. At most 64 bytes (a Unix socket path
    /// is limited to about 104). Default: `/run/nixdispatch-hook-<uid>`, else
    /// `<temp dir>/nixdispatch-hook-<uid>` when `/run` is not writable.
    pub control_dir: Option<PathBuf>,
}

impl Default for SshReuse {
    fn default() -> Self {
        SshReuse {
            enabled: true,
            persist_secs: 60,
            control_dir: None,
        }
    }
}

/// Time bounds, all in milliseconds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP/HTTP2 connect to the scheduler. Default 1000: a scheduler on the LAN answers in
    /// well under that, and the daemon is blocked while the hook waits.
    pub connect_millis: u64,
    /// Hard bound on answering one `try`, connect included. Default 2000. Past it the hook
    /// treats the scheduler as unreachable for this `try`.
    pub try_millis: u64,
    /// Bound on each `KeepAlive`, `Release` and post-accept `Acquire` call. Default 3000.
    pub rpc_millis: u64,
    /// After the scheduler was unreachable, answer from the fallback (or decline) without
    /// calling it again for this long. Default 10000: one dead scheduler must not cost every
    /// `try` of a big build the full connect timeout.
    pub unreachable_backoff_millis: u64,
    /// After an accepted build's host proved unreachable, how long to keep asking the
    /// scheduler for another host (it may answer "wait") before failing. Default 120000.
    pub reacquire_millis: u64,
    /// A build this client cannot build itself is accepted at once and waits for a lease in
    /// the scheduler's queue, re-connecting when the scheduler goes away; past this long it
    /// goes to the fallback builders, or fails saying why. Default 14400000 (4 h): a mass
    /// rebuild on a busy community fleet can legitimately wait hours, a build stuck longer
    /// than that wants a person to look.
    pub max_wait_millis: u64,
    /// A waiting stream that brings no word for this long is taken as broken and opened
    /// again. Default 30000: the scheduler sends one at least every 5 s.
    pub wait_idle_millis: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect_millis: 1000,
            try_millis: 2000,
            rpc_millis: 3000,
            unreachable_backoff_millis: 10_000,
            reacquire_millis: 120_000,
            max_wait_millis: 4 * 3600 * 1000,
            wait_idle_millis: 30_000,
        }
    }
}

impl Default for HookConfig {
    fn default() -> Self {
        HookConfig {
            scheduler: "http://127.0.0.1:50051".to_owned(),
            credential_file: None,
            ca_file: None,
            tls_domain: None,
            client_id: None,
            ssh_identity: None,
            build_remote: None,
            fallback_builders: None,
            max_host_attempts: 3,
            log_file: None,
            log_level: "info".to_owned(),
            timeouts: Timeouts::default(),
            ssh_reuse: SshReuse::default(),
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        #[source]
        source: toml::de::Error,
    },
    /// A key has a value the hook cannot use.
    #[error("{path}: `{key}` {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl HookConfig {
    /// Parses and validates a configuration text; `path` only names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: HookConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Loads the file at `path`; a missing file gives the embedded defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HookConfig::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The path to load: `NIXDISPATCH_HOOK_CONFIG` when set and non-empty, else the default.
    pub fn path_from_env(env_value: Option<&str>) -> PathBuf {
        match env_value {
            Some(v) if !v.is_empty() => PathBuf::from(v),
            _ => PathBuf::from(DEFAULT_CONFIG_PATH),
        }
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, problem: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            problem: problem.to_owned(),
        };
        if !(self.scheduler.starts_with("http://") || self.scheduler.starts_with("https://")) {
            return Err(invalid("scheduler", "must be an http:// or https:// URL"));
        }
        if let Some(id) = &self.client_id
            && (id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_graphic()))
        {
            return Err(invalid(
                "client_id",
                "must be 1 to 128 printable ASCII characters without spaces",
            ));
        }
        if let Some(id) = &self.ssh_identity
            && id
                .to_string_lossy()
                .chars()
                .any(super::machine::breaks_machines_line)
        {
            return Err(invalid(
                "ssh_identity",
                "cannot contain whitespace, `;` or `#` (it is a machines-line field)",
            ));
        }
        if let Some(br) = &self.build_remote
            && br.first().is_none_or(String::is_empty)
        {
            return Err(invalid("build_remote", "must name a program"));
        }
        if let Some(dir) = &self.ssh_reuse.control_dir
            && let Err(problem) = super::ssh::check_control_dir(dir)
        {
            return Err(invalid("ssh_reuse.control_dir", problem));
        }
        if self.ssh_reuse.persist_secs == 0 {
            return Err(invalid("ssh_reuse.persist_secs", "must be at least 1"));
        }
        if self.max_host_attempts == 0 {
            return Err(invalid("max_host_attempts", "must be at least 1"));
        }
        let t = &self.timeouts;
        for (key, v) in [
            ("timeouts.connect_millis", t.connect_millis),
            ("timeouts.try_millis", t.try_millis),
            ("timeouts.rpc_millis", t.rpc_millis),
            ("timeouts.max_wait_millis", t.max_wait_millis),
            ("timeouts.wait_idle_millis", t.wait_idle_millis),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// The `try` bound.
    pub fn try_timeout(&self) -> Duration {
        Duration::from_millis(self.timeouts.try_millis)
    }

    /// The bound on other calls.
    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.timeouts.rpc_millis)
    }
}

/// The client id when the configuration names none: the host name, else `unknown-client`.
pub fn default_client_id() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or_else(|| "unknown-client".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty file is the embedded defaults.
    #[test]
    fn empty_is_default() {
        assert_eq!(
            HookConfig::from_toml("", Path::new("x")).unwrap(),
            HookConfig::default()
        );
    }

    /// Every documented key parses.
    #[test]
    fn full_file_parses() {
        let c = HookConfig::from_toml(
            r#"
            scheduler = "http://10.0.0.1:50051"
            credential_file = "/etc/nixdispatch/token"
            client_id = "alice-laptop"
            ssh_identity = "/etc/nixdispatch/id_ed25519"
            build_remote = ["/usr/libexec/nix/build-remote"]
            fallback_builders = "ssh-ng://b1 x86_64-linux - 1 1"
            max_host_attempts = 2
            log_file = "/var/log/nixdispatch-hook.log"
            log_level = "debug"
            [timeouts]
            connect_millis = 100
            try_millis = 500
            rpc_millis = 1000
            unreachable_backoff_millis = 0
            reacquire_millis = 5000
            [ssh_reuse]
            enabled = false
            persist_secs = 30
            control_dir = "/run/nd-hook"
            "#,
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.scheduler, "http://10.0.0.1:50051");
        assert_eq!(c.timeouts.try_millis, 500);
        assert_eq!(c.max_host_attempts, 2);
        assert!(!c.ssh_reuse.enabled);
        assert_eq!(c.ssh_reuse.persist_secs, 30);
    }

    /// Unknown keys and bad values are errors that name the key.
    #[test]
    fn errors_name_the_key() {
        let e = HookConfig::from_toml("schedular = 'x'", Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("schedular"), "{e}");
        let e = HookConfig::from_toml("scheduler = 'tcp://x'", Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`scheduler`"), "{e}");
        let e = HookConfig::from_toml("[timeouts]\ntry_millis = 0", Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("timeouts.try_millis"), "{e}");
        let e = HookConfig::from_toml("max_host_attempts = 0", Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_host_attempts"), "{e}");
        for bad in [
            "control_dir = 'relative'",
            "control_dir = '/a b'",
            "control_dir = '/a%h'",
            "persist_secs = 0",
        ] {
            let e = HookConfig::from_toml(&format!("[ssh_reuse]\n{bad}"), Path::new("f"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("`ssh_reuse."), "{bad}: {e}");
        }
        let long = format!("[ssh_reuse]\ncontrol_dir = '/{}'", "d".repeat(64));
        let e = HookConfig::from_toml(&long, Path::new("f"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("64 bytes"), "{e}");
    }

    /// Found by the `hook_machine` fuzz target: an SSH identity with `;` or `#` would end
    /// the machines line or start a comment in it (dropping the pinned host key), so it is
    /// refused like whitespace.
    #[test]
    fn ssh_identity_must_fit_a_machines_line() {
        for bad in ["/k;ssh://evil", "/k#1", "/a b"] {
            let e = HookConfig::from_toml(&format!("ssh_identity = '{bad}'"), Path::new("f"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("`ssh_identity`"), "{e}");
        }
    }

    /// A missing file is the defaults; the environment variable picks the file.
    #[test]
    fn missing_file_and_env() {
        let c = HookConfig::load(Path::new("/nonexistent/nixdispatch/hook.toml")).unwrap();
        assert_eq!(c, HookConfig::default());
        assert_eq!(
            HookConfig::path_from_env(None),
            PathBuf::from(DEFAULT_CONFIG_PATH)
        );
        assert_eq!(
            HookConfig::path_from_env(Some("")),
            PathBuf::from(DEFAULT_CONFIG_PATH)
        );
        assert_eq!(
            HookConfig::path_from_env(Some("/x.toml")),
            PathBuf::from("/x.toml")
        );
    }
}
