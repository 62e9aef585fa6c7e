//! Sampling the host: what goes into a `Report`, and the one-off facts of the `Register`.
//!
//! The parsers are pure and live in submodules; this module does the I/O and the
//! bookkeeping: a source that fails is logged once when it starts failing (and once when it
//! recovers), its value is left absent in the report, and sampling goes on.
//!
//! On Linux everything comes from `/proc` (its root is injectable so tests can point it at a
//! fixture tree) and `statvfs`. Elsewhere (macOS) load and memory come from `sysinfo`,
//! disk space from `statvfs`, and there is no pressure information.

pub mod builds;
pub mod linux;
pub mod macos;
pub mod portable;
pub mod statvfs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nixdispatch::proto;

use self::builds::BuildUsers;
#[cfg(target_os = "linux")]
use self::builds::ProcInfo;
use self::linux::LoadAvg;
use self::statvfs::DiskSpace;
use crate::error::{Error, Result};

/// Pressure stall `avg10` values, in percent; each absent when the kernel does not report it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Pressure {
    /// CPU, some.
    pub cpu_some: Option<f64>,
    /// Memory, some.
    pub memory_some: Option<f64>,
    /// Memory, full.
    pub memory_full: Option<f64>,
    /// I/O, some.
    pub io_some: Option<f64>,
    /// I/O, full.
    pub io_full: Option<f64>,
}

/// One sample of the host; every field is absent when it could not be measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sample {
    /// Builds running on the host.
    pub running_builds: Option<u32>,
    /// Load averages.
    pub load: Option<LoadAvg>,
    /// Pressure stall information (absent as a whole when no file could be read).
    pub pressure: Option<Pressure>,
    /// Memory available for new work, bytes.
    pub available_memory_bytes: Option<u64>,
    /// The store's file system.
    pub store: Option<DiskSpace>,
    /// The build directory's file system.
    pub build_dir: Option<DiskSpace>,
}

impl From<DiskSpace> for proto::DiskSpace {
    fn from(d: DiskSpace) -> Self {
        Self {
            free_bytes: d.free_bytes,
            total_bytes: d.total_bytes,
        }
    }
}

impl From<Sample> for proto::Report {
    fn from(s: Sample) -> Self {
        Self {
            running_builds: s.running_builds,
            load: s.load.map(|l| proto::LoadAverage {
                load1: l.load1,
                load5: l.load5,
                load15: l.load15,
            }),
            pressure: s.pressure.map(|p| proto::Pressure {
                cpu_some_avg10: p.cpu_some,
                memory_some_avg10: p.memory_some,
                memory_full_avg10: p.memory_full,
                io_some_avg10: p.io_some,
                io_full_avg10: p.io_full,
            }),
            available_memory_bytes: s.available_memory_bytes,
            store: s.store.map(Into::into),
            build_dir: s.build_dir.map(Into::into),
        }
    }
}

/// Facts about the host that go into the registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostFacts {
    /// Logical CPUs usable by this process (0: unknown).
    pub cpu_count: u32,
    /// Physical memory in bytes (0: unknown).
    pub total_memory_bytes: u64,
}

/// Logical CPUs available to this process, 0 when unknown.
pub fn cpu_count() -> u32 {
    std::thread::available_parallelism().map_or(0, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}

/// Remembers which sources are failing, so each failure is logged once, not every report.
#[derive(Debug, Default)]
struct SourceHealth {
    failing: BTreeMap<&'static str, String>,
}

impl SourceHealth {
    fn check<T>(&mut self, source: &'static str, result: Result<T>) -> Option<T> {
        match result {
            Ok(value) => {
                if self.failing.remove(source).is_some() {
                    tracing::info!(source, "sample source recovered");
                }
                Some(value)
            }
            Err(error) => {
                let message = error.to_string();
                match self.failing.get(source) {
                    Some(previous) if *previous == message => {
                        tracing::debug!(source, %message, "sample still failing, skipped");
                    }
                    _ => {
                        let error: &dyn std::error::Error = &error;
                        tracing::warn!(source, error, "bad sample, value left absent in reports");
                        self.failing.insert(source, message);
                    }
                }
                None
            }
        }
    }
}

/// Where to sample from and what to count.
#[derive(Debug, Clone)]
pub struct SamplerConfig {
    /// Root of the proc file system (`/proc`; a fixture tree in tests). Linux only.
    pub proc_root: PathBuf,
    /// The Nix store directory, for its free space.
    pub store_dir: PathBuf,
    /// The build directory, for its free space.
    pub build_dir: PathBuf,
    /// The build users, when the host has a build users group that could be resolved.
    pub build_users: BuildUsers,
}

/// Takes samples. Holds the state kept across samples (the `sysinfo` handle, which sources
/// are failing) so a report allocates no more than the previous one.
#[derive(Debug)]
pub struct Sampler {
    config: SamplerConfig,
    health: SourceHealth,
    #[cfg(target_os = "linux")]
    scanner: ProcScanner,
    #[cfg(not(target_os = "linux"))]
    portable: portable::Portable,
}

impl Sampler {
    /// A sampler for `config`.
    pub fn new(config: SamplerConfig) -> Self {
        Self {
            config,
            health: SourceHealth::default(),
            #[cfg(target_os = "linux")]
            scanner: ProcScanner::default(),
            #[cfg(not(target_os = "linux"))]
            portable: portable::Portable::default(),
        }
    }

    /// The registration facts (CPU count, total memory); unknown ones are 0.
    pub fn host_facts(&mut self) -> HostFacts {
        let total_memory_bytes = self.total_memory().unwrap_or(0);
        HostFacts {
            cpu_count: cpu_count(),
            total_memory_bytes,
        }
    }

    /// Takes one sample. Never fails: bad sources are logged and left absent.
    pub fn sample(&mut self) -> Sample {
        let store = disk(&mut self.health, "store", &self.config.store_dir);
        let build_dir = disk(&mut self.health, "build_dir", &self.config.build_dir);
        let mut sample = self.sample_os();
        sample.store = store;
        sample.build_dir = build_dir;
        sample
    }
}

fn disk(health: &mut SourceHealth, name: &'static str, path: &Path) -> Option<DiskSpace> {
    health.check(name, statvfs::disk_space(name, path))
}

#[cfg(target_os = "linux")]
impl Sampler {
    fn read(&self, relative: &str) -> Result<String> {
        let path = self.config.proc_root.join(relative);
        std::fs::read_to_string(&path).map_err(|source| Error::ReadSample { path, source })
    }

    fn total_memory(&mut self) -> Option<u64> {
        let info = self.read("meminfo").and_then(|t| linux::parse_meminfo(&t));
        self.health
            .check("/proc/meminfo", info)
            .map(|i| i.total_bytes)
    }

    fn sample_os(&mut self) -> Sample {
        let load = self.read("loadavg").and_then(|t| linux::parse_loadavg(&t));
        let load = self.health.check("/proc/loadavg", load);
        let mem = self.read("meminfo").and_then(|t| linux::parse_meminfo(&t));
        let available_memory_bytes = self
            .health
            .check("/proc/meminfo", mem)
            .and_then(|m| m.available_bytes);
        let mut psi = |name: &'static str, file: &str| {
            let result = self
                .read(file)
                .and_then(|t| linux::parse_pressure(name, &t));
            self.health.check(name, result)
        };
        let cpu = psi("/proc/pressure/cpu", "pressure/cpu");
        let memory = psi("/proc/pressure/memory", "pressure/memory");
        let io = psi("/proc/pressure/io", "pressure/io");
        let pressure = (cpu.is_some() || memory.is_some() || io.is_some()).then(|| Pressure {
            cpu_some: cpu.and_then(|p| p.some),
            memory_some: memory.and_then(|p| p.some),
            memory_full: memory.and_then(|p| p.full),
            io_some: io.and_then(|p| p.some),
            io_full: io.and_then(|p| p.full),
        });
        let children_of_nix = self.config.build_users.uids.is_empty();
        let procs = self.scanner.scan(&self.config.proc_root, children_of_nix);
        let running_builds = self
            .health
            .check("/proc/<pid>", procs)
            .map(|procs| builds::count_builds(&procs, &self.config.build_users));
        Sample {
            running_builds,
            load,
            pressure,
            available_memory_bytes,
            store: None,
            build_dir: None,
        }
    }
}

/// Lists the processes under `proc_root` once, without a cache (see [`ProcScanner::scan`]).
#[cfg(target_os = "linux")]
pub fn scan_proc(proc_root: &Path, children_of_nix: bool) -> Result<Vec<ProcInfo>> {
    ProcScanner::default().scan(proc_root, children_of_nix)
}

/// How many scans a cached command name is trusted before it is read again.
#[cfg(target_os = "linux")]
pub const COMM_REVALIDATE_SCANS: u32 = 6;

/// Command names of processes that routinely `exec` into Nix: the shells an SSH session
/// runs its command through (`bash -c "nix-daemon --stdio"`) and sshd's session process.
/// Never cached, so a build that starts as one of them is counted in the very next report.
#[cfg(target_os = "linux")]
const EXECS_INTO_NIX: &[&str] = &[
    "sh",
    "bash",
    "dash",
    "zsh",
    "ksh",
    "mksh",
    "fish",
    "busybox",
    "sshd",
    "sshd-session",
    "nix-ssh-wrappe",
];

/// A cached `comm`, valid while `/proc/<pid>` keeps its inode number.
#[cfg(target_os = "linux")]
#[derive(Debug)]
struct CachedComm {
    ino: u64,
    comm: String,
    age: u32,
    seen: bool,
}

/// Lists `/proc`, keeping the command names between scans.
///
/// Reading every process's `comm` is the costliest part of a report (an open, a read and a
/// close per process), and names rarely change, so they are cached per pid, keyed by the
/// inode number of `/proc/<pid>`: procfs gives a new process a new inode, so a reused pid
/// never inherits a stale name. A name does change on `exec`, which matters twice: a child
/// Nix forks starts with Nix's name and becomes the builder, so Nix names are never cached;
/// and a shell or sshd session that `exec`s into Nix (`bash -c "nix-store --serve"`) would be
/// cached under its old name, so those names are never cached either (a right-after-start
/// count that missed such a build let a restarted scheduler over-commit the host). Every
/// other entry is still re-read after [`COMM_REVALIDATE_SCANS`] scans. The cache holds one
/// entry per live process and drops the others on every scan.
#[cfg(target_os = "linux")]
#[derive(Debug, Default)]
pub struct ProcScanner {
    comms: std::collections::HashMap<u32, CachedComm>,
    /// One buffer for every small file.
    buf: String,
}

#[cfg(target_os = "linux")]
impl ProcScanner {
    /// Lists the processes under `proc_root` with their uids (one `stat` of `/proc/<pid>`
    /// each).
    ///
    /// With `children_of_nix` it also finds what rule 3 of [`builds`] needs: every process's
    /// `comm` (cached, see above), and the parent of just the children of Nix processes, from
    /// `/proc/<nix>/task/*/children`. On kernels without that file it falls back to reading
    /// every process's `stat`. Without `children_of_nix`, `comm` is empty and `ppid` 0.
    ///
    /// Processes that exit while being read are skipped (that race is normal); an unreadable
    /// or empty `/proc` is an error, so the build count is absent rather than a bogus 0.
    pub fn scan(&mut self, proc_root: &Path, children_of_nix: bool) -> Result<Vec<ProcInfo>> {
        use std::os::unix::fs::MetadataExt;
        let read_err = |source| Error::ReadSample {
            path: proc_root.to_owned(),
            source,
        };
        let mut procs = Vec::with_capacity(self.comms.len() + 32);
        let mut path = proc_root.to_path_buf();
        for entry in std::fs::read_dir(proc_root).map_err(read_err)? {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            path.push(&name);
            // The owner of /proc/<pid> is the process's effective uid.
            let meta = std::fs::metadata(&path);
            let comm = match (&meta, children_of_nix) {
                (Ok(meta), true) => self.comm(&mut path, pid, meta.ino()),
                _ => Some(String::new()),
            };
            path.pop();
            let (Ok(meta), Some(comm)) = (meta, comm) else {
                continue;
            };
            procs.push(ProcInfo {
                pid,
                ppid: 0,
                uid: meta.uid(),
                comm,
            });
        }
        self.comms.retain(|_, c| std::mem::take(&mut c.seen));
        if procs.is_empty() {
            return Err(Error::BadSample {
                source_name: "/proc/<pid>",
                reason: "no process found".into(),
            });
        }
        if children_of_nix {
            procs.sort_unstable_by_key(|p| p.pid);
            let nix: Vec<u32> = procs
                .iter()
                .filter(|p| builds::is_nix_comm(&p.comm))
                .map(|p| p.pid)
                .collect();
            for parent in nix {
                let Ok(children) = nix_children(proc_root, parent, &mut self.buf) else {
                    return scan_parents_from_stat(proc_root, procs, &mut self.buf);
                };
                for child in children {
                    if let Ok(i) = procs.binary_search_by_key(&child, |p| p.pid) {
                        procs[i].ppid = parent;
                    }
                }
            }
        }
        Ok(procs)
    }

    /// The command name of `pid` (whose directory is `dir`), from the cache when valid.
    fn comm(&mut self, dir: &mut PathBuf, pid: u32, ino: u64) -> Option<String> {
        if let Some(c) = self.comms.get_mut(&pid)
            && c.ino == ino
            && c.age < COMM_REVALIDATE_SCANS
            && !builds::is_nix_comm(&c.comm)
            && !EXECS_INTO_NIX.contains(&c.comm.as_str())
        {
            c.age += 1;
            c.seen = true;
            return Some(c.comm.clone());
        }
        dir.push("comm");
        let comm = read_small(dir, &mut self.buf).map(|t| t.trim_end_matches('\n').to_owned());
        dir.pop();
        let comm = comm.ok()?;
        self.comms.insert(
            pid,
            CachedComm {
                ino,
                comm: comm.clone(),
                age: 0,
                seen: true,
            },
        );
        Some(comm)
    }
}

/// Reads a small `/proc` file into `buf` (reused between calls).
#[cfg(target_os = "linux")]
fn read_small<'a>(path: &Path, buf: &'a mut String) -> std::io::Result<&'a str> {
    use std::io::Read;
    buf.clear();
    std::fs::File::open(path)?.read_to_string(buf)?;
    Ok(buf)
}

/// The children of every thread of `pid` (`/proc/<pid>/task/*/children`). A process that
/// exited meanwhile has none; a kernel without the file is an error.
#[cfg(target_os = "linux")]
fn nix_children(proc_root: &Path, pid: u32, buf: &mut String) -> std::io::Result<Vec<u32>> {
    let tasks = proc_root.join(pid.to_string()).join("task");
    let Ok(entries) = std::fs::read_dir(&tasks) else {
        return Ok(Vec::new());
    };
    let mut children = Vec::new();
    for task in entries.flatten() {
        let file = task.path().join("children");
        match read_small(&file, buf) {
            Ok(text) => children.extend(
                text.split_ascii_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !task.path().exists() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(children)
}

/// The fallback for kernels without `children` files: every process's parent from `stat`.
#[cfg(target_os = "linux")]
fn scan_parents_from_stat(
    proc_root: &Path,
    mut procs: Vec<ProcInfo>,
    buf: &mut String,
) -> Result<Vec<ProcInfo>> {
    for p in &mut procs {
        let file = proc_root.join(p.pid.to_string()).join("stat");
        if let Ok(stat) = read_small(&file, buf)
            .map_err(|_| ())
            .and_then(|t| linux::parse_stat(t).map_err(|_| ()))
        {
            p.ppid = stat.ppid;
        }
    }
    Ok(procs)
}

#[cfg(not(target_os = "linux"))]
impl Sampler {
    fn total_memory(&mut self) -> Option<u64> {
        let mem = self.portable.memory();
        self.health.check("memory", mem).map(|m| m.total_bytes)
    }

    fn sample_os(&mut self) -> Sample {
        let load = self.portable.load();
        let load = self.health.check("load", load);
        let mem = self.portable.memory();
        let available_memory_bytes = self.health.check("memory", mem).map(|m| m.available_bytes);
        let procs = self.portable.processes();
        let running_builds =
            (!procs.is_empty()).then(|| builds::count_builds(&procs, &self.config.build_users));
        Sample {
            running_builds,
            load,
            pressure: None,
            available_memory_bytes,
            store: None,
            build_dir: None,
        }
    }
}

/// Resolves the uids of `group` (blocking: reads `/etc/group` and `/etc/passwd`, or asks
/// `dscl` on macOS). `None` or a group that cannot be resolved gives no build users, logged.
pub fn resolve_build_users(group: Option<&str>) -> BuildUsers {
    let Some(group) = group.filter(|g| !g.is_empty()) else {
        tracing::info!("no build users group: counting builds as children of Nix processes");
        return BuildUsers::default();
    };
    match resolve_build_users_os(group) {
        Ok(users) => {
            tracing::info!(
                group,
                users = users.uids.len(),
                "counting builds by build users"
            );
            users
        }
        Err(error) => {
            let error: &dyn std::error::Error = &error;
            tracing::warn!(
                group,
                error,
                "cannot resolve the build users; counting children of Nix only"
            );
            BuildUsers::default()
        }
    }
}

#[cfg(not(target_os = "macos"))]
fn resolve_build_users_os(group: &str) -> Result<BuildUsers> {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|source| Error::ReadSample {
            path: path.into(),
            source,
        })
    };
    builds::parse_build_users(&read("/etc/group")?, &read("/etc/passwd")?, group)
}

#[cfg(target_os = "macos")]
fn resolve_build_users_os(group: &str) -> Result<BuildUsers> {
    let dscl = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new("/usr/bin/dscl")
            .args(args)
            .output()
            .map_err(|source| Error::ReadSample {
                path: "/usr/bin/dscl".into(),
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let group_path = format!("/Groups/{group}");
    let g = macos::parse_dscl_group(&dscl(&[
        ".",
        "-read",
        &group_path,
        "GroupMembership",
        "PrimaryGroupID",
    ])?)?;
    let uids = macos::parse_dscl_list(&dscl(&[".", "-list", "/Users", "UniqueID"])?);
    let gids = macos::parse_dscl_list(&dscl(&[".", "-list", "/Users", "PrimaryGroupID"])?);
    Ok(macos::build_users(&g, &uids, &gids))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::os::unix::process::CommandExt;

    use super::*;

    fn sampler(proc_root: &Path) -> Sampler {
        Sampler::new(SamplerConfig {
            proc_root: proc_root.to_owned(),
            store_dir: std::env::temp_dir(),
            build_dir: PathBuf::from("/nonexistent-build-dir"),
            build_users: BuildUsers::default(),
        })
    }

    /// Sampling the real `/proc` gives every Linux value, and a missing build dir is absent.
    #[test]
    fn real_proc() {
        let s = sampler(Path::new("/proc")).sample();
        assert!(s.load.is_some());
        assert!(s.available_memory_bytes.is_some());
        assert!(s.running_builds.is_some());
        assert!(s.store.is_some());
        assert!(s.build_dir.is_none());
        let facts = sampler(Path::new("/proc")).host_facts();
        assert!(facts.cpu_count > 0 && facts.total_memory_bytes > 0);
    }

    /// A fake `/proc` with truncated, garbage and missing files yields absent values, no crash,
    /// and no zeros standing in for what could not be read.
    #[test]
    fn broken_proc_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("loadavg"), "0.5 0.").unwrap(); // truncated
        std::fs::write(dir.path().join("meminfo"), "\u{0}\u{1}garbage").unwrap();
        std::fs::create_dir(dir.path().join("pressure")).unwrap();
        std::fs::write(
            dir.path().join("pressure/cpu"),
            "some avg10=1.00 avg60=0 avg300=0 total=1\n",
        )
        .unwrap();
        // pressure/memory and pressure/io missing; no pid directories.
        let mut s = sampler(dir.path());
        for _ in 0..3 {
            let sample = s.sample();
            assert_eq!(sample.load, None);
            assert_eq!(sample.available_memory_bytes, None);
            assert_eq!(sample.running_builds, None);
            let p = sample.pressure.unwrap();
            assert_eq!(p.cpu_some, Some(1.0));
            assert_eq!((p.memory_some, p.io_some, p.io_full), (None, None, None));
        }
        assert_eq!(s.host_facts().total_memory_bytes, 0);
    }

    /// Writes a fake `/proc/<pid>` with `comm`, `stat` and (optionally) a `children` file.
    fn fake_pid(root: &Path, pid: u32, ppid: u32, comm: &str, children: Option<&str>) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(dir.join("task").join(pid.to_string())).unwrap();
        std::fs::write(dir.join("comm"), format!("{comm}\n")).unwrap();
        std::fs::write(
            dir.join("stat"),
            format!("{pid} ({comm}) S {ppid} 1 1 0 -1"),
        )
        .unwrap();
        if let Some(children) = children {
            std::fs::write(
                dir.join("task").join(pid.to_string()).join("children"),
                children,
            )
            .unwrap();
        }
    }

    /// On a fixture `/proc` tree, children of Nix come from the `children` files, and from
    /// every `stat` on kernels without them; both give the same count.
    #[test]
    fn scan_fixture_tree_with_and_without_children_files() {
        for with_children in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            let c = |list| with_children.then_some(list);
            fake_pid(root, 100, 1, "nix-daemon", c("101 102 "));
            fake_pid(root, 101, 100, "bash", c(""));
            fake_pid(root, 102, 100, "ssh", c(""));
            fake_pid(root, 103, 1, "bash", c("104"));
            fake_pid(root, 104, 103, "make", c(""));
            std::fs::write(root.join("loadavg"), "0 0 0").unwrap(); // not a pid: ignored
            let procs = scan_proc(root, true).unwrap();
            assert_eq!(procs.len(), 5);
            assert_eq!(
                builds::count_builds(&procs, &BuildUsers::default()),
                1,
                "children files: {with_children}"
            );
            let parents: Vec<u32> = procs
                .iter()
                .filter(|p| p.ppid == 100)
                .map(|p| p.pid)
                .collect();
            assert_eq!(parents, [101, 102]);
        }
    }

    /// The comm cache: a Nix name and a shell's are always re-read (a forked child execs into
    /// the builder, a shell into Nix), other names are re-read after the revalidation
    /// period or when the pid's directory is replaced (a new process with the same pid), and
    /// vanished pids leave the cache.
    #[test]
    fn comm_cache_rules() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let comm_of = |procs: &[ProcInfo], pid: u32| {
            procs.iter().find(|p| p.pid == pid).map(|p| p.comm.clone())
        };
        let mut scanner = ProcScanner::default();
        fake_pid(root, 10, 1, "nix-daemon", None);
        fake_pid(root, 20, 1, "perl", None);
        fake_pid(root, 30, 1, "bash", None);
        scanner.scan(root, true).unwrap();
        // The fork of Nix execs the builder, a shell execs into Nix: both seen at once.
        std::fs::write(root.join("10/comm"), "builder\n").unwrap();
        std::fs::write(root.join("30/comm"), "nix-daemon\n").unwrap();
        // Anything else execs into Nix: the cached name holds until revalidation.
        std::fs::write(root.join("20/comm"), "nix-store\n").unwrap();
        let procs = scanner.scan(root, true).unwrap();
        assert_eq!(comm_of(&procs, 10).as_deref(), Some("builder"));
        assert_eq!(comm_of(&procs, 30).as_deref(), Some("nix-daemon"));
        assert_eq!(comm_of(&procs, 20).as_deref(), Some("perl"));
        let mut revalidated = false;
        for _ in 0..COMM_REVALIDATE_SCANS {
            let procs = scanner.scan(root, true).unwrap();
            revalidated |= comm_of(&procs, 20).as_deref() == Some("nix-store");
        }
        assert!(revalidated, "the cached name was never re-read");
        // A new process with a reused pid has a new directory (inode): read afresh.
        // (Made before the old one is removed, so the file system cannot reuse its inode.)
        let staging = tempfile::tempdir().unwrap();
        fake_pid(staging.path(), 20, 1, "make", None);
        std::fs::remove_dir_all(root.join("20")).unwrap();
        std::process::Command::new("mv")
            .arg(staging.path().join("20"))
            .arg(root)
            .status()
            .unwrap();
        let procs = scanner.scan(root, true).unwrap();
        assert_eq!(comm_of(&procs, 20).as_deref(), Some("make"));
        std::fs::remove_dir_all(root.join("10")).unwrap();
        std::fs::remove_dir_all(root.join("30")).unwrap();
        scanner.scan(root, true).unwrap();
        assert_eq!(scanner.comms.len(), 1);
    }

    /// The real `/proc` scan counts the direct children of a process named `nix-daemon`.
    #[test]
    fn counts_children_of_a_fake_nix_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nix-daemon");
        std::os::unix::fs::symlink("/bin/sh", &fake).unwrap();
        // Its own process group, so the cleanup below also ends the two `sleep`s.
        let mut child = std::process::Command::new(&fake)
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id();
        let mut seen = None;
        for _ in 0..200 {
            let procs = scan_proc(Path::new("/proc"), true).unwrap();
            let mine: Vec<ProcInfo> = procs
                .into_iter()
                .filter(|p| p.pid == pid || p.ppid == pid)
                .collect();
            let n = builds::count_builds(&mine, &BuildUsers::default());
            seen = Some(n);
            if n == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .status();
        let _ = child.wait();
        assert_eq!(seen, Some(2));
    }
}
