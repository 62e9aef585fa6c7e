//! Runs the placement simulator on the built-in scenarios or a trace, for every policy, and
//! writes a Markdown table and an SVG plot.
//!
//! ```text
//! cargo run --release -p nixdispatch-benches --bin simulate -- --scenario all --seed 1
//! cargo run --release -p nixdispatch-benches --bin simulate -- \
//!     --trace benches/traces/example.jsonl --fleet benches/traces/example-fleet.json
//! ```

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use nixdispatch_benches::report::{ScenarioReport, markdown, svg};
use nixdispatch_benches::scenario::{self, Scenario};
use nixdispatch_benches::sim::{SimConfig, Variant, simulate};
use nixdispatch_benches::trace::{Fleet, Trace};
use nixdispatch_scheduler::core::Quotas;

#[derive(Parser, Debug)]
#[command(about = "Placement-quality simulator: every policy on the same trace and seed")]
struct Args {
    /// A built-in scenario (`community`, `large`, `fairness`, `fairness-baseline`) or `all`
    /// (the first two); ignored with `--trace`.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Seed of the scenario generator, the core's tie-breaks and the report phases.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Replay this trace (JSON lines, see `benches/src/trace.rs`) instead.
    #[arg(long, requires = "fleet")]
    trace: Option<PathBuf>,
    /// The fleet for `--trace` (JSON).
    #[arg(long)]
    fleet: Option<PathBuf>,
    /// Only these policies (comma-separated), default all.
    #[arg(long, value_delimiter = ',')]
    policies: Vec<Variant>,
    /// Directory for `<name>.md` and `<name>.svg`.
    #[arg(long, default_value = "docs/benchmarks")]
    out_dir: PathBuf,
    /// Base name of the output files.
    #[arg(long, default_value = "placement")]
    name: String,
    /// Also write each scenario's trace and fleet into this directory, then simulate.
    #[arg(long)]
    emit: Option<PathBuf>,
    /// The most efficiency an oversubscribed host loses, L in [0, 1): running k times its
    /// slots it does `1 - L * (1 - 1/k)` of its work. 0 (the default) charges nothing;
    /// `docs/benchmarks/oversubscription.md` has the measured value.
    #[arg(long, default_value_t = 0.0)]
    oversubscription_loss: f64,
    /// The core starts knowing every build's duration (from earlier builds), each off by a
    /// lognormal error of this sigma (0: exact). Default: it learns only during the run.
    #[arg(long)]
    known_durations: Option<f64>,
    /// A default quota: at most this many slots per member (the core's
    /// `default_member_max_slots`). Default: none.
    #[arg(long)]
    member_max_slots: Option<u32>,
    /// The core's queue aging factor (`queue.aging_factor`): a waiter's deadline is its
    /// arrival plus `min(factor x expected duration, max age)`. Default: the core's.
    #[arg(long)]
    aging_factor: Option<u32>,
    /// The core's `queue.max_age_millis`, in seconds. Default: the core's.
    #[arg(long)]
    max_age_s: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        (0.0..1.0).contains(&args.oversubscription_loss),
        "--oversubscription-loss must be a number in [0, 1), got {}",
        args.oversubscription_loss
    );
    if let Some(s) = args.known_durations {
        anyhow::ensure!(
            s.is_finite() && s >= 0.0,
            "--known-durations must be a number >= 0, got {s}"
        );
    }
    anyhow::ensure!(
        args.member_max_slots != Some(0),
        "--member-max-slots must be at least 1"
    );
    let scenarios: Vec<Scenario> = match (&args.trace, &args.fleet) {
        (Some(t), Some(f)) => vec![Scenario {
            name: t
                .file_stem()
                .map_or("trace".into(), |s| s.to_string_lossy().into_owned()),
            description: format!("trace {} on fleet {}", t.display(), f.display()),
            trace: Trace::read(t)?,
            fleet: Fleet::read(f)?,
        }],
        _ if args.scenario == "all" => scenario::BUILT_IN
            .iter()
            .map(|n| scenario::built_in(n, args.seed))
            .collect::<anyhow::Result<_>>()?,
        _ => vec![scenario::built_in(&args.scenario, args.seed)?],
    };
    let policies = if args.policies.is_empty() {
        Variant::all()
    } else {
        args.policies.clone()
    };
    let mut reports = Vec::new();
    for sc in &scenarios {
        if let Some(dir) = &args.emit {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(format!("{}.jsonl", sc.name)), sc.trace.to_jsonl())?;
            std::fs::write(
                dir.join(format!("{}-fleet.json", sc.name)),
                sc.fleet.to_json(),
            )?;
        }
        let mut runs = Vec::new();
        for &p in &policies {
            let started = std::time::Instant::now();
            let cfg = SimConfig {
                oversubscription_loss: args.oversubscription_loss,
                known_durations: args.known_durations,
                quotas: Quotas {
                    default_member_max_slots: args.member_max_slots,
                    ..Quotas::default()
                },
                aging_factor: args.aging_factor,
                max_age: args.max_age_s.map(std::time::Duration::from_secs),
                ..SimConfig::new(p, args.seed)
            };
            let r = simulate(&sc.trace, &sc.fleet, &cfg)
                .with_context(|| format!("simulating {} under {}", sc.name, p.label()))?;
            eprintln!(
                "{}: {:<13} {} builds, {} acquires, {:.1} s wall",
                sc.name,
                p.label(),
                r.records.len(),
                r.acquires,
                started.elapsed().as_secs_f64()
            );
            runs.push(r);
        }
        reports.push(ScenarioReport::new(sc, args.seed, &runs));
    }
    let command = std::env::args().skip(1).fold(
        "cargo run --release -p nixdispatch-benches --bin simulate --".to_string(),
        |a, b| a + " " + &b,
    );
    std::fs::create_dir_all(&args.out_dir)?;
    let md = args.out_dir.join(format!("{}.md", args.name));
    let sv = args.out_dir.join(format!("{}.svg", args.name));
    std::fs::write(&md, markdown(&reports, &command, true))?;
    std::fs::write(&sv, svg(&reports))?;
    println!("{}", markdown(&reports, &command, true));
    eprintln!("wrote {} and {}", md.display(), sv.display());
    Ok(())
}
