//! End to end: the real `nixdispatch-scheduler` binary and the real `nixdispatch-agent`
//! binary, observed through the scheduler's `AdminService.ListHosts`.
//!
//! The scheduler binary lives in another package, so it is found next to this test's target
//! directory; run `cargo build --workspace --bins` first (the CI script does).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nixdispatch::proto::admin_service_client::AdminServiceClient;
use nixdispatch::proto::{HostState, HostStatus, ListHostsRequest};

/// Report interval and grace the scheduler runs with here, shortened from 10 s and 20 s.
const REPORT_INTERVAL_MS: u64 = 500;
const GRACE_MS: u64 = 1000;

/// A child process killed (SIGKILL) and reaped when dropped.
struct ChildGuard(Child);

impl ChildGuard {
    fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Sends `signal` (`-TERM`, `-KILL`) and waits, bounded, for the child to exit.
    fn signal_and_wait(&mut self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self.0.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "process {} did not exit within 10 s of {signal}",
            self.pid()
        );
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `target/<profile>/nixdispatch-scheduler`, next to this test's `deps/` directory.
fn scheduler_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in target/<profile>/deps");
    let bin = profile_dir.join("nixdispatch-scheduler");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --workspace --bins` first (same CARGO_TARGET_DIR)",
        bin.display()
    );
    bin
}

/// Polls `condition` every 20 ms until it holds, failing after `bound`.
async fn eventually<T>(
    bound: Duration,
    what: &str,
    mut condition: impl AsyncFnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            start.elapsed() < bound,
            "timed out after {bound:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Scheduler {
    child: ChildGuard,
    addr: SocketAddr,
}

/// Starts the scheduler listening on `listen` and waits for its address file.
async fn start_scheduler(dir: &Path, listen: &str) -> Scheduler {
    let config = dir.join("scheduler.toml");
    std::fs::write(
        &config,
        format!(
            "[agents]\nreport_interval_millis = {REPORT_INTERVAL_MS}\ngrace_millis = {GRACE_MS}\n"
        ),
    )
    .unwrap();
    let address_file = dir.join("scheduler.addr");
    let _ = std::fs::remove_file(&address_file);
    let child = Command::new(scheduler_bin())
        .args(["--listen", listen, "--address-file"])
        .arg(&address_file)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let child = ChildGuard(child);
    let addr = eventually(
        Duration::from_secs(20),
        "the scheduler's address file",
        async || {
            std::fs::read_to_string(&address_file)
                .ok()?
                .trim()
                .parse()
                .ok()
        },
    )
    .await;
    Scheduler { child, addr }
}

/// Starts the agent binary with the flags of the lead's end-to-end test, plus a config file
/// that shortens the reconnect back-off.
fn start_agent(dir: &Path, scheduler: SocketAddr, host_id: &str) -> ChildGuard {
    let key = dir.join("host.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0wF5n9l6V8vWqjYsFNeaUhgSJHdcD1t0Cg+2mWQn9R root@b1\n",
    )
    .unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        "[timing]\nreconnect_initial_millis = 100\nreconnect_max_millis = 1000\n",
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_nixdispatch-agent"))
        .arg("--config")
        .arg(&config)
        .args([
            "--scheduler",
            &format!("http://{scheduler}"),
            "--host-id",
            host_id,
        ])
        .args([
            "--store-uri",
            "ssh-ng://root@127.0.0.1:2222",
            "--host-key-file",
        ])
        .arg(&key)
        .args([
            "--systems",
            "x86_64-linux",
            "--max-jobs",
            "2",
            "--features",
            "kvm,big-parallel",
        ])
        .args([
            "--build-users-group",
            "",
            "--nix-bin",
            "/nonexistent/nix",
            "--store-dir",
        ])
        .arg(dir)
        .arg("--build-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    ChildGuard(child)
}

async fn hosts(addr: SocketAddr) -> Option<Vec<HostStatus>> {
    let mut admin = AdminServiceClient::connect(format!("http://{addr}"))
        .await
        .ok()?;
    Some(
        admin
            .list_hosts(ListHostsRequest {})
            .await
            .ok()?
            .into_inner()
            .hosts,
    )
}

async fn host(addr: SocketAddr, id: &str) -> Option<HostStatus> {
    hosts(addr).await?.into_iter().find(|h| h.host_id == id)
}

fn state(h: &HostStatus) -> HostState {
    HostState::try_from(h.state).unwrap_or(HostState::Unspecified)
}

/// Waits until the host is READY and has reported its sampled numbers.
async fn ready_with_report(addr: SocketAddr, id: &str) -> HostStatus {
    eventually(
        Duration::from_secs(20),
        "the host to be READY with a report",
        async || {
            host(addr, id)
                .await
                .filter(|h| state(h) == HostState::Ready && h.load.is_some())
        },
    )
    .await
}

/// A registered agent appears in `ListHosts` as READY with its registration and the numbers
/// it sampled (load, pressure, memory, disks, running builds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_appears_with_sampled_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let scheduler = start_scheduler(dir.path(), "127.0.0.1:0").await;
    let _agent = start_agent(dir.path(), scheduler.addr, "b1");
    let h = ready_with_report(scheduler.addr, "b1").await;
    assert_eq!(h.store_uri, "ssh-ng://root@127.0.0.1:2222");
    assert_eq!(h.systems, ["x86_64-linux"]);
    let mut features = h.supported_features.clone();
    features.sort();
    assert_eq!(features, ["big-parallel", "kvm"]);
    assert_eq!(h.slots_total, 2);
    assert!(h.cpu_count > 0 && h.total_memory_bytes > 0);
    assert!(
        h.available_memory_bytes
            .is_some_and(|m| m > 0 && m <= h.total_memory_bytes)
    );
    let store = h.store.expect("store space reported");
    assert!(store.total_bytes > 0 && store.free_bytes <= store.total_bytes);
    assert!(h.build_dir.is_some());
    if cfg!(target_os = "linux") {
        assert!(
            h.running_builds.is_some(),
            "the agent counts builds on Linux"
        );
        if Path::new("/proc/pressure/cpu").exists() {
            assert!(h.pressure.is_some_and(|p| p.cpu_some_avg10.is_some()));
        }
    }
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
}

/// Killing the agent (no goodbye) makes the host unavailable within the report deadline plus
/// the grace period; restarting it restores the same host id, READY, as one entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_goes_unavailable_and_restart_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let scheduler = start_scheduler(dir.path(), "127.0.0.1:0").await;
    let mut agent = start_agent(dir.path(), scheduler.addr, "b1");
    ready_with_report(scheduler.addr, "b1").await;

    agent.signal_and_wait("-KILL");
    let killed = Instant::now();
    let bound = Duration::from_millis(REPORT_INTERVAL_MS + GRACE_MS) + Duration::from_secs(2);
    eventually(
        bound,
        "the killed agent's host to leave READY",
        async || {
            host(scheduler.addr, "b1")
                .await
                .filter(|h| state(h) != HostState::Ready)
        },
    )
    .await;
    assert!(killed.elapsed() < bound);

    let _agent = start_agent(dir.path(), scheduler.addr, "b1");
    ready_with_report(scheduler.addr, "b1").await;
    let all = hosts(scheduler.addr).await.unwrap();
    assert_eq!(all.iter().filter(|h| h.host_id == "b1").count(), 1);
}

/// SIGTERM makes the agent say goodbye: the host is GONE at once, long before the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_says_goodbye() {
    let dir = tempfile::tempdir().unwrap();
    let scheduler = start_scheduler(dir.path(), "127.0.0.1:0").await;
    let mut agent = start_agent(dir.path(), scheduler.addr, "b1");
    ready_with_report(scheduler.addr, "b1").await;
    agent.signal_and_wait("-TERM");
    let status = agent.0.try_wait().unwrap().expect("exited");
    assert!(status.success(), "the agent exits 0 on SIGTERM: {status}");
    let h = host(scheduler.addr, "b1").await.expect("host still listed");
    assert_eq!(
        state(&h),
        HostState::Gone,
        "goodbye takes effect immediately: {h:?}"
    );
}

/// The agent survives a scheduler crash and restart on the same address without any
/// operator action: the new scheduler lists the host READY with the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_restart_is_survived() {
    let dir = tempfile::tempdir().unwrap();
    let mut scheduler = start_scheduler(dir.path(), "127.0.0.1:0").await;
    let addr = scheduler.addr;
    let mut agent = start_agent(dir.path(), addr, "b1");
    ready_with_report(addr, "b1").await;

    scheduler.child.signal_and_wait("-KILL");
    // Restart on the same port (tokio sets SO_REUSEADDR, so the old connections' TIME_WAIT
    // does not block the bind).
    let restarted = start_scheduler(dir.path(), &addr.to_string()).await;
    assert_eq!(restarted.addr, addr);
    let h = ready_with_report(addr, "b1").await;
    assert_eq!(h.host_id, "b1");
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "the agent kept running"
    );
}

/// A frozen agent (SIGSTOP: its connection stays open, its reports stop) leaves READY within
/// the report deadline plus the grace period, and is READY again once it resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_agent_goes_stale_within_deadline_plus_grace() {
    let dir = tempfile::tempdir().unwrap();
    let scheduler = start_scheduler(dir.path(), "127.0.0.1:0").await;
    let agent = start_agent(dir.path(), scheduler.addr, "b1");
    ready_with_report(scheduler.addr, "b1").await;

    let stop = Command::new("kill")
        .args(["-STOP", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(stop.success());
    let bound = Duration::from_millis(REPORT_INTERVAL_MS + GRACE_MS) + Duration::from_secs(2);
    let stale = eventually(
        bound,
        "the frozen agent's host to leave READY",
        async || {
            host(scheduler.addr, "b1")
                .await
                .filter(|h| state(h) != HostState::Ready)
        },
    )
    .await;
    assert_eq!(state(&stale), HostState::Stale, "{stale:?}");

    let cont = Command::new("kill")
        .args(["-CONT", &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(cont.success());
    ready_with_report(scheduler.addr, "b1").await;
}

/// The exact flags of the lead's end-to-end test start the agent on a host without `nix` in
/// `PATH` (explicit settings skip discovery; the rest falls back) and the host becomes READY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_flags_start_without_nix() {
    let dir = tempfile::tempdir().unwrap();
    let scheduler = start_scheduler(dir.path(), "127.0.0.1:0").await;
    let key = dir.path().join("host.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0wF5n9l6V8vWqjYsFNeaUhgSJHdcD1t0Cg+2mWQn9R root@b1\n",
    )
    .unwrap();
    let empty_path = dir.path().join("empty-bin");
    std::fs::create_dir(&empty_path).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_nixdispatch-agent"))
        .args([
            "--scheduler",
            &format!("http://{}", scheduler.addr),
            "--host-id",
            "b1",
        ])
        .args([
            "--store-uri",
            "ssh-ng://root@127.0.0.1:2222",
            "--host-key-file",
        ])
        .arg(&key)
        .args(["--systems", "x86_64-linux", "--max-jobs", "2"])
        .env("PATH", &empty_path)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _agent = ChildGuard(child);
    let h = ready_with_report(scheduler.addr, "b1").await;
    assert_eq!(h.systems, ["x86_64-linux"]);
    assert_eq!(h.slots_total, 2);
    assert!(h.supported_features.is_empty());
}
