//! The service side of trust: unguessable lease ids, the authority built from the
//! configuration and the store, and acquiring under the member's caps. The rules themselves
//! live in `crate::auth`; handlers call into here with a line each.

use crate::Error;
use crate::auth::Authority;
use crate::auth::HostEntry;
use crate::config::Config;
use crate::core::{Decision, HostId, LeaseIds, LeaseRequest, Time};
use crate::store::Store;

use super::Shared;

/// Lease ids from the operating system's random source: 128 bits each, so that no lease id
/// can be guessed from another. The core stays pure; this is injected.
#[derive(Debug)]
pub(crate) struct OsLeaseIds {
    rng: ring::rand::SystemRandom,
}

impl OsLeaseIds {
    pub(crate) fn new() -> Self {
        Self {
            rng: ring::rand::SystemRandom::new(),
        }
    }
}

impl LeaseIds for OsLeaseIds {
    fn next_id(&mut self) -> u128 {
        let mut bytes = [0u8; 16];
        // getrandom(2) does not fail once the kernel's pool is initialised, which it is long
        // before a service starts; a failure is a broken system, not something to serve on.
        #[allow(clippy::expect_used)]
        ring::rand::SecureRandom::fill(&self.rng, &mut bytes)
            .expect("the operating system's random source failed");
        u128::from_le_bytes(bytes)
    }
}

/// The authority of `config`, with the builders operators provisioned earlier (from the
/// store). Logs loudly when it is the open mode.
pub(crate) fn authority(config: &Config, store: &Store) -> Result<Authority, Error> {
    let provisioned = store.provisioned_hosts()?;
    let authority = Authority::new(config.auth.as_ref(), provisioned)?;
    if !authority.enforced() {
        tracing::warn!(
            "no [auth] configured: OPEN MODE, every caller may do everything and client_id is \
             taken at its word; fine on loopback for trying nixdispatch, never for a fleet"
        );
    }
    Ok(authority)
}

impl Shared {
    /// Decides `req` (whose client is already the authenticated member): past the member's
    /// cap on live leases it is postponed, or declined when it can build locally, without
    /// reaching placement; otherwise the core decides. One hold of the core's lock, so the
    /// cap cannot be raced.
    pub(crate) fn acquire_capped(&self, now: Time, req: &LeaseRequest) -> (Decision, &'static str) {
        let mut core = self.core();
        if self.auth.enforced()
            && let Some(cap) = self.auth.max_leases_per_member()
            && core.leases_held_by(&req.client) >= cap
        {
            let reason = format!(
                "member {} holds {cap} live leases, its limit (auth.limits.max_live_leases_per_member)",
                req.client
            );
            let decision = if req.can_build_locally {
                Decision::Decline { reason }
            } else {
                Decision::Postpone {
                    retry_after: core.config().postpone_retry,
                    position: 0,
                    reason,
                }
            };
            return (decision, "member_lease_cap");
        }
        // The refusal cause is read under the same hold of the core as the decision.
        let decision = core.acquire(now, req);
        (decision, core.refusal_cause())
    }
}

impl Shared {
    /// Provisions (or re-provisions) a builder for an operator: checked, committed to the
    /// store, then given to the authority; a connected agent of that host is told to
    /// register again, against the new entry. Blocking (a disk write): `spawn_blocking`.
    pub(crate) fn provision(&self, entry: HostEntry) -> Result<(), Error> {
        let id = entry.host_id();
        let digest = crate::auth::Digest::from_hex(&entry.token_sha256);
        self.auth.check_api_provisioning(&id, digest)?;
        if let Some(d) = digest
            && self.auth.token_taken(&id, &d)
        {
            return Err(Error::Config {
                key: format!("auth.hosts.{id}.token_sha256"),
                reason: "the same token is another builder's".into(),
            });
        }
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.provision_host(&entry, std::time::SystemTime::now())?;
        self.auth.provision(entry)?;
        drop(store);
        self.supersede(&id);
        Ok(())
    }

    /// Removes a builder an operator provisioned, and closes its agent's stream. Blocking.
    pub(crate) fn unprovision(&self, id: &HostId) -> Result<bool, Error> {
        self.auth.check_api_provisioning(id, None)?;
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let removed = store.unprovision_host(id)?;
        self.auth.unprovision(id);
        drop(store);
        self.supersede(id);
        Ok(removed)
    }

    /// Ends host `id`'s connected agent stream (it reconnects and registers again).
    fn supersede(&self, id: &HostId) {
        if let Some(link) = self.agents.get(id) {
            link.superseded.notify_one();
        }
    }
}

/// Runs `f` (a store write) off the runtime's workers, which the acquire path needs, and
/// waits for it. Blocking tasks are never cancelled, so a join error is `f`'s panic.
pub(crate) async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
