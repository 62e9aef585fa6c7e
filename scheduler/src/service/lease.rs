//! `nixdispatch.v1.LeaseService`: the build hooks' side.

use std::sync::Arc;
use std::time::Instant;

use nixdispatch::proto::{self, lease_service_server};
use tonic::{Request, Response, Status};
use tracing::{debug, instrument};

use super::{Shared, convert, metrics};
use crate::Error;
use crate::auth::Caller;
use crate::core::{Decision, LeaseRequest};

/// Serves leases to build hooks.
#[derive(Debug, Clone)]
pub struct LeaseService {
    shared: Arc<Shared>,
}

impl LeaseService {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn rejected(e: crate::Error) -> Status {
    metrics::rejected("lease");
    e.into()
}

#[tonic::async_trait]
impl lease_service_server::LeaseService for LeaseService {
    #[instrument(level = "debug", skip_all, fields(system, client, drv))]
    async fn acquire(
        &self,
        request: Request<proto::AcquireRequest>,
    ) -> Result<Response<proto::AcquireResponse>, Status> {
        let started = Instant::now();
        let caller = Caller::of(&request)?;
        let mut req = LeaseRequest::try_from(request.into_inner()).map_err(rejected)?;
        req.client = self.shared.auth.member(&caller, &req.client)?;
        let span = tracing::Span::current();
        span.record("system", req.system.as_str());
        span.record("client", req.client.as_str());
        span.record("drv", req.drv_path.as_str());
        let now = self.shared.now();
        let (decision, cause) = self.shared.acquire_capped(now, &req);
        let outcome = match &decision {
            Decision::Granted(g) => {
                debug!(host = %g.host.id, lease = %g.lease_id, used = g.slots_used, "granted");
                "granted"
            }
            Decision::Postpone {
                position, reason, ..
            } => {
                debug!(position, reason, "postponed");
                "postpone"
            }
            Decision::Decline { reason } => {
                debug!(reason, "declined");
                "decline"
            }
            Decision::DeclinePermanently { reason } => {
                debug!(reason, "declined permanently");
                "decline_permanently"
            }
        };
        metrics::acquire(outcome, started.elapsed().as_secs_f64());
        if !matches!(decision, Decision::Granted(_)) {
            metrics::refused(outcome, cause);
        }
        Ok(Response::new(decision.into()))
    }

    #[instrument(level = "debug", skip_all)]
    async fn keep_alive(
        &self,
        request: Request<proto::KeepAliveRequest>,
    ) -> Result<Response<proto::KeepAliveResponse>, Status> {
        let holder = Caller::of(&request)?.holder("keep a lease alive")?;
        let id = convert::keep_alive(request.get_ref()).map_err(rejected)?;
        let now = self.shared.now();
        let ttl = self
            .shared
            .core()
            .keep_alive_by(now, &id, holder.as_ref())
            .map_err(Error::from)?;
        Ok(Response::new(proto::KeepAliveResponse {
            lease_ttl_millis: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(lease, outcome))]
    async fn release(
        &self,
        request: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        let holder = Caller::of(&request)?.holder("release a lease")?;
        let (id, outcome) = convert::release(request.get_ref()).map_err(rejected)?;
        let span = tracing::Span::current();
        span.record("lease", id.as_str());
        span.record("outcome", outcome.as_str());
        let now = self.shared.now();
        let already_released = self
            .shared
            .core()
            .release_by(now, &id, holder.as_ref(), outcome)
            .map_err(Error::from)?;
        if !already_released {
            metrics::release(outcome.as_str());
            debug!(
                duration_millis = request.get_ref().duration_millis,
                "released"
            );
        }
        Ok(Response::new(proto::ReleaseResponse { already_released }))
    }
}
