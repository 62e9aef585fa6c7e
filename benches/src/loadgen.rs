//! The scheduler load generator: `M` simulated agents streaming reports at their deadlines and
//! `C` clients doing acquire -> keep alive -> release in a closed loop, over real gRPC.
//!
//! [`run`] drives a scheduler that is already listening (the `loadgen` binary starts one as a
//! separate process so that its resident memory can be read; the smoke test serves one
//! in-process). Everything is bounded: the ramp-up by a timeout, the measured phase by its
//! duration, every call by a deadline. Only loopback addresses are used by the callers.
//!
//! Agents are multiplexed as HTTP/2 streams over a few connections
//! (`streams_per_connection`), as 10,000 agents on 10,000 TCP connections would measure the
//! kernel rather than the scheduler.
//!
//! "Falling behind" is measured three ways: the time from sending a report (at its deadline)
//! to the scheduler's answer; how late the load generator itself managed to send (its own
//! lag, on a machine it shares with the scheduler); and, at the end of the run, how many hosts
//! `ListHosts` shows as not `READY`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use nixdispatch::proto::{
    self, AcquireRequest, AgentMessage, HostState, KeepAliveRequest, ListHostsRequest,
    ListLeasesRequest, Register, ReleaseRequest, Report, acquire_response,
    admin_service_client::AdminServiceClient, agent_message,
    agent_service_client::AgentServiceClient, lease_service_client::LeaseServiceClient,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::metrics::percentile;

/// Parameters of a load run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Simulated agents (hosts).
    pub agents: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Length of the measured phase.
    pub duration: Duration,
    /// Agent streams per HTTP/2 connection.
    pub streams_per_connection: usize,
    /// Connections shared by the clients.
    pub client_connections: usize,
    /// How long the ramp-up (every agent registered and answered) may take.
    pub ramp_timeout: Duration,
    /// The scheduler's grace period: a report answered later than this after its deadline
    /// counts as behind.
    pub grace: Duration,
}

impl LoadConfig {
    /// Defaults for `agents` agents and `clients` clients, measuring for `duration`.
    pub fn new(agents: usize, clients: usize, duration: Duration) -> Self {
        Self {
            agents,
            clients,
            duration,
            streams_per_connection: 100,
            client_connections: 4,
            ramp_timeout: Duration::from_secs(120),
            grace: Duration::from_secs(20),
        }
    }
}

/// What a load run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    /// Agents that registered and got their first answer.
    pub agents_registered: usize,
    /// How long the ramp-up took.
    pub ramp: Duration,
    /// Length of the measured phase.
    pub measured: Duration,
    /// Acquire calls answered in the measured phase.
    pub decisions: u64,
    /// Of those, grants.
    pub grants: u64,
    /// Keep-alive and release calls answered.
    pub lease_calls: u64,
    /// Calls that failed (any status).
    pub errors: u64,
    /// Acquire latency percentiles, microseconds: p50, p99, p99.9, max.
    pub acquire_us: [f64; 4],
    /// Reports sent in the measured phase.
    pub reports: u64,
    /// Report round trip (sent at the deadline -> answered), ms: p50, p99, max.
    pub report_rtt_ms: [f64; 3],
    /// How late the load generator sent reports after their deadline, ms: p99, max.
    pub send_lag_ms: [f64; 2],
    /// Reports answered later than the grace period after their deadline.
    pub reports_behind: u64,
    /// Hosts per state at the end of the measured phase: ready, stale, other.
    pub host_states: [usize; 3],
    /// Leases the scheduler still held after every client finished (must be 0).
    pub leases_left: usize,
    /// Leases the clients still held (granted but not released; must be 0).
    pub client_leases_open: u64,
}

impl LoadResult {
    /// Decisions per second in the measured phase.
    pub fn decisions_per_second(&self) -> f64 {
        self.decisions as f64 / self.measured.as_secs_f64().max(1e-9)
    }
}

/// An OpenSSH ed25519 public key line that passes the scheduler's validation.
fn fake_host_key(k: usize) -> String {
    let mut blob = Vec::with_capacity(51);
    blob.extend_from_slice(&11u32.to_be_bytes());
    blob.extend_from_slice(b"ssh-ed25519");
    blob.extend_from_slice(&32u32.to_be_bytes());
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&(k as u64).to_le_bytes());
    blob.extend_from_slice(&key);
    format!(
        "ssh-ed25519 {} loadgen",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

const SYSTEMS: [&str; 2] = ["x86_64-linux", "aarch64-linux"];

#[derive(Default)]
struct AgentStats {
    rtt_ms: Vec<f64>,
    send_lag_ms: Vec<f64>,
    behind: u64,
}

async fn endpoint(addr: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(10))
        .http2_adaptive_window(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// One agent: registers, then answers every directive with a report sent at its deadline,
/// until `stop`. Returns its measurements of the measured phase.
async fn agent(
    k: usize,
    channel: Channel,
    registered: mpsc::Sender<()>,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    grace: Duration,
    stats: Arc<std::sync::Mutex<AgentStats>>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(4);
    let host_id = format!("lg-{k:05}");
    tx.send(AgentMessage {
        message: Some(agent_message::Message::Register(Register {
            host_id: host_id.clone(),
            store_uri: format!("ssh-ng://{host_id}.invalid"),
            host_public_key: fake_host_key(k),
            systems: vec![SYSTEMS[k % 2].to_string()],
            supported_features: vec!["big-parallel".into()],
            mandatory_features: vec![],
            max_jobs: 8,
            speed_factor: 1.0 + (k % 4) as f64,
            cpu_count: 16,
            total_memory_bytes: 64 << 30,
            agent_version: "loadgen".into(),
        })),
    })
    .await?;
    let mut client = AgentServiceClient::new(channel);
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .with_context(|| format!("{host_id}: opening the session"))?
        .into_inner();
    let record = |f: &dyn Fn(&mut AgentStats)| {
        f(&mut stats.lock().unwrap_or_else(|p| p.into_inner()));
    };
    let mut first = true;
    let mut sent_at_first = true;
    let mut sent_at: Option<Instant> = None;
    loop {
        let msg = match tokio::time::timeout(grace * 3, inbound.message()).await {
            Err(_) => bail!("{host_id}: no answer within {:?}", grace * 3),
            Ok(r) => r.with_context(|| format!("{host_id}: session"))?,
        };
        let Some(msg) = msg else {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            bail!("{host_id}: the scheduler closed the session");
        };
        let now = Instant::now();
        if let Some(at) = sent_at.take() {
            let rtt = now - at;
            if measuring.load(Ordering::Relaxed) {
                record(&|s| {
                    s.rtt_ms.push(rtt.as_secs_f64() * 1e3);
                    if rtt > grace {
                        s.behind += 1;
                    }
                });
            }
        }
        if first {
            first = false;
            let _ = registered.send(()).await;
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Report at the deadline: the worst case the protocol allows. The first report goes
        // out at a phase spread over the interval, as agents that started at different times
        // would, instead of all agents reporting in the same millisecond forever.
        let within = Duration::from_millis(msg.next_report_within_millis);
        let due = if sent_at_first {
            sent_at_first = false;
            now + within.mul_f64((k.wrapping_mul(7919) % 1000) as f64 / 1000.0)
        } else {
            now + within
        };
        tokio::time::sleep_until(due.into()).await;
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let sent = Instant::now();
        if measuring.load(Ordering::Relaxed) {
            let lag = (sent - due).as_secs_f64() * 1e3;
            record(&|s| s.send_lag_ms.push(lag));
        }
        sent_at = Some(sent);
        let report = Report {
            running_builds: Some((k % 3) as u32),
            ..Report::default()
        };
        if tx
            .send(AgentMessage {
                message: Some(agent_message::Message::Report(report)),
            })
            .await
            .is_err()
        {
            bail!("{host_id}: the session's request stream closed");
        }
    }
}

#[derive(Default)]
struct ClientStats {
    acquire_us: Vec<f64>,
    decisions: u64,
    grants: u64,
    lease_calls: u64,
    errors: u64,
    open: u64,
}

/// One client: acquire -> keep alive -> release, as fast as answers come, until `stop`.
async fn client(
    c: usize,
    channel: Channel,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> ClientStats {
    let mut lease = LeaseServiceClient::new(channel);
    let mut s = ClientStats::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let req = AcquireRequest {
            system: SYSTEMS[(c + n as usize) % 2].to_string(),
            required_features: vec![],
            drv_path: format!("/nix/store/{:032}-lg-{c}-{n}.drv", n),
            client_id: format!("client-{c}"),
            can_build_locally: false,
            exclude_hosts: vec![],
        };
        let t = Instant::now();
        let r = lease.acquire(req).await;
        let dt = t.elapsed();
        let m = measuring.load(Ordering::Relaxed);
        let r = match r {
            Ok(r) => r.into_inner(),
            Err(_) => {
                s.errors += 1;
                continue;
            }
        };
        if m {
            s.decisions += 1;
            s.acquire_us.push(dt.as_secs_f64() * 1e6);
        }
        match r.outcome {
            Some(acquire_response::Outcome::Granted(g)) => {
                if m {
                    s.grants += 1;
                }
                s.open += 1;
                let ka = lease
                    .keep_alive(KeepAliveRequest {
                        lease_id: g.lease_id.clone(),
                        ..Default::default()
                    })
                    .await;
                let rel = lease
                    .release(ReleaseRequest {
                        lease_id: g.lease_id,
                        outcome: proto::BuildOutcome::Succeeded as i32,
                        duration_millis: 1,
                    })
                    .await;
                if rel.is_ok() {
                    s.open -= 1;
                }
                for ok in [ka.is_ok(), rel.is_ok()] {
                    if ok {
                        if m {
                            s.lease_calls += 1;
                        }
                    } else {
                        s.errors += 1;
                    }
                }
            }
            _ => tokio::task::yield_now().await,
        }
    }
    s
}

/// Runs the load against the scheduler at `addr` (`host:port`).
pub async fn run(addr: &str, cfg: &LoadConfig) -> anyhow::Result<LoadResult> {
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut result = LoadResult::default();

    // Ramp up the agents.
    let ramp_start = Instant::now();
    let (reg_tx, mut reg_rx) = mpsc::channel(1024);
    let mut agents = Vec::with_capacity(cfg.agents);
    let stats = Arc::new(std::sync::Mutex::new(AgentStats::default()));
    let conns = cfg.agents.div_ceil(cfg.streams_per_connection.max(1));
    let mut channels = Vec::with_capacity(conns);
    for _ in 0..conns {
        channels.push(endpoint(addr).await?);
    }
    for k in 0..cfg.agents {
        let ch = channels[k / cfg.streams_per_connection.max(1)].clone();
        agents.push(tokio::spawn(agent(
            k,
            ch,
            reg_tx.clone(),
            measuring.clone(),
            stop.clone(),
            cfg.grace,
            stats.clone(),
        )));
    }
    drop(reg_tx);
    let deadline = tokio::time::Instant::now() + cfg.ramp_timeout;
    while result.agents_registered < cfg.agents {
        match tokio::time::timeout_at(deadline, reg_rx.recv()).await {
            Ok(Some(())) => result.agents_registered += 1,
            Ok(None) => break,
            Err(_) => break,
        }
    }
    result.ramp = ramp_start.elapsed();
    if result.agents_registered < cfg.agents {
        stop.store(true, Ordering::Relaxed);
        // Surface the first agent error, if any.
        for a in agents {
            if a.is_finished() {
                if let Ok(Err(e)) = a.await {
                    return Err(e.context("ramp-up"));
                }
            } else {
                a.abort();
            }
        }
        bail!(
            "only {} of {} agents registered within {:?}",
            result.agents_registered,
            cfg.agents,
            cfg.ramp_timeout
        );
    }

    // The measured phase.
    let mut client_channels = Vec::new();
    for _ in 0..cfg.client_connections.max(1) {
        client_channels.push(endpoint(addr).await?);
    }
    let client_stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    let clients: Vec<_> = (0..cfg.clients)
        .map(|c| {
            tokio::spawn(client(
                c,
                client_channels[c % client_channels.len()].clone(),
                measuring.clone(),
                client_stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(cfg.duration).await;
    measuring.store(false, Ordering::Relaxed);
    result.measured = started.elapsed();
    client_stop.store(true, Ordering::Relaxed);
    let mut acquire_us = Vec::new();
    for c in clients {
        let s = c.await?;
        result.decisions += s.decisions;
        result.grants += s.grants;
        result.lease_calls += s.lease_calls;
        result.errors += s.errors;
        result.client_leases_open += s.open;
        acquire_us.extend(s.acquire_us);
    }
    acquire_us.sort_by(f64::total_cmp);
    result.acquire_us = [
        percentile(&acquire_us, 50.0),
        percentile(&acquire_us, 99.0),
        percentile(&acquire_us, 99.9),
        acquire_us.last().copied().unwrap_or(0.0),
    ];

    // Host states and leases, with every agent still connected.
    let mut admin =
        AdminServiceClient::new(client_channels[0].clone()).max_decoding_message_size(256 << 20);
    let hosts = admin
        .list_hosts(ListHostsRequest {})
        .await
        .context("ListHosts")?
        .into_inner()
        .hosts;
    for h in &hosts {
        let i = match HostState::try_from(h.state) {
            Ok(HostState::Ready) => 0,
            Ok(HostState::Stale) => 1,
            _ => 2,
        };
        result.host_states[i] += 1;
    }
    result.leases_left = admin
        .list_leases(ListLeasesRequest::default())
        .await
        .context("ListLeases")?
        .into_inner()
        .leases
        .len();

    // Stop the agents. Their measurements are already recorded; one that ended on its own
    // before `stop` failed, and counts as an error.
    stop.store(true, Ordering::Relaxed);
    for a in agents {
        if a.is_finished() {
            if !matches!(a.await, Ok(Ok(()))) {
                result.errors += 1;
            }
        } else {
            a.abort();
        }
    }
    let m = stats.lock().unwrap_or_else(|p| p.into_inner());
    let mut rtt = m.rtt_ms.clone();
    rtt.sort_by(f64::total_cmp);
    let mut lag = m.send_lag_ms.clone();
    lag.sort_by(f64::total_cmp);
    result.reports = rtt.len() as u64;
    result.report_rtt_ms = [
        percentile(&rtt, 50.0),
        percentile(&rtt, 99.0),
        rtt.last().copied().unwrap_or(0.0),
    ];
    result.send_lag_ms = [percentile(&lag, 99.0), lag.last().copied().unwrap_or(0.0)];
    result.reports_behind = m.behind;
    Ok(result)
}
