//! The gRPC adapter around the core: one module per service, the wire boundary in
//! `convert`, and the state they share in [`Shared`].
//!
//! Handlers validate their input, take the core's lock for a few microseconds, and convert
//! the answer; they never hold the lock across an `.await`.

mod admin;
mod agent;
pub(crate) mod convert;
mod lease;
pub mod metrics;

/// The boundary's free-standing validators (those that are not `TryFrom` impls), reachable
/// from the fuzz targets in `fuzz/` only: the crate keeps them private otherwise.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use std::collections::BTreeSet;

    use nixdispatch::proto;

    use crate::Error;
    use crate::core::{BuildOutcome, Feature, HostId, LeaseId, System};

    /// The validated lease id of a `KeepAlive`.
    pub fn keep_alive(r: &proto::KeepAliveRequest) -> Result<LeaseId, Error> {
        super::convert::keep_alive(r)
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
}

use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;
use nixdispatch::proto::SchedulerMessage;
use tokio::sync::{Notify, mpsc, watch};

pub use admin::AdminService;
pub use agent::AgentService;
pub use lease::LeaseService;

use crate::config::Config;
use crate::core::{Clock, Generation, HostId, Scheduler, Time};

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
#[derive(Debug)]
pub struct Shared {
    core: Mutex<Scheduler>,
    clock: Arc<dyn Clock>,
    config: Config,
    agents: DashMap<HostId, AgentLink>,
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
    /// Shared state for a server with this configuration.
    pub fn new(
        config: Config,
        clock: Arc<dyn Clock>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let seed = config.placement.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let core = Scheduler::new(config.core(), config.placement.policy.build(), seed);
        Arc::new(Self {
            core: Mutex::new(core),
            clock,
            config,
            agents: DashMap::new(),
            shutdown,
        })
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

    /// The message that tells host `id`'s agent its deadline and drain state.
    fn directive(&self, id: &HostId) -> SchedulerMessage {
        let interval = self.config.agents.report_interval_millis;
        SchedulerMessage {
            next_report_within_millis: interval,
            draining: self.core().is_draining(id).unwrap_or(false),
        }
    }
}
