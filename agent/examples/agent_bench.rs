//! Benchmark: the agent's resident memory and CPU time per report.
//!
//! Runs the real `nixdispatch-agent` binary against an in-process fake scheduler that asks
//! for a report every 100 ms (the agent's floor), lets it warm up, then measures over many reports:
//! CPU time from `/proc/<pid>/schedstat` (nanoseconds on CPU, all threads) divided by the
//! reports received, and `VmRSS`/`VmHWM` from `/proc/<pid>/status`. It also times the
//! in-process sampler alone (one sample plus its protobuf encoding) with the thread's own
//! schedstat. Nothing is asserted: the numbers are written to `docs/benchmarks/agent.md`.
//!
//! ```text
//! cargo build --release -p nixdispatch-agent --bins --examples
//! cargo run --release -p nixdispatch-agent --example agent_bench -- [--reports N] [--out FILE]
//! ```
//!
//! Linux only (it reads `/proc`).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nixdispatch::proto::agent_message::Message;
use nixdispatch::proto::agent_service_server::{AgentService, AgentServiceServer};
use nixdispatch::proto::{AgentMessage, SchedulerMessage};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// The deadline the fake scheduler gives: the agent's floor (it never reports more often than
/// every 80 ms), so the run is as short as it can be.
const DEADLINE_MILLIS: u64 = 100;

/// Counts reports and answers each with a `DEADLINE_MILLIS` deadline.
#[derive(Clone)]
struct Counter(Arc<AtomicU64>);

#[tonic::async_trait]
impl AgentService for Counter {
    type SessionStream = ReceiverStream<Result<SchedulerMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let reports = self.0.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = inbound.next().await {
                if matches!(m.message, Some(Message::Report(_))) {
                    reports.fetch_add(1, Ordering::Relaxed);
                }
                let answer = SchedulerMessage {
                    next_report_within_millis: DEADLINE_MILLIS,
                    draining: false,
                };
                if tx.send(Ok(answer)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// One measured agent run.
struct Run {
    group: &'static str,
    per_report_us: f64,
    rss: u64,
    hwm: u64,
    reports: u64,
    measured: u64,
    elapsed: Duration,
}

impl Run {
    fn rows(&self) -> String {
        let mode = if self.group.is_empty() {
            "`--build-users-group ''` (children-of-Nix scan)".to_owned()
        } else {
            format!("`--build-users-group {}`", self.group)
        };
        format!(
            "| CPU time per report, whole agent process, {mode} | {:.0} µs ({} reports in {:.1?}) | < 1000 µs |\n\
             | resident memory after {} reports (`VmRSS`), {mode} | {:.1} MiB | < 10 MiB |\n\
             | peak resident memory (`VmHWM`), {mode} | {:.1} MiB | < 10 MiB |\n",
            self.per_report_us,
            self.measured,
            self.elapsed,
            self.reports,
            self.rss as f64 / 1024.0,
            self.hwm as f64 / 1024.0,
        )
    }
}

/// Total CPU time in nanoseconds from a `schedstat` file (its first field).
fn schedstat_ns(path: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.split_whitespace()
        .next()
        .and_then(|f| f.parse().ok())
        .expect("schedstat format")
}

/// A process's CPU time over all its threads, in nanoseconds.
fn process_cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|t| schedstat_ns(&format!("{}/schedstat", t.path().display())))
        .sum()
}

/// A `kB` field of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

async fn wait_for(reports: &AtomicU64, n: u64) {
    let start = Instant::now();
    while reports.load(Ordering::Relaxed) < n {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "the agent stopped reporting"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The in-process cost of one sample and its encoding, in nanoseconds of thread CPU time,
/// with the given build users (none: the children-of-Nix scan, which reads every `comm`).
fn sampler_cost(
    iterations: u32,
    build_users: nixdispatch_agent::sample::builds::BuildUsers,
) -> (f64, usize) {
    use nixdispatch_agent::sample::{Sampler, SamplerConfig};
    let mut sampler = Sampler::new(SamplerConfig {
        proc_root: PathBuf::from("/proc"),
        store_dir: PathBuf::from("/"),
        build_dir: std::env::temp_dir(),
        build_users,
    });
    let mut bytes = 0;
    let before = schedstat_ns("/proc/thread-self/schedstat");
    for _ in 0..iterations {
        let report = nixdispatch::proto::Report::from(sampler.sample());
        bytes = report.encoded_len();
    }
    let after = schedstat_ns("/proc/thread-self/schedstat");
    ((after - before) as f64 / f64::from(iterations), bytes)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut measured: u64 = 400;
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks/agent.md");
    let mut agent_bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("nixdispatch-agent");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--reports" => {
                measured = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--reports N")
            }
            "--out" => out = args.next().expect("--out FILE").into(),
            "--agent" => agent_bin = args.next().expect("--agent PATH").into(),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(
        agent_bin.is_file(),
        "{} missing: cargo build --release -p nixdispatch-agent --bins",
        agent_bin.display()
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reports = Arc::new(AtomicU64::new(0));
    // No Nagle on the accepted sockets, as a real server would set (the builder's
    // `tcp_nodelay` does not reach streams passed to `serve_with_incoming`).
    let incoming = TcpListenerStream::new(listener).map(|s| {
        if let Ok(s) = &s {
            let _ = s.set_nodelay(true);
        }
        s
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServiceServer::new(Counter(reports.clone())))
            .serve_with_incoming(incoming),
    );

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("host.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0wF5n9l6V8vWqjYsFNeaUhgSJHdcD1t0Cg+2mWQn9R bench\n",
    )
    .unwrap();
    let warmup = 50;
    let mut runs = Vec::new();
    for group in ["nixbld", ""] {
        let mut child = Command::new(&agent_bin)
            .args([
                "--scheduler",
                &format!("http://{addr}"),
                "--host-id",
                "bench",
                "--store-uri",
                "ssh-ng://bench",
            ])
            .arg("--host-key-file")
            .arg(&key)
            .args([
                "--systems",
                "x86_64-linux",
                "--max-jobs",
                "1",
                "--features",
                "",
                "--build-users-group",
                group,
            ])
            .args(["--store-dir", "/"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let start = reports.load(Ordering::Relaxed);
        wait_for(&reports, start + warmup).await;
        let (cpu0, n0, t0) = (
            process_cpu_ns(pid),
            reports.load(Ordering::Relaxed),
            Instant::now(),
        );
        wait_for(&reports, start + warmup + measured).await;
        let (cpu1, n1, elapsed) = (
            process_cpu_ns(pid),
            reports.load(Ordering::Relaxed),
            t0.elapsed(),
        );
        let (rss, hwm) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
        let _ = child.kill();
        let _ = child.wait();
        let per_report_us = (cpu1 - cpu0) as f64 / (n1 - n0) as f64 / 1000.0;
        runs.push(Run {
            group,
            per_report_us,
            rss,
            hwm,
            reports: n1 - start,
            measured: n1 - n0,
            elapsed,
        });
    }

    let with_users = nixdispatch_agent::sample::builds::BuildUsers {
        uids: [30001].into_iter().collect(),
    };
    let (sample_ns, report_bytes) = sampler_cost(1000, with_users);
    let (sample_children_ns, _) = sampler_cost(1000, Default::default());
    let procs = std::fs::read_dir("/proc")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        })
        .count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };

    let rows: String = runs.iter().map(Run::rows).collect();
    let text = format!(
        "# Agent benchmark: resident memory and CPU time per report\n\
         \n\
         Measured by `agent/examples/agent_bench.rs` (it asserts nothing): the real\n\
         `nixdispatch-agent` binary reports to an in-process fake scheduler that answers every\n\
         message with a {DEADLINE_MILLIS} ms deadline (the agent reports at 80% of it), so each report includes\n\
         a full sample (`/proc/loadavg`, `/proc/meminfo`, three PSI files, a `/proc` scan\n\
         for build counting, two `statvfs`), its protobuf encoding and the gRPC round trip.\n\
         \n\
         ```text\n\
         cargo build --release -p nixdispatch-agent --bins --examples\n\
         cargo run --release -p nixdispatch-agent --example agent_bench -- --reports {measured}\n\
         ```\n\
         \n\
         | metric | value | goal |\n\
         |---|---|---|\n\
         {rows}\
         | CPU time of one sample + encoding, in-process, build users | {sample_us:.0} µs | |\n\
         | same without build users (children-of-Nix scan, cached names) | {sample_children_us:.0} µs | |\n\
         | encoded report size | {report_bytes} bytes | |\n\
         \n\
         Each agent run: {warmup} warm-up reports, then {measured} measured reports.\n\
         Machine: {cpus} CPUs, Linux {kernel}, {procs} processes in `/proc` (the build-counting scan is\n\
         linear in this), {profile} build, load average {load} at the end (other work on the\n\
         machine inflates CPU time per report through contention).\n",
        sample_us = sample_ns / 1000.0,
        sample_children_us = sample_children_ns / 1000.0,
        kernel = kernel.trim(),
        load = load.join(" "),
    );
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&out, &text).unwrap();
    print!("{text}");
    eprintln!("written to {}", out.display());
}
