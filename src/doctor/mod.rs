//! `nixdispatch doctor`: checks a member's machine and says exactly what to change.
//!
//! Today it answers the question that silently breaks members: which build hook does the
//! running `nix-daemon` really use? Nix 2.25 to 2.33 ignore `build-hook` in nix.conf, so a
//! configuration that looks right builds locally, or fails, without a word. The answer comes
//! from the daemon's command line (`/proc/<pid>/cmdline`: `--option build-hook ...` wins)
//! and else from what its Nix reports (`nix config show --json`, `nix show-config --json` on
//! older Nix), for the Nix version the daemon runs.
//!
//! Layers: [`Facts`] is what the I/O layer ([`probe`]) collected, as captured text; every
//! parser and [`diagnose`] are pure, so they are tested on captured inputs. The report is a
//! list of [`Check`]s. Beyond this machine, [`reach`] asks the scheduler with the hook's
//! configuration for the builders the member may be sent to and runs `ssh` to each with
//! its pinned host key; [`remote`] judges what that gave (scheduler unreachable, TLS,
//! credential refused; host key mismatch, login refused, unreachable, no Nix).

pub mod probe;
pub mod reach;
pub mod remote;

use std::path::Path;

use serde_json::{Value, json};

use crate::cli::Render;

/// What the I/O layer found on the machine, as raw as it came.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The running `nix-daemon` (the listener, not a per-connection worker), if any.
    pub daemon: Option<Daemon>,
    /// `nix --version` of the daemon's Nix (else of `nix` on `PATH`).
    pub version: Option<String>,
    /// `nix config show --json` (or `nix show-config --json`) with the daemon's environment.
    pub config_json: Option<String>,
    /// The nix.conf the daemon reads, as `(path, contents)`, when readable.
    pub nix_conf: Option<(String, String)>,
    /// What could not be found out, and why (shown in the report).
    pub notes: Vec<String>,
    /// `NIXDISPATCH_HOOK_CONFIG` in the daemon's environment: the hook's configuration file
    /// the daemon's hook reads.
    pub hook_config: Option<String>,
    /// `NIX_SSHOPTS` in the daemon's environment: the ssh options its builds use.
    pub nix_sshopts: Option<String>,
}

/// A running `nix-daemon`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daemon {
    /// Its process id.
    pub pid: u32,
    /// Its command line (`/proc/<pid>/cmdline`).
    pub argv: Vec<String>,
}

/// A Nix release, from `nix --version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Release {
    /// Lix rather than Nix.
    pub lix: bool,
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
}

impl Release {
    /// Whether `build-hook` in nix.conf is ignored (Nix 2.25 to 2.33; fixed in 2.34 by
    /// NixOS/nix#15083; Lix never had the bug).
    pub fn ignores_build_hook_in_nix_conf(self) -> bool {
        !self.lix && self.major == 2 && (25..=33).contains(&self.minor)
    }

    /// Whether the daemon talks the text hook protocol (Lix 2.94+ talks Cap'n Proto).
    pub fn has_text_hook_protocol(self) -> bool {
        !(self.lix && (self.major, self.minor) >= (2, 94))
    }
}

/// Parses `nix (Nix) 2.26.3`, `nix-daemon (Nix) 2.8.0` or `nix (Lix, like Nix) 2.93.3`.
pub fn parse_version(text: &str) -> Option<Release> {
    let line = text.lines().next()?.trim();
    let lix = line.contains("Lix");
    let number = line.split_whitespace().last()?;
    let mut parts = number.split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some(Release { lix, major, minor })
}

/// The `build-hook` set on a daemon's command line (`--option build-hook X` or
/// `--build-hook X`; the last one wins), as the words Nix splits it into.
pub fn hook_from_argv(argv: &[String]) -> Option<Vec<String>> {
    let mut found = None;
    let mut i = 1;
    while i < argv.len() {
        match argv[i].as_str() {
            "--option" if i + 2 < argv.len() => {
                if argv[i + 1] == "build-hook" {
                    found = Some(words(&argv[i + 2]));
                }
                i += 3;
            }
            "--build-hook" if i + 1 < argv.len() => {
                found = Some(words(&argv[i + 1]));
                i += 2;
            }
            _ => i += 1,
        }
    }
    found
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// The `build-hook` value in `nix config show --json`: a string on Nix 2.8 and 2.9, a list
/// of words later. `None` when the JSON has no such setting.
pub fn hook_from_config_json(json: &str) -> Option<Vec<String>> {
    let root: Value = serde_json::from_str(json).ok()?;
    match root.get("build-hook")?.get("value")? {
        Value::String(s) => Some(words(s)),
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => None,
    }
}

/// The last `build-hook = ...` line of a nix.conf, if any.
pub fn hook_in_nix_conf(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.split('#').next().unwrap_or_default().trim();
            let (name, value) = l.split_once('=')?;
            (name.trim() == "build-hook").then(|| value.trim().to_owned())
        })
        .next_back()
}

/// Whether a hook command is nixdispatch's: its program is `expected` or is named
/// `nixdispatch-hook`.
pub fn is_nixdispatch_hook(words: &[String], expected: &Path) -> bool {
    words.first().is_some_and(|program| {
        Path::new(program) == expected
            || Path::new(program).file_name() == Some("nixdispatch-hook".as_ref())
    })
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// As it should be.
    Ok,
    /// Could not be checked, or works with a caveat.
    Warn,
    /// Broken: builds do not go through nixdispatch.
    Fail,
}

impl Status {
    fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked, e.g. `build-hook` or `builder b1`.
    pub name: String,
    /// How it came out.
    pub status: Status,
    /// What was found.
    pub summary: String,
    /// What to change, when something must change.
    pub fix: Option<String>,
}

/// Everything the doctor found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The checks, in order.
    pub checks: Vec<Check>,
}

impl Report {
    /// No check failed.
    pub fn healthy(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }
}

fn check(name: impl Into<String>, status: Status, summary: String, fix: Option<String>) -> Check {
    Check {
        name: name.into(),
        status,
        summary,
        fix,
    }
}

/// Judges the facts. `hook` is the nixdispatch-hook to recommend (its installed path).
pub fn diagnose(facts: &Facts, hook: &Path) -> Report {
    let mut checks = Vec::new();
    let release = facts.version.as_deref().and_then(parse_version);
    let version_text = facts
        .version
        .as_deref()
        .and_then(|v| v.lines().next())
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    let daemon_text = match &facts.daemon {
        Some(d) => format!("nix-daemon pid {}", d.pid),
        None => "no nix-daemon running".to_owned(),
    };
    checks.push(match release {
        Some(r) if !r.has_text_hook_protocol() => check(
            "nix",
            Status::Fail,
            format!("{version_text} ({daemon_text})"),
            Some(
                "Lix 2.94 and later talk Cap'n Proto to their build hook, which nixdispatch-hook \
                 does not speak: use Lix 2.93 or Nix, or the builders' gate"
                    .to_owned(),
            ),
        ),
        Some(_) => check(
            "nix",
            Status::Ok,
            format!("{version_text} ({daemon_text})"),
            None,
        ),
        None => check(
            "nix",
            Status::Warn,
            format!("version unknown ({daemon_text})"),
            None,
        ),
    });
    if facts.daemon.is_none() {
        checks.push(check(
            "nix-daemon",
            Status::Warn,
            "no nix-daemon is running (a socket-activated one starts with the first build: \
             retry after one); a single-user Nix reads nix.conf itself: checked with what \
             `nix config show` says"
                .to_owned(),
            None,
        ));
    }

    let hook_display = hook.display();
    let on_argv = facts.daemon.as_ref().and_then(|d| hook_from_argv(&d.argv));
    let in_config = facts.config_json.as_deref().and_then(hook_from_config_json);
    let (in_use, source) = match (&on_argv, &in_config) {
        (Some(w), _) => (Some(w), "the daemon's command line"),
        (None, Some(w)) => (Some(w), "`nix config show`"),
        (None, None) => (None, ""),
    };
    let runner = if facts.daemon.is_some() {
        "the daemon"
    } else {
        "Nix"
    };
    let conf_line = facts
        .nix_conf
        .as_ref()
        .and_then(|(path, text)| hook_in_nix_conf(text).map(|v| (path.clone(), v)));
    let conf_path = facts
        .nix_conf
        .as_ref()
        .map_or("/etc/nix/nix.conf", |(p, _)| p.as_str());
    let ignores_conf = release.is_some_and(Release::ignores_build_hook_in_nix_conf);
    checks.push(match in_use {
        None => check(
            "build-hook",
            Status::Warn,
            format!("cannot tell which build hook {runner} uses"),
            None,
        ),
        Some(w) if is_nixdispatch_hook(w, hook) => check(
            "build-hook",
            Status::Ok,
            format!("nixdispatch-hook ({}), from {source}", w.join(" ")),
            None,
        ),
        Some(w) => {
            let used = w.join(" ");
            let fix = if on_argv.is_some() {
                format!(
                    "the daemon's command line sets `build-hook` to `{used}`: change it to \
                     `--option build-hook {hook_display}` and restart nix-daemon"
                )
            } else if ignores_conf {
                let why = match &conf_line {
                    Some((path, value)) => format!(
                        "{version_text} ignores `build-hook = {value}` in {path} (Nix 2.25 to \
                         2.33 do)"
                    ),
                    None => format!("{version_text} ignores `build-hook` in nix.conf"),
                };
                format!(
                    "{why}: add `--option build-hook {hook_display}` to nix-daemon's command \
                     line (systemd: `systemctl edit nix-daemon`, see docs/hook.md) and restart it"
                )
            } else {
                format!("set `build-hook = {hook_display}` in {conf_path} and restart nix-daemon")
            };
            check(
                "build-hook",
                Status::Fail,
                format!("{runner} runs `{used}`, not nixdispatch-hook (from {source})"),
                Some(fix),
            )
        }
    });
    for note in &facts.notes {
        checks.push(check("probe", Status::Warn, note.clone(), None));
    }
    Report { checks }
}

impl Render for Report {
    fn table(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{:<4}  {:<width$}  {}\n",
                c.status.word(),
                c.name,
                c.summary
            ));
            if let Some(fix) = &c.fix {
                out.push_str(&format!("{:<4}  {:<width$}  fix: {fix}\n", "", ""));
            }
        }
        out
    }

    fn json(&self) -> Value {
        json!({
            "healthy": self.healthy(),
            "checks": self.checks.iter().map(|c| json!({
                "name": c.name,
                "status": c.status.word().to_lowercase(),
                "summary": c.summary,
                "fix": c.fix,
            })).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOOK: &str = "/usr/local/bin/nixdispatch-hook";

    /// `nix show-config --json` of Debian's Nix 2.8.0 (the `build-hook` entry).
    const CONFIG_2_8: &str = r#"{"build-hook":{"aliases":[],"defaultValue":"/usr/libexec/nix/build-remote","description":"The path of the helper program that executes builds to remote machines.\n","documentDefault":true,"value":"/usr/libexec/nix/build-remote"}}"#;
    /// `nix config show --json` of Debian's Nix 2.26.3 with `build-hook` set in nix.conf:
    /// the default, because 2.26 ignores it.
    const CONFIG_2_26: &str = r#"{"build-hook":{"aliases":[],"defaultValue":["nix","__build-remote"],"documentDefault":true,"experimentalFeature":null,"value":["/usr/bin/nix","__build-remote"]}}"#;
    /// The same of Nix 2.34.8 with `build-hook` set in nix.conf.
    const CONFIG_2_34_OURS: &str = r#"{"build-hook":{"aliases":[],"defaultValue":["nix","__build-remote"],"documentDefault":true,"experimentalFeature":null,"value":["/usr/local/bin/nixdispatch-hook"]}}"#;

    fn argv(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_owned).collect()
    }

    fn facts(version: &str, argv_text: &str, config: &str, conf: &str) -> Facts {
        Facts {
            daemon: Some(Daemon {
                pid: 42,
                argv: argv(argv_text),
            }),
            version: Some(version.to_owned()),
            config_json: Some(config.to_owned()),
            nix_conf: Some(("/etc/nix/nix.conf".to_owned(), conf.to_owned())),
            notes: Vec::new(),
            hook_config: None,
            nix_sshopts: None,
        }
    }

    fn hook_check(r: &Report) -> &Check {
        r.checks.iter().find(|c| c.name == "build-hook").unwrap()
    }

    /// Versions parse from Nix and Lix, and the nix.conf trap covers exactly 2.25 to 2.33.
    #[test]
    fn versions() {
        let r = parse_version("nix (Nix) 2.26.3\n").unwrap();
        assert_eq!((r.lix, r.major, r.minor), (false, 2, 26));
        assert!(r.ignores_build_hook_in_nix_conf());
        let r = parse_version("nix-daemon (Nix) 2.8.0").unwrap();
        assert!(!r.ignores_build_hook_in_nix_conf());
        assert!(
            !parse_version("nix (Nix) 2.34.8")
                .unwrap()
                .ignores_build_hook_in_nix_conf()
        );
        assert!(
            parse_version("nix (Nix) 2.25.0")
                .unwrap()
                .ignores_build_hook_in_nix_conf()
        );
        assert!(
            parse_version("nix (Nix) 2.33.1")
                .unwrap()
                .ignores_build_hook_in_nix_conf()
        );
        let lix = parse_version("nix (Lix, like Nix) 2.93.3").unwrap();
        assert!(lix.lix && lix.has_text_hook_protocol() && !lix.ignores_build_hook_in_nix_conf());
        assert!(
            !parse_version("nix (Lix, like Nix) 2.94.0")
                .unwrap()
                .has_text_hook_protocol()
        );
        assert_eq!(parse_version("garbage"), None);
    }

    /// The hook is read from `--option build-hook`, `--build-hook`, the config JSON of both
    /// shapes and nix.conf lines; the last setting wins.
    #[test]
    fn parsers() {
        assert_eq!(
            hook_from_argv(&argv(&format!(
                "nix-daemon --daemon --option build-hook /x --option build-hook {HOOK}"
            ))),
            Some(vec![HOOK.to_owned()])
        );
        assert_eq!(
            hook_from_argv(&argv("nix-daemon --build-hook /y")),
            Some(vec!["/y".to_owned()])
        );
        assert_eq!(hook_from_argv(&argv("nix-daemon --daemon")), None);
        assert_eq!(
            hook_from_argv(&argv("nix-daemon --option build-hook")),
            None
        );
        assert_eq!(
            hook_from_config_json(CONFIG_2_8),
            Some(vec!["/usr/libexec/nix/build-remote".to_owned()])
        );
        assert_eq!(
            hook_from_config_json(CONFIG_2_26),
            Some(argv("/usr/bin/nix __build-remote"))
        );
        assert_eq!(hook_from_config_json("{}"), None);
        assert_eq!(
            hook_in_nix_conf(
                "max-jobs = 0\nbuild-hook = /a # old\n# build-hook = /c\nbuild-hook=/b\n"
            ),
            Some("/b".to_owned())
        );
        assert_eq!(hook_in_nix_conf("builders =\n"), None);
    }

    /// Nix 2.26 with the hook only in nix.conf: fails, says why and gives the command-line fix.
    #[test]
    fn nix_2_26_with_hook_in_nix_conf_gets_the_command_line_fix() {
        let f = facts(
            "nix (Nix) 2.26.3",
            "nix-daemon --daemon",
            CONFIG_2_26,
            &format!("build-hook = {HOOK}\n"),
        );
        let r = diagnose(&f, Path::new(HOOK));
        assert!(!r.healthy());
        let c = hook_check(&r);
        assert_eq!(c.status, Status::Fail);
        assert!(c.summary.contains("/usr/bin/nix __build-remote"), "{c:?}");
        let fix = c.fix.as_deref().unwrap();
        assert!(
            fix.contains(&format!("--option build-hook {HOOK}"))
                && fix.contains(
                    "ignores `build-hook = /usr/local/bin/nixdispatch-hook` in /etc/nix/nix.conf"
                ),
            "{fix}"
        );
    }

    /// Nix 2.26 with the hook on the daemon's command line is healthy.
    #[test]
    fn nix_2_26_with_hook_on_the_command_line_is_healthy() {
        let f = facts(
            "nix (Nix) 2.26.3",
            &format!("nix-daemon --daemon --option build-hook {HOOK}"),
            CONFIG_2_26,
            "",
        );
        let r = diagnose(&f, Path::new(HOOK));
        assert!(r.healthy(), "{r:?}");
        assert!(hook_check(&r).summary.contains("the daemon's command line"));
    }

    /// Nix 2.8 and 2.34 without the hook are told to set it in nix.conf; with it, healthy.
    #[test]
    fn nix_conf_versions_get_the_nix_conf_fix() {
        let r = diagnose(
            &facts("nix (Nix) 2.8.0", "nix-daemon", CONFIG_2_8, ""),
            Path::new(HOOK),
        );
        assert_eq!(
            hook_check(&r).fix.as_deref(),
            Some(
                "set `build-hook = /usr/local/bin/nixdispatch-hook` in /etc/nix/nix.conf and \
                 restart nix-daemon"
            )
        );
        let r = diagnose(
            &facts("nix (Nix) 2.34.8", "nix-daemon", CONFIG_2_34_OURS, ""),
            Path::new(HOOK),
        );
        assert!(r.healthy(), "{r:?}");
    }

    /// Another hook on the command line, Lix 2.94+, and a machine with nothing known are
    /// each reported for what they are.
    #[test]
    fn other_cases() {
        let r = diagnose(
            &facts(
                "nix (Nix) 2.34.8",
                "nix-daemon --option build-hook /opt/other-hook",
                CONFIG_2_34_OURS,
                "",
            ),
            Path::new(HOOK),
        );
        assert!(
            hook_check(&r)
                .fix
                .as_deref()
                .unwrap()
                .starts_with("the daemon's command line sets `build-hook` to `/opt/other-hook`")
        );
        let r = diagnose(
            &facts(
                "nix (Lix, like Nix) 2.94.0",
                "nix-daemon",
                CONFIG_2_34_OURS,
                "",
            ),
            Path::new(HOOK),
        );
        assert!(!r.healthy());
        assert_eq!(r.checks[0].status, Status::Fail);
        let r = diagnose(&Facts::default(), Path::new(HOOK));
        assert!(r.healthy());
        assert!(r.checks.iter().all(|c| c.status == Status::Warn));
    }

    /// The text report puts each fix under its check; the JSON says whether all is well.
    #[test]
    fn rendering() {
        let r = diagnose(
            &facts("nix (Nix) 2.26.3", "nix-daemon", CONFIG_2_26, ""),
            Path::new(HOOK),
        );
        let text = r.table();
        assert!(
            text.starts_with("ok    nix         nix (Nix) 2.26.3 (nix-daemon pid 42)\n"),
            "{text}"
        );
        assert!(
            text.contains("\nFAIL  build-hook  the daemon runs"),
            "{text}"
        );
        assert!(
            text.contains("\n                  fix: nix (Nix) 2.26.3 ignores"),
            "{text}"
        );
        assert_eq!(r.json()["healthy"], false);
        assert_eq!(r.json()["checks"][1]["status"], "fail");
    }
}
