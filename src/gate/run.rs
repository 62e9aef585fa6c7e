//! The processes and file descriptors: classify the member's command, exec the shell for
//! anything that is not Nix, or run the real Nix program as a child and relay its stdin and
//! stdout through a [`Session`], holding the first build operation until a slot is granted.
//!
//! Three tasks per session: client → daemon (this one also waits for the slot), daemon →
//! client (the only writer of the member's stdout, so progress messages are injected
//! there), and the lease keeper (keep-alives, and the release when the build's result went
//! back or the session ended).

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::process::{ChildStdin, ChildStdout};
use tokio::sync::{mpsc, watch};

use super::command::{self, Command};
use super::config::{self, GateConfig};
use super::error::GateError;
use super::scheduler::{Opened, Scheduler, Verdict};
use super::serve::Serve;
use super::session::{ClientEvent, Forward, Grammar, ServerEvent, Session};
use super::worker::Worker;
use super::{drv, error_chain, wait};
use crate::client::ClientConfig;
use crate::proto::{AcquireRequest, BuildOutcome, KeepAliveRequest, WaitForLeaseRequest};

/// Read size of the relay: large, so that uploads move in few system calls.
const CHUNK: usize = 1 << 20;

/// The largest `.drv` file the gate reads for a BuildPaths (derivations are kilobytes).
const MAX_DRV_FILE: u64 = 16 << 20;

/// `nixdispatch-gate`: sshd's forced command for members.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The configuration file. Default: `$NIXDISPATCH_GATE_CONFIG`, else
    /// `/etc/nixdispatch/gate.toml` (a missing file means the defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The member's name towards the scheduler. Default: the sshd user (`$USER`).
    #[arg(long)]
    member: Option<String>,
}

/// The gate's entry point.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let original = std::env::var("SSH_ORIGINAL_COMMAND").ok();
    let command = command::classify(original.as_deref());
    let path = args
        .config
        .clone()
        .or_else(|| {
            std::env::var_os(config::CONFIG_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG_PATH));
    let config = match GateConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            // The member's command still runs, as it would without the gate; the operator
            // sees why in the session's stderr.
            eprintln!(
                "nixdispatch-gate: {}; running the command ungated",
                error_chain(&e)
            );
            return exec_shell(original.as_deref());
        }
    };
    init_tracing(&config);
    warn_readable_credential(&config);
    let (kind, words) = match command {
        _ if !config.enabled => return exec_shell(original.as_deref()),
        Command::Shell(_) | Command::Login => return exec_shell(original.as_deref()),
        Command::Daemon(words) => (Protocol::Worker, words),
        Command::Serve(words) => (Protocol::Serve, words),
    };
    let configured = match kind {
        Protocol::Worker => config.nix_daemon.clone(),
        Protocol::Serve => config.nix_store.clone(),
    };
    let (program, program_args) = command::program_and_args(&words, configured.as_deref());
    let identity = identity(&args, &config);
    let (member, host_id) = match identity {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(error = %error_chain(&e), "no usable identity; running ungated");
            return exec_program(&program, &program_args);
        }
    };
    // One thread: the relay's work per byte is a copy, and without cross-thread wake-ups it
    // moves about a third more bytes per second (measured: `docs/benchmarks/gate.md`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime; running ungated");
            return exec_program(&program, &program_args);
        }
    };
    let ctx = Ctx {
        config,
        member,
        host_id,
    };
    let result = runtime.block_on(async move {
        match kind {
            Protocol::Worker => {
                relay(Session::new(Worker::new()), &program, &program_args, ctx).await
            }
            Protocol::Serve => {
                relay(Session::new(Serve::new()), &program, &program_args, ctx).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "session failed");
            eprintln!("nixdispatch-gate: {}", error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// The protocol of a relayed session.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    Worker,
    Serve,
}

/// What every part of a session needs.
#[derive(Debug, Clone)]
struct Ctx {
    config: GateConfig,
    member: String,
    host_id: String,
}

fn identity(args: &Args, config: &GateConfig) -> Result<(String, String), GateError> {
    let member = args
        .member
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok())
        .unwrap_or_default();
    if !config::valid_id(&member) {
        return Err(GateError::Identity {
            what: "member",
            value: member,
        });
    }
    let host_id = config.host_id.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default()
    });
    if !config::valid_id(&host_id) {
        return Err(GateError::Identity {
            what: "host id",
            value: host_id,
        });
    }
    Ok((member, host_id))
}

/// The direct mode with a credential, run as anyone but root: the member this session runs
/// as can read the builder's credential (the gate does), and with it act as the builder
/// towards the scheduler. Said loudly in the log, every session; `agent_socket` fixes it.
fn warn_readable_credential(config: &GateConfig) {
    let Some(path) = &config.credential_file else {
        return;
    };
    let uid = rustix::process::geteuid();
    if uid.is_root() || std::fs::File::open(path).is_err() {
        return;
    }
    tracing::warn!(
        credential_file = %path.display(),
        uid = uid.as_raw(),
        "INSECURE: this member can read the builder's credential and act as the builder \
         towards the scheduler; set agent_socket to the agent's gate socket instead (docs/gate.md)"
    );
}

fn init_tracing(config: &GateConfig) {
    crate::diag::init_file_logging(config.log_file.as_deref(), &config.log_level);
}

/// Replaces the gate by the member's shell running `line` (or an interactive login shell),
/// exactly as sshd would have without a forced command.
fn exec_shell(line: Option<&str>) -> ExitCode {
    let shell = std::env::var("SHELL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/bin/sh".to_owned());
    let mut cmd = std::process::Command::new(&shell);
    match line.filter(|l| !l.trim().is_empty()) {
        Some(l) => {
            cmd.arg("-c").arg(l);
        }
        None => {
            let name = Path::new(&shell)
                .file_name()
                .map_or_else(|| "sh".into(), |n| n.to_string_lossy().into_owned());
            cmd.arg0(format!("-{name}"));
        }
    }
    let e = cmd.exec();
    eprintln!("nixdispatch-gate: cannot run {shell}: {e}");
    ExitCode::from(127)
}

/// Replaces the gate by `program` (ungated).
fn exec_program(program: &str, args: &[String]) -> ExitCode {
    let e = std::process::Command::new(program).args(args).exec();
    eprintln!("nixdispatch-gate: cannot run {program}: {e}");
    ExitCode::from(127)
}

/// The pipe size the relay asks for on its four pipes (1 MiB, Linux's default ceiling for
/// unprivileged processes, `/proc/sys/fs/pipe-max-size`): an upload then moves in 1 MiB
/// steps instead of 64 KiB ones, with a sixteenth of the wake-ups and system calls.
const PIPE_SIZE: usize = 1 << 20;

/// Grows a pipe's buffer to [`PIPE_SIZE`]; anything but a pipe, or a refusal, is ignored.
fn grow_pipe(fd: impl std::os::fd::AsFd) {
    let _ = rustix::pipe::fcntl_setpipe_size(fd, PIPE_SIZE);
}

/// The member's stdin, non-blocking when it is a pipe (as sshd gives it).
fn client_input() -> Box<dyn AsyncRead + Unpin + Send> {
    use std::os::fd::AsFd as _;
    grow_pipe(std::io::stdin());
    let pipe = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| tokio::net::unix::pipe::Receiver::from_file(std::fs::File::from(fd)));
    match pipe {
        Ok(p) => Box::new(p),
        Err(_) => Box::new(tokio::io::stdin()),
    }
}

/// The member's stdout, likewise.
fn client_output() -> Box<dyn AsyncWrite + Unpin + Send> {
    use std::os::fd::AsFd as _;
    grow_pipe(std::io::stdout());
    let pipe = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| tokio::net::unix::pipe::Sender::from_file(std::fs::File::from(fd)));
    match pipe {
        Ok(p) => Box::new(p),
        Err(_) => Box::new(tokio::io::stdout()),
    }
}

/// What the daemon's side has shown so far, for a client stream that needs its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServerSeen {
    Nothing,
    Version,
    /// Closed, or no longer followed: the client's side must not wait for it.
    Gone,
}

/// Lease keeper commands.
#[derive(Debug)]
enum LeaseCmd {
    /// A lease was granted for the build about to be forwarded.
    Hold {
        /// The lease id and its details, for keep-alives that re-attach it after a
        /// scheduler restart.
        lease: KeepAliveRequest,
        every: Duration,
        since: Instant,
    },
    /// The build's result is being sent.
    BuildDone { ok: bool },
}

/// What the client side of a session shares with the other tasks.
struct Shared<G> {
    session: Arc<Mutex<Session<G>>>,
    inject: mpsc::UnboundedSender<Vec<u8>>,
    leases: mpsc::UnboundedSender<LeaseCmd>,
    seen: watch::Receiver<ServerSeen>,
}

fn scheduler_client(config: &GateConfig) -> Scheduler {
    let c = match &config.agent_socket {
        // The agent's gate socket: no credential here, the agent adds the builder's.
        Some(socket) => ClientConfig::new(format!("unix:{}", socket.display())),
        None => {
            let mut c = ClientConfig::new(config.scheduler.clone());
            c.credential_file = config.credential_file.clone();
            c.ca_file = config.ca_file.clone();
            c.tls_domain = config.tls_domain.clone();
            c
        }
    };
    let mut c = c;
    c.connect_timeout = GateConfig::millis(config.timeouts.connect_millis);
    Scheduler::new(c, GateConfig::millis(config.timeouts.rpc_millis))
}

async fn relay<G: Grammar + Send + 'static>(
    session: Session<G>,
    program: &str,
    args: &[String],
    ctx: Ctx,
) -> Result<ExitCode, GateError> {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| GateError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    let child_in = child.stdin.take().expect("piped stdin");
    let child_out = child.stdout.take().expect("piped stdout");
    grow_pipe(&child_in);
    grow_pipe(&child_out);
    tracing::info!(member = %ctx.member, program, ?args, "session started");

    let session = Arc::new(Mutex::new(session));
    let (inject_tx, inject_rx) = mpsc::unbounded_channel();
    let (lease_tx, lease_rx) = mpsc::unbounded_channel();
    let (seen_tx, seen_rx) = watch::channel(ServerSeen::Nothing);
    let keeper = tokio::spawn(lease_keeper(scheduler_client(&ctx.config), lease_rx));
    let mut down = tokio::spawn(server_to_client(
        child_out,
        client_output(),
        session.clone(),
        inject_rx,
        lease_tx.clone(),
        seen_tx,
    ));
    let shared = Shared {
        session,
        inject: inject_tx,
        leases: lease_tx,
        seen: seen_rx,
    };
    let up = client_to_server(client_input(), child_in, &shared, &ctx);
    tokio::select! {
        end = up => {
            tracing::info!(?end, "client side ended");
            // The daemon saw its stdin close; let it finish what it sends, within a bound.
            let grace = GateConfig::millis(ctx.config.timeouts.exit_grace_millis);
            if tokio::time::timeout(grace, &mut down).await.is_err() {
                tracing::warn!("the daemon did not finish after the client left; killing it");
                let _ = child.start_kill();
                let _ = down.await;
            }
        }
        _ = &mut down => tracing::info!("daemon side ended"),
    }
    drop(shared);
    // Releases whatever lease is still held (bounded by the call timeout).
    let _ = keeper.await;
    let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(s)) => s,
        _ => {
            let _ = child.start_kill();
            child.wait().await.map_err(|source| GateError::Io {
                what: "waiting for the Nix program",
                source,
            })?
        }
    };
    tracing::info!(?status, "session over");
    Ok(ExitCode::from(
        status.code().map_or(1, |c| u8::try_from(c).unwrap_or(1)),
    ))
}

/// How the client's side of a session ended.
#[derive(Debug)]
enum UpEnd {
    /// The client closed its stdin (or reading it failed).
    ClientClosed,
    /// The daemon's stdin cannot be written any more.
    DaemonClosed,
    /// A build was refused and the protocol cannot say so in-stream.
    Refused,
}

async fn client_to_server<G: Grammar + Send + 'static>(
    input: Box<dyn AsyncRead + Unpin + Send>,
    child_in: ChildStdin,
    shared: &Shared<G>,
    ctx: &Ctx,
) -> UpEnd {
    let mut up = Up {
        input,
        child_in,
        sched: scheduler_client(&ctx.config),
        stash: Vec::new(),
        shared,
        ctx,
    };
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match up.input.read(&mut buf).await {
            Ok(0) | Err(_) => return UpEnd::ClientClosed,
            Ok(n) => n,
        };
        let mut result = up.feed(&buf[..n]).await;
        // Bytes the client sent while a build was held come after it.
        while result.is_ok() && !up.stash.is_empty() {
            let more = std::mem::take(&mut up.stash);
            result = up.feed(&more).await;
        }
        if let Err(end) = result {
            return end;
        }
    }
}

/// The client → daemon direction of a session.
struct Up<'a, G> {
    input: Box<dyn AsyncRead + Unpin + Send>,
    child_in: ChildStdin,
    sched: Scheduler,
    /// Client bytes read while a build was held, relayed after it.
    stash: Vec<u8>,
    shared: &'a Shared<G>,
    ctx: &'a Ctx,
}

impl<G: Grammar + Send + 'static> Up<'_, G> {
    /// Relays one chunk of client bytes.
    async fn feed(&mut self, data: &[u8]) -> Result<(), UpEnd> {
        let shared = self.shared;
        let write = |r: std::io::Result<()>| r.map_err(|_| UpEnd::DaemonClosed);
        let mut off = 0;
        // Input bytes to forward as they are, not written yet: consecutive steps that
        // forward input (an upload's framed chunks, 32 KiB each from Nix) become one write
        // per read instead of one per chunk. Flushed before anything else is written or
        // anything can wait, so the order of bytes never changes.
        let mut unsent = 0..0;
        while off < data.len() {
            let adv = shared
                .session
                .lock()
                .expect("session lock")
                .client_step(&data[off..]);
            let start = off;
            off += adv.consumed;
            let flush = !matches!(adv.forward, Forward::Nothing) || adv.event.is_some();
            if flush && !(matches!(adv.forward, Forward::Input) && unsent.end == start) {
                if !unsent.is_empty() {
                    write(self.child_in.write_all(&data[unsent]).await)?;
                }
                unsent = start..start;
            }
            match adv.forward {
                Forward::Nothing => {}
                Forward::Input => unsent.end = off,
                Forward::Bytes(b) => write(self.child_in.write_all(&b).await)?,
            }
            if adv.event.is_some() && !unsent.is_empty() {
                write(self.child_in.write_all(&data[unsent]).await)?;
                unsent = off..off;
            }
            match adv.event {
                None => {}
                Some(ClientEvent::Desync(reason)) => {
                    tracing::warn!(%reason, "lost the protocol's thread; passing the session through ungated");
                }
                Some(ClientEvent::NeedServer) => {
                    let mut seen = shared.seen.clone();
                    let state = seen
                        .wait_for(|s| *s != ServerSeen::Nothing)
                        .await
                        .map_or(ServerSeen::Gone, |s| *s);
                    if state == ServerSeen::Gone {
                        let rest = shared.session.lock().expect("session lock").pass_through();
                        write(self.child_in.write_all(&rest).await)?;
                    }
                }
                Some(ClientEvent::Build(op)) => {
                    let decision = tokio::select! {
                        d = wait_for_slot(&op, shared, self.ctx, &mut self.sched) => d,
                        () = watch_client(&mut self.input, &mut self.stash) => {
                            tracing::info!(drv = %op.drv_path, "the client left while its build waited");
                            return Err(UpEnd::ClientClosed);
                        }
                    };
                    match decision {
                        Decision::Go => {
                            let held = shared.session.lock().expect("session lock").release_held();
                            write(self.child_in.write_all(&held).await)?;
                        }
                        Decision::Refuse(text) => {
                            let refusal = shared
                                .session
                                .lock()
                                .expect("session lock")
                                .refuse_held(&text);
                            match refusal {
                                Some(bytes) => {
                                    let _ = shared.inject.send(bytes);
                                }
                                None => {
                                    eprintln!("{text}");
                                    return Err(UpEnd::Refused);
                                }
                            }
                        }
                    }
                }
            }
            if adv.consumed == 0 && shared.session.lock().expect("session lock").holding() {
                // Nothing can move while a build is held; the wait above ended it, so this
                // is unreachable in practice: never spin.
                break;
            }
        }
        if !unsent.is_empty() {
            write(self.child_in.write_all(&data[unsent]).await)?;
        }
        Ok(())
    }
}

/// Reads the client while a build is held, so that its leaving is noticed; what it sends
/// meanwhile is kept for after the build. Returns when the client is gone.
async fn watch_client(input: &mut Box<dyn AsyncRead + Unpin + Send>, stash: &mut Vec<u8>) {
    let mut side = vec![0u8; 64 * 1024];
    loop {
        match input.read(&mut side).await {
            Ok(0) | Err(_) => return,
            Ok(n) => stash.extend_from_slice(&side[..n]),
        }
    }
}

/// What to do with a held build.
#[derive(Debug)]
enum Decision {
    /// Forward it (with or without a lease).
    Go,
    /// Refuse it, with this text for the member.
    Refuse(String),
}

/// The derivation's system and features: from the operation, else from its `.drv` file in
/// this builder's store (uploaded before the build), else the fallback system.
async fn drv_info(op: &super::session::BuildOp, config: &GateConfig) -> drv::DrvInfo {
    if let Some(info) = &op.info {
        return info.clone();
    }
    let path = PathBuf::from(&op.drv_path);
    let inside = path.starts_with(&config.store_dir)
        && path.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
    let text = if inside {
        tokio::task::spawn_blocking(move || {
            use std::io::Read as _;
            let mut text = Vec::new();
            std::fs::File::open(&path)
                .and_then(|f| f.take(MAX_DRV_FILE).read_to_end(&mut text))
                .map(|_| text)
        })
        .await
        .ok()
        .and_then(Result::ok)
    } else {
        None
    };
    match text.as_deref().map(drv::parse_aterm) {
        Some(Ok(info)) => info,
        other => {
            tracing::info!(drv = %op.drv_path, ?other, "no readable .drv; asking for the fallback system");
            drv::DrvInfo {
                system: config.fallback_system.clone(),
                required_features: Vec::new(),
            }
        }
    }
}

/// How many times in a row a `WaitForLease` stream may break before the scheduler counts as
/// unreachable for this build (fail open or closed): a restart breaks it once, and the
/// waiter re-enters the queue by calling again.
const MAX_BREAKS: u32 = 3;

/// Waits in the scheduler's queue, pinned to this host, until it grants a slot (or cannot
/// queue the build), telling the member where they stand. `WaitForLease` first; with a
/// scheduler that predates it, `Acquire` polls.
async fn wait_for_slot<G: Grammar>(
    op: &super::session::BuildOp,
    shared: &Shared<G>,
    ctx: &Ctx,
    sched: &mut Scheduler,
) -> Decision {
    let info = drv_info(op, &ctx.config).await;
    let t = &ctx.config.timeouts;
    let started = Instant::now();
    let mut exclude: Vec<String> = Vec::new();
    let mut shown: Option<(u32, Duration)> = None;
    let show = |text: String| {
        let bytes = shared.session.lock().expect("session lock").progress(&text);
        match bytes {
            Some(b) => {
                let _ = shared.inject.send(b);
            }
            // ssh stores: stderr reaches the member (or the build log); the build operation
            // was seen, so the member's Nix is reading it.
            None => eprintln!("{text}"),
        }
    };
    let fail = |why: String| {
        if ctx.config.fail_closed {
            Decision::Refuse(format!(
                "nixdispatch-gate: build refused on {}: {why}",
                ctx.host_id
            ))
        } else {
            tracing::warn!(drv = %op.drv_path, %why, "building unqueued (fail open)");
            Decision::Go
        }
    };
    tracing::info!(drv = %op.drv_path, op = op.op, system = %info.system, features = ?info.required_features, "build held");
    let silence = GateConfig::millis(t.wait_silence_millis);
    // `None` with `streaming`: a stream to (re)open.
    let mut stream = None;
    let mut streaming = true;
    let mut breaks = 0;
    loop {
        let verdict = if streaming {
            if stream.is_none() {
                let request = WaitForLeaseRequest {
                    system: info.system.clone(),
                    required_features: info.required_features.clone(),
                    drv_path: op.drv_path.clone(),
                    client_id: ctx.member.clone(),
                    can_build_locally: false,
                    exclude_hosts: exclude.clone(),
                    pin_host_id: ctx.host_id.clone(),
                };
                match sched.open_wait(request).await {
                    Opened::Stream(s) => stream = Some(s),
                    Opened::Unsupported => {
                        tracing::info!("the scheduler predates WaitForLease; polling Acquire");
                        streaming = false;
                        continue;
                    }
                    Opened::Unreachable(error) => {
                        return fail(format!("scheduler unreachable: {error}"));
                    }
                }
            }
            let s = stream.as_mut().expect("opened above");
            let v = sched.next_event(s, &ctx.host_id, silence).await;
            if !matches!(v, Verdict::Queued { .. }) {
                // A final answer or a break: the stream is done either way.
                stream = None;
            }
            v
        } else {
            let request = AcquireRequest {
                system: info.system.clone(),
                required_features: info.required_features.clone(),
                drv_path: op.drv_path.clone(),
                client_id: ctx.member.clone(),
                can_build_locally: false,
                exclude_hosts: exclude.clone(),
                pin_host: ctx.host_id.clone(),
            };
            sched.acquire(request, &ctx.host_id).await
        };
        // Tells the member where the build stands, when due: a stream's estimate or a
        // poll's position, worded alike.
        let mut progress = |position: u32, estimate: Option<Duration>, reason: &str| {
            let now = started.elapsed();
            let every = GateConfig::millis(t.progress_every_millis);
            if wait::should_show(shown, position, now, every) {
                show(wait::waiting_text(
                    &ctx.host_id,
                    position,
                    now,
                    estimate,
                    reason,
                ));
                shown = Some((position, now));
            }
        };
        match verdict {
            Verdict::Granted {
                lease_id,
                attached: true,
                ..
            } => {
                // The member's build hook leased this host for this derivation and keeps
                // the lease: the build is counted once, by the hook.
                tracing::info!(drv = %op.drv_path, %lease_id, "attached to the hook's lease");
                return Decision::Go;
            }
            Verdict::Granted {
                lease_id,
                keep_alive_every,
                attached: false,
            } => {
                tracing::info!(drv = %op.drv_path, %lease_id, waited_ms = started.elapsed().as_millis() as u64, "slot granted");
                if shown.is_some() {
                    show(wait::granted_text(&ctx.host_id, started.elapsed()));
                }
                let _ = shared.leases.send(LeaseCmd::Hold {
                    lease: KeepAliveRequest {
                        lease_id,
                        host_id: ctx.host_id.clone(),
                        client_id: ctx.member.clone(),
                        system: info.system.clone(),
                        drv_path: op.drv_path.clone(),
                    },
                    every: keep_alive_every,
                    since: Instant::now(),
                });
                return Decision::Go;
            }
            Verdict::Elsewhere { host_id } => {
                // The scheduler cannot be asked for one host yet: hand the slot back and ask
                // again without that host, until only this one is left.
                if exclude.contains(&host_id) || exclude.len() >= 64 {
                    return fail(format!("the scheduler keeps offering {host_id}"));
                }
                exclude.push(host_id);
            }
            Verdict::Queued {
                position,
                estimate,
                reason,
            } => {
                breaks = 0;
                progress(position, Some(estimate), &reason);
            }
            Verdict::Broken { error } => {
                breaks += 1;
                tracing::info!(drv = %op.drv_path, %error, breaks, "the wait stream broke");
                if breaks >= MAX_BREAKS {
                    return fail(format!("scheduler unreachable: {error}"));
                }
            }
            Verdict::Wait {
                retry_after,
                position,
                reason,
            } => {
                progress(position, None, &reason);
                tokio::time::sleep(wait::poll_delay(
                    retry_after,
                    GateConfig::millis(t.poll_min_millis),
                    GateConfig::millis(t.poll_max_millis),
                ))
                .await;
            }
            Verdict::NotQueued { reason } => {
                return fail(format!("the scheduler will not queue it: {reason}"));
            }
            Verdict::Unreachable { error } => {
                return fail(format!("scheduler unreachable: {error}"));
            }
        }
    }
}

async fn server_to_client<G: Grammar + Send + 'static>(
    mut child_out: ChildStdout,
    mut out: Box<dyn AsyncWrite + Unpin + Send>,
    session: Arc<Mutex<Session<G>>>,
    mut inject: mpsc::UnboundedReceiver<Vec<u8>>,
    leases: mpsc::UnboundedSender<LeaseCmd>,
    seen: watch::Sender<ServerSeen>,
) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        tokio::select! {
            r = child_out.read(&mut buf) => {
                let n = match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let events = session.lock().expect("session lock").server_observe(&buf[..n]);
                for e in events {
                    match e {
                        ServerEvent::Version => {
                            seen.send_replace(ServerSeen::Version);
                        }
                        ServerEvent::HandshakeDone => tracing::debug!("handshake done"),
                        ServerEvent::BuildDone { ok } => {
                            tracing::info!(ok, "build result sent; releasing the slot");
                            let _ = leases.send(LeaseCmd::BuildDone { ok });
                        }
                        ServerEvent::Desync(reason) => {
                            tracing::warn!(%reason, "no longer following the daemon's stream");
                            seen.send_replace(ServerSeen::Gone);
                        }
                    }
                }
                if out.write_all(&buf[..n]).await.is_err() || out.flush().await.is_err() {
                    break;
                }
            }
            Some(bytes) = inject.recv() => {
                if out.write_all(&bytes).await.is_err() || out.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    seen.send_replace(ServerSeen::Gone);
}

/// Keeps the session's lease alive and releases it when the build's result went back, or
/// when the session ends (the channel closes).
async fn lease_keeper(mut sched: Scheduler, mut cmds: mpsc::UnboundedReceiver<LeaseCmd>) {
    let mut current: Option<(KeepAliveRequest, Duration, Instant)> = None;
    loop {
        let every = current.as_ref().map(|c| c.1);
        let tick = async move {
            match every {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(LeaseCmd::Hold { lease, every, since }) => {
                    if let Some((old, _, at)) = current.replace((lease, every, since)) {
                        sched.release(&old.lease_id, BuildOutcome::Cancelled, at.elapsed()).await;
                    }
                }
                Some(LeaseCmd::BuildDone { ok }) => {
                    if let Some((lease, _, at)) = current.take() {
                        let outcome = if ok { BuildOutcome::Succeeded } else { BuildOutcome::BuildFailed };
                        sched.release(&lease.lease_id, outcome, at.elapsed()).await;
                    }
                }
                None => {
                    if let Some((lease, _, at)) = current.take() {
                        sched.release(&lease.lease_id, BuildOutcome::Cancelled, at.elapsed()).await;
                    }
                    return;
                }
            },
            () = tick => {
                if let Some((lease, every, _)) = &mut current {
                    match sched.keep_alive(lease).await {
                        // A grant from the queue starts with a short claim window; the
                        // first keep-alive gives the full TTL.
                        Ok(next) => *every = next,
                        // After a scheduler restart: `NOT_FOUND` until this host's agent has
                        // registered again; the next keep-alive re-attaches the lease.
                        Err(error) => tracing::warn!(lease_id = %lease.lease_id, %error, "keep-alive failed"),
                    }
                }
            }
        }
    }
}
