//! A real Nix with real SSH builders on loopback, for the build-hook end-to-end tests.
//!
//! Each [`Env`] lives in its own temporary directory and has:
//! - builders, each an OpenSSH `sshd -i` started per connection (the test holds the
//!   listening socket, bound to `127.0.0.1:0`, so ports are never picked and then bound)
//!   inside its **own mount namespace with its own `/nix`**, so closures really travel;
//! - an ssh_config with one `Host` alias per builder (Nix 2.8 ssh URIs cannot carry a port)
//!   and strict host-key checking against an empty known_hosts: only the key pinned in the
//!   machines line lets ssh in;
//! - optionally a scheduler and one agent per builder (the workspace's binaries);
//! - a client nix.conf with `build-hook = nixdispatch-hook`;
//! - optionally members ([`member::Member`]): a real `nix-daemon` in a namespace of its own,
//!   with builds submitted through it by an unprivileged user, as on NixOS.
//!
//! A builder or a member runs the host's Nix (2.8) or a newer one from a cached Debian chroot
//! ([`nixver::NixVersion`]). Builders let the client log in as root, so `nix-daemon --stdio`
//! serves the builder's store itself; a non-root login would behave differently from Nix 2.20
//! on (it then forwards each operation to the socket daemon, which the builder would have to
//! run), so a harness for non-root logins must start a `nix-daemon` in the builder too.
//!
//! Every child is killed by a guard's `Drop`. Missing prerequisites are a failure with a
//! clear message, never a silent skip.

#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod member;
pub mod nixver;

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod gate;

use nixdispatch::client::{self, ClientConfig};
use nixdispatch::proto::{HostState, LeaseStatus, ListHostsRequest, ListLeasesRequest};
use nixver::NixVersion;

/// Kills its child on drop.
pub struct ChildGuard {
    pub child: Child,
    pub name: String,
}

impl ChildGuard {
    pub fn spawn(name: &str, cmd: &mut Command) -> ChildGuard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        ChildGuard {
            child,
            name: name.to_owned(),
        }
    }

    /// Stops the child now (SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Fails unless the machine can run these tests; the project's test script installs Nix,
/// OpenSSH and busybox and runs as root.
pub fn require_prerequisites() {
    static INIT: std::sync::Once = std::sync::Once::new();
    let mut missing = Vec::new();
    if !nixdispatch_is_root() {
        missing.push("root (mount namespaces and a writable /nix)".to_owned());
    }
    for tool in [
        "nix-build",
        "nix-store",
        "unshare",
        "nsenter",
        "flock",
        "ssh",
        "ssh-keygen",
        "timeout",
    ] {
        if which(tool).is_none() {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    for path in ["/usr/sbin/sshd"] {
        if !Path::new(path).exists() {
            missing.push(path.to_owned());
        }
    }
    if busybox().is_none() {
        missing.push("a static busybox (busybox-static)".to_owned());
    }
    assert!(
        missing.is_empty(),
        "the build-hook e2e tests need: {}. Install with `apt-get install -y nix-bin busybox-static \
         openssh-server openssh-client` and run as root (the repository's test script does both).",
        missing.join(", ")
    );
    // Parallel first uses of a fresh client store race on creating its database ("schema is
    // corrupt"): create it first, once per process and under a lock across processes (cargo
    // nextest runs each test in its own process).
    INIT.call_once(|| {
        run_ok(
            Command::new("flock")
                .arg(std::env::temp_dir().join("nixdispatch-e2e-nix-init.lock"))
                .args(["nix-store", "--init"])
                .env_remove("NIX_REMOTE"),
        )
    });
}

fn nixdispatch_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// A workspace binary from another package, next to the test executable's directory.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (the test script does)",
        bin.display()
    );
    bin
}

/// The Nix system of this machine, as the agents announce it.
pub fn this_system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An SSH endpoint: a listener on 127.0.0.1 whose every connection is served by a fresh
/// `sshd -i` inside the builder's namespaces.
pub struct SshEndpoint {
    pub port: u16,
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    sessions: Arc<Mutex<Vec<Child>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SshEndpoint {
    fn start(
        listener: TcpListener,
        nsenter: Vec<String>,
        sshd_config: PathBuf,
        log: PathBuf,
    ) -> SshEndpoint {
        let addr = listener.local_addr().unwrap();
        let port = addr.port();
        let stop = Arc::new(AtomicBool::new(false));
        let sessions: Arc<Mutex<Vec<Child>>> = Arc::default();
        let (stop2, sessions2) = (stop.clone(), sessions.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let fd: OwnedFd = conn.into();
                let Ok(fd2) = fd.try_clone() else { continue };
                let child = Command::new("nsenter")
                    .args(&nsenter)
                    .args(["--", "/usr/sbin/sshd", "-i", "-f"])
                    .arg(&sshd_config)
                    .arg("-E")
                    .arg(&log)
                    .stdin(Stdio::from(fd))
                    .stdout(Stdio::from(fd2))
                    .stderr(Stdio::null())
                    .spawn();
                if let Ok(child) = child {
                    let mut s = sessions2.lock().unwrap();
                    // Reap finished sessions as we go.
                    s.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
                    s.push(child);
                }
            }
        });
        SshEndpoint {
            port,
            addr,
            stop,
            sessions,
            thread: Some(thread),
        }
    }
}

impl Drop for SshEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag and drops the listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for mut c in self.sessions.lock().unwrap().drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One builder.
pub struct Builder {
    /// Its ssh_config alias, unique per environment (the client's per-machine slot locks in
    /// /nix/var/nix/current-load are keyed by store URI, and tests run in parallel).
    pub alias: String,
    /// The id its agent registers, e.g. `b1`.
    pub id: String,
    /// Its own `/nix`, bound over `/nix` in its mount namespace.
    pub root: PathBuf,
    /// Its real host public key file.
    pub host_key_pub: PathBuf,
    /// Its endpoint; `None` for a builder whose sshd is down.
    pub endpoint: Option<SshEndpoint>,
    /// The Nix it runs.
    pub nix: NixVersion,
    /// The scheme of its store URI: `ssh-ng` (the worker protocol) or `ssh` (the serve
    /// protocol).
    pub scheme: &'static str,
    /// The builder "machine": PID 1 of its own PID and mount namespaces (with `/nix` bound to
    /// `root/nix` and its own `/proc`), so that its agent counts only its builds. Killing it
    /// ends everything inside.
    machine: Namespace,
}

/// A PID + mount namespace kept alive by a `sleep` as its PID 1: a "machine" with its own
/// `/nix`, running the host's Nix or, with a chroot, that chroot's.
pub(crate) struct Namespace {
    guard: ChildGuard,
    /// PID 1 of the namespace, as seen from the test.
    pub(crate) pid: u32,
    /// Whether its root is a chroot (then `nsenter` must enter that root too).
    chroot: bool,
}

impl Namespace {
    /// `root/nix` becomes its `/nix`. With `chroot`, its root directory is that chroot, with
    /// the host's `/dev` and `/tmp` (where every test directory lives, so paths are the same
    /// inside), a `/proc` of its own and an empty `/run`: the cached chroot is never written.
    pub(crate) fn start(root: &Path, chroot: Option<&Path>) -> Namespace {
        let script = match chroot {
            // An empty home for root too: sshd runs each session's command through root's
            // shell, which would otherwise read the test machine's own dotfiles (a shell
            // init that takes a lock, e.g. pyenv's, stalls concurrent sessions for seconds).
            None => format!(
                "mkdir -p '{0}/home' && mount --bind '{0}/home' /root && \
                 mount --bind '{0}/nix' /nix && exec sleep infinity",
                root.display()
            ),
            Some(c) => format!(
                "set -e; c='{}'; mount --bind '{}/nix' \"$c/nix\"; mount --rbind /dev \"$c/dev\"; \
                 mount -t proc proc \"$c/proc\"; mount --rbind /tmp \"$c/tmp\"; \
                 mount -t tmpfs tmpfs \"$c/run\"; mkdir \"$c/run/sshd\"; exec chroot \"$c\" sleep infinity",
                c.display(),
                root.display()
            ),
        };
        // --kill-child: PID 1 (and with it the whole namespace) dies with `unshare`.
        let guard = ChildGuard::spawn(
            "builder namespace",
            Command::new("unshare")
                .args([
                    "--pid",
                    "--fork",
                    "--kill-child",
                    "--mount-proc",
                    "--mount",
                    "--propagation",
                    "private",
                ])
                .args(["--", "sh", "-c", &script])
                .stdin(Stdio::null()),
        );
        let parent = guard.child.id();
        let children = format!("/proc/{parent}/task/{parent}/children");
        let pid = wait_for(Duration::from_secs(10), "the builder namespace", || {
            let pid: u32 = std::fs::read_to_string(&children)
                .ok()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            // Ready once /nix is bound (the sh has exec'd sleep after the mount).
            let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (mounts.lines().any(|l| l.split(' ').nth(4) == Some("/nix")) && comm.trim() == "sleep")
                .then_some(pid)
        });
        Namespace {
            guard,
            pid,
            chroot: chroot.is_some(),
        }
    }

    /// `nsenter`'s arguments that enter the namespace (and its root), without the `--`.
    pub(crate) fn nsenter_args(&self) -> Vec<String> {
        let mut args = vec![
            "-t".to_owned(),
            self.pid.to_string(),
            "--pid".to_owned(),
            "--mount".to_owned(),
        ];
        if self.chroot {
            args.extend(["--root".to_owned(), "--wd".to_owned()]);
        }
        args
    }

    /// A command run inside the namespace.
    pub(crate) fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("nsenter");
        c.args(self.nsenter_args()).arg("--").arg(program);
        c
    }
}

impl Builder {
    pub fn store_uri(&self) -> String {
        format!("{}://{}", self.scheme, self.alias)
    }

    /// Base64 of its host public key line, as the machines line's eighth field.
    pub fn host_key_base64(&self) -> String {
        use base64::Engine as _;
        let line = std::fs::read_to_string(&self.host_key_pub).unwrap();
        base64::engine::general_purpose::STANDARD.encode(line.trim())
    }

    /// The outputs of this builder's store whose name contains `needle`.
    pub fn store_paths_with(&self, needle: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join("nix/store"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(needle) && !n.ends_with(".drv") && !n.ends_with(".lock"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// What a builder should look like.
#[derive(Clone, Debug)]
pub struct BuilderSpec {
    pub id: &'static str,
    pub max_jobs: u32,
    pub speed_factor: f64,
    /// Whether its sshd answers.
    pub up: bool,
    /// Register a wrong host key with the scheduler (ssh must then refuse the host).
    pub wrong_pinned_key: bool,
    /// The Nix it runs.
    pub nix: NixVersion,
    /// Start its agent with nothing but its identity, so that it asks the builder's Nix for
    /// systems, features, `max-jobs` and `build-users-group` (set in the builder's nix.conf,
    /// features `e2e` and `nix-<version>`).
    pub discover: bool,
    /// Systems it builds besides this machine's (`extra-platforms` in its nix.conf, and
    /// announced by its agent), e.g. `i686-linux`.
    pub extra_systems: &'static [&'static str],
    /// Its `system-features` (set in its nix.conf and announced by its agent); none when
    /// empty.
    pub features: &'static [&'static str],
    /// Its store URI's scheme, `ssh-ng` unless set to `ssh`.
    pub scheme: &'static str,
}

impl BuilderSpec {
    pub fn new(id: &'static str, max_jobs: u32) -> Self {
        BuilderSpec {
            id,
            max_jobs,
            speed_factor: 1.0,
            up: true,
            wrong_pinned_key: false,
            nix: NixVersion::V2_8,
            discover: false,
            extra_systems: &[],
            features: &[],
            scheme: "ssh-ng",
        }
    }
}

impl BuilderSpec {
    /// Every system it builds: this machine's first.
    pub fn systems(&self) -> Vec<String> {
        std::iter::once(this_system())
            .chain(self.extra_systems.iter().map(|s| (*s).to_owned()))
            .collect()
    }
}

static ENV_COUNTER: AtomicU32 = AtomicU32::new(0);

/// One test's world.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// Unique per environment: prefixes aliases, tags derivations.
    pub id: String,
    pub builders: Vec<Builder>,
    pub ssh_config: PathBuf,
    pub client_key: PathBuf,
    pub scheduler_addr: Option<String>,
    agents: Vec<ChildGuard>,
    scheduler: Option<ChildGuard>,
    runtime: tokio::runtime::Runtime,
    /// Run the authenticated, encrypted deployment: TLS with a CA made here, `[auth]` with
    /// one member, one operator and every builder provisioned with its own token; agents,
    /// hook and admin calls carry their credentials and pin the CA. Set before starting.
    pub secure: bool,
    /// Agents serve the gate socket (`<dir>/gate_<id>.sock`), letting root (every member's
    /// login on the builders here) name members.
    pub gate_sockets: bool,
    /// Appended to the scheduler's configuration (TOML), e.g. a `[probe]` section. Set
    /// before starting.
    pub scheduler_extra: String,
    /// With [`Env::new_probed`]: the port every builder's sshd listens on, each on a
    /// loopback address of its own (the scheduler's `[probe] default_port`).
    pub shared_ssh_port: Option<u16>,
    /// Give the scheduler a state database file in the test directory (`[state]
    /// database`), kept across its restarts. Set before starting.
    pub state_db: bool,
    /// The scheduler's `[leases] ttl_millis`: 3000 unless set before starting, so the hook's
    /// keep-alives really matter during a build.
    pub lease_ttl_millis: u64,
    /// The scheduler's `[leases] unreachable_cooldown_millis`, when set before starting it.
    pub unreachable_cooldown_millis: Option<u64>,
    /// Hook configurations written from now on reuse SSH connections (`[ssh_reuse]`, on by
    /// default). Each hook configuration has its own control directory in the test
    /// directory (`ssh-<name>`), so that members, which share the test machine's `/run`,
    /// never share a master, as different machines would not.
    pub ssh_reuse: bool,
}

/// Binds one listener per builder, each on its own loopback address and all on the same
/// port, so that a store URI `ssh-ng://<address>` (Nix 2.8 URIs carry no port) is reachable
/// both by members (through ssh_config's `Port`) and by the scheduler's own SSH probe (its
/// `default_port`). Addresses are drawn at random in 127.0.0.0/8 and bound at once; a clash
/// with another test draws again.
fn bind_shared_port(n: usize) -> (Vec<(String, TcpListener)>, u16) {
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
    for attempt in 0..64u64 {
        let x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(attempt * 1442695040888963407);
        let (a, b) = (((x >> 24) % 250 + 2) as u8, ((x >> 40) % 250 + 2) as u8);
        let addr = |i: usize| format!("127.{a}.{b}.{}", 10 + i);
        let Ok(first) = TcpListener::bind((addr(0).as_str(), 0)) else {
            continue;
        };
        let port = first.local_addr().unwrap().port();
        let mut all = vec![(addr(0), first)];
        for i in 1..n {
            match TcpListener::bind((addr(i).as_str(), port)) {
                Ok(l) => all.push((addr(i), l)),
                Err(_) => break,
            }
        }
        if all.len() == n {
            return (all, port);
        }
    }
    panic!("cannot bind {n} loopback addresses on one port");
}

impl Env {
    /// Sets up the builders (their sshd endpoints and stores), keys and ssh_config; no
    /// scheduler yet.
    pub fn new(specs: &[BuilderSpec]) -> Env {
        Env::create(specs, false)
    }

    /// Like [`Env::new`], but each builder's store URI is `ssh-ng://<its loopback address>`
    /// and all listen on one port ([`Env::shared_ssh_port`]), so that the scheduler's SSH
    /// probe reaches them at the address their store URI names, as members do.
    pub fn new_probed(specs: &[BuilderSpec]) -> Env {
        Env::create(specs, true)
    }

    fn create(specs: &[BuilderSpec], probed: bool) -> Env {
        require_prerequisites();
        std::fs::create_dir_all("/run/sshd").expect("mkdir /run/sshd");
        // Under /tmp whatever TMPDIR says: machines in chroots see the host's /tmp at the
        // same path, so every path in the test directory means the same inside.
        let dir = tempfile::Builder::new()
            .prefix("nixdispatch-e2e-")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path().to_owned();
        let id = format!(
            "nd{}x{}",
            std::process::id(),
            ENV_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        for sub in ["keys", "client-conf", "bb", "log", "bin"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::copy(busybox().unwrap(), d.join("bb/busybox")).unwrap();
        for fixture in ["hook-e2e.nix", "queue-e2e.nix"] {
            std::fs::copy(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/nix")
                    .join(fixture),
                d.join(fixture),
            )
            .unwrap();
        }
        let keygen = |name: &str| {
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                    .arg(d.join("keys").join(name)),
            );
        };
        keygen("client");
        std::fs::copy(d.join("keys/client.pub"), d.join("keys/authorized_keys")).unwrap();
        std::fs::write(d.join("keys/known_hosts_empty"), "").unwrap();
        let ssh_config = d.join("ssh_config");
        let mut cfg = String::new();
        let mut builders = Vec::new();
        let (mut shared, shared_ssh_port) = if probed {
            let (l, port) = bind_shared_port(specs.len());
            (l.into_iter(), Some(port))
        } else {
            (Vec::new().into_iter(), None)
        };
        for spec in specs {
            let (alias, listener) = match shared.next() {
                Some((address, listener)) => (address, listener),
                None => (
                    format!("{}-{}", id, spec.id),
                    TcpListener::bind("127.0.0.1:0").unwrap(),
                ),
            };
            keygen(&format!("host-{}", spec.id));
            let root = d.join(spec.id);
            std::fs::create_dir_all(root.join("nix/store")).unwrap();
            std::fs::create_dir_all(root.join("conf")).unwrap();
            std::fs::write(root.join("nix/builder-id"), format!("{}\n", spec.id)).unwrap();
            // Builders on one kernel share nixbld users: no build users; no substituters.
            let mut conf = "substituters =\nsandbox = false\nbuild-users-group =\n".to_owned();
            if !spec.extra_systems.is_empty() {
                conf.push_str(&format!(
                    "extra-platforms = {}\n",
                    spec.extra_systems.join(" ")
                ));
            }
            if !spec.features.is_empty() {
                conf.push_str(&format!("system-features = {}\n", spec.features.join(" ")));
            }
            if spec.discover {
                conf.push_str(&format!(
                    "max-jobs = {}\nsystem-features = e2e nix-{}\n",
                    spec.max_jobs,
                    spec.nix.label()
                ));
            }
            std::fs::write(root.join("conf/nix.conf"), conf).unwrap();
            let sshd_config = d.join(format!("sshd_{}.config", spec.id));
            std::fs::write(
                &sshd_config,
                [
                    format!("HostKey {}/keys/host-{}", d.display(), spec.id),
                    format!("AuthorizedKeysFile {}/keys/authorized_keys", d.display()),
                    "PermitRootLogin prohibit-password".into(),
                    "PasswordAuthentication no".into(),
                    "KbdInteractiveAuthentication no".into(),
                    "UsePAM no".into(),
                    "StrictModes no".into(),
                    "PidFile none".into(),
                    format!("SetEnv NIX_CONF_DIR={}/conf", root.display()),
                    String::new(),
                ]
                .join("\n"),
            )
            .unwrap();
            let machine = Namespace::start(&root, spec.nix.chroot().as_deref());
            // A builder's store exists before its first session, as a real builder's does.
            // Nix creates parts of a store when it first opens it, and two sessions opening a
            // fresh one at once can race (Nix 2.26: "creating symlink
            // '/nix/var/nix/gcroots/profiles' ...: File exists").
            run_ok(
                machine
                    .command(Path::new("nix-store"))
                    .arg("--init")
                    .env("NIX_CONF_DIR", root.join("conf"))
                    .env_remove("NIX_REMOTE"),
            );
            let local = listener.local_addr().unwrap();
            let (host_ip, port) = (local.ip(), local.port());
            let endpoint = if spec.up {
                Some(SshEndpoint::start(
                    listener,
                    machine.nsenter_args(),
                    sshd_config,
                    d.join(format!("log/sshd_{}.log", spec.id)),
                ))
            } else {
                // Nothing listens there any more: connections are refused.
                drop(listener);
                None
            };
            // Strict checking against an empty known_hosts: only the key Nix pins from the
            // machines line (`-oUserKnownHostsFile=...`, matched through HostKeyAlias) works.
            cfg.push_str(&format!(
                "Host {alias}\n  HostName {host_ip}\n  Port {port}\n  HostKeyAlias {alias}\n  User root\n  \
                 IdentitiesOnly yes\n  StrictHostKeyChecking yes\n  UserKnownHostsFile {}/keys/known_hosts_empty\n  \
                 GlobalKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n  ConnectTimeout 10\n",
                d.display()
            ));
            builders.push(Builder {
                alias,
                id: spec.id.to_owned(),
                root,
                host_key_pub: d.join(format!("keys/host-{}.pub", spec.id)),
                endpoint,
                nix: spec.nix,
                scheme: spec.scheme,
                machine,
            });
        }
        std::fs::write(&ssh_config, cfg).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        Env {
            client_key: d.join("keys/client"),
            dir,
            id,
            builders,
            ssh_config,
            scheduler_addr: None,
            agents: Vec::new(),
            scheduler: None,
            runtime,
            secure: false,
            gate_sockets: false,
            scheduler_extra: String::new(),
            shared_ssh_port,
            state_db: false,
            lease_ttl_millis: 3000,
            unreachable_cooldown_millis: None,
            ssh_reuse: true,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn builder(&self, id: &str) -> &Builder {
        self.builders.iter().find(|b| b.id == id).unwrap()
    }

    /// A workspace binary at a path inside the test directory, so that machines in chroots
    /// can run it too (a hard link, or a copy across file systems).
    pub fn bin(&self, name: &str) -> PathBuf {
        let linked = self.path().join("bin").join(name);
        if !linked.exists() {
            let real = workspace_bin(name);
            if std::fs::hard_link(&real, &linked).is_err() {
                std::fs::copy(&real, &linked).unwrap();
            }
        }
        linked
    }

    /// Starts the scheduler on `listen` (`127.0.0.1:0` for any port) and waits for its
    /// address file; returns its URL.
    fn start_scheduler(&mut self, listen: &str) -> String {
        let d = self.path().to_owned();
        let config = d.join("scheduler.toml");
        // A short lease TTL by default (`lease_ttl_millis`) so the hook's keep-alives really
        // matter during a build; admission gates open (this shared 2-core machine may report any pressure).
        std::fs::write(
            &config,
            format!("[leases]\nttl_millis = {}\n{}[agents]\nreport_interval_millis = 1000\n\
             [admission]\nmin_free_store_percent = 0.0\nmin_free_store_bytes = 0\n\
             min_free_build_dir_percent = 0.0\nmin_free_build_dir_bytes = 0\n\
             max_cpu_some_pressure = 100.0\nmax_memory_full_pressure = 100.0\nmax_io_full_pressure = 100.0\n{}{}{}",
            self.lease_ttl_millis,
            self.unreachable_cooldown_millis
                .map(|m| format!("unreachable_cooldown_millis = {m}\n"))
                .unwrap_or_default(),
            if self.state_db {
                format!("[state]\ndatabase = \"{}\"\n", d.join("scheduler.sqlite3").display())
            } else {
                String::new()
            },
            if self.secure { self.secure_scheduler_config() } else { String::new() },
            self.scheduler_extra,
        ))
        .unwrap();
        let address_file = d.join("scheduler.addr");
        let _ = std::fs::remove_file(&address_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("log/scheduler.log"))
            .unwrap();
        self.scheduler = Some(ChildGuard::spawn(
            "nixdispatch-scheduler",
            Command::new(workspace_bin("nixdispatch-scheduler"))
                .args(["--listen", listen, "--address-file"])
                .arg(&address_file)
                .arg("--config")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        ));
        let addr = wait_for(
            Duration::from_secs(20),
            "the scheduler's address file",
            || {
                std::fs::read_to_string(&address_file)
                    .ok()
                    .filter(|s| !s.trim().is_empty())
            },
        );
        let scheme = if self.secure { "https" } else { "http" };
        let url = format!("{scheme}://{}", addr.trim());
        self.scheduler_addr = Some(url.clone());
        url
    }

    /// The `[tls]` and `[auth]` sections of the secure deployment, with the CA, the
    /// scheduler's certificate and every token written under `secrets/` (tokens readable by
    /// their owner only, as `LoadCredential=` gives them).
    fn secure_scheduler_config(&self) -> String {
        use std::os::unix::fs::PermissionsExt as _;
        let s = self.path().join("secrets");
        std::fs::create_dir_all(&s).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(s.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(s.join("scheduler.pem"), cert.pem()).unwrap();
        std::fs::write(s.join("scheduler.key"), key.serialize_pem()).unwrap();
        let secret = |name: &str| {
            // Unique per environment and file; a test's tokens need not be unguessable.
            let token = format!("{}-{name}-{}", self.id, std::process::id());
            let path = s.join(format!("{name}.token"));
            std::fs::write(&path, format!("{token}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let out = Command::new("sha256sum")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn();
            let mut child = out.unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(token.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            String::from_utf8(out.stdout).unwrap()[..64].to_owned()
        };
        let mut text = format!(
            "[tls]\ncertificate = \"{0}/scheduler.pem\"\nprivate_key = \"{0}/scheduler.key\"\n\
             [auth]\n[[auth.members]]\nname = \"e2e-{1}\"\ntoken_sha256 = \"{2}\"\n\
             [[auth.operators]]\nname = \"ops\"\ntoken_sha256 = \"{3}\"\n",
            s.display(),
            self.id,
            secret("member"),
            secret("operator"),
        );
        for b in &self.builders {
            let key = std::fs::read_to_string(&b.host_key_pub).unwrap();
            text.push_str(&format!(
                "[[auth.hosts]]\nid = \"{}\"\nstore_uri = \"{}\"\npublic_key = \"{}\"\ntoken_sha256 = \"{}\"\n",
                b.id,
                b.store_uri(),
                key.trim(),
                secret(&format!("host-{}", b.id)),
            ));
        }
        text
    }

    /// Starts the scheduler and one agent per builder in `specs`, and waits until the
    /// scheduler sees every host ready.
    pub fn start_scheduler_and_agents(&mut self, specs: &[BuilderSpec]) {
        let d = self.path().to_owned();
        let url = self.start_scheduler("127.0.0.1:0");
        for spec in specs {
            let b = self.builder(spec.id);
            let key_file = if spec.wrong_pinned_key {
                d.join("keys/client.pub") // any other key: ssh must refuse the real host
            } else {
                b.host_key_pub.clone()
            };
            let log = std::fs::File::create(d.join(format!("log/agent_{}.log", spec.id))).unwrap();
            // The agent runs on "its" builder: inside the builder's namespaces, with the
            // builder's nix.conf.
            let mut cmd = b.machine.command(&self.bin("nixdispatch-agent"));
            cmd.args([
                "--scheduler",
                &url,
                "--host-id",
                spec.id,
                "--store-uri",
                &b.store_uri(),
            ])
            .arg("--host-key-file")
            .arg(key_file)
            .args(["--speed-factor", &spec.speed_factor.to_string()])
            .args(["--store-dir", "/nix/store"])
            .env("NIX_CONF_DIR", b.root.join("conf"));
            if self.secure {
                cmd.arg("--credential-file")
                    .arg(d.join(format!("secrets/host-{}.token", spec.id)))
                    .arg("--ca-file")
                    .arg(d.join("secrets/ca.pem"))
                    .args(["--tls-domain", "localhost"]);
            }
            if self.gate_sockets {
                let config = d.join(format!("agent_{}.toml", spec.id));
                std::fs::write(
                    &config,
                    format!(
                        "[gate]\nsocket = \"{}\"\nmay_name_members = [\"root\"]\n",
                        d.join(format!("gate_{}.sock", spec.id)).display()
                    ),
                )
                .unwrap();
                cmd.arg("--config").arg(config);
            }
            if !spec.discover {
                cmd.args([
                    "--systems",
                    &spec.systems().join(","),
                    "--max-jobs",
                    &spec.max_jobs.to_string(),
                    "--features",
                    &spec.features.join(","),
                    "--build-users-group",
                    "",
                ]);
            }
            let agent = ChildGuard::spawn(
                &format!("agent {}", spec.id),
                cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log),
            );
            self.agents.push(agent);
        }
        self.wait_until_ready(specs);
    }

    /// Waits until the scheduler lists every host of `specs` as ready.
    pub fn wait_until_ready(&self, specs: &[BuilderSpec]) {
        let want: Vec<String> = specs.iter().map(|s| s.id.to_owned()).collect();
        wait_for(
            Duration::from_secs(20),
            "every agent registered and ready",
            || {
                let hosts = self
                    .admin(|mut a| async move { a.list_hosts(ListHostsRequest {}).await })
                    .ok()?
                    .hosts;
                let ready = want.iter().all(|id| {
                    hosts
                        .iter()
                        .any(|h| &h.host_id == id && h.state == HostState::Ready as i32)
                });
                ready.then_some(())
            },
        );
    }

    /// Kills the scheduler (SIGKILL: no goodbye, all its state lost) and starts a new one on
    /// the same address; its agents reconnect by themselves.
    pub fn restart_scheduler(&mut self) {
        self.restart_scheduler_after(Duration::ZERO);
    }

    /// Kills the scheduler (SIGKILL) and starts a new one on the same address (and state
    /// database) `down` later: an outage of that length.
    pub fn restart_scheduler_after(&mut self, down: Duration) {
        let url = self.scheduler_addr.clone().expect("a running scheduler");
        self.stop_scheduler();
        std::thread::sleep(down);
        let listen = url
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .to_owned();
        self.start_scheduler(&listen);
    }

    /// Stops the scheduler (its address stays configured: connections are then refused).
    pub fn stop_scheduler(&mut self) {
        if let Some(mut s) = self.scheduler.take() {
            s.stop();
        }
    }

    /// Calls the admin service.
    pub fn admin<T, F, Fut>(&self, f: F) -> Result<T, String>
    where
        F: FnOnce(
            nixdispatch::proto::admin_service_client::AdminServiceClient<client::AuthChannel>,
        ) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let url = self.scheduler_addr.clone().ok_or("no scheduler")?;
        let mut config = ClientConfig::new(url);
        if self.secure {
            config.credential_file = Some(self.path().join("secrets/operator.token"));
            config.ca_file = Some(self.path().join("secrets/ca.pem"));
            config.tls_domain = Some("localhost".into());
        }
        self.runtime.block_on(async {
            let ch = client::connect(&config).await.map_err(|e| e.to_string())?;
            f(client::admin_client(ch))
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| s.to_string())
        })
    }

    /// The scheduler's live leases.
    pub fn leases(&self) -> Vec<LeaseStatus> {
        self.admin(|mut a| async move { a.list_leases(ListLeasesRequest {}).await })
            .expect("ListLeases")
            .leases
    }

    /// Writes the hook's configuration; `extra` is appended verbatim (TOML).
    pub fn write_hook_config(&self, scheduler_url: &str, extra: &str) -> PathBuf {
        self.write_hook_config_named("", scheduler_url, extra)
    }

    /// [`Env::write_hook_config`] for one of several members: `hook-<name>.toml`, client id
    /// `e2e-<env>-<name>`, log `log/hook-<name>.log` (`name` empty: the shared defaults).
    pub fn write_hook_config_named(&self, name: &str, scheduler_url: &str, extra: &str) -> PathBuf {
        let suffix = if name.is_empty() {
            String::new()
        } else {
            format!("-{name}")
        };
        let p = self.path().join(format!("hook{suffix}.toml"));
        std::fs::write(
            &p,
            format!(
                "scheduler = \"{scheduler_url}\"\n{{secure}}client_id = \"e2e-{}{suffix}\"\nssh_identity = \"{}\"\n\
                 log_file = \"{}/log/hook{suffix}.log\"\nlog_level = \"debug\"\n{extra}\n[timeouts]\nconnect_millis = 500\n\
                 try_millis = 1500\nreacquire_millis = 30000\n\
                 [ssh_reuse]\nenabled = {}\ncontrol_dir = \"{}\"\n",
                self.id,
                self.client_key.display(),
                self.path().display(),
                self.ssh_reuse,
                self.ssh_control_dir(name).display(),
            )
            .replace(
                "{secure}",
                &if self.secure {
                    format!(
                        "credential_file = \"{0}/secrets/member.token\"\nca_file = \"{0}/secrets/ca.pem\"\n\
                         tls_domain = \"localhost\"\n",
                        self.path().display()
                    )
                } else {
                    String::new()
                },
            ),
        )
        .unwrap();
        p
    }

    /// The SSH control directory of the hook configuration `name` (see [`Env::ssh_reuse`]).
    pub fn ssh_control_dir(&self, name: &str) -> PathBuf {
        self.path().join(format!(
            "ssh-{}",
            if name.is_empty() { "hook" } else { name }
        ))
    }

    /// The number of SSH connections each builder's sshd accepted so far (one `sshd -i` per
    /// connection, each logging its accepted login), by builder id.
    pub fn ssh_logins(&self) -> std::collections::BTreeMap<String, usize> {
        self.builders
            .iter()
            .map(|b| {
                let log =
                    std::fs::read_to_string(self.path().join(format!("log/sshd_{}.log", b.id)))
                        .unwrap_or_default();
                (b.id.clone(), log.matches("Accepted publickey").count())
            })
            .collect()
    }

    /// A machines line for the builder of `spec`, with its systems and features, as a
    /// member of stock Nix would write it.
    pub fn machines_line_of(&self, spec: &BuilderSpec) -> String {
        let b = self.builder(spec.id);
        let features = if spec.features.is_empty() {
            "-".to_owned()
        } else {
            spec.features.join(",")
        };
        format!(
            "{} {} {} {} 1 {features} - {}",
            b.store_uri(),
            spec.systems().join(","),
            self.client_key.display(),
            spec.max_jobs,
            b.host_key_base64()
        )
    }

    /// A machines line for a builder, as a static fallback.
    pub fn machines_line(&self, id: &str, max_jobs: u32) -> String {
        let b = self.builder(id);
        format!(
            "{} {} {} {max_jobs} 1 - - {}",
            b.store_uri(),
            this_system(),
            self.client_key.display(),
            b.host_key_base64()
        )
    }

    /// Runs `nix-build` of the fixture with this client configuration, under `timeout`.
    pub fn nix_build(
        &self,
        hook_config: &Path,
        build_hook: &Path,
        max_jobs: u32,
        args: &[&str],
    ) -> NixRun {
        self.nix_build_with_builders(hook_config, build_hook, "", max_jobs, args)
    }

    /// Like [`Env::nix_build`], with nix.conf's `builders` set (for the stock build-remote).
    pub fn nix_build_with_builders(
        &self,
        hook_config: &Path,
        build_hook: &Path,
        builders: &str,
        max_jobs: u32,
        args: &[&str],
    ) -> NixRun {
        let started = Instant::now();
        let out: Output = self
            .nix_build_command(hook_config, build_hook, builders, max_jobs, args)
            .output()
            .expect("nix-build");
        NixRun::from_output(&out, started.elapsed())
    }

    /// The `nix-build` command of [`Env::nix_build_with_builders`] (under `timeout`), to be
    /// run in the background by tests that act while the build runs.
    pub fn nix_build_command(
        &self,
        hook_config: &Path,
        build_hook: &Path,
        builders: &str,
        max_jobs: u32,
        args: &[&str],
    ) -> Command {
        let d = self.path();
        std::fs::write(
            d.join("client-conf/nix.conf"),
            format!(
                "substituters =\nsandbox = false\nbuild-users-group =\nbuilders = {builders}\nbuild-hook = {}\nmax-jobs = {max_jobs}\nbuild-poll-interval = 1\n",
                build_hook.display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new("timeout");
        cmd.args([
            "120",
            "nix-build",
            "--no-out-link",
            "--max-jobs",
            &max_jobs.to_string(),
        ])
        .arg(d.join("hook-e2e.nix"))
        .args(args)
        .env("NIX_CONF_DIR", d.join("client-conf"))
        .env("NIX_SSHOPTS", format!("-F {}", self.ssh_config.display()))
        .env("NIXDISPATCH_HOOK_CONFIG", hook_config)
        .env_remove("NIX_REMOTE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd
    }

    /// A fresh derivation tag, so that nothing is already built.
    pub fn tag(&self, what: &str) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        format!("{what}{}t{nanos}", self.id)
    }

    /// The hook's log, for failure messages.
    pub fn hook_log(&self) -> String {
        std::fs::read_to_string(self.path().join("log/hook.log")).unwrap_or_default()
    }

    /// Everything useful when a test fails.
    pub fn diagnostics(&self, run: &NixRun) -> String {
        let mut s = format!(
            "nix-build exit {:?} after {:?}\n--- stdout\n{}\n--- stderr\n{}\n--- hook log\n{}",
            run.code,
            run.elapsed,
            run.stdout,
            run.stderr,
            self.hook_log()
        );
        for f in ["scheduler.log", "agent_b1.log", "agent_b2.log"] {
            if let Ok(t) = std::fs::read_to_string(self.path().join("log").join(f)) {
                let tail: Vec<&str> = t.lines().rev().take(20).collect();
                s.push_str(&format!(
                    "\n--- {f} (last lines)\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                ));
            }
        }
        s
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.agents.clear();
        self.scheduler = None;
        for b in &mut self.builders {
            b.endpoint = None;
        }
        // Ends every process inside the builders' namespaces (agents, sshd sessions).
        self.builders.clear();
        // Keep the directory when asked, for post-mortems.
        if std::env::var_os("NIXDISPATCH_E2E_KEEP").is_some() {
            let path = self.dir.path().to_owned();
            let _ = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            let _ = writeln!(std::io::stderr(), "kept {}", path.display());
        }
    }
}

/// The result of one `nix-build`.
#[derive(Debug)]
pub struct NixRun {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl NixRun {
    /// The run of a finished `nix-build`.
    pub fn from_output(out: &Output, elapsed: Duration) -> NixRun {
        NixRun {
            success: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed,
        }
    }

    /// The output path (last stdout line).
    pub fn out_path(&self) -> &str {
        self.stdout.lines().last().unwrap_or("").trim()
    }
}

/// Polls `f` until it gives a value, failing after `limit`: a bounded readiness wait.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Whether `path` is a valid path in the client's store.
pub fn valid_in_client_store(path: &str) -> bool {
    Command::new("nix-store")
        .args(["--check-validity", path])
        .env_remove("NIX_REMOTE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
