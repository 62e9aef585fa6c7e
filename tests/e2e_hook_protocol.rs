//! The hook binary speaking the daemon's protocol on its stdin and stderr, without Nix or
//! root: the answers when the scheduler is dead, silent, or the configuration is broken,
//! and a build that cannot run locally accepted at once and waiting in a real scheduler's
//! queue (with a stand-in build-remote).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixdispatch::hook::codec::{self, Settings, TryRequest};

/// Runs the hook with `config` on a handshake and `tries` `try`s; returns its fd 2 and the
/// time it took.
fn converse(config: &str, tries: usize) -> (String, Duration, Option<i32>) {
    let mut input = handshake();
    for i in 0..tries {
        codec::write_try(&mut input, &try_request(true, i));
    }
    run_hook(config, &input)
}

/// The daemon's settings handshake.
fn handshake() -> Vec<u8> {
    let mut input = Vec::new();
    let settings = Settings {
        entries: vec![
            ("builders".into(), "".into()),
            ("system".into(), "x86_64-linux".into()),
            ("system-features".into(), "".into()),
        ],
    };
    codec::write_settings(&mut input, &settings);
    input
}

/// A `try` for derivation `d<i>`; `am_willing`: a local slot is free.
fn try_request(am_willing: bool, i: usize) -> TryRequest {
    TryRequest {
        am_willing,
        needed_system: "x86_64-linux".into(),
        drv_path: format!("/nix/store/00000000000000000000000000000000-d{i}.drv"),
        required_features: vec![],
    }
}

/// One `try` that Nix cannot build locally, then (as after an accept) its inputs.
fn accepted_input() -> Vec<u8> {
    let mut input = handshake();
    codec::write_try(&mut input, &try_request(false, 0));
    codec::write_build_inputs(
        &mut input,
        &codec::BuildInputs {
            inputs: vec![],
            wanted_outputs: vec!["out".into()],
        },
    );
    input
}

/// Runs the hook with `config` on `input`; returns its fd 2, the time it took and its status.
fn run_hook(config: &str, input: &[u8]) -> (String, Duration, Option<i32>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hook.toml");
    std::fs::write(&path, config).unwrap();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nixdispatch-hook"))
        .arg("0")
        .env("NIXDISPATCH_HOOK_CONFIG", &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    (err, started.elapsed(), status.code())
}

fn replies(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.starts_with("# ")).collect()
}

/// Every line the hook writes on fd 2 is a control reply, the machine name after an
/// accept, or an `@nix` JSON message.
fn assert_clean(err: &str) {
    let mut after_accept = false;
    for l in err.lines() {
        assert!(
            l.starts_with("# ") || codec::log_line_text(l).is_some() || after_accept,
            "junk on fd 2: {l:?}"
        );
        after_accept = l == "# accept";
    }
}

/// With the scheduler's port closed and no fallback, every `try` is declined with a reason,
/// and the hook exits 0 at the end of input.
#[test]
fn dead_scheduler_declines_each_try() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let (err, _, code) = converse(&format!("scheduler = \"{url}\""), 3);
    assert_clean(&err);
    assert_eq!(replies(&err), vec!["# decline"; 3], "{err}");
    assert!(err.contains("scheduler unreachable"), "{err}");
    assert_eq!(code, Some(0));
}

/// A scheduler that accepts connections but never answers cannot hold the daemon: the `try`
/// is declined within the configured bound.
#[test]
fn silent_scheduler_is_bounded() {
    // Bound but never accepted: the TCP connect succeeds (backlog), HTTP/2 never answers.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (err, took, _) = converse(
        &format!("scheduler = \"{url}\"\n[timeouts]\nconnect_millis = 5000\ntry_millis = 300\n"),
        2,
    );
    drop(l);
    assert_clean(&err);
    assert_eq!(replies(&err), vec!["# decline"; 2], "{err}");
    // The second `try` skips the dead scheduler (backoff) instead of waiting again.
    assert!(took < Duration::from_millis(2500), "took {took:?}");
}

/// A broken configuration disables the hook for the command: `# decline-permanently` with an
/// error naming the key.
#[test]
fn broken_config_declines_permanently() {
    let (err, _, code) = converse("schedulr = \"http://x\"", 1);
    assert_clean(&err);
    assert_eq!(replies(&err), vec!["# decline-permanently"], "{err}");
    assert!(err.contains("schedulr"), "{err}");
    assert_eq!(code, Some(0));
}

/// A build Nix cannot run locally is accepted at once even with the scheduler dead (a
/// decline would fail it); the hook keeps trying to reach the scheduler, and when the
/// maximum wait runs out without fallback builders it fails saying why.
#[test]
fn dead_scheduler_accepts_and_waits_when_the_build_cannot_run_locally() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let config = format!("scheduler = \"{url}\"\n[timeouts]\nmax_wait_millis = 1500\n");
    let (err, _, code) = run_hook(&config, &accepted_input());
    assert_clean(&err);
    assert_eq!(replies(&err), vec!["# accept"], "{err}");
    assert!(err.contains("nixdispatch-queue"), "{err}");
    assert!(
        err.contains("still waiting for an x86_64-linux builder"),
        "{err}"
    );
    assert!(
        err.contains("cannot build d0: no x86_64-linux builder within"),
        "{err}"
    );
    assert_eq!(code, Some(1));
}

mod with_a_scheduler {
    use nixdispatch::proto::{
        self, AgentMessage, Register, admin_service_client::AdminServiceClient,
        agent_message::Message, agent_service_client::AgentServiceClient,
        lease_service_client::LeaseServiceClient,
    };
    use tokio::sync::{mpsc, oneshot};
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHdzrOYYsx97jgJC4raQrLvbWQfJI3Wj8wIeg0F7/qlv";

    type Running = tokio::task::JoinHandle<Result<(), nixdispatch_scheduler::Error>>;

    /// A scheduler on `listener`; stopped by the returned sender.
    fn serve(listener: tokio::net::TcpListener) -> (oneshot::Sender<()>, Running) {
        let (stop, stopped) = oneshot::channel::<()>();
        // No restart hold: the tests that restart it check their own over-commit.
        let mut config = nixdispatch_scheduler::config::Config::default();
        config.queue.restart_hold_millis = Some(0);
        let server = tokio::spawn(nixdispatch_scheduler::server::run(
            listener,
            config,
            async {
                let _ = stopped.await;
            },
        ));
        (stop, server)
    }

    /// Registers builder `b1` (one x86_64-linux slot) and reports that `running` builds
    /// run there; returns the agent's stream (dropping it disconnects the agent).
    async fn agent(
        channel: tonic::transport::Channel,
        running: u32,
    ) -> (
        mpsc::Sender<AgentMessage>,
        tonic::Streaming<proto::SchedulerMessage>,
    ) {
        let (tx, rx) = mpsc::channel(4);
        let register = Register {
            host_id: "b1".into(),
            store_uri: "ssh-ng://b1".into(),
            host_public_key: KEY.into(),
            systems: vec!["x86_64-linux".into()],
            max_jobs: 1,
            ..Default::default()
        };
        tx.send(AgentMessage {
            message: Some(Message::Register(register)),
        })
        .await
        .unwrap();
        tx.send(AgentMessage {
            message: Some(Message::Report(proto::Report {
                running_builds: Some(running),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut answers = AgentServiceClient::new(channel)
            .session(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(10), answers.message())
                .await
                .unwrap()
                .unwrap();
        }
        (tx, answers)
    }

    async fn connect(addr: std::net::SocketAddr) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Waits (polling, bounded) until `n` requests wait in the queue.
    async fn until_waiting(admin: &mut AdminServiceClient<tonic::transport::Channel>, n: u32) {
        for _ in 0..500 {
            let waiting: u32 = admin
                .get_capacity(proto::GetCapacityRequest {})
                .await
                .unwrap()
                .into_inner()
                .systems
                .iter()
                .map(|s| s.waiting)
                .sum();
            if waiting == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{n} requests never waited");
    }

    /// The hook's configuration with a stand-in build-remote that accepts, takes its inputs
    /// and succeeds.
    fn config(addr: std::net::SocketAddr) -> String {
        format!(
            "scheduler = \"http://{addr}\"\nclient_id = \"member\"\n\
             build_remote = [\"/bin/sh\", \"-c\", \"echo '# accept'; echo b1; cat > /dev/null\"]\n"
        )
    }

    /// Checks that the hook accepted at once, built `d0` on `b1` and succeeded; returns its
    /// fd 2.
    fn built_on_b1((err, _, code): (String, Duration, Option<i32>)) -> String {
        assert_clean(&err);
        assert_eq!(replies(&err), vec!["# accept"], "{err}");
        assert!(err.contains("building d0 on b1"), "{err}");
        assert_eq!(code, Some(0), "{err}");
        err
    }

    /// A build that cannot run locally while the only slot is busy: the hook accepts at
    /// once, shows its place in the queue, gets the slot the moment it is released, runs
    /// the (stand-in) build-remote on it and releases the lease as succeeded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_accepted_build_waits_in_the_queue_and_gets_the_freed_slot() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, server) = serve(listener);
        let channel = connect(addr).await;
        let (tx, _answers) = agent(channel.clone(), 0).await;
        let mut leases = LeaseServiceClient::new(channel.clone());
        let busy = leases
            .acquire(proto::AcquireRequest {
                system: "x86_64-linux".into(),
                drv_path: "/nix/store/busy.drv".into(),
                client_id: "other".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let Some(proto::acquire_response::Outcome::Granted(busy)) = busy.outcome else {
            panic!("{busy:?}");
        };

        let config = config(addr);
        let hook = tokio::task::spawn_blocking(move || run_hook(&config, &accepted_input()));
        let mut admin = AdminServiceClient::new(channel.clone());
        until_waiting(&mut admin, 1).await;
        leases
            .release(proto::ReleaseRequest {
                lease_id: busy.lease_id,
                outcome: proto::BuildOutcome::Succeeded as i32,
                duration_millis: 1,
            })
            .await
            .unwrap();
        let err = built_on_b1(hook.await.unwrap());
        // Its place is shown when it accepts ("waits for an x86_64-linux builder (queue
        // position 1)"), and again in the stream's progress lines if the wait lasts long
        // enough for one ("waiting for an x86_64-linux builder: position 1").
        assert!(
            err.contains("x86_64-linux builder (queue position 1)")
                || err.contains("waiting for an x86_64-linux builder: position 1"),
            "{err}"
        );
        let usage = admin
            .get_usage(proto::GetUsageRequest {})
            .await
            .unwrap()
            .into_inner()
            .members;
        let member = usage.iter().find(|m| m.client_id == "member").unwrap();
        assert_eq!((member.builds, member.running), (1, 0));
        let _ = stop.send(());
        drop(tx);
        server.await.unwrap().unwrap();
    }

    /// The scheduler stops while a build waits in its queue and comes back on the same
    /// address: the hook re-connects by itself, queues again (the new scheduler does not
    /// decline while agents re-register), and gets the slot once the builder reports it
    /// free. The build never fails.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_build_survives_a_scheduler_restart() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, server) = serve(listener);
        let channel = connect(addr).await;
        let (tx, answers) = agent(channel.clone(), 1).await;
        let config = config(addr);
        let hook = tokio::task::spawn_blocking(move || run_hook(&config, &accepted_input()));
        until_waiting(&mut AdminServiceClient::new(channel.clone()), 1).await;

        let _ = stop.send(());
        drop((tx, answers, channel));
        server.await.unwrap().unwrap();
        let (stop, server) = serve(tokio::net::TcpListener::bind(addr).await.unwrap());
        let channel = connect(addr).await;
        let (tx, _answers) = agent(channel.clone(), 0).await;

        let err = built_on_b1(hook.await.unwrap());
        assert!(err.contains("lost the scheduler"), "{err}");
        let _ = stop.send(());
        drop(tx);
        server.await.unwrap().unwrap();
    }
}
