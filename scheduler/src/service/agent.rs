//! `nixdispatch.v1.AgentService`: one long-lived stream per builder.
//!
//! Each stream runs in its own task: registration (bounded by a timeout), then reports until
//! the agent leaves, the stream breaks, a newer stream of the same host takes over, or the
//! scheduler shuts down. A misbehaving stream is closed with a status naming the problem and
//! never affects other agents.

use std::sync::Arc;
use std::time::Duration;

use nixdispatch::proto::{self, agent_message, agent_service_server};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};

use super::{AgentLink, Shared, metrics};
use crate::Error;
use crate::auth::Caller;
use crate::core::{HostReport, HostSpec};

/// Answers per stream that may wait for the agent to read them. Each answer supersedes the
/// previous one, so a small buffer is enough.
const OUTBOX: usize = 4;

/// Accepts agent streams.
#[derive(Debug, Clone)]
pub struct AgentService {
    shared: Arc<Shared>,
}

impl AgentService {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type Outbox = mpsc::Sender<Result<proto::SchedulerMessage, Status>>;

#[tonic::async_trait]
impl agent_service_server::AgentService for AgentService {
    type SessionStream = ReceiverStream<Result<proto::SchedulerMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let peer = request.remote_addr();
        let caller = Caller::of(&request)?;
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(OUTBOX);
        let shared = self.shared.clone();
        let span = info_span!("agent", peer = ?peer, host = tracing::field::Empty);
        tokio::spawn(
            async move {
                if let Err(e) = run_session(&shared, &caller, inbound, &tx).await {
                    warn!(error = %e, "agent stream closed with an error");
                    // Bounded: an agent that does not read gets its stream closed without
                    // the status rather than pinning this task.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), tx.send(Err(e.into()))).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Waits for the registration.
async fn register(
    shared: &Shared,
    inbound: &mut Streaming<proto::AgentMessage>,
) -> Result<Option<HostSpec>, Error> {
    let timeout = Duration::from_millis(shared.config.agents.register_timeout_millis);
    let first = match tokio::time::timeout(timeout, inbound.message()).await {
        Err(_) => {
            return Err(Error::Protocol(format!(
                "no registration within {} ms",
                timeout.as_millis()
            )));
        }
        Ok(Err(status)) => return Err(crate::limits::broken_stream(status)),
        Ok(Ok(None)) => return Ok(None),
        Ok(Ok(Some(m))) => m,
    };
    match first.message {
        Some(agent_message::Message::Register(r)) => HostSpec::try_from(r).map(Some),
        Some(_) => Err(Error::Protocol(
            "the first message must be `register`".into(),
        )),
        None => Err(Error::Protocol(
            "empty message: set one of register, report, goodbye".into(),
        )),
    }
}

async fn run_session(
    shared: &Shared,
    caller: &Caller,
    mut inbound: Streaming<proto::AgentMessage>,
    tx: &Outbox,
) -> Result<(), Error> {
    let Some(spec) = register(shared, &mut inbound).await? else {
        return Ok(());
    };
    let id = spec.id.clone();
    tracing::Span::current().record("host", id.as_str());
    // Before `connect`: a refused registration never supersedes the connected agent.
    if let Err(e) = shared.auth.check_registration(caller, &spec) {
        warn!(identity = %caller.identity, store_uri = %spec.store_uri, error = %e, "registration refused");
        metrics::rejected("agent");
        return Err(e);
    }
    let (systems, slots) = (spec.systems.len(), spec.max_jobs);
    let generation = shared.core().connect(shared.now(), spec);
    shared.deliver();
    shared.probe_wake.notify_one();
    let superseded = Arc::new(Notify::new());
    let link = AgentLink {
        generation,
        tx: tx.clone(),
        superseded: superseded.clone(),
    };
    if let Some(old) = shared.agents.insert(id.clone(), link) {
        old.superseded.notify_one();
    }
    info!(systems, slots, "agent registered");
    metrics::agent_streams(1.0);
    let _ = tx.try_send(Ok(shared.directive(&id)));

    let shutdown = super::shutting_down(shared.shutdown.clone());
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            message = inbound.message() => {
                let message = match message {
                    Ok(Some(m)) => m,
                    Ok(None) => {
                        info!("agent stream ended");
                        break Ok(());
                    }
                    Err(status) => {
                        info!(%status, "agent stream broke");
                        break Err(crate::limits::broken_stream(status));
                    }
                };
                match message.message {
                    Some(agent_message::Message::Report(r)) => {
                        let report = match HostReport::try_from(r) {
                            Ok(r) => r,
                            Err(e) => break Err(e),
                        };
                        if let Err(e) = shared.core().report(shared.now(), &id, generation, report) {
                            break Err(e.into());
                        }
                        shared.deliver();
                        metrics::agent_report();
                        // Never wait for an agent that does not read: each answer carries the
                        // whole current state, so dropping one when the outbox is full loses
                        // nothing the next one does not repeat.
                        if let Err(mpsc::error::TrySendError::Closed(_)) =
                            tx.try_send(Ok(shared.directive(&id)))
                        {
                            break Ok(());
                        }
                    }
                    Some(agent_message::Message::Goodbye(g)) => {
                        info!(reason = %g.reason.chars().take(256).collect::<String>(), "agent said goodbye");
                        // Best effort: a superseded stream's goodbye changes nothing.
                        let _ = shared.core().goodbye(&id, generation);
                        break Ok(());
                    }
                    Some(agent_message::Message::Register(_)) => {
                        break Err(Error::Protocol("`register` may only be the first message".into()));
                    }
                    None => break Err(Error::Protocol("empty message: set one of register, report, goodbye".into())),
                }
            }
            () = superseded.notified() => {
                info!("agent stream replaced by a newer connection");
                break Err(crate::core::Error::Superseded { host_id: id.to_string() }.into());
            }
            () = &mut shutdown => {
                let _ = tx.try_send(Err(Status::unavailable("the scheduler is shutting down")));
                break Ok(());
            }
        }
    };
    // Only the current stream may mark the host disconnected or drop its link.
    shared.core().disconnect(shared.now(), &id, generation);
    shared
        .agents
        .remove_if(&id, |_, link| link.generation == generation);
    metrics::agent_streams(-1.0);
    result
}
