//! The `drains` table: host ids an operator drained, whether or not their agents are
//! connected. A row is a drain; undraining deletes it.

use std::time::SystemTime;

use rusqlite::params;

use super::{Store, store_error, unix_millis};
use crate::core::HostId;
use crate::service::convert;
use crate::{Error, StoreProblem};

impl Store {
    /// Every drained host id, sorted. A row whose host id agents could not register is an
    /// error naming it, not skipped: a drain that silently vanished would reopen a host.
    pub fn drains(&self) -> Result<Vec<HostId>, Error> {
        let fail = |e| store_error(&self.location, "reading the drains", e);
        let mut stmt = self
            .conn
            .prepare("SELECT host_id FROM drains ORDER BY host_id")
            .map_err(fail)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(fail)?;
        let mut drains = Vec::new();
        for row in rows {
            let id = row.map_err(fail)?;
            let id = convert::admin_host_id(&id).map_err(|e| Error::Store {
                path: self.location.to_string(),
                problem: StoreProblem::BadRow {
                    table: "drains",
                    reason: format!("host_id {id:?}: {e}"),
                },
                source: None,
            })?;
            drains.push(id);
        }
        Ok(drains)
    }

    /// Drains host `id` (keeping the time of an earlier drain) or undrains it, committed
    /// before it returns.
    pub fn set_drain(&mut self, id: &HostId, draining: bool, now: SystemTime) -> Result<(), Error> {
        let id = id.to_string();
        if draining {
            self.write("writing a drain", |tx| {
                tx.execute(
                    "INSERT INTO drains (host_id, drained_at_unix_millis) VALUES (?1, ?2) \
                     ON CONFLICT (host_id) DO NOTHING",
                    params![id, unix_millis(now)],
                )
            })?;
        } else {
            self.write("removing a drain", |tx| {
                tx.execute("DELETE FROM drains WHERE host_id = ?1", [id])
            })?;
        }
        Ok(())
    }
}
