//! The operator CLI's rendering: scheduler answers as plain-text tables or JSON.
//!
//! Pure functions over the protocol's admin messages, so that the output format is tested
//! without a server; `src/bin/nixdispatch.rs` only parses flags, calls and prints.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::proto::{self, HostState};

/// Lays out rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            let _ = write!(l, "{cell:<w$}");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

fn state_name(s: HostState) -> &'static str {
    match s {
        HostState::Ready => "ready",
        HostState::Stale => "stale",
        HostState::Disconnected => "disconnected",
        HostState::Gone => "gone",
        HostState::NotRegistered => "not registered",
        HostState::Unspecified => "unknown",
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 30))
}

/// `nixdispatch hosts`.
pub fn hosts_table(hosts: &[proto::HostStatus]) -> String {
    let rows: Vec<Vec<String>> = hosts
        .iter()
        .map(|h| {
            let mut state = state_name(h.state()).to_owned();
            if h.draining {
                state.push_str(",draining");
            }
            vec![
                h.host_id.clone(),
                h.systems.join(","),
                state,
                format!("{}/{}", h.slots_used, h.slots_total),
                h.leases.to_string(),
                opt(h.running_builds),
                h.load
                    .map_or_else(|| "-".into(), |l| format!("{:.2}", l.load1)),
                opt(h
                    .pressure
                    .and_then(|p| p.memory_full_avg10)
                    .map(|v| format!("{v:.1}"))),
                opt(h.store.map(|d| gib(d.free_bytes))),
                format!("{:.1}", h.millis_since_last_report as f64 / 1000.0),
                if h.unavailable_reason.is_empty() {
                    "-".into()
                } else {
                    h.unavailable_reason.clone()
                },
            ]
        })
        .collect();
    table(
        &[
            "HOST",
            "SYSTEMS",
            "STATE",
            "SLOTS",
            "LEASES",
            "SEEN",
            "LOAD1",
            "MEMPSI",
            "STORE_GIB",
            "AGE_S",
            "UNAVAILABLE",
        ],
        &rows,
    )
}

/// `nixdispatch capacity`.
pub fn capacity_table(systems: &[proto::SystemCapacity]) -> String {
    let rows: Vec<Vec<String>> = systems
        .iter()
        .map(|c| {
            vec![
                c.system.clone(),
                format!("{}/{}", c.hosts_available, c.hosts),
                c.slots_free.to_string(),
                c.slots_total.to_string(),
                c.leases.to_string(),
                c.waiting.to_string(),
            ]
        })
        .collect();
    table(
        &["SYSTEM", "HOSTS_UP", "FREE", "SLOTS", "LEASES", "WAITING"],
        &rows,
    )
}

/// `nixdispatch leases`.
pub fn leases_table(leases: &[proto::LeaseStatus]) -> String {
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|l| {
            vec![
                l.lease_id.clone(),
                l.host_id.clone(),
                l.client_id.clone(),
                l.system.clone(),
                format!("{:.0}", l.age_millis as f64 / 1000.0),
                format!("{:.0}", l.expires_in_millis as f64 / 1000.0),
                l.drv_path.clone(),
            ]
        })
        .collect();
    table(
        &["LEASE", "HOST", "CLIENT", "SYSTEM", "AGE_S", "TTL_S", "DRV"],
        &rows,
    )
}

/// `nixdispatch explain`.
pub fn explain_text(e: &proto::ExplainPlacementResponse) -> String {
    let rows: Vec<Vec<String>> = e
        .hosts
        .iter()
        .map(|v| {
            let mark = if v.host_id == e.chosen_host_id {
                "*"
            } else {
                ""
            };
            if v.eligible {
                vec![
                    format!("{}{mark}", v.host_id),
                    "yes".into(),
                    format!("{:.3}", v.score),
                    "-".into(),
                ]
            } else {
                vec![v.host_id.clone(), "no".into(), "-".into(), v.reason.clone()]
            }
        })
        .collect();
    let mut out = table(&["HOST", "ELIGIBLE", "SCORE", "WHY_NOT"], &rows);
    let chosen = if e.chosen_host_id.is_empty() {
        "none"
    } else {
        &e.chosen_host_id
    };
    let _ = writeln!(
        out,
        "\noutcome: {} (chosen: {chosen}; lower score is better)",
        e.outcome
    );
    out
}

/// One host as a line, after `drain`/`undrain`.
pub fn host_line(h: &proto::HostStatus) -> String {
    if h.state() == HostState::NotRegistered {
        // No slots or reports to show, and an operator must see that the id is not (yet)
        // a host the scheduler knows: a typo would otherwise look like a drained host.
        return format!(
            "{}: {}; no agent with this id has registered since the scheduler started{}\n",
            h.host_id,
            if h.draining {
                "draining"
            } else {
                "not draining"
            },
            if h.draining {
                " (the drain applies when one does)"
            } else {
                ""
            },
        );
    }
    format!(
        "{}: {}{}, {}/{} slots used\n",
        h.host_id,
        state_name(h.state()),
        if h.draining { ", draining" } else { "" },
        h.slots_used,
        h.slots_total
    )
}

fn disk_json(d: Option<proto::DiskSpace>) -> Value {
    d.map_or(
        Value::Null,
        |d| json!({"free_bytes": d.free_bytes, "total_bytes": d.total_bytes}),
    )
}

/// A host as JSON (field names as in the protocol).
pub fn host_json(h: &proto::HostStatus) -> Value {
    json!({
        "host_id": h.host_id,
        "store_uri": h.store_uri,
        "systems": h.systems,
        "supported_features": h.supported_features,
        "mandatory_features": h.mandatory_features,
        "state": state_name(h.state()),
        "draining": h.draining,
        "slots_total": h.slots_total,
        "slots_used": h.slots_used,
        "leases": h.leases,
        "running_builds": h.running_builds,
        "speed_factor": h.speed_factor,
        "load": h.load.map(|l| json!([l.load1, l.load5, l.load15])),
        "pressure": h.pressure.map(|p| json!({
            "cpu_some_avg10": p.cpu_some_avg10,
            "memory_some_avg10": p.memory_some_avg10,
            "memory_full_avg10": p.memory_full_avg10,
            "io_some_avg10": p.io_some_avg10,
            "io_full_avg10": p.io_full_avg10,
        })),
        "available_memory_bytes": h.available_memory_bytes,
        "total_memory_bytes": h.total_memory_bytes,
        "store": disk_json(h.store),
        "build_dir": disk_json(h.build_dir),
        "millis_since_last_report": h.millis_since_last_report,
        "cpu_count": h.cpu_count,
        "agent_version": h.agent_version,
        "unavailable_reason": h.unavailable_reason,
    })
}

/// Capacity as JSON.
pub fn capacity_json(systems: &[proto::SystemCapacity]) -> Value {
    Value::Array(
        systems
            .iter()
            .map(|c| {
                json!({
                    "system": c.system, "hosts": c.hosts, "hosts_available": c.hosts_available,
                    "slots_total": c.slots_total, "slots_free": c.slots_free,
                    "leases": c.leases, "waiting": c.waiting,
                })
            })
            .collect(),
    )
}

/// Leases as JSON.
pub fn leases_json(leases: &[proto::LeaseStatus]) -> Value {
    Value::Array(
        leases
            .iter()
            .map(|l| {
                json!({
                    "lease_id": l.lease_id, "host_id": l.host_id, "client_id": l.client_id,
                    "system": l.system, "drv_path": l.drv_path, "age_millis": l.age_millis,
                    "expires_in_millis": l.expires_in_millis,
                })
            })
            .collect(),
    )
}

/// An explanation as JSON.
pub fn explain_json(e: &proto::ExplainPlacementResponse) -> Value {
    json!({
        "outcome": e.outcome,
        "chosen_host_id": e.chosen_host_id,
        "hosts": e.hosts.iter().map(|v| json!({
            "host_id": v.host_id, "eligible": v.eligible, "reason": v.reason, "score": v.score,
        })).collect::<Vec<_>>(),
    })
}

/// `nixdispatch quota`: one row per quota.
pub fn quotas_table(q: &proto::Quotas) -> String {
    let mut rows = vec![vec![
        "default".to_owned(),
        "(every member)".to_owned(),
        opt(q.default_member_max_slots),
        "0".to_owned(),
    ]];
    rows.extend(q.members.iter().map(|m| {
        vec![
            "member".to_owned(),
            m.client_id.clone(),
            opt(m.max_slots),
            m.priority.to_string(),
        ]
    }));
    rows.extend(q.systems.iter().map(|s| {
        vec![
            "system".to_owned(),
            s.system.clone(),
            s.max_slots.to_string(),
            "-".to_owned(),
        ]
    }));
    table(&["SCOPE", "NAME", "MAX_SLOTS", "PRIORITY"], &rows)
}

/// `nixdispatch --json quota`.
pub fn quotas_json(q: &proto::Quotas) -> Value {
    json!({
        "default_member_max_slots": q.default_member_max_slots,
        "members": q.members.iter().map(|m| json!({
            "client_id": m.client_id,
            "max_slots": m.max_slots,
            "priority": m.priority,
        })).collect::<Vec<_>>(),
        "systems": q.systems.iter().map(|s| json!({
            "system": s.system,
            "max_slots": s.max_slots,
        })).collect::<Vec<_>>(),
    })
}

/// `nixdispatch usage`.
pub fn usage_table(members: &[proto::MemberUsage]) -> String {
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            vec![
                m.client_id.clone(),
                m.running.to_string(),
                opt(m.max_slots),
                m.priority.to_string(),
                m.builds.to_string(),
                format!("{:.0}", m.build_seconds),
                format!("{:.0}", m.wait_seconds),
            ]
        })
        .collect();
    table(
        &[
            "MEMBER",
            "RUNNING",
            "MAX_SLOTS",
            "PRIORITY",
            "BUILDS",
            "BUILD_S",
            "WAIT_S",
        ],
        &rows,
    )
}

/// `nixdispatch --json usage`.
pub fn usage_json(members: &[proto::MemberUsage]) -> Value {
    Value::Array(
        members
            .iter()
            .map(|m| {
                json!({
                    "client_id": m.client_id,
                    "running": m.running,
                    "max_slots": m.max_slots,
                    "priority": m.priority,
                    "builds": m.builds,
                    "build_seconds": m.build_seconds,
                    "wait_seconds": m.wait_seconds,
                })
            })
            .collect(),
    )
}

/// An answer the CLI prints: as a table for people, or as JSON for scripts.
pub trait Render {
    /// The plain-text form.
    fn table(&self) -> String;
    /// The JSON form (field names as in the protocol).
    fn json(&self) -> Value;
}

/// A change that answers nothing but its success (provisioning): one line for people, the
/// same facts as JSON for scripts.
#[derive(Debug, Clone, PartialEq)]
pub struct Confirmation {
    /// The line, e.g. `build01 provisioned`.
    pub line: String,
    /// The JSON form.
    pub json: Value,
}

impl Render for Confirmation {
    fn table(&self) -> String {
        format!("{}\n", self.line)
    }
    fn json(&self) -> Value {
        self.json.clone()
    }
}

impl Render for Vec<proto::HostStatus> {
    fn table(&self) -> String {
        hosts_table(self)
    }
    fn json(&self) -> Value {
        Value::Array(self.iter().map(host_json).collect())
    }
}

impl Render for proto::HostStatus {
    fn table(&self) -> String {
        host_line(self)
    }
    fn json(&self) -> Value {
        host_json(self)
    }
}

impl Render for Vec<proto::SystemCapacity> {
    fn table(&self) -> String {
        capacity_table(self)
    }
    fn json(&self) -> Value {
        capacity_json(self)
    }
}

impl Render for Vec<proto::LeaseStatus> {
    fn table(&self) -> String {
        leases_table(self)
    }
    fn json(&self) -> Value {
        leases_json(self)
    }
}

impl Render for proto::ExplainPlacementResponse {
    fn table(&self) -> String {
        explain_text(self)
    }
    fn json(&self) -> Value {
        explain_json(self)
    }
}

impl Render for proto::Quotas {
    fn table(&self) -> String {
        quotas_table(self)
    }
    fn json(&self) -> Value {
        quotas_json(self)
    }
}

impl Render for Vec<proto::MemberUsage> {
    fn table(&self) -> String {
        usage_table(self)
    }
    fn json(&self) -> Value {
        usage_json(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quotas list the default first, then members and systems; an absent limit is `-`.
    #[test]
    fn quotas_table_lists_every_scope() {
        let q = proto::Quotas {
            default_member_max_slots: None,
            members: vec![proto::MemberQuota {
                client_id: "alice".into(),
                max_slots: Some(2),
                priority: -100,
            }],
            systems: vec![proto::SystemQuota {
                system: "x86_64-linux".into(),
                max_slots: 20,
            }],
        };
        let t = quotas_table(&q);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[1].starts_with("default  (every member)  -"), "{t}");
        assert!(
            lines[2].contains("alice") && lines[2].ends_with("-100"),
            "{t}"
        );
        assert_eq!(quotas_json(&q)["systems"][0]["max_slots"], 20);
        assert_eq!(quotas_json(&q)["default_member_max_slots"], Value::Null);
    }

    /// Usage rounds seconds and keeps an absent limit null in JSON.
    #[test]
    fn usage_rounds_seconds() {
        let m = proto::MemberUsage {
            client_id: "bob".into(),
            running: 1,
            max_slots: None,
            priority: 0,
            builds: 3,
            build_seconds: 61.6,
            wait_seconds: 0.2,
        };
        let t = usage_table(std::slice::from_ref(&m));
        assert!(
            t.lines().nth(1).unwrap().ends_with("3       62       0"),
            "{t}"
        );
        assert_eq!(usage_json(&[m])[0]["max_slots"], Value::Null);
    }

    fn host() -> proto::HostStatus {
        proto::HostStatus {
            host_id: "build01".into(),
            systems: vec!["x86_64-linux".into()],
            state: HostState::Ready as i32,
            draining: true,
            slots_total: 6,
            slots_used: 2,
            leases: 1,
            running_builds: Some(2),
            load: Some(proto::LoadAverage {
                load1: 3.25,
                load5: 2.0,
                load15: 1.0,
            }),
            store: Some(proto::DiskSpace {
                free_bytes: 3 << 30,
                total_bytes: 10 << 30,
            }),
            millis_since_last_report: 1500,
            unavailable_reason: "draining".into(),
            ..Default::default()
        }
    }

    /// The hosts table aligns columns and shows absent values as `-`.
    #[test]
    fn hosts_table_layout() {
        let t = hosts_table(&[host()]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("HOST     SYSTEMS       STATE"), "{t}");
        assert!(lines[1].contains("ready,draining  2/6"), "{t}");
        assert!(lines[1].contains("3.25"), "{t}");
        assert!(lines[1].contains("  -  "), "memory pressure absent: {t}");
        assert!(lines[1].contains("3.0"), "store GiB: {t}");
        assert!(lines[1].ends_with("draining"), "{t}");
    }

    /// After `drain`, a host whose agent has not registered reads as such, not as a host
    /// with no slots; a registered one shows its state and slots.
    #[test]
    fn host_line_says_when_the_host_is_not_registered() {
        let t = host_line(&proto::HostStatus {
            host_id: "build99".into(),
            state: HostState::NotRegistered as i32,
            draining: true,
            ..Default::default()
        });
        assert_eq!(
            t,
            "build99: draining; no agent with this id has registered since the scheduler \
             started (the drain applies when one does)\n"
        );
        assert_eq!(
            host_line(&host()),
            "build01: ready, draining, 2/6 slots used\n"
        );
    }

    /// JSON keeps absent values null, not zero.
    #[test]
    fn host_json_keeps_absent_values_null() {
        let v = host_json(&host());
        assert_eq!(v["pressure"], Value::Null);
        assert_eq!(v["build_dir"], Value::Null);
        assert_eq!(v["running_builds"], 2);
        assert_eq!(v["state"], "ready");
    }

    /// The explanation marks the chosen host and says why the others are out.
    #[test]
    fn explain_marks_chosen_host() {
        let e = proto::ExplainPlacementResponse {
            hosts: vec![
                proto::HostVerdict {
                    host_id: "a".into(),
                    eligible: true,
                    reason: String::new(),
                    score: 0.5,
                },
                proto::HostVerdict {
                    host_id: "b".into(),
                    eligible: false,
                    reason: "draining".into(),
                    score: 0.0,
                },
            ],
            chosen_host_id: "a".into(),
            outcome: "granted".into(),
        };
        let t = explain_text(&e);
        assert!(t.contains("a*"), "{t}");
        assert!(t.contains("draining"), "{t}");
        assert!(t.contains("outcome: granted (chosen: a"), "{t}");
    }
}
