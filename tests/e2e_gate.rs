//! End to end: members running Debian's stock Nix (2.8), with no nixdispatch at all and
//! builders listed in their own nix.conf, build on real OpenSSH builders whose sshd runs
//! `nixdispatch-gate` for them; the real scheduler and agents decide.
//!
//! Needs what `e2e_hook` needs (root, `nix-bin`, `openssh-server`, `busybox-static`, the
//! workspace's binaries). `NIXDISPATCH_E2E_BUILDER_NIX_DAEMON` / `_NIX_STORE` run another
//! Nix on the builders.

mod common;

use common::gate::{GateOpts, Member, finish, read_log};
use common::nixver::NixVersion;
use common::{BuilderSpec, Env, NixRun, valid_in_client_store};

/// Checks a member's run: success, one valid output per derivation, each built on a
/// builder (never locally).
fn assert_built_remotely(env: &Env, run: &NixRun, n: usize, logs: &[std::path::PathBuf]) {
    let logs: String = logs.iter().map(|l| read_log(l)).collect();
    assert!(
        run.success,
        "{}\n--- gate logs\n{logs}",
        env.diagnostics(run)
    );
    let outs = run.out_paths();
    assert_eq!(outs.len(), n, "{outs:?}");
    for out in &outs {
        assert!(valid_in_client_store(out), "{out} is not valid");
        let text = std::fs::read_to_string(out).unwrap();
        assert!(!text.contains(" local "), "{out} was built locally: {text}");
    }
}

/// Three stock-Nix members (two over ssh-ng, one over ssh) each build six derivations
/// on two builders of two slots, every member allowed six jobs per builder: no builder ever
/// runs more than its two slots at once, no build fails, every output is valid, both store
/// kinds work, and no lease is left.
#[test]
fn stock_members_are_capped_at_the_builders_slots() {
    let specs = [BuilderSpec::new("b1", 2), BuilderSpec::new("b2", 2)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let members: Vec<Member> = ["alice", "bob", "carol"]
        .iter()
        .map(|n| env.member(n))
        .collect();
    let logs: Vec<_> = ["b1", "b2"]
        .iter()
        .map(|b| env.install_gate(b, &members, &GateOpts::default()))
        .collect();
    for (m, scheme) in members.iter().zip(["ssh-ng", "ssh", "ssh-ng"]) {
        env.member_nix_conf(m, &["b1", "b2"], scheme, 6);
    }
    let children: Vec<_> = members
        .iter()
        .map(|m| {
            let tag = env.tag(&m.name);
            // 4 s builds outlive the 3 s lease TTL: only the gate's keep-alives hold them.
            env.member_build_command(m, &tag, 6, "4")
                .spawn()
                .expect("nix-build")
        })
        .collect();
    let runs: Vec<NixRun> = children.into_iter().map(finish).collect();
    for run in &runs {
        assert_built_remotely(&env, run, 6, &logs);
    }
    let (p1, p2) = (env.gate_peaks("b1"), env.gate_peaks("b2"));
    assert_eq!(
        p1.len() + p2.len(),
        18,
        "every build ran once: {p1:?} {p2:?}"
    );
    let peak = p1.iter().chain(&p2).max().copied().unwrap_or(0);
    let gate_logs: String = logs.iter().map(|l| read_log(l)).collect();
    assert!(
        p1.iter().all(|&n| n <= 2) && p2.iter().all(|&n| n <= 2),
        "a builder ran more than its 2 slots: b1 {p1:?}, b2 {p2:?}\n{gate_logs}"
    );
    assert!(peak >= 1);
    // 18 builds on 4 slots: members waited, and were told where they stood (in the
    // protocol's log messages on ssh-ng, on stderr, i.e. the build log, on ssh).
    let stderr: String = runs.iter().map(|r| r.stderr.as_str()).collect();
    assert!(
        stderr.contains("nixdispatch-gate: waiting for a build slot on b"),
        "{stderr}"
    );
    // Waiting members were told where they stand, and slots were released on results.
    assert!(gate_logs.contains("slot granted"), "{gate_logs}");
    assert!(gate_logs.contains("build result sent"), "{gate_logs}");
    assert!(!gate_logs.contains("keep-alive failed"), "{gate_logs}");
    common::wait_for(std::time::Duration::from_secs(30), "no lease left", || {
        env.leases().is_empty().then_some(())
    });
}

/// With TLS and `[auth]`, the gate authenticates with its builder's own credential and
/// names the member: the builds are queued (granted slots, never unqueued) and capped at
/// the builder's one slot.
#[test]
fn gate_authenticates_with_its_builders_credential() {
    let specs = [BuilderSpec::new("b1", 1)];
    let mut env = Env::new(&specs);
    env.secure = true;
    env.start_scheduler_and_agents(&specs);
    let m = env.member("hana");
    let log = env.install_gate("b1", std::slice::from_ref(&m), &GateOpts::default());
    env.member_nix_conf(&m, &["b1"], "ssh-ng", 2);
    let tag = env.tag("auth");
    let run = finish(env.member_build_command(&m, &tag, 2, "0").spawn().unwrap());
    assert_built_remotely(&env, &run, 2, std::slice::from_ref(&log));
    let text = read_log(&log);
    assert!(text.contains("slot granted"), "{text}");
    assert!(!text.contains("building unqueued"), "{text}");
    assert!(env.gate_peaks("b1").iter().all(|&n| n <= 1), "{text}");
    common::wait_for(std::time::Duration::from_secs(30), "no lease left", || {
        env.leases().is_empty().then_some(())
    });
}

/// With TLS and `[auth]`, the gate asks the builder's agent through its gate socket and
/// holds no credential at all: the builds are queued (granted slots, bound at the agent,
/// never unqueued), capped at the builder's one slot, and the leases are the members'.
#[test]
fn gate_asks_the_agent_through_its_socket() {
    let specs = [BuilderSpec::new("b1", 1)];
    let mut env = Env::new(&specs);
    env.secure = true;
    env.gate_sockets = true;
    env.start_scheduler_and_agents(&specs);
    let members = [env.member("ines"), env.member("jon")];
    let opts = GateOpts {
        agent_socket: true,
        ..GateOpts::default()
    };
    let log = env.install_gate("b1", &members, &opts);
    let config = std::fs::read_to_string(env.path().join("gate_b1.toml")).unwrap();
    assert!(!config.contains("credential_file"), "{config}");
    for m in &members {
        env.member_nix_conf(m, &["b1"], "ssh-ng", 2);
    }
    let children: Vec<_> = members
        .iter()
        .map(|m| {
            let tag = env.tag(&m.name);
            env.member_build_command(m, &tag, 2, "0").spawn().unwrap()
        })
        .collect();
    let runs: Vec<NixRun> = children.into_iter().map(finish).collect();
    for run in &runs {
        assert_built_remotely(&env, run, 2, std::slice::from_ref(&log));
    }
    let text = read_log(&log);
    assert!(text.contains("slot granted"), "{text}");
    assert!(!text.contains("building unqueued"), "{text}");
    assert!(env.gate_peaks("b1").iter().all(|&n| n <= 1), "{text}");
    let agent = read_log(&env.path().join("log/agent_b1.log"));
    assert!(agent.contains("gate socket: lease granted"), "{agent}");
    assert!(
        agent.contains("\"ines\"") && agent.contains("\"jon\""),
        "{agent}"
    );
    common::wait_for(std::time::Duration::from_secs(30), "no lease left", || {
        env.leases().is_empty().then_some(())
    });
}

/// A gated build holding a lease through the agent's socket survives a scheduler restart:
/// the scheduler is killed while the build runs, and the gate's next keep-alives, which the
/// agent forwards with the lease's details, re-attach the lease under the same id and member
/// once the agent has registered again, so the build is counted again; the build succeeds
/// and its lease is released at the end.
#[test]
fn a_gated_lease_is_re_attached_after_a_scheduler_restart() {
    let specs = [BuilderSpec::new("b1", 1)];
    let mut env = Env::new(&specs);
    env.gate_sockets = true;
    env.start_scheduler_and_agents(&specs);
    let m = env.member("kim");
    let opts = GateOpts {
        agent_socket: true,
        ..GateOpts::default()
    };
    let log = env.install_gate("b1", std::slice::from_ref(&m), &opts);
    env.member_nix_conf(&m, &["b1"], "ssh-ng", 1);
    let tag = env.tag("restart");
    // 12 s: four lease TTLs, so only re-attached keep-alives keep the lease.
    let child = env.member_build_command(&m, &tag, 1, "12").spawn().unwrap();
    let before = common::wait_for(
        std::time::Duration::from_secs(60),
        "the gated lease",
        || env.leases().into_iter().find(|l| l.client_id == "kim"),
    );
    env.restart_scheduler();
    let after = common::wait_for(
        std::time::Duration::from_secs(30),
        "the lease re-attached after the restart",
        || {
            env.admin(|mut a| async move {
                a.list_leases(nixdispatch::proto::ListLeasesRequest {})
                    .await
            })
            .ok()?
            .leases
            .into_iter()
            .find(|l| l.lease_id == before.lease_id)
        },
    );
    assert_eq!(
        (after.client_id.as_str(), after.host_id.as_str()),
        ("kim", "b1")
    );
    let run = finish(child);
    assert_built_remotely(&env, &run, 1, std::slice::from_ref(&log));
    let text = read_log(&log);
    assert!(!text.contains("building unqueued"), "{text}");
    common::wait_for(std::time::Duration::from_secs(30), "no lease left", || {
        env.leases().is_empty().then_some(())
    });
}

/// With the scheduler down, the gate lets builds through unqueued (fail open) and says so
/// in its log; the builds succeed.
#[test]
fn scheduler_down_fails_open() {
    let specs = [BuilderSpec::new("b1", 2)];
    let env = Env::new(&specs);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let m = env.member("dave");
    let opts = GateOpts {
        scheduler: Some(url),
        ..GateOpts::default()
    };
    let log = env.install_gate("b1", std::slice::from_ref(&m), &opts);
    for scheme in ["ssh-ng", "ssh"] {
        env.member_nix_conf(&m, &["b1"], scheme, 2);
        let tag = env.tag(scheme);
        let run = finish(env.member_build_command(&m, &tag, 2, "0").spawn().unwrap());
        assert_built_remotely(&env, &run, 2, std::slice::from_ref(&log));
    }
    let text = read_log(&log);
    assert!(text.contains("building unqueued (fail open)"), "{text}");
}

/// With `fail_closed = true` and the scheduler down, an ssh-ng build is refused with the
/// gate's message and nothing is built on the builder.
#[test]
fn scheduler_down_fails_closed_when_asked() {
    let specs = [BuilderSpec::new("b1", 2)];
    let env = Env::new(&specs);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let m = env.member("erin");
    let opts = GateOpts {
        scheduler: Some(url),
        fail_closed: true,
        ..GateOpts::default()
    };
    let log = env.install_gate("b1", std::slice::from_ref(&m), &opts);
    env.member_nix_conf(&m, &["b1"], "ssh-ng", 2);
    let tag = env.tag("closed");
    let run = finish(env.member_build_command(&m, &tag, 1, "0").spawn().unwrap());
    assert!(!run.success, "{}", env.diagnostics(&run));
    assert!(
        run.stderr.contains("nixdispatch-gate: build refused on b1"),
        "{}\n{}",
        env.diagnostics(&run),
        read_log(&log)
    );
    assert!(
        env.gate_peaks("b1").is_empty(),
        "nothing ran on the builder"
    );
}

/// A command that is not Nix reaches the member's shell unchanged (shell syntax
/// included), both through `command=` and through `ForceCommand`.
#[test]
fn other_commands_reach_the_shell_unchanged() {
    let specs = [BuilderSpec::new("b1", 1)];
    let env = Env::new(&specs);
    let m = env.member("frank");
    let opts = GateOpts {
        scheduler: Some("http://127.0.0.1:9".to_owned()),
        force_command: true,
        ..GateOpts::default()
    };
    env.install_gate("b1", std::slice::from_ref(&m), &opts);
    let alias = &env.builder("b1").alias;
    for (key, host) in [
        (&m.key, format!("{alias}-frank")),
        (&env.client_key, alias.clone()),
    ] {
        let out = std::process::Command::new("ssh")
            .arg("-F")
            .arg(&env.ssh_config)
            .arg("-i")
            .arg(key)
            .args([
                "-o",
                &format!("UserKnownHostsFile={}", env.path().join("kh").display()),
            ])
            .args(["-o", "StrictHostKeyChecking=no", &host])
            .arg("echo hello; echo $((40 + 2)) \"$SSH_ORIGINAL_COMMAND\"")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout,
            "hello\n42 echo hello; echo $((40 + 2)) \"$SSH_ORIGINAL_COMMAND\"\n"
        );
    }
}

/// A `BuildPathsWithResults` (`nix build --store ssh-ng://…` of a derivation uploaded just
/// before) is gated too: the gate reads the derivation's system from the `.drv` file in the
/// builder's own store, asks for that system, and the output is built on the builder.
#[test]
fn build_paths_reads_the_derivation_from_the_builders_store() {
    let specs = [BuilderSpec::new("b1", 2)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let m = env.member("gina");
    let log = env.install_gate("b1", std::slice::from_ref(&m), &GateOpts::default());
    env.member_nix_conf(&m, &["b1"], "ssh-ng", 1);
    let (host, opts) = env.sshopts("b1", Some(&m));
    let tag = env.tag("paths");
    let nix = |args: &[&str]| {
        let out = std::process::Command::new("nix")
            .args(["--experimental-features", "nix-command"])
            .args(args)
            .env("NIX_CONF_DIR", &m.conf_dir)
            .env("NIX_SSHOPTS", &opts)
            .env_remove("NIX_REMOTE")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "nix {args:?}: {stderr}\n{}",
            read_log(&log)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let drv = {
        let out = std::process::Command::new("nix-instantiate")
            .arg(env.path().join("gate-e2e.nix"))
            .args(["--argstr", "tag", &tag, "--arg", "n", "1"])
            .env("NIX_CONF_DIR", &m.conf_dir)
            .env_remove("NIX_REMOTE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let store = format!("ssh-ng://{host}");
    nix(&["copy", "--derivation", "--to", &store, &drv]);
    nix(&["build", "--no-link", "--store", &store, &drv]);
    let text = read_log(&log);
    let held = text
        .lines()
        .find(|l| l.contains("build held"))
        .unwrap_or_else(|| panic!("no build held:\n{text}"));
    assert!(held.contains("op=\"BuildPaths"), "{held}");
    assert!(
        held.contains(&format!("system={}", common::this_system())),
        "{held}"
    );
    assert!(
        !env.builder("b1").store_paths_with(&tag).is_empty(),
        "the output is in the builder's store"
    );
    assert_eq!(env.gate_peaks("b1"), vec![1]);
}

/// A member who runs `nixdispatch-hook` on a builder that also runs the gate is counted
/// once: the hook's lease on the builder's only slot is attached to by the gate (instead of
/// the gate waiting for a second slot that would never come), the builds succeed, and the
/// gate neither keeps alive nor releases the hook's lease.
#[test]
fn hook_and_gate_share_one_lease() {
    let specs = [BuilderSpec::new("b1", 1)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let opts = GateOpts {
        force_command: true,
        ..GateOpts::default()
    };
    let log = env.install_gate("b1", &[], &opts);
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let hook = std::path::Path::new(env!("CARGO_BIN_EXE_nixdispatch-hook"));
    let tag = env.tag("attach");
    let run = env.nix_build(
        &config,
        hook,
        0,
        &["--argstr", "tag", &tag, "--arg", "leaves", "2"],
    );
    let text = read_log(&log);
    assert!(
        run.success,
        "{}\n--- gate log\n{text}",
        env.diagnostics(&run)
    );
    assert!(valid_in_client_store(run.out_path()));
    let attached = text.matches("attached to the hook's lease").count();
    assert_eq!(attached, 3, "two leaves and the top\n{text}");
    assert!(!text.contains("slot granted"), "{text}");
    assert!(!text.contains("released"), "{text}");
    common::wait_for(std::time::Duration::from_secs(30), "no lease left", || {
        env.leases().is_empty().then_some(())
    });
}

/// Builders running newer Nix (2.26 and 2.34, worker protocol 1.38, in chroots) behind the
/// gate, with stock Nix 2.8 members over ssh-ng and ssh: capped at their slots, every
/// build succeeds.
#[test]
fn newer_nix_builders_are_gated_too() {
    let mut specs = [BuilderSpec::new("b26", 2), BuilderSpec::new("b34", 2)];
    specs[0].nix = NixVersion::V2_26;
    specs[1].nix = NixVersion::V2_34;
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let members: Vec<Member> = ["hana", "ivan"].iter().map(|n| env.member(n)).collect();
    let logs: Vec<_> = ["b26", "b34"]
        .iter()
        .map(|b| env.install_gate(b, &members, &GateOpts::default()))
        .collect();
    for (m, scheme) in members.iter().zip(["ssh-ng", "ssh"]) {
        env.member_nix_conf(m, &["b26", "b34"], scheme, 4);
    }
    let children: Vec<_> = members
        .iter()
        .map(|m| {
            let tag = env.tag(&m.name);
            env.member_build_command(m, &tag, 4, "2")
                .spawn()
                .expect("nix-build")
        })
        .collect();
    let runs: Vec<NixRun> = children.into_iter().map(finish).collect();
    for run in &runs {
        assert_built_remotely(&env, run, 4, &logs);
    }
    let (p1, p2) = (env.gate_peaks("b26"), env.gate_peaks("b34"));
    assert_eq!(p1.len() + p2.len(), 8, "{p1:?} {p2:?}");
    assert!(
        p1.iter().chain(&p2).all(|&n| n <= 2),
        "b26 {p1:?}, b34 {p2:?}"
    );
    let gate_logs: String = logs.iter().map(|l| read_log(l)).collect();
    assert!(!gate_logs.contains("lost the protocol"), "{gate_logs}");
}
