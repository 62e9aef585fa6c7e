//! The gRPC adapter around the core: one module per service, the wire boundary in
//! `convert`, and the state they share in [`Shared`].
//!
//! Handlers validate their input, take the core's lock for a few microseconds, and convert
//! the answer; they never hold the lock across an `.await`, nor across a write to the
//! operator state store (see [`Shared`]).

mod admin;
mod agent;
pub(crate) mod convert;
mod lease;
pub mod metrics;
pub(crate) mod probe;
mod trust;

use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;
use nixdispatch::proto::SchedulerMessage;
use tokio::sync::{Notify, mpsc, watch};

pub use admin::AdminService;
pub use agent::AgentService;
pub use lease::LeaseService;

use crate::Error;
use crate::config::Config;
use crate::core::{Clock, Generation, HostId, HostView, Scheduler, Time};
use crate::store::Store;

/// A clock on tokio's time, so that tests with `tokio::time::pause()` control it.
#[derive(Debug)]
pub struct TokioClock {
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock whose epoch is now.
    pub fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Time {
        Time::from_millis(u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX))
    }
}

/// The live agent stream of a host, to push directives (drain) to it.
#[derive(Debug)]
struct AgentLink {
    generation: Generation,
    tx: mpsc::Sender<Result<SchedulerMessage, tonic::Status>>,
    /// Woken when a newer stream of the same host takes over.
    superseded: Arc<Notify>,
}

/// State shared by the services.
///
/// Two locks, always taken in this order when both are needed: `store`, then `core`. An
/// operator change holds `store` across its disk write and then takes `core` for the
/// in-memory step only, so the acquire path never waits for the disk, and concurrent
/// changes reach the store and the core in the same order.
#[derive(Debug)]
pub struct Shared {
    core: Mutex<Scheduler>,
    store: Mutex<Store>,
    clock: Arc<dyn Clock>,
    config: Config,
    agents: DashMap<HostId, AgentLink>,
    /// Credentials, roles and provisioned builders (see `crate::auth`).
    pub(crate) auth: Arc<crate::auth::Authority>,
    /// Wakes the probe task: an agent registered, or a probe ended.
    pub(crate) probe_wake: Notify,
    /// Becomes `true` when the server shuts down: agent streams end.
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Resolves once the server is shutting down (or its shutdown sender is gone).
pub(crate) async fn shutting_down(mut rx: watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here rather than in a caller's
    // `select!`.
    let _ = rx.wait_for(|down| *down).await;
}

impl Shared {
    /// Shared state for a server with this configuration, with the operator state `store`
    /// holds restored into the core.
    pub fn new(
        config: Config,
        store: Store,
        clock: Arc<dyn Clock>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<Self>, Error> {
        let seed = config.placement.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let mut core = Scheduler::new(config.core(), config.placement.policy.build(), seed);
        core.set_lease_ids(Box::new(trust::OsLeaseIds::new()));
        let auth = Arc::new(trust::authority(&config, &store)?);
        let drains = store.drains()?;
        if !drains.is_empty() {
            tracing::info!(
                drains = drains.len(),
                "drains restored from the operator state"
            );
        }
        for id in &drains {
            core.set_draining(id, true);
        }
        Ok(Arc::new(Self {
            core: Mutex::new(core),
            store: Mutex::new(store),
            clock,
            config,
            agents: DashMap::new(),
            auth,
            probe_wake: Notify::new(),
            shutdown,
        }))
    }

    /// The configuration.
    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// Now, on the injected clock.
    pub fn now(&self) -> Time {
        self.clock.now()
    }

    /// The core, locked. A panic while holding the lock cannot leave the core half-updated in
    /// a way later calls could not live with (every operation is small), so a poisoned lock
    /// is taken over rather than turned into an outage.
    fn core(&self) -> MutexGuard<'_, Scheduler> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drains or undrains host `id`, registered or not: committed to the store first, then
    /// applied to the core, so that the core never shows a drain a restart would lose, and a
    /// failed write changes nothing. Returns the host's view when its agent has registered.
    ///
    /// Blocking (a committed disk write): call it from `spawn_blocking`.
    pub(crate) fn set_draining(
        &self,
        id: &HostId,
        draining: bool,
    ) -> Result<Option<HostView>, Error> {
        // A panic inside a write leaves its transaction rolled back, so a poisoned lock is
        // taken over like the core's.
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.set_drain(id, draining, std::time::SystemTime::now())?;
        let now = self.now();
        let mut core = self.core();
        core.set_draining(id, draining);
        Ok(core.host(now, id))
    }

    /// The placement policy's name.
    pub fn policy_name(&self) -> &'static str {
        self.core().policy_name()
    }

    /// Expires leases that were not kept alive; called periodically by the server.
    pub fn tick(&self) {
        let now = self.now();
        let (expired, active) = {
            let mut core = self.core();
            (core.expire(now), core.lease_count())
        };
        if expired > 0 {
            metrics::lease_expired(expired);
        }
        metrics::leases_active(active);
    }

    /// Publishes the fleet's gauges (capacity per system, every host's state, availability,
    /// probe breaker and report age). Reads the hosts in pages like `ListHosts`, letting go
    /// of the core between them.
    pub(crate) async fn fleet_metrics(&self) {
        let capacity = {
            let now = self.now();
            self.core().capacity(now)
        };
        metrics::systems(&capacity);
        metrics::touch_agent_streams();
        let mut after: Option<HostId> = None;
        loop {
            let now = self.now();
            let page = self
                .core()
                .hosts_page(now, after.as_ref(), admin::HOSTS_PAGE);
            metrics::hosts(&page);
            if page.len() < admin::HOSTS_PAGE {
                break;
            }
            after = page.last().map(|h| h.spec.id.clone());
            tokio::task::yield_now().await;
        }
    }

    /// The message that tells host `id`'s agent its deadline and drain state.
    fn directive(&self, id: &HostId) -> SchedulerMessage {
        let interval = self.config.agents.report_interval_millis;
        SchedulerMessage {
            next_report_within_millis: interval,
            draining: self.core().is_draining(id),
        }
    }
}
