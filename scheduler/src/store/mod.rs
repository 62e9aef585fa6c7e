//! The operator state database: what operators decided (drains today), in an embedded
//! SQLite file so that it survives restarts.
//!
//! The core holds this state in memory and performs no I/O. The service layer writes each
//! operator change here first, applies it to the core only once it is committed, and
//! restores the core from here at start (`crate::service::Shared`).
//!
//! Layout, for whoever adds a table family:
//! - `schema`: the schema version table and the ordered migrations. A new table family adds
//!   one migration at the end of the list; a released migration is never edited.
//! - one module per table family (`drains`, `queue`), each an `impl Store` block with its reads and
//!   its writes, every write one transaction through [`Store::write`].
//!
//! Opening never changes a file it cannot use: a file that is not SQLite or is damaged,
//! another application's database, a newer schema, a read-only or a locked file each stop
//! the start with [`Error::Store`] naming the file and the problem, before anything is
//! written. Only an empty or older database of ours is written at open (its migrations, in
//! one transaction).
//!
//! **Blocking, on purpose.** rusqlite is synchronous and a committed write waits for the
//! disk (`synchronous = FULL`, the default of the rollback journal), milliseconds and more
//! on a busy disk. Operator writes are rare, so the service runs them in
//! `tokio::task::spawn_blocking` rather than on a runtime worker the acquire path needs, and
//! never holds the core's lock while one runs. An async SQLite wrapper would add a
//! dependency and a thread of its own for a handful of writes a day.

mod drains;
mod hosts;
mod queue;
mod schema;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};
use tracing::{info, warn};

use crate::config::StateConfig;
use crate::{Error, StoreProblem};

pub use queue::QueueState;
pub use schema::LATEST_VERSION;

/// The file name of the default database inside systemd's `STATE_DIRECTORY`.
pub const DEFAULT_FILE_NAME: &str = "scheduler.sqlite3";

/// Where the state lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A database file.
    File(PathBuf),
    /// Memory only: lost when the scheduler stops.
    Memory,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(path) => write!(f, "{}", path.display()),
            Location::Memory => f.write_str(":memory:"),
        }
    }
}

/// An open operator state database, migrated to [`LATEST_VERSION`].
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    location: Location,
}

impl Store {
    /// Opens the database `config` names, or, when it names none, the default: a file
    /// [`DEFAULT_FILE_NAME`] in `state_directory` (systemd's `STATE_DIRECTORY`, which the
    /// binary passes and the library never reads itself), or memory when there is no
    /// state directory or no file can be created in it. Both fallbacks are logged.
    ///
    /// A database that was named, or that already exists in the state directory, must
    /// open: every problem with it is an [`Error::Store`].
    pub fn open(config: &StateConfig, state_directory: Option<&Path>) -> Result<Self, Error> {
        let busy = Duration::from_millis(config.busy_timeout_millis);
        let store = match (&config.database, state_directory) {
            (Some(path), _) => Self::open_file(path, busy)?,
            (None, Some(dir)) => {
                let path = dir.join(DEFAULT_FILE_NAME);
                let existed = path.exists();
                match Self::open_file(&path, busy) {
                    Ok(store) => store,
                    Err(Error::Store {
                        problem: StoreProblem::CannotOpen | StoreProblem::ReadOnly,
                        ..
                    }) if !existed => {
                        warn!(
                            path = %path.display(),
                            "cannot create the operator state database in the state \
                             directory: keeping operator state in memory only, lost on restart"
                        );
                        Self::open_memory()?
                    }
                    Err(e) => return Err(e),
                }
            }
            (None, None) => {
                warn!(
                    "operator state (drains) is kept in memory only and lost on restart: set \
                     [state] database, or run under systemd with StateDirectory="
                );
                Self::open_memory()?
            }
        };
        if let Location::File(path) = &store.location {
            info!(path = %path.display(), "operator state database open");
        }
        Ok(store)
    }

    /// Opens or creates the database file `path` and migrates it.
    pub fn open_file(path: &Path, busy_timeout: Duration) -> Result<Self, Error> {
        let location = Location::File(path.to_owned());
        let fail = |doing| {
            let location = location.clone();
            move |e| store_error(&location, doing, e)
        };
        // No `SQLITE_OPEN_URI`: the path is a path, never a URI with options.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(fail("opening"))?;
        conn.busy_timeout(busy_timeout)
            .map_err(fail("setting the busy timeout"))?;
        // SQLite silently opens a file it may not write read-only; say so now rather than
        // at the first drain.
        if conn
            .is_readonly(rusqlite::MAIN_DB)
            .map_err(fail("opening"))?
        {
            return Err(Error::Store {
                path: location.to_string(),
                problem: StoreProblem::ReadOnly,
                source: None,
            });
        }
        Self::migrated(conn, location)
    }

    /// A fresh database in memory, for a scheduler without a state file (and for tests).
    pub fn open_memory() -> Result<Self, Error> {
        let conn = Connection::open_in_memory()
            .map_err(|e| store_error(&Location::Memory, "opening", e))?;
        Self::migrated(conn, Location::Memory)
    }

    fn migrated(mut conn: Connection, location: Location) -> Result<Self, Error> {
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(|e| store_error(&location, "enabling foreign keys", e))?;
        schema::migrate(&mut conn, &location)?;
        Ok(Self { conn, location })
    }

    /// Where the state lives.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Runs `f` in one immediate transaction and commits it: all of `f`'s writes land, or
    /// none. `doing` names the operation in the error.
    pub fn write<T>(
        &mut self,
        doing: &'static str,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, rusqlite::Error>,
    ) -> Result<T, Error> {
        let location = &self.location;
        let fail = |e| store_error(location, doing, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        let value = f(&tx).map_err(fail)?;
        tx.commit().map_err(fail)?;
        Ok(value)
    }
}

/// `t` as Unix milliseconds, the unit of every time column.
fn unix_millis(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// An [`Error::Store`] for a failure of SQLite while `doing` something, with the problem
/// picked from SQLite's error code.
fn store_error(location: &Location, doing: &'static str, e: rusqlite::Error) -> Error {
    let problem = match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreProblem::Corrupt,
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreProblem::Locked,
        Some(ErrorCode::ReadOnly) => StoreProblem::ReadOnly,
        Some(ErrorCode::CannotOpen) => StoreProblem::CannotOpen,
        _ => StoreProblem::Failed { doing },
    };
    Error::Store {
        path: location.to_string(),
        problem,
        source: Some(Box::new(e)),
    }
}

#[cfg(test)]
mod tests;
