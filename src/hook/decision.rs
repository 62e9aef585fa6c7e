//! The hook's decisions, as pure functions: what to answer a `try` given the scheduler's
//! answer, what a child build-remote's behaviour means for the lease, how to hand a build
//! to the stock build-remote (the rewritten handshake), and which build-remote that is.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::codec::{self, BuildInputs, Level, Reply, Settings, TryRequest};
use super::machine::Grant;
use crate::proto::BuildOutcome;

/// The scheduler's answer to an `Acquire`, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A host was leased.
    Granted(Grant),
    /// No host free and no local slot: ask again later.
    Postpone {
        /// The scheduler's hint for the next attempt.
        retry_after: Duration,
        /// 1-based position among requests for the same system.
        queue_position: u32,
        /// Why, for the user.
        reason: String,
    },
    /// No host free, but the client can build locally.
    Decline {
        /// Why, for the user.
        reason: String,
    },
    /// No registered host can ever build this system and feature set.
    DeclinePermanently {
        /// Why, for the user.
        reason: String,
    },
    /// The scheduler refused the request because this member is over one of its caps
    /// (`RESOURCE_EXHAUSTED`: with a queue, `queue.max_waiting_per_member`, the builds one
    /// member may have waiting at once). The scheduler is fine; asking again later works.
    OverCap {
        /// The scheduler's message (it names the setting).
        reason: String,
    },
    /// The scheduler could not be asked (connect failure, timeout, refused call, or an
    /// answer the hook cannot use).
    Unreachable {
        /// What went wrong.
        error: String,
    },
}

/// What the hook does with one `try`.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Answer `# accept` and build on the granted host.
    Accept {
        /// The lease.
        grant: Grant,
        /// The message for the user: the chosen host and its load.
        message: String,
    },
    /// Answer with `reply` and show `message` at `level`.
    Reply {
        /// The answer.
        reply: Reply,
        /// Its level.
        level: Level,
        /// Why, for the user.
        message: String,
    },
    /// Hand this `try` and the rest of the conversation to the stock build-remote with the
    /// configured fallback machines.
    Fallback {
        /// Why, for the user.
        message: String,
    },
    /// Answer `# accept` now, with no host yet, and wait for a lease inside the accepted
    /// build (the daemon is not blocked after an accept).
    AcceptAndWait {
        /// Why, for the user.
        message: String,
    },
}

/// "nixdispatch: building hello on b1 (1/2 slots busy)".
pub fn building(t: &TryRequest, grant: &Grant) -> String {
    format!(
        "nixdispatch: building {} on {} ({}/{} slots busy)",
        drv_name(&t.drv_path),
        grant.host_id,
        grant.slots_used,
        grant.slots_total
    )
}

/// The machine name the hook gives Nix when it accepts before it has a host (Nix shows it
/// in "building '…' on '…'"; the real host follows in a message).
pub const WAITING_MACHINE: &str = "nixdispatch-queue";

/// Decides the answer to one `try` for a client that may wait inside an accepted build.
///
/// When this client cannot build the derivation itself (`local` false: Nix's `amWilling`
/// is 0, or the system or features are not this machine's), a decline is a certain failure
/// and a postpone blocks nothing but costs Nix's poll interval per turn: the hook accepts
/// at once and waits in the scheduler's queue instead, also when the scheduler cannot be
/// reached and no fallback builders are configured (it keeps re-connecting). Everything
/// else is [`decide`]'s.
pub fn decide_waiting(t: &TryRequest, answer: Answer, has_fallback: bool, local: bool) -> Action {
    if local {
        return decide(t, answer, has_fallback);
    }
    let name = drv_name(&t.drv_path);
    match answer {
        Answer::Postpone {
            queue_position,
            reason,
            ..
        } => Action::AcceptAndWait {
            message: format!(
                "nixdispatch: {name} waits for {} (queue position {queue_position}): {reason}",
                builder_of(&t.needed_system)
            ),
        },
        Answer::Unreachable { error } if !has_fallback => Action::AcceptAndWait {
            message: format!(
                "nixdispatch: scheduler unreachable ({error}); {name} waits for it to come back"
            ),
        },
        // Accepting would only be refused again by the same cap: let Nix ask again after its
        // poll interval, when some of the member's waiting builds may have been served.
        Answer::OverCap { reason } => Action::Reply {
            reply: Reply::Postpone,
            level: Level::Warn,
            message: over_cap(name, &reason, "asking again later"),
        },
        other => decide(t, other, has_fallback),
    }
}

/// "an x86_64-linux builder", "a riscv64-linux builder".
pub fn builder_of(system: &str) -> String {
    let article = match system.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u' | 'x') => "an",
        _ => "a",
    };
    format!("{article} {system} builder")
}

/// A wait estimate for people: "less than a minute", "about 2 min", "about 3 h".
pub fn about(d: Duration) -> String {
    let secs = d.as_secs();
    if secs < 60 {
        "less than a minute".to_owned()
    } else if secs < 90 * 60 {
        format!("about {} min", secs.div_ceil(60))
    } else {
        format!("about {} h", (secs + 1800) / 3600)
    }
}

/// The line a waiting build shows: "waiting for an x86_64-linux builder: position 3, about
/// 2 min".
pub fn waiting_line(system: &str, position: u32, estimate: Duration) -> String {
    format!(
        "nixdispatch: waiting for {}: position {position}, {}",
        builder_of(system),
        about(estimate)
    )
}

/// Whether this client could build the derivation itself right now: the same test as stock
/// build-remote (`amWilling`, the system is this machine's or one of its extra platforms, and
/// every required feature is a local system feature).
pub fn can_build_locally(t: &TryRequest, settings: &Settings) -> bool {
    if !t.am_willing {
        return false;
    }
    let words = |name: &str| -> Vec<String> {
        settings
            .get(name)
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let system_ok = t.needed_system == "builtin"
        || settings.get("system") == Some(t.needed_system.as_str())
        || words("extra-platforms").contains(&t.needed_system);
    let features = words("system-features");
    system_ok && t.required_features.iter().all(|f| features.contains(f))
}

/// What the member sees when the scheduler refuses a request with `RESOURCE_EXHAUSTED`,
/// `then` saying what happens next. Today the scheduler answers it for one thing, the
/// member's cap of waiting requests (its message names `queue.max_waiting_per_member`);
/// any other limit is worded as one.
pub fn over_cap(name: &str, reason: &str, then: &str) -> String {
    if reason.contains("max_waiting_per_member") {
        format!(
            "nixdispatch: {name}: this member already has as many builds waiting at the \
             scheduler as it may (the scheduler's `queue.max_waiting_per_member`: {reason}); \
             {then}"
        )
    } else {
        format!("nixdispatch: {name}: the scheduler limits this member ({reason}); {then}")
    }
}

/// A short name for a derivation in messages: `/nix/store/<hash>-hello-1.0.drv` → `hello-1.0`.
pub fn drv_name(drv_path: &str) -> &str {
    let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
    let base = base.strip_suffix(".drv").unwrap_or(base);
    match base.split_once('-') {
        Some((hash, name)) if hash.len() == 32 => name,
        _ => base,
    }
}

fn features_text(features: &[String]) -> String {
    if features.is_empty() {
        String::new()
    } else {
        format!(" with features {}", features.join(","))
    }
}

/// Decides the answer to one `try`.
///
/// `decline-permanently` is never the answer here: it switches the hook off for every later
/// derivation of the Nix command, whatever its system, so "no host for *this* system" must be
/// a plain decline (Nix then builds locally or says it cannot).
pub fn decide(t: &TryRequest, answer: Answer, has_fallback: bool) -> Action {
    let name = drv_name(&t.drv_path);
    match answer {
        Answer::Granted(grant) => {
            let message = building(t, &grant);
            Action::Accept { grant, message }
        }
        Answer::Postpone {
            queue_position,
            reason,
            ..
        } => Action::Reply {
            reply: Reply::Postpone,
            level: Level::Info,
            message: format!(
                "nixdispatch: {name} waits for a {} builder (queue position {queue_position}): {reason}",
                t.needed_system
            ),
        },
        Answer::Decline { reason } => Action::Reply {
            reply: Reply::Decline,
            level: Level::Info,
            message: format!("nixdispatch: not building {name} remotely: {reason}"),
        },
        Answer::DeclinePermanently { reason } => Action::Reply {
            reply: Reply::Decline,
            level: Level::Info,
            message: format!(
                "nixdispatch: no builder can build {name} ({}{}): {reason}",
                t.needed_system,
                features_text(&t.required_features)
            ),
        },
        // The scheduler works, so no fallback: the cap is the operators' decision.
        Answer::OverCap { reason } => Action::Reply {
            reply: Reply::Decline,
            level: Level::Warn,
            message: over_cap(name, &reason, "not building it remotely"),
        },
        Answer::Unreachable { error } if has_fallback => Action::Fallback {
            message: format!(
                "nixdispatch: scheduler unreachable ({error}); using the fallback builders"
            ),
        },
        Answer::Unreachable { error } => Action::Reply {
            reply: Reply::Decline,
            level: Level::Warn,
            message: format!(
                "nixdispatch: scheduler unreachable ({error}); not building {name} remotely"
            ),
        },
    }
}

/// The answer when the hook cannot be used at all (its configuration is broken): this
/// client then has no builders, which is what `decline-permanently` means.
pub fn unusable(problem: &str) -> (Reply, Level, String) {
    (
        Reply::DeclinePermanently,
        Level::Error,
        format!("nixdispatch: build hook disabled: {problem}"),
    )
}

/// What a child build-remote did with the host it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildEnd {
    /// It never said `# accept` (it declined, postponed or died first): it could not use the
    /// host.
    NotAccepted,
    /// It accepted and exited with this code (`None`: killed by a signal).
    Exited(Option<i32>),
}

/// What to do after a child ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfterChild {
    /// The outcome to release the lease with.
    pub outcome: BuildOutcome,
    /// `Some(code)`: exit with it now; `None`: try another host.
    pub exit_code: Option<i32>,
}

/// Maps a child's end to the lease outcome and the next step. `attempt` counts from 1.
pub fn after_child(end: ChildEnd, attempt: u32, max_attempts: u32) -> AfterChild {
    match end {
        ChildEnd::NotAccepted => AfterChild {
            outcome: BuildOutcome::HostUnreachable,
            exit_code: if attempt >= max_attempts {
                Some(1)
            } else {
                None
            },
        },
        ChildEnd::Exited(Some(0)) => AfterChild {
            outcome: BuildOutcome::Succeeded,
            exit_code: Some(0),
        },
        // Mirror the child's status: in Nix 2.8, 100 is a permanent failure and 101 a timeout.
        ChildEnd::Exited(Some(code)) => AfterChild {
            outcome: BuildOutcome::BuildFailed,
            exit_code: Some(code),
        },
        ChildEnd::Exited(None) => AfterChild {
            outcome: BuildOutcome::BuildFailed,
            exit_code: Some(1),
        },
    }
}

/// The bytes a child build-remote reads first: the daemon's handshake with `builders`
/// replaced by the one machine, then the `try` it is to accept.
pub fn child_prelude(settings: &Settings, builders: &str, t: &TryRequest) -> Vec<u8> {
    let mut settings = settings.clone();
    settings.set("builders", builders);
    let mut out = Vec::new();
    codec::write_settings(&mut out, &settings);
    codec::write_try(&mut out, t);
    out
}

/// The bytes a child reads after its `# accept`.
pub fn child_inputs(inputs: &BuildInputs) -> Vec<u8> {
    let mut out = Vec::new();
    codec::write_build_inputs(&mut out, inputs);
    out
}

/// How to start the stock build-remote: a program and its leading arguments (Nix's
/// verbosity argument follows them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRemote {
    /// The program. Not canonicalised: on 2.8 it is a symlink named `build-remote` to the
    /// `nix` multi-call binary, which picks its personality from that name.
    pub program: PathBuf,
    /// Arguments before the verbosity, e.g. `__build-remote`.
    pub args: Vec<String>,
}

/// Finds the stock build-remote of the Nix that started the hook.
///
/// `nix_binaries` are candidate paths of the `nix` binary, best first (the parent
/// process's executable, then `nix` on `PATH`), already resolved to the real file. Nix 2.8
/// and 2.9 install `<prefix>/libexec/nix/build-remote`; later versions have the
/// `nix __build-remote` subcommand instead.
pub fn detect_build_remote(
    nix_binaries: &[PathBuf],
    exists: impl Fn(&Path) -> bool,
) -> BuildRemote {
    for nix in nix_binaries {
        if let Some(prefix) = nix.parent().and_then(Path::parent) {
            let libexec = prefix.join("libexec/nix/build-remote");
            if exists(&libexec) {
                return BuildRemote {
                    program: libexec,
                    args: vec![],
                };
            }
        }
    }
    let nix = nix_binaries
        .first()
        .cloned()
        .unwrap_or_else(|| PathBuf::from("nix"));
    BuildRemote {
        program: nix,
        args: vec!["__build-remote".to_owned()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;
    use base64::Engine as _;

    fn t(am_willing: bool, system: &str, features: &[&str]) -> TryRequest {
        TryRequest {
            am_willing,
            needed_system: system.into(),
            drv_path: "/nix/store/00000000000000000000000000000000-hello-1.0.drv".into(),
            required_features: features.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn settings() -> Settings {
        Settings {
            entries: vec![
                ("system".into(), "x86_64-linux".into()),
                ("extra-platforms".into(), "i686-linux".into()),
                ("system-features".into(), "nixos-test benchmark".into()),
                ("builders".into(), "".into()),
            ],
        }
    }

    fn grant() -> Grant {
        Grant::try_from(proto::Granted {
            lease_id: "l".into(),
            host_id: "b1".into(),
            store_uri: "ssh-ng://b1".into(),
            systems: vec!["x86_64-linux".into()],
            max_jobs: 2,
            speed_factor: 1.0,
            host_public_key_base64: base64::engine::general_purpose::STANDARD
                .encode("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample"),
            lease_ttl_millis: 1000,
            slots_used: 1,
            slots_total: 2,
            ..Default::default()
        })
        .unwrap()
    }

    /// A client that cannot build locally accepts and waits instead of postponing, and
    /// instead of declining into a certain failure when the scheduler is away (unless
    /// fallback builders are configured); a client that can build keeps today's answers.
    #[test]
    fn accept_and_wait_when_nothing_else_can_build_it() {
        let tr = t(false, "x86_64-linux", &[]);
        let postpone = || Answer::Postpone {
            retry_after: Duration::from_secs(5),
            queue_position: 3,
            reason: "busy".into(),
        };
        let gone = || Answer::Unreachable {
            error: "refused".into(),
        };
        assert!(matches!(
            decide_waiting(&tr, postpone(), false, false),
            Action::AcceptAndWait { message } if message.contains("an x86_64-linux builder (queue position 3)")
        ));
        assert!(matches!(
            decide_waiting(&tr, gone(), false, false),
            Action::AcceptAndWait { .. }
        ));
        assert!(matches!(
            decide_waiting(&tr, gone(), true, false),
            Action::Fallback { .. }
        ));
        assert!(matches!(
            decide_waiting(&tr, postpone(), false, true),
            Action::Reply {
                reply: Reply::Postpone,
                ..
            }
        ));
        assert!(matches!(
            decide_waiting(&tr, Answer::Granted(grant()), false, false),
            Action::Accept { .. }
        ));
    }

    /// `RESOURCE_EXHAUSTED` (the member over its cap of waiting requests) is not worded as an
    /// unreachable scheduler: it names the setting, builds locally when the client can and
    /// otherwise lets Nix ask again later, never using the fallback builders.
    #[test]
    fn over_the_waiting_cap_has_its_own_words() {
        let cap = || Answer::OverCap {
            reason: "member m already has 2 requests waiting, its limit \
                     (queue.max_waiting_per_member); wait for some to be served"
                .into(),
        };
        for (local, fallback, want) in [
            (true, false, Reply::Decline),
            (true, true, Reply::Decline),
            (false, false, Reply::Postpone),
            (false, true, Reply::Postpone),
        ] {
            match decide_waiting(&t(local, "x86_64-linux", &[]), cap(), fallback, local) {
                Action::Reply {
                    reply,
                    level,
                    message,
                } => {
                    assert_eq!(reply, want, "local {local}, fallback {fallback}");
                    assert_eq!(level, Level::Warn);
                    assert!(
                        message.contains("queue.max_waiting_per_member"),
                        "{message}"
                    );
                    assert!(
                        message.contains("already has 2 requests waiting"),
                        "{message}"
                    );
                    assert!(message.contains("this member already has"), "{message}");
                    assert!(!message.contains("unreachable"), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
        let other = over_cap("x", "some other limit", "asking again later");
        assert!(other.contains("the scheduler limits this member (some other limit)"));
    }

    /// The waiting line reads naturally.
    #[test]
    fn waiting_lines() {
        assert_eq!(
            waiting_line("x86_64-linux", 3, Duration::from_secs(100)),
            "nixdispatch: waiting for an x86_64-linux builder: position 3, about 2 min"
        );
        assert_eq!(builder_of("riscv64-linux"), "a riscv64-linux builder");
        assert_eq!(about(Duration::from_secs(20)), "less than a minute");
        assert_eq!(about(Duration::from_secs(3 * 3600)), "about 3 h");
    }

    /// The local-build test matches stock build-remote's.
    #[test]
    fn local_build_test() {
        let s = settings();
        assert!(can_build_locally(&t(true, "x86_64-linux", &[]), &s));
        assert!(can_build_locally(
            &t(true, "i686-linux", &["benchmark"]),
            &s
        ));
        assert!(can_build_locally(&t(true, "builtin", &[]), &s));
        assert!(!can_build_locally(&t(false, "x86_64-linux", &[]), &s));
        assert!(!can_build_locally(&t(true, "aarch64-linux", &[]), &s));
        assert!(!can_build_locally(&t(true, "x86_64-linux", &["kvm"]), &s));
    }

    /// Each scheduler answer maps to the reply the issue asks for; never decline-permanently.
    #[test]
    fn decision_table() {
        let tr = t(false, "x86_64-linux", &["kvm"]);
        assert!(matches!(
            decide(&tr, Answer::Granted(grant()), false),
            Action::Accept { .. }
        ));
        let postpone = Answer::Postpone {
            retry_after: Duration::ZERO,
            queue_position: 3,
            reason: "busy".into(),
        };
        match decide(&tr, postpone, false) {
            Action::Reply {
                reply: Reply::Postpone,
                message,
                ..
            } => assert!(message.contains("position 3")),
            other => panic!("{other:?}"),
        }
        for a in [
            Answer::Decline { reason: "r".into() },
            Answer::DeclinePermanently { reason: "r".into() },
            Answer::Unreachable { error: "e".into() },
        ] {
            match decide(&tr, a, false) {
                Action::Reply {
                    reply: Reply::Decline,
                    ..
                } => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            decide(&tr, Answer::Unreachable { error: "e".into() }, true),
            Action::Fallback { .. }
        ));
        assert!(matches!(
            decide(&tr, Answer::Decline { reason: "r".into() }, true),
            Action::Reply { .. }
        ));
    }

    /// The accept message names the host and its load.
    #[test]
    fn accept_message() {
        match decide(
            &t(true, "x86_64-linux", &[]),
            Answer::Granted(grant()),
            false,
        ) {
            Action::Accept { message, .. } => assert_eq!(
                message,
                "nixdispatch: building hello-1.0 on b1 (1/2 slots busy)"
            ),
            other => panic!("{other:?}"),
        }
    }

    /// Child ends map to outcomes, retries and mirrored exit codes.
    #[test]
    fn child_end_table() {
        assert_eq!(
            after_child(ChildEnd::NotAccepted, 1, 3),
            AfterChild {
                outcome: BuildOutcome::HostUnreachable,
                exit_code: None
            }
        );
        assert_eq!(after_child(ChildEnd::NotAccepted, 3, 3).exit_code, Some(1));
        assert_eq!(
            after_child(ChildEnd::Exited(Some(0)), 1, 3),
            AfterChild {
                outcome: BuildOutcome::Succeeded,
                exit_code: Some(0)
            }
        );
        assert_eq!(
            after_child(ChildEnd::Exited(Some(100)), 1, 3),
            AfterChild {
                outcome: BuildOutcome::BuildFailed,
                exit_code: Some(100)
            }
        );
        assert_eq!(after_child(ChildEnd::Exited(None), 2, 3).exit_code, Some(1));
    }

    /// The prelude is the handshake with only `builders` changed, then the same `try`.
    #[test]
    fn prelude_rewrites_only_builders() {
        let tr = t(true, "x86_64-linux", &["kvm"]);
        let bytes = child_prelude(&settings(), "ssh-ng://b1 x86_64-linux", &tr);
        let mut r = bytes.as_slice();
        let s = codec::read_settings(&mut r).unwrap();
        let mut expected = settings();
        expected.set("builders", "ssh-ng://b1 x86_64-linux");
        assert_eq!(s, expected);
        assert_eq!(
            codec::read_request(&mut r).unwrap(),
            codec::Request::Try(tr)
        );
        assert!(r.is_empty());
    }

    /// Nix 2.8's libexec build-remote wins; otherwise `nix __build-remote`.
    #[test]
    fn detects_build_remote() {
        let nix = PathBuf::from("/usr/bin/nix");
        let br = detect_build_remote(std::slice::from_ref(&nix), |p| {
            p == Path::new("/usr/libexec/nix/build-remote")
        });
        assert_eq!(
            br,
            BuildRemote {
                program: "/usr/libexec/nix/build-remote".into(),
                args: vec![]
            }
        );
        let br = detect_build_remote(std::slice::from_ref(&nix), |_| false);
        assert_eq!(
            br,
            BuildRemote {
                program: nix,
                args: vec!["__build-remote".into()]
            }
        );
        assert_eq!(
            detect_build_remote(&[], |_| false).program,
            PathBuf::from("nix")
        );
    }

    /// Derivation names are shortened for messages.
    #[test]
    fn short_names() {
        assert_eq!(
            drv_name("/nix/store/00000000000000000000000000000000-hello-1.0.drv"),
            "hello-1.0"
        );
        assert_eq!(drv_name("weird"), "weird");
    }
}
