//! The lease lifecycle of one hook process, whatever protocol Nix speaks with the hook:
//! acquire for a `try`, keep the lease alive while the build runs, release it with the
//! outcome, and when the granted host cannot be used, release it as unreachable and acquire
//! another (bounded by `max_host_attempts` and `reacquire_millis`). A host that failed is
//! avoided for [`AVOID_FAILED_HOST`] only, not for good: when no other host can take the
//! build (one builder per system is common), the same host is tried again once the
//! scheduler's cool-down for this member ends, so that a transient failure does not fail the
//! build. A signal from Nix releases the held lease as cancelled.
//!
//! The Nix-facing front end implements [`Frontend`]: it shows messages to the user and runs
//! one attempt of the accepted build on a granted host. Today that is the text protocol
//! (`run`); a Cap'n Proto front end for Lix 2.94+ would be a second implementation, with no
//! lease handling of its own.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::codec::{Level, TryRequest};
use super::config::{self, HookConfig};
use super::decision::{self, AfterChild, Answer, ChildEnd};
use super::machine::{BuilderAddress, Grant};
use super::scheduler::{Progress, Scheduler, WaitEnd};
use crate::client::ClientConfig;
use crate::proto::BuildOutcome;

/// What the lease lifecycle needs from the front end that talks to Nix.
pub(crate) trait Frontend {
    /// Shows `message` to the user at `level`.
    fn notify(&mut self, level: Level, message: &str);

    /// Whether to call [`Frontend::connect_ahead`] now (so the builders are asked for).
    fn connects_ahead(&self) -> bool {
        false
    }

    /// While the build waits for a lease: prepares connections to the builders it may be
    /// granted, so that the grant finds one ready. Must not block.
    fn connect_ahead(&mut self, _hosts: &[BuilderAddress]) {}

    /// Runs the accepted build once, on `grant`'s host. Returns how it ended and, when it
    /// never got going there, what it said about why. `Err` is a local failure (not the
    /// host's fault). Dropping the future must stop the attempt: that is how a signal from
    /// Nix ends it.
    async fn attempt(&mut self, grant: &Grant) -> Result<(ChildEnd, String), String>;
}

/// The lease currently held, shared with the signal handler so it can release it.
type Held = Rc<RefCell<Option<(String, Instant)>>>;

/// The scheduler's leases for one hook process.
pub(crate) struct Leases {
    scheduler: Scheduler,
    try_timeout: Duration,
    rpc_timeout: Duration,
    reacquire_window: Duration,
    max_host_attempts: u32,
    max_wait: Duration,
    wait_idle: Duration,
}

impl Leases {
    /// A client of the configured scheduler (no connection is made yet).
    pub(crate) fn new(config: &HookConfig) -> Leases {
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(config::default_client_id);
        let scheduler = Scheduler::new(
            ClientConfig {
                endpoint: config.scheduler.clone(),
                credential_file: config.credential_file.clone(),
                connect_timeout: Duration::from_millis(config.timeouts.connect_millis),
                request_timeout: None,
                ca_file: config.ca_file.clone(),
                tls_domain: config.tls_domain.clone(),
                keepalive: None,
            },
            client_id,
            Duration::from_millis(config.timeouts.unreachable_backoff_millis),
        );
        Leases {
            scheduler,
            try_timeout: config.try_timeout(),
            rpc_timeout: config.rpc_timeout(),
            reacquire_window: Duration::from_millis(config.timeouts.reacquire_millis),
            max_host_attempts: config.max_host_attempts,
            max_wait: Duration::from_millis(config.timeouts.max_wait_millis),
            wait_idle: Duration::from_millis(config.timeouts.wait_idle_millis),
        }
    }

    /// After an accept with no host yet: waits in the scheduler's queue for a lease and
    /// claims it. Shows the member its position when it changes. When the scheduler goes
    /// away the hook re-connects and waits again (its place is kept by the scheduler while
    /// it is up; after a restart it queues anew), with a growing pause of up to 5 s between
    /// attempts, for at most `max_wait_millis` in all. `Err` says why there is no lease.
    pub(crate) async fn wait_for_grant(
        &mut self,
        frontend: &mut impl Frontend,
        t: &TryRequest,
    ) -> Result<Grant, String> {
        let deadline = Instant::now() + self.max_wait;
        if frontend.connects_ahead() {
            let hosts = self
                .scheduler
                .builders_for(t, CONNECT_AHEAD_MAX, self.rpc_timeout)
                .await;
            frontend.connect_ahead(&hosts);
        }
        let mut shown: Option<String> = None;
        let mut warned = false;
        let mut warned_cap = false;
        let mut pause = Duration::from_millis(200);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(format!(
                    "no {} builder within {} (timeouts.max_wait_millis)",
                    t.needed_system,
                    decision::about(self.max_wait).replace("about ", "")
                ));
            }
            let show = |p: Progress| {
                let line = decision::waiting_line(&t.needed_system, p.position, p.estimate);
                if shown.as_deref() != Some(line.as_str()) {
                    frontend.notify(Level::Info, &line);
                    shown = Some(line);
                }
            };
            let end = tokio::time::timeout(remaining, self.scheduler.wait(t, self.wait_idle, show))
                .await
                .unwrap_or_else(|_| WaitEnd::Broken("the maximum wait ran out".to_owned()));
            match end {
                WaitEnd::Granted(mut grant) => {
                    tracing::info!(host = %grant.host_id, "lease granted");
                    // Claim it within its claim window; the answer is the TTL from now on.
                    match self.scheduler.keep_alive(&grant, t, self.rpc_timeout).await {
                        Ok(ttl) => grant.lease_ttl = ttl,
                        Err(e) => {
                            tracing::warn!(error = %e, "claiming the lease failed; building anyway")
                        }
                    }
                    return Ok(grant);
                }
                WaitEnd::Declined(reason) => return Err(reason),
                WaitEnd::OverCap(reason) => {
                    // Accepted already: a failure would throw the build away, and the cap
                    // frees as the member's other waiting builds are served.
                    tracing::info!(%reason, "over the waiting cap; asking again");
                    if !warned_cap {
                        warned_cap = true;
                        frontend.notify(
                            Level::Warn,
                            &decision::over_cap(
                                decision::drv_name(&t.drv_path),
                                &reason,
                                "asking again in a few seconds",
                            ),
                        );
                    }
                    shown = None;
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(Duration::from_secs(5).min(remaining)).await;
                }
                WaitEnd::Broken(why) => {
                    tracing::info!(%why, "waiting stream broken; waiting again");
                    if !warned {
                        warned = true;
                        frontend.notify(
                            Level::Warn,
                            &format!(
                                "nixdispatch: lost the scheduler ({why}); still waiting for {}",
                                decision::builder_of(&t.needed_system)
                            ),
                        );
                    }
                    shown = None;
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(pause.min(remaining)).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Asks for a lease to answer one `try`, within the `try` bound. `local`: the client
    /// could build it itself.
    pub(crate) async fn acquire(&mut self, t: &TryRequest, local: bool) -> Answer {
        self.scheduler
            .acquire(t, local, &[], self.try_timeout, true)
            .await
    }

    /// Gives back a granted lease whose build never started.
    pub(crate) async fn cancel(&mut self, grant: &Grant) {
        self.scheduler
            .release(
                &grant.lease_id,
                BuildOutcome::Cancelled,
                Duration::ZERO,
                self.rpc_timeout,
            )
            .await;
    }

    /// Runs the accepted build through `frontend` and returns the hook's exit status. On
    /// SIGTERM, SIGINT or SIGHUP (Nix stopping the build) releases the lease as cancelled
    /// and returns 1; dropping the attempt stops it.
    pub(crate) async fn build(
        &mut self,
        frontend: &mut impl Frontend,
        grant: Grant,
        t: &TryRequest,
    ) -> i32 {
        use tokio::signal::unix::{SignalKind, signal};
        let held: Held = Rc::new(RefCell::new(None));
        let signals = async {
            let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            ) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
        };
        let outcome = {
            let build = self.build_on_hosts(frontend, grant, t, held.clone());
            tokio::select! {
                code = build => Some(code),
                () = signals => None,
            }
        };
        match outcome {
            Some(code) => code,
            None => {
                let lease = held.borrow_mut().take();
                if let Some((lease_id, since)) = lease {
                    // Current Nix sends SIGKILL 500 ms after SIGTERM: release within that.
                    self.scheduler
                        .release(
                            &lease_id,
                            BuildOutcome::Cancelled,
                            since.elapsed(),
                            Duration::from_millis(300),
                        )
                        .await;
                }
                1
            }
        }
    }

    /// Builds on the granted host; when the front end cannot use the host, asks the
    /// scheduler for another one (up to `max_host_attempts` hosts in all).
    async fn build_on_hosts(
        &mut self,
        frontend: &mut impl Frontend,
        mut grant: Grant,
        t: &TryRequest,
        held: Held,
    ) -> i32 {
        let name = decision::drv_name(&t.drv_path).to_owned();
        // Hosts that failed this build, and when.
        let mut failed: Vec<(String, Instant)> = Vec::new();
        let mut attempt = 1;
        let deadline = Instant::now() + self.reacquire_window;
        loop {
            let started = Instant::now();
            *held.borrow_mut() = Some((grant.lease_id.clone(), started));
            let result = {
                let keep_alive = keep_alive(&mut self.scheduler, &grant, t, self.rpc_timeout);
                tokio::select! {
                    r = frontend.attempt(&grant) => r,
                    never = keep_alive => match never {},
                }
            };
            let (end, detail) = match result {
                Ok(r) => r,
                Err(e) => {
                    // Not the host's fault: the local build-remote could not even start.
                    frontend.notify(Level::Error, &format!("nixdispatch: {e}"));
                    held.borrow_mut().take();
                    self.scheduler
                        .release(
                            &grant.lease_id,
                            BuildOutcome::Cancelled,
                            started.elapsed(),
                            self.rpc_timeout,
                        )
                        .await;
                    return 1;
                }
            };
            let AfterChild {
                outcome,
                exit_code: exit,
            } = decision::after_child(end, attempt, self.max_host_attempts);
            held.borrow_mut().take();
            self.scheduler
                .release(
                    &grant.lease_id,
                    outcome,
                    started.elapsed(),
                    self.rpc_timeout,
                )
                .await;
            tracing::info!(host = %grant.host_id, ?end, ?outcome, attempt, "child ended");
            if outcome == BuildOutcome::HostUnreachable {
                let why = if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                };
                frontend.notify(
                    Level::Warn,
                    &format!(
                        "nixdispatch: cannot use builder {} for {name}{why}",
                        grant.host_id
                    ),
                );
            }
            if let Some(code) = exit {
                if outcome == BuildOutcome::HostUnreachable {
                    frontend.notify(
                        Level::Error,
                        &format!(
                            "nixdispatch: no reachable builder for {name} after {attempt} attempts"
                        ),
                    );
                }
                return code;
            }
            failed.retain(|(h, _)| *h != grant.host_id);
            failed.push((grant.host_id.clone(), Instant::now()));
            grant = match self.reacquire(frontend, t, &failed, deadline).await {
                Ok(g) => g,
                Err(e) => {
                    frontend.notify(
                        Level::Error,
                        &format!("nixdispatch: no other builder for {name}: {e}"),
                    );
                    return 1;
                }
            };
            frontend.notify(
                Level::Info,
                &format!(
                    "nixdispatch: building {name} on {} instead ({}/{} slots busy)",
                    grant.host_id, grant.slots_used, grant.slots_total
                ),
            );
            attempt += 1;
        }
    }

    /// After an accept there is no local fallback: wait (bounded) for another host, or for
    /// a host in `failed` once it failed [`AVOID_FAILED_HOST`] ago.
    async fn reacquire(
        &mut self,
        frontend: &mut impl Frontend,
        t: &TryRequest,
        failed: &[(String, Instant)],
        deadline: Instant,
    ) -> Result<Grant, String> {
        loop {
            let excluded = avoided(failed, Instant::now());
            let answer = self
                .scheduler
                .acquire(t, false, &excluded, self.rpc_timeout, false)
                .await;
            let wait = match answer {
                Answer::Granted(g) => return Ok(g),
                Answer::Postpone {
                    retry_after,
                    queue_position,
                    reason,
                } => {
                    frontend.notify(
                        Level::Info,
                        &format!(
                            "nixdispatch: waiting for a builder (queue position {queue_position}): {reason}"
                        ),
                    );
                    retry_after.clamp(Duration::from_millis(100), Duration::from_secs(5))
                }
                Answer::Decline { reason } | Answer::DeclinePermanently { reason } => {
                    return Err(reason);
                }
                Answer::OverCap { reason } => {
                    if Instant::now() >= deadline {
                        return Err(reason);
                    }
                    Duration::from_secs(1)
                }
                Answer::Unreachable { error } => {
                    if Instant::now() >= deadline {
                        return Err(format!("scheduler unreachable: {error}"));
                    }
                    Duration::from_secs(1)
                }
            };
            if Instant::now() + wait > deadline {
                return Err(format!(
                    "none free within {} ms",
                    self.reacquire_window.as_millis()
                ));
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// How long a build avoids a host that failed it. Past this the scheduler decides: it
/// gives the member no lease on that host during its own cool-down
/// (`leases.unreachable_cooldown_millis`, after the release that reported the failure), so
/// this only covers a release that did not reach it.
const AVOID_FAILED_HOST: Duration = Duration::from_secs(10);

/// The hosts of `failed` to exclude at `now`: those that failed less than
/// [`AVOID_FAILED_HOST`] ago.
fn avoided(failed: &[(String, Instant)], now: Instant) -> Vec<String> {
    failed
        .iter()
        .filter(|(_, at)| now.saturating_duration_since(*at) < AVOID_FAILED_HOST)
        .map(|(h, _)| h.clone())
        .collect()
}

/// A waiting build connects ahead to at most this many builders: enough for the builders
/// of one system in a small fleet, without one waiting build logging in everywhere.
const CONNECT_AHEAD_MAX: usize = 8;

/// After a failed keep-alive (the scheduler away), the next one comes this soon, so that a
/// scheduler coming back learns of the lease at once.
const KEEP_ALIVE_RETRY: Duration = Duration::from_secs(1);

/// Keeps `grant`'s lease alive (see [`keep_alive_every`](crate::client::keep_alive_every)), for as long as it is polled. A
/// failed keep-alive is logged once, tried again within [`KEEP_ALIVE_RETRY`], and the build
/// goes on.
async fn keep_alive(
    scheduler: &mut Scheduler,
    grant: &Grant,
    t: &TryRequest,
    rpc_timeout: Duration,
) -> std::convert::Infallible {
    let period = crate::client::keep_alive_every(grant.lease_ttl);
    let mut next = period;
    let mut warned = false;
    loop {
        tokio::time::sleep(next).await;
        next = match scheduler.keep_alive(grant, t, rpc_timeout).await {
            Ok(_) => period,
            Err(e) => {
                if !warned {
                    warned = true;
                    tracing::warn!(lease_id = %grant.lease_id, error = %e, "keep-alive failed; the build goes on");
                }
                period.min(KEEP_ALIVE_RETRY)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed host is avoided for a while, then offered again; others stay avoided as
    /// long as their own failure is recent.
    #[test]
    fn a_failed_host_is_avoided_for_a_while_only() {
        let t0 = Instant::now();
        let failed = vec![
            ("b1".to_owned(), t0),
            ("b2".to_owned(), t0 + Duration::from_secs(5)),
        ];
        assert_eq!(avoided(&failed, t0), ["b1", "b2"]);
        assert_eq!(avoided(&failed, t0 + AVOID_FAILED_HOST), ["b2"]);
        assert!(avoided(&failed, t0 + AVOID_FAILED_HOST + Duration::from_secs(5)).is_empty());
    }
}
