//! The scheduler's SSH probes against a real OpenSSH `sshd` on loopback: a builder whose sshd
//! stops answering, presents another host key or cannot run the probe command is taken out
//! of placement (and `ListHosts` and `ExplainPlacement` say why), and comes back when it
//! answers again; concurrent requests never get a host whose probe failed.
//!
//! Each builder is a listener on 127.0.0.1:0 that the test holds, every connection served
//! by a fresh `sshd -i` (as `tests/common` of the root crate does); "sshd down" closes each
//! connection before the SSH banner, as a host whose sshd died behind a load balancer or
//! socket activation does. The probe logs in as root, whose login shell runs the probe
//! command: each `sshd -i` runs in a mount namespace of its own with an empty directory
//! over `/root`, so no dotfile of the machine's root (a `~/.bashrc` that starts pyenv, say)
//! runs in a session or can make one hang. Needs `/usr/sbin/sshd`, `ssh-keygen` and
//! `unshare` (`tests/run.sh` installs them) and root (sshd's privilege separation, mounts).

use std::net::TcpListener;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;

use nixdispatch::proto::{
    self, AcquireRequest, acquire_response::Outcome, admin_service_client::AdminServiceClient,
    lease_service_client::LeaseServiceClient,
};
use nixdispatch_scheduler::config::Config;
use tokio::sync::oneshot;
use tonic::transport::Channel;

fn keygen(path: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "probe-test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen runs (tests/run.sh installs openssh-client)");
    assert!(out.status.success(), "{out:?}");
    std::fs::read_to_string(path.with_extension("pub")).unwrap()
}

/// One builder's SSH endpoint: a listener the test holds, each connection served by a fresh
/// `sshd -i`, or closed at once while `down`.
struct Sshd {
    port: u16,
    host_key_line: String,
    down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    sessions: Arc<Mutex<Vec<Child>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sshd {
    fn start(dir: &Path, name: &str, authorized: &Path) -> Sshd {
        assert!(
            Path::new("/usr/sbin/sshd").exists(),
            "the probe tests need /usr/sbin/sshd: tests/run.sh installs openssh-server"
        );
        std::fs::create_dir_all("/run/sshd").unwrap();
        let host_key = dir.join(format!("host-{name}"));
        let host_key_line = keygen(&host_key);
        let config = dir.join(format!("sshd-{name}.config"));
        std::fs::write(
            &config,
            [
                format!("HostKey {}", host_key.display()),
                format!("AuthorizedKeysFile {}", authorized.display()),
                "PermitRootLogin prohibit-password".into(),
                "PasswordAuthentication no".into(),
                "KbdInteractiveAuthentication no".into(),
                "UsePAM no".into(),
                "StrictModes no".into(),
                "PidFile none".into(),
                String::new(),
            ]
            .join("\n"),
        )
        .unwrap();
        let log = dir.join(format!("sshd-{name}.log"));
        // Root's home in the sessions: empty, so bash (root's shell, which sshd runs the
        // command with) finds no `~/.bashrc` to read.
        let home = dir.join(format!("home-{name}"));
        std::fs::create_dir(&home).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (down, stop, accepted) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let sessions: Arc<Mutex<Vec<Child>>> = Arc::default();
        let thread = {
            let (down, stop, accepted, sessions) = (
                down.clone(),
                stop.clone(),
                accepted.clone(),
                sessions.clone(),
            );
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    if down.load(Ordering::SeqCst) {
                        continue; // dropped: closed before the banner
                    }
                    let fd: OwnedFd = conn.into();
                    let Ok(fd2) = fd.try_clone() else { continue };
                    // `unshare` and `sh` exec: the child is the session's sshd itself.
                    let child = Command::new("unshare")
                        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
                        .arg("mount --bind \"$0\" /root && exec /usr/sbin/sshd -i -f \"$1\" -E \"$2\"")
                        .arg(&home)
                        .arg(&config)
                        .arg(&log)
                        .stdin(Stdio::from(fd))
                        .stdout(Stdio::from(fd2))
                        .stderr(Stdio::null())
                        .spawn();
                    if let Ok(child) = child {
                        let mut s = sessions.lock().unwrap();
                        s.retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_))));
                        s.push(child);
                    }
                }
            })
        };
        Sshd {
            port,
            host_key_line,
            down,
            stop,
            accepted,
            sessions,
            thread: Some(thread),
        }
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for mut c in self.sessions.lock().unwrap().drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Keys and a scheduler configured to probe fast, with a probe key.
struct Fixture {
    dir: tempfile::TempDir,
    authorized: PathBuf,
    config: Config,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let probe_key = dir.path().join("probe-key");
        let public = keygen(&probe_key);
        let authorized = dir.path().join("authorized_keys");
        std::fs::write(&authorized, public).unwrap();
        let mut config = Config::default();
        config.probe.enabled = true;
        config.probe.interval_millis = 200;
        config.probe.failures_to_open = 1;
        config.probe.backoff_initial_millis = 100;
        config.probe.backoff_max_millis = 400;
        config.probe.key_file = Some(probe_key);
        Fixture {
            dir,
            authorized,
            config,
        }
    }

    fn sshd(&self, name: &str) -> Sshd {
        Sshd::start(self.dir.path(), name, &self.authorized)
    }
}

/// A scheduler served in-process on a listener bound to 127.0.0.1:0; stopped on drop.
struct Server {
    channel: Channel,
    _stop: oneshot::Sender<()>,
}

impl Server {
    async fn start(config: Config) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(nixdispatch_scheduler::server::run(
            listener,
            config,
            async {
                let _ = stopped.await;
            },
        ));
        let channel = common::channel(&addr.to_string()).await;
        Server {
            channel,
            _stop: stop,
        }
    }

    /// Registers a builder at `port` pinning `key`; it stays registered while the returned
    /// stream lives.
    async fn register(&self, id: &str, port: u16, key: &str, slots: u32) -> common::Agent {
        let uri = format!("ssh-ng://root@127.0.0.1:{port}");
        common::agent(self.channel.clone(), common::register(id, &uri, key, slots)).await
    }

    async fn host(&self, id: &str) -> proto::HostStatus {
        AdminServiceClient::new(self.channel.clone())
            .list_hosts(proto::ListHostsRequest {})
            .await
            .unwrap()
            .into_inner()
            .hosts
            .into_iter()
            .find(|h| h.host_id == id)
            .unwrap()
    }

    /// Waits until host `id`'s unavailable reason satisfies `check`, polling every 20 ms
    /// for at most 15 s (a state to reach, never a fixed sleep).
    async fn reason_until(&self, id: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        for _ in 0..750 {
            let reason = self.host(id).await.unavailable_reason;
            if check(&reason) {
                return reason;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {id}: {what}");
    }

    async fn acquire(&self, client: &str, drv: &str) -> Outcome {
        acquire(self.channel.clone(), client, drv).await
    }
}

/// Asks for an x86_64-linux slot for `client`'s `drv`, as a hook that cannot build locally.
async fn acquire(channel: Channel, client: &str, drv: &str) -> Outcome {
    LeaseServiceClient::new(channel)
        .acquire(AcquireRequest {
            system: "x86_64-linux".into(),
            drv_path: format!("/nix/store/{drv}.drv"),
            client_id: client.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .outcome
        .unwrap()
}

fn granted_host(o: &Outcome) -> Option<&str> {
    match o {
        Outcome::Granted(g) => Some(g.host_id.as_str()),
        _ => None,
    }
}

/// A builder whose sshd stops answering is taken out of placement with the reason in
/// `ListHosts` and `ExplainPlacement`, and is back as soon as its sshd answers again; while
/// it is out, requests are postponed rather than granted to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_sshd_is_taken_out_and_back_when_it_returns() {
    let f = Fixture::new();
    let sshd = f.sshd("b1");
    let server = Server::start(f.config.clone()).await;
    let _agent = server
        .register("b1", sshd.port, &sshd.host_key_line, 4)
        .await;
    // Several probes logged in and ran the command, and the host stayed in.
    for _ in 0..750 {
        if sshd.accepted.load(Ordering::SeqCst) >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        sshd.accepted.load(Ordering::SeqCst) >= 3,
        "probes reach sshd"
    );
    assert_eq!(server.host("b1").await.unavailable_reason, "");

    sshd.set_down(true);
    let reason = server
        .reason_until("b1", "taken out", |r| r.contains("SSH probe failed"))
        .await;
    assert!(reason.contains("(connect:"), "{reason}");
    let explained = AdminServiceClient::new(server.channel.clone())
        .explain_placement(proto::ExplainPlacementRequest {
            system: "x86_64-linux".into(),
            required_features: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(explained.outcome, "postpone");
    assert!(
        explained.hosts[0].reason.contains("SSH probe failed"),
        "{explained:?}"
    );
    assert!(matches!(
        server.acquire("m1", "a").await,
        Outcome::Postpone(_)
    ));

    sshd.set_down(false);
    server
        .reason_until("b1", "back in placement", str::is_empty)
        .await;
    assert_eq!(granted_host(&server.acquire("m1", "a").await), Some("b1"));
}

/// A builder whose sshd presents a host key other than the one its agent registered (the
/// key members pin) is taken out at the first probe, and the reason names both keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_key_other_than_the_pinned_one_is_taken_out() {
    let mut f = Fixture::new();
    f.config.probe.failures_to_open = 5;
    let sshd = f.sshd("b1");
    let other = keygen(&f.dir.path().join("not-the-host-key"));
    let server = Server::start(f.config.clone()).await;
    let _agent = server.register("b1", sshd.port, &other, 4).await;
    let reason = server
        .reason_until("b1", "taken out", |r| r.contains("SSH probe failed"))
        .await;
    assert!(
        reason.contains("(host_key: presented ssh-ed25519 SHA256:"),
        "{reason}"
    );
    assert!(matches!(
        server.acquire("m1", "a").await,
        Outcome::Postpone(_)
    ));
}

/// A builder where the probe logs in but the probe command fails is taken out, with the
/// command's exit status in the reason: the probe really logs in and runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_probe_command_is_taken_out() {
    let mut f = Fixture::new();
    f.config.probe.command = "nix-store --no-such-flag".into();
    let sshd = f.sshd("b1");
    let server = Server::start(f.config.clone()).await;
    let _agent = server
        .register("b1", sshd.port, &sshd.host_key_line, 4)
        .await;
    let reason = server
        .reason_until("b1", "taken out", |r| r.contains("SSH probe failed"))
        .await;
    assert!(
        reason.contains("(command: `nix-store --no-such-flag` exited with"),
        "{reason}"
    );
}

/// Many concurrent requests, fired once a builder's probe has failed, are all granted the
/// healthy builder or postponed: none is granted the dead one, though it has more free
/// slots and would otherwise be chosen first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_get_a_host_whose_probe_failed() {
    let f = Fixture::new();
    let (dead, live) = (f.sshd("dead"), f.sshd("live"));
    dead.set_down(true);
    let server = Server::start(f.config.clone()).await;
    let _a = server
        .register("dead", dead.port, &dead.host_key_line, 64)
        .await;
    let _b = server
        .register("live", live.port, &live.host_key_line, 8)
        .await;
    server
        .reason_until("dead", "taken out", |r| r.contains("SSH probe failed"))
        .await;
    let mut asks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let channel = server.channel.clone();
        asks.spawn(async move { acquire(channel, &format!("m{}", i % 5), &format!("d{i}")).await });
    }
    let mut on_live = 0;
    while let Some(o) = asks.join_next().await {
        match granted_host(&o.unwrap()) {
            Some("live") => on_live += 1,
            Some(other) => panic!("granted {other}, whose probe failed"),
            None => {}
        }
    }
    assert_eq!(on_live, 8, "the live builder's slots are all used");
}

/// With one probe at a time allowed, builders whose probes queue behind each other are all
/// probed in turn: three dead builders are all taken out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_queue_behind_the_concurrency_bound() {
    let mut f = Fixture::new();
    f.config.probe.concurrency = 1;
    let sshds: Vec<Sshd> = (0..3).map(|i| f.sshd(&format!("b{i}"))).collect();
    let server = Server::start(f.config.clone()).await;
    let mut agents = Vec::new();
    for (i, sshd) in sshds.iter().enumerate() {
        sshd.set_down(true);
        agents.push(
            server
                .register(&format!("b{i}"), sshd.port, &sshd.host_key_line, 2)
                .await,
        );
    }
    for i in 0..3 {
        server
            .reason_until(&format!("b{i}"), "taken out", |r| {
                r.contains("SSH probe failed")
            })
            .await;
    }
}
