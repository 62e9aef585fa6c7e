//! `deploy/` checked as far as this machine allows (no nixpkgs, no NixOS, no macOS; see
//! `docs/deploy.md` for what is left): every `.nix` file parses; the modules' example
//! settings, rendered to TOML, load with the binaries' real configuration loaders; the hook
//! placement follows `docs/hook.md`'s version table; the systemd units the NixOS modules
//! apply pass `systemd-analyze verify` and score at most 2.0 in `systemd-analyze security`;
//! the launchd job is read by a real plist reader; the alert rules and the dashboard's
//! queries pass promtool and use only metrics the scheduler describes.
//!
//! Needs `nix-instantiate` (nix-bin), `systemd-analyze` (systemd), `promtool` (prometheus)
//! and `python3`: `tests/run.sh` installs them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command that must succeed; returns its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} cannot start ({e}): tests/run.sh installs it"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Evaluates a Nix expression strictly, as JSON.
fn eval(expr: &str) -> serde_json::Value {
    let out = run(Command::new("nix-instantiate")
        .args(["--eval", "--json", "--strict", "-E", expr])
        .current_dir(root()));
    serde_json::from_str(&out).unwrap()
}

/// The TOML `pkgs.formats.toml` would write for `settings` (it converts Nix's JSON to TOML).
fn toml_of(settings: &serde_json::Value) -> String {
    toml::to_string(settings).unwrap()
}

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if !matches!(name.as_str(), "target" | ".git" | "fuzz") {
                nix_files(&path, out);
            }
        } else if name.ends_with(".nix") {
            out.push(path);
        }
    }
}

/// Every `.nix` file of the repository parses with `nix-instantiate --parse`.
#[test]
fn every_nix_file_parses() {
    let mut files = Vec::new();
    nix_files(&root(), &mut files);
    assert!(files.len() >= 10, "{files:?}");
    for f in files {
        run(Command::new("nix-instantiate").arg("--parse").arg(&f));
    }
}

/// The scheduler's and the hook's example settings from the modules, rendered to TOML,
/// load with the binaries' real loaders (unknown keys and bad values are errors there).
#[test]
fn module_examples_load_with_the_real_config_loaders() {
    let examples = eval("import ./deploy/nixos/examples.nix");
    let text = toml_of(&examples["scheduler"]);
    let scheduler = nixdispatch_scheduler::config::Config::parse(&text)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(scheduler.probe.enabled);
    assert_eq!(scheduler.listen.port(), 50051);
    let text = toml_of(&examples["hook"]);
    let hook = nixdispatch::hook::config::HookConfig::from_toml(&text, Path::new("hook.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(hook.client_id.as_deref(), Some("alice-laptop"));
    assert!(hook.ssh_reuse.enabled);
    let text = toml_of(&examples["gate"]);
    let gate = nixdispatch::gate::config::GateConfig::from_toml(&text, Path::new("gate.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(
        gate.agent_socket.is_some(),
        "the example uses the agent's socket"
    );
    // The agent's example is loaded by the agent crate's own test (agent/tests/deploy.rs).
    assert!(examples["agent"]["scheduler"].is_string());
}

/// The member modules put `build-hook` where each Nix version reads it, as the version
/// table of docs/hook.md says: the daemon's command line for Nix 2.25 to 2.33, nix.conf
/// otherwise, and Lix 2.94+ is refused.
#[test]
fn hook_placement_follows_the_version_table() {
    let docs = std::fs::read_to_string(root().join("docs/hook.md")).unwrap();
    assert!(
        docs.contains("Nix 2.25 to 2.33"),
        "the table this test follows moved"
    );
    for (pname, version, want) in [
        ("nix", "2.7.0", "unsupported"),
        ("nix", "2.8.0", "nix.conf"),
        ("nix", "2.24.14", "nix.conf"),
        ("nix", "2.25.0", "daemon-command-line"),
        ("nix", "2.26.3", "daemon-command-line"),
        ("nix", "2.33.1", "daemon-command-line"),
        ("nix", "2.34.0", "nix.conf"),
        ("nix", "2.35pre20260101_abcdef", "nix.conf"),
        ("lix", "2.91.1", "nix.conf"),
        ("lix", "2.94.0", "unsupported"),
    ] {
        let got = eval(&format!(
            "import ./deploy/nixos/hook-placement.nix {{ pname = \"{pname}\"; version = \"{version}\"; }}"
        ));
        assert_eq!(got, want, "{pname} {version}");
    }
}

/// Renders a `serviceConfig` attrset as NixOS does (lists as repeated lines, booleans as
/// yes/no) into a unit file.
fn unit_file(description: &str, service: &serde_json::Value) -> String {
    let mut out = format!("[Unit]\nDescription={description}\n\n[Service]\n");
    for (key, value) in service.as_object().unwrap() {
        let values = match value {
            serde_json::Value::Array(vs) => vs.clone(),
            v => vec![v.clone()],
        };
        for v in values {
            let v = match v {
                serde_json::Value::Bool(b) => (if b { "yes" } else { "no" }).to_owned(),
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            out.push_str(&format!("{key}={v}\n"));
        }
    }
    out.push_str("\n[Install]\nWantedBy=multi-user.target\n");
    out
}

/// The exposure `systemd-analyze security --offline=true` gives a unit file.
fn exposure(unit: &Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .expect("systemd-analyze runs (tests/run.sh installs systemd)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure in:\n{text}"));
    line.split(": ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The scheduler and agent services the NixOS modules define (deploy/nixos/units.nix, with
/// a credential) pass `systemd-analyze verify` and score at most 2.0 in `systemd-analyze
/// security`; the hand-installable units in deploy/ pass `verify`.
#[test]
fn units_verify_and_are_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let units = eval(
        "import ./deploy/nixos/units.nix { schedulerExec = \"/bin/true --config /etc/hostname\"; \
         agentExec = \"/bin/true\"; schedulerCredentials = [ \"probe-key:/etc/hostname\" ]; \
         agentCredentials = [ \"token:/etc/hostname\" ]; }",
    );
    for name in ["scheduler", "agent"] {
        let path = dir.path().join(format!("nixdispatch-{name}.service"));
        std::fs::write(
            &path,
            unit_file(&format!("nixdispatch {name}"), &units[name]),
        )
        .unwrap();
        run(Command::new("systemd-analyze").arg("verify").arg(&path));
        let score = exposure(&path);
        assert!(score <= 2.0, "{name}: exposure {score} above 2.0");
    }
    // The static units name /usr/local/bin binaries, which verify wants to exist.
    for unit in [
        "deploy/scheduler/nixdispatch-scheduler.service",
        "deploy/agent/nixdispatch-agent.service",
    ] {
        let text = std::fs::read_to_string(root().join(unit))
            .unwrap()
            .replace("/usr/local/bin/nixdispatch-scheduler", "/bin/true")
            .replace("/usr/local/bin/nixdispatch-agent", "/bin/true");
        let path = dir.path().join(Path::new(unit).file_name().unwrap());
        std::fs::write(&path, text).unwrap();
        run(Command::new("systemd-analyze").arg("verify").arg(&path));
    }
}

/// The launchd plist in deploy/agent is read by a real plist reader (Python's plistlib),
/// and says exactly what the nix-darwin module's job (deploy/darwin/launchd.nix) says.
#[test]
fn launchd_plist_is_read_by_plistlib_and_matches_the_module() {
    let plist = root().join("deploy/agent/org.nixos.nixdispatch-agent.plist");
    let read = run(Command::new("python3")
        .args([
            "-c",
            "import json, plistlib, sys; print(json.dumps(plistlib.load(open(sys.argv[1], 'rb'))))",
        ])
        .arg(&plist));
    let from_plist: serde_json::Value = serde_json::from_str(&read).unwrap();
    let from_module = eval("import ./deploy/darwin/launchd.nix { }");
    assert_eq!(from_plist, from_module);
    assert_eq!(from_plist["KeepAlive"], true);
}

/// The metric names `text` uses, `nixdispatch_…` only.
fn metric_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("nixdispatch_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The alert rules pass `promtool check rules` and their unit tests (`promtool test rules`);
/// every query of the Grafana dashboard is valid PromQL (checked as recording rules); and
/// every metric either uses is one the scheduler describes.
#[test]
fn alerts_and_dashboard_pass_promtool_and_name_real_metrics() {
    let prom = root().join("deploy/prometheus");
    run(Command::new("promtool")
        .args(["check", "rules", "alerts.yml"])
        .current_dir(&prom));
    run(Command::new("promtool")
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(&prom));

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/nixdispatch.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 9);
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(e).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yml"), rules).unwrap();
    run(Command::new("promtool")
        .args(["check", "rules", "dashboard.yml"])
        .current_dir(dir.path()));

    let described =
        std::fs::read_to_string(root().join("scheduler/src/service/metrics.rs")).unwrap();
    let alerts = std::fs::read_to_string(prom.join("alerts.yml")).unwrap();
    for name in metric_names(&alerts)
        .into_iter()
        .chain(exprs.iter().flat_map(|e| metric_names(e)))
    {
        assert!(
            described.contains(&format!("\"{name}\"")),
            "{name} is not a metric the scheduler describes"
        );
    }
}
