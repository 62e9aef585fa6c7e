//! The schema: a version table and the ordered migrations that lead to [`LATEST_VERSION`].
//!
//! A database of ours is marked with [`APPLICATION_ID`] in its header, so that a path
//! pointing at another application's SQLite file is refused instead of being "migrated".
//! `schema_version` has one row per applied migration; the database's version is the
//! highest. To add a table family, append a [`Migration`] with the next version; never edit
//! or reorder a released one (a database in the field has already run it).

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::{Location, store_error};
use crate::{Error, StoreProblem};

/// `PRAGMA application_id` of a nixdispatch scheduler database: `NXDS` in ASCII.
pub(super) const APPLICATION_ID: i32 = 0x4E58_4453;

/// One step of the schema.
#[derive(Debug)]
pub(super) struct Migration {
    /// Its version: its position in [`MIGRATIONS`], counted from 1.
    pub(super) version: u32,
    /// What it adds, recorded in `schema_version`.
    pub(super) name: &'static str,
    /// The statements, run in the migration's transaction.
    pub(super) sql: &'static str,
}

/// Every migration, in order.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "drains",
        sql: "CREATE TABLE drains (
              -- A host id as agents register it (validated when loaded).
              host_id TEXT PRIMARY KEY NOT NULL,
              -- When an operator drained it, Unix time in milliseconds.
              drained_at_unix_millis INTEGER NOT NULL
          ) STRICT, WITHOUT ROWID;",
    },
    Migration {
        version: 2,
        name: "provisioned_hosts",
        sql: "CREATE TABLE provisioned_hosts (
              -- The host id its agent must register with.
              host_id TEXT PRIMARY KEY NOT NULL,
              -- The store URI members will use (validated when loaded).
              store_uri TEXT NOT NULL,
              -- The pinned SSH host key line.
              public_key TEXT NOT NULL,
              -- SHA-256 of the agent's token, hex; never the token.
              token_sha256 TEXT NOT NULL,
              -- When an operator provisioned it, Unix time in milliseconds.
              provisioned_at_unix_millis INTEGER NOT NULL
          ) STRICT, WITHOUT ROWID;",
    },
    Migration {
        version: 3,
        name: "queue",
        sql: "-- Quotas as an operator last set them. The one row exists once an operator
          -- changed any quota; from then on these tables, not the configuration, hold the
          -- quotas in force.
          CREATE TABLE quota_default (
              id INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
              -- Most live leases of a member without its own; NULL: unlimited.
              member_max_slots INTEGER CHECK (member_max_slots >= 0),
              set_at_unix_millis INTEGER NOT NULL
          ) STRICT;
          CREATE TABLE quota_members (
              -- A client id (validated when loaded).
              client_id TEXT PRIMARY KEY NOT NULL,
              -- NULL: the default applies.
              max_slots INTEGER CHECK (max_slots >= 0),
              priority INTEGER NOT NULL CHECK (priority BETWEEN -10000 AND 10000)
          ) STRICT, WITHOUT ROWID;
          CREATE TABLE quota_systems (
              system TEXT PRIMARY KEY NOT NULL,
              max_slots INTEGER NOT NULL CHECK (max_slots >= 0)
          ) STRICT, WITHOUT ROWID;
          -- Expected build durations learned per derivation name.
          CREATE TABLE durations (
              drv_name TEXT PRIMARY KEY NOT NULL,
              -- Exponentially weighted mean slot time, milliseconds.
              mean_millis REAL NOT NULL CHECK (mean_millis >= 0),
              samples INTEGER NOT NULL CHECK (samples >= 0)
          ) STRICT, WITHOUT ROWID;
          -- Usage records per member, totals since the first start.
          CREATE TABLE usage (
              client_id TEXT PRIMARY KEY NOT NULL,
              builds INTEGER NOT NULL CHECK (builds >= 0),
              build_millis INTEGER NOT NULL CHECK (build_millis >= 0),
              wait_millis INTEGER NOT NULL CHECK (wait_millis >= 0)
          ) STRICT, WITHOUT ROWID;",
    },
];

/// The schema version this scheduler writes and reads.
pub const LATEST_VERSION: u32 = MIGRATIONS.len() as u32;

/// The bookkeeping table, created with the first migration.
const VERSION_TABLE: &str = "CREATE TABLE schema_version (
    version INTEGER PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    applied_at_unix_millis INTEGER NOT NULL
) STRICT;";

/// Checks that `conn` is a database of ours that this scheduler can use, and brings it to
/// [`LATEST_VERSION`] in one transaction. Changes nothing unless it is empty or ours and
/// older.
pub(super) fn migrate(conn: &mut Connection, location: &Location) -> Result<(), Error> {
    let fail = |doing| move |e| store_error(location, doing, e);
    let refuse = |problem| Error::Store {
        path: location.to_string(),
        problem,
        source: None,
    };
    // Immediate: the lock is taken before anything is read, so two schedulers starting on
    // one file cannot both migrate it.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(fail("locking for the schema check"))?;
    let application_id: i32 = tx
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(fail("reading the header"))?;
    let found = match application_id {
        APPLICATION_ID => tx
            .query_row("SELECT max(version) FROM schema_version", [], |r| {
                r.get::<_, Option<u32>>(0)
            })
            .optional()
            .map_err(fail("reading the schema version"))?
            .flatten()
            .unwrap_or(0),
        0 => {
            let objects: i64 = tx
                .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
                .map_err(fail("reading the schema"))?;
            if objects > 0 {
                return Err(refuse(StoreProblem::Foreign { application_id }));
            }
            tx.pragma_update(None, "application_id", APPLICATION_ID)
                .map_err(fail("marking the database"))?;
            tx.execute_batch(VERSION_TABLE)
                .map_err(fail("creating the schema version table"))?;
            0
        }
        other => {
            return Err(refuse(StoreProblem::Foreign {
                application_id: other,
            }));
        }
    };
    if found > LATEST_VERSION {
        return Err(refuse(StoreProblem::NewerSchema {
            found,
            known: LATEST_VERSION,
        }));
    }
    let now = super::unix_millis(std::time::SystemTime::now());
    for m in MIGRATIONS.iter().filter(|m| m.version > found) {
        tx.execute_batch(m.sql)
            .map_err(fail("migrating the schema"))?;
        tx.execute(
            "INSERT INTO schema_version (version, name, applied_at_unix_millis) \
             VALUES (?1, ?2, ?3)",
            (m.version, m.name, now),
        )
        .map_err(fail("recording a migration"))?;
    }
    tx.commit().map_err(fail("committing the schema"))?;
    Ok(())
}
