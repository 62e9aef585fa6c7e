//! `[auth]`: members, operators and provisioned builders, each with the SHA-256 of its
//! token (never the token). The per-member caps are the queue's (`[queue]`).
//!
//! ```toml
//! [auth]
//! open_reads = false
//! [[auth.members]]
//! name = "alice"
//! token_sha256 = "…"        # printf %s "$(cat alice.token)" | sha256sum
//! [[auth.operators]]
//! name = "ops"
//! token_sha256 = "…"
//! [[auth.hosts]]
//! id = "build01"
//! store_uri = "ssh-ng://nix@build01.nix-community.org"
//! public_key = "ssh-ed25519 AAAA…"
//! token_sha256 = "…"
//! ```

use serde::Deserialize;

use super::Digest;
use crate::Error;
use crate::core::{HostId, HostSpec};

/// The whole `[auth]` section. Absent: the open mode (see the module `crate::auth`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether members may call the read-only admin RPCs (`ListHosts`, `GetCapacity`,
    /// `ExplainPlacement`). Default `false`: which builders exist and how loaded they are is
    /// operators' business unless the community decides otherwise. `ListLeases` and
    /// `ListWaiting` are always open to members, showing only their own leases and waiting
    /// requests.
    pub open_reads: bool,
    /// Deprecated (`[auth.limits]`): see [`IdentityLimits`].
    pub limits: IdentityLimits,
    /// Members: `[[auth.members]]`, one per person. Default: none.
    pub members: Vec<PrincipalEntry>,
    /// Operators: `[[auth.operators]]`. Default: none (then nobody may drain or provision
    /// through the API).
    pub operators: Vec<PrincipalEntry>,
    /// Builders provisioned in the configuration: `[[auth.hosts]]`. Default: none (then
    /// builders come from operators through `ProvisionHost`).
    pub hosts: Vec<HostEntry>,
}

/// `[auth.limits]`: deprecated; the per-member caps are the queue's.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityLimits {
    /// Deprecated alias of `queue.default_member_max_slots` (the one per-member cap on live
    /// leases), read when that is left out and logged as a warning at start; both set to
    /// different values is an error. Default: none.
    pub max_live_leases_per_member: Option<usize>,
}

/// A member or an operator.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalEntry {
    /// The name leases are held under and logs show (letters, digits, `._-`).
    pub name: String,
    /// SHA-256 of the token, 64 hex digits.
    pub token_sha256: String,
}

impl PrincipalEntry {
    pub(super) fn digest(&self) -> Result<Digest, Error> {
        parse_digest(
            &format!("auth.*.{}.token_sha256", self.name),
            &self.token_sha256,
        )
    }
}

/// A provisioned builder: what its agent must register, and its token's digest.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    /// The host id its agent registers with.
    pub id: String,
    /// The store URI members' Nix will use (the shared rule of `nixdispatch::validate`).
    pub store_uri: String,
    /// The host's SSH public key line, pinned by every member (`ssh-keyscan`, or
    /// `/etc/ssh/ssh_host_ed25519_key.pub`).
    pub public_key: String,
    /// SHA-256 of the agent's token, 64 hex digits.
    pub token_sha256: String,
}

impl HostEntry {
    /// Validates every field; the error names `auth.hosts.<id>.<field>`.
    pub fn validate(&self) -> Result<(), Error> {
        let key = |f: &str| format!("auth.hosts.{}.{f}", self.id);
        let bad = |k: String, e: nixdispatch::validate::Invalid| Error::Config {
            key: k,
            reason: e.0,
        };
        nixdispatch::validate::host_id(&self.id).map_err(|e| bad(key("id"), e))?;
        nixdispatch::validate::store_uri(&self.store_uri).map_err(|e| bad(key("store_uri"), e))?;
        nixdispatch::validate::host_key(&self.public_key).map_err(|e| bad(key("public_key"), e))?;
        parse_digest(&key("token_sha256"), &self.token_sha256)?;
        Ok(())
    }

    /// The host id.
    pub fn host_id(&self) -> HostId {
        HostId::new(&self.id)
    }

    /// The digest of its token.
    pub(super) fn digest(&self) -> Result<Digest, Error> {
        parse_digest(
            &format!("auth.hosts.{}.token_sha256", self.id),
            &self.token_sha256,
        )
    }

    /// The key without its comment, as registrations are compared.
    pub(super) fn normalized_key(&self) -> String {
        nixdispatch::validate::host_key(&self.public_key).unwrap_or_default()
    }

    /// Refuses a registration whose store URI or host key differs from this entry.
    pub(super) fn matches(&self, spec: &HostSpec) -> Result<(), Error> {
        if spec.store_uri != self.store_uri {
            return Err(Error::NotProvisioned {
                host_id: self.id.clone(),
                reason: format!(
                    "store URI `{}` is not the provisioned `{}`",
                    spec.store_uri, self.store_uri
                ),
            });
        }
        if spec.public_key != self.normalized_key() {
            return Err(Error::NotProvisioned {
                host_id: self.id.clone(),
                reason: "the host key is not the provisioned one".into(),
            });
        }
        Ok(())
    }
}

fn parse_digest(key: &str, hex: &str) -> Result<Digest, Error> {
    Digest::from_hex(hex).ok_or_else(|| Error::Config {
        key: key.into(),
        reason: "must be the SHA-256 of the token, 64 hex digits (`printf %s \"$(cat FILE)\" | \
                 sha256sum`), never the token itself"
            .into(),
    })
}

impl AuthConfig {
    /// Checks names, digests, provisioned hosts, and that no name or token is used twice.
    pub fn validate(&self) -> Result<(), Error> {
        let mut names = std::collections::HashSet::new();
        let mut digests = std::collections::HashSet::new();
        for (kind, list) in [("members", &self.members), ("operators", &self.operators)] {
            for p in list {
                nixdispatch::validate::principal_name(&p.name).map_err(|e| Error::Config {
                    key: format!("auth.{kind}.name"),
                    reason: format!("`{}` {}", p.name, e.0),
                })?;
                if kind == "members" && !names.insert(p.name.clone()) {
                    return Err(Error::Config {
                        key: format!("auth.{kind}.name"),
                        reason: format!("`{}` is listed twice", p.name),
                    });
                }
                if !digests.insert(p.digest()?) {
                    return Err(Error::Config {
                        key: format!("auth.{kind}.{}.token_sha256", p.name),
                        reason: "the same token is given to two identities".into(),
                    });
                }
            }
        }
        let mut ids = std::collections::HashSet::new();
        for h in &self.hosts {
            h.validate()?;
            if !ids.insert(h.id.clone()) {
                return Err(Error::Config {
                    key: "auth.hosts.id".into(),
                    reason: format!("`{}` is listed twice", h.id),
                });
            }
            if !digests.insert(h.digest()?) {
                return Err(Error::Config {
                    key: format!("auth.hosts.{}.token_sha256", h.id),
                    reason: "the same token is given to two identities".into(),
                });
            }
        }
        if self.limits.max_live_leases_per_member == Some(0) {
            return Err(Error::Config {
                key: "auth.limits.max_live_leases_per_member".into(),
                reason: "must be greater than 0".into(),
            });
        }
        Ok(())
    }
}
