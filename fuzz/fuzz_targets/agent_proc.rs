//! Fuzzes the agent's pure parsers of what the host hands it: `/proc/loadavg`,
//! `/proc/pressure/*`, `/proc/meminfo`, `/proc/<pid>/stat`, `/etc/group` with `/etc/passwd`,
//! macOS `dscl` output, `statvfs` numbers, and build counting over a process table.
//!
//! A parser must never panic, and whatever it accepts must be a value the scheduler accepts
//! in a report (a garbage file must never turn into a plausible number that attracts work).

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary as _};
use libfuzzer_sys::fuzz_target;
use nixdispatch_agent::sample::builds::{self, BuildUsers, ProcInfo};
use nixdispatch_agent::sample::{linux, macos, statvfs};

// The input is a selector byte and then the text of one file, so that real files seed the
// corpus (`fuzz/run.sh` does); texts that go together are separated by NUL bytes.
fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    // The agent reads these files with `read_to_string`: only UTF-8 reaches the parsers.
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match kind % 8 {
        0 => {
            if let Ok(l) = linux::parse_loadavg(text) {
                for v in [l.load1, l.load5, l.load15] {
                    assert!(v.is_finite() && v >= 0.0, "{text:?} gave {v}");
                }
            }
        }
        1 => {
            if let Ok(p) = linux::parse_pressure("/proc/pressure/cpu", text) {
                assert!(p.some.is_some() || p.full.is_some());
                for v in [p.some, p.full].into_iter().flatten() {
                    assert!((0.0..=100.0).contains(&v), "{text:?} gave {v}");
                }
            }
        }
        2 => {
            if let Ok(m) = linux::parse_meminfo(text) {
                assert!(m.total_bytes > 0);
                assert!(m.available_bytes.is_none_or(|a| a <= m.total_bytes));
            }
        }
        3 => {
            for line in text.lines() {
                if let Ok(s) = linux::parse_stat(line) {
                    // The name is what lies between the first `(` and the last `)`.
                    assert!(line.contains(&format!("({})", s.comm)));
                }
            }
        }
        4 => {
            let mut parts = text.split('\0');
            let (group, passwd, name) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or("nixbld"),
            );
            if let Ok(users) = builds::parse_build_users(group, passwd, name) {
                assert!(!users.uids.contains(&0), "root counted as a build user");
            }
        }
        5 => {
            let mut parts = text.split('\0');
            let (group, uids, gids) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            let uids = macos::parse_dscl_list(uids);
            let gids = macos::parse_dscl_list(gids);
            if let Ok(group) = macos::parse_dscl_group(group) {
                let users = macos::build_users(&group, &uids, &gids);
                assert!(!users.uids.contains(&0), "root counted as a build user");
            }
        }
        6 => {
            let mut u = arbitrary::Unstructured::new(rest);
            let Ok((fragment, blocks, available)) = <(u64, u64, u64)>::arbitrary(&mut u) else {
                return;
            };
            if let Ok(d) = statvfs::disk_space_from("store", fragment, blocks, available) {
                assert!(d.total_bytes > 0 && d.free_bytes <= d.total_bytes);
            }
        }
        _ => {
            // A process table and the build users' uids.
            let mut u = arbitrary::Unstructured::new(rest);
            let Ok((procs, uids)) = <(Vec<(u16, u16, u32, String)>, Vec<u32>)>::arbitrary(&mut u)
            else {
                return;
            };
            let procs: Vec<ProcInfo> = procs
                .into_iter()
                .map(|(pid, ppid, uid, comm)| ProcInfo {
                    pid: pid.into(),
                    ppid: ppid.into(),
                    uid,
                    comm,
                })
                .collect();
            let users = BuildUsers {
                uids: uids.into_iter().collect(),
            };
            let n = builds::count_builds(&procs, &users);
            // One build at most per process.
            assert!(n as usize <= procs.len());
        }
    }
});
