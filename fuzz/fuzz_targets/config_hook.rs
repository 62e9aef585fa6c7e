//! Fuzzes the hook's TOML configuration: parsing and validation must never panic, a
//! configuration they accept has the bounds the hook relies on, and its SSH identity can be
//! put into a machines line without breaking it (Nix must still read the one granted host,
//! with its key pinned).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nixdispatch::hook::config::HookConfig;
use nixdispatch::hook::machine::Grant;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match HookConfig::from_toml(text, Path::new("hook.toml")) {
        Ok(config) => config,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    assert!(config.scheduler.starts_with("http://") || config.scheduler.starts_with("https://"));
    assert!(config.max_host_attempts >= 1);
    assert!(!config.try_timeout().is_zero() && !config.rpc_timeout().is_zero());
    if let Some(id) = &config.client_id {
        assert!(!id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic()));
    }
    if let Some(br) = &config.build_remote {
        assert!(br.first().is_some_and(|p| !p.is_empty()));
    }
    let grant = Grant {
        lease_id: "0123456789abcdef-1".into(),
        host_id: "b1".into(),
        store_uri: "ssh-ng://b1".into(),
        systems: vec!["x86_64-linux".into()],
        max_jobs: 2,
        speed_factor: 1.0,
        supported_features: vec![],
        mandatory_features: vec![],
        host_public_key_base64: "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUV4YW1wbGU="
            .into(),
        lease_ttl: std::time::Duration::from_secs(60),
        slots_used: 1,
        slots_total: 2,
    };
    let identity = config
        .ssh_identity
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned());
    nixdispatch_fuzz::check_machines_line(&grant, identity.as_deref());
});
