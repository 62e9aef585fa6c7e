//! Counting the Nix builds running on the host, independently of the scheduler.
//!
//! The scheduler only knows the builds it leased; members who build over SSH without it, and
//! the host's own builds, are invisible to it. So the agent counts what the host is really
//! doing, from the process table, with complementary rules:
//!
//! 1. **Build users.** With a `build-users-group` (the multi-user default, `nixbld`), Nix
//!    runs every build under a build user of its own and never runs two builds under the
//!    same build user at once. So the number of *distinct uids of build users* that own a
//!    live process is the number of running builds. This is exact, survives reparenting
//!    (sandboxed builders whose helper exits) and costs one `stat` per process.
//! 2. **Auto-allocated uids.** With `auto-allocate-uids`, Nix gives each build its own block
//!    of 65536 uids from `start-id` (default `0x34000000`, `id-count` 128 blocks). Processes
//!    with uids in that range are keyed by their block: one block, one build.
//! 3. **Children of Nix.** With an empty `build-users-group` (single-user installs, and
//!    builders that run every build as the daemon's user) the builder runs as the same uid as
//!    Nix itself, so uids say nothing. There, Nix forks each builder directly from the process
//!    that builds (the `nix-daemon` worker, `nix-store --serve`, `nix-daemon --stdio`,
//!    `nix-build`, `nix build`): every *direct child of a Nix process that is not itself a
//!    Nix process* is one build. Helpers Nix also spawns that are not builds (`ssh` for
//!    remote builds and copies, `git`/`hg` for fetchers) are excluded by name.
//!
//! A build counted by uid is not counted again as a child (children owned by a build user
//! are keyed by that uid). The `/proc` scanner only collects what rule 3 needs (command
//! names and parents) on hosts without build users: with a build users group the Nix daemon
//! builds every derivation as a build user, and reading every process's name costs more than
//! the rest of a report together. Known blind spots: a sandboxed build without build users
//! whose builder was reparented away from Nix (Nix refuses sandboxing without build users on
//! the versions we target), and a non-root single-user Nix on a host that has build users.
//!
//! Everything here is pure: the I/O that lists `/proc` (or asks `sysinfo` on macOS) builds a
//! `&[ProcInfo]` and calls [`count_builds`].

use std::collections::BTreeSet;

use crate::error::{Error, Result};

/// One process, as far as build counting cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// Its process id.
    pub pid: u32,
    /// Its parent's process id.
    pub ppid: u32,
    /// Its (effective) user id.
    pub uid: u32,
    /// Its command name: the basename of the executed file, at most 15 bytes on Linux.
    pub comm: String,
}

/// The uids of the Nix build users (empty when the host has none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildUsers {
    /// The uids.
    pub uids: BTreeSet<u32>,
}

/// Command names of Nix processes that fork builders. Since Nix 2.4 all of these are the same
/// binary under different names, and the kernel's `comm` is the name it was executed under.
const NIX_COMMS: &[&str] = &["nix", "nix-daemon", "nix-store", "nix-build", "nix-shell"];

/// Children of Nix that are helpers, not builds: `ssh` (remote building and `nix copy`) and
/// version-control fetchers.
const NOT_BUILDS: &[&str] = &["ssh", "git", "hg", "git-remote-http", "git-remote-https"];

/// Whether `comm` names a Nix process that may fork builders.
pub fn is_nix_comm(comm: &str) -> bool {
    NIX_COMMS.contains(&comm)
}

/// Nix's default `start-id`: the first uid of `auto-allocate-uids`.
pub const AUTO_UID_START: u32 = 0x3400_0000;
/// Uids per build with `auto-allocate-uids` (Nix's `maxIdsPerBuild`).
pub const AUTO_UIDS_PER_BUILD: u32 = 1 << 16;
/// Nix's default `id-count`: 128 builds' worth of uids.
pub const AUTO_UID_COUNT: u32 = 128 * AUTO_UIDS_PER_BUILD;

/// The auto-allocated uid block `uid` belongs to, if any.
fn auto_uid_block(uid: u32) -> Option<u32> {
    let offset = uid.checked_sub(AUTO_UID_START)?;
    (offset < AUTO_UID_COUNT).then_some(offset / AUTO_UIDS_PER_BUILD)
}

/// Counts the builds running among `procs` (see the module docs for the rules).
pub fn count_builds(procs: &[ProcInfo], build_users: &BuildUsers) -> u32 {
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum Key {
        BuildUser(u32),
        AutoUidBlock(u32),
        Child(u32),
    }
    let nix_pids: BTreeSet<u32> = procs
        .iter()
        .filter(|p| is_nix_comm(&p.comm))
        .map(|p| p.pid)
        .collect();
    let mut builds = BTreeSet::new();
    for p in procs {
        if build_users.uids.contains(&p.uid) {
            builds.insert(Key::BuildUser(p.uid));
        } else if let Some(block) = auto_uid_block(p.uid) {
            builds.insert(Key::AutoUidBlock(block));
        } else if nix_pids.contains(&p.ppid)
            && !is_nix_comm(&p.comm)
            && !NOT_BUILDS.contains(&p.comm.as_str())
        {
            builds.insert(Key::Child(p.pid));
        }
    }
    u32::try_from(builds.len()).unwrap_or(u32::MAX)
}

/// Finds the build users of `group_name` from the texts of `/etc/group` and `/etc/passwd`:
/// the group's listed members, plus every user whose primary group it is (installers differ
/// in which of the two they fill in).
///
/// A missing group is an error (the caller then counts with rule 2 only); malformed lines
/// of either file are skipped, as `getent` does, since one bad line must not hide the rest.
pub fn parse_build_users(
    group_text: &str,
    passwd_text: &str,
    group_name: &str,
) -> Result<BuildUsers> {
    let not_found = || Error::BadSample {
        source_name: "/etc/group",
        reason: format!("build users group {group_name:?} not found"),
    };
    // name:password:gid:member,member
    let (gid, members) = group_text
        .lines()
        .find_map(|line| {
            let mut f = line.split(':');
            if f.next()? != group_name {
                return None;
            }
            let _password = f.next()?;
            let gid: u32 = f.next()?.trim().parse().ok()?;
            let members: BTreeSet<&str> = f
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .collect();
            Some((gid, members))
        })
        .ok_or_else(not_found)?;
    // name:password:uid:gid:gecos:home:shell
    let mut uids = BTreeSet::new();
    for line in passwd_text.lines() {
        let mut f = line.split(':');
        let (Some(name), Some(_), Some(uid), Some(user_gid)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let (Ok(uid), Ok(user_gid)) = (uid.trim().parse::<u32>(), user_gid.trim().parse::<u32>())
        else {
            continue;
        };
        // Never count root as a build user, even if an installer put it in the group.
        if uid != 0 && (members.contains(name) || user_gid == gid) {
            uids.insert(uid);
        }
    }
    Ok(BuildUsers { uids })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::linux::parse_stat;

    const GROUP: &str = include_str!("../../tests/fixtures/linux/group");
    const PASSWD: &str = include_str!("../../tests/fixtures/linux/passwd");
    const SNAPSHOT: &str = include_str!("../../tests/fixtures/linux/proc-snapshot");

    fn p(pid: u32, ppid: u32, uid: u32, comm: &str) -> ProcInfo {
        ProcInfo {
            pid,
            ppid,
            uid,
            comm: comm.into(),
        }
    }

    fn users(uids: &[u32]) -> BuildUsers {
        BuildUsers {
            uids: uids.iter().copied().collect(),
        }
    }

    /// The real `/etc/group` and `/etc/passwd` of this machine give the ten nixbld uids.
    #[test]
    fn build_users_from_real_files() {
        let found = parse_build_users(GROUP, PASSWD, "nixbld").unwrap();
        assert_eq!(found.uids.len(), 10);
        assert!(found.uids.contains(&999)); // nixbld1
        assert!(!found.uids.contains(&0));
    }

    /// Users whose primary group is the build group count even if the group lists no members.
    #[test]
    fn build_users_by_primary_group() {
        let group = "nixbld:x:30000:\n";
        let passwd = "_nixbld1:*:301:30000::/var/empty:/usr/bin/false\nbob:x:501:20::/:/bin/sh\n";
        assert_eq!(
            parse_build_users(group, passwd, "nixbld").unwrap(),
            users(&[301])
        );
    }

    /// A missing group is an error; garbage lines are skipped without a crash.
    #[test]
    fn build_users_missing_and_garbage() {
        assert!(parse_build_users("", "", "nixbld").is_err());
        assert!(parse_build_users("nixbld:x:notanumber:a\n", "", "nixbld").is_err());
        let found = parse_build_users(
            "junk\nnixbld:x:5:a,b\n",
            "a:x:10:5\n\u{0}garbage\nb:x:zz:5\n",
            "nixbld",
        )
        .unwrap();
        assert_eq!(found, users(&[10]));
    }

    /// Several processes of one build user are one build; two build users are two builds.
    #[test]
    fn distinct_build_users_are_builds() {
        let procs = [
            p(100, 1, 0, "nix-daemon"),
            p(200, 100, 0, "nix-daemon"),
            p(300, 200, 30001, "bash"),
            p(301, 300, 30001, "make"),
            p(302, 301, 30001, "cc1"),
            p(400, 1, 30002, "bash"), // reparented sandboxed builder
            p(500, 1, 1000, "bash"),
        ];
        assert_eq!(count_builds(&procs, &users(&[30001, 30002, 30003])), 2);
    }

    /// Without build users, direct non-Nix children of Nix processes are builds, helpers and
    /// grandchildren are not.
    #[test]
    fn children_of_nix_without_build_users() {
        let procs = [
            p(10, 1, 0, "sshd"),
            p(11, 10, 0, "nix-daemon"), // `nix-daemon --stdio` for ssh-ng
            p(12, 11, 0, "bash"),       // build 1
            p(13, 12, 0, "make"),       // its child, same build
            p(20, 10, 0, "nix-store"),  // `nix-store --serve` for ssh://
            p(21, 20, 0, "builder.sh"), // build 2
            p(30, 1, 0, "nix"),         // a local `nix build`
            p(31, 30, 0, "ssh"),        // remote-build helper: not a build
            p(32, 30, 0, "nix"),        // build hook: a Nix process, not a build
            p(33, 32, 0, "ssh"),
            p(40, 1, 0, "bash"), // unrelated shell
        ];
        assert_eq!(count_builds(&procs, &BuildUsers::default()), 2);
    }

    /// Auto-allocated uids count one build per 65536-uid block, wherever the process sits.
    #[test]
    fn auto_allocated_uid_blocks() {
        let base = AUTO_UID_START;
        let procs = [
            p(10, 1, base, "bash"),
            p(11, 10, base + 1000, "make"), // same build, uid inside its block
            p(12, 1, base + AUTO_UIDS_PER_BUILD, "bash"),
            p(13, 1, base + AUTO_UID_COUNT, "bash"), // past the range: not a build
            p(14, 1, base - 1, "bash"),
        ];
        assert_eq!(count_builds(&procs, &BuildUsers::default()), 2);
    }

    /// A builder child owned by a build user is counted once, by its uid.
    #[test]
    fn no_double_count() {
        let procs = [
            p(1, 0, 0, "nix-daemon"),
            p(2, 1, 0, "nix-daemon"),
            p(3, 2, 30001, "bash"),
        ];
        assert_eq!(count_builds(&procs, &users(&[30001])), 1);
    }

    /// This machine's real process snapshot (no Nix running) counts zero builds.
    #[test]
    fn real_snapshot_is_idle() {
        let procs: Vec<ProcInfo> = SNAPSHOT
            .lines()
            .map(|line| {
                let (uid, stat) = line.split_once(' ').unwrap();
                let s = parse_stat(stat).unwrap();
                ProcInfo {
                    pid: s.pid,
                    ppid: s.ppid,
                    uid: uid.parse().unwrap(),
                    comm: s.comm,
                }
            })
            .collect();
        assert!(procs.len() > 10);
        let nixbld = parse_build_users(GROUP, PASSWD, "nixbld").unwrap();
        assert_eq!(count_builds(&procs, &nixbld), 0);
    }

    proptest::proptest! {
        /// The count never exceeds the number of processes, whatever the table looks like.
        #[test]
        fn count_is_bounded(
            table in proptest::collection::vec((0u32..50, 0u32..50, 0u32..5, 0usize..8), 0..60)
        ) {
            let names = ["nix", "nix-daemon", "bash", "ssh", "make", "nix-store", "git", "sh"];
            let procs: Vec<ProcInfo> =
                table.iter().map(|&(pid, ppid, uid, n)| p(pid, ppid, uid, names[n])).collect();
            let n = count_builds(&procs, &users(&[1, 2]));
            proptest::prop_assert!(n as usize <= procs.len());
        }
    }
}
