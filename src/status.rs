//! `nixdispatch status`: one screen an operator can leave open. A summary line, capacity per
//! system (free slots and waiting requests), the hosts (with why each unavailable one is
//! out), the builds per member (live leases by client and system), and the queue per member
//! (waiting requests by system, and how long the oldest has waited).
//!
//! Pure: it renders the four admin answers it is given; `src/bin/nixdispatch.rs` fetches
//! them, and with `--watch` redraws the screen every interval.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::cli;
use crate::proto::{self, HostState};

/// What the scheduler said, as of one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// `ListHosts`.
    pub hosts: Vec<proto::HostStatus>,
    /// `GetCapacity`.
    pub capacity: Vec<proto::SystemCapacity>,
    /// `ListLeases`.
    pub leases: Vec<proto::LeaseStatus>,
    /// `ListWaiting`.
    pub waiting: Vec<proto::WaitingRequest>,
}

/// One member's waiting requests.
#[derive(Clone, Debug, PartialEq)]
struct Queued {
    member: String,
    total: usize,
    /// Milliseconds the oldest one has waited.
    oldest_millis: u64,
    /// Waiting requests per system, by system.
    systems: BTreeMap<String, usize>,
}

/// Waiting requests per member, the longest-waiting member first.
fn queue_per_member(waiting: &[proto::WaitingRequest]) -> Vec<Queued> {
    let mut by: BTreeMap<&str, Queued> = BTreeMap::new();
    for w in waiting {
        let q = by.entry(&w.client_id).or_insert_with(|| Queued {
            member: w.client_id.clone(),
            total: 0,
            oldest_millis: 0,
            systems: BTreeMap::new(),
        });
        q.total += 1;
        q.oldest_millis = q.oldest_millis.max(w.waited_millis);
        *q.systems.entry(w.system.clone()).or_default() += 1;
    }
    let mut rows: Vec<Queued> = by.into_values().collect();
    rows.sort_by(|a, b| {
        b.oldest_millis
            .cmp(&a.oldest_millis)
            .then_with(|| a.member.cmp(&b.member))
    });
    rows
}

/// A wait for people: `42s`, `3m07s`, `2h05m`.
fn short_duration(millis: u64) -> String {
    let s = millis / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Live leases per member and system, busiest member first.
fn per_member(leases: &[proto::LeaseStatus]) -> Vec<(String, usize, String)> {
    let mut by: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    for l in leases {
        *by.entry(&l.client_id)
            .or_default()
            .entry(&l.system)
            .or_default() += 1;
    }
    let mut rows: Vec<_> = by
        .into_iter()
        .map(|(member, systems)| {
            let total: usize = systems.values().sum();
            let detail = systems
                .iter()
                .map(|(s, n)| format!("{s}:{n}"))
                .collect::<Vec<_>>()
                .join(",");
            (member.to_owned(), total, detail)
        })
        .collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    rows
}

/// The screen, as text.
pub fn render(s: &Snapshot) -> String {
    let ready = s
        .hosts
        .iter()
        .filter(|h| h.state() == HostState::Ready)
        .count();
    let taking = s
        .hosts
        .iter()
        .filter(|h| h.state() == HostState::Ready && h.unavailable_reason.is_empty())
        .count();
    let draining = s.hosts.iter().filter(|h| h.draining).count();
    let waiting: u32 = s.capacity.iter().map(|c| c.waiting).sum();
    let mut out = format!(
        "{} hosts: {ready} ready, {taking} taking builds now, {draining} draining; {} builds \
         leased, {waiting} waiting\n\n",
        s.hosts.len(),
        s.leases.len(),
    );
    out.push_str(&cli::capacity_table(&s.capacity));
    out.push('\n');
    out.push_str(&cli::hosts_table(&s.hosts));
    out.push('\n');
    let members: Vec<String> = per_member(&s.leases)
        .into_iter()
        .map(|(m, n, d)| format!("{m:<24} {n:>5}  {d}"))
        .collect();
    out.push_str(&format!("{:<24} {:>5}  SYSTEMS\n", "MEMBER", "BUILDS"));
    for m in members {
        out.push_str(&m);
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<24} {:>7} {:>7}  SYSTEMS\n",
        "QUEUED FOR", "WAITING", "OLDEST"
    ));
    for q in queue_per_member(&s.waiting) {
        let systems = q
            .systems
            .iter()
            .map(|(s, n)| format!("{s}:{n}"))
            .collect::<Vec<_>>()
            .join(",");
        out.push_str(&format!(
            "{:<24} {:>7} {:>7}  {systems}\n",
            q.member,
            q.total,
            short_duration(q.oldest_millis)
        ));
    }
    out
}

/// The same as JSON: the answers, the builds and the queue per member.
pub fn json(s: &Snapshot) -> Value {
    json!({
        "hosts": s.hosts.iter().map(cli::host_json).collect::<Vec<_>>(),
        "capacity": cli::capacity_json(&s.capacity),
        "members": per_member(&s.leases)
            .into_iter()
            .map(|(m, n, _)| json!({"member": m, "builds": n}))
            .collect::<Vec<_>>(),
        "queue": queue_per_member(&s.waiting)
            .into_iter()
            .map(|q| json!({
                "member": q.member,
                "waiting": q.total,
                "oldest_wait_seconds": q.oldest_millis as f64 / 1000.0,
                "systems": q.systems,
            }))
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(client: &str, system: &str) -> proto::LeaseStatus {
        proto::LeaseStatus {
            client_id: client.into(),
            system: system.into(),
            ..Default::default()
        }
    }

    fn waiting(client: &str, system: &str, waited_millis: u64) -> proto::WaitingRequest {
        proto::WaitingRequest {
            client_id: client.into(),
            system: system.into(),
            waited_millis,
            ..Default::default()
        }
    }

    /// The summary counts hosts by state and the builds per member are grouped by system,
    /// busiest member first.
    #[test]
    fn summary_and_members() {
        let host = |id: &str, state: HostState, why: &str| proto::HostStatus {
            host_id: id.into(),
            state: state.into(),
            unavailable_reason: why.into(),
            draining: why == "draining",
            ..Default::default()
        };
        let s = Snapshot {
            hosts: vec![
                host("a", HostState::Ready, ""),
                host("b", HostState::Ready, "draining"),
                host("c", HostState::Gone, "agent gone"),
            ],
            capacity: vec![proto::SystemCapacity {
                system: "x86_64-linux".into(),
                waiting: 3,
                ..Default::default()
            }],
            leases: vec![
                lease("bob", "x86_64-linux"),
                lease("alice", "x86_64-linux"),
                lease("alice", "aarch64-linux"),
            ],
            waiting: vec![
                waiting("bob", "x86_64-linux", 5_000),
                waiting("carol", "x86_64-linux", 187_000),
                waiting("carol", "aarch64-linux", 1_000),
                waiting("carol", "x86_64-linux", 2_000),
            ],
        };
        let text = render(&s);
        assert!(
            text.starts_with(
                "3 hosts: 2 ready, 1 taking builds now, 1 draining; 3 builds leased, 3 waiting\n"
            ),
            "{text}"
        );
        let members: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("MEMBER"))
            .collect();
        assert_eq!(
            members[1],
            "alice                        2  aarch64-linux:1,x86_64-linux:1"
        );
        assert!(members[2].starts_with("bob "), "{members:?}");
        assert_eq!(json(&s)["members"][0]["builds"], 2);
        // The queue per member: the member waiting longest first, counts per system.
        let queue: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.starts_with("QUEUED FOR"))
            .collect();
        assert_eq!(
            queue[1],
            "carol                          3   3m07s  aarch64-linux:1,x86_64-linux:2"
        );
        assert_eq!(
            queue[2],
            "bob                            1      5s  x86_64-linux:1"
        );
        let j = json(&s);
        assert_eq!(j["queue"][0]["member"], "carol");
        assert_eq!(j["queue"][0]["systems"]["x86_64-linux"], 2);
        assert_eq!(j["queue"][0]["oldest_wait_seconds"], 187.0);
    }

    /// Waits read as seconds, minutes or hours.
    #[test]
    fn short_durations() {
        assert_eq!(short_duration(999), "0s");
        assert_eq!(short_duration(59_000), "59s");
        assert_eq!(short_duration(60_000), "1m00s");
        assert_eq!(short_duration(7_500_000), "2h05m");
    }
}
