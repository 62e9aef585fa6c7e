//! Fuzzes the hook's grant → machines-line conversion with the `Granted` message a scheduler
//! (or anybody between it and the hook) may send, and the hook's SSH identity setting.
//!
//! A grant the hook accepts must become a machines line that Nix reads back as exactly the
//! granted host, with its host key pinned: no field may spill into another, start a comment,
//! end the line or make Nix read a machines file.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use nixdispatch::hook::machine::Grant;
use nixdispatch::proto;

/// The fields of `proto::Granted`, drawn structurally so that lists and floats are cheap to
/// reach; the raw bytes path (prost decoding) is covered by `scheduler_convert`.
#[derive(Debug, Arbitrary)]
struct Input {
    lease_id: String,
    host_id: String,
    store_uri: String,
    systems: Vec<String>,
    max_jobs: u32,
    speed_factor: f64,
    supported_features: Vec<String>,
    mandatory_features: Vec<String>,
    /// The public key line, base64-encoded by the target unless `raw_key` is set.
    key_line: String,
    raw_key: bool,
    ttl_millis: u64,
    ssh_identity: Option<String>,
}

fuzz_target!(|input: Input| {
    let key = if input.raw_key {
        input.key_line
    } else {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(input.key_line)
    };
    let granted = proto::Granted {
        lease_id: input.lease_id,
        host_id: input.host_id,
        store_uri: input.store_uri,
        systems: input.systems,
        max_jobs: input.max_jobs,
        speed_factor: input.speed_factor,
        supported_features: input.supported_features,
        mandatory_features: input.mandatory_features,
        host_public_key_base64: key,
        lease_ttl_millis: input.ttl_millis,
        slots_used: 0,
        slots_total: 0,
        attached: false,
    };
    let Ok(grant) = Grant::try_from(granted) else {
        return;
    };
    assert!(grant.max_jobs >= 1);
    assert!(!grant.host_id.is_empty());
    nixdispatch_fuzz::check_machines_line(&grant, input.ssh_identity.as_deref());
});
