//! End to end on every Nix a member runs: Nix 2.8 (the host's, Debian bookworm), 2.26
//! (Debian trixie; stands for 2.25 to 2.33, which ignore `build-hook` in nix.conf) and 2.34
//! (Debian sid). Newer versions run from cached chroots (`tests/nix-chroot.sh`).
//!
//! Which scenario runs on which version, and why (the whole file must stay a small part of a
//! 30-minute CI on 2 cores):
//! - **Builder side on every version** (one test, three builders): the agent's discovery
//!   (`nix show-config` on 2.8, `nix config show` later) and its build counting differ per
//!   version, and every member version talks to every builder version.
//! - **Member side on every version, configured as `docs/hook.md` says** (a real
//!   `nix-daemon`, builds submitted through it by an unprivileged user): nix.conf on 2.8 and
//!   2.34, the daemon's command line on 2.26. Each member test builds on a builder of another
//!   version where that adds a pair: 2.8 → 2.34 and 2.34 → 2.8 are the mixed pairs (oldest
//!   and newest worker protocols, 1.34 against 1.38); 2.26 → 2.26 is the one same-version
//!   pair of the newer releases. The builder test adds 2.8 → 2.26 and 2.8 → 2.34 over
//!   ssh-ng.
//! - **The nix.conf trap only on 2.26**: the one version here where it exists; the test keeps
//!   the documentation's warning true.
//!
//! Needs root, the host's `nix-bin`, `openssh-server`, `busybox-static`, network access to
//! the Debian mirror on first use (or the cached chroots), and the workspace's binaries.

mod common;

use common::member::{HookPlace, Member};
use common::nixver::NixVersion;
use common::{BuilderSpec, Env, NixRun, this_system, wait_for};
use nixdispatch::proto::ListHostsRequest;
use std::time::Duration;

/// Everything the member tests look at when one fails.
fn diagnostics(env: &Env, run: &NixRun) -> String {
    let mut s = env.diagnostics(run);
    for entry in std::fs::read_dir(env.path().join("log"))
        .into_iter()
        .flatten()
    {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains("daemon") || name.starts_with("agent_") {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            s.push_str(&format!("\n--- {name} (last lines)\n"));
            s.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
    }
    s
}

/// A member on `member_nix`, configured as the docs say (or with the hook in `place`),
/// builds two leaves and a top through its daemon; returns the run and where things went.
fn member_build(
    member_nix: NixVersion,
    place: HookPlace,
    builder_nix: NixVersion,
) -> (Env, Member, NixRun, String) {
    let mut spec = BuilderSpec::new("b1", 2);
    spec.nix = builder_nix;
    let specs = [spec];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let member = env.start_member(member_nix, place, &config);
    let tag = env.tag(&format!("m{}", member_nix.label().replace('.', "")));
    let run = member.nix_build(&["--argstr", "tag", &tag, "--arg", "leaves", "2"]);
    (env, member, run, tag)
}

/// `nixdispatch doctor` on the member's machine: whether it is content, and its report.
fn doctor(env: &Env, member: &Member) -> (bool, String) {
    let out = member
        .command(&env.bin("nixdispatch"))
        .arg("doctor")
        .arg("--hook")
        .arg(&member.hook)
        .output()
        .expect("nixdispatch doctor");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), report)
}

/// Checks that every derivation of `run` was built on `b1` through nixdispatch-hook, and
/// that `nixdispatch doctor` says the daemon uses it.
fn assert_built_through_hook(env: &Env, member: &Member, run: &NixRun, tag: &str) {
    assert!(run.success, "{}", diagnostics(env, run));
    let out = run.out_path();
    assert!(
        member.host_path(out).exists(),
        "{out} is not in the member's store\n{}",
        diagnostics(env, run)
    );
    let places = member.placements(out);
    assert_eq!(places.len(), 3, "{places:?}\n{}", diagnostics(env, run));
    assert!(
        places.iter().all(|(_, host)| host == "b1"),
        "{places:?}\n{}",
        diagnostics(env, run)
    );
    assert!(
        run.stderr.contains("nixdispatch: building"),
        "{}",
        diagnostics(env, run)
    );
    assert!(!env.builder("b1").store_paths_with(tag).is_empty());
    assert!(env.leases().is_empty(), "leases left: {:?}", env.leases());
    let (healthy, report) = doctor(env, member);
    assert!(
        healthy
            && report.contains("ok    build-hook   nixdispatch-hook")
            && report.contains("ok    scheduler    ")
            && report.contains("ok    builder b1   "),
        "{report}"
    );
}

/// Nix 2.8 member, hook in nix.conf (as documented), builds through its daemon on a Nix 2.34
/// builder: old client, new builder.
#[test]
fn member_2_8_with_hook_in_nix_conf_builds_on_a_2_34_builder() {
    let (env, member, run, tag) = member_build(
        NixVersion::V2_8,
        HookPlace::documented_for(NixVersion::V2_8),
        NixVersion::V2_34,
    );
    assert_built_through_hook(&env, &member, &run, &tag);
}

/// Nix 2.34 member, hook in nix.conf (as documented), builds through its daemon on a Nix 2.8
/// builder: new client, old builder.
#[test]
fn member_2_34_with_hook_in_nix_conf_builds_on_a_2_8_builder() {
    let (env, member, run, tag) = member_build(
        NixVersion::V2_34,
        HookPlace::documented_for(NixVersion::V2_34),
        NixVersion::V2_8,
    );
    assert_built_through_hook(&env, &member, &run, &tag);
}

/// Nix 2.26 member, hook on the daemon's command line (as documented), builds through its
/// daemon on a Nix 2.26 builder.
#[test]
fn member_2_26_with_hook_on_daemon_command_line_builds_on_a_2_26_builder() {
    assert_eq!(
        HookPlace::documented_for(NixVersion::V2_26),
        HookPlace::DaemonCommandLine
    );
    let (env, member, run, tag) = member_build(
        NixVersion::V2_26,
        HookPlace::DaemonCommandLine,
        NixVersion::V2_26,
    );
    assert_built_through_hook(&env, &member, &run, &tag);
}

/// On Nix 2.26, `build-hook` in nix.conf alone never starts nixdispatch-hook: the build
/// fails (`max-jobs = 0`) without a word from it, which is the trap the docs warn about;
/// `nixdispatch doctor` sees it and gives the command-line fix.
#[test]
fn member_2_26_with_hook_only_in_nix_conf_never_runs_it() {
    let (env, member, run, _tag) =
        member_build(NixVersion::V2_26, HookPlace::NixConf, NixVersion::V2_26);
    assert!(!run.success, "{}", diagnostics(&env, &run));
    assert!(!run.stderr.contains("nixdispatch: "), "{}", run.stderr);
    assert!(
        run.stderr.contains("Unable to start any build"),
        "{}",
        run.stderr
    );
    assert!(
        env.hook_log().is_empty(),
        "the hook ran:\n{}",
        env.hook_log()
    );
    let (healthy, report) = doctor(&env, &member);
    assert!(!healthy, "{report}");
    assert!(
        report.contains("FAIL  build-hook   the daemon runs `/usr/bin/nix __build-remote`")
            && report.contains(&format!(
                "fix: nix (Nix) 2.26.3 ignores `build-hook = {}`",
                member.hook.display()
            ))
            && report.contains(&format!("`--option build-hook {}`", member.hook.display())),
        "{report}"
    );
}

/// On every version the agent discovers the builder's settings from its Nix (`nix
/// show-config` on 2.8, `nix config show` later) and counts the builds running there; a
/// Nix 2.8 client builds on all three over ssh-ng.
#[test]
fn agents_discover_and_count_builds_on_every_version() {
    let specs: Vec<BuilderSpec> = NixVersion::ALL
        .iter()
        .zip(["b28", "b226", "b234"])
        .map(|(nix, id)| {
            let mut spec = BuilderSpec::new(id, 1);
            spec.nix = *nix;
            spec.discover = true;
            spec
        })
        .collect();
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let hosts = || {
        env.admin(|mut a| async move { a.list_hosts(ListHostsRequest {}).await })
            .expect("ListHosts")
            .hosts
    };
    for spec in &specs {
        let host = hosts().into_iter().find(|h| h.host_id == spec.id).unwrap();
        let mut features = host.supported_features.clone();
        features.sort();
        assert_eq!(
            (
                host.systems.contains(&this_system()),
                features,
                host.slots_total
            ),
            (
                true,
                vec!["e2e".to_owned(), format!("nix-{}", spec.nix.label())],
                1
            ),
            "{} discovered wrongly: {host:?}",
            spec.nix
        );
    }

    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let gate = env.path().join("gate");
    let tag = env.tag("count");
    let hook = env.bin("nixdispatch-hook");
    let build = env
        .nix_build_command(
            &config,
            &hook,
            "",
            0,
            &[
                "--argstr",
                "tag",
                &tag,
                "--arg",
                "leaves",
                "3",
                "--argstr",
                "gate",
                gate.to_str().unwrap(),
            ],
        )
        .spawn()
        .expect("nix-build");
    // One leaf per builder (one slot each), held until the gate opens: every agent must
    // report exactly one running build.
    let counted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(
            Duration::from_secs(60),
            "every agent to count its one running build",
            || {
                let hosts = hosts();
                specs
                    .iter()
                    .all(|s| {
                        hosts
                            .iter()
                            .any(|h| h.host_id == s.id && h.running_builds == Some(1))
                    })
                    .then_some(())
            },
        )
    }));
    std::fs::write(&gate, "").unwrap();
    let out = build.wait_with_output().expect("nix-build");
    let run = NixRun::from_output(&out, Duration::ZERO);
    if counted.is_err() {
        panic!(
            "the agents did not count the running builds: {:?}\n{}",
            hosts()
                .iter()
                .map(|h| (h.host_id.clone(), h.running_builds))
                .collect::<Vec<_>>(),
            diagnostics(&env, &run)
        );
    }
    assert!(run.success, "{}", diagnostics(&env, &run));
    let places: Vec<String> = std::fs::read_to_string(run.out_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("leaf"))
        .filter_map(|l| l.split_once(' ').map(|(_, h)| h.to_owned()))
        .collect();
    let mut places_sorted = places.clone();
    places_sorted.sort();
    assert_eq!(places_sorted, ["b226", "b234", "b28"], "{places:?}");
    assert!(env.leases().is_empty(), "leases left: {:?}", env.leases());
}
