//! The builder-side gate in the end-to-end harness: builders whose sshd runs
//! `nixdispatch-gate` for every member (per-key `command=` lines naming the member, or one
//! `ForceCommand`), and member machines running **stock** Nix with no nixdispatch at all,
//! builders listed in their own nix.conf.
//!
//! Builds of the fixture record, on the builder, how many builds of the fixture were
//! running when they started (`/nix/gate-peaks` in the builder's own `/nix`), so that the
//! peak per builder is measured from the builder's side, and when each started and ended
//! (`/nix/gate-times`, the builder's uptime in seconds).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::nixver::NixVersion;
use super::{Env, Namespace, NixRun};

/// The gate binary of this workspace.
pub fn gate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_nixdispatch-gate"))
}

/// How the gate runs on a builder.
#[derive(Debug, Clone)]
pub struct GateOpts {
    /// The scheduler URL (`None`: the environment's scheduler).
    pub scheduler: Option<String>,
    /// `fail_closed` in the gate's configuration.
    pub fail_closed: bool,
    /// The builder's `nix-daemon` and `nix-store` (`None`: from `PATH`), so that the same
    /// tests can run another Nix on the builder.
    pub nix_daemon: Option<String>,
    /// See `nix_daemon`.
    pub nix_store: Option<String>,
    /// Also set `ForceCommand` (member = the sshd user) for keys without a `command=`.
    pub force_command: bool,
    /// Ask the builder's agent through its gate socket (`Env::gate_sockets`) instead of
    /// the scheduler, with no credential in the gate's configuration.
    pub agent_socket: bool,
}

impl Default for GateOpts {
    fn default() -> Self {
        GateOpts {
            scheduler: None,
            fail_closed: false,
            nix_daemon: std::env::var("NIXDISPATCH_E2E_BUILDER_NIX_DAEMON").ok(),
            nix_store: std::env::var("NIXDISPATCH_E2E_BUILDER_NIX_STORE").ok(),
            force_command: false,
            agent_socket: false,
        }
    }
}

/// A member machine: its own key, nix.conf and ssh aliases (so that the client-side
/// per-machine slot locks, keyed by store URI, are its own).
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub key: PathBuf,
    pub conf_dir: PathBuf,
}

/// A member's machine running a stock Nix of another version than the host's (see
/// [`Env::stock_machine`]); the processes inside end with it.
pub struct StockMachine {
    /// The Nix it runs.
    pub nix: NixVersion,
    /// Its `/nix` is `root/nix`.
    pub root: PathBuf,
    ns: Namespace,
}

impl StockMachine {
    /// A store path of this machine, as a path the test can read.
    pub fn host_path(&self, store_path: &str) -> PathBuf {
        self.root.join(store_path.trim_start_matches('/'))
    }
}

/// The Nix fixture of these tests: `n` independent leaves that sleep `sleep` seconds and
/// record the running count on the builder.
const FIXTURE: &str = r#"
{ tag, n ? 6, sleep ? "1" }:
let
  bbdir = builtins.path { path = ./bb; name = "busybox-static"; };
  bb = "${bbdir}/busybox";
  leaf = i: derivation {
    name = "gate${toString i}-${tag}";
    system = builtins.currentSystem;
    builder = bb;
    args = [ "sh" "-c" ''
      ${bb} mkdir -p /nix/gate-running
      ${bb} touch /nix/gate-running/$$
      n=$(${bb} ls /nix/gate-running | ${bb} wc -l)
      echo $n >> /nix/gate-peaks
      t0=$(${bb} cut -d' ' -f1 /proc/uptime)
      ${bb} sleep ${sleep}
      echo "gate${toString i}-${tag} $t0 $(${bb} cut -d' ' -f1 /proc/uptime)" >> /nix/gate-times
      ${bb} rm /nix/gate-running/$$
      echo "gate${toString i} $(${bb} cat /nix/builder-id 2>/dev/null || echo local) $n" > $out
    '' ];
  };
in builtins.genList (i: leaf (i + 1)) n
"#;

impl Env {
    /// Installs the gate on builder `id` for `members` (each key's `command=` names its
    /// member) and returns the gate's log file.
    pub fn install_gate(&self, id: &str, members: &[Member], opts: &GateOpts) -> PathBuf {
        let d = self.path();
        let log = d.join(format!("log/gate_{id}.log"));
        let scheduler = opts
            .scheduler
            .clone()
            .or_else(|| self.scheduler_addr.clone())
            .expect("a scheduler URL");
        let mut config = format!(
            "scheduler = \"{scheduler}\"\nhost_id = \"{id}\"\nfail_closed = {}\nlog_file = \"{}\"\nlog_level = \"info,nixdispatch=debug\"\n",
            opts.fail_closed,
            log.display()
        );
        if opts.agent_socket {
            config.push_str(&format!(
                "agent_socket = \"{}\"\n",
                d.join(format!("gate_{id}.sock")).display()
            ));
        } else if self.secure {
            // The builder's own credential, as its agent has it, and the scheduler's CA.
            config.push_str(&format!(
                "credential_file = \"{0}/secrets/host-{id}.token\"\nca_file = \"{0}/secrets/ca.pem\"\ntls_domain = \"localhost\"\n",
                d.display()
            ));
        }
        if let Some(p) = &opts.nix_daemon {
            config.push_str(&format!("nix_daemon = \"{p}\"\n"));
        }
        if let Some(p) = &opts.nix_store {
            config.push_str(&format!("nix_store = \"{p}\"\n"));
        }
        config.push_str(
            "[timeouts]\npoll_min_millis = 100\npoll_max_millis = 500\nconnect_millis = 500\n",
        );
        let config_path = d.join(format!("gate_{id}.toml"));
        std::fs::write(&config_path, config).unwrap();
        // Inside the test directory, so that builders in chroots (newer Nix) can run it.
        let gate = format!(
            "{} --config {}",
            self.bin("nixdispatch-gate").display(),
            config_path.display()
        );
        let mut keys = String::new();
        for m in members {
            let public = std::fs::read_to_string(m.key.with_extension("pub")).unwrap();
            keys.push_str(&format!(
                "command=\"{gate} --member {}\" {}\n",
                m.name,
                public.trim()
            ));
        }
        let client = std::fs::read_to_string(d.join("keys/client.pub")).unwrap();
        keys.push_str(client.trim());
        keys.push('\n');
        let keys_file = d.join(format!("keys/authorized_keys_{id}"));
        std::fs::write(&keys_file, keys).unwrap();
        // sshd reads its configuration at every connection (`sshd -i`): rewriting it now
        // applies to every later session.
        let sshd_config = d.join(format!("sshd_{id}.config"));
        let mut lines: Vec<String> = std::fs::read_to_string(&sshd_config)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("AuthorizedKeysFile") && !l.starts_with("ForceCommand"))
            .map(str::to_owned)
            .collect();
        lines.push(format!("AuthorizedKeysFile {}", keys_file.display()));
        if opts.force_command {
            lines.push(format!("ForceCommand {gate}"));
        }
        lines.push(String::new());
        std::fs::write(&sshd_config, lines.join("\n")).unwrap();
        log
    }

    /// Creates a member: a key and an ssh alias per builder (`<alias>-<member>`).
    pub fn member(&self, name: &str) -> Member {
        let d = self.path();
        let key = d.join(format!("keys/member-{name}"));
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cfg = std::fs::read_to_string(&self.ssh_config).unwrap();
        for b in &self.builders {
            let Some(ep) = &b.endpoint else { continue };
            let alias = format!("{}-{name}", b.alias);
            cfg.push_str(&format!(
                "Host {alias}\n  HostName 127.0.0.1\n  Port {}\n  HostKeyAlias {alias}\n  User root\n  \
                 IdentitiesOnly yes\n  StrictHostKeyChecking yes\n  UserKnownHostsFile {}/keys/known_hosts_empty\n  \
                 GlobalKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n  ConnectTimeout 10\n",
                ep.port,
                d.display()
            ));
        }
        std::fs::write(&self.ssh_config, cfg).unwrap();
        let conf_dir = d.join(format!("member-{name}"));
        std::fs::create_dir_all(&conf_dir).unwrap();
        Member {
            name: name.to_owned(),
            key,
            conf_dir,
        }
    }

    /// Writes the member's nix.conf: every builder in `builders` with `max_jobs` slots as
    /// the member sees it, through `scheme` (`ssh-ng` or `ssh`), nothing built locally.
    pub fn member_nix_conf(&self, m: &Member, builders: &[&str], scheme: &str, max_jobs: u32) {
        let machines: Vec<String> = builders
            .iter()
            .map(|id| {
                let b = self.builder(id);
                format!(
                    "{scheme}://{}-{} {} {} {max_jobs} 1 - - {}",
                    b.alias,
                    m.name,
                    super::this_system(),
                    m.key.display(),
                    b.host_key_base64()
                )
            })
            .collect();
        std::fs::write(m.conf_dir.join("machines"), machines.join("\n") + "\n").unwrap();
        std::fs::write(
            m.conf_dir.join("nix.conf"),
            format!(
                "substituters =\nsandbox = false\nbuild-users-group =\nbuilders = @{}\nmax-jobs = 0\nbuild-poll-interval = 1\n",
                m.conf_dir.join("machines").display()
            ),
        )
        .unwrap();
        if !self.path().join("gate-e2e.nix").exists() {
            std::fs::write(self.path().join("gate-e2e.nix"), FIXTURE).unwrap();
        }
    }

    /// The stock `nix-build` of the gate fixture as member `m` (under `timeout`).
    pub fn member_build_command(&self, m: &Member, tag: &str, n: u32, sleep: &str) -> Command {
        self.member_build_command_on(None, m, tag, n, sleep)
    }

    /// A member's machine running `nix` with nothing of nixdispatch: its own `/nix`, in a
    /// namespace whose root is that version's chroot (see [`NixVersion::chroot`]).
    pub fn stock_machine(&self, nix: NixVersion) -> StockMachine {
        let root = self
            .path()
            .join(format!("stock-{}", nix.label().replace('.', "")));
        std::fs::create_dir_all(root.join("nix/store")).unwrap();
        let ns = Namespace::start(&root, nix.chroot().as_deref());
        let out = ns
            .command(Path::new("nix"))
            .arg("--version")
            .output()
            .unwrap();
        let version = String::from_utf8_lossy(&out.stdout);
        assert!(
            version.contains(&format!(" {}.", nix.label())),
            "{nix} machine runs {version}"
        );
        StockMachine { nix, root, ns }
    }

    /// The stock `nix-build` of the gate fixture as member `m`, on `machine` (`None`: the
    /// host's Nix and `/nix`), under `timeout`.
    pub fn member_build_command_on(
        &self,
        machine: Option<&StockMachine>,
        m: &Member,
        tag: &str,
        n: u32,
        sleep: &str,
    ) -> Command {
        let mut cmd = match machine {
            Some(machine) => machine.ns.command(Path::new("timeout")),
            None => Command::new("timeout"),
        };
        cmd.args(["240", "nix-build", "--no-out-link"])
            .arg(self.path().join("gate-e2e.nix"))
            .args([
                "--argstr",
                "tag",
                tag,
                "--arg",
                "n",
                &n.to_string(),
                "--argstr",
                "sleep",
                sleep,
            ])
            .env("NIX_CONF_DIR", &m.conf_dir)
            .env("NIX_SSHOPTS", format!("-F {}", self.ssh_config.display()))
            .env_remove("NIX_REMOTE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// `NIX_SSHOPTS` for running Nix commands by hand against builder `id`, as member `m`
    /// (host `<alias>-<member>`) or directly (`None`: host `<alias>`, the harness's key):
    /// the ssh_config, the key, and a known_hosts file pinning the builder's host key.
    pub fn sshopts(&self, id: &str, m: Option<&Member>) -> (String, String) {
        let b = self.builder(id);
        let (host, key) = match m {
            Some(m) => (format!("{}-{}", b.alias, m.name), m.key.clone()),
            None => (b.alias.clone(), self.client_key.clone()),
        };
        let key_line = std::fs::read_to_string(&b.host_key_pub).unwrap();
        let key_line = key_line
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let known = self.path().join(format!("known_hosts_{host}"));
        std::fs::write(&known, format!("{host} {key_line}\n")).unwrap();
        let opts = format!(
            "-F {} -i {} -o UserKnownHostsFile={}",
            self.ssh_config.display(),
            key.display(),
            known.display()
        );
        (host, opts)
    }

    /// The fixture's builds on builder `id`, in the order they ended: the derivation's name
    /// (`gate<i>-<tag>`) and its start and end in seconds of the builder's uptime.
    pub fn gate_times(&self, id: &str) -> Vec<(String, f64, f64)> {
        std::fs::read_to_string(self.builder(id).root.join("nix/gate-times"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((
                    w.next()?.to_owned(),
                    w.next()?.parse().ok()?,
                    w.next()?.parse().ok()?,
                ))
            })
            .collect()
    }

    /// The running counts the fixture's builds saw when they started on builder `id`.
    pub fn gate_peaks(&self, id: &str) -> Vec<u32> {
        std::fs::read_to_string(self.builder(id).root.join("nix/gate-peaks"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl NixRun {
    /// The output paths (one per stdout line).
    pub fn out_paths(&self) -> Vec<String> {
        self.stdout
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// Waits for a spawned `nix-build` and collects its output.
pub fn finish(child: std::process::Child) -> NixRun {
    let started = std::time::Instant::now();
    let out = child.wait_with_output().expect("nix-build");
    NixRun {
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// The gate's log, for failure messages.
pub fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
