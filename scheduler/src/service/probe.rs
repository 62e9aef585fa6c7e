//! The probe task: asks the core which builders are due for an SSH probe, runs the probes
//! (at most `[probe] concurrency` at once, each bounded by its timeout) and tells the core
//! each verdict with the time it came, so that the core's breaker takes a failing builder
//! out of placement and lets it back in (see `crate::core`). It sleeps until the next probe
//! is due, or until an agent registers (a new builder is probed at once).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::{Shared, metrics};
use crate::core::{BreakerChange, ProbeVerdict};
use crate::probe::Prober;

/// The longest the task sleeps without looking, in case a wake-up was missed.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Runs until the server shuts down. Does nothing when probes are off.
pub(crate) async fn run(shared: Arc<Shared>, prober: Arc<Prober>) {
    if !shared.config.probe.enabled {
        return;
    }
    let permits = Arc::new(Semaphore::new(shared.config.probe.concurrency));
    let down = super::shutting_down(shared.shutdown.clone());
    tokio::pin!(down);
    loop {
        let now = shared.now();
        let free = permits.available_permits();
        let (due, next) = {
            let mut core = shared.core();
            (core.probes_due(now, free), core.next_probe_due())
        };
        for target in due {
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                break; // never: `due` holds at most the free permits
            };
            let (shared, prober) = (shared.clone(), prober.clone());
            tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let verdict = prober.probe(&target).await;
                let kind = match &verdict {
                    ProbeVerdict::Ok => "ok",
                    ProbeVerdict::Failed { kind, .. } => kind.as_str(),
                };
                metrics::probe(kind, started.elapsed().as_secs_f64());
                let change = shared
                    .core()
                    .probe_result(shared.now(), &target, verdict.clone());
                match (change, &verdict) {
                    (Some(BreakerChange::Opened), ProbeVerdict::Failed { kind, detail }) => {
                        warn!(host = %target.id, failure = kind.as_str(), %detail,
                            "SSH probe failed: host taken out of placement");
                        metrics::breaker_change("opened");
                    }
                    (Some(BreakerChange::Closed), _) => {
                        info!(host = %target.id, "SSH probe passed: host back in placement");
                        metrics::breaker_change("closed");
                    }
                    _ => {}
                }
                drop(permit);
                // Its next probe is now queued: let the loop see it.
                shared.probe_wake.notify_one();
            });
        }
        // With every permit taken, due hosts wait for a probe to end (it wakes the loop);
        // sleeping until their due time, already past, would spin.
        let sleep = match next {
            Some(t) if permits.available_permits() > 0 => t.since(shared.now()).min(MAX_SLEEP),
            _ => MAX_SLEEP,
        };
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = shared.probe_wake.notified() => {}
            () = &mut down => break,
        }
    }
}
