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
mod wait;

/// The boundary's free-standing validators (those that are not `TryFrom` impls), reachable
/// from the fuzz targets in `fuzz/` only: the crate keeps them private otherwise.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use std::collections::BTreeSet;

    use nixdispatch::proto;

    use crate::Error;
    use crate::core::{BuildOutcome, Feature, HostId, LeaseId, System};

    /// The validated lease id of a `KeepAlive` (its re-attachment details are left out).
    pub fn keep_alive(r: &proto::KeepAliveRequest) -> Result<LeaseId, Error> {
        super::convert::keep_alive(r).map(|(id, _reattach)| id)
    }

    /// The validated lease id and outcome of a `Release`.
    pub fn release(r: &proto::ReleaseRequest) -> Result<(LeaseId, BuildOutcome), Error> {
        super::convert::release(r)
    }

    /// A validated host id of the admin calls.
    pub fn admin_host_id(v: &str) -> Result<HostId, Error> {
        super::convert::admin_host_id(v)
    }

    /// The validated system and features of `ExplainPlacement`.
    pub fn explain(
        r: &proto::ExplainPlacementRequest,
    ) -> Result<(System, BTreeSet<Feature>), Error> {
        super::convert::explain(r)
    }

    /// The validated page size and cursor of a `ListWaiting`.
    pub fn waiting_page(
        r: &proto::ListWaitingRequest,
    ) -> Result<(usize, Option<crate::core::WaitingCursor>), Error> {
        super::convert::waiting_page(r)
    }

    /// The `next_page_token` of a `ListWaiting` page ending at `c`.
    pub fn waiting_token(c: &crate::core::WaitingCursor) -> String {
        super::convert::waiting_token(c)
    }
}

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;
use nixdispatch::proto::{self, SchedulerMessage};
use tokio::sync::{Notify, mpsc, oneshot, watch};

pub use admin::AdminService;
pub use agent::AgentService;
pub use lease::LeaseService;
pub use wait::WaitStream;

use crate::Error;
use crate::config::Config;
use crate::core::{
    Clock, Generation, HostId, HostView, LeaseId, QueueSnapshot, Quotas, Scheduler, Time,
    WaitAnswer, WaiterId,
};
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
    /// Where each waiting stream's grant goes. Entries are added under the core's lock in
    /// the call that queues the waiter, so a grant never finds its waiter unregistered.
    /// Lock order: the core, then this; never the other way round.
    streams: Mutex<HashMap<WaiterId, oneshot::Sender<proto::WaitForLeaseResponse>>>,
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
        let queue = store.queue_state()?;
        tracing::info!(
            operator_quotas = queue.quotas.is_some(),
            durations = queue.durations.len(),
            usage = queue.usage.len(),
            "queue state restored"
        );
        core.restore_queue(QueueSnapshot {
            quotas: queue.quotas.unwrap_or_else(|| config.quotas()),
            durations: queue.durations,
            usage: queue.usage,
        });
        Ok(Arc::new(Self {
            core: Mutex::new(core),
            store: Mutex::new(store),
            clock,
            config,
            agents: DashMap::new(),
            streams: Mutex::new(HashMap::new()),
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
        let view = {
            let mut core = self.core();
            core.set_draining(id, draining);
            // An undrained host's free slots go to waiters at once.
            core.dispatch(now);
            core.host(now, id)
        };
        self.deliver();
        Ok(view)
    }

    /// Applies one operator quota change (`SetQuota`): validated, committed to the store,
    /// then applied to the core, whose free slots a raised quota hands out at once. Returns
    /// the quotas now in force.
    ///
    /// Blocking (a committed disk write): call it from `spawn_blocking`.
    pub(crate) fn set_quota(&self, request: &proto::SetQuotaRequest) -> Result<Quotas, Error> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let mut quotas = self.core().quotas().clone();
        convert::set_quota(request, &mut quotas)?;
        store.set_quotas(&quotas, std::time::SystemTime::now())?;
        let now = self.now();
        self.core().set_quotas(now, quotas.clone());
        self.deliver();
        Ok(quotas)
    }

    /// Writes the learned durations and usage records that changed since the last call.
    /// A failed write is logged; those records are written again when they next change.
    ///
    /// Blocking (a committed disk write): call it from `spawn_blocking`.
    pub fn save_queue_changes(&self) {
        let changes = self.core().take_queue_changes();
        if changes.durations.is_empty() && changes.usage.is_empty() {
            return;
        }
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = store.save_queue(&changes.durations, &changes.usage) {
            tracing::warn!(error = %e, "cannot persist learned durations and usage");
        }
    }

    /// The placement policy's name.
    pub fn policy_name(&self) -> &'static str {
        self.core().policy_name()
    }

    /// Expires leases that were not kept alive and hands any free slot to waiters (for
    /// what changes with time alone, e.g. a cooldown running out); called periodically by
    /// the server.
    pub fn tick(&self) {
        let now = self.now();
        let (expired, active, waiting) = {
            let mut core = self.core();
            let expired = core.expire(now);
            core.dispatch(now);
            (expired, core.lease_count(), core.waiting())
        };
        self.deliver();
        if expired > 0 {
            metrics::lease_expired(expired);
        }
        metrics::leases_active(active);
        metrics::queue_waiting(waiting);
    }

    /// The waiting streams' grant channels, locked.
    fn streams(
        &self,
    ) -> MutexGuard<'_, HashMap<WaiterId, oneshot::Sender<proto::WaitForLeaseResponse>>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pushes the grants the core made to waiting streams. A grant whose stream is already
    /// gone goes back to the core, and its slot on to the next waiter. Called after every
    /// core operation that can free a slot.
    pub(crate) fn deliver(&self) {
        loop {
            let handouts = self.core().take_handouts();
            if handouts.is_empty() {
                return;
            }
            let mut returned: Vec<LeaseId> = Vec::new();
            {
                let mut streams = self.streams();
                for h in handouts {
                    let lease = h.grant.lease_id.clone();
                    let event = WaitAnswer::Granted(h.grant).into();
                    let sent = match streams.remove(&h.waiter) {
                        Some(tx) => tx.send(event).is_ok(),
                        None => false,
                    };
                    if sent {
                        metrics::queue_granted(h.waited.as_secs_f64());
                    } else {
                        returned.push(lease);
                    }
                }
            }
            if returned.is_empty() {
                return;
            }
            let now = self.now();
            let mut core = self.core();
            for lease in &returned {
                core.return_grant(now, lease);
                metrics::queue_returned();
            }
        }
    }

    /// A waiting stream was dropped: its waiter leaves the queue, and `unread`, a grant
    /// that reached it but was never sent, goes back.
    pub(crate) fn abandon(&self, waiter: WaiterId, unread: Option<LeaseId>) {
        self.streams().remove(&waiter);
        let now = self.now();
        {
            let mut core = self.core();
            core.cancel_wait(now, waiter);
            if let Some(lease) = &unread {
                core.return_grant(now, lease);
                metrics::queue_returned();
            }
        }
        metrics::queue_abandoned();
        self.deliver();
    }

    /// Publishes the fleet's gauges (capacity per system, every host's state, availability,
    /// probe breaker and report age) and each member's usage counters. Reads the hosts in
    /// pages like `ListHosts`, letting go of the core between them.
    pub(crate) async fn fleet_metrics(&self) {
        let capacity = {
            let now = self.now();
            self.core().capacity(now)
        };
        metrics::systems(&capacity);
        metrics::touch_agent_streams();
        let members = self.core().members();
        metrics::members(&members);
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
