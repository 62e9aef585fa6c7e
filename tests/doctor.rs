//! `nixdispatch doctor` against real processes: a real scheduler (TLS and `[auth]`, or the
//! open mode) on 127.0.0.1:0, real agents and real OpenSSH builders on loopback
//! (`tests/common`). Each case changes one thing a member gets wrong or a builder breaks:
//! a wrong credential, an operator's credential, a CA that did not sign the scheduler's
//! certificate, a stopped sshd, a wrongly pinned host key, an identity the builders do not
//! authorize; the doctor names it, gives a fix and exits 1, and exits 0 when all is well.
//!
//! The doctor runs in a PID namespace of its own (`unshare --pid --mount-proc`): it sees no
//! `nix-daemon` (other tests' daemons would otherwise be found in `/proc`), and with
//! `NIX_CONF_DIR` naming a nix.conf that sets `build-hook`, its local checks pass, so its
//! exit status is about what these tests change. Needs root, Nix, OpenSSH (`tests/run.sh`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{BuilderSpec, Env};
use serde_json::Value;

fn hook() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nixdispatch-hook"))
}

/// Runs `nixdispatch --json doctor` with `hook_config`; returns its exit code and report.
fn doctor(env: &Env, hook_config: &Path) -> (i32, Value) {
    let conf = env.path().join("doctor-conf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("nix.conf"),
        format!("build-hook = {}\n", hook().display()),
    )
    .unwrap();
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--"])
        .arg(env!("CARGO_BIN_EXE_nixdispatch"))
        .args(["--json", "doctor", "--hook"])
        .arg(hook())
        .arg("--hook-config")
        .arg(hook_config)
        .env("NIX_CONF_DIR", &conf)
        .env("NIX_SSHOPTS", format!("-F {}", env.ssh_config.display()))
        .env_remove("NIXDISPATCH_HOOK_CONFIG")
        .env_remove("NIX_REMOTE")
        .stdin(Stdio::null())
        .output()
        .expect("run nixdispatch doctor");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// The check named `name`, as `(status, summary, fix)`.
fn check(report: &Value, name: &str) -> (String, String, String) {
    let c = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"));
    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
    (s("status"), s("summary"), s("fix"))
}

/// The hook's configuration with `replace` applied to its text; written next to it.
fn variant(env: &Env, base: &Path, name: &str, replace: &[(&str, String)]) -> PathBuf {
    let mut text = std::fs::read_to_string(base).unwrap();
    for (from, to) in replace {
        assert!(text.contains(from), "{from} not in {text}");
        text = text.replace(from, to);
    }
    let p = env.path().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// With TLS and credentials: all well exits 0; a stopped sshd, a wrong token, an
/// operator's token and a foreign CA are each named, with a fix, and exit 1.
#[test]
fn doctor_checks_the_scheduler_the_credential_and_every_builder() {
    let specs = [BuilderSpec::new("b1", 1), BuilderSpec::new("b2", 1)];
    let mut env = Env::new(&specs);
    env.secure = true;
    env.start_scheduler_and_agents(&specs);
    let config = env.write_hook_config(env.scheduler_addr.as_deref().unwrap(), "");

    let (code, report) = doctor(&env, &config);
    assert_eq!(code, 0, "{report:#}");
    let (status, summary, _) = check(&report, "scheduler");
    assert_eq!(status, "ok", "{report:#}");
    assert!(
        summary.contains(&format!("member e2e-{}", env.id)),
        "{summary}"
    );
    for b in ["builder b1", "builder b2"] {
        let (status, summary, _) = check(&report, b);
        assert_eq!(status, "ok", "{report:#}");
        assert!(summary.contains("nix-daemon (Nix)"), "{summary}");
    }

    // b2's sshd stops; its agent goes on reporting, so the scheduler still lists it.
    let i = env.builders.iter().position(|b| b.id == "b2").unwrap();
    env.builders[i].endpoint = None;
    let (code, report) = doctor(&env, &config);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "builder b1").0, "ok", "{report:#}");
    let (status, summary, fix) = check(&report, "builder b2");
    assert_eq!(status, "fail", "{report:#}");
    assert!(
        summary.contains("unreachable") && summary.contains("Connection refused"),
        "{summary}"
    );
    assert!(fix.contains("reaches the builder's sshd"), "{fix}");

    let secrets = env.path().join("secrets");
    std::fs::write(secrets.join("wrong.token"), "not-a-known-token\n").unwrap();
    let member = format!("{}/member.token", secrets.display());
    let wrong = variant(
        &env,
        &config,
        "hook-wrong-token.toml",
        &[(&member, format!("{}/wrong.token", secrets.display()))],
    );
    let (code, report) = doctor(&env, &wrong);
    assert_eq!(code, 1);
    let (status, summary, fix) = check(&report, "scheduler");
    assert_eq!(status, "fail");
    assert!(
        summary.contains("does not accept the credential"),
        "{summary}"
    );
    assert!(fix.contains("member token"), "{fix}");

    let operator = variant(
        &env,
        &config,
        "hook-operator-token.toml",
        &[(&member, format!("{}/operator.token", secrets.display()))],
    );
    let (code, report) = doctor(&env, &operator);
    assert_eq!(code, 1);
    let (status, summary, _) = check(&report, "scheduler");
    assert_eq!(status, "fail");
    assert!(
        summary.contains("not a member's") && summary.contains("operator ops"),
        "{summary}"
    );

    let other_ca = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        rcgen::CertifiedIssuer::self_signed(params, key)
            .unwrap()
            .pem()
    };
    std::fs::write(secrets.join("other-ca.pem"), other_ca).unwrap();
    let foreign = variant(
        &env,
        &config,
        "hook-other-ca.toml",
        &[(
            &format!("{}/ca.pem", secrets.display()),
            format!("{}/other-ca.pem", secrets.display()),
        )],
    );
    let (code, report) = doctor(&env, &foreign);
    assert_eq!(code, 1);
    let (status, summary, fix) = check(&report, "scheduler");
    assert_eq!(status, "fail");
    assert!(summary.starts_with("TLS with"), "{summary}");
    assert!(fix.contains("ca_file"), "{fix}");
}

/// A builder registered with another host key than its real one is a key mismatch (never
/// accepted), an identity the builders do not authorize is a refused login, a login that
/// finds no Nix is told as such; a scheduler that is not there is unreachable.
#[test]
fn doctor_tells_a_wrong_host_key_from_a_refused_login() {
    let mut bad = BuilderSpec::new("bbad", 1);
    bad.wrong_pinned_key = true;
    let specs = [BuilderSpec::new("b1", 1), bad];
    let mut env = Env::new(&specs);
    env.start_scheduler_and_agents(&specs);
    let url = env.scheduler_addr.clone().unwrap();
    let config = env.write_hook_config(&url, "");

    let (code, report) = doctor(&env, &config);
    assert_eq!(code, 1, "{report:#}");
    let (status, summary, _) = check(&report, "scheduler");
    assert_eq!(status, "ok");
    assert!(summary.contains("open mode"), "{summary}");
    assert_eq!(check(&report, "builder b1").0, "ok", "{report:#}");
    let (status, summary, fix) = check(&report, "builder bbad");
    assert_eq!(status, "fail");
    assert!(summary.contains("not the pinned one"), "{summary}");
    assert!(fix.contains("never accept"), "{fix}");

    let stranger = env.path().join("keys/stranger");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&stranger)
        .output()
        .unwrap();
    assert!(out.status.success());
    let unauthorized = variant(
        &env,
        &config,
        "hook-stranger.toml",
        &[(
            &env.client_key.display().to_string(),
            stranger.display().to_string(),
        )],
    );
    let (code, report) = doctor(&env, &unauthorized);
    assert_eq!(code, 1);
    let (status, summary, fix) = check(&report, "builder b1");
    assert_eq!(status, "fail", "{report:#}");
    assert!(summary.contains("refuses the login"), "{summary}");
    assert!(
        fix.contains(&format!("authorize {}.pub for", stranger.display())),
        "{fix}"
    );

    // b1's logins find no Nix: its sshd (started per connection, so reading its
    // configuration anew) gives sessions a PATH without it.
    let sshd_config = env.path().join("sshd_b1.config");
    let text = std::fs::read_to_string(&sshd_config).unwrap();
    let line = text.lines().find(|l| l.starts_with("SetEnv ")).unwrap();
    std::fs::write(
        &sshd_config,
        text.replace(line, &format!("{line} PATH=/nonexistent")),
    )
    .unwrap();
    let (code, report) = doctor(&env, &config);
    assert_eq!(code, 1);
    let (status, summary, fix) = check(&report, "builder b1");
    assert_eq!(status, "fail", "{report:#}");
    assert!(
        summary.contains("no Nix there") && summary.contains("nix-daemon"),
        "{summary}"
    );
    assert!(fix.contains("Nix on the login PATH"), "{fix}");

    env.stop_scheduler();
    let (code, report) = doctor(&env, &config);
    assert_eq!(code, 1);
    let (status, summary, _) = check(&report, "scheduler");
    assert_eq!(status, "fail");
    assert!(
        summary.starts_with(&format!("cannot reach {url}")),
        "{summary}"
    );
}
