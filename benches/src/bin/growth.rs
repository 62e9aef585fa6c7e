//! Measures how the core's costs grow with the fleet and the queue (see
//! `nixdispatch_benches::growth`) and writes a Markdown table.
//!
//! ```text
//! cargo run --release -p nixdispatch-benches --bin growth -- --out docs/benchmarks/growth.md
//! ```

use std::alloc;
use std::path::PathBuf;
use std::time::Duration;

use cap::Cap;
use clap::Parser;
use nixdispatch_benches::growth;

/// The system allocator, counting live bytes, so that the heap the core keeps can be read.
#[global_allocator]
static ALLOC: Cap<alloc::System> = Cap::new(alloc::System, usize::MAX);

#[derive(Parser, Debug)]
#[command(about = "How the scheduling core's costs grow with the fleet and the queue")]
struct Args {
    /// Write the results as Markdown here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seconds of simulated time for the heap measurement.
    #[arg(long, default_value_t = 60)]
    heap_seconds: u64,
    /// Largest queue depth for the re-ask measurement.
    #[arg(long, default_value_t = 100_000)]
    max_depth: usize,
}

fn us(d: Duration) -> String {
    format!("{:.2} µs", d.as_secs_f64() * 1e6)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut md = String::from(
        "# How the core's costs grow\n\n\
         Command: `cargo run --release -p nixdispatch-benches --bin growth -- --out docs/benchmarks/growth.md`\n\n\
         The real core (`Scheduler`, least-loaded) on simulated time, timed with a monotonic \
         clock on one thread (`benches/src/growth.rs`).\n\n",
    );
    md.push_str("## A granted decision (acquire, then release), about half full\n\n| hosts | per decision | goal |\n|--:|--:|--|\n");
    for hosts in [10, 1_000, 10_000] {
        let d = growth::granted_decision(hosts);
        let goal = if hosts == 10_000 { "≤ 5 µs" } else { "" };
        md.push_str(&format!("| {hosts} | {} | {goal} |\n", us(d)));
        eprintln!("granted decision, {hosts} hosts: {}", us(d));
    }
    md.push_str("\n## A postponed request re-asking at the back of the queue (10 full hosts)\n\n| queue depth | per re-ask | goal |\n|--:|--:|--|\n");
    let mut depth = 1_000;
    while depth <= args.max_depth {
        let d = growth::reask_at_depth(depth);
        md.push_str(&format!("| {depth} | {} | ≤ 2 µs |\n", us(d)));
        eprintln!("re-ask at depth {depth}: {}", us(d));
        depth *= 10;
    }
    md.push_str("\n## One poll round: every waiter re-asks once, all hosts full\n\n| waiters | hosts | core time | goal |\n|--:|--:|--:|--|\n");
    for (waiters, hosts) in [(10_000, 10), (10_000, 10_000)] {
        let d = growth::poll_round(waiters, hosts);
        let goal = if hosts == 10_000 { "< 10 ms" } else { "" };
        md.push_str(&format!(
            "| {waiters} | {hosts} | {:.2} ms | {goal} |\n",
            d.as_secs_f64() * 1e3
        ));
        eprintln!("poll round {waiters} waiters, {hosts} hosts: {d:?}");
    }
    let h = growth::heap_without_live_leases(16_000, args.heap_seconds, &|| ALLOC.allocated());
    let mib = |b: usize| b as f64 / (1 << 20) as f64;
    md.push_str(&format!(
        "\n## Heap with no live lease after {} s at 16,000 decisions/s (1,000 hosts)\n\n\
         | decisions | core heap before | after | growth | goal |\n|--:|--:|--:|--:|--|\n\
         | {} | {:.2} MiB | {:.2} MiB | {:.2} MiB | < 5 MiB |\n",
        args.heap_seconds,
        h.decisions,
        mib(h.before),
        mib(h.after),
        mib(h.after.saturating_sub(h.before)),
    ));
    eprintln!("heap: {h:?}");
    if let Some(out) = args.out {
        std::fs::write(&out, md)?;
    } else {
        print!("{md}");
    }
    Ok(())
}
