//! The queue with real Nix, side by side with stock Nix in the same run: three member
//! machines (real Nix 2.8 daemons that may not build locally) submit independent builds
//! at once to real sshd builders with their own stores, through `nixdispatch-hook`, the
//! agents and the scheduler (every build the member cannot run is accepted and waits in the
//! scheduler's queue), and through Nix's stock `build-remote` with the builders in the
//! members' nix.conf at their slot counts.
//!
//! Every build records on its builder when it started and ended (`tests/nix/queue-e2e.nix`),
//! so the numbers are the builders' view: builds running at once per builder, how long a
//! freed slot stayed idle while builds still waited, the makespan against the full-wave
//! bound. Asserted is only what must hold whatever the machine's load: no build lost (every
//! `nix-build` succeeds, every output is valid in its member's store, every build ran
//! once), no builder above its slots with nixdispatch (also across a `kill -9` of the
//! scheduler restarted 2 s later on the same address and database), and stock Nix completing.
//!
//! In the normal test run the builds are few and short. `benches/queue-e2e.sh` runs the
//! full size (`NIXDISPATCH_BENCH_OUT` set: 3 members × 6 builds of 4 s) and prints the
//! tables recorded in `docs/BENCHMARKS.md`.
//!
//! Needs what `e2e_hook.rs` needs (root, `nix-bin`, `openssh-server`, `busybox-static`, the
//! workspace's binaries).

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use common::member::Member;
use common::nixver::NixVersion;
use common::{BuilderSpec, Env};

/// How many builds of how long: the benchmark's size, or a short one for the test run.
#[derive(Clone, Copy, Debug)]
struct Size {
    per_member: u32,
    secs: u32,
}

const MEMBERS: usize = 3;

fn size() -> Size {
    if std::env::var_os("NIXDISPATCH_BENCH_OUT").is_some() {
        Size {
            per_member: 6,
            secs: 4,
        }
    } else {
        Size {
            per_member: 3,
            secs: 2,
        }
    }
}

/// The kernel's uptime in seconds: the clock the builds stamp with (`/proc/uptime`).
fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .expect("/proc/uptime")
}

/// One build as its builder recorded it.
#[derive(Clone, Debug)]
struct Stamp {
    name: String,
    host: String,
    start: f64,
    end: f64,
}

/// What each member builds: plain builds, i686-linux builds, builds requiring `kvm`.
#[derive(Clone, Copy, Debug, Default)]
struct Share {
    plain: u32,
    i686: u32,
    kvm: u32,
}

impl Share {
    fn total(&self) -> u32 {
        self.plain + self.i686 + self.kvm
    }
}

/// The members of one side of a comparison.
struct Side {
    label: &'static str,
    members: Vec<Member>,
}

/// One run's outcome.
struct Run {
    label: String,
    stamps: Vec<Stamp>,
    /// From the submission to the last `nix-build`'s exit, seconds.
    wall: f64,
    /// SSH logins the builders' sshd accepted during the run (one per connection).
    logins: usize,
}

/// Rewrites the hook configurations of the nixdispatch members (read by every hook at its
/// start) with SSH connection reuse on or off.
fn set_ssh_reuse(env: &mut Env, on: bool) {
    env.ssh_reuse = on;
    let url = env.scheduler_addr.clone().expect("a scheduler");
    for i in 0..MEMBERS {
        env.write_hook_config_named(&format!("m{i}"), &url, "");
    }
}

/// Starts the member machines: `MEMBERS` with nixdispatch-hook (each its own client id),
/// and `MEMBERS` of stock Nix with `machines` in nix.conf. Neither may build locally.
fn start_members(env: &Env, machines: &str) -> (Side, Side) {
    let url = env.scheduler_addr.clone().expect("a scheduler");
    let base = "substituters =\nsandbox = false\nbuild-users-group =\nmax-jobs = 0\n\
                build-poll-interval = 1\n";
    let hook = env.bin("nixdispatch-hook");
    let ours = (0..MEMBERS)
        .map(|i| {
            let config = env.write_hook_config_named(&format!("m{i}"), &url, "");
            env.start_member_with(
                NixVersion::V2_8,
                &format!("{base}builders =\nbuild-hook = {}\n", hook.display()),
                &[],
                &config,
            )
        })
        .collect();
    let stock_hook = stock_build_remote();
    let unused = env.write_hook_config_named("stock", &url, "");
    let stock = (0..MEMBERS)
        .map(|_| {
            env.start_member_with(
                NixVersion::V2_8,
                &format!(
                    "{base}builders = {machines}\nbuild-hook = {}\n",
                    stock_hook.display()
                ),
                &[],
                &unused,
            )
        })
        .collect();
    (
        Side {
            label: "nixdispatch",
            members: ours,
        },
        Side {
            label: "stock Nix",
            members: stock,
        },
    )
}

/// Debian's Nix 2.8 `build-remote` (`<prefix>/libexec/nix/build-remote`).
fn stock_build_remote() -> PathBuf {
    common::which("nix")
        .and_then(|nix| nix.canonicalize().ok())
        .and_then(|nix| {
            nix.parent()?
                .parent()
                .map(|p| p.join("libexec/nix/build-remote"))
        })
        .filter(|p| p.exists())
        .expect("the stock build-remote (<prefix>/libexec/nix/build-remote, Nix 2.8/2.9)")
}

/// Every member of `side` builds its `shares` at once; `during` runs meanwhile (given the
/// stamps directory). Asserts that nothing is lost: every `nix-build` succeeds, every output
/// is valid in its member's store and every build ran exactly once.
fn run(
    env: &mut Env,
    side: &Side,
    name: &str,
    shares: &[Share],
    size: Size,
    during: impl FnOnce(&mut Env, &Path),
) -> Run {
    let label = if name.starts_with("outage") {
        format!("{}, scheduler killed for 2 s", side.label)
    } else if name.starts_with("direct") {
        format!("{}, a new SSH connection per build", side.label)
    } else {
        side.label.to_owned()
    };
    let logins_before: usize = env.ssh_logins().values().sum();
    let stamps = env.path().join(format!("stamps-{}", env.tag(name)));
    std::fs::create_dir_all(&stamps).unwrap();
    std::fs::set_permissions(&stamps, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let fixture = env.path().join("queue-e2e.nix");
    let t0 = uptime();
    let children: Vec<(Child, u32)> = side
        .members
        .iter()
        .zip(shares)
        .enumerate()
        .map(|(i, (m, share))| {
            let tag = env.tag(&format!("{name}{i}"));
            let (plain, i686, kvm, secs) = (
                share.plain.to_string(),
                share.i686.to_string(),
                share.kvm.to_string(),
                size.secs.to_string(),
            );
            let child = m
                .nix_build_command(
                    &fixture,
                    &[
                        "--argstr",
                        "tag",
                        &tag,
                        "--argstr",
                        "stamps",
                        &stamps.display().to_string(),
                        "--arg",
                        "plain",
                        &plain,
                        "--arg",
                        "i686",
                        &i686,
                        "--arg",
                        "kvm",
                        &kvm,
                        "--argstr",
                        "sleep",
                        &secs,
                    ],
                )
                .spawn()
                .expect("nix-build");
            (child, share.total())
        })
        .collect();
    during(env, &stamps);
    let mut logs = String::new();
    for (i, ((child, expected), member)) in children.into_iter().zip(&side.members).enumerate() {
        let out = child.wait_with_output().expect("nix-build");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "{label}: member {i}'s nix-build failed:\n{stderr}\n{}",
            hook_logs(env)
        );
        let outputs: Vec<&str> = stdout.lines().map(str::trim).collect();
        assert_eq!(outputs.len(), expected as usize, "{label}: {stdout}");
        for o in &outputs {
            let valid = member
                .command(Path::new("nix-store"))
                .args(["--check-validity", o])
                .status()
                .is_ok_and(|s| s.success());
            assert!(valid, "{label}: {o} is not valid in member {i}'s store");
        }
        logs.push_str(&stderr);
    }
    let wall = uptime() - t0;
    let stamps = read_stamps(&stamps);
    let expected: u32 = shares.iter().map(Share::total).sum();
    assert_eq!(
        stamps.len(),
        expected as usize,
        "{label}: every build ran once: {stamps:?}"
    );
    assert!(
        stamps.iter().all(|s| s.host != "local"),
        "{label}: a member built locally: {stamps:?}"
    );
    let logins = env.ssh_logins().values().sum::<usize>() - logins_before;
    Run {
        label,
        stamps,
        wall,
        logins,
    }
}

fn hook_logs(env: &Env) -> String {
    let mut s = String::new();
    for i in 0..MEMBERS {
        let log = std::fs::read_to_string(env.path().join(format!("log/hook-m{i}.log")))
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        s.push_str(&format!(
            "--- hook m{i} (last lines)\n{}\n",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    s
}

fn read_stamps(dir: &Path) -> Vec<Stamp> {
    let mut v: Vec<Stamp> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(Stamp {
                name: f.first()?.to_string(),
                host: f.get(1)?.to_string(),
                start: f.get(2)?.parse().ok()?,
                end: f.get(3)?.parse().ok()?,
            })
        })
        .collect();
    v.sort_by(|a, b| a.start.total_cmp(&b.start));
    v
}

/// Most builds running at once on each builder.
fn peaks(stamps: &[Stamp]) -> BTreeMap<String, u32> {
    let mut by_host: BTreeMap<String, Vec<(f64, i32)>> = BTreeMap::new();
    for s in stamps {
        let e = by_host.entry(s.host.clone()).or_default();
        e.push((s.start, 1));
        e.push((s.end, -1));
    }
    by_host
        .into_iter()
        .map(|(h, mut ev)| {
            // Ends before starts at the same instant: a slot handed over is not two builds.
            ev.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let (mut now, mut peak) = (0i32, 0i32);
            for (_, d) in ev {
                now += d;
                peak = peak.max(now);
            }
            (h, peak as u32)
        })
        .collect()
}

/// How long each freed slot stayed idle before the next build started on its builder, for
/// every slot freed while a build that builder then ran was still waiting (every build was
/// submitted at the start). A builder's slots are alike, so the slot free longest takes the
/// next build. Slots free from the start are not counted: that wait is Nix's own start-up.
fn idle_gaps(stamps: &[Stamp], slots: &BTreeMap<String, u32>) -> Vec<f64> {
    let mut gaps = Vec::new();
    for (host, n) in slots {
        let mut ev: Vec<(f64, bool)> = stamps
            .iter()
            .filter(|s| &s.host == host)
            .flat_map(|s| [(s.start, true), (s.end, false)])
            .collect();
        ev.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        // Free slots, by when they became free (`None`: free from the start).
        let mut free: std::collections::VecDeque<Option<f64>> = (0..*n).map(|_| None).collect();
        for (t, start) in ev {
            if start {
                // Over its slots (stock Nix) a build takes no freed slot: no gap.
                if let Some(Some(since)) = free.pop_front() {
                    gaps.push(t - since);
                }
            } else {
                free.push_back(Some(t));
            }
        }
    }
    gaps.sort_by(f64::total_cmp);
    gaps
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// First start to last end, seconds.
fn makespan(stamps: &[Stamp]) -> f64 {
    let first = stamps.iter().map(|s| s.start).fold(f64::INFINITY, f64::min);
    let last = stamps.iter().map(|s| s.end).fold(0.0, f64::max);
    last - first
}

/// The makespan if every slot were busy from the first start: full waves of builds.
fn full_wave_bound(builds: usize, slots: u32, secs: u32) -> f64 {
    (builds as f64 / f64::from(slots)).ceil() * f64::from(secs)
}

fn slots_of(specs: &[BuilderSpec]) -> BTreeMap<String, u32> {
    specs
        .iter()
        .map(|s| (s.id.to_owned(), s.max_jobs))
        .collect()
}

fn peaks_text(p: &BTreeMap<String, u32>) -> String {
    p.iter()
        .map(|(h, n)| format!("{h} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Appends `text` to the benchmark's output (when set) and shows it.
fn report(text: &str) {
    eprintln!("{text}");
    if let Some(out) = std::env::var_os("NIXDISPATCH_BENCH_OUT") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .unwrap();
        writeln!(f, "{text}").unwrap();
    }
}

/// Three members sharing two builders of two slots: with nixdispatch no builder runs more
/// than its slots, also when the scheduler is killed mid-run and restarted 2 s later on the
/// same address and database, and no build is lost; stock Nix, from the members' nix.conf,
/// completes the same builds.
#[test]
fn three_members_share_two_builders_against_stock_nix() {
    let size = size();
    let specs = [BuilderSpec::new("b1", 2), BuilderSpec::new("b2", 2)];
    let mut env = Env::new(&specs);
    env.state_db = true;
    // The deployed lease TTL (the default), which sets how long a restarted scheduler holds
    // its queue while the holders of leases from before re-attach them.
    env.lease_ttl_millis = 60_000;
    env.start_scheduler_and_agents(&specs);
    let machines = specs
        .iter()
        .map(|s| env.machines_line_of(s))
        .collect::<Vec<_>>()
        .join(" ; ");
    let (ours, stock) = start_members(&env, &machines);
    let shares = [Share {
        plain: size.per_member,
        ..Share::default()
    }; MEMBERS];
    let slots = slots_of(&specs);
    let total: u32 = slots.values().sum();

    let stock_run = run(&mut env, &stock, "stock", &shares, size, |_, _| {});
    set_ssh_reuse(&mut env, false);
    let direct_run = run(&mut env, &ours, "direct", &shares, size, |_, _| {});
    set_ssh_reuse(&mut env, true);
    let our_run = run(&mut env, &ours, "queue", &shares, size, |_, _| {});
    // The outage: once the first wave has ended (its slots are being handed over), the
    // scheduler is killed and started again 2 s later.
    let mut outage_at = 0.0;
    let mut back_at = 0.0;
    let outage = run(&mut env, &ours, "outage", &shares, size, |env, stamps| {
        common::wait_for(Duration::from_secs(90), "the first wave to end", || {
            (std::fs::read_dir(stamps).ok()?.count() >= total as usize).then_some(())
        });
        outage_at = uptime();
        env.restart_scheduler_after(Duration::from_secs(2));
        back_at = uptime();
    });
    // Without reuse every build logs in anew. With it, builds join the master of their
    // member and builder once it is up; those that start before it connect directly, and
    // each member starts at most one master per builder (a lock keeps concurrent hooks
    // from starting two), so never more logins than builds plus masters.
    assert!(
        direct_run.logins >= direct_run.stamps.len(),
        "{} logins for {} builds without reuse",
        direct_run.logins,
        direct_run.stamps.len()
    );
    assert!(
        our_run.logins <= our_run.stamps.len() + MEMBERS * specs.len(),
        "{} logins for {} builds with reuse: {:?}",
        our_run.logins,
        our_run.stamps.len(),
        env.ssh_logins()
    );
    for r in [&direct_run, &our_run, &outage] {
        for (host, peak) in peaks(&r.stamps) {
            assert!(
                peak <= slots[&host],
                "{}: {peak} builds at once on {host} ({} slots): {:?}",
                r.label,
                slots[&host],
                r.stamps
            );
        }
    }
    common::wait_for(Duration::from_secs(30), "no lease left", || {
        env.leases().is_empty().then_some(())
    });

    let builds = MEMBERS * size.per_member as usize;
    let bound = full_wave_bound(builds, total, size.secs);
    let mut table = format!(
        "### {MEMBERS} members × {} builds of {} s, 2 builders × 2 slots (full-wave bound {bound:.1} s)\n\n\
         | run | peak builds per builder | idle gap median (s) | idle gap max (s) | idle slot-seconds | makespan (s) | vs bound | wall (s) | SSH logins |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        size.per_member, size.secs
    );
    for r in [&stock_run, &direct_run, &our_run, &outage] {
        let gaps = idle_gaps(&r.stamps, &slots);
        let m = makespan(&r.stamps);
        table.push_str(&format!(
            "| {} | {} | {:.2} | {:.2} | {:.1} | {m:.1} | {:+.0} % | {:.1} | {} |\n",
            r.label,
            peaks_text(&peaks(&r.stamps)),
            median(&gaps),
            gaps.last().copied().unwrap_or(0.0),
            gaps.iter().sum::<f64>(),
            (m / bound - 1.0) * 100.0,
            r.wall,
            r.logins
        ));
    }
    let idle_in = |r: &Run| idle_gaps(&r.stamps, &slots).iter().sum::<f64>();
    table.push_str(&format!(
        "\nOutage: scheduler killed {:.1} s after the first start, back {:.1} s later; slots sat idle \
         {:.1} slot-seconds more than without it, the makespan grew {:.1} s.\n",
        outage_at - outage.stamps.iter().map(|s| s.start).fold(f64::INFINITY, f64::min),
        back_at - outage_at,
        idle_in(&outage) - idle_in(&our_run),
        makespan(&outage.stamps) - makespan(&our_run.stamps),
    ));
    report(&table);
}

/// A third builder that alone serves `i686-linux` and `kvm` builds: with nixdispatch every
/// build completes, each special build on that builder, none over its slots; stock Nix
/// completes the same builds. Reports how long the special builds waited.
#[test]
fn special_builds_against_stock_nix() {
    let size = size();
    let mut special = BuilderSpec::new("b3", 2);
    special.extra_systems = &["i686-linux"];
    special.features = &["kvm"];
    let specs = [
        BuilderSpec::new("b1", 2),
        BuilderSpec::new("b2", 2),
        special,
    ];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let machines = specs
        .iter()
        .map(|s| env.machines_line_of(s))
        .collect::<Vec<_>>()
        .join(" ; ");
    let (ours, stock) = start_members(&env, &machines);
    let plain = size.per_member - 1;
    let shares = [
        Share {
            plain,
            i686: 1,
            kvm: 0,
        },
        Share {
            plain,
            i686: 0,
            kvm: 1,
        },
        Share {
            plain: size.per_member,
            i686: 0,
            kvm: 0,
        },
    ];
    let slots = slots_of(&specs);
    let total: u32 = slots.values().sum();
    let stock_run = run(&mut env, &stock, "stock-special", &shares, size, |_, _| {});
    let our_run = run(&mut env, &ours, "queue-special", &shares, size, |_, _| {});
    for r in [&stock_run, &our_run] {
        let misplaced: Vec<&Stamp> = r
            .stamps
            .iter()
            .filter(|s| !s.name.starts_with("plain") && s.host != "b3")
            .collect();
        assert!(misplaced.is_empty(), "{}: {misplaced:?}", r.label);
    }
    for (host, peak) in peaks(&our_run.stamps) {
        assert!(
            peak <= slots[&host],
            "{peak} builds at once on {host}: {:?}",
            our_run.stamps
        );
    }
    common::wait_for(Duration::from_secs(30), "no lease left", || {
        env.leases().is_empty().then_some(())
    });

    let builds = shares.iter().map(Share::total).sum::<u32>() as usize;
    let bound = full_wave_bound(builds, total, size.secs);
    let mut table = format!(
        "### {MEMBERS} members × {} builds of {} s (one of the first member's i686-linux, one of the second's needing kvm), b1, b2 × 2 slots, b3 (also i686-linux, kvm) × 2 slots (full-wave bound {bound:.1} s)\n\n\
         | run | peak builds per builder | special builds' wait after the first start: median / max (s) | plain builds on b3 before the last special started | makespan (s) | wall (s) |\n\
         |---|---|---|---|---|---|\n",
        size.per_member, size.secs
    );
    for r in [&stock_run, &our_run] {
        let first = r
            .stamps
            .iter()
            .map(|s| s.start)
            .fold(f64::INFINITY, f64::min);
        let mut waits: Vec<f64> = r
            .stamps
            .iter()
            .filter(|s| !s.name.starts_with("plain"))
            .map(|s| s.start - first)
            .collect();
        waits.sort_by(f64::total_cmp);
        let last_special = r
            .stamps
            .iter()
            .filter(|s| !s.name.starts_with("plain"))
            .map(|s| s.start)
            .fold(0.0, f64::max);
        let plain_before = r
            .stamps
            .iter()
            .filter(|s| s.name.starts_with("plain") && s.host == "b3" && s.start < last_special)
            .count();
        table.push_str(&format!(
            "| {} | {} | {:.2} / {:.2} | {plain_before} | {:.1} | {:.1} |\n",
            r.label,
            peaks_text(&peaks(&r.stamps)),
            median(&waits),
            waits.last().copied().unwrap_or(0.0),
            makespan(&r.stamps),
            r.wall
        ));
    }
    report(&table);
}
