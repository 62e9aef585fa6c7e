//! The store on real SQLite files in a temporary directory: creation, reopening, and every
//! kind of bad file, each of which must stop the open and leave the file as it was.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use rusqlite::Connection;

use super::schema::{APPLICATION_ID, MIGRATIONS};
use super::*;

const BUSY: Duration = Duration::from_millis(50);

fn id(s: &str) -> crate::core::HostId {
    crate::core::HostId::new(s)
}

/// Opens `path`, expecting the problem `want`; checks the error names the file and the file
/// is byte for byte what it was.
fn refused(path: &Path, want: fn(&StoreProblem) -> bool) -> String {
    let before = std::fs::read(path).unwrap();
    let err = Store::open_file(path, BUSY).unwrap_err();
    let text = err.to_string();
    match &err {
        Error::Store { problem, .. } => assert!(want(problem), "{err:?}"),
        other => panic!("{other:?}"),
    }
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert_eq!(std::fs::read(path).unwrap(), before, "the file was changed");
    text
}

/// A database of ours with one drain, closed.
fn database_with_a_drain(dir: &Path) -> PathBuf {
    let path = dir.join("state.sqlite3");
    let mut store = Store::open_file(&path, BUSY).unwrap();
    store.set_drain(&id("b1"), true, SystemTime::now()).unwrap();
    path
}

/// A new file is created and migrated; drains written to it are read back after reopening,
/// undrain removes them, and a repeated drain is one row.
#[test]
fn drains_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_with_a_drain(dir.path());
    let mut store = Store::open_file(&path, BUSY).unwrap();
    assert_eq!(store.location(), &Location::File(path.clone()));
    assert_eq!(store.drains().unwrap(), vec![id("b1")]);
    store.set_drain(&id("a0"), true, SystemTime::now()).unwrap();
    store.set_drain(&id("a0"), true, SystemTime::now()).unwrap();
    store
        .set_drain(&id("b1"), false, SystemTime::now())
        .unwrap();
    drop(store);
    let store = Store::open_file(&path, BUSY).unwrap();
    assert_eq!(store.drains().unwrap(), vec![id("a0")]);
}

/// A fresh database carries our application id and one `schema_version` row per migration.
#[test]
fn fresh_database_records_its_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sqlite3");
    drop(Store::open_file(&path, BUSY).unwrap());
    let conn = Connection::open(&path).unwrap();
    let app: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .unwrap();
    assert_eq!(app, APPLICATION_ID);
    let versions: Vec<u32> = conn
        .prepare("SELECT version FROM schema_version ORDER BY version")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(versions, (1..=LATEST_VERSION).collect::<Vec<_>>());
}

/// Migrations are numbered 1, 2, 3… in order, so that "apply those above the file's
/// version" is well defined.
#[test]
fn migrations_are_numbered_in_order() {
    for (i, m) in MIGRATIONS.iter().enumerate() {
        assert_eq!(m.version as usize, i + 1, "{}", m.name);
    }
}

/// A file that is not SQLite is refused as corrupt, named, and left untouched.
#[test]
fn garbage_file_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite3");
    std::fs::write(
        &path,
        b"these are not the pages you are looking for\n".repeat(100),
    )
    .unwrap();
    let text = refused(&path, |p| *p == StoreProblem::Corrupt);
    assert!(text.contains("not an SQLite database"), "{text}");
}

/// A database another process holds an exclusive lock on is refused as locked, and once
/// the lock is gone it opens with its drains intact.
#[test]
fn locked_database_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_with_a_drain(dir.path());
    let holder = Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let text = refused(&path, |p| *p == StoreProblem::Locked);
    assert!(text.contains("locked"), "{text}");
    holder.execute_batch("ROLLBACK").unwrap();
    drop(holder);
    let store = Store::open_file(&path, BUSY).unwrap();
    assert_eq!(store.drains().unwrap(), vec![id("b1")]);
}

/// Makes a file really unwritable, also for root (for whom `chmod` changes nothing): mode
/// 0444, then the immutable attribute. Undone on drop so that the directory can go.
struct Unwritable(PathBuf);

impl Unwritable {
    fn new(path: &Path) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let guard = Unwritable(path.to_owned());
        if std::fs::OpenOptions::new().write(true).open(path).is_ok() {
            let status = Command::new("chattr").arg("+i").arg(path).status();
            assert!(
                status.is_ok_and(|s| s.success()),
                "running as root, and `chattr +i` failed: cannot make a file read-only here"
            );
        }
        assert!(
            std::fs::OpenOptions::new().write(true).open(path).is_err(),
            "the file is still writable"
        );
        guard
    }
}

impl Drop for Unwritable {
    fn drop(&mut self) {
        let _ = Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A database the scheduler cannot write is refused as read-only at open, not at the first
/// drain, and left untouched.
#[test]
fn read_only_database_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_with_a_drain(dir.path());
    let _unwritable = Unwritable::new(&path);
    let text = refused(&path, |p| *p == StoreProblem::ReadOnly);
    assert!(text.contains("read-only"), "{text}");
}

/// A database whose schema version is newer than this scheduler's is refused with both
/// versions, and left untouched.
#[test]
fn newer_schema_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_with_a_drain(dir.path());
    let future = LATEST_VERSION + 7;
    Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO schema_version VALUES (?1, 'from the future', 0)",
            [future],
        )
        .unwrap();
    let text = refused(&path, |p| {
        *p == StoreProblem::NewerSchema {
            found: LATEST_VERSION + 7,
            known: LATEST_VERSION,
        }
    });
    assert!(text.contains(&format!("schema version {future}")), "{text}");
}

/// Another application's SQLite database (tables, no application id of ours) is refused,
/// not migrated into.
#[test]
fn foreign_database_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.sqlite3");
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE photos (id INTEGER PRIMARY KEY); INSERT INTO photos VALUES (1);",
        )
        .unwrap();
    refused(&path, |p| *p == StoreProblem::Foreign { application_id: 0 });
}

/// A drain row with a host id no agent could register is an error naming the table and the
/// id, not a drain silently dropped.
#[test]
fn invalid_host_id_row_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = database_with_a_drain(dir.path());
    Connection::open(&path)
        .unwrap()
        .execute("INSERT INTO drains VALUES ('no spaces allowed', 0)", [])
        .unwrap();
    let err = Store::open_file(&path, BUSY).unwrap().drains().unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Store {
                problem: StoreProblem::BadRow {
                    table: "drains",
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("no spaces allowed"), "{err}");
}

/// A named file in a directory that does not exist is an error naming it, not memory.
#[test]
fn named_file_that_cannot_be_created_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("state.sqlite3");
    let config = StateConfig {
        database: Some(path.clone()),
        ..StateConfig::default()
    };
    let err = Store::open(&config, None).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Store {
                problem: StoreProblem::CannotOpen,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

/// Without a named file: the state directory's `scheduler.sqlite3` when there is one,
/// memory when there is none or it cannot hold a file.
#[test]
fn default_location() {
    let config = StateConfig::default();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&config, Some(dir.path())).unwrap();
    assert_eq!(
        store.location(),
        &Location::File(dir.path().join(DEFAULT_FILE_NAME))
    );
    assert!(dir.path().join(DEFAULT_FILE_NAME).is_file());
    let store = Store::open(&config, None).unwrap();
    assert_eq!(store.location(), &Location::Memory);
    let store = Store::open(&config, Some(&dir.path().join("missing"))).unwrap();
    assert_eq!(store.location(), &Location::Memory);
}

/// A bad file that already exists in the state directory stops the start like a named one:
/// falling back to memory would silently drop its drains.
#[test]
fn bad_default_file_is_an_error_not_memory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(DEFAULT_FILE_NAME), b"garbage").unwrap();
    let err = Store::open(&StateConfig::default(), Some(dir.path())).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Store {
                problem: StoreProblem::Corrupt,
                ..
            }
        ),
        "{err:?}"
    );
}

/// The queue's tables: no operator quotas until one is set; quotas, durations and usage
/// written to a file read back the same after reopening, and changed records overwrite.
#[test]
fn queue_state_survives_reopening() {
    use crate::core::{ClientId, DurationStat, MemberQuota, Quotas, System, Usage};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite3");
    let mut store = Store::open_file(&path, BUSY).unwrap();
    assert_eq!(store.queue_state().unwrap(), QueueState::default());
    let mut q = Quotas {
        default_member_max_slots: Some(4),
        ..Quotas::default()
    };
    q.members.insert(
        ClientId::new("alice"),
        MemberQuota {
            max_slots: None,
            priority: -100,
        },
    );
    q.systems.insert(System::new("x86_64-linux"), 20);
    store.set_quotas(&q, SystemTime::now()).unwrap();
    let hello = |mean_millis| {
        vec![(
            "hello".to_owned(),
            DurationStat {
                mean_millis,
                samples: 2,
            },
        )]
    };
    let usage = vec![(
        ClientId::new("alice"),
        Usage {
            builds: 3,
            build_millis: 9000,
            wait_millis: 100,
        },
    )];
    store.save_queue(&hello(1500.0), &usage).unwrap();
    store.save_queue(&hello(2500.0), &[]).unwrap();
    drop(store);
    let store = Store::open_file(&path, BUSY).unwrap();
    assert_eq!(
        store.queue_state().unwrap(),
        QueueState {
            quotas: Some(q),
            durations: hello(2500.0),
            usage,
        }
    );
}
