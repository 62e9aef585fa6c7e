//! End to end: Debian's Nix (2.8) builds through `nixdispatch-hook` on real OpenSSH builders
//! on loopback, each with its own store, placed by the real scheduler and agents.
//!
//! Needs root, `nix-bin`, `openssh-server` and `busybox-static` (the test script installs
//! them), and the workspace's binaries (`cargo build --workspace --bins`).

mod common;

use common::{BuilderSpec, Env, valid_in_client_store};

fn hook() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_BIN_EXE_nixdispatch-hook"))
}

/// Where each leaf and the top were built, from the output's content.
fn placements(out_path: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(out_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
        .collect()
}

/// A `nix-build --max-jobs 0` of five derivations goes through the hook, spreads the four
/// parallel leaves over the builders by capacity (3 slots vs 1), leaves valid outputs in the
/// client's store and no lease behind.
#[test]
fn builds_spread_over_builders_by_capacity() {
    let specs = [BuilderSpec::new("b1", 3), BuilderSpec::new("b2", 1)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let tag = env.tag("spread");
    let run = env.nix_build(
        &config,
        hook(),
        0,
        &[
            "--argstr", "tag", &tag, "--arg", "leaves", "4", "--argstr", "sleep", "3",
        ],
    );
    eprintln!("nix-build stderr:\n{}", run.stderr);
    assert!(run.success, "{}", env.diagnostics(&run));
    let out = run.out_path();
    assert!(
        valid_in_client_store(out),
        "{out} is not valid in the client store\n{}",
        env.diagnostics(&run)
    );
    let places = placements(out);
    let on = |b: &str| {
        places
            .iter()
            .filter(|(what, host)| what.starts_with("leaf") && host == b)
            .count()
    };
    assert_eq!(places.len(), 5, "{places:?}");
    assert_eq!(
        (on("b1"), on("b2")),
        (3, 1),
        "leaves by builder: {places:?}\n{}",
        env.diagnostics(&run)
    );
    assert!(!places.iter().any(|(_, h)| h == "local"), "{places:?}");
    // Closures really travelled: each builder's own store holds what it built.
    assert!(
        !env.builder("b2")
            .store_paths_with(&format!("-{tag}"))
            .is_empty()
    );
    assert!(
        run.stderr.contains("nixdispatch: building"),
        "{}",
        env.diagnostics(&run)
    );
    // The 3 s builds outlive the 3 s lease TTL: only the hook's keep-alives held them.
    assert!(
        !env.hook_log().contains("keep-alive failed"),
        "{}",
        env.diagnostics(&run)
    );
    assert!(env.leases().is_empty(), "leases left: {:?}", env.leases());
}

/// The shipped deployment's shape end to end: TLS with a pinned CA, agents proving their
/// provisioned hosts with their own tokens, the hook authenticating as a member. The build
/// goes through the hook to the builders, and the leases are the member's and all released.
#[test]
fn authenticated_build_over_tls() {
    let specs = [BuilderSpec::new("b1", 2), BuilderSpec::new("b2", 1)];
    let mut env = Env::new(&specs);
    env.secure = true;
    env.start_scheduler_and_agents(&specs);
    let url = env.scheduler_addr.clone().unwrap();
    assert!(url.starts_with("https://"), "{url}");
    let config = env.write_hook_config(&url, "");
    let tag = env.tag("secure");
    let run = env.nix_build(
        &config,
        hook(),
        0,
        &[
            "--argstr", "tag", &tag, "--arg", "leaves", "2", "--argstr", "sleep", "1",
        ],
    );
    assert!(run.success, "{}", env.diagnostics(&run));
    let places = placements(run.out_path());
    assert_eq!(places.len(), 3, "{places:?}");
    assert!(!places.iter().any(|(_, h)| h == "local"), "{places:?}");
    assert!(env.leases().is_empty(), "leases left: {:?}", env.leases());
    assert!(
        !env.hook_log().contains("unauthenticated"),
        "{}",
        env.diagnostics(&run)
    );
}

/// A registered builder whose sshd is down, and one whose pinned host key is wrong, are
/// skipped (released as unreachable, another host asked for) and the build still succeeds.
#[test]
fn unreachable_and_wrongly_pinned_builders_are_skipped() {
    // The broken hosts are the fastest, so the scheduler picks them first.
    let mut down = BuilderSpec::new("bdown", 2);
    down.speed_factor = 100.0;
    down.up = false;
    let mut badkey = BuilderSpec::new("bbadkey", 2);
    badkey.speed_factor = 50.0;
    badkey.wrong_pinned_key = true;
    let specs = [down, badkey, BuilderSpec::new("b1", 2)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let tag = env.tag("skip");
    let run = env.nix_build(
        &config,
        hook(),
        0,
        &["--argstr", "tag", &tag, "--arg", "leaves", "1"],
    );
    eprintln!("nix-build stderr:\n{}", run.stderr);
    assert!(run.success, "{}", env.diagnostics(&run));
    let places = placements(run.out_path());
    assert!(
        places.iter().all(|(_, h)| h == "b1"),
        "{places:?}\n{}",
        env.diagnostics(&run)
    );
    assert!(
        run.stderr.contains("cannot use builder bdown"),
        "{}",
        env.diagnostics(&run)
    );
    assert!(
        run.stderr.contains("cannot use builder bbadkey"),
        "{}",
        env.diagnostics(&run)
    );
    // The wrongly pinned host was really reached and refused by ssh, not merely skipped.
    assert!(env.builder("bbadkey").store_paths_with(&tag).is_empty());
    assert!(env.leases().is_empty(), "leases left: {:?}", env.leases());
}

/// A builder that fails a build once is tried again when no other builder can take it:
/// the only builder's Nix refuses to start (a broken `nix.conf`, repaired right after the
/// first failure), the hook releases the lease as unreachable and asks again; once its own
/// avoidance and the scheduler's cool-down for the member have passed it gets the same
/// builder, and the build succeeds instead of failing for want of another host.
#[test]
fn a_builder_that_failed_once_is_tried_again() {
    let specs = [BuilderSpec::new("b1", 2)];
    let mut env = Env::new(&specs);
    env.unreachable_cooldown_millis = Some(2000);
    env.start_scheduler_and_agents(&specs);
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let conf = env.builder("b1").root.join("conf/nix.conf");
    let good = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("{good}max-jobs = not-a-number\n")).unwrap();
    let tag = env.tag("again");
    let child = env
        .nix_build_command(
            &config,
            hook(),
            "",
            0,
            &["--argstr", "tag", &tag, "--arg", "leaves", "1"],
        )
        .spawn()
        .unwrap();
    common::wait_for(
        std::time::Duration::from_secs(60),
        "the first attempt to fail",
        || env.hook_log().contains("HostUnreachable").then_some(()),
    );
    std::fs::write(&conf, good).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stderr}\n--- hook log\n{}",
        env.hook_log()
    );
    assert!(stderr.contains("cannot use builder b1"), "{stderr}");
    assert!(
        stderr.contains("building leaf1") && stderr.contains("on b1 instead"),
        "{stderr}"
    );
    let out_path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        placements(&out_path).iter().all(|(_, h)| h == "b1"),
        "{out_path}: {stderr}"
    );
    assert!(env.leases().is_empty(), "leases left: {:?}", env.leases());
}

/// Asserts that `run` built the two leaves and the top, all on `host` (`local`: the client),
/// and told the user `message`.
fn assert_two_leaves_and_top_built_on(env: &Env, run: &common::NixRun, host: &str, message: &str) {
    eprintln!("nix-build stderr:\n{}", run.stderr);
    assert!(run.success, "{}", env.diagnostics(run));
    let places = placements(run.out_path());
    assert_eq!(places.len(), 3, "{places:?}");
    assert!(
        places.iter().all(|(_, h)| h == host),
        "{places:?}\n{}",
        env.diagnostics(run)
    );
    assert!(run.stderr.contains(message), "{}", env.diagnostics(run));
}

/// With the scheduler down, the configured static fallback machines are used.
#[test]
fn scheduler_down_uses_fallback_builders() {
    let specs = [BuilderSpec::new("b1", 2), BuilderSpec::new("b2", 2)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs[..1]);
    let url = env.scheduler_addr.clone().unwrap();
    env.stop_scheduler();
    let fallback = env.machines_line("b2", 2);
    let config = env.write_hook_config(&url, &format!("fallback_builders = \"{fallback}\""));
    let tag = env.tag("fallback");
    let run = env.nix_build(
        &config,
        hook(),
        0,
        &["--argstr", "tag", &tag, "--arg", "leaves", "2"],
    );
    assert_two_leaves_and_top_built_on(&env, &run, "b2", "using the fallback builders");
}

/// With the scheduler down and no fallback, the hook declines and Nix builds locally.
#[test]
fn scheduler_down_without_fallback_builds_locally() {
    let env = Env::new(&[]);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let config = env.write_hook_config(&url, "");
    let tag = env.tag("local");
    let run = env.nix_build(
        &config,
        hook(),
        2,
        &["--argstr", "tag", &tag, "--arg", "leaves", "2"],
    );
    assert_two_leaves_and_top_built_on(&env, &run, "local", "scheduler unreachable");
}

/// A build that fails on the builder fails in Nix with the builder's log, and its lease is
/// released.
#[test]
fn failing_build_reports_builder_log_and_releases_lease() {
    let specs = [BuilderSpec::new("b1", 2)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let tag = env.tag("fail");
    let run = env.nix_build(
        &config,
        hook(),
        0,
        &["--argstr", "tag", &tag, "--arg", "fail", "true"],
    );
    eprintln!("nix-build stderr:\n{}", run.stderr);
    assert!(!run.success, "{}", env.diagnostics(&run));
    assert!(
        run.stderr.contains("nixdispatch-e2e-failure-marker on b1"),
        "the builder's log is not in Nix's error\n{}",
        env.diagnostics(&run)
    );
    assert!(env.leases().is_empty(), "leases left: {:?}", env.leases());
}

/// A scheduler killed and restarted in the middle of a build fails nothing: the running
/// builds finish, the leases they held are unknown to the new scheduler until their hooks'
/// keep-alives re-attach them, the agents reconnect on their own, the derivation built after
/// the restart gets a lease from the new scheduler, and no lease is left at the end.
#[test]
fn scheduler_restart_mid_build_fails_nothing() {
    let specs = [BuilderSpec::new("b1", 2), BuilderSpec::new("b2", 2)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let tag = env.tag("restart");
    let started = std::time::Instant::now();
    let build = env
        .nix_build_command(
            &config,
            hook(),
            "",
            0,
            &[
                "--argstr", "tag", &tag, "--arg", "leaves", "2", "--argstr", "sleep", "6",
            ],
        )
        .spawn()
        .expect("nix-build");
    // Restart once both leaves hold leases, i.e. while they are building.
    common::wait_for(
        std::time::Duration::from_secs(60),
        "both leaves leased",
        || (env.leases().len() == 2).then_some(()),
    );
    env.restart_scheduler();
    env.wait_until_ready(&specs);
    // Only leases their holders re-attached (a keep-alive carries the lease's details).
    let leases = env.leases();
    assert!(
        leases.len() <= 2,
        "a restarted scheduler knows only re-attached leases: {leases:?}"
    );
    let out = build.wait_with_output().expect("nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "nix-build failed after {:?}:\n{stderr}\nhook log:\n{}",
        started.elapsed(),
        env.hook_log()
    );
    let out_path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(valid_in_client_store(&out_path), "{out_path}");
    assert_eq!(
        placements(&out_path).len(),
        3,
        "two leaves and the top were built remotely"
    );
    common::wait_for(std::time::Duration::from_secs(30), "no lease left", || {
        env.leases().is_empty().then_some(())
    });
}

/// A member whose daemon may not build locally (`max-jobs = 0`) sharing one single-slot
/// builder among three leaves: every build Nix cannot start is accepted at once and waits
/// in the scheduler's queue (the member sees its position), each freed slot goes straight
/// to the next, and everything is built on the builder.
#[test]
fn a_full_builder_accepts_and_waits_in_the_queue() {
    let specs = [BuilderSpec::new("b1", 1)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let tag = env.tag("queue");
    let run = env.nix_build(
        &config,
        hook(),
        0,
        &[
            "--argstr", "tag", &tag, "--arg", "leaves", "3", "--argstr", "sleep", "1",
        ],
    );
    assert!(run.success, "{}", env.diagnostics(&run));
    let places = placements(run.out_path());
    assert_eq!(places.len(), 4, "{places:?}");
    assert!(places.iter().all(|(_, h)| h == "b1"), "{places:?}");
    assert!(
        run.stderr.contains("builder: position"),
        "the member is shown its place in the queue\n{}",
        env.diagnostics(&run)
    );
    common::wait_for(std::time::Duration::from_secs(30), "no lease left", || {
        env.leases().is_empty().then_some(())
    });
}

/// The scheduler killed (SIGKILL) while one build runs and others wait in its queue, and
/// started again once a waiting hook has noticed: the waiting hooks re-connect and queue
/// again, the running build's lease is re-attached by its keep-alives, and the whole build
/// succeeds on the builder, losing nothing.
#[test]
fn a_scheduler_outage_with_builds_waiting_loses_no_build() {
    let specs = [BuilderSpec::new("b1", 1)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let tag = env.tag("outage");
    let build = env
        .nix_build_command(
            &config,
            hook(),
            "",
            0,
            &[
                "--argstr", "tag", &tag, "--arg", "leaves", "3", "--argstr", "sleep", "2",
            ],
        )
        .spawn()
        .expect("nix-build");
    common::wait_for(
        std::time::Duration::from_secs(60),
        "one leaf building and another waiting",
        || {
            let waiting = env
                .admin(|mut a| async move {
                    a.get_capacity(nixdispatch::proto::GetCapacityRequest {})
                        .await
                })
                .ok()?
                .systems
                .iter()
                .map(|s| s.waiting)
                .sum::<u32>();
            (env.leases().len() == 1 && waiting >= 1).then_some(())
        },
    );
    env.stop_scheduler();
    common::wait_for(
        std::time::Duration::from_secs(30),
        "a waiting hook to notice the outage",
        || {
            env.hook_log()
                .contains("waiting stream broken")
                .then_some(())
        },
    );
    env.restart_scheduler();
    env.wait_until_ready(&specs);
    let out = build.wait_with_output().expect("nix-build");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "nix-build failed:\n{stderr}\nhook log:\n{}",
        env.hook_log()
    );
    let out_path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let places = placements(&out_path);
    assert_eq!(places.len(), 4, "{places:?}");
    assert!(places.iter().all(|(_, h)| h == "b1"), "{places:?}");
    assert!(stderr.contains("lost the scheduler"), "{stderr}");
    common::wait_for(std::time::Duration::from_secs(30), "no lease left", || {
        env.leases().is_empty().then_some(())
    });
}

/// The control sockets in `dir` whose master answers.
fn live_masters(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_none())
                .filter(|p| std::os::unix::net::UnixStream::connect(p).is_ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Builds the test derivation through the hook with `config` (tag `what`, `leaves` leaves,
/// `extra` arguments) and asserts that it succeeded, showing `context()` with the
/// diagnostics when it did not.
fn build_ok(
    env: &Env,
    config: &std::path::Path,
    (what, leaves): (&str, &str),
    extra: &[&str],
    context: impl Fn() -> String,
) -> common::NixRun {
    let tag = env.tag(what);
    let mut args = vec!["--argstr", "tag", &tag, "--arg", "leaves", leaves];
    args.extend_from_slice(extra);
    let run = env.nix_build(config, hook(), 0, &args);
    assert!(run.success, "{}{}", env.diagnostics(&run), context());
    run
}

/// Asserts that every derivation of `run` was built on `host`.
fn built_on(env: &Env, run: &common::NixRun, host: &str) {
    assert!(
        placements(run.out_path()).iter().all(|(_, h)| h == host),
        "{}",
        env.diagnostics(run)
    );
}

/// Waits for a live master in the member's control directory `dir`; returns its socket.
fn wait_for_master(dir: &std::path::Path, what: &str) -> std::path::PathBuf {
    common::wait_for(std::time::Duration::from_secs(60), what, || {
        live_masters(dir).pop()
    })
}

/// SSH connection reuse with real OpenSSH: the hook starts one master per builder (a
/// builder whose pinned key is wrong gets none: the master refuses it as Nix would), the
/// builds that follow join it (the builder's sshd accepts no new login), and a master
/// killed with SIGKILL leaves a dead socket that the next build steps over: it connects
/// directly, succeeds, and a new master replaces the dead one.
#[test]
fn builds_reuse_one_ssh_master_per_builder() {
    let mut badkey = BuilderSpec::new("bbadkey", 2);
    badkey.speed_factor = 50.0;
    badkey.wrong_pinned_key = true;
    let specs = [badkey, BuilderSpec::new("b1", 2)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let dir = env.ssh_control_dir("");
    let build = |env: &Env, what: &str| {
        let run = build_ok(env, &config, (what, "1"), &[], String::new);
        built_on(env, &run, "b1");
    };

    build(&env, "first");
    // The wrongly pinned builder's master was refused by ssh itself, and left no socket.
    common::wait_for(
        std::time::Duration::from_secs(20),
        "the refused master's message in the hook's log",
        || {
            env.hook_log()
                .contains("Host key verification failed")
                .then_some(())
        },
    );
    let socket = wait_for_master(&dir, "b1's SSH master");
    assert_eq!(live_masters(&dir).len(), 1, "one master: b1's");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dir).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);

    // Both derivations of the second build join the master: no new login on b1.
    let before = env.ssh_logins()["b1"];
    build(&env, "second");
    assert_eq!(env.ssh_logins()["b1"], before, "{}", env.hook_log());
    assert!(env.hook_log().contains("joining the SSH master"));

    // Kill the master (SIGKILL: its socket file stays behind, refusing connections).
    let check = std::process::Command::new("ssh")
        .args(["-O", "check", "-o"])
        .arg(format!("ControlPath={}", socket.display()))
        .arg("b1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stderr).into_owned();
    let pid: i32 = text
        .split("pid=")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("ssh -O check: {text}"));
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    common::wait_for(
        std::time::Duration::from_secs(10),
        "the master's death",
        || live_masters(&dir).is_empty().then_some(()),
    );
    assert!(socket.exists(), "a dead master leaves its socket");

    // The next build steps over the dead socket and connects directly.
    let before = env.ssh_logins()["b1"];
    build(&env, "third");
    assert!(env.ssh_logins()["b1"] > before);
    assert!(env.hook_log().contains("removed a dead master's socket"));
    wait_for_master(&dir, "a new master");
    assert!(env.leases().is_empty(), "leases left: {:?}", env.leases());
}

/// A build waiting in the queue connects ahead: while the builder's only slot is taken, the
/// waiting hook (its member's own control directory, empty so far) starts a master to the
/// builder it may be granted, so that the grant finds the connection ready; both builds
/// then succeed.
#[test]
fn a_waiting_build_connects_ahead() {
    let specs = [BuilderSpec::new("b1", 1)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let url = env.scheduler_addr.clone().unwrap();
    let holder = env.write_hook_config(&url, "");
    let waiter = env.write_hook_config_named("ahead", &url, "");
    let gate = env.path().join("release-the-slot");
    let (tag_a, tag_b) = (env.tag("hold"), env.tag("ahead"));
    let gate_arg = gate.display().to_string();
    let a = env
        .nix_build_command(
            &holder,
            hook(),
            "",
            0,
            &[
                "--argstr", "tag", &tag_a, "--arg", "leaves", "1", "--argstr", "gate", &gate_arg,
            ],
        )
        .spawn()
        .unwrap();
    common::wait_for(std::time::Duration::from_secs(60), "the slot taken", || {
        (env.leases().len() == 1).then_some(())
    });
    let b = env
        .nix_build_command(
            &waiter,
            hook(),
            "",
            0,
            &["--argstr", "tag", &tag_b, "--arg", "leaves", "1"],
        )
        .spawn()
        .unwrap();
    wait_for_master(
        &env.ssh_control_dir("ahead"),
        "a master started by the waiting hook",
    );
    std::fs::write(&gate, "").unwrap();
    for (what, child) in [("holder", a), ("waiter", b)] {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{what}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            env.hook_log()
        );
    }
    let log = std::fs::read_to_string(env.path().join("log/hook-ahead.log")).unwrap();
    assert!(log.contains("joining the SSH master"), "{log}");
}

/// The builder-side gate, sshd's forced command, runs once per SSH session, so builds that
/// share one SSH connection still each pass through it: once a first build has left a
/// master, the next build's derivations all join it (the builder's sshd accepts no new
/// login) and the gate attaches to the lease of every one of them.
#[test]
fn the_gate_sees_every_build_over_a_shared_connection() {
    let specs = [BuilderSpec::new("b1", 1)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let opts = common::gate::GateOpts {
        force_command: true,
        ..common::gate::GateOpts::default()
    };
    let gate_log = env.install_gate("b1", &[], &opts);
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let build = |env: &Env, what: &str, leaves: &str| {
        build_ok(env, &config, (what, leaves), &[], || {
            format!("\n--- gate log\n{}", common::gate::read_log(&gate_log))
        });
    };
    build(&env, "first", "1");
    wait_for_master(&env.ssh_control_dir(""), "b1's SSH master");
    let attached = || {
        common::gate::read_log(&gate_log)
            .matches("attached to the hook's lease")
            .count()
    };
    let (logins, before) = (env.ssh_logins()["b1"], attached());
    build(&env, "second", "2");
    assert_eq!(env.ssh_logins()["b1"], logins, "{}", env.hook_log());
    assert_eq!(
        attached() - before,
        3,
        "two leaves and the top, each its own session through the gate\n{}",
        common::gate::read_log(&gate_log)
    );
}

/// Over `ssh://` (the serve protocol, `nix-store --serve`) as over `ssh-ng://`: once a first
/// build has left a master, the next build's derivations join it (no new login) and build.
#[test]
fn builds_over_ssh_uris_share_a_master_too() {
    let mut spec = BuilderSpec::new("b1", 2);
    spec.scheme = "ssh";
    let specs = [spec];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    assert!(env.builder("b1").store_uri().starts_with("ssh://"));
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let build = |env: &Env, what: &str, leaves: &str| {
        let run = build_ok(env, &config, (what, leaves), &[], String::new);
        built_on(env, &run, "b1");
    };
    build(&env, "first", "1");
    wait_for_master(&env.ssh_control_dir(""), "b1's SSH master");
    let logins = env.ssh_logins()["b1"];
    build(&env, "second", "2");
    assert_eq!(env.ssh_logins()["b1"], logins, "{}", env.hook_log());
}

/// A build that the master cannot carry connects directly, so sharing a connection never
/// fails a build: here the builder's sshd allows one session per connection (`MaxSessions
/// 1`) and another build holds the master's; the refused session's `ssh` (told
/// `ControlMaster=no`) logs in on its own, and both builds succeed.
#[test]
fn a_build_the_master_cannot_carry_connects_directly() {
    let specs = [BuilderSpec::new("b1", 2)];
    let mut env = Env::new(&specs);
    // sshd -i reads its configuration for each connection, the master's included.
    let sshd_config = env.path().join("sshd_b1.config");
    let mut text = std::fs::read_to_string(&sshd_config).unwrap();
    text.push_str("MaxSessions 1\n");
    std::fs::write(&sshd_config, text).unwrap();
    env.start_scheduler_and_agents(&specs);
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let build = |env: &Env, what: &str, leaves: &str| {
        build_ok(
            env,
            &config,
            (what, leaves),
            &["--argstr", "sleep", "2"],
            String::new,
        );
    };
    build(&env, "first", "1");
    wait_for_master(&env.ssh_control_dir(""), "b1's SSH master");
    // Two leaves at once: one holds the master's only session, the other is refused there.
    let logins = env.ssh_logins()["b1"];
    build(&env, "second", "2");
    let sshd_log = std::fs::read_to_string(env.path().join("log/sshd_b1.log")).unwrap();
    assert!(sshd_log.contains("no more sessions"), "{sshd_log}");
    assert!(env.ssh_logins()["b1"] > logins, "{sshd_log}");
}
