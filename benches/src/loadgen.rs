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
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

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
    /// What the clients do.
    pub mode: ClientMode,
    /// When above zero, the measured phase runs a second time with this many extra clients
    /// calling `ListHosts` in a loop, to show what an operator's listing costs members.
    pub list_hosts_flood: usize,
    /// Also measure an empty RPC (`grpc.health.v1.Health/Check`) with the same clients, as
    /// the same run's reference for the acquire latencies.
    pub reference: bool,
}

/// What the clients do in the measured phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientMode {
    /// Acquire, keep alive, release, in a closed loop: the grant path's cost.
    Closed,
    /// What a real hook sends: acquire; on a grant hold the lease for `hold`, then release
    /// it (no keep-alive straight after the grant); on a postponement ask again at once.
    Hook {
        /// How long each granted build holds its slot.
        hold: Duration,
    },
    /// Every slot is taken first (by the load generator itself); then each client is one
    /// postponed request that keeps asking again: the postponed path's cost.
    Saturated,
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
            mode: ClientMode::Closed,
            list_hosts_flood: 0,
            reference: false,
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
    /// Acquire answers that were postponements.
    pub postponed: u64,
    /// Slots the load generator took before a saturated run.
    pub slots_held: usize,
    /// With a `ListHosts` flood: acquire latency p50, p99, p99.9, max (µs), decisions, and
    /// `ListHosts` calls answered.
    pub flood: Option<([f64; 4], u64, u64)>,
    /// The empty-RPC reference: `Health/Check` latency p50, p99, p99.9, max (µs), and calls
    /// per second.
    pub reference_us: Option<([f64; 4], f64)>,
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
    postponed: u64,
    lease_calls: u64,
    errors: u64,
    open: u64,
}

impl ClientStats {
    fn add(&mut self, o: ClientStats) {
        self.acquire_us.extend(o.acquire_us);
        self.decisions += o.decisions;
        self.grants += o.grants;
        self.postponed += o.postponed;
        self.lease_calls += o.lease_calls;
        self.errors += o.errors;
        self.open += o.open;
    }
}

/// One client, until `stop`: see [`ClientMode`].
async fn client(
    c: usize,
    channel: Channel,
    mode: ClientMode,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> ClientStats {
    let mut lease = LeaseServiceClient::new(channel);
    let mut s = ClientStats::default();
    let mut n = 0u64;
    // A postponed derivation is asked for again, as Nix does.
    let mut waiting = false;
    let mut last: Option<AcquireRequest> = None;
    while !stop.load(Ordering::Relaxed) {
        if !waiting || mode == ClientMode::Closed {
            n += 1;
        }
        let req = AcquireRequest {
            system: SYSTEMS[(c + n as usize) % 2].to_string(),
            required_features: vec![],
            drv_path: format!("/nix/store/{:032}-lg-{c}-{n}.drv", n),
            client_id: format!("client-{c}"),
            can_build_locally: false,
            exclude_hosts: vec![],
            pin_host: String::new(),
        };
        last = Some(req.clone());
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
        let Some(acquire_response::Outcome::Granted(g)) = r.outcome else {
            if m {
                s.postponed += 1;
            }
            waiting = true;
            tokio::task::yield_now().await;
            continue;
        };
        waiting = false;
        if m {
            s.grants += 1;
        }
        s.open += 1;
        let mut calls = Vec::with_capacity(2);
        match mode {
            ClientMode::Hook { hold } => tokio::time::sleep(hold).await,
            _ => calls.push(
                lease
                    .keep_alive(KeepAliveRequest {
                        lease_id: g.lease_id.clone(),
                        ..Default::default()
                    })
                    .await
                    .is_ok(),
            ),
        }
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
        calls.push(rel.is_ok());
        for ok in calls {
            if ok {
                if m {
                    s.lease_calls += 1;
                }
            } else {
                s.errors += 1;
            }
        }
    }
    // A postponed request holds a place in the scheduler's queue (a freed slot would be
    // held for it): give it up the way a client that can build locally does, and give back
    // a grant made meanwhile.
    if let (true, Some(mut req)) = (waiting, last) {
        req.can_build_locally = true;
        if let Ok(r) = lease.acquire(req).await
            && let Some(acquire_response::Outcome::Granted(g)) = r.into_inner().outcome
        {
            let _ = lease
                .release(ReleaseRequest {
                    lease_id: g.lease_id,
                    outcome: proto::BuildOutcome::Cancelled as i32,
                    duration_millis: 0,
                })
                .await;
        }
    }
    s
}

/// Takes every free slot for the load generator itself and keeps the leases alive until
/// `stop`, then releases them. Returns how many it took (once they are all taken) and the
/// task holding them.
async fn hold_every_slot(
    channel: Channel,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(usize, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let mut lease = LeaseServiceClient::new(channel);
    let mut held = Vec::new();
    let mut ttl = Duration::from_secs(60);
    for system in SYSTEMS {
        loop {
            let r = lease
                .acquire(AcquireRequest {
                    system: system.to_string(),
                    required_features: vec![],
                    drv_path: format!("/nix/store/{:032}-lg-holder.drv", held.len()),
                    client_id: "holder".into(),
                    // Declined, not queued, once the system is full: a queued request
                    // would get the slots back when they are released.
                    can_build_locally: true,
                    exclude_hosts: vec![],
                    pin_host: String::new(),
                })
                .await
                .context("taking every slot")?
                .into_inner();
            match r.outcome {
                Some(acquire_response::Outcome::Granted(g)) => {
                    ttl = Duration::from_millis(g.lease_ttl_millis);
                    held.push(g.lease_id);
                }
                _ => break,
            }
        }
    }
    let n = held.len();
    let task = tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep((ttl / 3).min(Duration::from_millis(500))).await;
            for id in &held {
                lease
                    .keep_alive(KeepAliveRequest {
                        lease_id: id.clone(),
                        ..Default::default()
                    })
                    .await
                    .context("keeping a held slot")?;
            }
        }
        for id in held {
            lease
                .release(ReleaseRequest {
                    lease_id: id,
                    outcome: proto::BuildOutcome::Cancelled as i32,
                    duration_millis: 0,
                })
                .await
                .context("releasing a held slot")?;
        }
        Ok(())
    });
    Ok((n, task))
}

/// Runs the clients (and `flood` `ListHosts` callers) for `cfg.duration`; returns the
/// clients' stats and the listings answered.
async fn measured_phase(
    channels: &[Channel],
    cfg: &LoadConfig,
    measuring: &Arc<AtomicBool>,
    flood: usize,
) -> (ClientStats, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..cfg.clients)
        .map(|c| {
            tokio::spawn(client(
                c,
                channels[c % channels.len()].clone(),
                cfg.mode,
                measuring.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let listers: Vec<_> = (0..flood)
        .map(|k| {
            let mut admin = AdminServiceClient::new(channels[k % channels.len()].clone())
                .max_decoding_message_size(256 << 20);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if admin.list_hosts(ListHostsRequest {}).await.is_ok() {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(cfg.duration).await;
    measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut total = ClientStats::default();
    for c in clients {
        if let Ok(s) = c.await {
            total.add(s);
        }
    }
    let mut listings = 0;
    for l in listers {
        listings += l.await.unwrap_or(0);
    }
    (total, listings)
}

/// p50, p99, p99.9 and max of `v` (sorted here).
fn spread(mut v: Vec<f64>) -> [f64; 4] {
    v.sort_by(f64::total_cmp);
    [
        percentile(&v, 50.0),
        percentile(&v, 99.0),
        percentile(&v, 99.9),
        v.last().copied().unwrap_or(0.0),
    ]
}

/// The empty-RPC reference: `clients` callers of `Health/Check` for `duration`.
async fn reference(channels: &[Channel], clients: usize, duration: Duration) -> ([f64; 4], f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let mut health = HealthClient::new(channels[c % channels.len()].clone());
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut us = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if health
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await
                        .is_ok()
                    {
                        us.push(t.elapsed().as_secs_f64() * 1e6);
                    }
                }
                us
            })
        })
        .collect();
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64().max(1e-9);
    (spread(all), rate)
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
    let holder_stop = Arc::new(AtomicBool::new(false));
    let holder = if cfg.mode == ClientMode::Saturated {
        let (n, task) = hold_every_slot(client_channels[0].clone(), holder_stop.clone()).await?;
        result.slots_held = n;
        Some(task)
    } else {
        None
    };
    let started = Instant::now();
    let (clients, _) = measured_phase(&client_channels, cfg, &measuring, 0).await;
    result.measured = started.elapsed();
    result.decisions = clients.decisions;
    result.grants = clients.grants;
    result.postponed = clients.postponed;
    result.lease_calls = clients.lease_calls;
    result.errors = clients.errors;
    result.client_leases_open = clients.open;
    result.acquire_us = spread(clients.acquire_us);
    if cfg.list_hosts_flood > 0 {
        let (f, listings) =
            measured_phase(&client_channels, cfg, &measuring, cfg.list_hosts_flood).await;
        result.errors += f.errors;
        result.client_leases_open += f.open;
        result.flood = Some((spread(f.acquire_us), f.decisions, listings));
    }
    if cfg.reference {
        result.reference_us = Some(reference(&client_channels, cfg.clients, cfg.duration).await);
    }
    holder_stop.store(true, Ordering::Relaxed);
    if let Some(task) = holder {
        task.await??;
    }

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
