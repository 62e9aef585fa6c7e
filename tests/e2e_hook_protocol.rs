//! The hook binary speaking the daemon's protocol on its stdin and stderr, without Nix or
//! root: the answers when the scheduler is dead, silent, or the configuration is broken.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nixdispatch::hook::codec::{self, Settings, TryRequest};

/// Runs the hook with `config` on a handshake and `tries` `try`s; returns its fd 2 and the
/// time it took.
fn converse(config: &str, tries: usize) -> (String, Duration, Option<i32>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hook.toml");
    std::fs::write(&path, config).unwrap();
    let mut input = Vec::new();
    let settings = Settings {
        entries: vec![
            ("builders".into(), "".into()),
            ("system".into(), "x86_64-linux".into()),
            ("system-features".into(), "".into()),
        ],
    };
    codec::write_settings(&mut input, &settings);
    for i in 0..tries {
        codec::write_try(
            &mut input,
            &TryRequest {
                am_willing: true,
                needed_system: "x86_64-linux".into(),
                drv_path: format!("/nix/store/00000000000000000000000000000000-d{i}.drv"),
                required_features: vec![],
            },
        );
    }
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nixdispatch-hook"))
        .arg("0")
        .env("NIXDISPATCH_HOOK_CONFIG", &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    (err, started.elapsed(), status.code())
}

fn replies(err: &str) -> Vec<&str> {
    err.lines().filter(|l| l.starts_with("# ")).collect()
}

/// Every line the hook writes on fd 2 is a control reply or an `@nix` JSON message.
fn assert_clean(err: &str) {
    for l in err.lines() {
        assert!(
            l.starts_with("# ") || codec::log_line_text(l).is_some(),
            "junk on fd 2: {l:?}"
        );
    }
}

/// With the scheduler's port closed and no fallback, every `try` is declined with a reason,
/// and the hook exits 0 at the end of input.
#[test]
fn dead_scheduler_declines_each_try() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let (err, _, code) = converse(&format!("scheduler = \"{url}\""), 3);
    assert_clean(&err);
    assert_eq!(replies(&err), vec!["# decline"; 3], "{err}");
    assert!(err.contains("scheduler unreachable"), "{err}");
    assert_eq!(code, Some(0));
}

/// A scheduler that accepts connections but never answers cannot hold the daemon: the `try`
/// is declined within the configured bound.
#[test]
fn silent_scheduler_is_bounded() {
    // Bound but never accepted: the TCP connect succeeds (backlog), HTTP/2 never answers.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (err, took, _) = converse(
        &format!("scheduler = \"{url}\"\n[timeouts]\nconnect_millis = 5000\ntry_millis = 300\n"),
        2,
    );
    drop(l);
    assert_clean(&err);
    assert_eq!(replies(&err), vec!["# decline"; 2], "{err}");
    // The second `try` skips the dead scheduler (backoff) instead of waiting again.
    assert!(took < Duration::from_millis(2500), "took {took:?}");
}

/// A broken configuration disables the hook for the command: `# decline-permanently` with an
/// error naming the key.
#[test]
fn broken_config_declines_permanently() {
    let (err, _, code) = converse("schedulr = \"http://x\"", 1);
    assert_clean(&err);
    assert_eq!(replies(&err), vec!["# decline-permanently"], "{err}");
    assert!(err.contains("schedulr"), "{err}");
    assert_eq!(code, Some(0));
}
