//! The gate binary driven directly with protocol streams (as sshd would start it), in front
//! of the real `nix-daemon --stdio` and `nix-store --serve --write` of this machine:
//! malformed, truncated and unknown-version streams never hang it, and a held build shows
//! the member its queue position in-stream and is dropped when the member leaves.
//!
//! Needs root and `nix-bin` (the test script installs it); nothing is ever built: every
//! stream here is refused by the daemon or never forwarded.

mod common;

use std::io::{Read as _, Write as _};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::gate::gate_bin;
use common::{BuilderSpec, Env, wait_for};
use nixdispatch::gate::wire::{put_bytes, put_strings, put_u64};
use nixdispatch::gate::{serve, worker};

/// A gate configuration in `dir` with the scheduler at `url` and this host as `host`.
fn config(dir: &std::path::Path, url: &str, host: &str) -> std::path::PathBuf {
    let p = dir.join(format!("gate-{host}.toml"));
    std::fs::write(
        &p,
        format!(
            "scheduler = \"{url}\"\nhost_id = \"{host}\"\nlog_file = \"{}\"\nlog_level = \"info,nixdispatch=debug\"\n\
             [timeouts]\nconnect_millis = 500\nrpc_millis = 1000\npoll_min_millis = 100\npoll_max_millis = 300\nexit_grace_millis = 5000\n",
            dir.join("gate.log").display()
        ),
    )
    .unwrap();
    p
}

/// Starts the gate as sshd would for `command`.
fn gate(config: &std::path::Path, command: &str) -> Child {
    common::require_prerequisites();
    Command::new(gate_bin())
        .arg("--config")
        .arg(config)
        .args(["--member", "tester"])
        .env("SSH_ORIGINAL_COMMAND", command)
        .env_remove("NIX_REMOTE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nixdispatch-gate")
}

/// Sends `input`, closes stdin and waits (bounded) for the gate to exit; returns stdout.
fn run_to_exit(mut child: Child, input: &[u8]) -> Vec<u8> {
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(input);
    drop(stdin);
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    wait_for(Duration::from_secs(60), "the gate to exit", || {
        child.try_wait().unwrap()
    });
    reader.join().unwrap()
}

fn closed_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

/// The client's side of a worker handshake at 1.34 (Nix 2.8).
fn worker_hello() -> Vec<u8> {
    let mut b = Vec::new();
    for n in [worker::MAGIC_1, 0x122, 0, 0] {
        put_u64(&mut b, n);
    }
    b
}

/// A BuildDerivation of a derivation that is never built.
fn build_derivation() -> Vec<u8> {
    let mut b = Vec::new();
    put_u64(&mut b, worker::OP_BUILD_DERIVATION);
    put_bytes(
        &mut b,
        b"/nix/store/00000000000000000000000000000000-gate-test.drv",
    );
    put_u64(&mut b, 1);
    for s in [
        "out",
        "/nix/store/00000000000000000000000000000000-gate-test",
        "",
        "",
    ] {
        put_bytes(&mut b, s.as_bytes());
    }
    put_strings(&mut b, &[] as &[&str]);
    put_bytes(&mut b, common::this_system().as_bytes());
    put_bytes(&mut b, b"/bin/false");
    put_strings(&mut b, &[] as &[&str]);
    put_u64(&mut b, 0);
    put_u64(&mut b, 0);
    b
}

/// Garbage, truncated streams and unknown versions, on both protocols, end with the
/// daemon's own refusal or the client's EOF: the gate always exits.
#[test]
fn malformed_truncated_and_unknown_streams_never_hang() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &closed_url(), "t");
    let mut unknown_version = Vec::new();
    put_u64(&mut unknown_version, worker::MAGIC_1);
    put_u64(&mut unknown_version, 0x200);
    let mut serve_unknown = Vec::new();
    put_u64(&mut serve_unknown, serve::MAGIC_1);
    put_u64(&mut serve_unknown, 0x300);
    let half_build = {
        let mut b = worker_hello();
        let op = build_derivation();
        b.extend_from_slice(&op[..op.len() / 2]);
        b
    };
    let unknown_op = {
        let mut b = worker_hello();
        put_u64(&mut b, 999);
        b
    };
    let cases: [(&str, &str, Vec<u8>); 8] = [
        (
            "garbage",
            "nix-daemon --stdio",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        ),
        ("empty", "nix-daemon --stdio", Vec::new()),
        (
            "truncated magic",
            "nix-daemon --stdio",
            vec![0x63, 0x78, 0x69],
        ),
        ("unknown version", "nix-daemon --stdio", unknown_version),
        ("half a build", "nix-daemon --stdio", half_build),
        ("unknown operation", "nix-daemon --stdio", unknown_op),
        (
            "serve garbage",
            "nix-store --serve --write",
            vec![0xff; 100],
        ),
        (
            "serve unknown version",
            "nix-store --serve --write",
            serve_unknown,
        ),
    ];
    for (what, command, input) in cases {
        let out = run_to_exit(gate(&cfg, command), &input);
        if what == "unknown operation" || what == "half a build" {
            // The handshake went through to the real daemon and back.
            assert_eq!(
                out.get(..8),
                Some(&worker::MAGIC_2.to_le_bytes()[..]),
                "{what}"
            );
        }
    }
}

/// Runs a worker handshake and sends a build through the gate's `stdin`, and returns the
/// text of the gate's first `STDERR_NEXT` while it holds the build.
fn held_build_text(
    stdin: &mut std::process::ChildStdin,
    stdout: &mut std::process::ChildStdout,
) -> String {
    stdin.write_all(&worker_hello()).unwrap();
    let mut read_u64 = || {
        let mut b = [0u8; 8];
        stdout.read_exact(&mut b).map(|()| u64::from_le_bytes(b))
    };
    assert_eq!(read_u64().unwrap(), worker::MAGIC_2);
    let _server_version = read_u64().unwrap();
    // Nix version string, then (at 1.34) no trust word, then the startup log's end.
    let len = read_u64().unwrap();
    for _ in 0..len.div_ceil(8) {
        read_u64().unwrap();
    }
    assert_eq!(read_u64().unwrap(), worker::STDERR_LAST);
    stdin.write_all(&build_derivation()).unwrap();
    stdin.flush().unwrap();
    // The gate's STDERR_NEXT with the queue position, while the build is held.
    assert_eq!(read_u64().unwrap(), worker::STDERR_NEXT);
    let len = read_u64().unwrap();
    let mut text = vec![0u8; usize::try_from(len.div_ceil(8) * 8).unwrap()];
    stdout.read_exact(&mut text).unwrap();
    String::from_utf8_lossy(&text[..usize::try_from(len).unwrap()]).into_owned()
}

/// A scheduler from before `WaitForLease` (`UNIMPLEMENTED`) that postpones every
/// `Acquire` at position 4.
#[derive(Debug)]
struct OldScheduler;

type NoStream = std::pin::Pin<
    Box<
        dyn tokio_stream::Stream<
                Item = Result<nixdispatch::proto::WaitForLeaseResponse, tonic::Status>,
            > + Send,
    >,
>;

#[tonic::async_trait]
impl nixdispatch::proto::lease_service_server::LeaseService for OldScheduler {
    type WaitForLeaseStream = NoStream;

    async fn wait_for_lease(
        &self,
        _: tonic::Request<nixdispatch::proto::WaitForLeaseRequest>,
    ) -> Result<tonic::Response<NoStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("WaitForLease"))
    }

    async fn acquire(
        &self,
        _: tonic::Request<nixdispatch::proto::AcquireRequest>,
    ) -> Result<tonic::Response<nixdispatch::proto::AcquireResponse>, tonic::Status> {
        Ok(tonic::Response::new(nixdispatch::proto::AcquireResponse {
            outcome: Some(nixdispatch::proto::acquire_response::Outcome::Postpone(
                nixdispatch::proto::Postpone {
                    retry_after_millis: 100,
                    queue_position: 4,
                    reason: "all slots busy".into(),
                },
            )),
        }))
    }

    async fn keep_alive(
        &self,
        _: tonic::Request<nixdispatch::proto::KeepAliveRequest>,
    ) -> Result<tonic::Response<nixdispatch::proto::KeepAliveResponse>, tonic::Status> {
        Err(tonic::Status::not_found("no lease"))
    }

    async fn release(
        &self,
        _: tonic::Request<nixdispatch::proto::ReleaseRequest>,
    ) -> Result<tonic::Response<nixdispatch::proto::ReleaseResponse>, tonic::Status> {
        Err(tonic::Status::not_found("no lease"))
    }

    async fn list_builders(
        &self,
        _: tonic::Request<nixdispatch::proto::ListBuildersRequest>,
    ) -> Result<tonic::Response<nixdispatch::proto::ListBuildersResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("ListBuilders"))
    }
}

/// With a scheduler that predates `WaitForLease`, the gate polls a pinned `Acquire`
/// instead and still shows the member its position.
#[test]
fn a_scheduler_without_wait_for_lease_is_polled() {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(
                tokio::net::TcpListener::from_std(listener).unwrap(),
            );
            tonic::transport::Server::builder()
                .add_service(
                    nixdispatch::proto::lease_service_server::LeaseServiceServer::new(OldScheduler),
                )
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
    });
    let cfg = config(dir.path(), &url, "b1");
    let mut child = gate(&cfg, "nix-daemon --stdio");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let text = held_build_text(&mut stdin, &mut stdout);
    assert!(
        text.contains("waiting for a build slot on b1: position 4"),
        "{text}"
    );
    drop(stdin);
    wait_for(Duration::from_secs(60), "the gate to exit", || {
        child.try_wait().unwrap()
    });
    let log = std::fs::read_to_string(dir.path().join("gate.log")).unwrap();
    assert!(log.contains("polling Acquire"), "{log}");
    let _ = stop.send(());
    server.join().unwrap();
}

/// A build held for a busy host shows the member its queue position through the worker
/// protocol's own log messages, and a member who leaves while waiting takes nothing: the
/// gate exits, the build never reaches the daemon and no lease is left behind.
#[test]
fn held_build_shows_position_and_is_dropped_when_the_member_leaves() {
    let specs = [BuilderSpec::new("b1", 1)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let url = env.scheduler_addr.clone().unwrap();
    // Someone else holds b1's only slot.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let granted = rt.block_on(async {
        let ch = nixdispatch::client::connect(&nixdispatch::client::ClientConfig::new(url.clone()))
            .await
            .unwrap();
        nixdispatch::client::lease_client(ch)
            .acquire(nixdispatch::proto::AcquireRequest {
                system: common::this_system(),
                drv_path: "/nix/store/11111111111111111111111111111111-other.drv".into(),
                client_id: "someone-else".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    });
    assert!(
        matches!(
            granted.outcome,
            Some(nixdispatch::proto::acquire_response::Outcome::Granted(_))
        ),
        "{granted:?}"
    );
    let cfg = config(env.path(), &url, "b1");
    let mut child = gate(&cfg, "nix-daemon --stdio");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let text = held_build_text(&mut stdin, &mut stdout);
    assert!(
        text.contains("waiting for a build slot on b1: position 1"),
        "{text}"
    );
    // The member leaves.
    drop(stdin);
    wait_for(Duration::from_secs(60), "the gate to exit", || {
        child.try_wait().unwrap()
    });
    let leases = env.leases();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0].client_id, "someone-else");
    let log = std::fs::read_to_string(env.path().join("gate.log")).unwrap_or_default();
    assert!(
        log.contains("the client left while its build waited"),
        "{log}"
    );
}
