//! A member's machine as on NixOS: a real `nix-daemon` (root, its own `/nix`, the hook
//! configured in nix.conf or on the daemon's command line) in a PID and mount namespace of
//! its own, and builds submitted through it by an unprivileged user, so that only the
//! daemon's configuration decides whether the hook runs.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::nixver::NixVersion;
use super::{ChildGuard, Env, Namespace, NixRun, wait_for};

/// Where the member sets `build-hook`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookPlace {
    /// `build-hook = ...` in nix.conf.
    NixConf,
    /// `nix-daemon --option build-hook ...` (the daemon's command line, e.g. its systemd unit).
    DaemonCommandLine,
}

impl HookPlace {
    /// Where `docs/hook.md` tells a member of `nix` to set it.
    pub fn documented_for(nix: NixVersion) -> HookPlace {
        if nix.honours_build_hook_in_nix_conf() {
            HookPlace::NixConf
        } else {
            HookPlace::DaemonCommandLine
        }
    }
}

/// The unprivileged user that submits builds (`nobody`, which every Debian has).
const USER_ID: u32 = 65534;
const USER: &str = "65534";

static MEMBER_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A member's machine with its daemon running.
pub struct Member {
    pub nix: NixVersion,
    /// Its own `/nix` is `root/nix`; its nix.conf is in `root/conf`.
    pub root: PathBuf,
    /// The nixdispatch-hook it was configured with.
    pub hook: PathBuf,
    fixture: PathBuf,
    // Declared before `machine`: the daemon's guard goes first, then the namespace (whose
    // end kills every process inside, the daemon's workers and hooks included).
    daemon: ChildGuard,
    machine: Namespace,
}

impl Env {
    /// Starts a member's machine running `nix`, whose daemon uses nixdispatch-hook set in
    /// `place`, with the hook configuration `hook_config` (see [`Env::write_hook_config`]).
    /// The daemon may only build through the hook (`max-jobs = 0`, no `builders`).
    pub fn start_member(&self, nix: NixVersion, place: HookPlace, hook_config: &Path) -> Member {
        let hook = self.bin("nixdispatch-hook");
        let mut conf = "substituters =\nsandbox = false\nbuild-users-group =\nbuilders =\n\
                        max-jobs = 0\nbuild-poll-interval = 1\n"
            .to_owned();
        if place == HookPlace::NixConf {
            conf.push_str(&format!("build-hook = {}\n", hook.display()));
        }
        let mut args: Vec<&std::ffi::OsStr> = Vec::new();
        if place == HookPlace::DaemonCommandLine {
            args.extend(["--option".as_ref(), "build-hook".as_ref(), hook.as_os_str()]);
        }
        self.start_member_with(nix, &conf, &args, hook_config)
    }

    /// Starts a member's machine running `nix` whose daemon reads `nix_conf` as its
    /// nix.conf and gets `daemon_args` (e.g. `--option build-hook ...`); a member of stock
    /// Nix has `builders` there and no nixdispatch at all.
    pub fn start_member_with(
        &self,
        nix: NixVersion,
        nix_conf: &str,
        daemon_args: &[&std::ffi::OsStr],
        hook_config: &Path,
    ) -> Member {
        let d = self.path();
        // The unprivileged user reads the derivations' files and the test directory.
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let n = MEMBER_COUNTER.fetch_add(1, Ordering::SeqCst);
        let root = d.join(format!("member{n}"));
        for sub in ["nix/store", "conf", "home"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        std::os::unix::fs::chown(root.join("home"), Some(USER_ID), Some(USER_ID)).unwrap();
        let hook = self.bin("nixdispatch-hook");
        std::fs::write(root.join("conf/nix.conf"), nix_conf).unwrap();
        let machine = Namespace::start(&root, nix.chroot().as_deref());
        let mut cmd = machine.command(Path::new("nix-daemon"));
        cmd.arg("--daemon").args(daemon_args);
        let log = std::fs::File::create(d.join(format!("log/member{n}-daemon.log"))).unwrap();
        let daemon = ChildGuard::spawn(
            &format!("{nix} nix-daemon"),
            cmd.env("NIX_CONF_DIR", root.join("conf"))
                .env("NIXDISPATCH_HOOK_CONFIG", hook_config)
                .env("NIX_SSHOPTS", format!("-F {}", self.ssh_config.display()))
                .env_remove("NIX_REMOTE")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        );
        let socket = root.join("nix/var/nix/daemon-socket/socket");
        wait_for(Duration::from_secs(20), "the member's nix-daemon", || {
            UnixStream::connect(&socket).ok()
        });
        Member {
            nix,
            root,
            hook,
            fixture: d.join("hook-e2e.nix"),
            daemon,
            machine,
        }
    }
}

impl Member {
    /// A command run as root on the member's machine (its Nix, its `/nix`, its processes).
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = self.machine.command(program);
        cmd.env("NIX_CONF_DIR", self.root.join("conf"))
            .env_remove("NIX_REMOTE");
        cmd
    }

    /// `nix-build` of the fixture by an unprivileged user, through the daemon, under
    /// `timeout`.
    pub fn nix_build(&self, args: &[&str]) -> NixRun {
        let mut cmd = self.nix_build_command(&self.fixture, args);
        let started = Instant::now();
        let out = cmd.output().expect("nix-build");
        NixRun::from_output(&out, started.elapsed())
    }

    /// The command of [`Member::nix_build`] for the expression `file`, to be run in the
    /// background (stdout and stderr piped).
    pub fn nix_build_command(&self, file: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(self.machine.nsenter_args())
            .args(["-S", USER, "-G", USER, "--", "timeout", "120", "nix-build"])
            .arg("--no-out-link")
            .arg(file)
            .args(args)
            .env("NIX_REMOTE", "daemon")
            .env("NIX_CONF_DIR", self.root.join("conf"))
            .env("HOME", self.root.join("home"))
            .env_remove("XDG_CACHE_HOME")
            .env_remove("XDG_CONFIG_HOME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// A store path of the member's machine, as a path the test can read.
    pub fn host_path(&self, store_path: &str) -> PathBuf {
        self.root.join(store_path.trim_start_matches('/'))
    }

    /// Where each derivation of the fixture's output was built (`local` or a builder id).
    pub fn placements(&self, out_path: &str) -> Vec<(String, String)> {
        std::fs::read_to_string(self.host_path(out_path))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect()
    }
}
