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
/// store). Logs loudly when it is the open mode, and when the deprecated per-member cap is
/// set.
pub(crate) fn authority(config: &Config, store: &Store) -> Result<Authority, Error> {
    let provisioned = store.provisioned_hosts()?;
    let authority = Authority::new(config.auth.as_ref(), provisioned)?;
    if !authority.enforced() {
        tracing::warn!(
            "no [auth] configured: OPEN MODE, every caller may do everything and client_id is \
             taken at its word; fine on loopback for trying nixdispatch, never for a fleet"
        );
    }
    if let Some(n) = config.deprecated_member_cap() {
        tracing::warn!(
            max_live_leases_per_member = n,
            "auth.limits.max_live_leases_per_member is deprecated: it is read as \
             queue.default_member_max_slots, the one per-member cap; set that instead"
        );
    }
    Ok(authority)
}

impl Shared {
    /// Decides `req` (whose client is already the authenticated member) under the member's
    /// caps, which are the core's: its quota of live leases (`queue.default_member_max_slots`
    /// or its own) in admission, and its cap on waiting requests
    /// (`queue.max_waiting_per_member`) when it would wait. Returns the decision and why
    /// nothing was granted (for metrics), read under the same hold of the core.
    pub(crate) fn acquire_capped(
        &self,
        now: Time,
        req: &LeaseRequest,
    ) -> (Result<Decision, crate::core::Error>, &'static str) {
        let mut core = self.core();
        let decision = core.acquire_capped(now, req);
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
