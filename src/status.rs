//! `nixdispatch status`: one screen an operator can leave open. A summary line, capacity per
//! system (free slots and waiting requests), the hosts (with why each unavailable one is
//! out), and the builds per member (live leases by client and system).
//!
//! Pure: it renders the three admin answers it is given; `src/bin/nixdispatch.rs` fetches
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
    out
}

/// The same as JSON: the three answers and the per-member counts.
pub fn json(s: &Snapshot) -> Value {
    json!({
        "hosts": s.hosts.iter().map(cli::host_json).collect::<Vec<_>>(),
        "capacity": cli::capacity_json(&s.capacity),
        "members": per_member(&s.leases)
            .into_iter()
            .map(|(m, n, _)| json!({"member": m, "builds": n}))
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
    }
}
