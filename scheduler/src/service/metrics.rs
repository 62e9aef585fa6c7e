//! The scheduler's metrics, through the `metrics` facade (exported to Prometheus by the
//! binary when `metrics_listen` is set). Names are `nixdispatch_<subsystem>_<name>`; every
//! label set is bounded.

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

use std::time::Duration;

use crate::core::{Breaker, CapacityView, HostState, HostView, MemberView};

/// How long a gauge may stay unchanged before the exporter drops its series, for agents
/// that report every `report_interval`. Every gauge is written at least once per report
/// interval (the fleet gauges, and the agent stream gauge touched with them) or per second
/// (the lease gauge); a host the scheduler forgot (an hour after its agent left, by default)
/// stops being written, and its series go after this. Ten minutes, or three report
/// intervals if that is longer: no live series ever blinks.
pub fn gauge_idle_timeout(report_interval: Duration) -> Duration {
    Duration::from_secs(600).max(report_interval * 3)
}

/// Describes every metric once, at start.
pub fn describe() {
    describe_counter!(
        "nixdispatch_lease_acquire_total",
        "Acquire answers, by outcome (granted, postpone, decline, decline_permanently, and \
         resource_exhausted past the member's cap on waiting requests)."
    );
    describe_counter!(
        "nixdispatch_lease_refused_total",
        "Acquire answers other than a grant, by outcome (postpone, decline, \
         decline_permanently, resource_exhausted) and cause: no_builder, quota (the member's \
         or the system's), waiting_cap (the member's cap on waiting requests), or why a host \
         that builds the system could not take it (no_slot, draining, probe_failed, late, \
         disconnected, gone, gate, unreachable, unreachable_for_client, excluded, features, \
         system, none)."
    );
    describe_histogram!(
        "nixdispatch_lease_acquire_seconds",
        Unit::Seconds,
        "Time to decide one Acquire, lock wait included."
    );
    describe_counter!(
        "nixdispatch_lease_release_total",
        "Releases, by build outcome."
    );
    describe_counter!(
        "nixdispatch_lease_expired_total",
        "Leases that expired because they were not kept alive."
    );
    describe_gauge!("nixdispatch_lease_active", "Live leases.");
    describe_gauge!("nixdispatch_agent_streams", "Connected agent streams.");
    describe_counter!("nixdispatch_agent_reports_total", "Agent reports received.");
    describe_counter!(
        "nixdispatch_rpc_rejected_total",
        "Requests rejected as invalid, by service."
    );
    describe_counter!(
        "nixdispatch_connection_dropped_total",
        "Connections closed by the scheduler's bounds, by reason (over_cap, handshake_timeout)."
    );
    describe_counter!(
        "nixdispatch_probe_total",
        "SSH probes of builders, by result (ok, connect, host_key, login, command, timeout)."
    );
    describe_histogram!(
        "nixdispatch_probe_seconds",
        Unit::Seconds,
        "Time one SSH probe took, connect to verdict."
    );
    describe_gauge!(
        "nixdispatch_system_hosts",
        "Hosts building the system, by whether they take leases now (available)."
    );
    describe_gauge!(
        "nixdispatch_system_slots",
        "Build slots of the system's available hosts."
    );
    describe_gauge!(
        "nixdispatch_system_slots_free",
        "Free build slots of the system's available hosts."
    );
    describe_gauge!(
        "nixdispatch_system_leases",
        "Live leases on hosts building the system (slots in use by the scheduler's builds)."
    );
    describe_gauge!(
        "nixdispatch_system_waiting",
        "Requests for the system waiting (postponed) now."
    );
    describe_gauge!(
        "nixdispatch_host_state",
        "1 for the host's liveness state (ready, stale, disconnected, gone), 0 for the others. \
         One series per host and state: bounded by the fleet."
    );
    describe_gauge!(
        "nixdispatch_host_available",
        "1 when the host would take a lease now, 0 when not (drained, probe failing, gates, \
         full, not ready)."
    );
    describe_gauge!(
        "nixdispatch_host_draining",
        "1 when an operator drained the host."
    );
    describe_gauge!(
        "nixdispatch_host_probe_failing",
        "1 when the host's SSH probe breaker is open or half-open (out of placement)."
    );
    describe_gauge!("nixdispatch_host_slots", "The host's build slots.");
    describe_gauge!(
        "nixdispatch_host_slots_used",
        "The host's slots counted as busy (leases and builds seen beyond them)."
    );
    describe_gauge!(
        "nixdispatch_host_report_age_seconds",
        Unit::Seconds,
        "Time since the host's agent last registered or reported."
    );
    describe_counter!(
        "nixdispatch_probe_breaker_changes_total",
        "Builders taken out of placement (opened) or let back in (closed) by their probes."
    );
    describe_counter!(
        "nixdispatch_queue_wait_total",
        "WaitForLease calls, by first answer (granted, queued, decline, decline_permanently, \
         resource_exhausted past the member's cap on waiting requests)."
    );
    describe_gauge!(
        "nixdispatch_queue_waiting",
        "Requests waiting in the queue (streams and polling hooks)."
    );
    describe_counter!(
        "nixdispatch_queue_granted_total",
        "Grants pushed to waiting streams."
    );
    describe_histogram!(
        "nixdispatch_queue_wait_seconds",
        Unit::Seconds,
        "How long a waiting stream waited for its grant."
    );
    describe_counter!(
        "nixdispatch_queue_returned_total",
        "Grants that went back because their stream was gone before delivery."
    );
    describe_counter!(
        "nixdispatch_queue_abandoned_total",
        "Waiting streams dropped by their clients before a grant."
    );
    describe_counter!(
        "nixdispatch_queue_progress_total",
        "Position checks of waiting streams."
    );
    describe_counter!(
        "nixdispatch_member_builds_total",
        "Leases of the member that ended after a build ran (released as succeeded or failed). \
         One series per member: members are provisioned (about a hundred); at most \
         MEMBER_SERIES_MAX in the open mode, where client ids are unauthenticated labels."
    );
    describe_counter!(
        "nixdispatch_member_build_seconds_total",
        Unit::Seconds,
        "Whole seconds the member's builds held their slots."
    );
    describe_counter!(
        "nixdispatch_member_wait_seconds_total",
        Unit::Seconds,
        "Whole seconds the member's requests waited in the queue before their grants."
    );
}

/// Most members given their own series: far above a community's provisioned members, and a
/// bound on what unauthenticated client ids can add in the open mode.
pub const MEMBER_SERIES_MAX: usize = 1000;

/// Publishes each member's usage (as `GetUsage` shows it: since the member was first seen,
/// restored across restarts) as counters. The first [`MEMBER_SERIES_MAX`] members by id.
pub(crate) fn members(members: &[MemberView]) {
    for m in members.iter().take(MEMBER_SERIES_MAX) {
        let member = m.member.to_string();
        counter!("nixdispatch_member_builds_total", "member" => member.clone())
            .absolute(m.usage.builds);
        counter!("nixdispatch_member_build_seconds_total", "member" => member.clone())
            .absolute(m.usage.build_millis / 1000);
        counter!("nixdispatch_member_wait_seconds_total", "member" => member)
            .absolute(m.usage.wait_millis / 1000);
    }
}

pub(crate) fn queue_wait(outcome: &'static str) {
    counter!("nixdispatch_queue_wait_total", "outcome" => outcome).increment(1);
}

pub(crate) fn queue_waiting(n: usize) {
    gauge!("nixdispatch_queue_waiting").set(n as f64);
}

pub(crate) fn queue_granted(waited_seconds: f64) {
    counter!("nixdispatch_queue_granted_total").increment(1);
    histogram!("nixdispatch_queue_wait_seconds").record(waited_seconds);
}

pub(crate) fn queue_returned() {
    counter!("nixdispatch_queue_returned_total").increment(1);
}

pub(crate) fn queue_abandoned() {
    counter!("nixdispatch_queue_abandoned_total").increment(1);
}

pub(crate) fn queue_progress() {
    counter!("nixdispatch_queue_progress_total").increment(1);
}

pub(crate) fn acquire(outcome: &'static str, seconds: f64) {
    counter!("nixdispatch_lease_acquire_total", "outcome" => outcome).increment(1);
    histogram!("nixdispatch_lease_acquire_seconds").record(seconds);
}

pub(crate) fn refused(outcome: &'static str, cause: &'static str) {
    counter!("nixdispatch_lease_refused_total", "outcome" => outcome, "cause" => cause)
        .increment(1);
}

pub(crate) fn release(outcome: &'static str) {
    counter!("nixdispatch_lease_release_total", "outcome" => outcome).increment(1);
}

pub(crate) fn lease_expired(n: usize) {
    counter!("nixdispatch_lease_expired_total").increment(n as u64);
}

pub(crate) fn leases_active(n: usize) {
    gauge!("nixdispatch_lease_active").set(n as f64);
}

pub(crate) fn agent_streams(delta: f64) {
    gauge!("nixdispatch_agent_streams").increment(delta);
}

pub(crate) fn agent_report() {
    counter!("nixdispatch_agent_reports_total").increment(1);
}

pub(crate) fn rejected(service: &'static str) {
    counter!("nixdispatch_rpc_rejected_total", "service" => service).increment(1);
}

pub(crate) fn connection_dropped(reason: &'static str) {
    counter!("nixdispatch_connection_dropped_total", "reason" => reason).increment(1);
}

pub(crate) fn probe(result: &'static str, seconds: f64) {
    counter!("nixdispatch_probe_total", "result" => result).increment(1);
    histogram!("nixdispatch_probe_seconds").record(seconds);
}

pub(crate) fn breaker_change(change: &'static str) {
    counter!("nixdispatch_probe_breaker_changes_total", "change" => change).increment(1);
}

/// Marks the agent stream gauge as alive without changing it (it moves by increments), so
/// that the idle timeout never drops it.
pub(crate) fn touch_agent_streams() {
    gauge!("nixdispatch_agent_streams").increment(0.0);
}

/// The fleet's gauges from one look at the capacity and one page of hosts. Hosts that the
/// scheduler forgot keep their last values until the exporter's idle timeout drops them
/// ([`gauge_idle_timeout`]).
pub(crate) fn systems(capacity: &[CapacityView]) {
    for c in capacity {
        let system = c.system.clone();
        gauge!("nixdispatch_system_hosts", "system" => system.clone(), "available" => "true")
            .set(f64::from(c.hosts_available));
        gauge!("nixdispatch_system_hosts", "system" => system.clone(), "available" => "false")
            .set(f64::from(c.hosts - c.hosts_available));
        gauge!("nixdispatch_system_slots", "system" => system.clone())
            .set(f64::from(c.slots_total));
        gauge!("nixdispatch_system_slots_free", "system" => system.clone())
            .set(f64::from(c.slots_free));
        gauge!("nixdispatch_system_leases", "system" => system.clone()).set(f64::from(c.leases));
        gauge!("nixdispatch_system_waiting", "system" => system).set(f64::from(c.waiting));
    }
}

/// See [`systems`].
pub(crate) fn hosts(hosts: &[HostView]) {
    const STATES: [(HostState, &str); 4] = [
        (HostState::Ready, "ready"),
        (HostState::Stale, "stale"),
        (HostState::Disconnected, "disconnected"),
        (HostState::Gone, "gone"),
    ];
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    for h in hosts {
        let host = h.spec.id.to_string();
        for (state, name) in STATES {
            gauge!("nixdispatch_host_state", "host" => host.clone(), "state" => name)
                .set(flag(h.state == state));
        }
        gauge!("nixdispatch_host_available", "host" => host.clone())
            .set(flag(h.unavailable_reason.is_none()));
        gauge!("nixdispatch_host_draining", "host" => host.clone()).set(flag(h.draining));
        gauge!("nixdispatch_host_probe_failing", "host" => host.clone())
            .set(flag(h.probe != Breaker::Closed));
        gauge!("nixdispatch_host_slots", "host" => host.clone()).set(f64::from(h.spec.max_jobs));
        gauge!("nixdispatch_host_slots_used", "host" => host.clone()).set(f64::from(h.slots_used));
        gauge!("nixdispatch_host_report_age_seconds", "host" => host)
            .set(h.since_last_report.as_secs_f64());
    }
}
