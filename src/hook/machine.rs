//! A granted lease as a domain type, and its rendering as one line of Nix's machines format.
//!
//! The machines line (`src/libstore/machines.cc`) is whitespace-separated, `-` for a default:
//! store URI, comma-separated systems, SSH identity file, max jobs, speed factor, supported
//! features, mandatory features, base64 of the host's OpenSSH public key line. Nix 2.8 parses
//! the speed factor as an unsigned integer, so it is rounded up here (never to 0).

use base64::Engine as _;

use crate::proto;

/// A lease the scheduler granted, validated once at the boundary.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// The lease id, for `KeepAlive` and `Release`.
    pub lease_id: String,
    /// The chosen host's id.
    pub host_id: String,
    /// The store URI, e.g. `ssh-ng://builder1`.
    pub store_uri: String,
    /// Systems the host builds.
    pub systems: Vec<String>,
    /// The host's build slots.
    pub max_jobs: u32,
    /// Relative speed of one slot.
    pub speed_factor: f64,
    /// Features the host supports.
    pub supported_features: Vec<String>,
    /// Features the host requires.
    pub mandatory_features: Vec<String>,
    /// Base64 of the host's OpenSSH public key line; pinned through the machines line.
    pub host_public_key_base64: String,
    /// The lease expires this long after a grant or keep-alive.
    pub lease_ttl: std::time::Duration,
    /// Slots in use on the host, this lease included.
    pub slots_used: u32,
    /// Slots of the host.
    pub slots_total: u32,
}

/// Why a grant cannot be turned into a machines line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// A field that must be set is empty.
    #[error("the grant has an empty `{0}`")]
    Empty(&'static str),
    /// A field holds whitespace, a `;` or a `,` where the machines line cannot carry it.
    #[error("the grant's `{field}` cannot be put in a machines line: {value:?}")]
    Unrepresentable {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
    },
    /// The store URI breaks the protocol's rules (`crate::validate::store_uri`).
    #[error("the grant's store URI is unusable: {0}")]
    BadStoreUri(String),
    /// The host key is not base64 of an OpenSSH public key line.
    #[error("the grant's host key is not base64 of an OpenSSH public key line")]
    BadHostKey,
}

/// Whether `c` ends a field (whitespace), a line (`;`) or all that follows (`#` starts a
/// comment) when Nix reads a machines line.
pub(crate) fn breaks_machines_line(c: char) -> bool {
    c.is_whitespace() || c == ';' || c == '#'
}

/// A machines-line field must be one non-empty word without the separators of the format,
/// and not `-`, which Nix reads as "unset" (a system `-` would become Nix's own system).
fn check_word(field: &'static str, value: &str, allow_comma: bool) -> Result<(), GrantError> {
    if value.is_empty() {
        return Err(GrantError::Empty(field));
    }
    if value == "-"
        || value
            .chars()
            .any(|c| breaks_machines_line(c) || (!allow_comma && c == ','))
    {
        return Err(GrantError::Unrepresentable {
            field,
            value: value.to_owned(),
        });
    }
    Ok(())
}

impl TryFrom<proto::Granted> for Grant {
    type Error = GrantError;

    fn try_from(g: proto::Granted) -> Result<Self, GrantError> {
        check_word("lease_id", &g.lease_id, true)?;
        check_word("store_uri", &g.store_uri, true)?;
        // A line that starts with `@` makes Nix read the machines file it names.
        if g.store_uri.starts_with('@') {
            return Err(GrantError::Unrepresentable {
                field: "store_uri",
                value: g.store_uri,
            });
        }
        if g.systems.is_empty() {
            return Err(GrantError::Empty("systems"));
        }
        for s in &g.systems {
            check_word("systems", s, false)?;
        }
        for f in g.supported_features.iter().chain(&g.mandatory_features) {
            check_word("features", f, false)?;
        }
        check_word("host_public_key_base64", &g.host_public_key_base64, false)?;
        // The scheduler's own rules (`crate::validate`): what it accepts, the hook can use,
        // and what it should never have accepted (`;`, a leading `-`, `remote-program`)
        // never reaches a machines line.
        crate::validate::store_uri(&g.store_uri).map_err(|e| GrantError::BadStoreUri(e.0))?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(&g.host_public_key_base64)
            .map_err(|_| GrantError::BadHostKey)?;
        let key = String::from_utf8(key).map_err(|_| GrantError::BadHostKey)?;
        crate::validate::host_key(&key).map_err(|_| GrantError::BadHostKey)?;
        Ok(Grant {
            host_id: if g.host_id.is_empty() {
                g.store_uri.clone()
            } else {
                g.host_id
            },
            lease_id: g.lease_id,
            store_uri: g.store_uri,
            systems: g.systems,
            max_jobs: g.max_jobs.max(1),
            speed_factor: g.speed_factor,
            supported_features: g.supported_features,
            mandatory_features: g.mandatory_features,
            host_public_key_base64: g.host_public_key_base64,
            lease_ttl: std::time::Duration::from_millis(g.lease_ttl_millis),
            slots_used: g.slots_used,
            slots_total: g.slots_total,
        })
    }
}

/// A builder this member may be sent to, as `ListBuilders` gives it: enough to connect to
/// it ahead of a grant (the hook's SSH masters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuilderAddress {
    /// The host's id.
    pub host_id: String,
    /// The store URI, e.g. `ssh-ng://builder1`.
    pub store_uri: String,
    /// Base64 of the host's OpenSSH public key line: the only key to accept from it.
    pub host_public_key_base64: String,
}

impl BuilderAddress {
    /// The builder if it can build `system` with `features` (Nix's rule: it supports every
    /// required feature and each of its mandatory features is required; `builtin` fits any
    /// host) and its URI and key pass the protocol's rules; `None` otherwise.
    pub fn fitting(b: proto::Builder, system: &str, features: &[String]) -> Option<Self> {
        let system_ok = system == "builtin" || b.systems.iter().any(|s| s == system);
        let supports =
            |f: &String| b.supported_features.contains(f) || b.mandatory_features.contains(f);
        let features_ok = features.iter().all(supports)
            && b.mandatory_features.iter().all(|m| features.contains(m));
        if !system_ok || !features_ok {
            return None;
        }
        crate::validate::store_uri(&b.store_uri).ok()?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(&b.host_public_key_base64)
            .ok()?;
        crate::validate::host_key(&String::from_utf8(key).ok()?).ok()?;
        Some(BuilderAddress {
            host_id: b.host_id,
            store_uri: b.store_uri,
            host_public_key_base64: b.host_public_key_base64,
        })
    }
}

/// Nix 2.8 wants an unsigned integer speed factor: round up, and never below 1 (a 0 would
/// make Nix divide by zero when it compares machines).
pub fn speed_factor_field(speed: f64) -> u64 {
    if !speed.is_finite() || speed <= 1.0 {
        return 1;
    }
    // `as` saturates for huge values, which is the best a u64 field can do.
    speed.ceil() as u64
}

fn list_field(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

impl Grant {
    /// The machines line naming only this host, as the stock build-remote reads it.
    /// `ssh_identity` is the client's private key file (`-`: ssh's default).
    pub fn machines_line(&self, ssh_identity: Option<&str>) -> String {
        let identity = match ssh_identity {
            // The configuration refuses such paths; this keeps the line intact regardless.
            Some(path) if !path.is_empty() && !path.chars().any(breaks_machines_line) => path,
            _ => "-",
        };
        format!(
            "{} {} {} {} {} {} {} {}",
            self.store_uri,
            self.systems.join(","),
            identity,
            self.max_jobs,
            speed_factor_field(self.speed_factor),
            list_field(&self.supported_features),
            list_field(&self.mandatory_features),
            self.host_public_key_base64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key_b64() -> String {
        base64::engine::general_purpose::STANDARD
            .encode("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample root@b1\n")
    }

    fn granted() -> proto::Granted {
        proto::Granted {
            lease_id: "l1".into(),
            host_id: "b1".into(),
            store_uri: "ssh-ng://builder1".into(),
            systems: vec!["x86_64-linux".into(), "i686-linux".into()],
            max_jobs: 4,
            speed_factor: 1.5,
            supported_features: vec!["kvm".into(), "big-parallel".into()],
            mandatory_features: vec![],
            host_public_key_base64: key_b64(),
            lease_ttl_millis: 60_000,
            slots_used: 1,
            slots_total: 4,
            attached: false,
        }
    }

    /// A listed builder is connected to ahead only when it could take the build (Nix's
    /// system and feature rules) and its URI and key are usable.
    #[test]
    fn builders_that_fit_a_build() {
        let b = |systems: &[&str], supported: &[&str], mandatory: &[&str]| proto::Builder {
            host_id: "b1".into(),
            store_uri: "ssh-ng://builder1".into(),
            systems: systems.iter().map(|s| (*s).to_owned()).collect(),
            supported_features: supported.iter().map(|s| (*s).to_owned()).collect(),
            mandatory_features: mandatory.iter().map(|s| (*s).to_owned()).collect(),
            host_public_key_base64: key_b64(),
            unavailable_reason: String::new(),
        };
        let kvm = vec!["kvm".to_owned()];
        let fits = |b: proto::Builder, system: &str, features: &[String]| {
            BuilderAddress::fitting(b, system, features).is_some()
        };
        assert!(fits(b(&["x86_64-linux"], &[], &[]), "x86_64-linux", &[]));
        assert!(fits(b(&["aarch64-linux"], &[], &[]), "builtin", &[]));
        assert!(!fits(b(&["aarch64-linux"], &[], &[]), "x86_64-linux", &[]));
        assert!(fits(
            b(&["x86_64-linux"], &["kvm"], &[]),
            "x86_64-linux",
            &kvm
        ));
        assert!(fits(
            b(&["x86_64-linux"], &[], &["kvm"]),
            "x86_64-linux",
            &kvm
        ));
        assert!(!fits(b(&["x86_64-linux"], &[], &[]), "x86_64-linux", &kvm));
        assert!(!fits(
            b(&["x86_64-linux"], &[], &["kvm"]),
            "x86_64-linux",
            &[]
        ));
        let mut bad = b(&["x86_64-linux"], &[], &[]);
        bad.store_uri = "ssh://-oProxyCommand=x".into();
        assert!(!fits(bad, "x86_64-linux", &[]));
        let mut bad = b(&["x86_64-linux"], &[], &[]);
        bad.host_public_key_base64 = "not base64!".into();
        assert!(!fits(bad, "x86_64-linux", &[]));
    }

    /// A full grant renders all eight fields, the speed factor rounded up.
    #[test]
    fn renders_eight_fields() {
        let g = Grant::try_from(granted()).unwrap();
        assert_eq!(
            g.machines_line(Some("/root/.ssh/id")),
            format!(
                "ssh-ng://builder1 x86_64-linux,i686-linux /root/.ssh/id 4 2 kvm,big-parallel - {}",
                key_b64()
            )
        );
        assert_eq!(g.machines_line(None).split(' ').nth(2), Some("-"));
    }

    /// Grants that cannot be written safely into a machines line are refused.
    #[test]
    fn refuses_unrepresentable_grants() {
        let mut g = granted();
        g.store_uri = "ssh://a b".into();
        assert!(Grant::try_from(g).is_err());
        let mut g = granted();
        g.host_public_key_base64 = "not-base64!".into();
        assert_eq!(Grant::try_from(g), Err(GrantError::BadHostKey));
        let mut g = granted();
        g.host_public_key_base64 = String::new();
        assert!(Grant::try_from(g).is_err());
        let mut g = granted();
        g.systems.clear();
        assert_eq!(Grant::try_from(g), Err(GrantError::Empty("systems")));
        let mut g = granted();
        g.supported_features = vec!["a,b".into()];
        assert!(Grant::try_from(g).is_err());
    }

    /// A grant the scheduler should never have made (a store URI with `;`, a leading `-` or
    /// `remote-program`) is refused by the same rule the scheduler applies.
    #[test]
    fn refuses_hostile_store_uris() {
        for uri in [
            "ssh-ng://b;x",
            "ssh://-oProxyCommand=x",
            "ssh-ng://b?remote-program=/tmp/evil",
        ] {
            let mut g = granted();
            g.store_uri = uri.into();
            assert!(
                matches!(
                    Grant::try_from(g),
                    Err(GrantError::BadStoreUri(_)) | Err(GrantError::Unrepresentable { .. })
                ),
                "{uri}"
            );
        }
    }

    /// Nix must read a machines line back as the granted host (the `hook_machine` fuzz
    /// target's property; it found the identity with `;`): a `#` (Nix cuts the line there),
    /// a field that is just `-` (Nix reads "unset"), a store URI starting with `@` (Nix reads
    /// that file) and an SSH identity with `;` (Nix starts a new machine there) changed which
    /// host Nix saw or dropped its pinned key; such grants are refused and such an identity
    /// is left out of the line.
    #[test]
    fn refuses_what_nix_would_read_differently() {
        type Spoil = Box<dyn Fn(&mut proto::Granted)>;
        let bad: [(&str, Spoil); 5] = [
            ("store_uri", Box::new(|g| g.store_uri = "ssh://b1#x".into())),
            (
                "store_uri",
                Box::new(|g| g.store_uri = "@/etc/nix/machines".into()),
            ),
            ("systems", Box::new(|g| g.systems = vec!["-".into()])),
            (
                "features",
                Box::new(|g| g.supported_features = vec!["-".into()]),
            ),
            (
                "features",
                Box::new(|g| g.mandatory_features = vec!["k#".into()]),
            ),
        ];
        for (field, spoil) in bad {
            let mut g = granted();
            spoil(&mut g);
            assert!(
                matches!(Grant::try_from(g), Err(GrantError::Unrepresentable { field: f, .. }) if f == field),
                "{field}"
            );
        }
        let g = Grant::try_from(granted()).unwrap();
        for identity in ["/k;ssh://evil", "/k#1"] {
            assert_eq!(g.machines_line(Some(identity)).split(' ').nth(2), Some("-"));
        }
    }

    proptest! {
        /// The speed factor field is an integer of at least 1 and at least the factor.
        #[test]
        fn speed_factor_rounds_up(speed in any::<f64>()) {
            let f = speed_factor_field(speed);
            prop_assert!(f >= 1);
            if speed.is_finite() && speed > 0.0 && speed < 1e15 {
                prop_assert!(f as f64 >= speed);
                prop_assert!((f as f64) < speed.max(1.0) + 1.0);
            }
        }

        /// A valid grant always renders exactly eight whitespace-free fields.
        #[test]
        fn always_eight_fields(
            systems in proptest::collection::vec("[a-z0-9_][a-z0-9_-]{0,11}", 1..4),
            feats in proptest::collection::vec("[a-z0-9][a-z0-9-]{0,11}", 0..4),
            max_jobs in any::<u32>(),
            speed in any::<f64>(),
        ) {
            let mut g = granted();
            g.systems = systems;
            g.supported_features = feats;
            g.max_jobs = max_jobs;
            g.speed_factor = speed;
            let line = Grant::try_from(g).unwrap().machines_line(Some("/k"));
            prop_assert_eq!(line.split(' ').count(), 8);
            prop_assert!(!line.contains('\n') && !line.contains(';'));
        }
    }
}
