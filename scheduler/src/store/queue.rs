//! The queue's tables: quotas as an operator last set them, expected build durations
//! learned per derivation name, and usage records per member.
//!
//! Quotas are written when an operator changes them (before the core applies the change,
//! like drains). Durations and usage change with every build, so the service writes the
//! records that changed in one transaction per persistence interval, off the runtime's
//! workers; a crash loses at most that interval's learning, never a quota.

use std::time::SystemTime;

use rusqlite::{OptionalExtension, params};

use super::{Store, store_error, unix_millis};
use crate::core::{ClientId, DurationStat, MemberQuota, Quotas, System, Usage};
use crate::{Error, StoreProblem};

/// What the queue's tables hold.
#[derive(Debug, Default, PartialEq)]
pub struct QueueState {
    /// The quotas an operator last set; `None` when no operator ever changed one (the
    /// configuration's are in force).
    pub quotas: Option<Quotas>,
    /// Learned durations by derivation name.
    pub durations: Vec<(String, DurationStat)>,
    /// Usage records by member.
    pub usage: Vec<(ClientId, Usage)>,
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Store {
    /// Everything the queue's tables hold. A row with an id the scheduler would refuse is
    /// an error naming it.
    pub fn queue_state(&self) -> Result<QueueState, Error> {
        let fail = |e| store_error(&self.location, "reading the queue state", e);
        let bad = |table: &'static str, reason: String| Error::Store {
            path: self.location.to_string(),
            problem: StoreProblem::BadRow { table, reason },
            source: None,
        };
        let mut state = QueueState::default();
        let default: Option<Option<i64>> = self
            .conn
            .query_row(
                "SELECT member_max_slots FROM quota_default WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(fail)?;
        if let Some(default) = default {
            let mut q = Quotas {
                default_member_max_slots: default.map(|v| u32::try_from(v).unwrap_or(u32::MAX)),
                ..Quotas::default()
            };
            let mut stmt = self
                .conn
                .prepare("SELECT client_id, max_slots, priority FROM quota_members")
                .map_err(fail)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(fail)?;
            for row in rows {
                let (m, max, priority) = row.map_err(fail)?;
                if m.is_empty() || !m.chars().all(|c| c.is_ascii_graphic()) {
                    return Err(bad("quota_members", format!("client_id {m:?}")));
                }
                q.members.insert(
                    ClientId::new(m),
                    MemberQuota {
                        max_slots: max.map(|v| u32::try_from(v).unwrap_or(u32::MAX)),
                        priority: i32::try_from(priority).unwrap_or(0),
                    },
                );
            }
            let mut stmt = self
                .conn
                .prepare("SELECT system, max_slots FROM quota_systems")
                .map_err(fail)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(fail)?;
            for row in rows {
                let (s, max) = row.map_err(fail)?;
                if s.is_empty() {
                    return Err(bad("quota_systems", "an empty system".into()));
                }
                q.systems
                    .insert(System::new(s), u32::try_from(max).unwrap_or(u32::MAX));
            }
            state.quotas = Some(q);
        }
        let mut stmt = self
            .conn
            .prepare("SELECT drv_name, mean_millis, samples FROM durations ORDER BY drv_name")
            .map_err(fail)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, f64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .map_err(fail)?;
        for row in rows {
            let (name, mean_millis, samples) = row.map_err(fail)?;
            state.durations.push((
                name,
                DurationStat {
                    mean_millis,
                    samples: to_u64(samples),
                },
            ));
        }
        let mut stmt = self
            .conn
            .prepare(
                "SELECT client_id, builds, build_millis, wait_millis FROM usage \
                 ORDER BY client_id",
            )
            .map_err(fail)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .map_err(fail)?;
        for row in rows {
            let (m, builds, build_millis, wait_millis) = row.map_err(fail)?;
            state.usage.push((
                ClientId::new(m),
                Usage {
                    builds: to_u64(builds),
                    build_millis: to_u64(build_millis),
                    wait_millis: to_u64(wait_millis),
                },
            ));
        }
        Ok(state)
    }

    /// Replaces the quotas with `q` (an operator's change), committed before it returns.
    pub fn set_quotas(&mut self, q: &Quotas, now: SystemTime) -> Result<(), Error> {
        self.write("writing the quotas", |tx| {
            tx.execute(
                "INSERT INTO quota_default (id, member_max_slots, set_at_unix_millis) \
                 VALUES (1, ?1, ?2) ON CONFLICT (id) DO UPDATE SET \
                 member_max_slots = excluded.member_max_slots, \
                 set_at_unix_millis = excluded.set_at_unix_millis",
                params![q.default_member_max_slots, unix_millis(now)],
            )?;
            tx.execute("DELETE FROM quota_members", [])?;
            tx.execute("DELETE FROM quota_systems", [])?;
            for (m, x) in &q.members {
                tx.execute(
                    "INSERT INTO quota_members (client_id, max_slots, priority) \
                     VALUES (?1, ?2, ?3)",
                    params![m.as_str(), x.max_slots, x.priority],
                )?;
            }
            for (s, n) in &q.systems {
                tx.execute(
                    "INSERT INTO quota_systems (system, max_slots) VALUES (?1, ?2)",
                    params![s.as_str(), n],
                )?;
            }
            Ok(())
        })
    }

    /// Writes changed durations and usage records (absolute values), in one transaction.
    pub fn save_queue(
        &mut self,
        durations: &[(String, DurationStat)],
        usage: &[(ClientId, Usage)],
    ) -> Result<(), Error> {
        if durations.is_empty() && usage.is_empty() {
            return Ok(());
        }
        self.write("writing durations and usage", |tx| {
            let mut d = tx.prepare_cached(
                "INSERT INTO durations (drv_name, mean_millis, samples) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (drv_name) DO UPDATE SET mean_millis = excluded.mean_millis, \
                 samples = excluded.samples",
            )?;
            for (name, s) in durations {
                d.execute(params![name, s.mean_millis.max(0.0), to_i64(s.samples)])?;
            }
            let mut u = tx.prepare_cached(
                "INSERT INTO usage (client_id, builds, build_millis, wait_millis) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (client_id) DO UPDATE SET \
                 builds = excluded.builds, build_millis = excluded.build_millis, \
                 wait_millis = excluded.wait_millis",
            )?;
            for (m, x) in usage {
                u.execute(params![
                    m.as_str(),
                    to_i64(x.builds),
                    to_i64(x.build_millis),
                    to_i64(x.wait_millis)
                ])?;
            }
            Ok(())
        })
    }
}
