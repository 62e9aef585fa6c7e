//! The agent's session behaviour against an in-process fake scheduler (a real tonic server on
//! `127.0.0.1:0` implementing `AgentService`), run through the library's `run`.
//!
//! These tests pin the protocol contract independently of the real scheduler: registration
//! first, reports before each deadline, goodbye on shutdown, the bearer header, reconnecting
//! with the same host id, and bounded retries when the scheduler is down or silent.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nixdispatch::proto::agent_message::Message;
use nixdispatch::proto::agent_service_server::{AgentService, AgentServiceServer};
use nixdispatch::proto::{AgentMessage, SchedulerMessage};
use nixdispatch_agent::{Config, Timing};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// What the fake scheduler saw.
#[derive(Debug)]
enum Event {
    /// A session opened, with its `authorization` header.
    Opened(Option<String>),
    /// A message arrived, with when.
    Received(AgentMessage, Instant),
    /// The agent's request stream ended.
    Closed,
}

/// Which messages the fake scheduler answers.
#[derive(Debug, Clone, Copy)]
enum Answers {
    /// Every message, as the protocol requires.
    All,
    /// The registration only (a scheduler hung after accepting the agent).
    RegistrationOnly,
    /// Nothing (a scheduler hung before answering).
    Nothing,
}

#[derive(Clone)]
struct Fake {
    events: mpsc::UnboundedSender<Event>,
    deadline_millis: u64,
    /// What to answer.
    answers: Answers,
    /// Bumping it breaks every open session with `UNAVAILABLE` (a scheduler crash).
    breaker: watch::Receiver<u32>,
}

#[tonic::async_trait]
impl AgentService for Fake {
    type SessionStream = ReceiverStream<Result<SchedulerMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let _ = self.events.send(Event::Opened(auth));
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let fake = self.clone();
        tokio::spawn(async move {
            let mut breaker = fake.breaker.clone();
            breaker.mark_unchanged();
            loop {
                tokio::select! {
                    _ = breaker.changed() => {
                        let _ = tx.send(Err(Status::unavailable("scheduler restarting"))).await;
                        break;
                    }
                    m = inbound.next() => {
                        let Some(Ok(m)) = m else { break };
                        let goodbye = matches!(m.message, Some(Message::Goodbye(_)));
                        let registration = matches!(m.message, Some(Message::Register(_)));
                        let _ = fake.events.send(Event::Received(m, Instant::now()));
                        if goodbye {
                            break;
                        }
                        let answer = match fake.answers {
                            Answers::All => true,
                            Answers::RegistrationOnly => registration,
                            Answers::Nothing => false,
                        };
                        if answer {
                            let answer = SchedulerMessage { next_report_within_millis: fake.deadline_millis, draining: false };
                            let _ = tx.send(Ok(answer)).await;
                        }
                    }
                }
            }
            let _ = fake.events.send(Event::Closed);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct FakeScheduler {
    addr: SocketAddr,
    events: mpsc::UnboundedReceiver<Event>,
    breaker: watch::Sender<u32>,
}

impl FakeScheduler {
    async fn start(deadline_millis: u64, answers: Answers) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (breaker, breaker_rx) = watch::channel(0);
        let fake = Fake {
            events: events_tx,
            deadline_millis,
            answers,
            breaker: breaker_rx,
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self {
            addr,
            events,
            breaker,
        }
    }

    /// The next event, failing the test after a bound.
    async fn next(&mut self) -> Event {
        tokio::time::timeout(Duration::from_secs(10), self.events.recv())
            .await
            .expect("no event from the agent within 10 s")
            .expect("fake scheduler gone")
    }

    /// The next received message, skipping other events.
    async fn next_message(&mut self) -> (Message, Instant) {
        loop {
            if let Event::Received(m, at) = self.next().await {
                return (m.message.expect("empty AgentMessage"), at);
            }
        }
    }
}

fn write_host_key(dir: &Path) -> std::path::PathBuf {
    let key = dir.join("host.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0wF5n9l6V8vWqjYsFNeaUhgSJHdcD1t0Cg+2mWQn9R root@b1\n",
    )
    .unwrap();
    key
}

/// A config with everything explicit (no Nix needed) and fast timing.
fn config(dir: &Path, scheduler: String) -> Config {
    Config {
        scheduler,
        host_id: Some("b1".into()),
        store_uri: Some("ssh-ng://root@127.0.0.1:2222".into()),
        host_key_file: write_host_key(dir),
        systems: Some(vec!["x86_64-linux".into()]),
        features: Some(vec!["kvm".into()]),
        max_jobs: Some(2),
        build_users_group: Some(String::new()),
        nix_bin: "/nonexistent/nix".into(),
        store_dir: dir.to_owned(),
        build_dir: Some(dir.to_owned()),
        timing: Timing {
            connect_timeout_millis: 300,
            reconnect_initial_millis: 20,
            reconnect_max_millis: 200,
            goodbye_timeout_millis: 1000,
            ..Timing::default()
        },
        ..Config::default()
    }
}

/// Starts the agent in-process; returns the shutdown trigger and its join handle.
fn spawn_agent(
    config: Config,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<nixdispatch_agent::Result<()>>,
) {
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(nixdispatch_agent::run(config, async move {
        let _ = stopped.await;
    }));
    (stop, handle)
}

/// The agent registers first with the configured identity, reports at once and then before
/// every deadline with sampled numbers, and on shutdown says goodbye and closes the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_reports_on_deadline_and_says_goodbye() {
    const DEADLINE_MS: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let mut fake = FakeScheduler::start(DEADLINE_MS, Answers::All).await;
    let (stop, agent) = spawn_agent(config(dir.path(), format!("http://{}", fake.addr)));

    let Event::Opened(auth) = fake.next().await else {
        panic!("expected a session to open")
    };
    assert_eq!(auth, None);
    let (Message::Register(r), _) = fake.next_message().await else {
        panic!("first message is not Register")
    };
    assert_eq!(r.host_id, "b1");
    assert_eq!(r.store_uri, "ssh-ng://root@127.0.0.1:2222");
    assert!(r.host_public_key.starts_with("ssh-ed25519 AAAA"));
    assert_eq!(r.systems, ["x86_64-linux"]);
    assert_eq!(r.supported_features, ["kvm"]);
    assert_eq!(r.max_jobs, 2);
    assert!(r.cpu_count > 0);
    assert!(r.total_memory_bytes > 0);
    assert_eq!(r.agent_version, env!("CARGO_PKG_VERSION"));

    let mut previous = None;
    for _ in 0..4 {
        let (Message::Report(report), at) = fake.next_message().await else {
            panic!("expected a Report")
        };
        assert!(report.load.is_some());
        assert!(report.available_memory_bytes.is_some());
        assert!(report.store.is_some() && report.build_dir.is_some());
        if cfg!(target_os = "linux") {
            assert!(report.running_builds.is_some());
        }
        if let Some(previous) = previous {
            let gap: Duration = at - previous;
            assert!(
                gap < Duration::from_millis(DEADLINE_MS),
                "report {gap:?} after the previous one"
            );
        }
        previous = Some(at);
    }

    stop.send(()).unwrap();
    loop {
        match fake.next_message().await {
            (Message::Goodbye(g), _) => {
                assert_eq!(g.reason, "shutdown");
                break;
            }
            (Message::Report(_), _) => continue,
            (other, _) => panic!("unexpected {other:?}"),
        }
    }
    assert!(matches!(fake.next().await, Event::Closed));
    tokio::time::timeout(Duration::from_secs(5), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A configured credential file is sent as an `authorization: Bearer` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "tok-123\n").unwrap();
    let mut fake = FakeScheduler::start(1000, Answers::All).await;
    let mut c = config(dir.path(), format!("http://{}", fake.addr));
    c.credential_file = Some(token);
    let (stop, agent) = spawn_agent(c);
    let Event::Opened(auth) = fake.next().await else {
        panic!("expected a session to open")
    };
    assert_eq!(auth.as_deref(), Some("Bearer tok-123"));
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// When the scheduler breaks the session, the agent reconnects by itself and registers again
/// with the same host id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_with_the_same_host_id() {
    let dir = tempfile::tempdir().unwrap();
    let mut fake = FakeScheduler::start(400, Answers::All).await;
    let (stop, agent) = spawn_agent(config(dir.path(), format!("http://{}", fake.addr)));
    let (Message::Register(first), _) = fake.next_message().await else {
        panic!("expected Register")
    };
    let (Message::Report(_), _) = fake.next_message().await else {
        panic!("expected a Report")
    };
    fake.breaker.send_modify(|g| *g += 1);
    let second = loop {
        if let (Message::Register(r), _) = fake.next_message().await {
            break r;
        }
    };
    assert_eq!(second.host_id, first.host_id);
    let (Message::Report(_), _) = fake.next_message().await else {
        panic!("expected a Report after reconnecting")
    };
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// A log sink shared with the test.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// With the scheduler down (connections accepted and dropped), the agent retries with
/// back-off rather than spinning, logs the outage once, and still shuts down promptly.
#[tokio::test]
async fn down_scheduler_backs_off_and_logs_once() {
    let logs = Logs::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = attempts.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            drop(socket);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let window = Duration::from_millis(1500);
    let result = nixdispatch_agent::run(
        config(dir.path(), format!("http://{addr}")),
        tokio::time::sleep(window),
    );
    tokio::time::timeout(Duration::from_secs(10), result)
        .await
        .unwrap()
        .unwrap();

    let n = attempts.load(Ordering::Relaxed);
    // Back-off from 20 ms doubling to 200 ms allows about 10 attempts in 1.5 s; a spinning
    // agent would make thousands.
    assert!(
        (2..=30).contains(&n),
        "{n} connection attempts in {window:?}"
    );
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert_eq!(
        text.matches("cannot reach the scheduler").count(),
        1,
        "logs:\n{text}"
    );
}

/// A scheduler that opens the session but never answers makes the agent give up after the
/// connect timeout and retry with back-off: a bounded number of sessions, no spinning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_scheduler_is_retried_with_back_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut fake = FakeScheduler::start(1000, Answers::Nothing).await;
    let window = Duration::from_millis(2000);
    let c = config(dir.path(), format!("http://{}", fake.addr));
    tokio::time::timeout(
        Duration::from_secs(10),
        nixdispatch_agent::run(c, tokio::time::sleep(window)),
    )
    .await
    .unwrap()
    .unwrap();
    let mut sessions = 0;
    while let Ok(event) = fake.events.try_recv() {
        if matches!(event, Event::Opened(_)) {
            sessions += 1;
        }
    }
    // Each attempt waits the 300 ms connect timeout plus a back-off: at most ~7 in 2 s.
    assert!(
        (2..=10).contains(&sessions),
        "{sessions} sessions in {window:?}"
    );
}

/// A scheduler that answers the registration but then no report is given up on after
/// `silent_deadlines` deadlines: the agent reconnects and registers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_reports_make_the_agent_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let mut fake = FakeScheduler::start(200, Answers::RegistrationOnly).await;
    let (stop, agent) = spawn_agent(config(dir.path(), format!("http://{}", fake.addr)));
    let (Message::Register(_), first) = fake.next_message().await else {
        panic!("expected Register")
    };
    let mut reports = 0;
    let again = loop {
        match fake.next_message().await {
            (Message::Report(_), _) => reports += 1,
            (Message::Register(_), at) => break at,
            (other, _) => panic!("unexpected {other:?}"),
        }
    };
    // 3 deadlines of 200 ms without an answer, at a report every 160 ms.
    assert!(reports >= 3, "only {reports} reports before reconnecting");
    assert!(again - first >= Duration::from_millis(600));
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
