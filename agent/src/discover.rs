//! Discovering the defaults from the local Nix and the host.
//!
//! `nix config show --json` (current Nix) or `nix show-config --json` (older Nix, e.g.
//! Debian's 2.8) prints every setting as `{"name": {"value": ..., ...}}`; the agent reads
//! `system`, `extra-platforms`, `system-features`, `max-jobs` and `build-users-group` from
//! it. The parser is pure ([`parse_nix_config`]); running the command is
//! [`run_nix_config`]. The host key parser is pure too ([`parse_host_key`]).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, Result};

/// The Nix settings the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixSettings {
    /// `system`.
    pub system: String,
    /// `extra-platforms`.
    pub extra_platforms: Vec<String>,
    /// `system-features`.
    pub system_features: Vec<String>,
    /// `max-jobs`, with `auto` replaced by the CPU count.
    pub max_jobs: u32,
    /// `build-users-group`; `None` when empty (builds run as the Nix daemon's user).
    pub build_users_group: Option<String>,
}

impl NixSettings {
    /// `system` followed by `extra-platforms`, without duplicates, in that order.
    pub fn systems(&self) -> Vec<String> {
        let mut out = vec![self.system.clone()];
        for p in &self.extra_platforms {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
        out
    }
}

fn nix_err(reason: impl Into<String>) -> Error {
    Error::NixConfig {
        reason: reason.into(),
    }
}

/// A list setting: a JSON array of strings, or (as some versions print) one space-separated
/// string. A missing setting is an empty list.
fn string_list(settings: &serde_json::Map<String, Value>, name: &str) -> Result<Vec<String>> {
    match settings.get(name).map(|s| s.get("value")) {
        None => Ok(Vec::new()),
        Some(Some(Value::Array(items))) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| nix_err(format!("`{name}` has a non-string item")))
            })
            .collect(),
        Some(Some(Value::String(s))) => Ok(s.split_ascii_whitespace().map(str::to_owned).collect()),
        Some(_) => Err(nix_err(format!("`{name}` has no list value"))),
    }
}

/// Parses the JSON of `nix config show --json`. `cpu_count` replaces `max-jobs = auto`.
pub fn parse_nix_config(json: &str, cpu_count: u32) -> Result<NixSettings> {
    let root: Value = serde_json::from_str(json).map_err(|e| nix_err(format!("not JSON: {e}")))?;
    let settings = root
        .as_object()
        .ok_or_else(|| nix_err("not a JSON object"))?;
    let value = |name: &str| settings.get(name).and_then(|s| s.get("value"));
    let system = value("system")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| nix_err("`system` is missing"))?
        .to_owned();
    let max_jobs = match value("max-jobs") {
        Some(Value::Number(n)) => {
            let n = n
                .as_u64()
                .ok_or_else(|| nix_err(format!("`max-jobs` is not a count: {n}")))?;
            u32::try_from(n).map_err(|_| nix_err(format!("`max-jobs` too large: {n}")))?
        }
        Some(Value::String(s)) if s == "auto" => cpu_count,
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| nix_err(format!("`max-jobs` is not a count: {s:?}")))?,
        Some(other) => return Err(nix_err(format!("`max-jobs` is not a count: {other}"))),
        None => return Err(nix_err("`max-jobs` is missing")),
    };
    let build_users_group = match value("build-users-group") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::String(_)) | None => None,
        Some(other) => {
            return Err(nix_err(format!(
                "`build-users-group` is not a string: {other}"
            )));
        }
    };
    Ok(NixSettings {
        system,
        extra_platforms: string_list(settings, "extra-platforms")?,
        system_features: string_list(settings, "system-features")?,
        max_jobs,
        build_users_group,
    })
}

/// How long one `nix` invocation may take before discovery gives up on it.
const NIX_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one `nix` command and returns its stdout.
async fn run_nix(nix_bin: &Path, args: &[&str]) -> Result<String> {
    let command = format!("{} {}", nix_bin.display(), args.join(" "));
    let child = tokio::process::Command::new(nix_bin)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(NIX_TIMEOUT, child).await {
        Ok(result) => result.map_err(|source| Error::NixCommand {
            command: command.clone(),
            source,
        })?,
        Err(_) => {
            return Err(Error::NixFailed {
                command,
                status: "timed out".into(),
                stderr: String::new(),
            });
        }
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr: String = stderr.lines().take(3).collect::<Vec<_>>().join(" / ");
        return Err(Error::NixFailed {
            command,
            status: output.status.to_string(),
            stderr,
        });
    }
    String::from_utf8(output.stdout).map_err(|_| nix_err(format!("`{command}` printed non-UTF-8")))
}

/// Asks the local Nix for its settings: `nix config show --json` first, and on failure the
/// older `nix show-config --json`. Both get `--extra-experimental-features nix-command`,
/// which the older spelling needs and the newer one accepts.
pub async fn run_nix_config(nix_bin: &Path, cpu_count: u32) -> Result<NixSettings> {
    const FEATURES: [&str; 2] = ["--extra-experimental-features", "nix-command"];
    let new = run_nix(
        nix_bin,
        &[FEATURES[0], FEATURES[1], "config", "show", "--json"],
    )
    .await;
    let json = match new {
        Ok(json) => json,
        Err(Error::NixCommand { command, source }) => {
            // The binary itself is missing: the fallback would fail the same way.
            return Err(Error::NixCommand { command, source });
        }
        Err(first) => {
            tracing::debug!(error = %first, "`nix config show` failed, trying `nix show-config`");
            run_nix(
                nix_bin,
                &[FEATURES[0], FEATURES[1], "show-config", "--json"],
            )
            .await?
        }
    };
    parse_nix_config(&json, cpu_count)
}

/// Validates an OpenSSH public key file's contents (`<type> <base64> [comment]`) and returns
/// its first key line, trimmed.
pub fn parse_host_key(text: &str) -> std::result::Result<String, String> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or("the file holds no key")?;
    let mut fields = line.split_ascii_whitespace();
    let key_type = fields.next().ok_or("no key type")?;
    let data = fields.next().ok_or("no key data after the key type")?;
    let known_type = key_type.starts_with("ssh-")
        || key_type.starts_with("ecdsa-sha2-")
        || key_type.starts_with("sk-");
    if !known_type {
        return Err(format!("unknown key type {key_type:?}"));
    }
    let base64 = |c: char| c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '=');
    if data.len() < 16 || !data.chars().all(base64) {
        return Err("the key data is not base64".into());
    }
    Ok(line.to_owned())
}

/// The host's name, for the default host id and store URI.
pub fn hostname() -> Option<String> {
    sysinfo::System::host_name().ok().filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NIX_2_8: &str = include_str!("../tests/fixtures/nix/show-config-2.8.json");
    const NIX_NEW: &str = include_str!("../tests/fixtures/nix/config-show-2.24.json");

    /// A real `nix show-config --json` capture from Nix 2.8 gives system, platforms,
    /// features, max-jobs and the build users group.
    #[test]
    fn nix_2_8_capture() {
        let s = parse_nix_config(NIX_2_8, 8).unwrap();
        assert_eq!(s.system, "x86_64-linux");
        assert_eq!(
            s.systems()[..2],
            ["x86_64-linux".to_owned(), "i686-linux".to_owned()]
        );
        assert_eq!(
            s.system_features,
            ["benchmark", "big-parallel", "kvm", "nixos-test"]
        );
        assert_eq!(s.max_jobs, 1);
        assert_eq!(s.build_users_group.as_deref(), Some("nixbld"));
    }

    /// A newer-format sample with `max-jobs = "auto"` and an empty build users group.
    #[test]
    fn newer_nix_auto_max_jobs() {
        let s = parse_nix_config(NIX_NEW, 12).unwrap();
        assert_eq!(s.systems(), ["aarch64-darwin", "x86_64-darwin"]);
        assert_eq!(s.max_jobs, 12);
        assert_eq!(s.build_users_group, None);
        assert_eq!(s.system_features, ["apple-virt", "big-parallel"]);
    }

    /// Truncated, garbage and incomplete JSON is an error, never a default.
    #[test]
    fn nix_config_bad_inputs() {
        let truncated = &NIX_2_8[..NIX_2_8.len() / 2];
        for text in [
            "",
            "garbage",
            truncated,
            "[]",
            r#"{"max-jobs": {"value": 4}}"#,
            r#"{"system": {"value": "x86_64-linux"}}"#,
            r#"{"system": {"value": "x"}, "max-jobs": {"value": -1}}"#,
            r#"{"system": {"value": "x"}, "max-jobs": {"value": "lots"}}"#,
            r#"{"system": {"value": "x"}, "max-jobs": {"value": 1}, "system-features": {"value": [1]}}"#,
        ] {
            assert!(
                parse_nix_config(text, 4).is_err(),
                "{text:?} should be rejected"
            );
        }
    }

    /// Real host keys are accepted (comment kept), junk is refused.
    #[test]
    fn host_key() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0wF5n9l6V8vWqjYsFNeaUhgSJHdcD1t0Cg+2mWQn9R root@b1\n";
        assert_eq!(parse_host_key(key).unwrap(), key.trim());
        assert!(parse_host_key("").is_err());
        assert!(parse_host_key("ssh-ed25519\n").is_err());
        assert!(parse_host_key("hello world-this-is-not-a-key\n").is_err());
        assert!(parse_host_key("ssh-ed25519 !!!!!!!!!!!!!!!!!!!!\n").is_err());
    }

    /// A missing `nix` binary is reported as such, without trying the fallback.
    #[tokio::test]
    async fn missing_nix_binary() {
        let err = run_nix_config(Path::new("/nonexistent/nix"), 1)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NixCommand { .. }), "{err}");
    }

    /// On this machine's Nix 2.8 the new command fails and the fallback succeeds.
    #[tokio::test]
    async fn real_nix_if_installed() {
        let Ok(nix) = which("nix") else { return };
        let settings = run_nix_config(&nix, 2).await.unwrap();
        assert!(!settings.system.is_empty());
    }

    fn which(name: &str) -> std::result::Result<std::path::PathBuf, ()> {
        let path = std::env::var_os("PATH").ok_or(())?;
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or(())
    }
}
