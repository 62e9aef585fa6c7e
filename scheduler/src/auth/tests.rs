//! The rules of `auth`, without a server (the gRPC paths are in `tests/trust.rs`).

use std::collections::BTreeSet;

use tonic::service::Interceptor;

use super::*;
use crate::core::System;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHdzrOYYsx97jgJC4raQrLvbWQfJI3Wj8wIeg0F7/qlv root@b";

fn config() -> AuthConfig {
    let entry = |name: &str, token: &str| PrincipalEntry {
        name: name.into(),
        token_sha256: digest_of(token).to_hex(),
    };
    AuthConfig {
        members: vec![entry("alice", "a-token"), entry("bob", "b-token")],
        operators: vec![entry("ops", "o-token")],
        hosts: vec![HostEntry {
            id: "build01".into(),
            store_uri: "ssh-ng://build01".into(),
            public_key: KEY.into(),
            token_sha256: digest_of("h-token").to_hex(),
        }],
        ..AuthConfig::default()
    }
}

fn spec(id: &str, uri: &str) -> HostSpec {
    HostSpec {
        id: HostId::new(id),
        store_uri: uri.into(),
        public_key: KEY.rsplit_once(' ').unwrap().0.into(),
        systems: BTreeSet::from([System::new("x86_64-linux")]),
        supported_features: BTreeSet::new(),
        mandatory_features: BTreeSet::new(),
        max_jobs: 1,
        speed_factor: 1.0,
        cpu_count: 0,
        total_memory_bytes: 0,
        agent_version: String::new(),
    }
}

fn caller(a: &Arc<Authority>, token: Option<&str>) -> Result<Caller, tonic::Status> {
    let mut req = Request::new(());
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let req = Authenticator::new(a.clone()).call(req)?;
    Ok(Caller::of(&req).unwrap())
}

/// Tokens map to their identities; a missing or unknown token is unauthenticated.
#[test]
fn tokens_become_identities() {
    let a = Arc::new(Authority::new(Some(&config()), vec![]).unwrap());
    let member = |n: &str| Identity::Member(ClientId::new(n));
    assert_eq!(
        caller(&a, Some("a-token")).unwrap().identity,
        member("alice")
    );
    assert_eq!(
        caller(&a, Some("o-token")).unwrap().identity,
        Identity::Operator("ops".into())
    );
    assert_eq!(
        caller(&a, Some("h-token")).unwrap().identity,
        Identity::Host(HostId::new("build01"))
    );
    for bad in [None, Some("nope"), Some("")] {
        let e = caller(&a, bad).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
    }
}

/// Without `[auth]` everyone is the open caller, token or not.
#[test]
fn open_mode_lets_everyone_in() {
    let a = Arc::new(Authority::new(None, vec![]).unwrap());
    assert_eq!(caller(&a, None).unwrap().identity, Identity::Open);
    assert_eq!(caller(&a, Some("x")).unwrap().identity, Identity::Open);
    assert!(
        a.check_registration(
            &Caller {
                identity: Identity::Open
            },
            &spec("any", "ssh://x")
        )
        .is_ok()
    );
}

/// A member acquires as itself: its label may be anything but another member's name.
#[test]
fn client_id_is_only_a_label() {
    let a = Authority::new(Some(&config()), vec![]).unwrap();
    let alice = Caller {
        identity: Identity::Member(ClientId::new("alice")),
    };
    let m = |l: &str| a.member(&alice, &ClientId::new(l));
    assert_eq!(m("alice").unwrap(), ClientId::new("alice"));
    assert_eq!(m("alice-laptop").unwrap(), ClientId::new("alice"));
    assert!(matches!(m("bob"), Err(Error::PermissionDenied { .. })));
    let ops = Caller {
        identity: Identity::Operator("ops".into()),
    };
    assert!(a.member(&ops, &ClientId::new("ops")).is_err());
}

/// Only the provisioned host's own token registers it, and only with its URI and key.
#[test]
fn registration_is_held_to_the_provisioned_entry() {
    let a = Authority::new(Some(&config()), vec![]).unwrap();
    let host = Caller {
        identity: Identity::Host(HostId::new("build01")),
    };
    a.check_registration(&host, &spec("build01", "ssh-ng://build01"))
        .unwrap();
    assert!(matches!(
        a.check_registration(&host, &spec("build01", "ssh-ng://attacker.example")),
        Err(Error::NotProvisioned { .. })
    ));
    let mut other_key = spec("build01", "ssh-ng://build01");
    other_key.public_key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherKeyOtherKeyOtherKeyOtherKeyOtherKe".into();
    assert!(matches!(
        a.check_registration(&host, &other_key),
        Err(Error::NotProvisioned { .. })
    ));
    assert!(matches!(
        a.check_registration(&host, &spec("build02", "ssh-ng://build01")),
        Err(Error::PermissionDenied { .. })
    ));
    let alice = Caller {
        identity: Identity::Member(ClientId::new("alice")),
    };
    assert!(matches!(
        a.check_registration(&alice, &spec("build01", "ssh-ng://build01")),
        Err(Error::PermissionDenied { .. })
    ));
}

/// A gate may name members only for its own host.
#[test]
fn gates_act_only_for_their_own_host() {
    let gate = Caller {
        identity: Identity::Host(HostId::new("build01")),
    };
    let alice = ClientId::new("alice");
    assert!(gate.member_on_host(&HostId::new("build01"), &alice).is_ok());
    assert!(
        gate.member_on_host(&HostId::new("build02"), &alice)
            .is_err()
    );
}

/// Tokens in the configuration must be digests, names valid, nothing given twice.
#[test]
fn config_is_validated() {
    let mut c = config();
    c.members[0].token_sha256 = "a-token".into();
    assert!(
        c.validate()
            .unwrap_err()
            .to_string()
            .contains("token_sha256")
    );
    let mut c = config();
    c.members[1].token_sha256 = c.members[0].token_sha256.clone();
    assert!(c.validate().is_err());
    let mut c = config();
    c.members[1].name = "-x".into();
    assert!(c.validate().is_err());
    let mut c = config();
    c.hosts[0].store_uri = "ssh-ng://b?remote-program=evil".into();
    assert!(c.validate().unwrap_err().to_string().contains("store_uri"));
}
