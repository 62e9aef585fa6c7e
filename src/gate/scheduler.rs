//! The gate's side of the lease protocol: `Acquire` for one held build on this host,
//! `KeepAlive` and `Release`, each with a hard time bound.
//!
//! The gate asks on behalf of the member (`client_id`) with the builder's credential, and
//! only ever wants a slot on its own host: it pins the request to it (`pin_host`). A
//! scheduler that predates pinning may still grant another host: that grant is handed back
//! at once and the host excluded from the next `Acquire`s of this build.

use std::time::Duration;

use tonic::Code;

use crate::client::{self, AuthChannel, ClientConfig};
use crate::proto::lease_service_client::LeaseServiceClient;
use crate::proto::{
    AcquireRequest, BuildOutcome, KeepAliveRequest, ReleaseRequest, acquire_response::Outcome,
};

/// What the scheduler said about one held build.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Verdict {
    /// A slot on this host: build now.
    Granted {
        /// The lease.
        lease_id: String,
        /// The lease is the member's build hook's, for this very derivation on this host:
        /// no slot was taken for the gate, which must neither keep it alive nor release it.
        attached: bool,
        /// Keep it alive at least this often.
        keep_alive_every: Duration,
    },
    /// A slot elsewhere: handed back; ask again without that host.
    Elsewhere {
        /// The host granted.
        host_id: String,
    },
    /// Wait and ask again.
    Wait {
        /// The scheduler's hint.
        retry_after: Duration,
        /// 1-based position among the waiting requests for this system.
        position: u32,
        /// Why, for the member.
        reason: String,
    },
    /// The scheduler will not queue this build here (no such host, system or features).
    NotQueued {
        /// Why.
        reason: String,
    },
    /// The scheduler could not be asked.
    Unreachable {
        /// What went wrong.
        error: String,
    },
}

/// A lazily connected scheduler client.
#[derive(Debug)]
pub(super) struct Scheduler {
    config: ClientConfig,
    client: Option<LeaseServiceClient<AuthChannel>>,
    bound: Duration,
}

fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl Scheduler {
    /// A client of `config`, every call bounded by `bound` (connect included).
    pub(super) fn new(config: ClientConfig, bound: Duration) -> Self {
        Scheduler {
            config,
            client: None,
            bound,
        }
    }

    async fn client(&mut self) -> Result<LeaseServiceClient<AuthChannel>, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let channel = client::connect(&self.config)
            .await
            .map_err(|e| crate::gate::error_chain(&e))?;
        let c = client::lease_client(channel);
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Runs one call within the bound; a transport failure forgets the connection.
    async fn call<T, F, Fut>(&mut self, f: F) -> Result<T, String>
    where
        F: FnOnce(LeaseServiceClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let bound = self.bound;
        let result = tokio::time::timeout(bound, async {
            let c = self.client().await?;
            f(c).await.map(tonic::Response::into_inner).map_err(|s| {
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ) {
                    self.client = None;
                }
                status_text(&s)
            })
        })
        .await;
        result.unwrap_or_else(|_| {
            self.client = None;
            Err(format!("no answer within {} ms", bound.as_millis()))
        })
    }

    /// Asks for a slot for `request`; `host_id` is the only acceptable host.
    pub(super) async fn acquire(&mut self, request: AcquireRequest, host_id: &str) -> Verdict {
        match self
            .call(|mut c| async move { c.acquire(request).await })
            .await
        {
            Err(error) => Verdict::Unreachable { error },
            Ok(r) => match r.outcome {
                Some(Outcome::Granted(g)) if g.host_id == host_id => Verdict::Granted {
                    keep_alive_every: Duration::from_millis((g.lease_ttl_millis / 3).max(100)),
                    attached: g.attached,
                    lease_id: g.lease_id,
                },
                // Never hand back a lease the gate did not create.
                Some(Outcome::Granted(g)) if g.attached => Verdict::Unreachable {
                    error: format!(
                        "the scheduler attached a lease on {} instead of this host",
                        g.host_id
                    ),
                },
                Some(Outcome::Granted(g)) => {
                    self.release(&g.lease_id, BuildOutcome::Cancelled, Duration::ZERO)
                        .await;
                    Verdict::Elsewhere { host_id: g.host_id }
                }
                Some(Outcome::Postpone(p)) => Verdict::Wait {
                    retry_after: Duration::from_millis(p.retry_after_millis),
                    position: p.queue_position,
                    reason: p.reason,
                },
                Some(Outcome::Decline(d)) => Verdict::NotQueued { reason: d.reason },
                Some(Outcome::DeclinePermanently(d)) => Verdict::NotQueued { reason: d.reason },
                None => Verdict::Unreachable {
                    error: "the scheduler's answer has no outcome".to_owned(),
                },
            },
        }
    }

    /// Extends a lease.
    pub(super) async fn keep_alive(&mut self, lease_id: &str) -> Result<(), String> {
        // Without the re-attach details: a scheduler that restarted has forgotten the lease,
        // and the gate then holds the build on for the rest of its session unqueued (it
        // fails open) rather than re-counting a slot under a lease it cannot describe.
        let request = KeepAliveRequest {
            lease_id: lease_id.to_owned(),
            ..KeepAliveRequest::default()
        };
        self.call(|mut c| async move { c.keep_alive(request).await })
            .await
            .map(|_| ())
    }

    /// Ends a lease; failures are logged only (the lease then expires on its own).
    pub(super) async fn release(&mut self, lease_id: &str, outcome: BuildOutcome, held: Duration) {
        let request = ReleaseRequest {
            lease_id: lease_id.to_owned(),
            outcome: outcome as i32,
            duration_millis: u64::try_from(held.as_millis()).unwrap_or(u64::MAX),
        };
        match self
            .call(|mut c| async move { c.release(request).await })
            .await
        {
            Ok(_) => tracing::info!(lease_id, ?outcome, "released"),
            Err(error) => tracing::warn!(lease_id, %error, "release failed; the lease will expire"),
        }
    }
}
