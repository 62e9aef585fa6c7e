//! Benchmark, not a test of behaviour: what `nixdispatch-gate` costs a member, against the
//! same real SSH builder without it, side by side in one run (alternating): the throughput
//! of a large upload (`nix-copy-closure`, ssh://, and `nix copy`, ssh-ng://) and the time
//! to connect and finish the handshake (`nix store ping`). Nothing is asserted about the
//! numbers.
//!
//! `benches/gate-overhead.sh` runs it in release mode with more rounds and a larger upload
//! and prints the table recorded in `docs/benchmarks/gate.md`. In the normal test run it
//! does `NIXDISPATCH_BENCH_ROUNDS` (default 1) round of a small upload, so that the
//! harness keeps working.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::gate::GateOpts;
use common::{BuilderSpec, Env};

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Runs `cmd` and returns its wall time; panics with its stderr when it fails.
fn timed(cmd: &mut Command) -> Duration {
    let started = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().expect("spawn");
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

/// A fresh store path of `size` random bytes in the client's store.
fn fresh_path(env: &Env, size: u64, n: usize) -> String {
    let f = env.path().join(format!("upload-{n}"));
    let mut data = vec![0u8; usize::try_from(size).unwrap()];
    {
        use std::io::Read as _;
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .read_exact(&mut data)
            .unwrap();
    }
    std::fs::write(&f, data).unwrap();
    let out = Command::new("nix-store")
        .arg("--add")
        .arg(&f)
        .env_remove("NIX_REMOTE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&f).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Deletes an uploaded path from the client's store again (large uploads must not pile up).
fn forget(path: &str) {
    let _ = Command::new("nix-store")
        .args(["--delete", path])
        .env_remove("NIX_REMOTE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Starts `nix-daemon --stdio` or `nix-store --serve --write` (`serve`) directly, or
/// through the gate (`gate_config`), speaks the protocol's handshake as Nix 2.8 does and
/// returns the time from spawning to the end of the handshake. No SSH: this isolates what
/// the gate adds (its start, its configuration, the child and the relay).
fn local_handshake(serve: bool, gate_config: Option<&std::path::Path>) -> Duration {
    use nixdispatch::gate::{serve as sv, worker as wk};
    use std::io::{Read as _, Write as _};
    let command: &[&str] = if serve {
        &["nix-store", "--serve", "--write"]
    } else {
        &["nix-daemon", "--stdio"]
    };
    let started = Instant::now();
    let mut cmd = match gate_config {
        Some(cfg) => {
            let mut c = Command::new(common::gate::gate_bin());
            c.arg("--config")
                .arg(cfg)
                .args(["--member", "bench"])
                .env("SSH_ORIGINAL_COMMAND", command.join(" "));
            c
        }
        None => {
            let mut c = Command::new(command[0]);
            c.args(&command[1..]);
            c
        }
    };
    let mut child = cmd
        .env_remove("NIX_REMOTE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut word = || {
        let mut b = [0u8; 8];
        stdout.read_exact(&mut b).unwrap();
        u64::from_le_bytes(b)
    };
    let u = |n: u64| n.to_le_bytes();
    if serve {
        stdin
            .write_all(&[u(sv::MAGIC_1), u(0x207)].concat())
            .unwrap();
        assert_eq!(word(), sv::MAGIC_2);
        word();
    } else {
        stdin.write_all(&u(wk::MAGIC_1)).unwrap();
        assert_eq!(word(), wk::MAGIC_2);
        word();
        stdin.write_all(&[u(0x122), u(0), u(0)].concat()).unwrap();
        let len = word();
        for _ in 0..len.div_ceil(8) {
            word();
        }
        assert_eq!(word(), wk::STDERR_LAST);
    }
    let elapsed = started.elapsed();
    drop(stdin);
    let _ = child.wait();
    elapsed
}

/// Pushes a serve-protocol upload (`AddToStoreNar` with `size` NAR bytes) into a sink that
/// answers the handshake and discards the rest, directly or through the gate (with the sink
/// as its `nix_store`), and returns the time from the end of the handshake to the sink's
/// exit. This is the relay's own throughput, with no SSH and no store in the way.
fn relay_upload(
    sink_config: Option<&std::path::Path>,
    sink: &std::path::Path,
    size: usize,
) -> Duration {
    use nixdispatch::gate::serve as sv;
    use nixdispatch::gate::wire::{put_bytes, put_strings, put_u64};
    use std::io::{Read as _, Write as _};
    let mut cmd = match sink_config {
        Some(cfg) => {
            let mut c = Command::new(common::gate::gate_bin());
            c.arg("--config")
                .arg(cfg)
                .args(["--member", "bench"])
                .env("SSH_ORIGINAL_COMMAND", "nix-store --serve --write");
            c
        }
        None => Command::new(sink),
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut hello = Vec::new();
    put_u64(&mut hello, sv::MAGIC_1);
    put_u64(&mut hello, 0x207);
    stdin.write_all(&hello).unwrap();
    let mut reply = [0u8; 16];
    stdout.read_exact(&mut reply).unwrap();
    let mut header = Vec::new();
    put_u64(&mut header, 9);
    put_bytes(
        &mut header,
        b"/nix/store/00000000000000000000000000000000-upload",
    );
    put_bytes(&mut header, b"");
    put_bytes(&mut header, b"0000");
    put_strings(&mut header, &[] as &[&str]);
    put_u64(&mut header, 0);
    put_u64(&mut header, size as u64);
    put_u64(&mut header, 0);
    put_strings(&mut header, &[] as &[&str]);
    put_bytes(&mut header, b"");
    let block = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    stdin.write_all(&header).unwrap();
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len());
        stdin.write_all(&block[..n]).unwrap();
        left -= n;
    }
    drop(stdin);
    child.wait().unwrap();
    started.elapsed()
}

/// Measures upload throughput and handshake time through the gate and directly, and prints
/// the comparison.
#[test]
fn gate_overhead_against_direct_sessions() {
    let rounds = usize::try_from(env_num("NIXDISPATCH_BENCH_ROUNDS", 1)).unwrap();
    let size = env_num("NIXDISPATCH_BENCH_UPLOAD_BYTES", 4 << 20);
    let pings = usize::try_from(env_num("NIXDISPATCH_BENCH_PINGS", 3)).unwrap();
    let specs = [BuilderSpec::new("b1", 4)];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let m = env.member("bench");
    env.install_gate("b1", std::slice::from_ref(&m), &GateOpts::default());
    let (direct_host, direct_opts) = env.sshopts("b1", None);
    let (gate_host, gate_opts) = env.sshopts("b1", Some(&m));
    let via = [
        ("direct", direct_host, direct_opts),
        ("gate", gate_host, gate_opts),
    ];
    // (kind, via) -> samples
    let mut upload: Vec<Vec<Duration>> = vec![Vec::new(); 4];
    let mut ping: Vec<Vec<Duration>> = vec![Vec::new(); 4];
    let mut n = 0;
    for round in 0..rounds {
        // Alternate who goes first, so that warm caches favour neither.
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        for &i in &order {
            let (_, host, opts) = &via[i];
            n += 1;
            let path = fresh_path(&env, size, n);
            upload[i].push(timed(
                Command::new("nix-copy-closure")
                    .args(["--to", host, &path])
                    .env("NIX_SSHOPTS", opts)
                    .env_remove("NIX_REMOTE"),
            ));
            forget(&path);
            n += 1;
            let path = fresh_path(&env, size, n);
            upload[2 + i].push(timed(
                Command::new("nix")
                    .args(["--experimental-features", "nix-command", "copy", "--to"])
                    .arg(format!("ssh-ng://{host}"))
                    .arg(&path)
                    .env("NIX_SSHOPTS", opts)
                    .env_remove("NIX_REMOTE"),
            ));
            forget(&path);
            for _ in 0..pings {
                for (k, scheme) in ["ssh", "ssh-ng"].iter().enumerate() {
                    ping[2 * k + i].push(timed(
                        Command::new("nix")
                            .args([
                                "--experimental-features",
                                "nix-command",
                                "store",
                                "ping",
                                "--store",
                            ])
                            .arg(format!("{scheme}://{host}"))
                            .env("NIX_SSHOPTS", opts)
                            .env_remove("NIX_REMOTE"),
                    ));
                }
            }
        }
    }
    env.stop_scheduler();
    // The handshake without SSH, many times: SSH and Nix's own start dominate the numbers
    // above and vary by more than the gate's cost on a busy machine.
    let local_rounds = usize::try_from(env_num("NIXDISPATCH_BENCH_LOCAL", 10)).unwrap();
    let gate_cfg = env.path().join("gate_b1.toml");
    let mut local: Vec<Vec<Duration>> = vec![Vec::new(); 4];
    for round in 0..local_rounds {
        for k in 0..2 {
            let serve = k == 1;
            let order: [Option<&std::path::Path>; 2] = if round % 2 == 0 {
                [None, Some(&gate_cfg)]
            } else {
                [Some(&gate_cfg), None]
            };
            for cfg in order {
                let d = local_handshake(serve, cfg);
                local[2 * k + usize::from(cfg.is_some())].push(d);
            }
        }
    }
    // The relay alone: a sink that answers the serve handshake and discards the rest.
    let sink = env.path().join("sink");
    std::fs::write(
        &sink,
        "#!/bin/sh\nprintf '\\313\\356\\122\\124\\0\\0\\0\\0\\007\\002\\0\\0\\0\\0\\0\\0'\ncat > /dev/null\n",
    )
    .unwrap();
    std::fs::set_permissions(&sink, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sink_cfg = env.path().join("gate_sink.toml");
    std::fs::write(
        &sink_cfg,
        format!("host_id = \"bench\"\nnix_store = \"{}\"\n", sink.display()),
    )
    .unwrap();
    let relay_bytes = usize::try_from(env_num("NIXDISPATCH_BENCH_RELAY_BYTES", 64 << 20)).unwrap();
    let mut relay: Vec<Vec<Duration>> = vec![Vec::new(); 2];
    for round in 0..rounds.max(3) {
        let order: [Option<&std::path::Path>; 2] = if round % 2 == 0 {
            [None, Some(&sink_cfg)]
        } else {
            [Some(&sink_cfg), None]
        };
        for cfg in order {
            relay[usize::from(cfg.is_some())].push(relay_upload(cfg, &sink, relay_bytes));
        }
    }
    let mib = size as f64 / f64::from(1 << 20);
    let mut table = String::from(
        "| measure | direct | through the gate | gate / direct | samples |\n|---|---|---|---|---|\n",
    );
    for (k, what) in [
        "upload, ssh:// (nix-copy-closure)",
        "upload, ssh-ng:// (nix copy)",
    ]
    .iter()
    .enumerate()
    {
        let d = median(&mut upload[2 * k]);
        let g = median(&mut upload[2 * k + 1]);
        let (dt, gt) = (mib / d.as_secs_f64(), mib / g.as_secs_f64());
        table.push_str(&format!(
            "| {what}, {mib:.0} MiB, median MiB/s | {dt:.0} | {gt:.0} | {:.1} % | {rounds} |\n",
            100.0 * gt / dt
        ));
    }
    for (k, what) in [
        "connect + handshake, ssh://",
        "connect + handshake, ssh-ng://",
    ]
    .iter()
    .enumerate()
    {
        let d = median(&mut ping[2 * k]);
        let g = median(&mut ping[2 * k + 1]);
        table.push_str(&format!(
            "| {what} (`nix store ping`), median ms | {:.1} | {:.1} | {:+.1} ms | {} |\n",
            d.as_secs_f64() * 1000.0,
            g.as_secs_f64() * 1000.0,
            (g.as_secs_f64() - d.as_secs_f64()) * 1000.0,
            rounds * pings
        ));
    }
    {
        let rmib = relay_bytes as f64 / f64::from(1 << 20);
        let d = rmib / median(&mut relay[0]).as_secs_f64();
        let g = rmib / median(&mut relay[1]).as_secs_f64();
        table.push_str(&format!(
            "| relay alone, no SSH, serve upload of {rmib:.0} MiB into a discarding sink, median MiB/s | {d:.0} | {g:.0} | {:.1} % | {} |\n",
            100.0 * g / d,
            relay[0].len()
        ));
    }
    for (k, what) in [
        "spawn + handshake, no SSH, `nix-daemon --stdio`",
        "spawn + handshake, no SSH, `nix-store --serve --write`",
    ]
    .iter()
    .enumerate()
    {
        let d = median(&mut local[2 * k]);
        let g = median(&mut local[2 * k + 1]);
        table.push_str(&format!(
            "| {what}, median ms | {:.2} | {:.2} | {:+.2} ms | {local_rounds} |\n",
            d.as_secs_f64() * 1000.0,
            g.as_secs_f64() * 1000.0,
            (g.as_secs_f64() - d.as_secs_f64()) * 1000.0,
        ));
    }
    eprintln!("{table}");
    if let Some(out) = std::env::var_os("NIXDISPATCH_BENCH_OUT") {
        std::fs::write(out, &table).unwrap();
    }
}
