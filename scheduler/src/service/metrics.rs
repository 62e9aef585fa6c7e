//! The scheduler's metrics, through the `metrics` facade (exported to Prometheus by the
//! binary when `metrics_listen` is set). Names are `nixdispatch_<subsystem>_<name>`; every
//! label set is bounded.

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

/// Describes every metric once, at start.
pub fn describe() {
    describe_counter!(
        "nixdispatch_lease_acquire_total",
        "Acquire answers, by outcome (granted, postpone, decline, decline_permanently)."
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
    describe_counter!(
        "nixdispatch_probe_breaker_changes_total",
        "Builders taken out of placement (opened) or let back in (closed) by their probes."
    );
}

pub(crate) fn acquire(outcome: &'static str, seconds: f64) {
    counter!("nixdispatch_lease_acquire_total", "outcome" => outcome).increment(1);
    histogram!("nixdispatch_lease_acquire_seconds").record(seconds);
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
