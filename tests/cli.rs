//! The `nixdispatch` operator CLI against a real scheduler on 127.0.0.1:0.

use std::process::Command;
use std::time::Duration;

use nixdispatch::proto::{
    AgentMessage, Register, agent_message::Message, agent_service_client::AgentServiceClient,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

const BIN: &str = env!("CARGO_BIN_EXE_nixdispatch");

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHdzrOYYsx97jgJC4raQrLvbWQfJI3Wj8wIeg0F7/qlv";

/// Runs the CLI with `args` against `addr` on a blocking thread; returns (success, stdout,
/// stderr).
async fn cli(addr: std::net::SocketAddr, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.arg("--scheduler")
        .arg(format!("http://{addr}"))
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A scheduler in the open mode on 127.0.0.1:0 with agent `build01` registered, which
/// stays connected until [`Running::stop`].
struct Running {
    addr: std::net::SocketAddr,
    channel: tonic::transport::Channel,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), nixdispatch_scheduler::Error>>,
    agent: (
        mpsc::Sender<AgentMessage>,
        tonic::Streaming<nixdispatch::proto::SchedulerMessage>,
    ),
}

impl Running {
    /// Stops the scheduler and checks that it stopped cleanly.
    async fn stop(self) {
        let _ = self.stop.send(());
        drop(self.agent);
        self.server.await.unwrap().unwrap();
    }
}

/// [`Running`], with build01 serving x86_64-linux with `slots` slots.
async fn scheduler_with_build01(slots: u32) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(nixdispatch_scheduler::server::run(
        listener,
        nixdispatch_scheduler::config::Config::default(),
        async {
            let _ = stopped.await;
        },
    ));

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(AgentMessage {
        message: Some(Message::Register(Register {
            host_id: "build01".into(),
            store_uri: "ssh-ng://build01".into(),
            host_public_key: KEY.into(),
            systems: vec!["x86_64-linux".into()],
            max_jobs: slots,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut answers = AgentServiceClient::new(channel.clone())
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .unwrap()
        .unwrap();

    Running {
        addr,
        channel,
        stop,
        server,
        agent: (tx, answers),
    }
}

/// hosts, capacity, explain, drain (also of a host not registered yet), undrain, leases,
/// quota and usage work end to end, as tables and JSON, and errors from the scheduler
/// reach the operator with their code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_against_a_real_scheduler() {
    let running = scheduler_with_build01(6).await;
    let addr = running.addr;

    let (ok, out, _) = cli(addr, &["hosts"]).await;
    assert!(ok);
    assert!(
        out.lines()
            .nth(1)
            .unwrap()
            .starts_with("build01  x86_64-linux  ready"),
        "{out}"
    );

    let (ok, out, _) = cli(addr, &["--json", "capacity"]).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["system"], "x86_64-linux");
    assert_eq!(v[0]["slots_free"], 6);

    let (ok, out, _) = cli(addr, &["drain", "build01"]).await;
    assert!(ok);
    assert_eq!(out, "build01: ready, draining, 0/6 slots used\n");
    let (_, out, _) = cli(addr, &["explain", "x86_64-linux"]).await;
    assert!(
        out.contains("draining") && out.contains("outcome: postpone"),
        "{out}"
    );
    cli(addr, &["undrain", "build01"]).await;
    let (_, out, _) = cli(addr, &["explain", "x86_64-linux", "--features", "kvm"]).await;
    assert!(out.contains("lacks features kvm"), "{out}");
    let (_, out, _) = cli(addr, &["--json", "explain", "x86_64-linux"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["chosen_host_id"], "build01");

    let (ok, out, _) = cli(addr, &["leases"]).await;
    assert!(ok);
    assert_eq!(out.lines().count(), 1, "only the header: {out}");

    let (ok, out, _) = cli(
        addr,
        &[
            "quota",
            "member",
            "alice",
            "--max-slots",
            "2",
            "--priority",
            "-100",
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("member   alice")),
        "{out}"
    );
    cli(
        addr,
        &["quota", "system", "x86_64-linux", "--max-slots", "4"],
    )
    .await;
    let (_, out, _) = cli(addr, &["--json", "quota"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["members"][0]["priority"], -100);
    assert_eq!(v["systems"][0]["max_slots"], 4);
    let (ok, out, _) = cli(addr, &["usage"]).await;
    assert!(ok && out.starts_with("MEMBER"), "{out}");
    let (ok, _, err) = cli(addr, &["quota", "system", "bad system"]).await;
    assert!(!ok && err.contains("invalid system"), "{err}");

    let (ok, out, _) = cli(addr, &["drain", "build02"]).await;
    assert!(ok);
    assert_eq!(
        out,
        "build02: draining; no agent with this id has registered since the scheduler \
         started (the drain applies when one does)\n"
    );
    let (ok, _, err) = cli(addr, &["drain", "no/such host"]).await;
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("host_id"),
        "{err}"
    );

    running.stop().await;
}

/// `status` shows the whole queue when it is longer than one `ListWaiting` page (256): the
/// CLI follows the page tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_follows_the_pages_of_a_long_queue() {
    let running = scheduler_with_build01(1).await;
    let leases =
        nixdispatch::proto::lease_service_client::LeaseServiceClient::new(running.channel.clone());
    // The one slot is taken; then two members' requests wait (each under its cap of 256).
    let ask = |client: String, drv: String| {
        let mut leases = leases.clone();
        async move {
            leases
                .acquire(nixdispatch::proto::AcquireRequest {
                    system: "x86_64-linux".into(),
                    drv_path: format!("/nix/store/{drv}.drv"),
                    client_id: client,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .outcome
        }
    };
    let first = ask("alice".into(), "first".into()).await;
    assert!(
        matches!(
            first,
            Some(nixdispatch::proto::acquire_response::Outcome::Granted(_))
        ),
        "{first:?}"
    );
    for member in ["alice", "bob"] {
        for i in 0..150 {
            let o = ask(member.into(), format!("{member}-{i:03}")).await;
            assert!(
                matches!(
                    o,
                    Some(nixdispatch::proto::acquire_response::Outcome::Postpone(_))
                ),
                "{o:?}"
            );
        }
    }
    let (ok, out, err) = cli(running.addr, &["--json", "status"]).await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut waiting: Vec<(String, u64)> = v["queue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["member"].as_str().unwrap().to_owned(),
                q["waiting"].as_u64().unwrap(),
            )
        })
        .collect();
    waiting.sort();
    assert_eq!(
        waiting,
        [("alice".into(), 150), ("bob".into(), 150)],
        "{out}"
    );
    drop(leases);
    running.stop().await;
}

/// An unreachable scheduler is a clear error and a non-zero exit, not a hang or a panic.
#[tokio::test]
async fn unreachable_scheduler_is_a_clear_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let (ok, _, err) = cli(addr, &["hosts"]).await;
    assert!(!ok);
    assert!(err.contains("cannot connect to the scheduler"), "{err}");
}

/// With `[auth]`, `provision` and `unprovision` work with the operator's credential file,
/// are denied with a member's and unauthenticated without one, and the errors say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_needs_the_operator_credential() {
    use nixdispatch_scheduler::auth::{AuthConfig, PrincipalEntry, digest_of};
    let dir = tempfile::tempdir().unwrap();
    let token = |name: &str| {
        let path = dir.path().join(format!("{name}.token"));
        std::fs::write(&path, format!("{name}-token-0123456789\n")).unwrap();
        (
            path,
            digest_of(&format!("{name}-token-0123456789")).to_hex(),
        )
    };
    let (ops_file, ops_digest) = token("ops");
    let (alice_file, alice_digest) = token("alice");
    let key_file = dir.path().join("host.pub");
    std::fs::write(&key_file, format!("{KEY} root@b2\n")).unwrap();
    let config = nixdispatch_scheduler::config::Config {
        auth: Some(AuthConfig {
            members: vec![PrincipalEntry {
                name: "alice".into(),
                token_sha256: alice_digest,
            }],
            operators: vec![PrincipalEntry {
                name: "ops".into(),
                token_sha256: ops_digest,
            }],
            ..AuthConfig::default()
        }),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(nixdispatch_scheduler::server::run(
        listener,
        config,
        async {
            let _ = stopped.await;
        },
    ));
    let provision = [
        "provision",
        "b2",
        "--store-uri",
        "ssh-ng://b2",
        "--host-key-file",
        key_file.to_str().unwrap(),
        "--token-sha256",
        &"ab".repeat(32),
    ];
    let with = |file: &std::path::Path, args: &[&str]| {
        let mut v = vec!["--credential-file".to_owned(), file.display().to_string()];
        v.extend(args.iter().map(|a| a.to_string()));
        v
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(addr, &args).await
    };
    let (ok, _, err) = run(provision.iter().map(|a| a.to_string()).collect()).await;
    assert!(!ok && err.contains("Unauthenticated"), "{err}");
    let (ok, _, err) = run(with(&alice_file, &provision)).await;
    assert!(!ok && err.contains("PermissionDenied"), "{err}");
    let (ok, out, err) = run(with(&ops_file, &provision)).await;
    assert!(ok, "{err}");
    assert_eq!(out, "b2 provisioned at ssh-ng://b2\n");
    let (ok, out, _) = run(with(&ops_file, &["--json", "unprovision", "b2"])).await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["removed"], true);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
