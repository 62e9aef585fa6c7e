//! The hook's side of the lease protocol: `Acquire`, `KeepAlive` and `Release` with hard time
//! bounds, and the conversion of the scheduler's wire answer into an [`Answer`].
//!
//! Nothing here blocks longer than the bound it is given; an unreachable scheduler is
//! remembered for `unreachable_backoff_millis` so that a big build does not pay the connect
//! timeout on every `try`.

use std::time::{Duration, Instant};

use tonic::Code;

use super::codec::TryRequest;
use super::decision::Answer;
use super::machine::{BuilderAddress, Grant};
use crate::client::{self, AuthChannel, ClientConfig};
use crate::proto::lease_service_client::LeaseServiceClient;
use crate::proto::{
    AcquireRequest, AcquireResponse, BuildOutcome, KeepAliveRequest, ListBuildersRequest,
    ReleaseRequest, WaitForLeaseRequest, acquire_response::Outcome, wait_for_lease_response::Event,
};

/// How a wait for a lease ended.
#[derive(Debug)]
pub(crate) enum WaitEnd {
    /// The lease, still in its claim window: claim it at once.
    Granted(Grant),
    /// The scheduler will not grant one (no host can build it, or the request is refused).
    Declined(String),
    /// The stream broke, fell silent, or could not be opened: wait again.
    Broken(String),
    /// The member is over its cap of waiting requests (`RESOURCE_EXHAUSTED`, the scheduler's
    /// message): wait a little and ask again.
    OverCap(String),
}

/// One progress event of a waiting stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    /// 1-based position in the queue.
    pub(crate) position: u32,
    /// About how long until the grant.
    pub(crate) estimate: Duration,
}

/// A lazily connected scheduler client.
#[derive(Debug)]
pub(crate) struct Scheduler {
    config: ClientConfig,
    client_id: String,
    client: Option<LeaseServiceClient<AuthChannel>>,
    backoff: Duration,
    /// While set and in the future, `acquire` answers `Unreachable` without calling.
    unreachable_until: Option<(Instant, String)>,
}

/// Whether a failed call means the scheduler itself is unreachable (as opposed to it
/// refusing this one request).
fn is_transport_failure(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

impl Scheduler {
    pub(crate) fn new(config: ClientConfig, client_id: String, backoff: Duration) -> Self {
        Scheduler {
            config,
            client_id,
            client: None,
            backoff,
            unreachable_until: None,
        }
    }

    async fn client(&mut self) -> Result<LeaseServiceClient<AuthChannel>, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let channel = client::connect(&self.config)
            .await
            .map_err(|e| error_chain(&e))?;
        let c = client::lease_client(channel);
        self.client = Some(c.clone());
        Ok(c)
    }

    fn mark_unreachable(&mut self, error: &str) {
        self.client = None;
        self.unreachable_until = Some((Instant::now() + self.backoff, error.to_owned()));
    }

    /// Asks for a host, within `bound`. With `honour_backoff`, a recently unreachable
    /// scheduler is not called again.
    pub(crate) async fn acquire(
        &mut self,
        t: &TryRequest,
        can_build_locally: bool,
        exclude_hosts: &[String],
        bound: Duration,
        honour_backoff: bool,
    ) -> Answer {
        if honour_backoff
            && let Some((until, error)) = &self.unreachable_until
            && Instant::now() < *until
        {
            return Answer::Unreachable {
                error: error.clone(),
            };
        }
        let request = AcquireRequest {
            system: t.needed_system.clone(),
            required_features: t.required_features.clone(),
            drv_path: t.drv_path.clone(),
            client_id: self.client_id.clone(),
            can_build_locally,
            exclude_hosts: exclude_hosts.to_vec(),
            // Any host: the hook lets the scheduler choose (only a builder's gate pins).
            pin_host: String::new(),
        };
        let call = async {
            // A channel cached from before a scheduler restart fails its first call at once:
            // open a fresh one and ask again, within the same bound.
            let cached = self.client.is_some();
            let mut last = None;
            for _ in 0..if cached { 2 } else { 1 } {
                let mut c = self.client().await.map_err(|e| (e, true))?;
                match c.acquire(request.clone()).await {
                    Ok(r) => return Ok(Ok(r.into_inner())),
                    Err(s) if is_transport_failure(&s) => {
                        self.client = None;
                        last = Some((format!("{}: {}", code_name(s.code()), s.message()), true));
                    }
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        return Ok(Err(s.message().to_owned()));
                    }
                    Err(s) => {
                        return Err((format!("{}: {}", code_name(s.code()), s.message()), false));
                    }
                }
            }
            Err(last.expect("at least one attempt"))
        };
        let result = match tokio::time::timeout(bound, call).await {
            Ok(r) => r,
            Err(_) => Err((format!("no answer within {} ms", bound.as_millis()), true)),
        };
        match result {
            Ok(Err(reason)) => {
                self.unreachable_until = None;
                Answer::OverCap { reason }
            }
            Ok(Ok(response)) => {
                self.unreachable_until = None;
                match answer_from_response(response) {
                    Ok(answer) => answer,
                    Err((lease_id, error)) => {
                        // A grant we cannot use: give the slot back at once.
                        if let Some(lease_id) = lease_id {
                            self.release(&lease_id, BuildOutcome::Cancelled, Duration::ZERO, bound)
                                .await;
                        }
                        Answer::Unreachable { error }
                    }
                }
            }
            Err((error, transport)) => {
                if transport {
                    self.mark_unreachable(&error);
                }
                Answer::Unreachable { error }
            }
        }
    }

    /// Extends `grant`'s lease and returns its TTL from now. Carries the lease's details, so
    /// that a scheduler that restarted re-attaches it (and counts the running build) instead
    /// of answering `NOT_FOUND`. A broken channel is dropped, so the next call re-connects.
    pub(crate) async fn keep_alive(
        &mut self,
        grant: &Grant,
        t: &TryRequest,
        bound: Duration,
    ) -> Result<Duration, String> {
        let request = KeepAliveRequest {
            lease_id: grant.lease_id.clone(),
            host_id: grant.host_id.clone(),
            client_id: self.client_id.clone(),
            system: t.needed_system.clone(),
            drv_path: t.drv_path.clone(),
        };
        let call = async {
            // A channel broken by a scheduler restart fails at once: re-connect and ask
            // again, so that the new scheduler re-attaches the lease now, not a period later.
            let attempts = if self.client.is_some() { 2 } else { 1 };
            let mut last = String::new();
            for _ in 0..attempts {
                let mut c = self.client().await?;
                match c.keep_alive(request.clone()).await {
                    Ok(r) => return Ok(Duration::from_millis(r.into_inner().lease_ttl_millis)),
                    Err(s) if is_transport_failure(&s) => {
                        self.client = None;
                        last = format!("{}: {}", code_name(s.code()), s.message());
                    }
                    Err(s) => return Err(format!("{}: {}", code_name(s.code()), s.message())),
                }
            }
            Err(last)
        };
        tokio::time::timeout(bound, call)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", bound.as_millis())))
    }

    /// Waits in the scheduler's queue for a lease for `t`, calling `progress` with each
    /// position update. Ends with the grant, a refusal, or a broken stream (opening it
    /// failed, it ended without an answer, or it brought no word for `idle`); a broken
    /// channel is dropped so the next call re-connects.
    pub(crate) async fn wait(
        &mut self,
        t: &TryRequest,
        idle: Duration,
        mut progress: impl FnMut(Progress),
    ) -> WaitEnd {
        let request = WaitForLeaseRequest {
            system: t.needed_system.clone(),
            required_features: t.required_features.clone(),
            drv_path: t.drv_path.clone(),
            client_id: self.client_id.clone(),
            can_build_locally: false,
            exclude_hosts: Vec::new(),
            pin_host_id: String::new(),
        };
        let broken = |this: &mut Self, why: String| {
            this.client = None;
            WaitEnd::Broken(why)
        };
        let mut c = match tokio::time::timeout(idle, self.client()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return broken(self, e),
            Err(_) => return broken(self, "connect timed out".to_owned()),
        };
        let mut stream = match tokio::time::timeout(idle, c.wait_for_lease(request)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) if is_transport_failure(&s) => {
                return broken(self, format!("{}: {}", code_name(s.code()), s.message()));
            }
            Ok(Err(s)) if s.code() == Code::ResourceExhausted => {
                return WaitEnd::OverCap(s.message().to_owned());
            }
            Ok(Err(s)) => {
                return WaitEnd::Declined(format!("{}: {}", code_name(s.code()), s.message()));
            }
            Err(_) => return broken(self, "no answer to WaitForLease".to_owned()),
        };
        loop {
            let event = match tokio::time::timeout(idle, stream.message()).await {
                Err(_) => {
                    return broken(
                        self,
                        format!("no word from the scheduler for {} s", idle.as_secs()),
                    );
                }
                Ok(Err(s)) => {
                    return broken(self, format!("{}: {}", code_name(s.code()), s.message()));
                }
                Ok(Ok(None)) => {
                    return broken(self, "the waiting stream ended without an answer".into());
                }
                Ok(Ok(Some(m))) => m.event,
            };
            match event {
                Some(Event::Waiting(w)) => progress(Progress {
                    position: w.queue_position,
                    estimate: Duration::from_millis(w.estimated_wait_millis),
                }),
                Some(Event::Granted(g)) => {
                    let lease_id = g.lease_id.clone();
                    match Grant::try_from(g) {
                        Ok(g) => return WaitEnd::Granted(g),
                        Err(e) => {
                            self.release(&lease_id, BuildOutcome::Cancelled, Duration::ZERO, idle)
                                .await;
                            return WaitEnd::Declined(format!("unusable grant: {e}"));
                        }
                    }
                }
                Some(Event::Decline(d)) => return WaitEnd::Declined(d.reason),
                Some(Event::DeclinePermanently(d)) => return WaitEnd::Declined(d.reason),
                None => {}
            }
        }
    }

    /// The builders this member may be sent to that fit `t` (`ListBuilders`), at most
    /// `max`, within `bound`; none when the call fails (a scheduler that predates it, or is
    /// away): they only serve to connect ahead.
    pub(crate) async fn builders_for(
        &mut self,
        t: &TryRequest,
        max: usize,
        bound: Duration,
    ) -> Vec<BuilderAddress> {
        let call = async {
            let mut c = self.client().await?;
            c.list_builders(ListBuildersRequest {})
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| {
                    if is_transport_failure(&s) {
                        self.client = None;
                    }
                    format!("{}: {}", code_name(s.code()), s.message())
                })
        };
        match tokio::time::timeout(bound, call).await {
            Ok(Ok(r)) => r
                .builders
                .into_iter()
                .filter_map(|b| BuilderAddress::fitting(b, &t.needed_system, &t.required_features))
                .take(max)
                .collect(),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "ListBuilders failed; not connecting ahead");
                Vec::new()
            }
            Err(_) => Vec::new(),
        }
    }

    /// Ends a lease with the build's outcome. Failures are only logged: the lease then
    /// expires on its own.
    pub(crate) async fn release(
        &mut self,
        lease_id: &str,
        outcome: BuildOutcome,
        duration: Duration,
        bound: Duration,
    ) {
        let request = ReleaseRequest {
            lease_id: lease_id.to_owned(),
            outcome: outcome as i32,
            duration_millis: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        };
        let call = async {
            let mut c = self.client().await?;
            c.release(request).await.map(|_| ()).map_err(|s| {
                if is_transport_failure(&s) {
                    self.client = None;
                }
                format!("{}: {}", code_name(s.code()), s.message())
            })
        };
        match tokio::time::timeout(bound, call).await {
            Ok(Ok(())) => tracing::info!(lease_id, ?outcome, "released"),
            Ok(Err(e)) => {
                tracing::warn!(lease_id, error = %e, "release failed; the lease will expire")
            }
            Err(_) => tracing::warn!(lease_id, "release timed out; the lease will expire"),
        }
    }
}

pub(crate) use crate::diag::error_chain;

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::InvalidArgument => "invalid argument",
        Code::NotFound => "not found",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission denied",
        Code::FailedPrecondition => "failed precondition",
        Code::ResourceExhausted => "resource exhausted",
        Code::Unimplemented => "unimplemented",
        _ => "error",
    }
}

/// Converts the wire answer. An unusable grant is an error that carries its lease id so the
/// caller can hand the slot back.
pub(crate) fn answer_from_response(r: AcquireResponse) -> Result<Answer, (Option<String>, String)> {
    match r.outcome {
        Some(Outcome::Granted(g)) => {
            let lease_id = g.lease_id.clone();
            Grant::try_from(g).map(Answer::Granted).map_err(|e| {
                (
                    Some(lease_id).filter(|l| !l.is_empty()),
                    format!("unusable grant: {e}"),
                )
            })
        }
        Some(Outcome::Postpone(p)) => Ok(Answer::Postpone {
            retry_after: Duration::from_millis(p.retry_after_millis),
            queue_position: p.queue_position,
            reason: p.reason,
        }),
        Some(Outcome::Decline(d)) => Ok(Answer::Decline { reason: d.reason }),
        Some(Outcome::DeclinePermanently(d)) => Ok(Answer::DeclinePermanently { reason: d.reason }),
        None => Err((None, "the scheduler's answer has no outcome".to_owned())),
    }
}
