//! The doctor's judgement on what lies beyond the member's machine: the scheduler (reached,
//! TLS, credential accepted) and each builder the member may be sent to (reached over SSH
//! with its pinned host key, the hook's identity accepted, Nix found). Pure: the I/O layer
//! ([`super::reach`]) hands in what happened, as captured outcomes and text, and these
//! functions turn it into [`Check`]s with one-line fixes, and say how to run `ssh`.

use super::{Check, Status, check};
use crate::validate;

/// How asking the scheduler went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchedulerOutcome {
    /// The hook's configuration or its files cannot be used (nothing was sent).
    Config {
        /// What is wrong, with the file or key.
        problem: String,
        /// What to change.
        fix: String,
    },
    /// No connection: refused, timed out, no route, or closed before an answer.
    Unreachable(String),
    /// TLS failed: the certificate is not signed by the pinned CA, names another host, or
    /// one side does not speak TLS.
    Tls(String),
    /// The scheduler does not know the credential (`UNAUTHENTICATED`).
    Unauthenticated(String),
    /// The credential is known but is not a member's (`PERMISSION_DENIED`).
    PermissionDenied(String),
    /// The scheduler answered with another error.
    Failed {
        /// The gRPC code's name.
        code: String,
        /// Its message.
        message: String,
    },
    /// The credential was accepted.
    Accepted {
        /// The member it belongs to (empty: the open mode, no `[auth]`).
        member: String,
        /// How many builders the member may be sent to.
        builders: usize,
    },
}

/// The `scheduler` check for `endpoint`.
pub fn scheduler_check(endpoint: &str, outcome: &SchedulerOutcome) -> Check {
    let name = "scheduler";
    match outcome {
        SchedulerOutcome::Config { problem, fix } => {
            check(name, Status::Fail, problem.clone(), Some(fix.clone()))
        }
        SchedulerOutcome::Unreachable(detail) => check(
            name,
            Status::Fail,
            format!("cannot reach {endpoint}: {detail}"),
            Some(format!(
                "check `scheduler` in the hook's configuration and that this machine reaches \
                 {endpoint} (firewall, DNS); a TLS scheduler needs an https:// URL"
            )),
        ),
        SchedulerOutcome::Tls(detail) => check(
            name,
            Status::Fail,
            format!("TLS with {endpoint} failed: {detail}"),
            Some(
                "set `ca_file` to the CA that signed the scheduler's certificate (from the \
                 fleet's admins), and `tls_domain` to the name on it when the URL uses another"
                    .to_owned(),
            ),
        ),
        SchedulerOutcome::Unauthenticated(message) => check(
            name,
            Status::Fail,
            format!("{endpoint} does not accept the credential: {message}"),
            Some(
                "put the member token the fleet's admins registered (its SHA-256 is in their \
                 [[auth.members]]) in the file `credential_file` names"
                    .to_owned(),
            ),
        ),
        SchedulerOutcome::PermissionDenied(message) => check(
            name,
            Status::Fail,
            format!("the credential is not a member's: {message}"),
            Some(
                "`credential_file` holds an operator's or a builder's token: use your \
                 member token"
                    .to_owned(),
            ),
        ),
        SchedulerOutcome::Failed { code, message } => check(
            name,
            if code == "Unimplemented" {
                Status::Warn
            } else {
                Status::Fail
            },
            format!("{endpoint} answered {code}: {message}"),
            (code == "Unimplemented").then(|| {
                "the scheduler predates ListBuilders: builders cannot be checked until it \
                 is upgraded"
                    .to_owned()
            }),
        ),
        SchedulerOutcome::Accepted { member, builders } => check(
            name,
            Status::Ok,
            if member.is_empty() {
                format!(
                    "{endpoint} reached; open mode (no credentials), {builders} builder(s) \
                     connected"
                )
            } else {
                format!(
                    "{endpoint} reached, credential accepted as member {member}, {builders} \
                     builder(s) connected"
                )
            },
            None,
        ),
    }
}

/// Where `ssh` must go for a store URI: its [`validate::SshAddress`], with a host that ssh
/// cannot read as an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget(validate::SshAddress);

impl std::ops::Deref for SshTarget {
    type Target = validate::SshAddress;

    fn deref(&self) -> &validate::SshAddress {
        &self.0
    }
}

impl SshTarget {
    /// Parses `ssh://[user@]host[:port][?…]` or `ssh-ng://…` ([`validate::ssh_address`]),
    /// refusing a host that ssh would read as an option.
    pub fn parse(uri: &str) -> Result<SshTarget, String> {
        let a = validate::ssh_address(uri).map_err(|e| e.0)?;
        if a.host.starts_with('-') {
            return Err(format!("store URI `{uri}` names no usable host"));
        }
        Ok(SshTarget(a))
    }

    /// The known_hosts line that pins `key_line` (an OpenSSH public key line) for this
    /// host, under every name ssh may look it up by: the host (or its `HostKeyAlias`, which
    /// Nix's own known_hosts relies on too) and `[host]:port` for a port of its own.
    pub fn known_hosts_line(&self, key_line: &str) -> String {
        let mut names = vec![self.host.clone()];
        if let Some(p) = self.port {
            names.push(format!("[{}]:{p}", self.host));
        }
        format!("{} {}\n", names.join(","), key_line.trim())
    }

    /// The command that proves Nix answers there, as build-remote would start it:
    /// `nix-daemon` for ssh-ng (it runs `nix-daemon --stdio`), `nix-store` for ssh (it runs
    /// `nix-store --serve`).
    pub fn nix_command(&self) -> &'static str {
        if self.ng {
            "nix-daemon --version"
        } else {
            "nix-store --version"
        }
    }

    /// `ssh`'s arguments, after the member's `NIX_SSHOPTS` words: batch mode, strict
    /// checking against `known_hosts` only, the hook's identity, a connect timeout, then
    /// the destination and [`Self::nix_command`].
    pub fn ssh_args(
        &self,
        known_hosts: &str,
        identity: Option<&str>,
        connect_timeout_secs: u64,
    ) -> Vec<String> {
        let mut args: Vec<String> = [
            "-x",
            "-a",
            "-oBatchMode=yes",
            "-oStrictHostKeyChecking=yes",
            "-oGlobalKnownHostsFile=/dev/null",
            "-oPermitLocalCommand=no",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.push(format!("-oUserKnownHostsFile={known_hosts}"));
        args.push(format!("-oConnectTimeout={connect_timeout_secs}"));
        if let Some(i) = identity {
            args.extend(["-i".to_owned(), i.to_owned()]);
        }
        if let Some(p) = self.port {
            args.extend(["-p".to_owned(), p.to_string()]);
        }
        args.push(match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        });
        args.push("--".to_owned());
        args.push(self.nix_command().to_owned());
        args
    }
}

/// How reaching one builder over SSH went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshOutcome {
    /// Logged in and Nix answered with this version line.
    Ok(String),
    /// The builder presented another host key than the pinned one.
    KeyMismatch(String),
    /// The builder refused the login (the identity is not authorized for the user).
    AuthFailed(String),
    /// No SSH connection: refused, timed out, no route, unknown name, closed.
    Unreachable(String),
    /// Logged in, but the login finds no Nix.
    NixMissing(String),
    /// The store URI, the key or ssh itself is unusable, or something else failed.
    Other(String),
}

/// Judges a finished `ssh` run: its exit code (`None`: killed), stdout and stderr.
/// `ssh` exits 255 for its own errors, else with the remote command's status.
pub fn classify_ssh(code: Option<i32>, stdout: &str, stderr: &str) -> SshOutcome {
    let last = |text: &str| {
        text.lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty() && !l.starts_with("@@@"))
            .unwrap_or("no message")
            .to_owned()
    };
    match code {
        Some(0) => SshOutcome::Ok(stdout.lines().next().unwrap_or_default().trim().to_owned()),
        Some(255) => {
            let has = |needles: &[&str]| needles.iter().any(|n| stderr.contains(n));
            if has(&[
                "Host key verification failed",
                "REMOTE HOST IDENTIFICATION HAS CHANGED",
                "host key is known for",
            ]) {
                SshOutcome::KeyMismatch(last(stderr))
            } else if has(&[
                "Permission denied",
                "Too many authentication failures",
                "No more authentication methods",
            ]) {
                SshOutcome::AuthFailed(last(stderr))
            } else if has(&[
                "Connection refused",
                "Connection timed out",
                "timed out",
                "No route to host",
                "Network is unreachable",
                "Could not resolve hostname",
                "Name or service not known",
                "Connection closed",
                "Connection reset",
                "kex_exchange_identification",
            ]) {
                SshOutcome::Unreachable(last(stderr))
            } else {
                SshOutcome::Other(last(stderr))
            }
        }
        Some(127) => SshOutcome::NixMissing(last(stderr)),
        Some(c) => SshOutcome::Other(format!("exit status {c}: {}", last(stderr))),
        None => SshOutcome::Other("ssh was killed".to_owned()),
    }
}

/// A builder as the scheduler lists it for the member, with what reaching it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderResult {
    /// Its host id.
    pub host_id: String,
    /// Its store URI.
    pub store_uri: String,
    /// Why the scheduler sends no builds there now (empty: it does).
    pub unavailable_reason: String,
    /// What ssh gave.
    pub outcome: SshOutcome,
}

/// The check of one builder; `identity` is the hook's `ssh_identity`, if any.
pub fn builder_check(b: &BuilderResult, identity: Option<&str>) -> Check {
    let name = format!("builder {}", b.host_id);
    let uri = &b.store_uri;
    let target = SshTarget::parse(uri).ok();
    let user = target
        .as_ref()
        .and_then(|t| t.user.clone())
        .unwrap_or_else(|| "the user ssh logs in as".to_owned());
    let who = identity.map_or_else(
        || "ssh's default identities".to_owned(),
        |i| format!("{i}.pub"),
    );
    match &b.outcome {
        SshOutcome::Ok(version) => {
            let mut summary = format!("{uri}: pinned host key matches, logged in, {version}");
            if !b.unavailable_reason.is_empty() {
                summary.push_str(&format!(
                    " (the scheduler sends no builds there now: {})",
                    b.unavailable_reason
                ));
            }
            check(name, Status::Ok, summary, None)
        }
        SshOutcome::KeyMismatch(detail) => check(
            name,
            Status::Fail,
            format!("{uri}: the host key is not the pinned one ({detail})"),
            Some(
                "the builder's key changed or a machine in between answers for it: tell the \
                 fleet's admins (a reinstalled builder must be provisioned again with its new \
                 key); never accept the key by hand"
                    .to_owned(),
            ),
        ),
        SshOutcome::AuthFailed(detail) => check(
            name,
            Status::Fail,
            format!("{uri}: the builder refuses the login ({detail})"),
            Some(format!(
                "ask the fleet's admins to authorize {who} for {user} on the builder, or set \
                 `ssh_identity` in the hook's configuration to the key they authorized"
            )),
        ),
        SshOutcome::Unreachable(detail) if !b.unavailable_reason.is_empty() => check(
            name,
            Status::Warn,
            format!(
                "{uri}: unreachable ({detail}); the scheduler knows and sends no builds there: \
                 {}",
                b.unavailable_reason
            ),
            None,
        ),
        SshOutcome::Unreachable(detail) => check(
            name,
            Status::Fail,
            format!("{uri}: unreachable over SSH ({detail})"),
            Some(
                "check that this machine reaches the builder's sshd (firewall, DNS, the \
                 ssh_config of the user nix-daemon runs as, NIX_SSHOPTS); if nobody reaches \
                 it, tell the fleet's admins"
                    .to_owned(),
            ),
        ),
        SshOutcome::NixMissing(detail) => check(
            name,
            Status::Fail,
            format!("{uri}: logged in, but no Nix there ({detail})"),
            Some(format!(
                "the builder's admins must put Nix on the login PATH of {user} (build-remote \
                 runs `{}` there)",
                target.as_ref().map_or("nix-daemon --stdio", |t| if t.ng {
                    "nix-daemon --stdio"
                } else {
                    "nix-store --serve"
                })
            )),
        ),
        SshOutcome::Other(detail) => check(name, Status::Fail, format!("{uri}: {detail}"), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Store URIs of both schemes, with and without user and port, become ssh arguments
    /// with the pinned key under the names ssh looks it up by.
    #[test]
    fn targets_and_arguments() {
        let t = SshTarget::parse("ssh-ng://root@builder1").unwrap();
        assert_eq!(
            (t.ng, t.user.as_deref(), t.host.as_str(), t.port),
            (true, Some("root"), "builder1", None)
        );
        assert_eq!(
            t.known_hosts_line("ssh-ed25519 AAAA c\n"),
            "builder1 ssh-ed25519 AAAA c\n"
        );
        let args = t.ssh_args("/tmp/kh", Some("/etc/nix/id"), 5);
        assert!(args.contains(&"-oStrictHostKeyChecking=yes".to_owned()));
        assert!(args.contains(&"-oBatchMode=yes".to_owned()));
        assert!(args.contains(&"-oUserKnownHostsFile=/tmp/kh".to_owned()));
        assert_eq!(
            args[args.len() - 5..],
            [
                "-i",
                "/etc/nix/id",
                "root@builder1",
                "--",
                "nix-daemon --version"
            ]
        );
        let t = SshTarget::parse("ssh://[::1]:2222?compress=true").unwrap();
        assert_eq!((t.ng, t.host.as_str(), t.port), (false, "::1", Some(2222)));
        assert_eq!(t.known_hosts_line("k"), "::1,[::1]:2222 k\n");
        let args = t.ssh_args("/kh", None, 5);
        assert_eq!(
            args[args.len() - 5..],
            ["-p", "2222", "::1", "--", "nix-store --version"]
        );
        assert!(SshTarget::parse("https://x").is_err());
        assert!(SshTarget::parse("ssh://-oProxyCommand=x").is_err());
        assert!(SshTarget::parse("ssh://h:port").is_err());
    }

    /// OpenSSH's own words (captured from OpenSSH 9 clients) are told apart.
    #[test]
    fn ssh_failures_are_told_apart() {
        let mismatch = "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
            @    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n\
            Host key for b1 has changed and you have requested strict checking.\n\
            Host key verification failed.\n";
        assert!(matches!(
            classify_ssh(Some(255), "", mismatch),
            SshOutcome::KeyMismatch(d) if d == "Host key verification failed."
        ));
        assert!(matches!(
            classify_ssh(
                Some(255),
                "",
                "root@127.0.0.1: Permission denied (publickey).\n"
            ),
            SshOutcome::AuthFailed(_)
        ));
        assert!(matches!(
            classify_ssh(
                Some(255),
                "",
                "ssh: connect to host 127.0.0.1 port 41234: Connection refused\n"
            ),
            SshOutcome::Unreachable(_)
        ));
        assert!(matches!(
            classify_ssh(
                Some(127),
                "",
                "bash: line 1: nix-daemon: command not found\n"
            ),
            SshOutcome::NixMissing(_)
        ));
        assert_eq!(
            classify_ssh(Some(0), "nix-daemon (Nix) 2.8.0\n", ""),
            SshOutcome::Ok("nix-daemon (Nix) 2.8.0".to_owned())
        );
        assert!(matches!(
            classify_ssh(Some(255), "", "something new\n"),
            SshOutcome::Other(_)
        ));
    }

    /// Each outcome gets its own fix; a builder the scheduler already keeps out is only a
    /// warning when unreachable.
    #[test]
    fn builder_checks() {
        let result = |outcome: SshOutcome, reason: &str| BuilderResult {
            host_id: "b1".into(),
            store_uri: "ssh-ng://root@b1".into(),
            unavailable_reason: reason.into(),
            outcome,
        };
        let c = builder_check(&result(SshOutcome::AuthFailed("x".into()), ""), Some("/k"));
        assert_eq!((c.name.as_str(), c.status), ("builder b1", Status::Fail));
        assert!(c.fix.unwrap().contains("authorize /k.pub for root"));
        let c = builder_check(&result(SshOutcome::Unreachable("x".into()), ""), None);
        assert_eq!(c.status, Status::Fail);
        let c = builder_check(
            &result(SshOutcome::Unreachable("x".into()), "SSH probe failed"),
            None,
        );
        assert_eq!(c.status, Status::Warn);
        assert!(c.summary.contains("SSH probe failed"));
        let c = builder_check(&result(SshOutcome::KeyMismatch("x".into()), "busy"), None);
        assert_eq!(c.status, Status::Fail);
        let c = builder_check(&result(SshOutcome::Ok("nix 2.8".into()), ""), None);
        assert_eq!(c.status, Status::Ok);
    }

    /// Every scheduler outcome but acceptance (and an old scheduler) fails with a fix.
    #[test]
    fn scheduler_checks() {
        for o in [
            SchedulerOutcome::Unreachable("refused".into()),
            SchedulerOutcome::Tls("unknown issuer".into()),
            SchedulerOutcome::Unauthenticated("unknown".into()),
            SchedulerOutcome::PermissionDenied("operator".into()),
        ] {
            let c = scheduler_check("https://s:1", &o);
            assert_eq!(c.status, Status::Fail, "{o:?}");
            assert!(c.fix.is_some(), "{o:?}");
        }
        let c = scheduler_check(
            "https://s:1",
            &SchedulerOutcome::Accepted {
                member: "alice".into(),
                builders: 2,
            },
        );
        assert_eq!(c.status, Status::Ok);
        assert!(c.summary.contains("member alice"));
    }
}
