//! `nixdispatch.v1.LeaseService`: the build hooks' side.

use std::sync::Arc;
use std::time::Instant;

use nixdispatch::proto::{self, lease_service_server};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};
use tracing::{debug, instrument};

use super::admin::HOSTS_PAGE;
use super::{Shared, WaitStream, convert, metrics};
use crate::Error;
use crate::auth::{Caller, Identity, LeaseScope};
use crate::core::{Decision, Error as CoreError, HostId, HostState, LeaseRequest, WaitAnswer};

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
    type WaitForLeaseStream = WaitStream;

    #[instrument(level = "debug", skip_all, fields(system, client, drv, pin))]
    async fn wait_for_lease(
        &self,
        request: Request<proto::WaitForLeaseRequest>,
    ) -> Result<Response<WaitStream>, Status> {
        let caller = Caller::of(&request)?;
        let (mut req, pin) = convert::wait(request.into_inner()).map_err(rejected)?;
        // A member waits as itself; a builder-side gate (a host's credential) waits for a
        // member only on its own host.
        req.client = match (&caller.identity, &pin) {
            (Identity::Host(_), Some(on)) => caller.member_on_host(on, &req.client)?,
            _ => self.shared.auth.member(&caller, &req.client)?,
        };
        let span = tracing::Span::current();
        span.record("system", req.system.as_str());
        span.record("client", req.client.as_str());
        span.record("drv", req.drv_path.as_str());
        if let Some(p) = &pin {
            span.record("pin", p.as_str());
        }
        let now = self.shared.now();
        let (grant_tx, grant_rx) = oneshot::channel();
        let answer = {
            let mut core = self.shared.core();
            let answer = core.wait_capped(now, &req, pin.as_ref());
            // Registered under the core's lock: no grant can be made before this exists.
            if let Ok(WaitAnswer::Queued { waiter, .. }) = &answer {
                self.shared.streams().insert(*waiter, grant_tx);
            }
            answer
        };
        self.shared.deliver();
        let answer = answer.map_err(|e| {
            debug!(error = %e, "refused");
            metrics::queue_wait("resource_exhausted");
            Status::from(Error::from(e))
        })?;
        let stream = match answer {
            WaitAnswer::Queued {
                waiter,
                status,
                reason,
            } => {
                debug!(position = status.position, reason, "queued");
                metrics::queue_wait("queued");
                WaitStream::queued(self.shared.clone(), waiter, status, reason, grant_rx)
            }
            other => {
                metrics::queue_wait(match &other {
                    WaitAnswer::Granted(_) => "granted",
                    WaitAnswer::Decline { .. } => "decline",
                    _ => "decline_permanently",
                });
                WaitStream::answered(other.into())
            }
        };
        Ok(Response::new(stream))
    }

    #[instrument(level = "debug", skip_all, fields(system, client, drv))]
    async fn acquire(
        &self,
        request: Request<proto::AcquireRequest>,
    ) -> Result<Response<proto::AcquireResponse>, Status> {
        let started = Instant::now();
        let caller = Caller::of(&request)?;
        let mut req = LeaseRequest::try_from(request.into_inner()).map_err(rejected)?;
        // As for `WaitForLease`: a gate (a host's credential) pins to its own host and names
        // members only there.
        req.client = match (&caller.identity, &req.pin_host) {
            (Identity::Host(_), Some(on)) => caller.member_on_host(on, &req.client)?,
            _ => self.shared.auth.member(&caller, &req.client)?,
        };
        let span = tracing::Span::current();
        span.record("system", req.system.as_str());
        span.record("client", req.client.as_str());
        span.record("drv", req.drv_path.as_str());
        let now = self.shared.now();
        let (decision, cause) = self.shared.acquire_capped(now, &req);
        self.shared.deliver();
        let decision = match decision {
            Ok(d) => d,
            Err(e) => {
                debug!(error = %e, "refused");
                metrics::acquire("resource_exhausted", started.elapsed().as_secs_f64());
                metrics::refused("resource_exhausted", cause);
                return Err(Error::from(e).into());
            }
        };
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
        let caller = Caller::of(&request)?;
        let scope = caller.lease_scope("keep a lease alive")?;
        let (id, details) = convert::keep_alive(request.get_ref()).map_err(rejected)?;
        let now = self.shared.now();
        let ttl = {
            let mut core = self.shared.core();
            let (holder, host) = match &scope {
                LeaseScope::Member(m) => (Some(m), None),
                LeaseScope::Host(h) => (None, Some(h)),
                LeaseScope::Anyone => (None, None),
            };
            // A builder (its gate) keeps alive only the leases on its own host, live or to
            // re-attach.
            if let Some(on) = host {
                let lease_host = core
                    .lease_host(&id)
                    .cloned()
                    .or_else(|| details.as_ref().map(|d| d.host.clone()));
                if let Some(lease_host) = lease_host {
                    caller.require_lease_host(on, &lease_host, "keep a lease alive")?;
                }
            }
            match (core.keep_alive_by(now, &id, holder), &details) {
                // Unknown here (a restart): re-attached with the details, for the caller's
                // own member when a member's credential is used (the details' client id is
                // a label); a builder's names the member, on its own host only (above).
                (Err(CoreError::UnknownLease { .. }), Some(d)) => {
                    let client = holder.cloned().unwrap_or_else(|| d.client.clone());
                    core.reattach(now, &id, &d.host, &client, &d.system, &d.drv_path)
                }
                (result, _) => result,
            }
        };
        self.shared.deliver();
        let ttl = ttl.map_err(Error::from)?;
        Ok(Response::new(proto::KeepAliveResponse {
            lease_ttl_millis: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    #[instrument(level = "debug", skip_all, fields(lease, outcome))]
    async fn release(
        &self,
        request: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        let caller = Caller::of(&request)?;
        let scope = caller.lease_scope("release a lease")?;
        let (id, outcome) = convert::release(request.get_ref()).map_err(rejected)?;
        let span = tracing::Span::current();
        span.record("lease", id.as_str());
        span.record("outcome", outcome.as_str());
        let now = self.shared.now();
        let already_released = {
            let mut core = self.shared.core();
            let holder = match &scope {
                LeaseScope::Member(m) => Some(m),
                LeaseScope::Host(on) => {
                    if let Some(lease_host) = core.lease_host(&id) {
                        caller.require_lease_host(on, lease_host, "release a lease")?;
                    }
                    None
                }
                LeaseScope::Anyone => None,
            };
            core.release_by(now, &id, holder, outcome)
                .map_err(Error::from)?
        };
        self.shared.deliver();
        if !already_released {
            metrics::release(outcome.as_str());
            debug!(
                duration_millis = request.get_ref().duration_millis,
                "released"
            );
        }
        Ok(Response::new(proto::ReleaseResponse { already_released }))
    }

    #[instrument(level = "debug", skip_all)]
    async fn list_builders(
        &self,
        request: Request<proto::ListBuildersRequest>,
    ) -> Result<Response<proto::ListBuildersResponse>, Status> {
        let member = Caller::of(&request)?.builders_view()?;
        // In pages, as `ListHosts` reads them: a member's doctor must not hold up other
        // members' requests for the whole of a large fleet.
        let mut builders = Vec::new();
        let mut after: Option<HostId> = None;
        loop {
            let now = self.shared.now();
            let page = self
                .shared
                .core()
                .hosts_page(now, after.as_ref(), HOSTS_PAGE);
            let full = page.len() == HOSTS_PAGE;
            after = page.last().map(|h| h.spec.id.clone());
            builders.extend(
                page.into_iter()
                    .filter(|h| matches!(h.state, HostState::Ready | HostState::Stale))
                    .map(proto::Builder::from),
            );
            if !full {
                break;
            }
            tokio::task::yield_now().await;
        }
        Ok(Response::new(proto::ListBuildersResponse {
            member: member.map(|m| m.to_string()).unwrap_or_default(),
            builders,
        }))
    }
}
