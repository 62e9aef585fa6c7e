//! Starts a scheduler process on loopback and drives it with simulated agents and clients
//! (see `nixdispatch_benches::loadgen`), then reports decisions per second, acquire
//! latencies, report lag and the scheduler's resident memory.
//!
//! ```text
//! cargo build --release -p nixdispatch-scheduler -p nixdispatch-benches
//! target/release/loadgen --agents 1000 --clients 64 --seconds 20 --out docs/benchmarks/loadgen-1000.md
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use nixdispatch_benches::loadgen::{ClientMode, LoadConfig, LoadResult, run};

#[derive(Parser, Debug)]
#[command(about = "gRPC load generator against a scheduler process on 127.0.0.1")]
struct Args {
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Concurrent clients (acquire -> keep alive -> release in a loop).
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Length of the measured phase, seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Agent streams per HTTP/2 connection.
    #[arg(long, default_value_t = 100)]
    streams_per_connection: usize,
    /// Connections shared by the clients.
    #[arg(long, default_value_t = 4)]
    client_connections: usize,
    /// The scheduler binary (default: `nixdispatch-scheduler` next to this one).
    #[arg(long)]
    scheduler_bin: Option<PathBuf>,
    /// Drive an already running scheduler at this `host:port` instead (no RSS then).
    #[arg(long)]
    connect: Option<String>,
    /// Write the results as Markdown here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// What the clients do: `closed` (acquire, keep alive, release in a loop), `hook` (what
    /// a real hook sends: hold each grant for `--hold-millis`, re-ask when postponed) or
    /// `saturated` (every slot taken first; each client a postponed request re-asking).
    #[arg(long, default_value = "closed")]
    mode: String,
    /// With `--mode hook`: how long each granted build holds its slot, milliseconds.
    #[arg(long, default_value_t = 50)]
    hold_millis: u64,
    /// Run the measured phase again with this many extra clients listing hosts in a loop.
    #[arg(long, default_value_t = 0)]
    list_hosts_flood: usize,
    /// Also measure an empty RPC (`Health/Check`) with the same clients, as a reference.
    #[arg(long)]
    reference: bool,
}

/// Kills the scheduler when dropped, so a failed run leaves no process behind.
struct Scheduler(Child);

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `VmRSS` and `VmHWM` of `pid`, KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn start_scheduler(bin: PathBuf, dir: &std::path::Path) -> anyhow::Result<(Scheduler, String)> {
    let addr_file = dir.join("address");
    let child = Command::new(&bin)
        .args(["--listen", "127.0.0.1:0", "--address-file"])
        .arg(&addr_file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut guard = Scheduler(child);
    // Readiness: the scheduler writes the file once it listens. Bounded wait.
    let started = Instant::now();
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.trim().is_empty()
        {
            return Ok((guard, a.trim().to_string()));
        }
        if let Some(status) = guard.0.try_wait()? {
            bail!("the scheduler exited early: {status}");
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "the scheduler did not write {} within 30 s",
                addr_file.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn markdown(args: &Args, r: &LoadResult, rss: Option<(u64, u64)>, cmd: &str) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let [p50, p99, p999, max] = r.acquire_us;
    let mut s = format!(
        "## {} agents, {} clients ({}), {} s\n\n\
         Command: `{cmd}`  \n\
         Machine: {cpus} CPUs (shared by the scheduler, the load generator and other work), \
         loopback gRPC, scheduler as a separate process.\n\n\
         | figure | value |\n|---|--:|\n\
         | agents registered (ramp-up) | {} ({:.1} s) |\n\
         | decisions (acquire answers) per second | {:.0} |\n\
         | of which grants / postponed | {} / {} of {} |\n\
         | keep-alive + release calls | {} |\n\
         | acquire latency p50 / p99 / p99.9 / max | {:.0} / {:.0} / {:.0} / {:.0} us |\n\
         | reports in the measured phase | {} |\n\
         | report round trip p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |\n\
         | load generator's own send lag p99 / max | {:.1} / {:.1} ms |\n\
         | reports answered later than the grace period | {} |\n\
         | hosts READY / STALE / other at the end | {} / {} / {} |\n\
         | errors | {} |\n\
         | leases left (scheduler / clients) | {} / {} |\n",
        args.agents,
        args.clients,
        args.mode,
        args.seconds,
        r.agents_registered,
        r.ramp.as_secs_f64(),
        r.decisions_per_second(),
        r.grants,
        r.postponed,
        r.decisions,
        r.lease_calls,
        p50,
        p99,
        p999,
        max,
        r.reports,
        r.report_rtt_ms[0],
        r.report_rtt_ms[1],
        r.report_rtt_ms[2],
        r.send_lag_ms[0],
        r.send_lag_ms[1],
        r.reports_behind,
        r.host_states[0],
        r.host_states[1],
        r.host_states[2],
        r.errors,
        r.leases_left,
        r.client_leases_open,
    );
    if r.slots_held > 0 {
        s.push_str(&format!(
            "| slots taken by the load generator first | {} |\n",
            r.slots_held
        ));
    }
    if let Some(([p50, p99, p999, max], decisions, listings)) = r.flood {
        s.push_str(&format!(
            "| with {} clients listing hosts in a loop: acquire p50 / p99 / p99.9 / max | \
             {p50:.0} / {p99:.0} / {p999:.0} / {max:.0} us |\n\
             | with the listing flood: decisions per second / listings answered | {:.0} / {listings} |\n\
             | acquire p99 with the flood / without | {:.2}x |\n",
            args.list_hosts_flood,
            decisions as f64 / args.seconds.max(1) as f64,
            p99 / r.acquire_us[1].max(1e-9),
        ));
    }
    if let Some(([p50, p99, p999, max], rate)) = r.reference_us {
        s.push_str(&format!(
            "| reference, same clients: empty RPC (`Health/Check`) p50 / p99 / p99.9 / max | \
             {p50:.0} / {p99:.0} / {p999:.0} / {max:.0} us |\n\
             | reference: empty RPCs per second | {rate:.0} |\n\
             | acquire p50 / empty RPC p50 | {:.2}x |\n",
            r.acquire_us[0] / p50.max(1e-9),
        ));
    }
    if let Some((rss, hwm)) = rss {
        s.push_str(&format!(
            "| scheduler RSS at the end of the measured phase / peak | {:.1} / {:.1} MiB |\n",
            rss as f64 / 1024.0,
            hwm as f64 / 1024.0
        ));
    }
    s
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (guard, addr) = match &args.connect {
        Some(a) => (None, a.clone()),
        None => {
            let bin = match &args.scheduler_bin {
                Some(b) => b.clone(),
                None => std::env::current_exe()?.with_file_name("nixdispatch-scheduler"),
            };
            let (g, a) = start_scheduler(bin, dir.path())?;
            (Some(g), a)
        }
    };
    let pid = guard.as_ref().map(|g| g.0.id());
    let mode = match args.mode.as_str() {
        "closed" => ClientMode::Closed,
        "hook" => ClientMode::Hook {
            hold: Duration::from_millis(args.hold_millis),
        },
        "saturated" => ClientMode::Saturated,
        other => bail!("--mode {other}: expected closed, hook or saturated"),
    };
    let cfg = LoadConfig {
        streams_per_connection: args.streams_per_connection,
        client_connections: args.client_connections,
        mode,
        list_hosts_flood: args.list_hosts_flood,
        reference: args.reference,
        ..LoadConfig::new(args.agents, args.clients, Duration::from_secs(args.seconds))
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    // RSS at the end of the measured phase: sampled every 250 ms while the run lasts; the
    // last sample before the agents stop is kept.
    let last_rss = Arc::new(AtomicU64::new(0));
    let result = rt.block_on(async {
        let sampler = pid.map(|pid| {
            let last = last_rss.clone();
            tokio::spawn(async move {
                loop {
                    if let Some((rss, _)) = rss_kib(pid) {
                        last.store(rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        });
        let r = run(&addr, &cfg).await;
        if let Some(s) = sampler {
            s.abort();
        }
        r
    })?;
    let rss = pid
        .and_then(rss_kib)
        .map(|(_, hwm)| (last_rss.load(Ordering::Relaxed), hwm));
    drop(guard);
    let cmd = std::env::args().collect::<Vec<_>>().join(" ");
    let md = markdown(&args, &result, rss, &cmd);
    println!("{md}");
    if let Some(out) = &args.out {
        std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
