//! Benchmark, not a test of behaviour: the time `nixdispatch-hook` adds per build against
//! Nix's stock build-remote, on the same trivial builds on the same real SSH builder, side
//! by side in one run (alternating). Nothing is asserted about the numbers.
//!
//! `benches/hook-overhead.sh` runs it with more rounds and prints the table recorded in
//! `docs/benchmarks/hook.md`. In the normal test run it does `NIXDISPATCH_BENCH_ROUNDS`
//! (default 2) rounds so that the harness keeps working.

mod common;

use std::time::Duration;

use common::{BuilderSpec, Env};

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// Measures nix-build wall time through the stock build-remote and through nixdispatch-hook,
/// for one trivial derivation and for four independent ones, and prints the comparison.
#[test]
fn hook_overhead_against_stock_build_remote() {
    let rounds: usize = std::env::var("NIXDISPATCH_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let specs = [BuilderSpec::new("b1", 4)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let hook_config = env.path().join("bench-hook.toml");
    std::fs::write(
        &hook_config,
        format!(
            "scheduler = \"{}\"\nclient_id = \"bench\"\nssh_identity = \"{}\"\n",
            env.scheduler_addr.as_deref().unwrap(),
            env.client_key.display()
        ),
    )
    .unwrap();
    let stock_hook = common::which("nix")
        .and_then(|nix| nix.canonicalize().ok())
        .and_then(|nix| {
            nix.parent()?
                .parent()
                .map(|p| p.join("libexec/nix/build-remote"))
        })
        .filter(|p| p.exists())
        .expect("the stock build-remote (<prefix>/libexec/nix/build-remote, Nix 2.8/2.9)");
    let machines = env.machines_line("b1", 4);
    let hook = std::path::Path::new(env!("CARGO_BIN_EXE_nixdispatch-hook"));

    // (shape, leaves): one derivation; four independent leaves plus their top.
    let shapes = [("1 derivation", 0u32), ("4 parallel + 1", 4u32)];
    let mut results: Vec<(String, Vec<Duration>, Vec<Duration>)> = Vec::new();
    // One warm-up build each, so that busybox is in the builder's store for both.
    for (who, via_hook) in [("warm-stock", false), ("warm-hook", true)] {
        let tag = env.tag(who);
        let run = if via_hook {
            env.nix_build(
                &hook_config,
                hook,
                0,
                &["--argstr", "tag", &tag, "--arg", "leaves", "0"],
            )
        } else {
            env.nix_build_with_builders(
                &hook_config,
                &stock_hook,
                &machines,
                0,
                &["--argstr", "tag", &tag, "--arg", "leaves", "0"],
            )
        };
        assert!(run.success, "{}", env.diagnostics(&run));
    }
    for (shape, leaves) in shapes {
        let (mut stock, mut ours) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for via_hook in [round % 2 == 0, round % 2 != 0] {
                let tag = env.tag(if via_hook { "bh" } else { "bs" });
                let leaves = leaves.to_string();
                let args = ["--argstr", "tag", &tag, "--arg", "leaves", &leaves];
                let run = if via_hook {
                    env.nix_build(&hook_config, hook, 0, &args)
                } else {
                    env.nix_build_with_builders(&hook_config, &stock_hook, &machines, 0, &args)
                };
                assert!(run.success, "{}", env.diagnostics(&run));
                if via_hook {
                    ours.push(run.elapsed)
                } else {
                    stock.push(run.elapsed)
                }
            }
        }
        results.push((shape.to_owned(), stock, ours));
    }
    assert!(env.leases().is_empty());
    env.stop_scheduler();

    let mut table = String::from(
        "| builds per nix-build | stock build-remote median (ms) | nixdispatch-hook median (ms) | added per nix-build (ms) | rounds |\n\
         |---|---|---|---|---|\n",
    );
    for (shape, mut stock, mut ours) in results {
        let (s, o) = (median(&mut stock), median(&mut ours));
        let added = o.as_secs_f64() * 1000.0 - s.as_secs_f64() * 1000.0;
        table.push_str(&format!(
            "| {shape} | {} | {} | {added:+.0} | {rounds} |\n",
            ms(s),
            ms(o)
        ));
    }
    eprintln!("{table}");
    if let Some(out) = std::env::var_os("NIXDISPATCH_BENCH_OUT") {
        std::fs::write(out, &table).unwrap();
    }
}
