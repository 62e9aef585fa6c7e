//! The connection to the scheduler: one `Session` stream at a time, reconnecting forever.
//!
//! A session connects, sends `Register`, and waits for the scheduler's answer, which carries
//! the deadline for the first report. The first report goes out at once (so a new host shows
//! its numbers immediately), each later one at `report_at_fraction` of the deadline the
//! scheduler's last message gave. When the stream breaks, the agent reconnects with
//! [`Backoff`]; a session that was registered resets the back-off. On shutdown the agent sends
//! `Goodbye`, closes its half of the stream and waits, bounded, for the scheduler to close.
//!
//! Resource bounds, so a down or slow scheduler never makes the agent spin or grow:
//! the outbox holds at most [`OUTBOX`] messages and a report that does not fit is dropped
//! (the scheduler is not reading; a newer sample will follow); the back-off never goes below
//! half its current delay; a scheduler that answers no report for `silent_deadlines` of its own
//! deadlines is treated as gone.
//!
//! Logging follows the state, not the attempts: becoming connected, losing the session and
//! starting to fail are logged once each; the individual failed retries are `debug`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use nixdispatch::proto::{self, agent_message::Message};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::backoff::Backoff;
use crate::config::Settings;
use crate::sample::Sampler;

/// Capacity of the outgoing message queue. Reports are sent far apart, so more than a couple
/// waiting means the scheduler is not reading them.
const OUTBOX: usize = 4;

/// The smallest deadline the agent honours; a scheduler that says 0 (a protocol violation)
/// must not make it report in a loop.
const MIN_DEADLINE: Duration = Duration::from_millis(100);

/// How a session ended.
#[derive(Debug)]
enum Ended {
    /// The shutdown future completed; the goodbye was sent.
    Shutdown,
    /// The session failed or was closed.
    Lost {
        /// Whether the scheduler had answered the registration (the session worked).
        registered: bool,
        /// Why, for the log.
        reason: String,
    },
}

/// The connection state, for logging each change once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Connected,
    Retrying,
}

/// Runs sessions until `shutdown` completes.
pub(crate) async fn run(settings: Settings, shutdown: impl Future<Output = ()>) {
    let mut shutdown = std::pin::pin!(shutdown);
    let mut sampler = Sampler::new(settings.sampler.clone());
    let facts = sampler.host_facts();
    let register = proto::Register {
        cpu_count: facts.cpu_count,
        total_memory_bytes: facts.total_memory_bytes,
        ..settings.register.clone()
    };
    let timing = settings.timing;
    let mut backoff = Backoff::new(
        Duration::from_millis(timing.reconnect_initial_millis),
        Duration::from_millis(timing.reconnect_max_millis),
        Backoff::random_seed(),
    );
    let mut state = State::Starting;
    let scheduler = settings.client.endpoint().to_owned();
    tracing::info!(
        host_id = %register.host_id,
        store_uri = %register.store_uri,
        systems = %register.systems.join(","),
        features = %register.supported_features.join(","),
        mandatory_features = %register.mandatory_features.join(","),
        max_jobs = register.max_jobs,
        speed_factor = register.speed_factor,
        %scheduler,
        "agent starting"
    );
    loop {
        match session(
            &settings,
            &register,
            &mut sampler,
            shutdown.as_mut(),
            &mut state,
        )
        .await
        {
            Ended::Shutdown => {
                tracing::info!("agent stopped");
                return;
            }
            Ended::Lost { registered, reason } => {
                if registered {
                    backoff.reset();
                }
                if state == State::Retrying {
                    tracing::debug!(%reason, "scheduler still unreachable");
                } else {
                    if state == State::Connected {
                        tracing::warn!(%reason, "session with the scheduler lost; reconnecting with back-off");
                    } else {
                        tracing::warn!(%reason, %scheduler, "cannot reach the scheduler; retrying with back-off");
                    }
                    state = State::Retrying;
                }
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            biased;
            () = shutdown.as_mut() => {
                tracing::info!("agent stopped while disconnected");
                return;
            }
            () = tokio::time::sleep(delay) => {}
        }
    }
}

fn lost(registered: bool, reason: impl ToString) -> Ended {
    Ended::Lost {
        registered,
        reason: reason.to_string(),
    }
}

fn message(m: Message) -> proto::AgentMessage {
    proto::AgentMessage { message: Some(m) }
}

/// One session, from connecting to its end.
async fn session<F: Future<Output = ()>>(
    settings: &Settings,
    register: &proto::Register,
    sampler: &mut Sampler,
    mut shutdown: Pin<&mut F>,
    state: &mut State,
) -> Ended {
    let timing = settings.timing;
    let connect_timeout = Duration::from_millis(timing.connect_timeout_millis);
    let channel = tokio::select! {
        biased;
        () = shutdown.as_mut() => return Ended::Shutdown,
        channel = settings.client.connect() => match channel {
            Ok(channel) => channel,
            Err(e) => return lost(false, error_chain(&e)),
        },
    };
    let mut client = nixdispatch::client::agent_client(channel);
    let (outbox, rx) = mpsc::channel(OUTBOX);
    // Cannot fail: the queue is new and empty.
    let _ = outbox.try_send(message(Message::Register(register.clone())));
    let call = tokio::time::timeout(connect_timeout, client.session(ReceiverStream::new(rx)));
    let mut inbound = tokio::select! {
        biased;
        () = shutdown.as_mut() => return Ended::Shutdown,
        response = call => match response {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return lost(false, status_text(&status)),
            Err(_) => return lost(false, "the scheduler did not open the session in time"),
        },
    };

    let mut registered = false;
    let mut draining = false;
    // Until the scheduler answers the registration there is no deadline: wait at most the
    // connect timeout for the answer.
    let mut deadline = connect_timeout;
    let mut report_at = Instant::now() + connect_timeout;
    // When the oldest report the scheduler has not answered yet was sent. Silence is measured
    // from there, not from the last answer, so an agent that was itself paused (SIGSTOP, a
    // suspended VM) does not blame the scheduler for the gap when it resumes.
    let mut unanswered_since: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            () = shutdown.as_mut() => {
                say_goodbye(outbox, inbound, Duration::from_millis(timing.goodbye_timeout_millis)).await;
                return Ended::Shutdown;
            }
            received = inbound.message() => match received {
                Ok(Some(m)) => {
                    let now = Instant::now();
                    deadline = Duration::from_millis(m.next_report_within_millis).max(MIN_DEADLINE);
                    unanswered_since = None;
                    if registered {
                        report_at = now + deadline.mul_f64(timing.report_at_fraction);
                    } else {
                        registered = true;
                        // Report at once: the registration carries no load numbers.
                        report_at = now;
                        let again = *state == State::Retrying;
                        tracing::info!(
                            host_id = %register.host_id,
                            next_report_within_millis = m.next_report_within_millis,
                            draining = m.draining,
                            "{}",
                            if again { "reconnected to the scheduler" } else { "registered with the scheduler" },
                        );
                        *state = State::Connected;
                        draining = m.draining;
                    }
                    if m.draining != draining {
                        draining = m.draining;
                        tracing::info!(draining, "drain state changed by an operator");
                    }
                }
                Ok(None) => return lost(registered, "the scheduler closed the session"),
                Err(status) => return lost(registered, status_text(&status)),
            },
            () = tokio::time::sleep_until(report_at) => {
                let now = Instant::now();
                if !registered {
                    return lost(false, "the scheduler did not answer the registration in time");
                }
                let silence = deadline * timing.silent_deadlines;
                if unanswered_since.is_some_and(|since| now.duration_since(since) > silence) {
                    return lost(true, format!("the scheduler answered no report for {silence:?}"));
                }
                unanswered_since.get_or_insert(now);
                let report = proto::Report::from(sampler.sample());
                match outbox.try_send(message(Message::Report(report))) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::debug!("the scheduler is not reading; report dropped");
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        return lost(registered, "the session's request stream closed");
                    }
                }
                // Keep reporting on schedule even if this report's answer is late; the answer
                // moves the next report to its own deadline.
                report_at = now + deadline.mul_f64(timing.report_at_fraction);
            }
        }
    }
}

/// Sends `Goodbye`, closes the request stream and waits (bounded) for the scheduler to end
/// the response stream, so the goodbye is delivered before the connection is dropped.
async fn say_goodbye(
    outbox: mpsc::Sender<proto::AgentMessage>,
    mut inbound: tonic::Streaming<proto::SchedulerMessage>,
    timeout: Duration,
) {
    let goodbye = message(Message::Goodbye(proto::Goodbye {
        reason: "shutdown".into(),
    }));
    let delivered = tokio::time::timeout(timeout, async move {
        if outbox.send(goodbye).await.is_err() {
            return false;
        }
        drop(outbox);
        while let Ok(Some(_)) = inbound.message().await {}
        true
    })
    .await;
    match delivered {
        Ok(true) => tracing::info!("said goodbye to the scheduler"),
        _ => tracing::warn!("could not confirm the goodbye reached the scheduler"),
    }
}

fn status_text(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        text.push_str(": ");
        text.push_str(&error_chain(source));
    }
    text
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        // Some layers repeat their source's message in their own; print each once.
        let message = e.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        next = e.source();
    }
    text
}
