//! Per-policy figures of simulation runs, and their Markdown table and SVG plot.

use std::fmt::Write as _;

use nixdispatch_scheduler::core::PolicyKind;

use crate::sim::Variant;

use crate::metrics::{LowerBound, jain, mean, percentile};
use crate::scenario::Scenario;
use crate::sim::SimResult;

/// Builds shorter than this count as this long in the bounded slowdown, so that a 2 s build
/// that waited 5 s for a poll does not dominate the fairness index.
const SLOWDOWN_FLOOR_S: f64 = 10.0;

/// The figures of one policy on one scenario.
#[derive(Clone, Debug)]
pub struct PolicyFigures {
    /// What ran.
    pub variant: Variant,
    /// Last scheduled finish minus first scheduled arrival, seconds.
    pub makespan: f64,
    /// Per build: `finish - ready - duration / speed of its host`, seconds: the time it did
    /// not progress at its host's full speed (waiting for a slot, for the next poll, or
    /// sharing an oversubscribed host). This is the "wait" of the tables.
    pub waits: Vec<f64>,
    /// Mean of `start - ready` alone (queueing only, blind to oversubscription), seconds.
    pub mean_queue: f64,
    /// Utilisation of each host over `[0, end]`: work done / (slots * speed * end).
    pub utilisation: Vec<f64>,
    /// Jain's index over the clients' mean bounded slowdowns.
    pub jain: f64,
    /// Builds that never finished.
    pub unfinished: usize,
    /// Leases still held at the end.
    pub leases_left: usize,
    /// The largest `running / slots` seen on any host.
    pub peak_oversubscription: f64,
    /// Acquire calls made.
    pub acquires: u64,
}

impl PolicyFigures {
    /// Mean wait, seconds.
    pub fn mean_wait(&self) -> f64 {
        mean(&self.waits)
    }

    /// A wait percentile, seconds.
    pub fn wait_percentile(&self, p: f64) -> f64 {
        percentile(&self.waits, p)
    }
}

/// Computes the figures of `result` (a run of `scenario`).
pub fn figures(scenario: &Scenario, result: &SimResult) -> PolicyFigures {
    let trace = &scenario.trace;
    let fleet = &scenario.fleet;
    let t0 = trace
        .jobs
        .iter()
        .filter(|j| j.host.is_none())
        .map(|j| j.arrival_s)
        .fold(f64::INFINITY, f64::min);
    let mut waits = Vec::with_capacity(result.records.len());
    let mut queue = Vec::with_capacity(result.records.len());
    let mut per_client: std::collections::BTreeMap<&str, (f64, usize)> = Default::default();
    for r in &result.records {
        let job = &trace.jobs[r.job];
        let speed = fleet.hosts[r.host].speed;
        let run = job.duration_s / speed;
        waits.push((r.finish - r.ready - run).max(0.0));
        queue.push(r.start - r.ready);
        let best = fleet
            .hosts
            .iter()
            .filter(|h| h.eligible(job))
            .map(|h| h.speed)
            .fold(0.0, f64::max);
        let ideal = (job.duration_s / best).max(SLOWDOWN_FLOOR_S);
        let slowdown = ((r.finish - r.ready) / ideal).max(1.0);
        let e = per_client.entry(job.client.as_str()).or_default();
        e.0 += slowdown;
        e.1 += 1;
    }
    waits.sort_by(f64::total_cmp);
    let slowdowns: Vec<f64> = per_client.values().map(|(s, n)| s / *n as f64).collect();
    let end = result.end.max(1e-9);
    PolicyFigures {
        variant: result.variant,
        makespan: if result.records.is_empty() {
            0.0
        } else {
            result.end - t0
        },
        waits,
        mean_queue: mean(&queue),
        utilisation: fleet
            .hosts
            .iter()
            .zip(&result.work_done)
            .map(|(h, w)| w / (h.capacity() * end))
            .collect(),
        jain: jain(&slowdowns),
        unfinished: result.unfinished,
        leases_left: result.leases_left,
        peak_oversubscription: result
            .peak_oversubscription
            .iter()
            .map(|&(r, s)| f64::from(r) / f64::from(s))
            .fold(0.0, f64::max),
        acquires: result.acquires,
    }
}

/// Everything measured on one scenario.
#[derive(Clone, Debug)]
pub struct ScenarioReport {
    /// Scenario name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Seed used.
    pub seed: u64,
    /// Hosts, slots, scheduled builds, clients, outside builds.
    pub shape: (usize, u32, usize, usize, usize),
    /// The lower bound.
    pub bound: LowerBound,
    /// One entry per variant, in the order run.
    pub policies: Vec<PolicyFigures>,
}

impl ScenarioReport {
    /// Collects the report of `scenario` from its runs.
    pub fn new(scenario: &Scenario, seed: u64, runs: &[SimResult]) -> ScenarioReport {
        let t = &scenario.trace;
        let scheduled: Vec<_> = t.jobs.iter().filter(|j| j.host.is_none()).collect();
        let mut clients: Vec<&str> = scheduled.iter().map(|j| j.client.as_str()).collect();
        clients.sort_unstable();
        clients.dedup();
        ScenarioReport {
            name: scenario.name.clone(),
            description: scenario.description.clone(),
            seed,
            shape: (
                scenario.fleet.hosts.len(),
                scenario.fleet.hosts.iter().map(|h| h.slots).sum(),
                scheduled.len(),
                clients.len(),
                t.jobs.len() - scheduled.len(),
            ),
            bound: LowerBound::compute(t, &scenario.fleet),
            policies: runs.iter().map(|r| figures(scenario, r)).collect(),
        }
    }

    /// The figures of one of the core's policies, if it ran.
    pub fn get(&self, k: PolicyKind) -> Option<&PolicyFigures> {
        self.policies.iter().find(|p| p.variant == Variant::Core(k))
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b <= 0.0 {
        if a <= 0.0 {
            "1.00".into()
        } else {
            "inf".into()
        }
    } else {
        format!("{:.2}", a / b)
    }
}

/// The Markdown report of several scenarios.
pub fn markdown(reports: &[ScenarioReport], command: &str, fleet_hosts_table: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Placement quality (simulated)\n");
    let _ = writeln!(
        s,
        "Generated by `{command}`. The simulator drives the real placement core \
         (`nixdispatch_scheduler::core::Scheduler`) on simulated time, once per policy, on \
         the same trace and seed; see `benches/src/sim.rs` for the model and \
         `docs/BENCHMARKS.md` for how to read these figures.\n"
    );
    let _ = writeln!(
        s,
        "- **wait** of a build = finish - ready - its run time on its host at full speed: the \
         time it was not progressing at full speed (waiting for a slot, for the client's next \
         5 s poll, or sharing an oversubscribed host). **queue** = start - ready only. \
         nixdispatch's policies wait in the core's queue (`WaitForLease`, as today's hook \
         does); stock Nix and `least-loaded+poll` poll every 5 s.\n\
         - **LB** = max(total work / total capacity, longest build, longest dependency chain, \
         work confined to a group of hosts / its capacity), all with arrival times.\n\
         - **util** = work done / (slots x speed x end), per host: mean (min-max).\n\
         - **Jain** = Jain's index over the clients' mean bounded slowdowns (1 = equal).\n\
         - **oversub** = the most builds any host ran at once / its slots.\n\
         - *Italic rows* are not the core as it is: `least-loaded+fresh` is nixdispatch's \
         policy with agents reporting on every change (no stale `running_builds`), \
         `fastest-free` a policy proposed by these benchmarks, plugged into the real core, \
         `least-loaded+poll` nixdispatch with old hooks that poll instead of waiting.\n"
    );
    for r in reports {
        let (hosts, slots, builds, clients, outside) = r.shape;
        let b = &r.bound;
        let _ = writeln!(
            s,
            "## `{}` (seed {})\n\n{}.\n",
            r.name, r.seed, r.description
        );
        let _ = writeln!(
            s,
            "{hosts} hosts, {slots} slots; {builds} scheduled builds from {clients} clients, \
             {outside} builds from outside the scheduler.\n\
             LB = **{:.0} s** = max(work/capacity {:.0} s, longest build {:.0} s, longest chain \
             {:.0} s, confined capacity {:.0} s).\n",
            b.value(),
            b.work_over_capacity,
            b.longest_job,
            b.longest_chain,
            b.confined_capacity
        );
        let _ = writeln!(
            s,
            "| policy | makespan (s) | / LB | mean wait (s) | p95 (s) | p99 (s) | mean queue (s) | wait / least-loaded | wait / stock-nix | util mean (min-max) | Jain | oversub | unfinished |"
        );
        let _ = writeln!(s, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
        let ll = r.get(PolicyKind::LeastLoaded).map(|p| p.mean_wait());
        let sn = r.get(PolicyKind::StockNix).map(|p| p.mean_wait());
        for p in &r.policies {
            let um = mean(&p.utilisation);
            let (umin, umax) = p
                .utilisation
                .iter()
                .fold((f64::INFINITY, 0.0f64), |(a, b), &u| (a.min(u), b.max(u)));
            let name = match p.variant {
                Variant::Core(PolicyKind::LeastLoaded) => {
                    "**least-loaded** (nixdispatch)".to_string()
                }
                Variant::Core(_) => p.variant.label().to_string(),
                _ => format!("*{}*", p.variant.label()),
            };
            let _ = writeln!(
                s,
                "| {name} | {:.0} | {:.3} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {:.2} ({:.2}-{:.2}) | {:.3} | {:.2} | {} |",
                p.makespan,
                p.makespan / b.value().max(1e-9),
                p.mean_wait(),
                p.wait_percentile(95.0),
                p.wait_percentile(99.0),
                p.mean_queue,
                ll.map_or("-".into(), |l| ratio(p.mean_wait(), l)),
                sn.map_or("-".into(), |l| ratio(p.mean_wait(), l)),
                um,
                umin,
                umax,
                p.jain,
                p.peak_oversubscription,
                p.unfinished,
            );
        }
        if fleet_hosts_table && hosts <= 8 {
            let _ = writeln!(s, "\nUtilisation per host:\n");
            let _ = write!(s, "| policy |");
            for k in 0..hosts {
                let _ = write!(s, " host {k} |");
            }
            let _ = writeln!(s);
            let _ = writeln!(s, "|---|{}", "--:|".repeat(hosts));
            for p in &r.policies {
                let _ = write!(s, "| {} |", p.variant.label());
                for u in &p.utilisation {
                    let _ = write!(s, " {u:.2} |");
                }
                let _ = writeln!(s);
            }
        }
        let _ = writeln!(s);
        if let (Some(l), Some(n)) = (r.get(PolicyKind::LeastLoaded), r.get(PolicyKind::StockNix)) {
            let mk = l.makespan / b.value().max(1e-9);
            let _ = writeln!(
                s,
                "Targets: makespan within 5 % of LB: **{}** ({:+.1} %); mean wait at most half \
                 of stock Nix's: **{}** ({:.2} x stock Nix).\n",
                if mk <= 1.05 { "met" } else { "missed" },
                (mk - 1.0) * 100.0,
                if l.mean_wait() <= 0.5 * n.mean_wait() {
                    "met"
                } else {
                    "missed"
                },
                l.mean_wait() / n.mean_wait().max(1e-9),
            );
        }
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A hand-written SVG: per scenario, makespan / LB and mean and p95 wait per policy.
pub fn svg(reports: &[ScenarioReport]) -> String {
    let row_h = 22.0;
    let n_pol = reports.iter().map(|r| r.policies.len()).max().unwrap_or(0) as f64;
    let panel_h = 60.0 + n_pol * row_h;
    // Room right of the wait panel for the "mean / p95" label after the longest tick.
    let width = 1040.0;
    let height = 40.0 + panel_h * reports.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="#fff"/><text x="10" y="22" font-size="15" font-weight="bold">Placement quality per policy (simulated, same trace and seed)</text>"##
    );
    for (ri, r) in reports.iter().enumerate() {
        let top = 40.0 + panel_h * ri as f64;
        let lb = r.bound.value().max(1e-9);
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}" font-weight="bold">{} (seed {})</text>"#,
            top + 16.0,
            esc(&r.name),
            r.seed
        );
        // Left: makespan / LB, axis from 1.0.
        let (lx, lw) = (130.0, 300.0);
        let max_mk = r
            .policies
            .iter()
            .map(|p| p.makespan / lb)
            .fold(1.1, f64::max);
        let (rx, rw) = (600.0, 300.0);
        let max_wait = r
            .policies
            .iter()
            .map(|p| p.wait_percentile(95.0).max(p.mean_wait()))
            .fold(1.0, f64::max);
        let _ = writeln!(
            s,
            r#"<text x="{lx}" y="{}">makespan / lower bound (axis from 1.0)</text><text x="{rx}" y="{}">wait, s: mean (bar), p95 (tick)</text>"#,
            top + 36.0,
            top + 36.0
        );
        for (i, p) in r.policies.iter().enumerate() {
            let y = top + 44.0 + i as f64 * row_h;
            let colour = match p.variant {
                Variant::Core(PolicyKind::LeastLoaded) => "#2b6cb0",
                Variant::Core(_) => "#a0aec0",
                _ => "#9ae6b4",
            };
            let mk = p.makespan / lb;
            let w = ((mk - 1.0) / (max_mk - 1.0)).clamp(0.0, 1.0) * lw;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{lx}" y="{y}" width="{w:.1}" height="{}" fill="{colour}"/><text x="{:.1}" y="{}">{mk:.3}</text>"#,
                lx - 6.0,
                y + 13.0,
                p.variant.label(),
                row_h - 6.0,
                lx + w + 4.0,
                y + 13.0
            );
            let mw = p.mean_wait() / max_wait * rw;
            let p95 = p.wait_percentile(95.0) / max_wait * rw;
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{rx}" y="{y}" width="{mw:.1}" height="{}" fill="{colour}"/><line x1="{:.1}" x2="{:.1}" y1="{y}" y2="{}" stroke="#c53030" stroke-width="2"/><text x="{:.1}" y="{}">{:.0} / {:.0}</text>"##,
                rx - 6.0,
                y + 13.0,
                p.variant.label(),
                row_h - 6.0,
                rx + p95,
                rx + p95,
                y + row_h - 6.0,
                rx + mw.max(p95) + 4.0,
                y + 13.0,
                p.mean_wait(),
                p.wait_percentile(95.0),
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
