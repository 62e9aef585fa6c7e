//! The text-protocol front end and the hook's I/O: the conversation with the daemon on fds 0
//! and 2, and the child build-remote. The lease's lifecycle after an accept is `lease`'s,
//! reached through [`TextBuild`]'s `Frontend` implementation; all decisions come from the
//! pure modules.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::codec::{self, BuildInputs, ChildLine, Level, Reply, Request, Settings, TryRequest};
use super::config::{self, HookConfig};
use super::decision::{self, Action, Answer, BuildRemote, ChildEnd};
use super::lease::{Frontend, Leases};
use super::machine::{BuilderAddress, Grant};
use super::scheduler::error_chain;
use super::ssh::Masters;

/// Where the conversation is, for the top-level panic handler: it decides what can still be
/// said to the daemon without breaking the protocol.
static PHASE: AtomicU8 = AtomicU8::new(PHASE_IDLE);
/// No `try` is waiting for an answer.
const PHASE_IDLE: u8 = 0;
/// A `try` was (being) read and not answered yet: `# decline` is still a valid answer.
const PHASE_AWAITING_REPLY: u8 = 1;
/// The hook said `# accept`: only the exit status is left.
const PHASE_ACCEPTED: u8 = 2;

/// Writes to the daemon on fd 2. Errors are ignored: if the daemon is gone there is no one
/// left to tell.
fn emit(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(text.as_bytes());
    let _ = err.flush();
}

fn emit_msg(level: Level, msg: &str) {
    emit(&codec::nix_msg(level, msg));
}

/// The hook's entry point (`nixdispatch-hook`). Never panics into Nix: a panic before an
/// accept answers `# decline` (to that `try` and every later one), after an accept it is an
/// `@nix` error and exit status 1.
pub fn main() -> ExitCode {
    // The default hook prints plain text on fd 2, which is the daemon's control channel.
    std::panic::set_hook(Box::new(|info| tracing::error!(%info, "panic")));
    let args: Vec<String> = std::env::args().skip(1).collect();
    match std::panic::catch_unwind(|| run(&args)) {
        Ok(code) => code,
        Err(_) => match PHASE.load(Ordering::SeqCst) {
            PHASE_ACCEPTED => {
                emit_msg(
                    Level::Error,
                    "nixdispatch: internal error in the build hook (see its log file)",
                );
                ExitCode::from(1)
            }
            phase => {
                if phase == PHASE_AWAITING_REPLY {
                    emit_msg(
                        Level::Error,
                        "nixdispatch: internal error in the build hook; building locally",
                    );
                    emit(&Reply::Decline.render());
                }
                answer_all(&mut std::io::stdin().lock(), &Reply::Decline)
            }
        },
    }
}

/// Answers every further `try` with `reply` until the daemon is done.
fn answer_all(input: &mut impl Read, reply: &Reply) -> ExitCode {
    loop {
        match codec::read_request(input) {
            Ok(Request::Try(_)) => emit(&reply.render()),
            Ok(Request::Exit) => return ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "bad request from the daemon");
                return ExitCode::from(1);
            }
        }
    }
}

fn init_tracing(config: &HookConfig) {
    crate::diag::init_file_logging(config.log_file.as_deref(), &config.log_level);
}

/// What every part of one hook run needs.
struct Ctx {
    config: HookConfig,
    settings: Settings,
    /// The hook's own arguments (Nix's verbosity), passed on to the child.
    args: Vec<String>,
    build_remote: BuildRemote,
    /// The SSH master connections the child joins; `None` when reuse is off.
    masters: Option<Masters>,
}

fn run(args: &[String]) -> ExitCode {
    let path = HookConfig::path_from_env(std::env::var(config::CONFIG_ENV).ok().as_deref());
    let config = HookConfig::load(&path);
    if let Ok(c) = &config {
        init_tracing(c);
    }
    // Several hooks log to one file at once: the pid tells their lines apart.
    let _span = tracing::info_span!("hook", pid = std::process::id()).entered();
    let mut input = std::io::stdin().lock();
    let settings = match codec::read_settings(&mut input) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the settings handshake");
            return ExitCode::from(1);
        }
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => return disabled(&mut input, &error_chain(&e)),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return disabled(&mut input, &format!("cannot start its runtime: {e}")),
    };
    let build_remote = match &config.build_remote {
        Some(words) => BuildRemote {
            program: PathBuf::from(&words[0]),
            args: words[1..].to_vec(),
        },
        None => decision::detect_build_remote(&nix_binaries(), Path::exists),
    };
    tracing::info!(?build_remote, scheduler = %config.scheduler, "hook started");
    let mut leases = Leases::new(&config);
    let masters = Masters::new(&config);
    let ctx = Ctx {
        config,
        settings,
        args: args.to_vec(),
        build_remote,
        masters,
    };
    let mut warned_unreachable = false;
    loop {
        PHASE.store(PHASE_AWAITING_REPLY, Ordering::SeqCst);
        let t = match codec::read_request(&mut input) {
            Ok(Request::Try(t)) => t,
            Ok(Request::Exit) => return ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "bad request from the daemon");
                return ExitCode::from(1);
            }
        };
        let local = decision::can_build_locally(&t, &ctx.settings);
        let started = Instant::now();
        let answer = runtime.block_on(leases.acquire(&t, local));
        tracing::info!(drv = %t.drv_path, ?answer, millis = started.elapsed().as_millis(), "try answered");
        let unreachable = matches!(answer, Answer::Unreachable { .. });
        match decision::decide_waiting(&t, answer, ctx.config.fallback_builders.is_some(), local) {
            Action::Reply {
                reply,
                mut level,
                message,
            } => {
                // Say once per hook that the scheduler is down, not once per derivation.
                if unreachable {
                    if warned_unreachable {
                        level = Level::Talkative;
                    }
                    warned_unreachable = true;
                }
                emit(&(codec::nix_msg(level, &message) + &reply.render()));
                PHASE.store(PHASE_IDLE, Ordering::SeqCst);
            }
            Action::Fallback { message } => {
                emit_msg(Level::Warn, &message);
                return fallback(&ctx, &t, &mut input);
            }
            Action::AcceptAndWait { message } => {
                let Some(inputs) = accept(&message, decision::WAITING_MACHINE, &mut input) else {
                    return ExitCode::from(1);
                };
                drop(input);
                let mut frontend = TextBuild {
                    ctx: &ctx,
                    t: &t,
                    inputs: &inputs,
                };
                let code = runtime.block_on(async {
                    match leases.wait_for_grant(&mut frontend, &t).await {
                        Ok(grant) => {
                            let message = decision::building(&t, &grant);
                            frontend.notify(Level::Info, &message);
                            leases.build(&mut frontend, grant, &t).await
                        }
                        Err(why) => frontend.without_lease(&why).await,
                    }
                });
                return exit_code(Some(code));
            }
            Action::Accept { grant, message } => {
                let Some(inputs) = accept(&message, &grant.store_uri, &mut input) else {
                    runtime.block_on(leases.cancel(&grant));
                    return ExitCode::from(1);
                };
                drop(input);
                let mut frontend = TextBuild {
                    ctx: &ctx,
                    t: &t,
                    inputs: &inputs,
                };
                let code = runtime.block_on(leases.build(&mut frontend, grant, &t));
                return exit_code(Some(code));
            }
        }
    }
}

/// Answers `# accept` naming `machine`, with `message` for the user, and reads the inputs
/// that follow; `None` (logged) when they cannot be read.
fn accept(message: &str, machine: &str, input: &mut impl Read) -> Option<BuildInputs> {
    emit(
        &(codec::nix_msg(Level::Info, message)
            + &Reply::Accept {
                machine: machine.to_owned(),
            }
            .render()),
    );
    PHASE.store(PHASE_ACCEPTED, Ordering::SeqCst);
    codec::read_build_inputs(input)
        .map_err(|e| tracing::error!(error = %e, "cannot read the inputs after accept"))
        .ok()
}

/// The configuration cannot be used: this client has no builders, so the first `try` gets
/// `# decline-permanently` (Nix stops asking) and an error saying why.
fn disabled(input: &mut impl Read, problem: &str) -> ExitCode {
    let (reply, level, message) = decision::unusable(problem);
    match codec::read_request(input) {
        Ok(Request::Try(_)) => emit(&(codec::nix_msg(level, &message) + &reply.render())),
        Ok(Request::Exit) => return ExitCode::SUCCESS,
        Err(_) => return ExitCode::from(1),
    }
    answer_all(input, &reply)
}

/// Candidate `nix` binaries, best first: the executable of the process that started the hook
/// (the daemon, or `nix-build` itself in single-user mode), then `nix` on `PATH`.
fn nix_binaries() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let parent = std::os::unix::process::parent_id();
    if let Ok(exe) = std::fs::read_link(format!("/proc/{parent}/exe"))
        && exe
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("nix"))
    {
        out.push(exe);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if let Ok(real) = dir.join("nix").canonicalize() {
                out.push(real);
                break;
            }
        }
    }
    out
}

/// The scheduler is unreachable and fallback machines are configured: become the stock hook
/// with `builders` set to them, for this `try` and every later one. The child answers the
/// daemon directly on the inherited fd 2.
fn fallback(ctx: &Ctx, t: &TryRequest, input: &mut impl Read) -> ExitCode {
    let builders = ctx.config.fallback_builders.as_deref().unwrap_or_default();
    let mut child = match std::process::Command::new(&ctx.build_remote.program)
        .args(&ctx.build_remote.args)
        .args(&ctx.args)
        .stdin(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let message = format!(
                "nixdispatch: cannot start {}: {e}",
                ctx.build_remote.program.display()
            );
            emit(&(codec::nix_msg(Level::Error, &message) + &Reply::Decline.render()));
            return answer_all(input, &Reply::Decline);
        }
    };
    // From here on the child owns the conversation: a panic must not answer for it.
    PHASE.store(PHASE_ACCEPTED, Ordering::SeqCst);
    if let Some(mut stdin) = child.stdin.take() {
        let prelude = decision::child_prelude(&ctx.settings, builders, t);
        // A write error means the child exited; its status says the rest.
        if stdin.write_all(&prelude).is_ok() {
            let _ = std::io::copy(input, &mut stdin);
        }
    }
    match child.wait() {
        Ok(status) => exit_code(status.code()),
        Err(_) => ExitCode::from(1),
    }
}

fn exit_code(code: Option<i32>) -> ExitCode {
    match code {
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => ExitCode::from(1),
    }
}

/// The text-protocol front end of one accepted build: the stock build-remote as a child,
/// fed the rewritten handshake, the `try` and the inputs.
struct TextBuild<'a> {
    ctx: &'a Ctx,
    t: &'a TryRequest,
    inputs: &'a BuildInputs,
}

impl Frontend for TextBuild<'_> {
    fn notify(&mut self, level: Level, message: &str) {
        emit_msg(level, message);
    }

    fn connects_ahead(&self) -> bool {
        self.ctx
            .masters
            .as_ref()
            .is_some_and(Masters::connect_ahead_due)
    }

    fn connect_ahead(&mut self, hosts: &[BuilderAddress]) {
        let Some(masters) = &self.ctx.masters else {
            return;
        };
        let identity = self.identity();
        for h in hosts {
            masters.ensure(
                &h.host_id,
                &h.store_uri,
                &h.host_public_key_base64,
                identity.as_deref(),
            );
        }
    }

    async fn attempt(&mut self, grant: &Grant) -> Result<(ChildEnd, String), String> {
        let identity = self.identity();
        let machines = grant.machines_line(identity.as_deref());
        let sshopts = self
            .ctx
            .masters
            .as_ref()
            .and_then(|m| m.prepare(grant, identity.as_deref()));
        let result = run_child(self.ctx, &machines, self.t, self.inputs, sshopts.as_deref()).await;
        if sshopts.is_some() && matches!(result, Ok((ChildEnd::NotAccepted, _))) {
            // The master may have died with the builder's restart before it noticed (a
            // refused session alone makes OpenSSH connect directly by itself): a shared
            // connection must never fail a build, so try the host once more on its own.
            tracing::warn!(host = %grant.host_id, "build-remote could not start through the SSH master; connecting directly");
            return run_child(self.ctx, &machines, self.t, self.inputs, None).await;
        }
        result
    }
}

impl TextBuild<'_> {
    /// The SSH identity of the machines line, if configured.
    fn identity(&self) -> Option<String> {
        self.ctx
            .config
            .ssh_identity
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned())
    }

    /// An accepted build got no lease (`why`): the fallback builders build it through the
    /// stock build-remote when configured; otherwise it fails, saying why. Returns the exit
    /// status.
    async fn without_lease(&mut self, why: &str) -> i32 {
        let name = decision::drv_name(&self.t.drv_path).to_owned();
        let Some(builders) = self.ctx.config.fallback_builders.clone() else {
            emit_msg(
                Level::Error,
                &format!("nixdispatch: cannot build {name}: {why}"),
            );
            return 1;
        };
        emit_msg(
            Level::Warn,
            &format!("nixdispatch: no builder for {name} ({why}); using the fallback builders"),
        );
        match run_child(self.ctx, &builders, self.t, self.inputs, None).await {
            Ok((ChildEnd::Exited(Some(code)), _)) => code,
            Ok((ChildEnd::Exited(None), _)) => 1,
            Ok((ChildEnd::NotAccepted, detail)) => {
                emit_msg(
                    Level::Error,
                    &format!("nixdispatch: the fallback builders cannot build {name}: {detail}"),
                );
                1
            }
            Err(e) => {
                emit_msg(Level::Error, &format!("nixdispatch: {e}"));
                1
            }
        }
    }
}

/// Where the child is in its conversation.
#[derive(Debug, PartialEq, Eq)]
enum ChildState {
    BeforeAccept,
    ExpectMachine,
    Accepted,
    Refused,
}

/// Runs one stock build-remote on `machines` (the granted host's line, or the fallback
/// builders): feeds it the rewritten handshake and the `try`, consumes its control lines,
/// passes its `@nix` lines on. `sshopts`, when set, is the child's `NIX_SSHOPTS` (joining an
/// SSH master). Returns how it ended and, when it never accepted, the messages it gave
/// about why.
async fn run_child(
    ctx: &Ctx,
    machines: &str,
    t: &TryRequest,
    inputs: &BuildInputs,
    sshopts: Option<&str>,
) -> Result<(ChildEnd, String), String> {
    tracing::info!(%machines, shared_connection = sshopts.is_some(), "starting build-remote");
    // One pipe for the child's stdout and stderr: both are the daemon's channel for a hook.
    let (reader, writer) = std::io::pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
    let writer2 = writer
        .try_clone()
        .map_err(|e| format!("cannot create a pipe: {e}"))?;
    let mut cmd = tokio::process::Command::new(&ctx.build_remote.program);
    // fds 4 (build log) and 5 (its read end) are inherited as they are: the child writes the
    // log and reads ssh's error text there itself.
    cmd.args(&ctx.build_remote.args)
        .args(&ctx.args)
        .stdin(Stdio::piped())
        .stdout(writer2)
        .stderr(writer)
        .kill_on_drop(true);
    if let Some(v) = sshopts {
        cmd.env("NIX_SSHOPTS", v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", ctx.build_remote.program.display()))?;
    // The command holds the pipe's write ends: drop it so the pipe ends with the child.
    drop(cmd);
    let mut stdin = child.stdin.take();

    let (tx, mut lines) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).split(b'\n') {
            let Ok(line) = line else { break };
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });

    if let Some(s) = stdin.as_mut() {
        // Small (the settings and one `try`): the child reads all of it before it answers.
        if let Err(e) = s
            .write_all(&decision::child_prelude(&ctx.settings, machines, t))
            .await
        {
            tracing::warn!(error = %e, "cannot write to build-remote");
        }
    }

    let mut state = ChildState::BeforeAccept;
    let mut early_logs: Vec<String> = Vec::new();
    let mut status = None;
    let mut lines_open = true;
    let mut writer_task = None;
    loop {
        tokio::select! {
            line = lines.recv(), if lines_open => match line {
                None => lines_open = false,
                Some(line) => {
                    match (&state, codec::classify_child_line(&line)) {
                        (ChildState::BeforeAccept, ChildLine::Accept) => {
                            tracing::info!("build-remote accepted");
                            state = ChildState::ExpectMachine;
                        }
                        (ChildState::BeforeAccept, ChildLine::Decline | ChildLine::Postpone | ChildLine::DeclinePermanently) => {
                            // It could not use the host; EOF on its stdin makes it exit 0.
                            state = ChildState::Refused;
                            stdin = None;
                        }
                        (ChildState::BeforeAccept, ChildLine::Log(l)) => early_logs.push(l),
                        (ChildState::ExpectMachine, _) => {
                            // The machine name line; the daemon already has ours.
                            state = ChildState::Accepted;
                            for l in early_logs.drain(..) {
                                emit(&(l + "\n"));
                            }
                            if let Some(mut s) = stdin.take() {
                                let bytes = decision::child_inputs(inputs);
                                writer_task = Some(tokio::spawn(async move {
                                    let _ = s.write_all(&bytes).await;
                                    let _ = s.shutdown().await;
                                }));
                            }
                        }
                        (ChildState::Accepted, ChildLine::Log(l)) => {
                            tracing::debug!(line = %l, "build-remote says");
                            emit(&(l + "\n"));
                        }
                        (_, other) => tracing::debug!(?other, "child line not passed on"),
                    }
                }
            },
            s = child.wait(), if status.is_none() => {
                status = Some(s.map_err(|e| format!("waiting for build-remote: {e}"))?);
                tracing::info!(status = ?status, "build-remote exited");
            }
        }
        if status.is_some() {
            if lines_open {
                // A grandchild (ssh) may hold the pipe open: take what comes within a moment.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                while let Ok(Some(line)) = tokio::time::timeout_at(deadline, lines.recv()).await {
                    if state == ChildState::Accepted
                        && let ChildLine::Log(l) = codec::classify_child_line(&line)
                    {
                        emit(&(l + "\n"));
                    } else if let ChildLine::Log(l) = codec::classify_child_line(&line) {
                        early_logs.push(l);
                    }
                }
            }
            break;
        }
    }
    if let Some(task) = writer_task {
        task.abort();
    }
    let code = status.and_then(|s| s.code());
    if state == ChildState::Accepted {
        return Ok((ChildEnd::Exited(code), String::new()));
    }
    // Its errors say why ("cannot build on ..."); its warnings repeat the machines list.
    let messages: Vec<(u64, String)> = early_logs
        .iter()
        .filter_map(|l| codec::log_line_msg(l))
        .collect();
    let errors: Vec<&str> = messages
        .iter()
        .filter(|(level, _)| *level == Level::Error as u64)
        .map(|(_, m)| m.as_str())
        .collect();
    let mut detail = if errors.is_empty() {
        messages
            .iter()
            .map(|(_, m)| m.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    } else {
        errors.join("; ")
    };
    if detail.len() > 600 {
        let mut cut = 600;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push('…');
    }
    Ok((ChildEnd::NotAccepted, detail))
}
