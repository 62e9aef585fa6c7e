//! `nixdispatch.v1.AdminService`: the operators' side.

use std::sync::Arc;

use nixdispatch::proto::{self, admin_service_server};
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use super::{Shared, convert, metrics};
use crate::core::HostId;

/// Lets operators inspect and steer the scheduler.
#[derive(Debug, Clone)]
pub struct AdminService {
    shared: Arc<Shared>,
}

impl AdminService {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Drains or undrains a host by id, whether or not its agent has registered, and tells
    /// its agent when connected.
    async fn set_draining(
        &self,
        host_id: &str,
        draining: bool,
    ) -> Result<proto::HostStatus, Status> {
        let id = convert::admin_host_id(host_id).map_err(|e| {
            metrics::rejected("admin");
            Status::from(e)
        })?;
        // The store commits to disk: off the runtime's workers, which the acquire path needs.
        let write = {
            let (shared, id) = (self.shared.clone(), id.clone());
            tokio::task::spawn_blocking(move || shared.set_draining(&id, draining))
        };
        let view = match write.await {
            Ok(view) => view.map_err(Status::from)?,
            // Never cancelled (blocking tasks run to the end), so this is its panic.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        info!(
            host = %id,
            draining,
            registered = view.is_some(),
            "drain state changed by an operator"
        );
        self.push_directive(&id);
        Ok(view.map_or_else(|| convert::unregistered_host(&id, draining), Into::into))
    }

    /// Tells the host's agent, if connected, about its new drain state.
    fn push_directive(&self, id: &HostId) {
        if let Some(link) = self.shared.agents.get(id) {
            // A full channel means the agent is not reading; it gets the state with its
            // next report's answer anyway.
            let _ = link.tx.try_send(Ok(self.shared.directive(id)));
        }
    }
}

/// Hosts read per hold of the core's lock by `ListHosts`: about a quarter of a millisecond
/// of work, the most a member's request waits behind an operator's listing.
pub(super) const HOSTS_PAGE: usize = 256;

#[tonic::async_trait]
impl admin_service_server::AdminService for AdminService {
    #[instrument(level = "debug", skip_all)]
    async fn list_hosts(
        &self,
        _request: Request<proto::ListHostsRequest>,
    ) -> Result<Response<proto::ListHostsResponse>, Status> {
        // In pages, letting go of the core between them: an operator's listing of a large
        // fleet must not hold up members' requests for the whole of it. Each host's view is
        // consistent; the list as a whole is as of the moments its pages were read.
        let mut hosts: Vec<proto::HostStatus> = Vec::new();
        let mut after: Option<HostId> = None;
        loop {
            let now = self.shared.now();
            let page = self
                .shared
                .core()
                .hosts_page(now, after.as_ref(), HOSTS_PAGE);
            let full = page.len() == HOSTS_PAGE;
            after = page.last().map(|h| h.spec.id.clone());
            hosts.extend(page.into_iter().map(proto::HostStatus::from));
            if !full {
                break;
            }
            tokio::task::yield_now().await;
        }
        Ok(Response::new(proto::ListHostsResponse { hosts }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn get_capacity(
        &self,
        _request: Request<proto::GetCapacityRequest>,
    ) -> Result<Response<proto::GetCapacityResponse>, Status> {
        let now = self.shared.now();
        let systems = self.shared.core().capacity(now);
        Ok(Response::new(proto::GetCapacityResponse {
            systems: systems.into_iter().map(Into::into).collect(),
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_leases(
        &self,
        _request: Request<proto::ListLeasesRequest>,
    ) -> Result<Response<proto::ListLeasesResponse>, Status> {
        let now = self.shared.now();
        let leases = {
            let mut core = self.shared.core();
            core.expire(now);
            core.leases(now)
        };
        Ok(Response::new(proto::ListLeasesResponse {
            leases: leases.into_iter().map(Into::into).collect(),
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn drain_host(
        &self,
        request: Request<proto::DrainHostRequest>,
    ) -> Result<Response<proto::HostStatus>, Status> {
        self.set_draining(&request.get_ref().host_id, true)
            .await
            .map(Response::new)
    }

    #[instrument(level = "debug", skip_all)]
    async fn undrain_host(
        &self,
        request: Request<proto::UndrainHostRequest>,
    ) -> Result<Response<proto::HostStatus>, Status> {
        self.set_draining(&request.get_ref().host_id, false)
            .await
            .map(Response::new)
    }

    #[instrument(level = "debug", skip_all)]
    async fn explain_placement(
        &self,
        request: Request<proto::ExplainPlacementRequest>,
    ) -> Result<Response<proto::ExplainPlacementResponse>, Status> {
        let (system, features) = convert::explain(request.get_ref()).map_err(|e| {
            metrics::rejected("admin");
            Status::from(e)
        })?;
        let now = self.shared.now();
        let explanation = {
            let mut core = self.shared.core();
            core.expire(now);
            core.explain(now, &system, &features)
        };
        Ok(Response::new(explanation.into()))
    }
}
