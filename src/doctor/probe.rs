//! The doctor's I/O: finds the running `nix-daemon` in `/proc`, reads its command line,
//! executable and environment, and asks its Nix for its version and configuration with the
//! daemon's `NIX_CONF_DIR` and `NIX_CONFIG`. Everything it cannot find out becomes a note in
//! [`Facts`]; nothing here decides anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Daemon, Facts};

/// How long one `nix` command may take.
const NIX_TIMEOUT: Duration = Duration::from_secs(20);

/// The environment variables that change which configuration Nix reads.
const CONFIG_ENV: [&str; 2] = ["NIX_CONF_DIR", "NIX_CONFIG"];

/// Collects the facts about this machine's Nix.
pub async fn facts() -> Facts {
    let mut facts = Facts::default();
    let daemon_pid = find_daemon();
    let mut nix = PathBuf::from("nix");
    let mut env: Vec<(String, Option<String>)> = Vec::new();
    if let Some(pid) = daemon_pid {
        match std::fs::read(format!("/proc/{pid}/cmdline")) {
            Ok(raw) => {
                facts.daemon = Some(Daemon {
                    pid,
                    argv: split_nul(&raw),
                });
            }
            Err(e) => facts
                .notes
                .push(format!("cannot read nix-daemon's command line: {e}")),
        }
        match std::fs::read_link(format!("/proc/{pid}/exe")) {
            // An upgraded Nix leaves the running daemon on a deleted file.
            Ok(exe) if exe.exists() => nix = exe,
            Ok(_) => facts.notes.push(
                "nix-daemon runs a Nix that is no longer installed: restart it; checked the \
                 `nix` on PATH"
                    .to_owned(),
            ),
            Err(e) => facts.notes.push(format!(
                "cannot see which Nix nix-daemon runs ({e}; run as root); checked the `nix` on \
                 PATH"
            )),
        }
        match std::fs::read(format!("/proc/{pid}/environ")) {
            Ok(raw) => {
                let vars = split_nul(&raw);
                let var = |name: &str| {
                    let prefix = format!("{name}=");
                    vars.iter()
                        .find_map(|v| v.strip_prefix(&prefix).map(str::to_owned))
                };
                facts.hook_config = var("NIXDISPATCH_HOOK_CONFIG");
                facts.nix_sshopts = var("NIX_SSHOPTS");
                env = CONFIG_ENV
                    .iter()
                    .map(|name| {
                        let prefix = format!("{name}=");
                        let value = vars
                            .iter()
                            .find_map(|v| v.strip_prefix(&prefix).map(str::to_owned));
                        ((*name).to_owned(), value)
                    })
                    .collect();
            }
            Err(e) => facts.notes.push(format!(
                "cannot read nix-daemon's environment ({e}; run as root): checked with this \
                 shell's NIX_CONF_DIR"
            )),
        }
    }
    facts.version = run(&nix, &["--version"], &env, &mut facts.notes).await;
    let features = ["--extra-experimental-features", "nix-command"];
    let new = [features[0], features[1], "config", "show", "--json"];
    let old = [features[0], features[1], "show-config", "--json"];
    // Older Nix (2.8) has no `nix config show`: only the older spelling's failure is news.
    facts.config_json = match run(&nix, &new, &env, &mut Vec::new()).await {
        Some(json) => Some(json),
        None => run(&nix, &old, &env, &mut facts.notes).await,
    };
    let conf_dir = env
        .iter()
        .find(|(name, _)| name == "NIX_CONF_DIR")
        .and_then(|(_, v)| v.clone())
        .or_else(|| {
            daemon_pid
                .is_none()
                .then(|| std::env::var("NIX_CONF_DIR").ok())
                .flatten()
        })
        .unwrap_or_else(|| "/etc/nix".to_owned());
    let path = Path::new(&conf_dir).join("nix.conf");
    if let Ok(text) = std::fs::read_to_string(&path) {
        facts.nix_conf = Some((path.display().to_string(), text));
    }
    facts
}

fn split_nul(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The listening `nix-daemon`: a process named so whose parent is not one (the others are
/// its per-connection workers).
fn find_daemon() -> Option<u32> {
    let comm = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let ppid = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields start after the last ')'.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let mut daemons: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid| comm(*pid) == "nix-daemon")
        .filter(|pid| ppid(*pid).is_none_or(|p| comm(p) != "nix-daemon"))
        .collect();
    daemons.sort_unstable();
    daemons.first().copied()
}

/// Runs `nix` with the daemon's configuration environment (`None`: unset) and returns its
/// stdout; when it fails, adds a note saying why to `notes`.
async fn run(
    nix: &Path,
    args: &[&str],
    env: &[(String, Option<String>)],
    notes: &mut Vec<String>,
) -> Option<String> {
    let mut cmd = tokio::process::Command::new(nix);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        match value {
            Some(v) => cmd.env(name, v),
            None => cmd.env_remove(name),
        };
    }
    let what = format!("`{} {}`", nix.display(), args.join(" "));
    let note = match tokio::time::timeout(NIX_TIMEOUT, cmd.output()).await {
        Err(_) => format!("{what} timed out"),
        Ok(Err(e)) => format!("cannot run {what}: {e}"),
        Ok(Ok(out)) if out.status.success() => {
            return Some(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Ok(Ok(out)) => format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or_default()
        ),
    };
    notes.push(note);
    None
}
