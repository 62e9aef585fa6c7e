//! Fuzzes the agent's TOML configuration: parsing, then resolution into the settings the
//! agent runs with, which validates every key. Neither may panic, and settings they accept
//! must make a registration within the bounds the agent promises (1 to 1024 slots, a
//! finite positive speed, 1 to 16 systems, an `ssh://` or `ssh-ng://` store URI).
//!
//! Resolution is kept off the machine's Nix and files: the target fills in what would be
//! asked of `nix` when the text leaves it unset, points the host key at a fixed file and
//! drops the credential file (reading files is not what is fuzzed here).

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nixdispatch_agent::Config;

/// A runtime for `Config::resolve`, and the fixed host key file.
fn env() -> &'static (tokio::runtime::Runtime, PathBuf) {
    static ENV: OnceLock<(tokio::runtime::Runtime, PathBuf)> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let key = std::env::temp_dir().join(format!(
            "nixdispatch-fuzz-host-{}.pub",
            std::process::id()
        ));
        std::fs::write(
            &key,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHdzrOYYsx97jgJC4raQrLvbWQfJI3Wj8wIeg0F7/qlv root@b1\n",
        )
        .expect("the host key fixture");
        (rt, key)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut config) = Config::from_toml(text) else {
        return;
    };
    let (rt, key) = env();
    config.host_key_file = key.clone();
    config.credential_file = None;
    config.host_id.get_or_insert_with(|| "b1".into());
    config.store_uri.get_or_insert_with(|| "ssh-ng://b1".into());
    config
        .systems
        .get_or_insert_with(|| vec!["x86_64-linux".into()]);
    config.features.get_or_insert_with(Vec::new);
    config.max_jobs.get_or_insert(4);
    // An empty group: no build users to look up in `/etc/group`.
    config.build_users_group.get_or_insert_with(String::new);
    let settings = match rt.block_on(config.resolve()) {
        Ok(settings) => settings,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let r = &settings.register;
    assert!((1..=1024).contains(&r.max_jobs));
    assert!(r.speed_factor.is_finite() && r.speed_factor > 0.0 && r.speed_factor <= 1000.0);
    assert!((1..=16).contains(&r.systems.len()));
    assert!(r.store_uri.starts_with("ssh://") || r.store_uri.starts_with("ssh-ng://"));
    assert!(!r.host_id.is_empty() && r.host_id.len() <= 128);
    let t = &settings.timing;
    assert!(t.report_at_fraction > 0.0 && t.report_at_fraction <= 1.0);
    assert!(t.reconnect_initial_millis > 0 && t.reconnect_max_millis >= t.reconnect_initial_millis);
});
