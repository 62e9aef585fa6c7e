//! Trust over real gRPC on 127.0.0.1:0: every attack of issue 9's first paragraph, tried
//! against a scheduler with `[auth]` configured, through the shared client module a real
//! hook, agent or operator uses, and refused with the code the contract names
//! (`UNAUTHENTICATED` without a known credential, `PERMISSION_DENIED` for a wrong role or
//! owner).

use std::path::PathBuf;
use std::time::Duration;

use nixdispatch::client::{self, AuthChannel, ClientConfig};
use nixdispatch::proto::{
    self, AcquireRequest, AgentMessage, Register, Report, SchedulerMessage,
    acquire_response::Outcome, admin_service_client::AdminServiceClient, agent_message::Message,
    lease_service_client::LeaseServiceClient,
};
use nixdispatch_scheduler::auth::{AuthConfig, HostEntry, PrincipalEntry, digest_of};
use nixdispatch_scheduler::config::Config;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

/// The real builder's host key.
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHdzrOYYsx97jgJC4raQrLvbWQfJI3Wj8wIeg0F7/qlv root@b";
/// The attacker's own key.
const ATTACKER_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl evil";

/// A scheduler served in-process; stopped on drop.
struct Server {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<Result<(), nixdispatch_scheduler::Error>>>,
    /// Token files: `<name>.token`.
    dir: tempfile::TempDir,
}

impl Server {
    async fn start(config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(nixdispatch_scheduler::server::run(
            listener,
            config,
            async {
                let _ = stopped.await;
            },
        ));
        let dir = tempfile::tempdir().unwrap();
        for name in ["alice", "bob", "ops", "build01", "build02", "stranger"] {
            std::fs::write(dir.path().join(format!("{name}.token")), token(name)).unwrap();
        }
        Server {
            addr,
            stop: Some(stop),
            done: Some(done),
            dir,
        }
    }

    /// A channel carrying `who`'s token (`None`: no credential), made by the shared client.
    async fn as_(&self, who: Option<&str>) -> AuthChannel {
        let mut c = ClientConfig::new(format!("http://{}", self.addr));
        c.credential_file = who.map(|w| self.token_file(w));
        client::connect(&c).await.unwrap()
    }

    fn token_file(&self, who: &str) -> PathBuf {
        self.dir.path().join(format!("{who}.token"))
    }

    async fn lease(&self, who: Option<&str>) -> LeaseServiceClient<AuthChannel> {
        LeaseServiceClient::new(self.as_(who).await)
    }

    async fn admin(&self, who: Option<&str>) -> AdminServiceClient<AuthChannel> {
        AdminServiceClient::new(self.as_(who).await)
    }

    /// `who`'s grant for `drv`, asked under `label`; panics unless granted.
    async fn grant(&self, who: &str, label: &str, drv: &str) -> proto::Granted {
        let answer = self
            .lease(Some(who))
            .await
            .acquire(acquire(label, drv))
            .await;
        granted(answer.unwrap().into_inner())
    }

    /// The leases `who` may see.
    async fn leases_of(&self, who: &str) -> Vec<proto::LeaseStatus> {
        let answer = self
            .admin(Some(who))
            .await
            .list_leases(proto::ListLeasesRequest {})
            .await;
        answer.unwrap().into_inner().leases
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        drop(self.done.take());
    }
}

/// Each identity's token: long and random-looking in real life, only distinct here.
fn token(name: &str) -> String {
    format!("{name}-token-0123456789abcdef")
}

fn principal(name: &str) -> PrincipalEntry {
    PrincipalEntry {
        name: name.into(),
        token_sha256: digest_of(&token(name)).to_hex(),
    }
}

/// Members alice and bob, operator ops, builder build01 provisioned with KEY.
fn auth_config() -> Config {
    let mut c = Config::default();
    c.agents.report_interval_millis = 200;
    c.agents.grace_millis = 200;
    c.auth = Some(AuthConfig {
        members: vec![principal("alice"), principal("bob")],
        operators: vec![principal("ops")],
        hosts: vec![HostEntry {
            id: "build01".into(),
            store_uri: "ssh-ng://build01".into(),
            public_key: KEY.into(),
            token_sha256: digest_of(&token("build01")).to_hex(),
        }],
        ..AuthConfig::default()
    });
    c
}

fn register(id: &str, uri: &str, key: &str, slots: u32) -> Register {
    Register {
        host_id: id.into(),
        store_uri: uri.into(),
        host_public_key: key.into(),
        systems: vec!["x86_64-linux".into()],
        supported_features: vec![],
        mandatory_features: vec![],
        max_jobs: slots,
        speed_factor: 1000.0,
        cpu_count: 8,
        total_memory_bytes: 16 << 30,
        agent_version: "test".into(),
    }
}

/// One agent stream driven by hand.
struct Agent {
    tx: mpsc::Sender<AgentMessage>,
    rx: Streaming<SchedulerMessage>,
}

impl Agent {
    /// Opens a session and sends the registration; the first answer (or the refusal) is
    /// read with [`Agent::next`].
    async fn open(channel: AuthChannel, r: Register) -> Result<Self, tonic::Status> {
        let (tx, out) = mpsc::channel(8);
        tx.send(AgentMessage {
            message: Some(Message::Register(r)),
        })
        .await
        .unwrap();
        let rx = client::agent_client(channel)
            .session(ReceiverStream::new(out))
            .await?
            .into_inner();
        Ok(Agent { tx, rx })
    }

    async fn next(&mut self) -> Result<SchedulerMessage, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("the scheduler answers within 10 s")
            .and_then(|m| m.ok_or_else(|| tonic::Status::cancelled("stream ended")))
    }

    async fn report(&mut self) -> Result<SchedulerMessage, tonic::Status> {
        self.tx
            .send(AgentMessage {
                message: Some(Message::Report(Report {
                    running_builds: Some(0),
                    ..Report::default()
                })),
            })
            .await
            .map_err(|_| tonic::Status::cancelled("stream closed"))?;
        self.next().await
    }
}

/// The real build01 agent, registered with its own token.
async fn real_agent(server: &Server) -> Agent {
    agent_of(server, "build01").await
}

/// The real agent of provisioned host `id` (store URI `ssh-ng://<id>`, KEY), registered
/// with its own token.
async fn agent_of(server: &Server, id: &str) -> Agent {
    let mut a = Agent::open(
        server.as_(Some(id)).await,
        register(id, &format!("ssh-ng://{id}"), KEY, 4),
    )
    .await
    .unwrap();
    a.next().await.unwrap();
    a
}

/// A registration attempt's final status code.
async fn registration_code(channel: AuthChannel, r: Register) -> Code {
    match Agent::open(channel, r).await {
        Err(status) => status.code(),
        Ok(mut a) => a
            .next()
            .await
            .expect_err("the registration must be refused")
            .code(),
    }
}

fn acquire(client_id: &str, drv: &str) -> AcquireRequest {
    AcquireRequest {
        system: "x86_64-linux".into(),
        required_features: vec![],
        drv_path: format!("/nix/store/{drv}.drv"),
        client_id: client_id.into(),
        can_build_locally: false,
        exclude_hosts: vec![],
        pin_host: String::new(),
    }
}

fn granted(r: proto::AcquireResponse) -> proto::Granted {
    match r.outcome {
        Some(Outcome::Granted(g)) => g,
        other => panic!("expected a grant, got {other:?}"),
    }
}

/// A made-up builder (its own URI and key, 1,024 slots, speed 1000) cannot register, with no
/// credential, a member's, or another builder's; members' builds never go to it.
#[tokio::test]
async fn made_up_builder_is_refused() {
    let server = Server::start(auth_config()).await;
    let evil = || register("evil", "ssh-ng://attacker.example", ATTACKER_KEY, 1024);
    assert_eq!(
        registration_code(server.as_(None).await, evil()).await,
        Code::Unauthenticated
    );
    assert_eq!(
        registration_code(server.as_(Some("stranger")).await, evil()).await,
        Code::Unauthenticated
    );
    assert_eq!(
        registration_code(server.as_(Some("alice")).await, evil()).await,
        Code::PermissionDenied
    );
    assert_eq!(
        registration_code(server.as_(Some("build01")).await, evil()).await,
        Code::PermissionDenied
    );
    let _real = real_agent(&server).await;
    let mut alice = server.lease(Some("alice")).await;
    for i in 0..4 {
        let g = granted(
            alice
                .acquire(acquire("alice", &format!("d{i}")))
                .await
                .unwrap()
                .into_inner(),
        );
        assert_eq!(g.store_uri, "ssh-ng://build01");
        assert_eq!(
            String::from_utf8(base64_decode(&g.host_public_key_base64)).unwrap(),
            KEY.rsplit_once(' ').unwrap().0
        );
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// Re-registering build01 with the attacker's URI or key is refused, even with build01's own
/// token, and the connected agent keeps its stream; grants keep the provisioned URI.
#[tokio::test]
async fn reregistration_with_another_uri_or_key_never_supersedes() {
    let server = Server::start(auth_config()).await;
    let mut real = real_agent(&server).await;
    let with_token = || async { server.as_(Some("build01")).await };
    assert_eq!(
        registration_code(
            with_token().await,
            register("build01", "ssh-ng://attacker.example", KEY, 1024)
        )
        .await,
        Code::PermissionDenied
    );
    assert_eq!(
        registration_code(
            with_token().await,
            register("build01", "ssh-ng://build01", ATTACKER_KEY, 1024)
        )
        .await,
        Code::PermissionDenied
    );
    // Without the token an impostor cannot even open the stream to say goodbye or report.
    assert_eq!(
        registration_code(
            server.as_(None).await,
            register("build01", "ssh-ng://build01", KEY, 4)
        )
        .await,
        Code::Unauthenticated
    );
    real.report()
        .await
        .expect("the real agent's stream is untouched");
    let g = server.grant("alice", "alice", "d").await;
    assert_eq!(g.store_uri, "ssh-ng://build01");
    assert_eq!(g.slots_total, 4);
}

/// Draining and undraining need the operator role: no credential is unauthenticated, a
/// member or a builder is denied, an operator may.
#[tokio::test]
async fn drain_and_undrain_need_an_operator() {
    let server = Server::start(auth_config()).await;
    let drain = || proto::DrainHostRequest {
        host_id: "build01".into(),
    };
    let e = server
        .admin(None)
        .await
        .drain_host(drain())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    for who in ["alice", "build01"] {
        let e = server
            .admin(Some(who))
            .await
            .drain_host(drain())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}");
        let e = server
            .admin(Some(who))
            .await
            .undrain_host(proto::UndrainHostRequest {
                host_id: "build01".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}");
    }
    let status = server
        .admin(Some("ops"))
        .await
        .drain_host(drain())
        .await
        .unwrap();
    assert!(status.into_inner().draining);
}

/// A member cannot acquire under another member's `client_id`; its own label is fine, and
/// the lease is held under the member the credential proves.
#[tokio::test]
async fn acquire_under_another_member_is_denied() {
    let server = Server::start(auth_config()).await;
    let _real = real_agent(&server).await;
    let mut alice = server.lease(Some("alice")).await;
    let e = alice.acquire(acquire("bob", "d")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = server
        .lease(None)
        .await
        .acquire(acquire("alice", "d"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = server
        .lease(Some("ops"))
        .await
        .acquire(acquire("ops", "d"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    granted(
        alice
            .acquire(acquire("alice-laptop", "d"))
            .await
            .unwrap()
            .into_inner(),
    );
    let leases = server.leases_of("ops").await;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].client_id, "alice");
}

/// One member reporting a builder unreachable under two made-up client ids counts once: the
/// builder is held back for that member only, and another member still gets it.
#[tokio::test]
async fn unreachable_quorum_counts_members_not_labels() {
    let server = Server::start(auth_config()).await;
    let _real = real_agent(&server).await;
    let mut alice = server.lease(Some("alice")).await;
    let g = granted(
        alice
            .acquire(acquire("x", "d1"))
            .await
            .unwrap()
            .into_inner(),
    );
    alice
        .release(proto::ReleaseRequest {
            lease_id: g.lease_id,
            outcome: proto::BuildOutcome::HostUnreachable as i32,
            duration_millis: 0,
        })
        .await
        .unwrap();
    let second = alice
        .acquire(acquire("y", "d2"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !matches!(second.outcome, Some(Outcome::Granted(_))),
        "a second label is the same member: {second:?}"
    );
    let g = server.grant("bob", "bob", "d3").await;
    assert_eq!(g.host_id, "build01");
}

/// Another member's keep-alive or release of a lease is denied and leaves it live; lease
/// ids are 128 random bits, so one's own reveals nothing of the neighbours'.
#[tokio::test]
async fn another_members_lease_cannot_be_touched() {
    let server = Server::start(auth_config()).await;
    let _real = real_agent(&server).await;
    let mut alice = server.lease(Some("alice")).await;
    let mut bob = server.lease(Some("bob")).await;
    let a = granted(
        alice
            .acquire(acquire("alice", "a"))
            .await
            .unwrap()
            .into_inner(),
    );
    let b = granted(bob.acquire(acquire("bob", "b")).await.unwrap().into_inner());
    for id in [&a.lease_id, &b.lease_id] {
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
    }
    let differing = a
        .lease_id
        .bytes()
        .zip(b.lease_id.bytes())
        .filter(|(x, y)| x != y)
        .count();
    assert!(differing > 8, "{} vs {}", a.lease_id, b.lease_id);
    let e = bob
        .keep_alive(proto::KeepAliveRequest {
            lease_id: a.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = bob
        .release(proto::ReleaseRequest {
            lease_id: a.lease_id.clone(),
            outcome: proto::BuildOutcome::Succeeded as i32,
            duration_millis: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = server
        .lease(None)
        .await
        .keep_alive(proto::KeepAliveRequest {
            lease_id: a.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    alice
        .keep_alive(proto::KeepAliveRequest {
            lease_id: a.lease_id.clone(),
            ..Default::default()
        })
        .await
        .expect("the holder still has its lease");
    let r = alice
        .release(proto::ReleaseRequest {
            lease_id: a.lease_id,
            outcome: proto::BuildOutcome::Succeeded as i32,
            duration_millis: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.already_released);
}

/// A member lists only its own leases (never another member's derivation paths); the
/// read-only admin calls are operators' unless `open_reads`; an operator sees everything.
#[tokio::test]
async fn members_see_only_their_own_leases() {
    let server = Server::start(auth_config()).await;
    let _real = real_agent(&server).await;
    server.grant("alice", "alice", "alice-secret").await;
    server.grant("bob", "bob", "bob-secret").await;
    let mine = server.leases_of("bob").await;
    assert_eq!(mine.len(), 1);
    assert!(
        mine.iter()
            .all(|l| l.client_id == "bob" && !l.drv_path.contains("alice"))
    );
    let e = server
        .admin(None)
        .await
        .list_leases(proto::ListLeasesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut bob = server.admin(Some("bob")).await;
    assert_eq!(
        bob.list_hosts(proto::ListHostsRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        bob.get_capacity(proto::GetCapacityRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        bob.explain_placement(proto::ExplainPlacementRequest {
            system: "x86_64-linux".into(),
            required_features: vec![],
        })
        .await
        .unwrap_err()
        .code(),
        Code::PermissionDenied
    );
    let all = server.leases_of("ops").await;
    assert_eq!(all.len(), 2);
    server
        .admin(Some("ops"))
        .await
        .list_hosts(proto::ListHostsRequest {})
        .await
        .unwrap();
}

/// With `open_reads`, members may list hosts and capacity, but still only their own leases.
/// A member lists the builders it may be sent to with their machines-line fields and
/// pinned key (what its doctor checks), named as itself; operators, builders and unknown
/// callers cannot.
#[tokio::test]
async fn members_list_their_builders_and_nobody_else_does() {
    let server = Server::start(auth_config()).await;
    let _real = real_agent(&server).await;
    let r = server
        .lease(Some("bob"))
        .await
        .list_builders(proto::ListBuildersRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.member, "bob");
    assert_eq!(r.builders.len(), 1, "{r:?}");
    let b = &r.builders[0];
    assert_eq!(
        (b.host_id.as_str(), b.store_uri.as_str()),
        ("build01", "ssh-ng://build01")
    );
    assert_eq!(
        String::from_utf8(base64_decode(&b.host_public_key_base64)).unwrap(),
        KEY.rsplit_once(' ').unwrap().0
    );
    for (who, code) in [
        (None, Code::Unauthenticated),
        (Some("ops"), Code::PermissionDenied),
        (Some("build01"), Code::PermissionDenied),
    ] {
        let e = server
            .lease(who)
            .await
            .list_builders(proto::ListBuildersRequest {})
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{who:?}: {e:?}");
    }
}

#[tokio::test]
async fn open_reads_open_the_read_only_calls_to_members() {
    let mut config = auth_config();
    config.auth.as_mut().unwrap().open_reads = true;
    let server = Server::start(config).await;
    let mut bob = server.admin(Some("bob")).await;
    bob.list_hosts(proto::ListHostsRequest {}).await.unwrap();
    bob.get_capacity(proto::GetCapacityRequest {})
        .await
        .unwrap();
    let e = bob
        .drain_host(proto::DrainHostRequest {
            host_id: "build01".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

/// One member cannot hold every slot: past its cap of live leases (the queue's default
/// member quota, the one per-member cap) it is postponed while another member is still
/// granted.
#[tokio::test]
async fn one_member_cannot_hold_every_slot() {
    let mut config = auth_config();
    config.queue.default_member_max_slots = Some(2);
    let server = Server::start(config).await;
    let _real = real_agent(&server).await;
    let mut alice = server.lease(Some("alice")).await;
    for i in 0..2 {
        granted(
            alice
                .acquire(acquire("alice", &format!("d{i}")))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let third = alice
        .acquire(acquire("alice", "d2"))
        .await
        .unwrap()
        .into_inner();
    match third.outcome {
        Some(Outcome::Postpone(p)) => assert!(p.reason.contains("limit"), "{}", p.reason),
        other => panic!("expected a postponement, got {other:?}"),
    }
    server.grant("bob", "bob", "b").await;
}

/// A stream `WaitForLease` for `drv`, as `who`, whose first event says it waits.
async fn queued(
    leases: &mut LeaseServiceClient<AuthChannel>,
    who: &str,
    drv: &str,
) -> Streaming<proto::WaitForLeaseResponse> {
    let mut stream = leases
        .wait_for_lease(wait(who, drv))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(
        matches!(
            first.event,
            Some(proto::wait_for_lease_response::Event::Waiting(_))
        ),
        "{first:?}"
    );
    stream
}

fn wait(client_id: &str, drv: &str) -> proto::WaitForLeaseRequest {
    proto::WaitForLeaseRequest {
        system: "x86_64-linux".into(),
        drv_path: format!("/nix/store/{drv}.drv"),
        client_id: client_id.into(),
        ..Default::default()
    }
}

/// One member cannot queue without bound: past `queue.max_waiting_per_member` waiting
/// requests (streams and postponed polls together) a new `WaitForLease` or `Acquire` is
/// `RESOURCE_EXHAUSTED`, naming the setting; a poll repeating a request that already waits
/// keeps its place; another member is not affected.
#[tokio::test]
async fn one_member_cannot_queue_without_bound() {
    let mut config = auth_config();
    config.queue.default_member_max_slots = Some(1);
    config.queue.max_waiting_per_member = 3;
    let server = Server::start(config).await;
    let _real = real_agent(&server).await;
    let mut alice = server.lease(Some("alice")).await;
    granted(
        alice
            .acquire(acquire("alice", "d0"))
            .await
            .unwrap()
            .into_inner(),
    );
    let postponed = |r: proto::AcquireResponse| match r.outcome {
        Some(Outcome::Postpone(p)) => p,
        other => panic!("expected a postponement, got {other:?}"),
    };
    postponed(
        alice
            .acquire(acquire("alice", "p1"))
            .await
            .unwrap()
            .into_inner(),
    );
    let _w1 = queued(&mut alice, "alice", "w1").await;
    let _w2 = queued(&mut alice, "alice", "w2").await;
    let e = alice.wait_for_lease(wait("alice", "w3")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("queue.max_waiting_per_member"), "{e}");
    let e = alice.acquire(acquire("alice", "p2")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("queue.max_waiting_per_member"), "{e}");
    // The poller asking again is the same waiting request, not a new one.
    postponed(
        alice
            .acquire(acquire("alice", "p1"))
            .await
            .unwrap()
            .into_inner(),
    );
    server.grant("bob", "bob", "b").await;
    let mut bob = server.lease(Some("bob")).await;
    let _b = bob.wait_for_lease(wait("bob", "b2")).await.unwrap();
}

/// A scheduler with one real agent where alice and bob each hold the one slot their quota
/// allows, so that their next requests wait; the agent stays registered while it lives.
async fn members_at_quota() -> (Server, Agent) {
    let mut config = auth_config();
    config.queue.default_member_max_slots = Some(1);
    let server = Server::start(config).await;
    let real = real_agent(&server).await;
    server.grant("alice", "alice", "a0").await;
    server.grant("bob", "bob", "b0").await;
    (server, real)
}

/// `ListWaiting` shows a member its own waiting requests only (never another member's
/// derivation paths), an operator everyone's, and a builder's credential nothing.
#[tokio::test]
async fn members_see_only_their_own_waiting_requests() {
    let (server, _real) = members_at_quota().await;
    let mut alice = server.lease(Some("alice")).await;
    let mut bob = server.lease(Some("bob")).await;
    let _a = queued(&mut alice, "alice", "a1").await;
    let _b = queued(&mut bob, "bob", "b1").await;
    let s = &server;
    let waiting = |who: &'static str| async move {
        s.admin(Some(who))
            .await
            .list_waiting(proto::ListWaitingRequest::default())
            .await
            .map(|r| r.into_inner().waiting)
    };
    let mine = waiting("alice").await.unwrap();
    assert_eq!(mine.len(), 1, "{mine:?}");
    let w = &mine[0];
    assert_eq!(
        (w.client_id.as_str(), w.drv_path.as_str(), w.system.as_str()),
        ("alice", "/nix/store/a1.drv", "x86_64-linux")
    );
    assert!(
        w.streaming && w.position >= 1 && w.pin_host_id.is_empty(),
        "{w:?}"
    );
    let theirs = waiting("bob").await.unwrap();
    assert_eq!(theirs.len(), 1, "{theirs:?}");
    assert_eq!(theirs[0].drv_path, "/nix/store/b1.drv");
    let all = waiting("ops").await.unwrap();
    let members: Vec<&str> = all.iter().map(|w| w.client_id.as_str()).collect();
    assert_eq!(members, ["alice", "bob"]);
    assert_eq!(
        waiting("build01").await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        server
            .admin(None)
            .await
            .list_waiting(proto::ListWaitingRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
}

/// `ListWaiting` answers in pages: following `next_page_token` lists every waiting request
/// once, in order; a member's pages hold its own requests only; a request that joins the
/// queue behind the cursor between two pages is listed; a bad page size or token is
/// `INVALID_ARGUMENT` naming the field.
#[tokio::test]
async fn waiting_requests_are_listed_in_pages() {
    let (server, _real) = members_at_quota().await;
    let mut alice = server.lease(Some("alice")).await;
    let mut bob = server.lease(Some("bob")).await;
    let mut streams = Vec::new();
    for drv in ["a3", "a1", "a2"] {
        streams.push(queued(&mut alice, "alice", drv).await);
    }
    for drv in ["b2", "b1"] {
        streams.push(queued(&mut bob, "bob", drv).await);
    }
    let names = |w: &[proto::WaitingRequest]| -> Vec<String> {
        w.iter()
            .map(|w| format!("{}:{}", w.client_id, w.drv_path))
            .collect()
    };
    let everyone = [
        "alice:/nix/store/a1.drv",
        "alice:/nix/store/a2.drv",
        "alice:/nix/store/a3.drv",
        "bob:/nix/store/b1.drv",
        "bob:/nix/store/b2.drv",
    ];
    let mut ops = server.admin(Some("ops")).await;
    for size in [1, 2, 4, 5, 0] {
        let all = client::list_waiting(&mut ops, size).await.unwrap();
        assert_eq!(names(&all), everyone, "pages of {size}");
    }
    // Page by page: full pages carry a token, the last page none.
    let page = |size, token: &str| proto::ListWaitingRequest {
        page_size: size,
        page_token: token.into(),
    };
    let first = ops.list_waiting(page(2, "")).await.unwrap().into_inner();
    assert_eq!(names(&first.waiting), everyone[..2]);
    assert!(!first.next_page_token.is_empty());
    // A request that joins behind the cursor before the next page is read is listed.
    streams.push(queued(&mut bob, "bob", "b0x").await);
    let mut rest = Vec::new();
    let mut token = first.next_page_token;
    while !token.is_empty() {
        let p = ops
            .list_waiting(page(2, &token))
            .await
            .unwrap()
            .into_inner();
        assert!(p.waiting.len() <= 2, "{:?}", p.waiting);
        rest.extend(p.waiting);
        token = p.next_page_token;
    }
    assert_eq!(
        names(&rest),
        [
            "alice:/nix/store/a3.drv",
            "bob:/nix/store/b0x.drv",
            "bob:/nix/store/b1.drv",
            "bob:/nix/store/b2.drv",
        ]
    );
    // A member's pages hold its own requests only, even with a token naming another's.
    let mut a = server.admin(Some("alice")).await;
    let mine = client::list_waiting(&mut a, 1).await.unwrap();
    assert_eq!(names(&mine), everyone[..3]);
    let to_bob = ops.list_waiting(page(4, "")).await.unwrap().into_inner();
    assert_eq!(to_bob.waiting[3].drv_path, "/nix/store/b0x.drv");
    let after_bob = a
        .list_waiting(page(3, &to_bob.next_page_token))
        .await
        .unwrap()
        .into_inner();
    assert!(after_bob.waiting.is_empty(), "{:?}", after_bob.waiting);
    assert!(after_bob.next_page_token.is_empty());
    // Bad pages name their field.
    for (request, field) in [
        (page(1001, ""), "page_size"),
        (page(0, "not a token"), "page_token"),
        (page(0, "YWxpY2U"), "page_token"),
    ] {
        let e = a.list_waiting(request).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{e:?}");
    }
}

/// A builder's credential lists the leases on its own host and no other (its agent asks
/// there who holds a lease its gate keeps, after a restart); it still reads no queue.
#[tokio::test]
async fn a_builder_lists_only_the_leases_on_its_own_host() {
    let mut config = auth_config();
    if let Some(auth) = config.auth.as_mut() {
        auth.hosts.push(HostEntry {
            id: "build02".into(),
            store_uri: "ssh-ng://build02".into(),
            public_key: KEY.into(),
            token_sha256: digest_of(&token("build02")).to_hex(),
        });
    }
    let server = Server::start(config).await;
    let _one = real_agent(&server).await;
    let _two = agent_of(&server, "build02").await;
    for (host, member) in [("build01", "bob"), ("build02", "alice")] {
        let answer = server
            .lease(Some(host))
            .await
            .acquire(AcquireRequest {
                pin_host: host.into(),
                ..acquire(member, &format!("{member}-on-{host}"))
            })
            .await;
        granted(answer.unwrap().into_inner());
    }
    for (host, member) in [("build01", "bob"), ("build02", "alice")] {
        let seen: Vec<(String, String)> = server
            .leases_of(host)
            .await
            .into_iter()
            .map(|l| (l.host_id, l.client_id))
            .collect();
        assert_eq!(seen, [(host.to_owned(), member.to_owned())], "{host}");
    }
    assert_eq!(server.leases_of("ops").await.len(), 2);
    let e = server
        .admin(Some("build01"))
        .await
        .list_waiting(proto::ListWaitingRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

/// Store URIs the hook could not use (`;`, a leading `-`, `?remote-program=`) are refused at
/// registration, even in the open mode.
#[tokio::test]
async fn unusable_store_uris_are_refused_at_registration() {
    let server = Server::start(Config::default()).await;
    for uri in [
        "ssh-ng://b;x",
        "ssh://-oProxyCommand=x",
        "ssh-ng://b?remote-program=/tmp/evil",
    ] {
        assert_eq!(
            registration_code(server.as_(None).await, register("b", uri, KEY, 4)).await,
            Code::InvalidArgument,
            "{uri}"
        );
    }
}

/// Without `[auth]` the scheduler will not serve on an address that is not loopback.
#[tokio::test]
async fn open_mode_is_refused_off_loopback() {
    // Bound, never served: `run` refuses before accepting anything.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let e = nixdispatch_scheduler::server::run(listener, Config::default(), std::future::pending())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("auth"), "{e}");
}

/// A message over `limits.max_message_bytes` is answered `RESOURCE_EXHAUSTED`, on a unary
/// call and on an agent stream (which ends with that status, not OK).
#[tokio::test]
async fn oversize_messages_are_resource_exhausted() {
    let server = Server::start(Config::default()).await;
    let mut big = acquire("c", "d");
    big.drv_path = format!("/nix/store/{}.drv", "x".repeat(128 * 1024));
    let e = server.lease(None).await.acquire(big).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    let mut r = register("b", "ssh-ng://b", KEY, 4);
    r.agent_version = "v".repeat(128 * 1024);
    assert_eq!(
        registration_code(server.as_(None).await, r).await,
        Code::ResourceExhausted
    );
    let mut agent = Agent::open(server.as_(None).await, register("b", "ssh-ng://b", KEY, 4))
        .await
        .unwrap();
    agent.next().await.unwrap();
    agent
        .tx
        .send(AgentMessage {
            message: Some(Message::Goodbye(proto::Goodbye {
                reason: "r".repeat(128 * 1024),
            })),
        })
        .await
        .unwrap();
    let e = agent.next().await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
}

/// A CA and a server certificate for `localhost`, written as PEM files into `dir`.
fn make_pki(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// With `[tls]` the scheduler speaks TLS only: a client pinning its CA gets in (and is
/// authenticated as before), one pinning another CA or speaking plaintext does not.
#[tokio::test]
async fn tls_with_a_pinned_ca() {
    let pki = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_pki(pki.path(), "ours");
    let (other_ca, _, _) = make_pki(pki.path(), "theirs");
    let mut config = auth_config();
    config.tls.certificate = Some(cert);
    config.tls.private_key = Some(key);
    let server = Server::start(config).await;
    let client_config = |ca: &PathBuf| {
        let mut c = ClientConfig::new(format!("https://127.0.0.1:{}", server.addr.port()));
        c.ca_file = Some(ca.clone());
        c.tls_domain = Some("localhost".into());
        c.credential_file = Some(server.token_file("ops"));
        c
    };
    let channel = client::connect(&client_config(&ca)).await.unwrap();
    AdminServiceClient::new(channel)
        .list_hosts(proto::ListHostsRequest {})
        .await
        .expect("an operator over TLS with the pinned CA");
    assert!(client::connect(&client_config(&other_ca)).await.is_err());
    let plain = server
        .admin(Some("ops"))
        .await
        .list_hosts(proto::ListHostsRequest {})
        .await;
    assert!(plain.is_err(), "plaintext must not be served: {plain:?}");
}

fn provision(id: &str, uri: &str, token_of: &str) -> proto::ProvisionHostRequest {
    proto::ProvisionHostRequest {
        host_id: id.into(),
        store_uri: uri.into(),
        host_public_key: KEY.into(),
        token_sha256: digest_of(&token(token_of)).to_hex(),
    }
}

/// Operators provision builders through the API (members may not); the entry survives a
/// restart through the state database; re-provisioning closes the connected agent's stream
/// and holds its next registration to the new entry.
#[tokio::test]
async fn operators_provision_builders_through_the_api() {
    let db = tempfile::tempdir().unwrap();
    let mut config = auth_config();
    config.state.database = Some(db.path().join("state.sqlite3"));
    let server = Server::start(config.clone()).await;
    let e = server
        .admin(Some("alice"))
        .await
        .provision_host(provision("stranger", "ssh-ng://b2", "stranger"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = server
        .admin(Some("ops"))
        .await
        .provision_host(provision("stranger", "ssh-ng://b2;x", "stranger"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = server
        .admin(Some("ops"))
        .await
        .provision_host(provision("build01", "ssh-ng://b2", "stranger"))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::FailedPrecondition,
        "configured hosts stay the configuration's"
    );
    server
        .admin(Some("ops"))
        .await
        .provision_host(provision("stranger", "ssh-ng://b2", "stranger"))
        .await
        .unwrap();
    drop(server);

    let server = Server::start(config).await;
    let mut agent = Agent::open(
        server.as_(Some("stranger")).await,
        register("stranger", "ssh-ng://b2", KEY, 2),
    )
    .await
    .unwrap();
    agent.next().await.expect("provisioned before the restart");
    server
        .admin(Some("ops"))
        .await
        .provision_host(provision("stranger", "ssh-ng://b3", "stranger"))
        .await
        .unwrap();
    let e = agent.next().await.unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert_eq!(
        registration_code(
            server.as_(Some("stranger")).await,
            register("stranger", "ssh-ng://b2", KEY, 2)
        )
        .await,
        Code::PermissionDenied
    );
    let r = server
        .admin(Some("ops"))
        .await
        .unprovision_host(proto::UnprovisionHostRequest {
            host_id: "stranger".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.removed);
    assert_eq!(
        registration_code(
            server.as_(Some("stranger")).await,
            register("stranger", "ssh-ng://b3", KEY, 2)
        )
        .await,
        Code::Unauthenticated
    );
}

/// The queue under credentials: a member waits as itself (another member's name is
/// denied), a builder's credential may wait for a member only pinned to its own host (the
/// gate), and a keep-alive re-attaching an unknown lease makes it the caller's, whatever
/// `client_id` the details name.
#[tokio::test]
async fn waiting_and_re_attaching_follow_the_credential() {
    let server = Server::start(auth_config()).await;
    let mut real = real_agent(&server).await;
    real.report().await.unwrap();
    let wait = |client: &str, pin: &str| proto::WaitForLeaseRequest {
        system: "x86_64-linux".into(),
        drv_path: "/nix/store/w.drv".into(),
        client_id: client.into(),
        pin_host_id: pin.into(),
        ..Default::default()
    };
    let mut alice = server.lease(Some("alice")).await;
    let e = alice.wait_for_lease(wait("bob", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut gate = server.lease(Some("build01")).await;
    let e = gate.wait_for_lease(wait("bob", "")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = gate
        .wait_for_lease(wait("bob", "another-host"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    gate.wait_for_lease(wait("bob", "build01")).await.unwrap();

    let foreign = "00112233445566778899aabbccddeeff".to_owned();
    alice
        .keep_alive(proto::KeepAliveRequest {
            lease_id: foreign.clone(),
            host_id: "build01".into(),
            client_id: "bob".into(),
            system: "x86_64-linux".into(),
            drv_path: "/nix/store/old.drv".into(),
        })
        .await
        .unwrap();
    let leases = server.leases_of("ops").await;
    let reattached = leases.iter().find(|l| l.lease_id == foreign).unwrap();
    assert_eq!(reattached.client_id, "alice");
}

/// A builder's credential acquires for a member only pinned to its own host (the gate's
/// `Acquire`, like its `WaitForLease`), and attaches there to the member's own hook lease
/// for the same derivation, which stays the member's to keep alive and release.
#[tokio::test]
async fn a_gate_acquires_for_members_only_on_its_own_host() {
    let server = Server::start(auth_config()).await;
    let mut real = real_agent(&server).await;
    real.report().await.unwrap();
    let pinned = |client: &str, drv: &str, pin: &str| AcquireRequest {
        pin_host: pin.into(),
        ..acquire(client, drv)
    };
    let mut gate = server.lease(Some("build01")).await;
    for (pin, what) in [("", "unpinned"), ("another-host", "pinned elsewhere")] {
        let e = gate.acquire(pinned("bob", "g", pin)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{what}");
    }
    let g = granted(
        gate.acquire(pinned("bob", "g", "build01"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(!g.attached);
    let mut alice = server.lease(Some("alice")).await;
    let hook = granted(
        alice
            .acquire(acquire("alice", "x"))
            .await
            .unwrap()
            .into_inner(),
    );
    let attached = granted(
        gate.acquire(pinned("alice", "x", "build01"))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(attached.attached);
    assert_eq!(attached.lease_id, hook.lease_id);
    let leases = server.leases_of("ops").await;
    assert_eq!(leases.len(), 2, "the attach took no slot: {leases:?}");
    let mine = leases.iter().find(|l| l.lease_id == hook.lease_id).unwrap();
    assert_eq!(mine.client_id, "alice");
}

/// A builder's credential keeps alive and releases its gate's leases on its own host (the
/// gate cannot run as a member), re-attaches an unknown one for the member its details name
/// only on its own host (a restart), and touches nothing on another host; operators hold
/// no leases.
#[tokio::test]
async fn a_builder_keeps_and_ends_leases_only_on_its_own_host() {
    let server = Server::start(auth_config()).await;
    let mut real = real_agent(&server).await;
    real.report().await.unwrap();
    let mut gate = server.lease(Some("build01")).await;
    let g = granted(
        gate.acquire(AcquireRequest {
            pin_host: "build01".into(),
            ..acquire("bob", "kept")
        })
        .await
        .unwrap()
        .into_inner(),
    );
    let keep = |id: &str, host: &str| proto::KeepAliveRequest {
        lease_id: id.into(),
        host_id: host.into(),
        client_id: "carol".into(),
        system: "x86_64-linux".into(),
        drv_path: "/nix/store/old.drv".into(),
    };
    gate.keep_alive(proto::KeepAliveRequest {
        lease_id: g.lease_id.clone(),
        ..Default::default()
    })
    .await
    .expect("the builder keeps its gate's lease alive");
    let e = server
        .lease(Some("ops"))
        .await
        .keep_alive(keep(&g.lease_id, ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "operators hold no leases");

    let lost = "00112233445566778899aabbccddeeff";
    let e = gate.keep_alive(keep(lost, "build02")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "another host's lease");
    gate.keep_alive(keep(lost, "build01"))
        .await
        .expect("re-attached on its own host");
    let leases = server.leases_of("ops").await;
    let back = leases.iter().find(|l| l.lease_id == lost).unwrap();
    assert_eq!(
        (back.client_id.as_str(), back.host_id.as_str()),
        ("carol", "build01")
    );

    for id in [&g.lease_id, &lost.to_owned()] {
        let r = gate
            .release(proto::ReleaseRequest {
                lease_id: id.clone(),
                outcome: proto::BuildOutcome::Succeeded as i32,
                duration_millis: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.already_released);
    }
    assert!(server.leases_of("ops").await.is_empty());
}
