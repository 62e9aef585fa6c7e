//! The agent's example settings from the NixOS and nix-darwin modules
//! (`deploy/nixos/examples.nix`), rendered to TOML as `pkgs.formats.toml` does (Nix's JSON
//! converted), parse with the agent's real configuration parser, which rejects unknown keys
//! and mistyped values. Needs `nix-instantiate` (tests/run.sh installs nix-bin).

use std::process::Command;

/// The agent example of the modules is a configuration the agent accepts.
#[test]
fn module_example_parses_with_the_agent_loader() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("nix-instantiate")
        .args([
            "--eval",
            "--json",
            "--strict",
            "-E",
            "(import ./deploy/nixos/examples.nix).agent",
        ])
        .current_dir(&root)
        .output()
        .expect("nix-instantiate runs (tests/run.sh installs nix-bin)");
    assert!(out.status.success(), "{out:?}");
    let settings: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = toml::to_string(&settings).unwrap();
    let config =
        nixdispatch_agent::Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(config.host_id.as_deref(), Some("build01"));
    assert_eq!(config.speed_factor, 2.0);
}
