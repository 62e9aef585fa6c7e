//! The Nix versions the end-to-end tests run, and where their binaries come from.
//!
//! The host's Nix is Debian bookworm's 2.8. Newer ones come from Debian chroots (trixie:
//! 2.26, sid: 2.34) that `tests/nix-chroot.sh` builds once and caches outside the clone; a
//! machine (builder or member) of such a version is a PID and mount namespace whose root is
//! the chroot, with the test's own `/nix`, `/tmp`, `/dev` and `/proc` mounted in (see
//! [`super::Namespace`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// A Nix release the tests run, by the Debian suite that ships it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NixVersion {
    /// Nix 2.8, the host's (Debian bookworm): hook in nix.conf, `nix show-config`,
    /// worker protocol 1.34.
    V2_8,
    /// Nix 2.26 (Debian trixie): stands for 2.25 to 2.33, which ignore `build-hook` in
    /// nix.conf; `nix config show`; worker protocol 1.38.
    V2_26,
    /// Nix 2.34 (Debian sid): honours `build-hook` in nix.conf again.
    V2_34,
}

impl NixVersion {
    /// Every version, oldest first.
    pub const ALL: [NixVersion; 3] = [NixVersion::V2_8, NixVersion::V2_26, NixVersion::V2_34];

    /// `major.minor`, as in the version table of `docs/hook.md`.
    pub fn label(self) -> &'static str {
        match self {
            NixVersion::V2_8 => "2.8",
            NixVersion::V2_26 => "2.26",
            NixVersion::V2_34 => "2.34",
        }
    }

    /// The Debian suite that ships it.
    pub fn suite(self) -> &'static str {
        match self {
            NixVersion::V2_8 => "bookworm",
            NixVersion::V2_26 => "trixie",
            NixVersion::V2_34 => "sid",
        }
    }

    /// Whether `build-hook` in nix.conf takes effect (the trap of Nix 2.25 to 2.33).
    pub fn honours_build_hook_in_nix_conf(self) -> bool {
        self != NixVersion::V2_26
    }

    /// The root directory holding this version's binaries: `None` for the host's own Nix,
    /// else the cached chroot (built on first use, under a lock, by `tests/nix-chroot.sh`).
    pub fn chroot(self) -> Option<PathBuf> {
        if self == NixVersion::V2_8 {
            return None;
        }
        static CHROOTS: OnceLock<Mutex<Vec<(NixVersion, PathBuf)>>> = OnceLock::new();
        let mut known = CHROOTS.get_or_init(Mutex::default).lock().unwrap();
        if let Some((_, root)) = known.iter().find(|(v, _)| *v == self) {
            return Some(root.clone());
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nix-chroot.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(self.suite())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} {} failed (it needs root, apt and the Debian mirror):\n{}",
            script.display(),
            self.suite(),
            String::from_utf8_lossy(&out.stderr)
        );
        let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        known.push((self, root.clone()));
        Some(root)
    }
}

impl std::fmt::Display for NixVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nix {}", self.label())
    }
}
