//! End to end with the scheduler's SSH probe on: a builder whose sshd died while its agent
//! goes on reporting is taken out of placement before any member's build is sent there.
//! Real Nix 2.8 builds through `nixdispatch-hook`; two real OpenSSH builders, each on a
//! loopback address of its own and one shared port, so that the scheduler's probe reaches
//! them at the address their store URI names, as members do (`Env::new_probed`).
//!
//! Needs root, `nix-bin`, `openssh-server` and `busybox-static` (the test script installs
//! them), and the workspace's binaries.

mod common;

use std::time::Duration;

use common::{BuilderSpec, Env, this_system, wait_for};
use nixdispatch::proto::{ExplainPlacementRequest, HostState, ListHostsRequest};

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

/// The dead builder is the fastest and has the most slots, so without the probe placement
/// would pick it first; with its sshd stopped (agent still reporting), `ListHosts` and
/// `ExplainPlacement` say the probe keeps it out, and a member's three concurrent leaves
/// and their top all go to the live builder: the hook is never granted the dead one.
#[test]
fn a_dead_builder_is_skipped_before_anyone_waits() {
    let mut dead = BuilderSpec::new("bdead", 4);
    dead.speed_factor = 100.0;
    let specs = [dead, BuilderSpec::new("blive", 4)];
    let mut env = Env::new_probed(&specs);
    env.scheduler_extra = format!(
        "[probe]\nenabled = true\ninterval_millis = 300\ntimeout_millis = 3000\n\
         failures_to_open = 1\nbackoff_initial_millis = 60000\nkey_file = \"{}\"\n\
         default_port = {}\n",
        env.client_key.display(),
        env.shared_ssh_port.unwrap()
    );
    env.start_scheduler_and_agents(&specs);
    let hosts = |env: &Env| {
        env.admin(|mut a| async move { a.list_hosts(ListHostsRequest {}).await })
            .expect("ListHosts")
            .hosts
    };
    // Both pass their probe first: the probe reaches builders where members do.
    wait_for(Duration::from_secs(20), "both builders placeable", || {
        let h = hosts(&env);
        (h.len() == 2 && h.iter().all(|h| h.unavailable_reason.is_empty())).then_some(())
    });

    let i = env.builders.iter().position(|b| b.id == "bdead").unwrap();
    env.builders[i].endpoint = None;
    let reason = wait_for(Duration::from_secs(20), "the probe takes bdead out", || {
        let h = hosts(&env).into_iter().find(|h| h.host_id == "bdead")?;
        h.unavailable_reason
            .contains("SSH probe failed")
            .then_some(h)
    });
    // Its agent still reports: only the probe knows it is dead.
    assert_eq!(reason.state(), HostState::Ready, "{reason:?}");
    let explained = env
        .admin(|mut a| async move {
            a.explain_placement(ExplainPlacementRequest {
                system: this_system(),
                required_features: Vec::new(),
            })
            .await
        })
        .expect("ExplainPlacement");
    assert_eq!(explained.chosen_host_id, "blive", "{explained:?}");
    let verdict = explained
        .hosts
        .iter()
        .find(|v| v.host_id == "bdead")
        .unwrap();
    assert!(
        !verdict.eligible && verdict.reason.contains("SSH probe failed"),
        "{verdict:?}"
    );

    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");
    let tag = env.tag("probe");
    let run = env.nix_build(
        &config,
        hook(),
        0,
        &["--argstr", "tag", &tag, "--arg", "leaves", "3"],
    );
    assert!(run.success, "{}", env.diagnostics(&run));
    let places = placements(run.out_path());
    assert_eq!(places.len(), 4, "{places:?}");
    assert!(
        places.iter().all(|(_, h)| h == "blive"),
        "{places:?}\n{}",
        env.diagnostics(&run)
    );
    let log = env.hook_log();
    assert!(
        log.contains("host_id: \"blive\""),
        "the hook log shows the grants\n{log}"
    );
    assert!(
        !log.contains("host_id: \"bdead\""),
        "no grant to the dead builder\n{log}"
    );
    assert!(
        !run.stderr.contains("cannot use builder"),
        "no build tried a dead builder\n{}",
        env.diagnostics(&run)
    );
}
