//! The scheduler over real gRPC on 127.0.0.1:0: agents, leases, admin, health, reflection
//! and bad input, each through the generated clients a real agent, hook or operator uses.

use std::time::Duration;

use nixdispatch::proto::{
    self, AcquireRequest, AgentMessage, Register, Report, SchedulerMessage,
    acquire_response::Outcome, admin_service_client::AdminServiceClient, agent_message::Message,
    agent_service_client::AgentServiceClient, lease_service_client::LeaseServiceClient,
};
use nixdispatch_scheduler::config::Config;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

/// A real ed25519 host key line.
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHdzrOYYsx97jgJC4raQrLvbWQfJI3Wj8wIeg0F7/qlv root@b";

/// A scheduler served in-process on a listener bound to 127.0.0.1:0; stopped on drop.
struct Server {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<Result<(), nixdispatch_scheduler::Error>>>,
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
        Server {
            addr,
            stop: Some(stop),
            done: Some(done),
        }
    }

    async fn channel(&self) -> Channel {
        // The listener is bound before `run` starts, so connecting cannot race the server.
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Stops the server and waits for `run` to return.
    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done.take().unwrap().await.unwrap().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn fast_config() -> Config {
    let mut c = Config::default();
    c.agents.report_interval_millis = 200;
    c.agents.grace_millis = 200;
    c
}

fn register(id: &str, systems: &[&str], slots: u32) -> Register {
    Register {
        host_id: id.into(),
        store_uri: format!("ssh-ng://{id}"),
        host_public_key: KEY.into(),
        systems: systems.iter().map(|s| s.to_string()).collect(),
        supported_features: vec!["kvm".into()],
        mandatory_features: vec![],
        max_jobs: slots,
        speed_factor: 1.0,
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
    async fn connect(channel: Channel, first: AgentMessage) -> Self {
        let (tx, out) = mpsc::channel(8);
        tx.send(first).await.unwrap();
        let rx = AgentServiceClient::new(channel)
            .session(ReceiverStream::new(out))
            .await
            .unwrap()
            .into_inner();
        Agent { tx, rx }
    }

    async fn register(channel: Channel, r: Register) -> Self {
        Self::register_told(channel, r).await.0
    }

    /// Registers and returns the scheduler's first directive too (its drain state).
    async fn register_told(channel: Channel, r: Register) -> (Self, SchedulerMessage) {
        let mut a = Self::connect(
            channel,
            AgentMessage {
                message: Some(Message::Register(r)),
            },
        )
        .await;
        let first = a.next().await.unwrap();
        assert!(first.next_report_within_millis > 0);
        (a, first)
    }

    async fn send(&self, m: Message) {
        self.tx
            .send(AgentMessage { message: Some(m) })
            .await
            .unwrap();
    }

    async fn report(&mut self, r: Report) -> SchedulerMessage {
        self.send(Message::Report(r)).await;
        self.next().await.unwrap()
    }

    async fn next(&mut self) -> Result<SchedulerMessage, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(10), self.rx.message())
            .await
            .expect("the scheduler answers within 10 s")
            .and_then(|m| m.ok_or_else(|| tonic::Status::cancelled("stream ended")))
    }
}

fn acquire(system: &str, client: &str, drv: &str, local: bool) -> AcquireRequest {
    AcquireRequest {
        system: system.into(),
        required_features: vec![],
        drv_path: format!("/nix/store/{drv}.drv"),
        client_id: client.into(),
        can_build_locally: local,
        exclude_hosts: vec![],
        pin_host: String::new(),
    }
}

async fn host(admin: &mut AdminServiceClient<Channel>, id: &str) -> proto::HostStatus {
    admin
        .list_hosts(proto::ListHostsRequest {})
        .await
        .unwrap()
        .into_inner()
        .hosts
        .into_iter()
        .find(|h| h.host_id == id)
        .unwrap_or_else(|| panic!("host {id} not listed"))
}

/// Polls `check` every 20 ms until it holds, for at most 10 s (never a fixed sleep).
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// An agent registers and reports; ListHosts shows what it reported.
#[tokio::test]
async fn register_and_report_show_in_list_hosts() {
    let server = Server::start(Config::default()).await;
    let ch = server.channel().await;
    let mut agent = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], 4)).await;
    let answer = agent
        .report(Report {
            running_builds: Some(1),
            load: Some(proto::LoadAverage {
                load1: 1.5,
                load5: 1.0,
                load15: 0.5,
            }),
            pressure: Some(proto::Pressure {
                cpu_some_avg10: Some(3.0),
                ..Default::default()
            }),
            available_memory_bytes: Some(8 << 30),
            store: Some(proto::DiskSpace {
                free_bytes: 100 << 30,
                total_bytes: 200 << 30,
            }),
            build_dir: None,
        })
        .await;
    assert_eq!(answer.next_report_within_millis, 10_000);
    let mut admin = AdminServiceClient::new(ch);
    let h = host(&mut admin, "b1").await;
    assert_eq!(h.state(), proto::HostState::Ready);
    assert_eq!(
        (h.slots_total, h.slots_used, h.running_builds),
        (4, 1, Some(1))
    );
    assert_eq!(h.load.unwrap().load1, 1.5);
    assert_eq!(h.pressure.unwrap().cpu_some_avg10, Some(3.0));
    assert_eq!(h.pressure.unwrap().io_full_avg10, None);
    assert_eq!(h.store.unwrap().free_bytes, 100 << 30);
    assert_eq!(h.build_dir, None);
    assert_eq!(h.cpu_count, 8);
    server.shutdown().await;
}

/// Acquire, keep alive and release over gRPC; release is idempotent; unknown ids NotFound.
#[tokio::test]
async fn acquire_keep_alive_release() {
    let server = Server::start(Config::default()).await;
    let ch = server.channel().await;
    let _agent = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], 1)).await;
    let mut leases = LeaseServiceClient::new(ch.clone());
    let granted = match leases
        .acquire(acquire("x86_64-linux", "alice", "a", false))
        .await
        .unwrap()
        .into_inner()
        .outcome
    {
        Some(Outcome::Granted(g)) => g,
        other => panic!("{other:?}"),
    };
    assert_eq!(granted.host_id, "b1");
    assert_eq!(granted.store_uri, "ssh-ng://b1");
    assert_eq!(
        (granted.slots_used, granted.slots_total, granted.max_jobs),
        (1, 1, 1)
    );
    assert!(!granted.host_public_key_base64.is_empty());
    // The only slot is taken: a client that cannot build locally waits, one that can declines.
    match leases
        .acquire(acquire("x86_64-linux", "bob", "b", false))
        .await
        .unwrap()
        .into_inner()
        .outcome
    {
        Some(Outcome::Postpone(p)) => assert_eq!(p.queue_position, 1),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        leases
            .acquire(acquire("x86_64-linux", "bob", "c", true))
            .await
            .unwrap()
            .into_inner()
            .outcome,
        Some(Outcome::Decline(_))
    ));
    let ka = leases
        .keep_alive(proto::KeepAliveRequest {
            lease_id: granted.lease_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ka.into_inner().lease_ttl_millis, 60_000);
    let mut admin = AdminServiceClient::new(ch.clone());
    let listed = admin
        .list_leases(proto::ListLeasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].client_id.as_str(), listed[0].host_id.as_str()),
        ("alice", "b1")
    );
    let cap = admin
        .get_capacity(proto::GetCapacityRequest {})
        .await
        .unwrap()
        .into_inner()
        .systems;
    assert_eq!(
        (cap[0].slots_free, cap[0].leases, cap[0].waiting),
        (0, 1, 1)
    );

    let release = |id: &str| proto::ReleaseRequest {
        lease_id: id.into(),
        outcome: proto::BuildOutcome::Succeeded as i32,
        duration_millis: 1234,
    };
    assert!(
        !leases
            .release(release(&granted.lease_id))
            .await
            .unwrap()
            .into_inner()
            .already_released
    );
    assert!(
        leases
            .release(release(&granted.lease_id))
            .await
            .unwrap()
            .into_inner()
            .already_released
    );
    let err = leases.release(release("no-such-lease")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("no-such-lease"), "{}", err.message());
    let err = leases
        .keep_alive(proto::KeepAliveRequest {
            lease_id: granted.lease_id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        admin
            .list_leases(proto::ListLeasesRequest {})
            .await
            .unwrap()
            .into_inner()
            .leases
            .is_empty()
    );
    server.shutdown().await;
}

/// A lease that is not kept alive expires and its slot is granted again.
#[tokio::test]
async fn unkept_lease_expires() {
    let mut config = Config::default();
    config.leases.ttl_millis = 300;
    let server = Server::start(config).await;
    let ch = server.channel().await;
    let _agent = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], 1)).await;
    let mut leases = LeaseServiceClient::new(ch.clone());
    let first = leases
        .acquire(acquire("x86_64-linux", "a", "one", false))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(first.outcome, Some(Outcome::Granted(_))));
    eventually(
        "the unkept lease to expire and its slot to be granted again",
        || {
            let mut leases = leases.clone();
            async move {
                matches!(
                    leases
                        .acquire(acquire("x86_64-linux", "b", "two", false))
                        .await
                        .unwrap()
                        .into_inner()
                        .outcome,
                    Some(Outcome::Granted(_))
                )
            }
        },
    )
    .await;
    server.shutdown().await;
}

/// Drain stops new leases at once, is pushed to the agent, and undrain reopens the host.
#[tokio::test]
async fn drain_is_pushed_and_undrain_reopens() {
    let server = Server::start(Config::default()).await;
    let ch = server.channel().await;
    let mut agent = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], 2)).await;
    let mut admin = AdminServiceClient::new(ch.clone());
    let mut leases = LeaseServiceClient::new(ch.clone());
    let status = admin
        .drain_host(proto::DrainHostRequest {
            host_id: "b1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.draining);
    assert_eq!(status.unavailable_reason, "draining");
    assert!(
        agent.next().await.unwrap().draining,
        "the agent is told it is drained"
    );
    match leases
        .acquire(acquire("x86_64-linux", "a", "x", false))
        .await
        .unwrap()
        .into_inner()
        .outcome
    {
        Some(Outcome::Postpone(p)) => assert!(p.reason.contains("draining"), "{}", p.reason),
        other => panic!("{other:?}"),
    }
    admin
        .undrain_host(proto::UndrainHostRequest {
            host_id: "b1".into(),
        })
        .await
        .unwrap();
    assert!(!agent.next().await.unwrap().draining);
    assert!(matches!(
        leases
            .acquire(acquire("x86_64-linux", "a", "x", false))
            .await
            .unwrap()
            .into_inner()
            .outcome,
        Some(Outcome::Granted(_))
    ));
    let err = admin
        .drain_host(proto::DrainHostRequest { host_id: "".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("host_id"));
    server.shutdown().await;
}

/// A configuration whose operator state lives in `path`.
fn persistent_config(path: &std::path::Path) -> Config {
    let mut c = Config::default();
    c.state.database = Some(path.to_owned());
    c
}

/// A server on the state database `db`, and a channel to it.
async fn start_on(db: &std::path::Path) -> (Server, Channel) {
    let server = Server::start(persistent_config(db)).await;
    let channel = server.channel().await;
    (server, channel)
}

/// Registers a two-slot x86_64-linux host `id`; returns its stream and whether the
/// scheduler's first directive said it is drained.
async fn register_linux(ch: &Channel, id: &str) -> (Agent, bool) {
    let (agent, first) = Agent::register_told(ch.clone(), register(id, &["x86_64-linux"], 2)).await;
    (agent, first.draining)
}

async fn drain(admin: &mut AdminServiceClient<Channel>, id: &str) -> proto::HostStatus {
    admin
        .drain_host(proto::DrainHostRequest { host_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn undrain(admin: &mut AdminServiceClient<Channel>, id: &str) -> proto::HostStatus {
    admin
        .undrain_host(proto::UndrainHostRequest { host_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// The outcome of one acquire for x86_64-linux by a client that can build locally.
async fn outcome(ch: &Channel) -> Outcome {
    LeaseServiceClient::new(ch.clone())
        .acquire(acquire("x86_64-linux", "a", "x", true))
        .await
        .unwrap()
        .into_inner()
        .outcome
        .unwrap()
}

/// A drain outlives the scheduler: drained, the server stopped, a new one started on the
/// same database, the reconnecting agent is told at once it is drained and gets no lease;
/// an undrain outlives a restart the same way.
#[tokio::test]
async fn drain_survives_a_scheduler_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.sqlite3");

    let (server, ch) = start_on(&db).await;
    let (mut agent, drained) = register_linux(&ch, "b1").await;
    assert!(!drained);
    assert!(
        drain(&mut AdminServiceClient::new(ch.clone()), "b1")
            .await
            .draining
    );
    assert!(agent.next().await.unwrap().draining);
    server.shutdown().await;

    let (server, ch) = start_on(&db).await;
    let (_agent, drained) = register_linux(&ch, "b1").await;
    assert!(drained, "the reconnecting agent is told it is drained");
    let mut admin = AdminServiceClient::new(ch.clone());
    assert!(host(&mut admin, "b1").await.draining);
    match outcome(&ch).await {
        Outcome::Decline(d) => assert!(d.reason.contains("draining"), "{}", d.reason),
        other => panic!("{other:?}"),
    }
    assert!(!undrain(&mut admin, "b1").await.draining);
    server.shutdown().await;

    let (server, ch) = start_on(&db).await;
    let (_agent, drained) = register_linux(&ch, "b1").await;
    assert!(!drained, "the undrain held too");
    assert!(matches!(outcome(&ch).await, Outcome::Granted(_)));
    server.shutdown().await;
}

/// A host id that never connected can be drained: the answer says it is not registered,
/// ListHosts does not list it, and when its agent connects (here after a restart as well)
/// it is drained and told so; undrained before connecting, it connects open.
#[tokio::test]
async fn drain_of_a_host_that_never_connected_applies_when_it_connects() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.sqlite3");

    let (server, ch) = start_on(&db).await;
    let mut admin = AdminServiceClient::new(ch.clone());
    let status = drain(&mut admin, "b9").await;
    assert_eq!(
        (status.host_id.as_str(), status.state(), status.draining),
        ("b9", proto::HostState::NotRegistered, true)
    );
    assert_eq!(
        undrain(&mut admin, "b8").await.state(),
        proto::HostState::NotRegistered
    );
    let listed = admin
        .list_hosts(proto::ListHostsRequest {})
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert!(listed.is_empty(), "{listed:?}");
    let (_b9, drained) = register_linux(&ch, "b9").await;
    assert!(drained, "the agent is told at registration");
    assert!(host(&mut admin, "b9").await.draining);
    assert!(matches!(outcome(&ch).await, Outcome::Decline(_)));
    server.shutdown().await;

    // Drained before it ever connected and before a restart.
    let (server, ch) = start_on(&db).await;
    let mut admin = AdminServiceClient::new(ch.clone());
    assert!(drain(&mut admin, "b7").await.draining);
    server.shutdown().await;
    let (server, ch) = start_on(&db).await;
    let (_b7, drained) = register_linux(&ch, "b7").await;
    assert!(drained);
    let (_b8, drained) = register_linux(&ch, "b8").await;
    assert!(!drained);
    assert!(matches!(outcome(&ch).await, Outcome::Granted(g) if g.host_id == "b8"));
    server.shutdown().await;
}

/// A database the scheduler cannot use stops the start with an error naming the file, and
/// the file is left as it was.
#[tokio::test]
async fn unusable_database_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.sqlite3");
    std::fs::write(&db, b"not a database, and it must stay that way").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = nixdispatch_scheduler::server::run(listener, persistent_config(&db), async {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            nixdispatch_scheduler::Error::Store {
                problem: nixdispatch_scheduler::StoreProblem::Corrupt,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(&db.display().to_string()), "{err}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        b"not a database, and it must stay that way"
    );
}

/// ExplainPlacement gives every host with its reason and the host that would be chosen.
#[tokio::test]
async fn explain_placement_names_every_host() {
    let server = Server::start(Config::default()).await;
    let ch = server.channel().await;
    let _a = Agent::register(ch.clone(), register("linux", &["x86_64-linux"], 6)).await;
    let _b = Agent::register(
        ch.clone(),
        register("mac", &["aarch64-darwin", "x86_64-darwin"], 2),
    )
    .await;
    let mut admin = AdminServiceClient::new(ch);
    let e = admin
        .explain_placement(proto::ExplainPlacementRequest {
            system: "x86_64-darwin".into(),
            required_features: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.chosen_host_id, "mac");
    assert_eq!(e.outcome, "granted");
    assert_eq!(e.hosts.len(), 2);
    assert!(!e.hosts[0].eligible && e.hosts[0].reason.contains("does not build x86_64-darwin"));
    assert!(e.hosts[1].eligible && e.hosts[1].score == 0.5);
    let e = admin
        .explain_placement(proto::ExplainPlacementRequest {
            system: "x86_64-linux".into(),
            required_features: vec!["cuda".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (e.chosen_host_id.as_str(), e.outcome.as_str()),
        ("", "decline-permanently")
    );
    assert!(e.hosts[0].reason.contains("lacks features cuda"));
    server.shutdown().await;
}

/// A host whose agent disconnects gets no new leases; reconnecting restores it with its
/// leases; a host that stays connected but silent goes stale; an older stream is replaced.
#[tokio::test]
async fn liveness_disconnect_reconnect_stale_and_replace() {
    let server = Server::start(fast_config()).await;
    let ch = server.channel().await;
    let mut admin = AdminServiceClient::new(ch.clone());
    let mut leases = LeaseServiceClient::new(ch.clone());
    let agent = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], 2)).await;
    assert!(matches!(
        leases
            .acquire(acquire("x86_64-linux", "a", "x", false))
            .await
            .unwrap()
            .into_inner()
            .outcome,
        Some(Outcome::Granted(_))
    ));
    drop(agent);
    eventually("the host to show as disconnected", || {
        let mut admin = admin.clone();
        async move { host(&mut admin, "b1").await.state() == proto::HostState::Disconnected }
    })
    .await;
    assert!(matches!(
        leases
            .acquire(acquire("x86_64-linux", "a", "y", false))
            .await
            .unwrap()
            .into_inner()
            .outcome,
        Some(Outcome::Postpone(_))
    ));
    let mut again = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], 2)).await;
    let h = host(&mut admin, "b1").await;
    assert_eq!((h.state(), h.leases), (proto::HostState::Ready, 1));

    // A second stream for the same host replaces the first, which is told so.
    let _newer = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], 2)).await;
    let err = again.next().await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert_eq!(
        host(&mut admin, "b1").await.state(),
        proto::HostState::Ready
    );

    // Silent past its deadline plus the grace: stale, and no leases.
    eventually("the silent host to go stale", || {
        let mut admin = admin.clone();
        async move { host(&mut admin, "b1").await.state() == proto::HostState::Stale }
    })
    .await;
    assert!(
        host(&mut admin, "b1")
            .await
            .unavailable_reason
            .contains("late")
    );
    server.shutdown().await;
}

/// A goodbye closes the host to new leases at once.
#[tokio::test]
async fn goodbye_marks_host_gone() {
    let server = Server::start(Config::default()).await;
    let ch = server.channel().await;
    let agent = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], 2)).await;
    agent
        .send(Message::Goodbye(proto::Goodbye {
            reason: "shutdown".into(),
        }))
        .await;
    let admin = AdminServiceClient::new(ch.clone());
    eventually("the host to be gone", || {
        let mut admin = admin.clone();
        async move { host(&mut admin, "b1").await.state() == proto::HostState::Gone }
    })
    .await;
    server.shutdown().await;
}

/// A misbehaving agent stream is closed with a status naming the problem, and another
/// agent on the same server is not disturbed.
#[tokio::test]
async fn misbehaving_agents_are_refused_without_disturbing_others() {
    let server = Server::start(Config::default()).await;
    let ch = server.channel().await;
    let mut good = Agent::register(ch.clone(), register("good", &["x86_64-linux"], 2)).await;

    let mut a = Agent::connect(
        ch.clone(),
        AgentMessage {
            message: Some(Message::Report(Report::default())),
        },
    )
    .await;
    let err = a.next().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("first message must be `register`"),
        "{}",
        err.message()
    );

    let mut bad = register("bad", &["x86_64-linux"], 2);
    bad.max_jobs = 0;
    let mut a = Agent::connect(
        ch.clone(),
        AgentMessage {
            message: Some(Message::Register(bad)),
        },
    )
    .await;
    let err = a.next().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("register.max_jobs"),
        "{}",
        err.message()
    );

    let mut a = Agent::register(ch.clone(), register("liar", &["x86_64-linux"], 2)).await;
    a.send(Message::Report(Report {
        store: Some(proto::DiskSpace {
            free_bytes: 10,
            total_bytes: 1,
        }),
        ..Default::default()
    }))
    .await;
    let err = a.next().await.unwrap_err();
    assert!(
        err.message().contains("report.store.free_bytes"),
        "{}",
        err.message()
    );

    let mut a = Agent::register(ch.clone(), register("twice", &["x86_64-linux"], 2)).await;
    a.send(Message::Register(register("twice", &["x86_64-linux"], 2)))
        .await;
    assert_eq!(a.next().await.unwrap_err().code(), Code::InvalidArgument);

    let mut a = Agent::connect(ch.clone(), AgentMessage { message: None }).await;
    assert_eq!(a.next().await.unwrap_err().code(), Code::InvalidArgument);

    // Oversized messages are refused by the transport before they reach a handler.
    let mut huge = register("huge", &["x86_64-linux"], 2);
    huge.agent_version = "x".repeat(200_000);
    let mut a = Agent::connect(
        ch.clone(),
        AgentMessage {
            message: Some(Message::Register(huge)),
        },
    )
    .await;
    assert!(a.next().await.is_err());
    let mut leases = LeaseServiceClient::new(ch.clone());
    let mut big = acquire("x86_64-linux", "c", "x", false);
    big.drv_path = format!("/{}.drv", "a".repeat(100_000));
    let err = leases.acquire(big).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::Internal
        ),
        "{err:?}"
    );

    // The good agent is still served, and the server still answers.
    good.report(Report::default()).await;
    let mut admin = AdminServiceClient::new(ch);
    assert_eq!(
        host(&mut admin, "good").await.state(),
        proto::HostState::Ready
    );
    server.shutdown().await;
}

/// An agent that sends reports but never reads the answers does not stall its own session
/// (the scheduler never waits on it): its latest report is still taken into account.
#[tokio::test]
async fn agent_that_never_reads_answers_is_still_heard() {
    let server = Server::start(Config::default()).await;
    let ch = server.channel().await;
    // Its own connection with tiny HTTP/2 windows, so that unread answers push back on the
    // scheduler after a few dozen messages instead of after megabytes.
    let deaf = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .initial_connection_window_size(Some(1024))
        .connect()
        .await
        .unwrap();
    let agent = Agent::register(deaf, register("deaf", &["x86_64-linux"], 8)).await;
    // Far more answers than the outbox and the flow-control windows hold.
    for _ in 0..2_000 {
        agent.send(Message::Report(Report::default())).await;
    }
    agent
        .send(Message::Report(Report {
            running_builds: Some(7),
            ..Default::default()
        }))
        .await;
    let admin = AdminServiceClient::new(ch);
    eventually("the last report to be applied", || {
        let mut admin = admin.clone();
        async move { host(&mut admin, "deaf").await.running_builds == Some(7) }
    })
    .await;
    drop(agent);
    server.shutdown().await;
}

/// Every Acquire field is validated at the boundary with InvalidArgument naming the field.
#[tokio::test]
async fn bad_lease_requests_name_the_field() {
    let server = Server::start(Config::default()).await;
    let mut leases = LeaseServiceClient::new(server.channel().await);
    let cases: Vec<(&str, AcquireRequest)> = vec![
        ("system", acquire("", "c", "x", false)),
        (
            "required_features",
            AcquireRequest {
                required_features: vec!["f".into(); 100],
                ..acquire("x86_64-linux", "c", "x", false)
            },
        ),
        (
            "drv_path",
            AcquireRequest {
                drv_path: "relative.drv".into(),
                ..acquire("x86_64-linux", "c", "x", false)
            },
        ),
        ("client_id", acquire("x86_64-linux", "", "x", false)),
        (
            "exclude_hosts[0]",
            AcquireRequest {
                exclude_hosts: vec!["a b".into()],
                ..acquire("x86_64-linux", "c", "x", false)
            },
        ),
        (
            "pin_host",
            AcquireRequest {
                pin_host: "a b".into(),
                ..acquire("x86_64-linux", "c", "x", false)
            },
        ),
    ];
    for (field, req) in cases {
        let err = leases.acquire(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("invalid {field}")),
            "{field}: {}",
            err.message()
        );
    }
    let err = leases
        .release(proto::ReleaseRequest {
            lease_id: "x".into(),
            outcome: 0,
            duration_millis: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("outcome"));
    server.shutdown().await;
}

/// Health is SERVING while up; on shutdown it turns NOT_SERVING first, agent streams are
/// closed with UNAVAILABLE, and `run` returns.
#[tokio::test]
async fn health_serving_and_shutdown_closes_agent_streams() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let server = Server::start(Config::default()).await;
    let ch = server.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for service in [
        "",
        "nixdispatch.v1.LeaseService",
        "nixdispatch.v1.AgentService",
        "nixdispatch.v1.AdminService",
    ] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }
    // Watchers see NOT_SERVING before the server goes away, for the whole server ("") and
    // for each service.
    let mut watches = Vec::new();
    for service in ["", "nixdispatch.v1.LeaseService"] {
        let mut w = health
            .watch(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = w.message().await.unwrap().unwrap().status;
        assert_eq!(first, ServingStatus::Serving as i32, "{service}");
        watches.push((service, w));
    }
    let mut agent = Agent::register(ch, register("b1", &["x86_64-linux"], 2)).await;
    let stop = tokio::spawn(server.shutdown());
    for (service, mut w) in watches {
        let next = tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .expect("a health update within 10 s")
            .unwrap()
            .unwrap()
            .status;
        assert_eq!(next, ServingStatus::NotServing as i32, "{service}");
    }
    let err = agent.next().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    tokio::time::timeout(Duration::from_secs(15), stop)
        .await
        .unwrap()
        .unwrap();
}

/// Reflection v1 lists every service (checked with the generated reflection client).
#[tokio::test]
async fn reflection_v1_lists_every_service() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = Server::start(Config::default()).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::once(req))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "nixdispatch.v1.AgentService",
        "nixdispatch.v1.LeaseService",
        "nixdispatch.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    server.shutdown().await;
}

/// Reads from `s` until the peer closes it (EOF or reset), within a generous bound.
async fn closed_by_peer(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let bound = Duration::from_secs(20);
    loop {
        match tokio::time::timeout(bound, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A peer that opens a connection and says nothing is dropped after the handshake timeout,
/// and past the connection cap a new connection is closed at once; once the silent ones are
/// gone a real client is served again.
#[tokio::test]
async fn silent_connections_and_the_cap_are_bounded() {
    let mut config = Config::default();
    config.limits.max_connections = 2;
    config.limits.handshake_timeout_millis = 300;
    let server = Server::start(config).await;
    let mut a = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut b = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Both silent connections hold the two slots; a third is closed at once (it would be
    // closed by the handshake timeout too, so check the counter-evidence: it closes before
    // the first two, which are older).
    let mut c = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    assert!(closed_by_peer(&mut c).await, "over the cap: closed");
    assert!(closed_by_peer(&mut a).await, "silent: dropped");
    assert!(closed_by_peer(&mut b).await, "silent: dropped");
    let mut admin = AdminServiceClient::new(server.channel().await);
    admin
        .list_hosts(proto::ListHostsRequest {})
        .await
        .expect("served once the silent peers are gone");
    server.shutdown().await;
}

/// A client that speaks gRPC is not dropped by the handshake timeout, however long it then
/// stays idle: the timeout bounds only the silence before the first bytes.
#[tokio::test]
async fn an_idle_client_that_spoke_is_kept() {
    let mut config = Config::default();
    config.limits.handshake_timeout_millis = 100;
    let server = Server::start(config).await;
    let mut admin = AdminServiceClient::new(server.channel().await);
    admin.list_hosts(proto::ListHostsRequest {}).await.unwrap();
    // Several handshake timeouts of idleness, measured by the server's own clock (paused
    // time cannot drive a real socket), then a second call on the same connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    admin
        .list_hosts(proto::ListHostsRequest {})
        .await
        .expect("the same connection still serves");
    server.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// WaitForLease: the waiting stream.
// ---------------------------------------------------------------------------------------

use proto::wait_for_lease_response::Event;

/// A scheduler on `config` and builder `b1` with `slots` x86_64-linux slots, registered and
/// reported (right after a start, slots go to waiters only from a host's first report).
async fn reported_builder(config: Config, slots: u32) -> (Server, Channel, Agent) {
    let server = Server::start(config).await;
    let ch = server.channel().await;
    let mut agent = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], slots)).await;
    agent.report(Report::default()).await;
    (server, ch, agent)
}

/// The default configuration without the restart hold (`[queue] restart_hold_millis`), so
/// that freed slots go to waiters from the first second on.
fn queue_config() -> Config {
    let mut c = Config::default();
    c.queue.restart_hold_millis = Some(0);
    c
}

fn wait_request(system: &str, client: &str, drv: &str) -> proto::WaitForLeaseRequest {
    proto::WaitForLeaseRequest {
        system: system.into(),
        drv_path: format!("/nix/store/{drv}.drv"),
        client_id: client.into(),
        ..Default::default()
    }
}

/// Opens a waiting stream.
async fn wait_for(
    leases: &mut LeaseServiceClient<Channel>,
    r: proto::WaitForLeaseRequest,
) -> Streaming<proto::WaitForLeaseResponse> {
    leases.wait_for_lease(r).await.unwrap().into_inner()
}

/// The next event of a waiting stream (bounded, so a broken test fails instead of hanging).
async fn event(s: &mut Streaming<proto::WaitForLeaseResponse>) -> Option<Event> {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("the scheduler answers within 10 s")
        .unwrap()
        .and_then(|m| m.event)
}

/// Reads a waiting stream up to its grant (skipping progress) and checks that it ends there;
/// at most 10 s in all.
async fn grant_of(s: &mut Streaming<proto::WaitForLeaseResponse>) -> proto::Granted {
    tokio::time::timeout(Duration::from_secs(10), grant_of_unbounded(s))
        .await
        .expect("the grant arrives within 10 s")
}

async fn grant_of_unbounded(s: &mut Streaming<proto::WaitForLeaseResponse>) -> proto::Granted {
    loop {
        match event(s).await {
            Some(Event::Waiting(_)) => continue,
            Some(Event::Granted(g)) => {
                assert!(event(s).await.is_none(), "the stream ends after the grant");
                return g;
            }
            other => panic!("expected a grant, got {other:?}"),
        }
    }
}

async fn acquire_granted(
    leases: &mut LeaseServiceClient<Channel>,
    client: &str,
    drv: &str,
) -> proto::Granted {
    match leases
        .acquire(acquire("x86_64-linux", client, drv, false))
        .await
        .unwrap()
        .into_inner()
        .outcome
    {
        Some(Outcome::Granted(g)) => g,
        other => panic!("{other:?}"),
    }
}

async fn release_ok(leases: &mut LeaseServiceClient<Channel>, lease: &str) {
    leases
        .release(proto::ReleaseRequest {
            lease_id: lease.into(),
            outcome: proto::BuildOutcome::Succeeded as i32,
            duration_millis: 1,
        })
        .await
        .unwrap();
}

async fn lease_holders(admin: &mut AdminServiceClient<Channel>) -> Vec<String> {
    let mut v: Vec<String> = admin
        .list_leases(proto::ListLeasesRequest {})
        .await
        .unwrap()
        .into_inner()
        .leases
        .into_iter()
        .map(|l| l.client_id)
        .collect();
    v.sort();
    v
}

async fn waiting(admin: &mut AdminServiceClient<Channel>) -> u32 {
    admin
        .get_capacity(proto::GetCapacityRequest {})
        .await
        .unwrap()
        .into_inner()
        .systems
        .iter()
        .map(|s| s.waiting)
        .sum()
}

/// A waiter hears its position, then gets the slot in the call that releases it: the
/// grant is on its stream when the release returns, and the stream ends after it.
#[tokio::test]
async fn a_waiter_gets_the_slot_the_moment_a_lease_is_released() {
    let (server, ch, _agent) = reported_builder(queue_config(), 1).await;
    let mut leases = LeaseServiceClient::new(ch.clone());
    let held = acquire_granted(&mut leases, "alice", "a").await;
    let mut stream = wait_for(&mut leases, wait_request("x86_64-linux", "bob", "b")).await;
    match event(&mut stream).await {
        Some(Event::Waiting(w)) => {
            assert_eq!(w.queue_position, 1);
            assert!(w.reason.contains("no free slot"), "{}", w.reason);
        }
        other => panic!("{other:?}"),
    }
    release_ok(&mut leases, &held.lease_id).await;
    let g = grant_of(&mut stream).await;
    assert_eq!(g.host_id, "b1");
    // The claim window, then the full TTL once claimed.
    assert_eq!(g.lease_ttl_millis, 10_000);
    let ka = leases
        .keep_alive(proto::KeepAliveRequest {
            lease_id: g.lease_id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ka.into_inner().lease_ttl_millis, 60_000);
    server.shutdown().await;
}

/// Fair order across members: with the flooder still running a build, the freed slot goes
/// to the member who asked last but runs nothing.
#[tokio::test]
async fn waiters_are_served_in_fair_order_across_members() {
    let (server, ch, _agent) = reported_builder(queue_config(), 2).await;
    let mut leases = LeaseServiceClient::new(ch.clone());
    let mut admin = AdminServiceClient::new(ch.clone());
    let first = acquire_granted(&mut leases, "flood", "f0").await;
    acquire_granted(&mut leases, "flood", "f1").await;
    let mut flood = Vec::new();
    for i in 2..6 {
        let mut s = wait_for(
            &mut leases,
            wait_request("x86_64-linux", "flood", &format!("f{i}")),
        )
        .await;
        assert!(matches!(event(&mut s).await, Some(Event::Waiting(_))));
        flood.push(s);
    }
    let mut other = wait_for(&mut leases, wait_request("x86_64-linux", "other", "o")).await;
    match event(&mut other).await {
        Some(Event::Waiting(w)) => assert_eq!(w.queue_position, 1),
        e => panic!("{e:?}"),
    }
    release_ok(&mut leases, &first.lease_id).await;
    grant_of(&mut other).await;
    assert_eq!(lease_holders(&mut admin).await, ["flood", "other"]);
    assert_eq!(waiting(&mut admin).await, 4);
    server.shutdown().await;
}

/// A waiter whose stream goes away leaves the queue at once and never holds a slot: the
/// slot freed next goes to the waiter behind it.
#[tokio::test]
async fn a_waiter_that_vanishes_drops_out_and_never_holds_a_slot() {
    let (server, ch, _agent) = reported_builder(queue_config(), 1).await;
    let mut leases = LeaseServiceClient::new(ch.clone());
    let mut admin = AdminServiceClient::new(ch.clone());
    let held = acquire_granted(&mut leases, "x", "busy").await;
    // The vanishing waiter is on its own connection, which it drops.
    let gone_ch = server.channel().await;
    let mut gone = wait_for(
        &mut LeaseServiceClient::new(gone_ch.clone()),
        wait_request("x86_64-linux", "gone", "g"),
    )
    .await;
    assert!(matches!(event(&mut gone).await, Some(Event::Waiting(_))));
    let mut next = wait_for(&mut leases, wait_request("x86_64-linux", "next", "n")).await;
    assert!(matches!(event(&mut next).await, Some(Event::Waiting(w)) if w.queue_position == 2));
    drop(gone);
    drop(gone_ch);
    eventually("the vanished waiter to leave the queue", || {
        let mut admin = admin.clone();
        async move { waiting(&mut admin).await == 1 }
    })
    .await;
    release_ok(&mut leases, &held.lease_id).await;
    let g = grant_of(&mut next).await;
    assert_eq!(g.host_id, "b1");
    assert_eq!(lease_holders(&mut admin).await, ["next"]);
    server.shutdown().await;
}

/// A scheduler restart: a waiter that re-connects before any agent has re-registered waits
/// instead of being declined; the agent reports its running build, and the holder's
/// keep-alive with the lease's details re-attaches it, so the host is not over-committed;
/// its release then hands the slot to the waiter.
#[tokio::test]
async fn after_a_restart_leases_re_attach_and_waiters_wait() {
    let first = Server::start(queue_config()).await;
    let ch = first.channel().await;
    let agent = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], 1)).await;
    let mut leases = LeaseServiceClient::new(ch.clone());
    let held = acquire_granted(&mut leases, "alice", "a").await;
    drop(agent);
    first.shutdown().await;

    let second = Server::start(queue_config()).await;
    let ch = second.channel().await;
    let mut leases = LeaseServiceClient::new(ch.clone());
    let mut admin = AdminServiceClient::new(ch.clone());
    let mut waiter = wait_for(&mut leases, wait_request("x86_64-linux", "bob", "b")).await;
    match event(&mut waiter).await {
        Some(Event::Waiting(_)) => {}
        other => panic!("a waiter must not be declined while agents re-register: {other:?}"),
    }
    let mut agent = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], 1)).await;
    agent
        .report(Report {
            running_builds: Some(1),
            ..Default::default()
        })
        .await;
    let reattach = proto::KeepAliveRequest {
        lease_id: held.lease_id.clone(),
        host_id: "b1".into(),
        client_id: "alice".into(),
        system: "x86_64-linux".into(),
        drv_path: "/nix/store/a.drv".into(),
    };
    leases.keep_alive(reattach.clone()).await.unwrap();
    assert_eq!(lease_holders(&mut admin).await, ["alice"]);
    // Without the details an unknown lease is still NOT_FOUND.
    let err = leases
        .keep_alive(proto::KeepAliveRequest {
            lease_id: "0-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Full: another client is postponed, nothing over-commits b1.
    assert!(matches!(
        leases
            .acquire(acquire("x86_64-linux", "carol", "c", false))
            .await
            .unwrap()
            .into_inner()
            .outcome,
        Some(Outcome::Postpone(_))
    ));
    let b1 = host(&mut admin, "b1").await;
    assert_eq!((b1.leases, b1.slots_used), (1, 1));
    release_ok(&mut leases, &held.lease_id).await;
    assert_eq!(grant_of(&mut waiter).await.host_id, "b1");
    second.shutdown().await;
}

/// Quotas and usage through the admin API: a member at its quota waits with the reason;
/// raising the quota hands it the free slot at once; usage shows its running builds.
#[tokio::test]
async fn quotas_are_set_at_run_time_and_usage_is_reported() {
    let mut config = queue_config();
    config.queue.default_member_max_slots = Some(1);
    let (server, ch, _agent) = reported_builder(config, 4).await;
    let mut leases = LeaseServiceClient::new(ch.clone());
    let mut admin = AdminServiceClient::new(ch.clone());
    acquire_granted(&mut leases, "m", "one").await;
    let mut second = wait_for(&mut leases, wait_request("x86_64-linux", "m", "two")).await;
    match event(&mut second).await {
        Some(Event::Waiting(w)) => assert!(w.reason.contains("quota of 1"), "{}", w.reason),
        other => panic!("{other:?}"),
    }
    let q = admin
        .set_quota(proto::SetQuotaRequest {
            target: Some(proto::set_quota_request::Target::ClientId("m".into())),
            max_slots: Some(2),
            priority: -100,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.default_member_max_slots, Some(1));
    assert_eq!(
        (
            q.members[0].client_id.as_str(),
            q.members[0].max_slots,
            q.members[0].priority
        ),
        ("m", Some(2), -100)
    );
    grant_of(&mut second).await;
    let usage = admin
        .get_usage(proto::GetUsageRequest {})
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!(
        (
            usage[0].client_id.as_str(),
            usage[0].running,
            usage[0].max_slots
        ),
        ("m", 2, Some(2))
    );
    assert_eq!(
        admin
            .get_quotas(proto::GetQuotasRequest {})
            .await
            .unwrap()
            .into_inner(),
        q
    );
    let err = admin
        .set_quota(proto::SetQuotaRequest {
            target: Some(proto::set_quota_request::Target::System(
                "bad system".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("invalid system"),
        "{}",
        err.message()
    );
    server.shutdown().await;
}

/// Bad waiting requests and partial re-attach details are refused naming the field; a
/// client that can build locally is declined at once when nothing is free.
#[tokio::test]
async fn waiting_requests_are_validated() {
    let server = Server::start(queue_config()).await;
    let ch = server.channel().await;
    let _agent = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], 1)).await;
    let mut leases = LeaseServiceClient::new(ch.clone());
    let bad = proto::WaitForLeaseRequest {
        pin_host_id: "no such".into(),
        ..wait_request("x86_64-linux", "m", "x")
    };
    let err = leases.wait_for_lease(bad).await.unwrap_err();
    assert!(
        err.message().starts_with("invalid pin_host_id"),
        "{}",
        err.message()
    );
    let err = leases
        .keep_alive(proto::KeepAliveRequest {
            lease_id: "l".into(),
            host_id: "b1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        err.message().starts_with("invalid client_id"),
        "{}",
        err.message()
    );
    acquire_granted(&mut leases, "x", "busy").await;
    let mut local = wait_for(
        &mut leases,
        proto::WaitForLeaseRequest {
            can_build_locally: true,
            ..wait_request("x86_64-linux", "m", "y")
        },
    )
    .await;
    assert!(matches!(event(&mut local).await, Some(Event::Decline(_))));
    assert!(event(&mut local).await.is_none());
    server.shutdown().await;
}

/// Quotas an operator set, and the usage and durations learned, outlive a restart on the
/// same state database: the new scheduler enforces the quota and reports the usage.
#[tokio::test]
async fn quotas_and_usage_survive_a_scheduler_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.sqlite3");
    let (server, ch) = start_on(&db).await;
    let _agent = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], 4)).await;
    let mut admin = AdminServiceClient::new(ch.clone());
    let mut leases = LeaseServiceClient::new(ch.clone());
    admin
        .set_quota(proto::SetQuotaRequest {
            target: Some(proto::set_quota_request::Target::ClientId("m".into())),
            max_slots: Some(1),
            priority: 0,
        })
        .await
        .unwrap();
    let g = acquire_granted(&mut leases, "m", "one").await;
    release_ok(&mut leases, &g.lease_id).await;
    server.shutdown().await;

    let (server, ch) = start_on(&db).await;
    let mut agent = Agent::register(ch.clone(), register("b1", &["x86_64-linux"], 4)).await;
    agent.report(Report::default()).await;
    let mut admin = AdminServiceClient::new(ch.clone());
    let mut leases = LeaseServiceClient::new(ch.clone());
    let q = admin
        .get_quotas(proto::GetQuotasRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (q.members[0].client_id.as_str(), q.members[0].max_slots),
        ("m", Some(1))
    );
    let usage = admin
        .get_usage(proto::GetUsageRequest {})
        .await
        .unwrap()
        .into_inner()
        .members;
    assert_eq!((usage[0].client_id.as_str(), usage[0].builds), ("m", 1));
    acquire_granted(&mut leases, "m", "two").await;
    match leases
        .acquire(acquire("x86_64-linux", "m", "three", true))
        .await
        .unwrap()
        .into_inner()
        .outcome
    {
        Some(Outcome::Decline(d)) => assert!(d.reason.contains("quota of 1"), "{}", d.reason),
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
}

/// A waiter pinned to one host (a builder-side gate) waits for that host although another
/// is free, and gets it the moment it frees; a plain request takes the other host.
#[tokio::test]
async fn a_pinned_waiter_gets_its_own_host() {
    let (server, ch, _b1) = reported_builder(queue_config(), 1).await;
    let mut b2 = Agent::register(ch.clone(), register("b2", &["x86_64-linux"], 4)).await;
    b2.report(Report::default()).await;
    let mut leases = LeaseServiceClient::new(ch.clone());
    let pinned = |drv: &str| proto::WaitForLeaseRequest {
        pin_host_id: "b1".into(),
        ..wait_request("x86_64-linux", "gate", drv)
    };
    let mut first = wait_for(&mut leases, pinned("one")).await;
    let held = grant_of(&mut first).await;
    assert_eq!(held.host_id, "b1");
    let mut second = wait_for(&mut leases, pinned("two")).await;
    match event(&mut second).await {
        Some(Event::Waiting(w)) => assert!(w.reason.contains("b1"), "{}", w.reason),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        acquire_granted(&mut leases, "plain", "p").await.host_id,
        "b2"
    );
    release_ok(&mut leases, &held.lease_id).await;
    assert_eq!(grant_of(&mut second).await.host_id, "b1");
    server.shutdown().await;
}
