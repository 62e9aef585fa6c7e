//! Fuzzes the scheduler's gRPC boundary (`service/convert.rs`): every message an agent, a
//! hook or an operator sends becomes a domain value there or is refused with the field
//! named. Messages come either as raw protobuf bytes (what the network delivers, decoded by
//! prost) or built field by field (to reach deep into the validation quickly).
//!
//! Whatever converts must satisfy what the core assumes without re-checking (slots 1 to
//! 1024, finite positive speed, sane report numbers...), and a registration the scheduler
//! accepts must give a grant that the hook accepts and that Nix reads back as that one host
//! with its key pinned: what the scheduler accepts, the hook can use.

#![no_main]

use base64::Engine as _;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use nixdispatch::proto;
use nixdispatch_scheduler::Error;
use nixdispatch_scheduler::core::{Grant, HostReport, HostSpec, LeaseId, LeaseRequest};
use nixdispatch_scheduler::service::fuzzing;
use prost::Message as _;

/// Key types the scheduler accepts, and one it does not.
const KEY_TYPES: [&str; 8] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

/// A host key line: free text, or one shaped like OpenSSH's (possibly with a wrong type in
/// the blob) so that the accepting path is reached.
#[derive(Debug, Arbitrary)]
enum Key {
    Raw(String),
    Shaped {
        kind: u8,
        blob_kind: u8,
        rest: Vec<u8>,
        separator: String,
        comment: String,
    },
}

impl Key {
    fn line(self) -> String {
        match self {
            Key::Raw(s) => s,
            Key::Shaped {
                kind,
                blob_kind,
                rest,
                separator,
                comment,
            } => {
                let kind = KEY_TYPES[usize::from(kind) % KEY_TYPES.len()];
                let blob_kind = KEY_TYPES[usize::from(blob_kind) % KEY_TYPES.len()];
                let mut blob = (blob_kind.len() as u32).to_be_bytes().to_vec();
                blob.extend_from_slice(blob_kind.as_bytes());
                blob.extend_from_slice(&rest);
                let blob = base64::engine::general_purpose::STANDARD.encode(blob);
                format!("{kind}{separator}{blob} {comment}")
            }
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Register {
    host_id: String,
    store_uri: String,
    key: Key,
    systems: Vec<String>,
    supported_features: Vec<String>,
    mandatory_features: Vec<String>,
    max_jobs: u32,
    speed_factor: f64,
    cpu_count: u32,
    total_memory_bytes: u64,
    agent_version: String,
}

#[derive(Debug, Arbitrary)]
struct Disk {
    free_bytes: u64,
    total_bytes: u64,
}

#[derive(Debug, Arbitrary)]
struct Report {
    running_builds: Option<u32>,
    load: Option<(f64, f64, f64)>,
    pressure: Option<[Option<f64>; 5]>,
    available_memory_bytes: Option<u64>,
    store: Option<Disk>,
    build_dir: Option<Disk>,
}

#[derive(Debug, Arbitrary)]
struct Acquire {
    system: String,
    required_features: Vec<String>,
    drv_path: String,
    client_id: String,
    can_build_locally: bool,
    exclude_hosts: Vec<String>,
}

#[derive(Debug, Arbitrary)]
enum Input {
    /// Raw protobuf bytes of one message kind, as the network delivers them.
    Wire(u8, Vec<u8>),
    Register(Register),
    Report(Report),
    Acquire(Acquire),
    KeepAlive(String),
    Release(String, i32),
    Explain(String, Vec<String>),
    AdminHostId(String),
    /// A `ListWaiting` page: its size and token, the token free text or made of three
    /// parts as the scheduler makes them (so that the accepting path is reached).
    WaitingPage(u32, String, Option<(String, String, String)>),
}

fn disk(d: Disk) -> proto::DiskSpace {
    proto::DiskSpace {
        free_bytes: d.free_bytes,
        total_bytes: d.total_bytes,
    }
}

/// A refusal must be an `InvalidArgument` naming a field.
fn refused(e: Error) {
    match &e {
        Error::InvalidArgument { field, .. } => assert!(!field.is_empty()),
        other => panic!("not an InvalidArgument: {other:?}"),
    }
    let _ = e.to_string();
}

fn check_register(r: proto::Register) {
    let max_jobs = r.max_jobs;
    let spec = match HostSpec::try_from(r) {
        Ok(spec) => spec,
        Err(e) => return refused(e),
    };
    assert_eq!(spec.max_jobs, max_jobs);
    assert!((1..=1024).contains(&spec.max_jobs));
    assert!(spec.speed_factor.is_finite() && spec.speed_factor > 0.0);
    assert!(!spec.systems.is_empty() && spec.systems.len() <= 16);
    assert!(spec.systems.iter().all(|s| !s.is_builtin()));
    assert!(spec.store_uri.starts_with("ssh://") || spec.store_uri.starts_with("ssh-ng://"));
    assert_eq!(
        spec.public_key.split(' ').count(),
        2,
        "{:?}",
        spec.public_key
    );
    // What the scheduler accepts, the hook must be able to use: the grant of this host
    // converts on the hook's side and Nix reads its machines line as this very host.
    let granted = proto::Granted::from(Grant {
        lease_id: LeaseId::new("0123456789abcdef-1"),
        host: spec.clone(),
        ttl: std::time::Duration::from_secs(60),
        slots_used: 1,
        slots_total: spec.max_jobs,
        attached: false,
    });
    let grant = nixdispatch::hook::machine::Grant::try_from(granted)
        .unwrap_or_else(|e| panic!("the hook refuses a host the scheduler accepted: {e}"));
    assert_eq!(grant.store_uri, spec.store_uri);
    nixdispatch_fuzz::check_machines_line(&grant, None);
}

fn check_report(r: proto::Report) {
    let report = match HostReport::try_from(r) {
        Ok(report) => report,
        Err(e) => return refused(e),
    };
    assert!(report.running_builds.is_none_or(|n| n <= 100_000));
    if let Some(l) = report.load {
        for v in [l.load1, l.load5, l.load15] {
            assert!(v.is_finite() && v >= 0.0);
        }
    }
    if let Some(p) = report.pressure {
        for v in [
            p.cpu_some,
            p.memory_some,
            p.memory_full,
            p.io_some,
            p.io_full,
        ]
        .into_iter()
        .flatten()
        {
            assert!((0.0..=100.0).contains(&v));
        }
    }
    for d in [report.store, report.build_dir].into_iter().flatten() {
        assert!(d.total_bytes > 0 && d.free_bytes <= d.total_bytes);
        assert!((0.0..=100.0).contains(&d.free_percent()));
    }
}

fn check_acquire(r: proto::AcquireRequest) {
    let req = match LeaseRequest::try_from(r) {
        Ok(req) => req,
        Err(e) => return refused(e),
    };
    assert!(req.drv_path.starts_with('/') && req.drv_path.ends_with(".drv"));
    assert!(req.drv_path.len() <= 4096 && !req.drv_path.chars().any(char::is_control));
    let client = req.client.as_str();
    assert!(!client.is_empty() && client.len() <= 128);
    assert!(client.chars().all(|c| c.is_ascii_graphic()));
    assert!(req.exclude_hosts.len() <= 64 && req.required_features.len() <= 64);
    assert!(!req.system.as_str().is_empty());
}

fn check_lease_id(id: &LeaseId) {
    let s = id.as_str();
    assert!(!s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_graphic()));
}

fn wire(kind: u8, bytes: &[u8]) {
    match kind % 6 {
        0 => {
            if let Ok(m) = proto::Register::decode(bytes) {
                check_register(m);
            }
        }
        1 => {
            if let Ok(m) = proto::Report::decode(bytes) {
                check_report(m);
            }
        }
        2 => {
            if let Ok(m) = proto::AcquireRequest::decode(bytes) {
                check_acquire(m);
            }
        }
        3 => {
            if let Ok(m) = proto::KeepAliveRequest::decode(bytes) {
                match fuzzing::keep_alive(&m) {
                    Ok(id) => check_lease_id(&id),
                    Err(e) => refused(e),
                }
            }
        }
        4 => {
            if let Ok(m) = proto::ReleaseRequest::decode(bytes) {
                match fuzzing::release(&m) {
                    Ok((id, _)) => check_lease_id(&id),
                    Err(e) => refused(e),
                }
            }
        }
        _ => {
            if let Ok(m) = proto::ExplainPlacementRequest::decode(bytes)
                && let Err(e) = fuzzing::explain(&m)
            {
                refused(e);
            }
        }
    }
}

fuzz_target!(|input: Input| {
    match input {
        Input::Wire(kind, bytes) => wire(kind, &bytes),
        Input::Register(r) => check_register(proto::Register {
            host_id: r.host_id,
            store_uri: r.store_uri,
            host_public_key: r.key.line(),
            systems: r.systems,
            supported_features: r.supported_features,
            mandatory_features: r.mandatory_features,
            max_jobs: r.max_jobs,
            speed_factor: r.speed_factor,
            cpu_count: r.cpu_count,
            total_memory_bytes: r.total_memory_bytes,
            agent_version: r.agent_version,
        }),
        Input::Report(r) => check_report(proto::Report {
            running_builds: r.running_builds,
            load: r.load.map(|(load1, load5, load15)| proto::LoadAverage {
                load1,
                load5,
                load15,
            }),
            pressure: r.pressure.map(|p| proto::Pressure {
                cpu_some_avg10: p[0],
                memory_some_avg10: p[1],
                memory_full_avg10: p[2],
                io_some_avg10: p[3],
                io_full_avg10: p[4],
            }),
            available_memory_bytes: r.available_memory_bytes,
            store: r.store.map(disk),
            build_dir: r.build_dir.map(disk),
        }),
        Input::Acquire(a) => check_acquire(proto::AcquireRequest {
            system: a.system,
            required_features: a.required_features,
            drv_path: a.drv_path,
            client_id: a.client_id,
            can_build_locally: a.can_build_locally,
            exclude_hosts: a.exclude_hosts,
            ..Default::default()
        }),
        Input::KeepAlive(lease_id) => {
            match fuzzing::keep_alive(&proto::KeepAliveRequest {
                lease_id,
                ..Default::default()
            }) {
                Ok(id) => check_lease_id(&id),
                Err(e) => refused(e),
            }
        }
        Input::Release(lease_id, outcome) => {
            let r = proto::ReleaseRequest {
                lease_id,
                outcome,
                duration_millis: 0,
            };
            match fuzzing::release(&r) {
                Ok((id, _)) => check_lease_id(&id),
                Err(e) => refused(e),
            }
        }
        Input::Explain(system, required_features) => {
            let r = proto::ExplainPlacementRequest {
                system,
                required_features,
            };
            if let Err(e) = fuzzing::explain(&r) {
                refused(e);
            }
        }
        Input::WaitingPage(page_size, text, parts) => {
            let page_token = match parts {
                Some((client, system, drv)) => base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(format!("{client}\0{system}\0{drv}")),
                None => text,
            };
            match fuzzing::waiting_page(&proto::ListWaitingRequest {
                page_size,
                page_token: page_token.clone(),
            }) {
                Ok((size, cursor)) => {
                    assert!((1..=1000).contains(&size));
                    // A token that reads back as a cursor is the one that cursor makes.
                    if let Some(c) = cursor {
                        assert_eq!(fuzzing::waiting_token(&c), page_token);
                    }
                }
                Err(e) => refused(e),
            }
        }
        Input::AdminHostId(id) => {
            if let Err(e) = fuzzing::admin_host_id(&id) {
                refused(e);
            }
        }
    }
});
