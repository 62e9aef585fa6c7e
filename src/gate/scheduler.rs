//! The gate's side of the lease protocol: `WaitForLease` for one held build on this host
//! (`Acquire` polls with a scheduler that predates it), `KeepAlive` and `Release`, each
//! with a hard time bound.
//!
//! The gate asks on behalf of the member (`client_id`) with the builder's credential, and
//! only ever wants a slot on its own host: it pins the request to it (`pin_host_id`,
//! `pin_host`). A scheduler that predates pinning may still grant another host: that grant
//! is handed back at once and the host excluded from the next requests of this build.

use std::time::Duration;

use tonic::Code;

use crate::client::{self, AuthChannel, ClientConfig};
use crate::proto::lease_service_client::LeaseServiceClient;
use crate::proto::{
    AcquireRequest, BuildOutcome, Granted, KeepAliveRequest, ReleaseRequest, WaitForLeaseRequest,
    WaitForLeaseResponse, acquire_response::Outcome, wait_for_lease_response::Event,
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
    /// Queued in a `WaitForLease` stream: the next event comes by itself.
    Queued {
        /// 1-based position among the requests waiting for this host.
        position: u32,
        /// The scheduler's estimate of the time left (an estimate, for the member).
        estimate: Duration,
        /// Why, for the member.
        reason: String,
    },
    /// The `WaitForLease` stream broke (error, end without an answer, or silence past the
    /// bound): open it again.
    Broken {
        /// What went wrong.
        error: String,
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

/// The opening of a `WaitForLease` stream.
#[derive(Debug)]
pub(super) enum Opened {
    /// Waiting: read it with [`Scheduler::next_event`]. Boxed: the stream is ten times the
    /// size of the other variants.
    Stream(Box<tonic::Streaming<WaitForLeaseResponse>>),
    /// The scheduler predates `WaitForLease` (`UNIMPLEMENTED`): poll `Acquire` instead.
    Unsupported,
    /// The scheduler could not be asked.
    Unreachable(String),
}

/// A lazily connected scheduler client.
#[derive(Debug)]
pub(super) struct Scheduler {
    config: ClientConfig,
    client: Option<LeaseServiceClient<AuthChannel>>,
    bound: Duration,
}

/// How often to keep alive a lease of `ttl_millis` (the hook's cadence, so that a restarted
/// scheduler's hold covers gated builds too).
fn keep_alive_every(ttl_millis: u64) -> Duration {
    crate::client::keep_alive_every(Duration::from_millis(ttl_millis))
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

    /// Opens a `WaitForLease` stream for `request`, within the call bound.
    pub(super) async fn open_wait(&mut self, request: WaitForLeaseRequest) -> Opened {
        let bound = self.bound;
        let opened = tokio::time::timeout(bound, async {
            let mut c = self.client().await.map_err(Opened::Unreachable)?;
            c.wait_for_lease(request).await.map_err(|s| {
                if s.code() == Code::Unimplemented {
                    return Opened::Unsupported;
                }
                if matches!(
                    s.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ) {
                    self.client = None;
                }
                Opened::Unreachable(status_text(&s))
            })
        })
        .await;
        match opened {
            Ok(Ok(r)) => Opened::Stream(Box::new(r.into_inner())),
            Ok(Err(o)) => o,
            Err(_) => {
                self.client = None;
                Opened::Unreachable(format!("no answer within {} ms", bound.as_millis()))
            }
        }
    }

    /// The next event of a `WaitForLease` stream; `silence` bounds the wait for it (the
    /// scheduler sends `waiting` once per progress interval, 5 s by default).
    pub(super) async fn next_event(
        &mut self,
        stream: &mut tonic::Streaming<WaitForLeaseResponse>,
        host_id: &str,
        silence: Duration,
    ) -> Verdict {
        let event = match tokio::time::timeout(silence, stream.message()).await {
            Err(_) => {
                return Verdict::Broken {
                    error: format!("nothing heard for {} ms", silence.as_millis()),
                };
            }
            Ok(Err(s)) => {
                return Verdict::Broken {
                    error: status_text(&s),
                };
            }
            Ok(Ok(None)) => {
                return Verdict::Broken {
                    error: "the stream ended without an answer".to_owned(),
                };
            }
            Ok(Ok(Some(m))) => m.event,
        };
        match event {
            Some(Event::Waiting(w)) => Verdict::Queued {
                position: w.queue_position,
                estimate: Duration::from_millis(w.estimated_wait_millis),
                reason: w.reason,
            },
            Some(Event::Granted(g)) => self.granted(g, host_id).await,
            Some(Event::Decline(d)) => Verdict::NotQueued { reason: d.reason },
            Some(Event::DeclinePermanently(d)) => Verdict::NotQueued { reason: d.reason },
            None => Verdict::Broken {
                error: "an event without content".to_owned(),
            },
        }
    }

    /// A grant, checked to be for `host_id`; one for another host is handed back.
    async fn granted(&mut self, g: Granted, host_id: &str) -> Verdict {
        if g.host_id == host_id {
            return Verdict::Granted {
                keep_alive_every: keep_alive_every(g.lease_ttl_millis),
                attached: g.attached,
                lease_id: g.lease_id,
            };
        }
        // Never hand back a lease the gate did not create.
        if g.attached {
            return Verdict::Unreachable {
                error: format!(
                    "the scheduler attached a lease on {} instead of this host",
                    g.host_id
                ),
            };
        }
        self.release(&g.lease_id, BuildOutcome::Cancelled, Duration::ZERO)
            .await;
        Verdict::Elsewhere { host_id: g.host_id }
    }

    /// Asks for a slot for `request`; `host_id` is the only acceptable host.
    pub(super) async fn acquire(&mut self, request: AcquireRequest, host_id: &str) -> Verdict {
        match self
            .call(|mut c| async move { c.acquire(request).await })
            .await
        {
            Err(error) => Verdict::Unreachable { error },
            Ok(r) => match r.outcome {
                Some(Outcome::Granted(g)) => self.granted(g, host_id).await,
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

    /// Extends a lease; returns how often to keep it alive from now on (a third of its new
    /// TTL: a `WaitForLease` grant starts with a short claim window). `request` carries the
    /// lease's details, so that a scheduler that restarted re-attaches the lease and the
    /// build stays counted (the agent's gate socket fills them in from its own record).
    pub(super) async fn keep_alive(
        &mut self,
        request: &KeepAliveRequest,
    ) -> Result<Duration, String> {
        let request = request.clone();
        self.call(|mut c| async move { c.keep_alive(request).await })
            .await
            .map(|r| keep_alive_every(r.lease_ttl_millis))
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
