//! `nixdispatch.v1.AdminService`: the operators' side.

use std::sync::Arc;

use nixdispatch::proto::{self, admin_service_server};
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use super::trust::off_runtime;
use super::{Shared, convert, metrics};
use crate::auth::{Caller, LeaseScope};
use crate::core::HostId;

/// Lets operators inspect and steer the scheduler.
#[derive(Debug, Clone)]
pub struct AdminService {
    shared: Arc<Shared>,
    /// One `ListHosts` is built at a time: concurrent listings wait for each other instead of
    /// taking every CPU from members' requests (a listing of a large fleet is the heaviest
    /// call the scheduler answers).
    listing: Arc<tokio::sync::Semaphore>,
}

impl AdminService {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            listing: Arc::new(tokio::sync::Semaphore::new(1)),
        }
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
        request: Request<proto::ListHostsRequest>,
    ) -> Result<Response<proto::ListHostsResponse>, Status> {
        Caller::of(&request)?.require_reader(self.shared.auth.open_reads(), "list hosts")?;
        let _turn = self
            .listing
            .acquire()
            .await
            .map_err(|_| Status::unavailable("the scheduler is shutting down"))?;
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
        request: Request<proto::GetCapacityRequest>,
    ) -> Result<Response<proto::GetCapacityResponse>, Status> {
        Caller::of(&request)?.require_reader(self.shared.auth.open_reads(), "read capacity")?;
        let now = self.shared.now();
        let systems = self.shared.core().capacity(now);
        Ok(Response::new(proto::GetCapacityResponse {
            systems: systems.into_iter().map(Into::into).collect(),
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_waiting(
        &self,
        request: Request<proto::ListWaitingRequest>,
    ) -> Result<Response<proto::ListWaitingResponse>, Status> {
        let only = Caller::of(&request)?.member_view("list waiting requests")?;
        let (size, after) = convert::waiting_page(request.get_ref()).map_err(|e| {
            metrics::rejected("admin");
            Status::from(e)
        })?;
        // One page per call, so one hold of the core per page: a long queue's listing does
        // not hold up members' requests for the whole of it (the client follows the tokens).
        let now = self.shared.now();
        let (waiting, next) =
            self.shared
                .core()
                .waiting_page(now, only.as_ref(), after.as_ref(), size);
        Ok(Response::new(proto::ListWaitingResponse {
            waiting: waiting.into_iter().map(Into::into).collect(),
            next_page_token: next
                .as_ref()
                .map(convert::waiting_token)
                .unwrap_or_default(),
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_leases(
        &self,
        request: Request<proto::ListLeasesRequest>,
    ) -> Result<Response<proto::ListLeasesResponse>, Status> {
        let scope = Caller::of(&request)?.lease_view();
        let now = self.shared.now();
        let mut leases = {
            let mut core = self.shared.core();
            core.expire(now);
            core.leases(now)
        };
        leases.retain(|l| match &scope {
            LeaseScope::Member(m) => l.client == *m,
            LeaseScope::Host(h) => l.host == *h,
            LeaseScope::Anyone => true,
        });
        Ok(Response::new(proto::ListLeasesResponse {
            leases: leases.into_iter().map(Into::into).collect(),
        }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn drain_host(
        &self,
        request: Request<proto::DrainHostRequest>,
    ) -> Result<Response<proto::HostStatus>, Status> {
        Caller::of(&request)?.require_operator("drain a host")?;
        self.set_draining(&request.get_ref().host_id, true)
            .await
            .map(Response::new)
    }

    #[instrument(level = "debug", skip_all)]
    async fn undrain_host(
        &self,
        request: Request<proto::UndrainHostRequest>,
    ) -> Result<Response<proto::HostStatus>, Status> {
        Caller::of(&request)?.require_operator("undrain a host")?;
        self.set_draining(&request.get_ref().host_id, false)
            .await
            .map(Response::new)
    }

    #[instrument(level = "debug", skip_all)]
    async fn explain_placement(
        &self,
        request: Request<proto::ExplainPlacementRequest>,
    ) -> Result<Response<proto::ExplainPlacementResponse>, Status> {
        Caller::of(&request)?.require_reader(self.shared.auth.open_reads(), "explain placement")?;
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

    #[instrument(level = "debug", skip_all)]
    async fn get_quotas(
        &self,
        request: Request<proto::GetQuotasRequest>,
    ) -> Result<Response<proto::Quotas>, Status> {
        Caller::of(&request)?.require_reader(self.shared.auth.open_reads(), "read quotas")?;
        Ok(Response::new(self.shared.core().quotas().into()))
    }

    #[instrument(level = "debug", skip_all)]
    async fn set_quota(
        &self,
        request: Request<proto::SetQuotaRequest>,
    ) -> Result<Response<proto::Quotas>, Status> {
        Caller::of(&request)?.require_operator("set a quota")?;
        // The store commits to disk: off the runtime's workers, like drains.
        let write = {
            let (shared, r) = (self.shared.clone(), request.get_ref().clone());
            tokio::task::spawn_blocking(move || shared.set_quota(&r))
        };
        let quotas = match write.await {
            Ok(Ok(q)) => q,
            Ok(Err(e)) => {
                if matches!(e, crate::Error::InvalidArgument { .. }) {
                    metrics::rejected("admin");
                }
                return Err(e.into());
            }
            // Never cancelled (blocking tasks run to the end), so this is its panic.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        info!(request = ?request.get_ref(), "quota changed by an operator");
        Ok(Response::new((&quotas).into()))
    }

    #[instrument(level = "debug", skip_all)]
    async fn get_usage(
        &self,
        request: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        Caller::of(&request)?.require_reader(self.shared.auth.open_reads(), "read usage")?;
        let members = self.shared.core().members();
        Ok(Response::new(proto::GetUsageResponse {
            members: members.into_iter().map(Into::into).collect(),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(host))]
    async fn provision_host(
        &self,
        request: Request<proto::ProvisionHostRequest>,
    ) -> Result<Response<proto::ProvisionHostResponse>, Status> {
        Caller::of(&request)?.require_operator("provision a builder")?;
        let entry = convert::provision(request.get_ref()).map_err(|e| {
            metrics::rejected("admin");
            Status::from(e)
        })?;
        tracing::Span::current().record("host", entry.id.as_str());
        let shared = self.shared.clone();
        let (id, uri) = (entry.id.clone(), entry.store_uri.clone());
        off_runtime(move || shared.provision(entry)).await?;
        info!(host = %id, store_uri = %uri, "builder provisioned by an operator");
        Ok(Response::new(proto::ProvisionHostResponse {}))
    }

    #[instrument(level = "debug", skip_all, fields(host))]
    async fn unprovision_host(
        &self,
        request: Request<proto::UnprovisionHostRequest>,
    ) -> Result<Response<proto::UnprovisionHostResponse>, Status> {
        Caller::of(&request)?.require_operator("unprovision a builder")?;
        let id = convert::admin_host_id(&request.get_ref().host_id).map_err(|e| {
            metrics::rejected("admin");
            Status::from(e)
        })?;
        let (shared, target) = (self.shared.clone(), id.clone());
        let removed = off_runtime(move || shared.unprovision(&target)).await?;
        info!(host = %id, removed, "builder unprovisioned by an operator");
        Ok(Response::new(proto::UnprovisionHostResponse { removed }))
    }
}
