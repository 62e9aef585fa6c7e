//! The `provisioned_hosts` table: builders an operator provisioned through the admin API
//! (those in the configuration are not stored: the configuration is their source).

use std::time::SystemTime;

use rusqlite::params;

use super::{Store, store_error, unix_millis};
use crate::auth::HostEntry;
use crate::core::HostId;
use crate::{Error, StoreProblem};

impl Store {
    /// Every provisioned builder, by host id. A row that no longer validates is an error
    /// naming it, not skipped: a builder that silently vanished would lock its agent out.
    pub fn provisioned_hosts(&self) -> Result<Vec<HostEntry>, Error> {
        let fail = |e| store_error(&self.location, "reading the provisioned hosts", e);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT host_id, store_uri, public_key, token_sha256 FROM provisioned_hosts \
                 ORDER BY host_id",
            )
            .map_err(fail)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(HostEntry {
                    id: r.get(0)?,
                    store_uri: r.get(1)?,
                    public_key: r.get(2)?,
                    token_sha256: r.get(3)?,
                })
            })
            .map_err(fail)?;
        let mut hosts = Vec::new();
        for row in rows {
            let entry = row.map_err(fail)?;
            entry.validate().map_err(|e| Error::Store {
                path: self.location.to_string(),
                problem: StoreProblem::BadRow {
                    table: "provisioned_hosts",
                    reason: format!("host_id {:?}: {e}", entry.id),
                },
                source: None,
            })?;
            hosts.push(entry);
        }
        Ok(hosts)
    }

    /// Provisions (or re-provisions) a builder, committed before it returns.
    pub fn provision_host(&mut self, entry: &HostEntry, now: SystemTime) -> Result<(), Error> {
        let e = entry.clone();
        self.write("writing a provisioned host", |tx| {
            tx.execute(
                "INSERT INTO provisioned_hosts (host_id, store_uri, public_key, token_sha256, \
                 provisioned_at_unix_millis) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (host_id) DO UPDATE SET store_uri = ?2, public_key = ?3, \
                 token_sha256 = ?4, provisioned_at_unix_millis = ?5",
                params![
                    e.id,
                    e.store_uri,
                    e.public_key,
                    e.token_sha256,
                    unix_millis(now)
                ],
            )
        })?;
        Ok(())
    }

    /// Removes a provisioned builder; `true` when there was one.
    pub fn unprovision_host(&mut self, id: &HostId) -> Result<bool, Error> {
        let id = id.to_string();
        let removed = self.write("removing a provisioned host", |tx| {
            tx.execute("DELETE FROM provisioned_hosts WHERE host_id = ?1", [&id])
        })?;
        Ok(removed > 0)
    }
}
