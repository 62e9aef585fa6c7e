//! Who is calling, and what they may do.
//!
//! Every call to the lease, agent and admin services passes the [`Authenticator`] first: it
//! reads the `authorization: Bearer <token>` header, hashes the token with SHA-256 and looks
//! the digest up among the credentials the configuration (and, for builders, the operator
//! state) holds. The result is a [`Caller`] in the request's extensions, which handlers take
//! with [`Caller::of`] and ask one question each ([`Authority::member`],
//! [`Caller::require_operator`], [`Authority::check_registration`], …). Handlers never look
//! at headers themselves, and nothing here logs a token: only digests are kept, and only
//! identities are named in errors and logs.
//!
//! Three kinds of identity, one token each:
//! - a **member** (a person of the community builders, one token per member, shared by the
//!   member's machines): may acquire leases, and keep alive, release and see only its own;
//! - an **operator**: may drain, undrain and provision, and read everything;
//! - a **host** (a builder's agent, one token per builder): may open the agent session of its
//!   own host id only, with the store URI and host key operators provisioned for it.
//!
//! With no `[auth]` section the scheduler runs **open**: every caller is [`Identity::Open`],
//! may do everything, and `client_id` is taken at its word. That is the quick start on
//! loopback; the server refuses to start open on any other address.

pub mod config;
mod hosts;
mod token;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use tonic::Request;
use tonic::service::Interceptor;

pub use config::{AuthConfig, HostEntry, PrincipalEntry};
pub use hosts::Provisioned;
pub use token::{Digest, digest_of};

use crate::Error;
use crate::core::{ClientId, HostId, HostSpec};

/// Who a call comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// No `[auth]` configured: anyone on loopback, trusted with everything.
    Open,
    /// A member, by name; its leases are held under this name.
    Member(ClientId),
    /// An operator, by name.
    Operator(String),
    /// The agent of this builder.
    Host(HostId),
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Open => f.write_str("anyone (no [auth] configured)"),
            Identity::Member(m) => write!(f, "member {m}"),
            Identity::Operator(o) => write!(f, "operator {o}"),
            Identity::Host(h) => write!(f, "host {h}"),
        }
    }
}

/// The authenticated caller of one request, put into its extensions by [`Authenticator`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Who.
    pub identity: Identity,
}

impl Caller {
    /// The caller of `request`. A request that did not pass the [`Authenticator`] has none,
    /// and is refused as unauthenticated rather than trusted.
    pub fn of<T>(request: &Request<T>) -> Result<Caller, Error> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Error::Unauthenticated {
                reason: "the call did not pass authentication".into(),
            })
    }

    fn denied(&self, action: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::PermissionDenied {
            identity: self.identity.to_string(),
            action: action.into(),
            reason: reason.into(),
        }
    }

    /// Whether this caller may do everything (operators, and anyone in the open mode).
    pub fn is_operator(&self) -> bool {
        matches!(self.identity, Identity::Operator(_) | Identity::Open)
    }

    /// Refuses anyone but an operator (or the open mode) to `action`.
    pub fn require_operator(&self, action: &str) -> Result<(), Error> {
        if self.is_operator() {
            Ok(())
        } else {
            Err(self.denied(action, "it needs the operator role"))
        }
    }

    /// Refuses a read-only admin call (`action`) to anyone but an operator, unless the
    /// configuration opens reads to members (`open_reads`).
    pub fn require_reader(&self, open_reads: bool, action: &str) -> Result<(), Error> {
        match &self.identity {
            Identity::Member(_) if open_reads => Ok(()),
            _ => self.require_operator(action),
        }
    }

    /// Whose waiting requests this caller may see (`action` names the call): `None` for
    /// everybody's (operators, open mode), `Some(member)` for its own only, so that no
    /// member ever sees another's derivation paths. Hosts see none (leases:
    /// [`Self::lease_view`]).
    pub fn member_view(&self, action: &str) -> Result<Option<ClientId>, Error> {
        match &self.identity {
            Identity::Member(m) => Ok(Some(m.clone())),
            Identity::Host(_) => Err(self.denied(action, "builders do not read the queue")),
            Identity::Open | Identity::Operator(_) => Ok(None),
        }
    }

    /// Whose leases this caller may list: a member its own, a builder those on its own host
    /// (builds it runs anyway; its agent asks after a restart which member holds a lease
    /// its gate keeps), operators and the open mode everybody's.
    pub fn lease_view(&self) -> LeaseScope {
        match &self.identity {
            Identity::Member(m) => LeaseScope::Member(m.clone()),
            Identity::Host(h) => LeaseScope::Host(h.clone()),
            Identity::Open | Identity::Operator(_) => LeaseScope::Anyone,
        }
    }

    /// Which leases this caller may keep alive or release: a member's own, a builder's
    /// on its own host (its gate's, held for the members it names there), or, in the open
    /// mode, anyone's. Operators hold none.
    pub fn lease_scope(&self, action: &str) -> Result<LeaseScope, Error> {
        match &self.identity {
            Identity::Member(m) => Ok(LeaseScope::Member(m.clone())),
            Identity::Host(h) => Ok(LeaseScope::Host(h.clone())),
            Identity::Open => Ok(LeaseScope::Anyone),
            Identity::Operator(_) => {
                Err(self.denied(action, "only members and builders hold leases"))
            }
        }
    }

    /// Refuses `action` on a lease of host `lease_host` to a builder other than that host.
    pub fn require_lease_host(
        &self,
        on: &HostId,
        lease_host: &HostId,
        action: &str,
    ) -> Result<(), Error> {
        if on == lease_host {
            Ok(())
        } else {
            Err(self.denied(
                format!("{action} on host `{lease_host}`"),
                "a host's credential reaches only the leases on its own host",
            ))
        }
    }

    /// The member whose builders this caller may list: `Some(member)`, or `None` in the
    /// open mode (no members). Operators and hosts are refused: only members are sent to
    /// builders, and operators list the fleet with `ListHosts`.
    pub fn builders_view(&self) -> Result<Option<ClientId>, Error> {
        match &self.identity {
            Identity::Member(m) => Ok(Some(m.clone())),
            Identity::Open => Ok(None),
            Identity::Operator(_) | Identity::Host(_) => Err(self.denied(
                "list a member's builders",
                "only members are sent to builders; use a member's credential \
                 (operators: ListHosts)",
            )),
        }
    }

    /// Refuses an agent session for host `id` unless this caller is that host's agent (or
    /// the open mode).
    pub fn require_host(&self, id: &HostId) -> Result<(), Error> {
        match &self.identity {
            Identity::Open => Ok(()),
            Identity::Host(h) if h == id => Ok(()),
            Identity::Host(_) => Err(self.denied(
                format!("register host `{id}`"),
                "a host's credential opens only its own session",
            )),
            _ => Err(self.denied(
                format!("register host `{id}`"),
                "only a provisioned builder's credential may",
            )),
        }
    }

    /// The member a builder-side gate acts for: a host's credential may name members only
    /// for its own host `on`. For the gate's RPCs.
    pub fn member_on_host(&self, on: &HostId, member: &ClientId) -> Result<ClientId, Error> {
        match &self.identity {
            Identity::Open => Ok(member.clone()),
            Identity::Host(h) if h == on => Ok(member.clone()),
            _ => Err(self.denied(
                format!("act for member {member} on host `{on}`"),
                "only that host's own credential may",
            )),
        }
    }
}

/// Which leases a caller may keep alive or release ([`Caller::lease_scope`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseScope {
    /// Its own (a member's credential).
    Member(ClientId),
    /// Those on this host (a builder's credential, for its gate).
    Host(HostId),
    /// Anyone's (the open mode).
    Anyone,
}

/// The credentials the scheduler knows and the builders operators provisioned; shared by
/// the [`Authenticator`] and the services.
#[derive(Debug)]
pub struct Authority {
    /// `false` without `[auth]`: every call is [`Identity::Open`].
    enforced: bool,
    /// Members' and operators' token digests (fixed at start: they come from the
    /// configuration only).
    principals: HashMap<Digest, Identity>,
    /// Member names, to refuse a `client_id` label that names another member.
    members: HashMap<ClientId, ()>,
    /// Read-only admin calls open to members.
    open_reads: bool,
    /// Provisioned builders: from the configuration, and from operators at run time.
    hosts: RwLock<Provisioned>,
    /// The host ids the configuration provisions: the API may not change those.
    configured_hosts: std::collections::HashSet<HostId>,
}

impl Authority {
    /// The authority of `config` (`None`: the open mode), with `provisioned` builders added
    /// by operators earlier (restored from the store).
    pub fn new(config: Option<&AuthConfig>, provisioned: Vec<HostEntry>) -> Result<Self, Error> {
        let Some(config) = config else {
            let mut hosts = Provisioned::default();
            for h in provisioned {
                hosts.insert(h)?;
            }
            return Ok(Authority {
                enforced: false,
                principals: HashMap::new(),
                members: HashMap::new(),
                open_reads: true,
                hosts: RwLock::new(hosts),
                configured_hosts: Default::default(),
            });
        };
        config.validate()?;
        let mut principals = HashMap::new();
        let mut members = HashMap::new();
        for m in &config.members {
            let id = ClientId::new(&m.name);
            members.insert(id.clone(), ());
            principals.insert(m.digest()?, Identity::Member(id));
        }
        for o in &config.operators {
            principals.insert(o.digest()?, Identity::Operator(o.name.clone()));
        }
        let mut hosts = Provisioned::default();
        for h in config.hosts.iter().cloned().chain(provisioned) {
            hosts.insert(h)?;
        }
        Ok(Authority {
            enforced: true,
            principals,
            members,
            open_reads: config.open_reads,
            hosts: RwLock::new(hosts),
            configured_hosts: config.hosts.iter().map(HostEntry::host_id).collect(),
        })
    }

    /// Whether credentials are checked (an `[auth]` section is configured).
    pub fn enforced(&self) -> bool {
        self.enforced
    }

    /// Whether members may use the read-only admin calls.
    pub fn open_reads(&self) -> bool {
        self.open_reads
    }

    /// The identity a bearer token proves, if any.
    fn identify(&self, token: &str) -> Option<Identity> {
        let digest = digest_of(token);
        if let Some(id) = self.principals.get(&digest) {
            return Some(id.clone());
        }
        self.hosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_token(&digest)
            .map(Identity::Host)
    }

    /// The member an `Acquire` is for: the caller's own (a member's `client_id` is only a
    /// label, refused when it names another member), or the label itself in the open mode.
    pub fn member(&self, caller: &Caller, label: &ClientId) -> Result<ClientId, Error> {
        match &caller.identity {
            Identity::Open => Ok(label.clone()),
            Identity::Member(m) => {
                if label != m && self.members.contains_key(label) {
                    return Err(caller.denied(
                        format!("acquire as member {label}"),
                        "client_id names another member",
                    ));
                }
                Ok(m.clone())
            }
            Identity::Operator(_) | Identity::Host(_) => Err(caller.denied(
                "acquire a lease",
                "only members acquire leases; use a member's credential",
            )),
        }
    }

    /// Checks an agent's registration against what operators provisioned for its host id:
    /// the caller must be that host, and the store URI and host key must be the provisioned
    /// ones. In the open mode an unprovisioned host registers as it says; a provisioned one
    /// is still held to its entry.
    pub fn check_registration(&self, caller: &Caller, spec: &HostSpec) -> Result<(), Error> {
        caller.require_host(&spec.id)?;
        let hosts = self.hosts.read().unwrap_or_else(|p| p.into_inner());
        match hosts.get(&spec.id) {
            Some(entry) => entry.matches(spec),
            None if !self.enforced => Ok(()),
            None => Err(Error::NotProvisioned {
                host_id: spec.id.to_string(),
                reason: "no builder with this id is provisioned".into(),
            }),
        }
    }

    /// Refuses an API change to host `id` when the configuration provisions it, and a token
    /// that a member or an operator already has.
    pub fn check_api_provisioning(
        &self,
        entry_id: &HostId,
        digest: Option<Digest>,
    ) -> Result<(), Error> {
        if self.configured_hosts.contains(entry_id) {
            return Err(Error::Config {
                key: format!("auth.hosts.{entry_id}"),
                reason: "this builder is provisioned in the configuration; change it there".into(),
            });
        }
        if digest.is_some_and(|d| self.principals.contains_key(&d)) {
            return Err(Error::Config {
                key: format!("auth.hosts.{entry_id}.token_sha256"),
                reason: "the same token is a member's or an operator's".into(),
            });
        }
        Ok(())
    }

    /// Adds or replaces a provisioned builder (an operator's call, already persisted).
    pub fn provision(&self, entry: HostEntry) -> Result<(), Error> {
        self.hosts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry)
    }

    /// Removes a builder an operator provisioned; `false` when there was none.
    pub fn unprovision(&self, id: &HostId) -> bool {
        self.hosts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
    }

    /// Whether a provisioned entry would take `digest` from another host.
    pub fn token_taken(&self, id: &HostId, digest: &Digest) -> bool {
        self.hosts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_token(digest)
            .is_some_and(|other| other != *id)
    }
}

/// The interceptor in front of the lease, agent and admin services: it turns the bearer
/// token into a [`Caller`] or refuses the call as `UNAUTHENTICATED`.
#[derive(Clone, Debug)]
pub struct Authenticator {
    authority: Arc<Authority>,
}

impl Authenticator {
    /// An interceptor over `authority`.
    pub fn new(authority: Arc<Authority>) -> Self {
        Self { authority }
    }
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, tonic::Status> {
        let identity = match request.metadata_mut().get_mut("authorization") {
            _ if !self.authority.enforced => Identity::Open,
            None => {
                return Err(Error::Unauthenticated {
                    reason: "no credential: send `authorization: Bearer <token>`".into(),
                }
                .into());
            }
            Some(value) => {
                // Never shown by anything that prints headers from here on.
                value.set_sensitive(true);
                let token = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim);
                match token.and_then(|t| self.authority.identify(t)) {
                    Some(identity) => identity,
                    None => {
                        return Err(Error::Unauthenticated {
                            reason: "the credential is not one this scheduler knows".into(),
                        }
                        .into());
                    }
                }
            }
        };
        request.extensions_mut().insert(Caller { identity });
        Ok(request)
    }
}

#[cfg(test)]
mod tests;
