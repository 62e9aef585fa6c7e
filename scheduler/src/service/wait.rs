//! `WaitForLease`: the waiting streams.
//!
//! A queued request's stream is a [`WaitStream`]: its first event says where it stands, a
//! progress task adds one when its position or estimate changes, and its grant arrives on a
//! oneshot channel registered in [`Shared`] under the core's lock in the same critical
//! section that queued it, so no grant can be made before its channel exists.
//!
//! Dropping the stream (the client cancelled, its connection broke, or tonic gave up on it)
//! takes the waiter out of the queue at once. A grant that reached the channel but was never
//! yielded to tonic goes back to the core and on to the next waiter; one that was yielded
//! is the client's: if it never arrives, its claim window runs out.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use nixdispatch::proto::{self, wait_for_lease_response::Event};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::Status;

use super::{Shared, convert, metrics};
use crate::core::{LeaseId, WaitStatus, WaiterId};

/// Progress events that may wait for a slow reader; later ones are dropped meanwhile (each
/// repeats the whole state).
const PROGRESS_BUFFER: usize = 2;

type Item = Result<proto::WaitForLeaseResponse, Status>;

/// The response stream of one `WaitForLease` call.
#[derive(Debug)]
pub struct WaitStream {
    /// The first event: `waiting`, or the final answer when the request did not queue.
    first: Option<proto::WaitForLeaseResponse>,
    /// Where the grant arrives.
    grant: Option<oneshot::Receiver<proto::WaitForLeaseResponse>>,
    /// Progress events (and the shutdown status).
    progress: Option<mpsc::Receiver<Item>>,
    /// Armed while the waiter waits: dropping the stream then abandons it.
    guard: Option<(Arc<Shared>, WaiterId)>,
    done: bool,
}

impl WaitStream {
    /// A stream of one final event.
    pub(super) fn answered(event: proto::WaitForLeaseResponse) -> Self {
        Self {
            first: Some(event),
            grant: None,
            progress: None,
            guard: None,
            done: false,
        }
    }

    /// The stream of a queued waiter; starts its progress task.
    pub(super) fn queued(
        shared: Arc<Shared>,
        waiter: WaiterId,
        status: WaitStatus,
        reason: String,
        grant: oneshot::Receiver<proto::WaitForLeaseResponse>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(PROGRESS_BUFFER);
        tokio::spawn(progress(shared.clone(), waiter, reason.clone(), tx));
        Self {
            first: Some(convert::waiting(status, reason)),
            grant: Some(grant),
            progress: Some(rx),
            guard: Some((shared, waiter)),
            done: false,
        }
    }
}

impl Stream for WaitStream {
    type Item = Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(first) = this.first.take() {
            this.done = this.guard.is_none();
            return Poll::Ready(Some(Ok(first)));
        }
        if let Some(rx) = &mut this.grant {
            match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(event)) => {
                    // Handed to tonic: from here on the grant is the client's.
                    this.guard = None;
                    this.done = true;
                    return Poll::Ready(Some(Ok(event)));
                }
                Poll::Ready(Err(_)) => this.grant = None,
                Poll::Pending => {}
            }
        }
        if let Some(rx) = &mut this.progress {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(event))) => return Poll::Ready(Some(Ok(event))),
                Poll::Ready(Some(Err(status))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(None) => this.progress = None,
                Poll::Pending => {}
            }
        }
        if this.grant.is_none() {
            // The grant's sender is gone without a grant: the waiter was abandoned.
            this.done = true;
            return Poll::Ready(Some(Err(Status::aborted("the wait was abandoned"))));
        }
        Poll::Pending
    }
}

impl Drop for WaitStream {
    fn drop(&mut self) {
        let Some((shared, waiter)) = self.guard.take() else {
            return;
        };
        // A grant sent but never yielded goes back.
        let unread = self.grant.as_mut().and_then(|rx| {
            rx.close();
            rx.try_recv().ok()
        });
        let lease = unread.and_then(|e| match e.event {
            Some(Event::Granted(g)) => Some(LeaseId::new(g.lease_id)),
            _ => None,
        });
        shared.abandon(waiter, lease);
    }
}

/// Sends `waiter`'s position and estimate every progress interval (also a heartbeat: a
/// client that hears nothing for several intervals knows its stream is dead), until it is
/// no longer waiting, its stream is gone, or the scheduler shuts down (then `UNAVAILABLE`:
/// wait again).
async fn progress(shared: Arc<Shared>, waiter: WaiterId, reason: String, tx: mpsc::Sender<Item>) {
    let every = std::time::Duration::from_millis(shared.config.queue.progress_interval_millis);
    let down = super::shutting_down(shared.shutdown.clone());
    tokio::pin!(down);
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = tx.closed() => return,
            () = &mut down => {
                let _ = tx.try_send(Err(Status::unavailable(
                    "the scheduler is shutting down; wait again",
                )));
                return;
            }
        }
        let now = shared.now();
        let Some(status) = shared.core().wait_status(now, waiter) else {
            return;
        };
        // A full buffer means the client is not reading; the next one repeats all.
        let _ = tx.try_send(Ok(convert::waiting(status, reason.clone())));
        metrics::queue_progress();
    }
}
