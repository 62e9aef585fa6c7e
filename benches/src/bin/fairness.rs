//! Issue 10's fairness scenario through the simulator: one member floods 500 builds while
//! ten others submit 5 each; the others' p95 wait under the flood against their p95 wait
//! without it, Jain's index, and what each rule costs the flood (its makespan) and the
//! builder (utilisation). Writes a Markdown report.
//!
//! ```text
//! cargo run --release -p nixdispatch-benches --bin fairness -- --seeds 1,2,3
//! ```

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Parser;
use nixdispatch_benches::metrics::{mean, percentile};
use nixdispatch_benches::report::figures;
use nixdispatch_benches::scenario::{Scenario, fairness};
use nixdispatch_benches::sim::{SimConfig, Variant, simulate};
use nixdispatch_scheduler::core::{ClientId, MemberQuota, PolicyKind, Quotas};

#[derive(Parser, Debug)]
#[command(about = "Issue 10's fairness scenario: a 500-build flood against ten small members")]
struct Args {
    /// Seeds of the scenario generator and the core.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    seeds: Vec<u64>,
    /// The oversubscription loss L charged to stock Nix (see `simulate --help`).
    #[arg(long, default_value_t = 0.0)]
    oversubscription_loss: f64,
    /// The report.
    #[arg(long, default_value = "docs/benchmarks/fairness.md")]
    out: PathBuf,
}

/// One row: what runs, with which knowledge and quota.
struct Row {
    label: &'static str,
    variant: Variant,
    known: Option<f64>,
    cap: Option<u32>,
    /// The flooding member's priority (the core's `MemberQuota::priority`).
    flood_priority: i32,
}

/// The ten small members' figures in one run.
struct Others {
    p95: f64,
    mean: f64,
    jain: f64,
    flood_end: f64,
    util: f64,
}

fn run(sc: &Scenario, row: &Row, seed: u64, loss: f64) -> anyhow::Result<Others> {
    let cfg = SimConfig {
        oversubscription_loss: loss,
        known_durations: row.known,
        quotas: Quotas {
            default_member_max_slots: row.cap,
            members: [(
                ClientId::new("flood"),
                MemberQuota {
                    max_slots: None,
                    priority: row.flood_priority,
                },
            )]
            .into(),
            ..Quotas::default()
        },
        ..SimConfig::new(row.variant, seed)
    };
    let r = simulate(&sc.trace, &sc.fleet, &cfg)?;
    anyhow::ensure!(r.unfinished == 0, "{}: builds left unfinished", row.label);
    anyhow::ensure!(r.leases_left == 0, "{}: leases left", row.label);
    let f = figures(sc, &r);
    let mut waits = Vec::new();
    let mut flood_end: f64 = 0.0;
    for rec in &r.records {
        let job = &sc.trace.jobs[rec.job];
        let run = job.duration_s / sc.fleet.hosts[rec.host].speed;
        if job.client.starts_with("member") {
            waits.push((rec.finish - rec.ready - run).max(0.0));
        } else {
            flood_end = flood_end.max(rec.finish);
        }
    }
    waits.sort_by(f64::total_cmp);
    Ok(Others {
        p95: percentile(&waits, 95.0),
        mean: mean(&waits),
        jain: f.jain,
        flood_end,
        util: f.utilisation[0],
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        (0.0..1.0).contains(&args.oversubscription_loss),
        "--oversubscription-loss must be a number in [0, 1)"
    );
    let ll = Variant::Core(PolicyKind::LeastLoaded);
    let rows = [
        Row {
            label: "stock Nix (every build starts at once, processor sharing)",
            variant: Variant::Core(PolicyKind::StockNix),
            known: None,
            cap: None,
            flood_priority: 0,
        },
        Row {
            label: "first come, first served (old hooks polling every 5 s)",
            variant: Variant::Polling,
            known: None,
            cap: None,
            flood_priority: 0,
        },
        Row {
            label: "**fair queue, durations learned in the run** (nixdispatch, cold)",
            variant: ll,
            known: None,
            cap: None,
            flood_priority: 0,
        },
        Row {
            label: "**fair queue, durations known** (nixdispatch, warm: error sigma 0.5)",
            variant: ll,
            known: Some(0.5),
            cap: None,
            flood_priority: 0,
        },
        Row {
            label: "fair queue, durations known exactly",
            variant: ll,
            known: Some(0.0),
            cap: None,
            flood_priority: 0,
        },
        Row {
            label: "fair queue, cold, at most 5 of 6 slots per member",
            variant: ll,
            known: None,
            cap: Some(5),
            flood_priority: 0,
        },
        Row {
            label: "fair queue, warm (0.5), at most 5 of 6 slots per member",
            variant: ll,
            known: Some(0.5),
            cap: Some(5),
            flood_priority: 0,
        },
        Row {
            label: "fair queue, warm (0.5), at most 4 of 6 slots per member",
            variant: ll,
            known: Some(0.5),
            cap: Some(4),
            flood_priority: 0,
        },
        Row {
            label: "fair queue, warm (0.5), at most 3 of 6 slots per member",
            variant: ll,
            known: Some(0.5),
            cap: Some(3),
            flood_priority: 0,
        },
        Row {
            label: "fair queue, warm (0.5), the flooding member at priority +100 (half a share)",
            variant: ll,
            known: Some(0.5),
            cap: None,
            flood_priority: 100,
        },
        Row {
            label: "fair queue, warm (0.5), the flooding member at priority +400 (a sixteenth share)",
            variant: ll,
            known: Some(0.5),
            cap: None,
            flood_priority: 400,
        },
        Row {
            label: "fair queue, cold, the flooding member at priority +400",
            variant: ll,
            known: None,
            cap: None,
            flood_priority: 400,
        },
        Row {
            label: "*the others strictly first*: the flood at priority +10000, every \
                    duration known exactly, shortest first",
            variant: ll,
            known: Some(0.0),
            cap: None,
            flood_priority: 10_000,
        },
        Row {
            label: "*the others strictly first, and one slot kept from the flood* (at most 5 \
                    of 6 slots per member: not work-conserving)",
            variant: ll,
            known: Some(0.0),
            cap: Some(5),
            flood_priority: 10_000,
        },
    ];
    let mut md = String::new();
    let command = std::env::args().skip(1).fold(
        "cargo run --release -p nixdispatch-benches --bin fairness --".to_string(),
        |a, b| a + " " + &b,
    );
    writeln!(md, "# Fairness under a flood (simulated)\n")?;
    writeln!(
        md,
        "Generated by `{command}`. Issue 10's scenario (`benches/src/scenario.rs`, \
         `fairness`): one x86_64-linux builder with 6 slots; one member submits 500 \
         independent builds at t = 0; ten members submit 5 builds each at random times \
         between 60 s and 1,860 s. Durations are the simulator's heavy-tailed ones (median \
         40 s, 1 % take 1-3 h): the flood is 21 to 28 builder-hours (seeds 1-3), 3.5 to 4.6 \
         hours of all six slots, so it holds the builder for the whole time the others submit. The same runs without the \
         flood (`fairness-baseline`) give each row's reference.\n"
    )?;
    writeln!(
        md,
        "- **wait** = finish - ready - run time at full speed (queueing, and crawling on an \
         oversubscribed host). **others** = the ten small members' 50 builds. **ratio** = \
         others' p95 wait under the flood / their p95 wait without it, same row (goal: at \
         most 1.5; `-` when the calm p95 is under 1 s). **Jain** = Jain's index over the 11 members' mean bounded slowdowns. \
         **flood end** = when the flood's last build finished. **util** = the builder's \
         work done / (slots x end).\n- **cold**: the core learns durations from this run's \
         releases only; every build's name is new, so it knows the overall mean and nothing \
         per build. **warm**: it starts with every derivation's duration learned before \
         (as the scheduler's database has it for derivations built earlier), each off by a \
         lognormal error of the given sigma (0.5: within a factor 1.6 for two thirds of \
         builds).\n- Stock Nix is charged an oversubscription loss L = {} (see \
         [oversubscription.md](oversubscription.md)).\n",
        args.oversubscription_loss
    )?;
    for &seed in &args.seeds {
        let (flood, calm) = (fairness(seed, true), fairness(seed, false));
        writeln!(md, "## Seed {seed}\n")?;
        writeln!(
            md,
            "| rule | others' p95 wait, flood (s) | without flood (s) | ratio | others' mean wait, flood (s) | Jain | flood end (s) | util |"
        )?;
        writeln!(md, "|---|--:|--:|--:|--:|--:|--:|--:|")?;
        for row in &rows {
            let loss = if row.variant == Variant::Core(PolicyKind::StockNix) {
                args.oversubscription_loss
            } else {
                0.0
            };
            let a = run(&flood, row, seed, loss)?;
            let b = run(&calm, row, seed, loss)?;
            // A calm p95 under a second (every build started at once) makes any ratio
            // meaningless; the absolute figures say it.
            let ratio = if b.p95 >= 1.0 {
                format!("{:.1}", a.p95 / b.p95)
            } else {
                "-".into()
            };
            writeln!(
                md,
                "| {} | {:.1} | {:.1} | {} | {:.1} | {:.3} | {:.0} | {:.3} |",
                row.label, a.p95, b.p95, ratio, a.mean, a.jain, a.flood_end, a.util
            )?;
            eprintln!("seed {seed}: {} done", row.label);
        }
        writeln!(md)?;
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &md)?;
    println!("{md}");
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
