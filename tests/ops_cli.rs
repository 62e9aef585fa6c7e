//! The operators' waiting and watching commands against a real scheduler on 127.0.0.1:0:
//! `nixdispatch drain --wait` and `nixdispatch status --watch` (in a real terminal, tmux).

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nixdispatch::proto::{
    self, AcquireRequest, AgentMessage, Register, Report, acquire_response::Outcome,
    agent_message::Message, agent_service_client::AgentServiceClient,
    lease_service_client::LeaseServiceClient,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_nixdispatch");

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHdzrOYYsx97jgJC4raQrLvbWQfJI3Wj8wIeg0F7/qlv";

/// A scheduler in-process, with agents told to report every 100 ms; stopped on drop.
struct Scheduler {
    addr: std::net::SocketAddr,
    channel: Channel,
    _stop: oneshot::Sender<()>,
}

impl Scheduler {
    async fn start() -> Scheduler {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = nixdispatch_scheduler::config::Config::default();
        config.agents.report_interval_millis = 100;
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(nixdispatch_scheduler::server::run(
            listener,
            config,
            async {
                let _ = stopped.await;
            },
        ));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Scheduler {
            addr,
            channel,
            _stop: stop,
        }
    }

    /// Registers `id` and keeps reporting `running` builds whenever the scheduler asks
    /// (every 100 ms), as a real agent does, until the scheduler stops.
    async fn agent(&self, id: &str, running: Arc<AtomicU32>) {
        let (tx, rx) = mpsc::channel(4);
        tx.send(AgentMessage {
            message: Some(Message::Register(Register {
                host_id: id.into(),
                store_uri: format!("ssh-ng://{id}"),
                host_public_key: KEY.into(),
                systems: vec!["x86_64-linux".into()],
                max_jobs: 4,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut answers = AgentServiceClient::new(self.channel.clone())
            .session(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        answers.message().await.unwrap().unwrap();
        tokio::spawn(async move {
            loop {
                let report = Report {
                    running_builds: Some(running.load(Ordering::SeqCst)),
                    ..Default::default()
                };
                let sent = tx
                    .send(AgentMessage {
                        message: Some(Message::Report(report)),
                    })
                    .await;
                if sent.is_err() {
                    break;
                }
                // Each answer names the next deadline; report again well within it.
                match answers.message().await {
                    Ok(Some(m)) => {
                        tokio::time::sleep(Duration::from_millis(m.next_report_within_millis / 2))
                            .await
                    }
                    _ => break,
                }
            }
        });
    }

    async fn acquire(&self, drv: &str) -> proto::Granted {
        let answer = LeaseServiceClient::new(self.channel.clone())
            .acquire(AcquireRequest {
                system: "x86_64-linux".into(),
                drv_path: format!("/nix/store/{drv}.drv"),
                client_id: "alice".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        match answer.outcome.unwrap() {
            Outcome::Granted(g) => g,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    fn cli(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("--scheduler").arg(format!("http://{}", self.addr));
        cmd
    }
}

/// `drain --wait` reports progress while a lease and then a build the agent still sees
/// are running, and returns only after both are gone; with a build running past its
/// `--timeout` it exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_returns_when_the_builds_have_finished() {
    let s = Scheduler::start().await;
    let running = Arc::new(AtomicU32::new(1));
    s.agent("build01", running.clone()).await;
    let lease = s.acquire("one").await;

    // A bounded wait gives up while the lease is held.
    let out = s
        .cli()
        .args([
            "drain",
            "build01",
            "--wait",
            "--timeout",
            "1",
            "--poll",
            "0.1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("build01: still busy after 1s: 1 lease"),
        "{stdout}"
    );

    let mut child = s
        .cli()
        .args(["drain", "build01", "--wait", "--poll", "0.05"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut progress = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next_line = move || progress.next().unwrap().unwrap();
    let mut line = next_line();
    assert_eq!(line, "build01: ready, draining, 1/4 slots used");
    line = next_line();
    assert!(line.contains("build01: 1 lease, 1 build running"), "{line}");

    // The build ends: the hook releases the lease, but the agent still sees it running.
    LeaseServiceClient::new(s.channel.clone())
        .release(proto::ReleaseRequest {
            lease_id: lease.lease_id,
            outcome: proto::BuildOutcome::Succeeded.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    while !line.contains("no leases, 1 build running") {
        line = next_line();
    }
    running.store(0, Ordering::SeqCst);
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "build01: drained, nothing running\n"
    );

    // Nothing runs any more: with --json, the answer says so once a report confirms it.
    let out = s
        .cli()
        .args(["--json", "drain", "build01", "--wait", "--poll", "0.05"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&v["drained"], &v["caveat"]),
        (&true.into(), &serde_json::Value::Null)
    );
}

/// Ends the tmux server of one test.
struct Tmux(String);

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.0])
            .args(args)
            .output()
            .expect("tmux runs (tests/run.sh installs it)");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the pane shows `want`, for at most 15 s; returns the screen.
    async fn screen_with(&self, want: &str) -> String {
        let mut screen = String::new();
        for _ in 0..300 {
            screen = self.run(&["capture-pane", "-p", "-t", "watch"]);
            if screen.contains(want) {
                return screen;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the terminal never showed {want:?}:\n{screen}");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.0, "kill-server"])
            .output();
    }
}

/// `status --watch` in a real terminal (a tmux pane) shows one screen at a time and
/// redraws it as the fleet changes: a lease, a drain and then a waiting request (in the
/// queue per member) appear without restarting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_redraws_in_a_real_terminal() {
    let s = Scheduler::start().await;
    s.agent("build01", Arc::new(AtomicU32::new(0))).await;
    let tmux = Tmux(format!("nd-status-{}", std::process::id()));
    let command = format!(
        "{BIN} --scheduler http://{} status --watch --interval 0.1",
        s.addr
    );
    tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "watch",
        "-x",
        "200",
        "-y",
        "50",
        &command,
    ]);
    let screen = tmux
        .screen_with("1 hosts: 1 ready, 1 taking builds now, 0 draining; 0 builds leased")
        .await;
    assert!(screen.contains("build01"), "{screen}");
    s.acquire("one").await;
    let screen = tmux.screen_with("alice").await;
    assert!(screen.contains("x86_64-linux:1"), "{screen}");
    let mut admin = proto::admin_service_client::AdminServiceClient::new(s.channel.clone());
    admin
        .drain_host(proto::DrainHostRequest {
            host_id: "build01".into(),
        })
        .await
        .unwrap();
    let screen = tmux.screen_with("1 draining").await;
    assert_eq!(
        screen.matches("MEMBER").count(),
        1,
        "one frame on screen:\n{screen}"
    );
    // A request waiting for the drained fleet shows in the queue per member.
    let mut waiting = LeaseServiceClient::new(s.channel.clone())
        .wait_for_lease(proto::WaitForLeaseRequest {
            system: "x86_64-linux".into(),
            drv_path: "/nix/store/two.drv".into(),
            client_id: "bob".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = waiting.message().await.unwrap().unwrap();
    assert!(
        matches!(
            first.event,
            Some(proto::wait_for_lease_response::Event::Waiting(_))
        ),
        "{first:?}"
    );
    let screen = tmux.screen_with("bob ").await;
    let row = screen
        .lines()
        .skip_while(|l| !l.starts_with("QUEUED FOR"))
        .find(|l| l.starts_with("bob "))
        .unwrap_or_else(|| panic!("bob in the queue per member:\n{screen}"));
    assert!(
        row.split_whitespace().collect::<Vec<_>>()[1] == "1" && row.ends_with("x86_64-linux:1"),
        "{row}"
    );
}
