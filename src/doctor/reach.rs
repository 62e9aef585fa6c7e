//! The doctor's network I/O: asks the scheduler, as the hook would (its configuration, the
//! shared client of `crate::client`), for the builders its member may be sent to, then runs
//! the member's `ssh` against each of them with the pinned host key. What happens is handed
//! to the pure judges in [`super::remote`]; nothing here decides what is wrong.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;

use super::Check;
use super::remote::{
    BuilderResult, SchedulerOutcome, SshOutcome, SshTarget, builder_check, scheduler_check,
};
use crate::client::{self, ClientConfig, ClientError, Prepared};
use crate::diag::error_chain;
use crate::hook::config::HookConfig;
use crate::proto;

/// Bound on connecting to the scheduler: longer than the hook's own (a doctor may wait;
/// the daemon may not), so that a slow link is told apart from a dead one.
const SCHEDULER_CONNECT: Duration = Duration::from_secs(5);
/// Bound on the `ListBuilders` call.
const SCHEDULER_CALL: Duration = Duration::from_secs(10);
/// `ssh`'s `ConnectTimeout`, seconds.
const SSH_CONNECT_SECS: u64 = 10;
/// Bound on one whole `ssh` run (connect, login, `nix-daemon --version`).
const SSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything beyond this machine: the scheduler's check, then the SSH identity's when it
/// cannot be read, then one check per builder the member may be sent to, with `sshopts`
/// (the daemon's `NIX_SSHOPTS`) before ssh's other arguments, as Nix puts them.
pub async fn checks(config: &HookConfig, sshopts: &str) -> Vec<Check> {
    let (outcome, builders) = scheduler(config).await;
    let mut out = vec![scheduler_check(&config.scheduler, &outcome)];
    let identity = config
        .ssh_identity
        .as_deref()
        .map(|p| p.display().to_string());
    if let Some(path) = &config.ssh_identity
        && let Err(e) = std::fs::File::open(path)
    {
        out.push(Check {
            name: "ssh-identity".into(),
            status: super::Status::Fail,
            summary: format!("cannot read `ssh_identity` {}: {e}", path.display()),
            fix: Some(if e.kind() == std::io::ErrorKind::PermissionDenied {
                "run the doctor as the user nix-daemon runs as (root), who reads the key".into()
            } else {
                "set `ssh_identity` in the hook's configuration to the private key the \
                 builders authorized"
                    .into()
            }),
        });
    }
    let mut runs = tokio::task::JoinSet::new();
    for (i, b) in builders.into_iter().enumerate() {
        let (identity, sshopts) = (identity.clone(), sshopts.to_owned());
        runs.spawn(async move {
            let outcome = ssh(&b, identity.as_deref(), &sshopts).await;
            let result = BuilderResult {
                host_id: b.host_id,
                store_uri: b.store_uri,
                unavailable_reason: b.unavailable_reason,
                outcome,
            };
            (i, builder_check(&result, identity.as_deref()))
        });
    }
    let mut checked: Vec<(usize, Check)> = runs.join_all().await;
    checked.sort_by_key(|(i, _)| *i);
    out.extend(checked.into_iter().map(|(_, c)| c));
    out
}

/// Asks the scheduler for the member's builders with the hook's configuration.
pub async fn scheduler(config: &HookConfig) -> (SchedulerOutcome, Vec<proto::Builder>) {
    let client_config = ClientConfig {
        endpoint: config.scheduler.clone(),
        credential_file: config.credential_file.clone(),
        connect_timeout: SCHEDULER_CONNECT,
        request_timeout: Some(SCHEDULER_CALL),
        ca_file: config.ca_file.clone(),
        tls_domain: config.tls_domain.clone(),
        keepalive: None,
    };
    let prepared = match Prepared::new(&client_config) {
        Ok(p) => p,
        Err(e) => return (unusable(&e), Vec::new()),
    };
    let channel = match prepared.connect().await {
        Ok(c) => c,
        Err(e) => return (unreachable_or_tls(&error_chain(&e)), Vec::new()),
    };
    let mut lease = client::lease_client(channel);
    match lease.list_builders(proto::ListBuildersRequest {}).await {
        Ok(r) => {
            let r = r.into_inner();
            (
                SchedulerOutcome::Accepted {
                    member: r.member,
                    builders: r.builders.len(),
                },
                r.builders,
            )
        }
        Err(s) => {
            let message = s.message().to_owned();
            let outcome = match s.code() {
                tonic::Code::Unauthenticated => SchedulerOutcome::Unauthenticated(message),
                tonic::Code::PermissionDenied => SchedulerOutcome::PermissionDenied(message),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                    unreachable_or_tls(&error_chain(&s))
                }
                code => SchedulerOutcome::Failed {
                    code: format!("{code:?}"),
                    message,
                },
            };
            (outcome, Vec::new())
        }
    }
}

/// A connection failure, told apart by its error chain: TLS's own words, or anything else.
fn unreachable_or_tls(chain: &str) -> SchedulerOutcome {
    let lower = chain.to_lowercase();
    let tls = [
        "certificate",
        "tls",
        "handshake",
        "unknownissuer",
        "invalid peer",
        "alert",
    ]
    .iter()
    .any(|w| lower.contains(w));
    if tls {
        SchedulerOutcome::Tls(chain.to_owned())
    } else {
        SchedulerOutcome::Unreachable(chain.to_owned())
    }
}

/// The hook's client settings cannot be used: which file or key, and what to change.
fn unusable(e: &ClientError) -> SchedulerOutcome {
    let problem = error_chain(e);
    let as_root = |source: &std::io::Error, other: &str| {
        if source.kind() == std::io::ErrorKind::PermissionDenied {
            "run the doctor as the user nix-daemon runs as (root), who reads the file".to_owned()
        } else {
            other.to_owned()
        }
    };
    let fix = match e {
        ClientError::InvalidEndpoint { .. } => {
            "set `scheduler` to the scheduler's http:// or https:// URL".to_owned()
        }
        ClientError::Credential { source, .. } => as_root(
            source,
            "set `credential_file` to the file holding your member token",
        ),
        ClientError::BadToken { .. } => {
            "the credential file must hold the token alone, on one line".to_owned()
        }
        ClientError::Ca { source, .. } => as_root(
            source,
            "set `ca_file` to the PEM of the CA that signed the scheduler's certificate",
        ),
        ClientError::MissingCa { .. } => {
            "set `ca_file` to the PEM of the CA that signed the scheduler's certificate".to_owned()
        }
        ClientError::Tls { .. } | ClientError::Connect { .. } => {
            "check `ca_file` and `tls_domain` in the hook's configuration".to_owned()
        }
    };
    SchedulerOutcome::Config { problem, fix }
}

/// Runs the member's `ssh` against `b` with only its pinned key trusted.
async fn ssh(b: &proto::Builder, identity: Option<&str>, sshopts: &str) -> SshOutcome {
    let target = match SshTarget::parse(&b.store_uri) {
        Ok(t) => t,
        Err(e) => return SshOutcome::Other(e),
    };
    let key = match base64::engine::general_purpose::STANDARD
        .decode(&b.host_public_key_base64)
        .ok()
        .and_then(|k| String::from_utf8(k).ok())
    {
        Some(k) if crate::validate::host_key(&k).is_ok() => k,
        _ => {
            return SshOutcome::Other(
                "the scheduler's pinned host key is not an OpenSSH public key".to_owned(),
            );
        }
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return SshOutcome::Other(format!("cannot make a temporary directory: {e}")),
    };
    let known_hosts = dir.path().join("known_hosts");
    if let Err(e) = std::fs::write(&known_hosts, target.known_hosts_line(&key)) {
        return SshOutcome::Other(format!("cannot write {}: {e}", known_hosts.display()));
    }
    run_ssh(&target, &known_hosts, identity, sshopts).await
}

async fn run_ssh(
    target: &SshTarget,
    known_hosts: &Path,
    identity: Option<&str>,
    sshopts: &str,
) -> SshOutcome {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(sshopts.split_whitespace())
        .args(target.ssh_args(
            &known_hosts.display().to_string(),
            identity,
            SSH_CONNECT_SECS,
        ))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(SSH_TIMEOUT, cmd.output()).await {
        Err(_) => SshOutcome::Unreachable(format!("no answer within {} s", SSH_TIMEOUT.as_secs())),
        Ok(Err(e)) => SshOutcome::Other(format!("cannot run ssh: {e}")),
        Ok(Ok(out)) => super::remote::classify_ssh(
            out.status.code(),
            &String::from_utf8_lossy(&out.stdout),
            &String::from_utf8_lossy(&out.stderr),
        ),
    }
}
