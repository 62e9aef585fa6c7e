//! The scheduler's one error type, and its single mapping to `tonic::Status`.

use crate::core::Error as CoreError;

/// Everything that can go wrong in the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request or agent message carried a bad field.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The field, as a path into the message (e.g. `register.systems[1]`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The call carried no credential, or one the scheduler does not know.
    #[error("unauthenticated: {reason}")]
    Unauthenticated {
        /// What is missing or wrong (never the credential itself).
        reason: String,
    },
    /// The caller is known but may not do this: wrong role, or not the owner.
    #[error("permission denied: {identity} may not {action}: {reason}")]
    PermissionDenied {
        /// Who asked (`member alice`, `operator ops`, `host build01`).
        identity: String,
        /// What was refused (`drain a host`, `release lease …`).
        action: String,
        /// Why.
        reason: String,
    },
    /// An agent's registration differs from what operators provisioned for its host id.
    #[error("registration of host `{host_id}` refused: {reason}")]
    NotProvisioned {
        /// The host id the agent claimed.
        host_id: String,
        /// What differs (never the credential itself).
        reason: String,
    },
    /// A per-identity limit was reached.
    #[error("{identity} reached its limit of {limit} {what}")]
    LimitReached {
        /// Who.
        identity: String,
        /// What is limited (`live leases`, `waiting requests`).
        what: &'static str,
        /// The configured limit.
        limit: usize,
    },
    /// A message was larger than `limits.max_message_bytes`.
    #[error("message too large: {detail}")]
    TooLarge {
        /// What the decoder said (sizes).
        detail: String,
    },
    /// The scheduling core refused the operation (unknown lease or host, superseded stream).
    #[error(transparent)]
    Core(#[from] crate::core::Error),
    /// An agent stream broke the protocol's order (e.g. a report before the registration).
    #[error("agent protocol violation: {0}")]
    Protocol(String),
    /// The configuration is invalid.
    #[error("configuration key `{key}`: {reason}")]
    Config {
        /// The offending key, dotted (`leases.ttl_millis`).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration file could not be parsed.
    #[error("configuration file {path}: {source}")]
    ConfigParse {
        /// The file.
        path: String,
        /// The parser's error (names the key of an unknown or mistyped field).
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The operator state database could not be opened, read or written. At start this stops
    /// the scheduler before anything in the file was changed.
    #[error("state database {path}: {problem}")]
    Store {
        /// The file, or `:memory:`.
        path: String,
        /// What is wrong with it.
        problem: StoreProblem,
        /// SQLite's own error, when it gave one.
        #[source]
        source: Option<Box<rusqlite::Error>>,
    },
    /// The reflection service could not be built from the descriptor sets.
    #[error("building gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// What is wrong with the operator state database (see [`Error::Store`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreProblem {
    /// It cannot be opened or created: a missing directory, or no permission.
    CannotOpen,
    /// It is not an SQLite database, or a damaged one.
    Corrupt,
    /// Another process held a lock on it for longer than `state.busy_timeout_millis`.
    Locked,
    /// It can be read but not written.
    ReadOnly,
    /// It is an SQLite database of another application.
    Foreign {
        /// Its `PRAGMA application_id` (0 when unset).
        application_id: i32,
    },
    /// Its schema is newer than this scheduler knows: a newer version wrote it.
    NewerSchema {
        /// The version in the file.
        found: u32,
        /// The newest version this scheduler knows.
        known: u32,
    },
    /// A row this scheduler cannot use.
    BadRow {
        /// The table.
        table: &'static str,
        /// What is wrong with the row.
        reason: String,
    },
    /// Any other failure of SQLite or of the disk.
    Failed {
        /// What was being done, e.g. `writing a drain`.
        doing: &'static str,
    },
}

impl std::fmt::Display for StoreProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CannotOpen => f.write_str(
                "cannot be opened or created (does its directory exist, and may the scheduler \
                 write there?)",
            ),
            Self::Corrupt => f.write_str(
                "is not an SQLite database or is damaged; it was left as it is (restore a \
                 backup, or move it away to start with no operator state)",
            ),
            Self::Locked => f.write_str(
                "is locked by another process (another scheduler on the same file, or a long \
                 backup)",
            ),
            Self::ReadOnly => f.write_str("is read-only; the scheduler must be able to write it"),
            Self::Foreign { application_id } => write!(
                f,
                "is an SQLite database of another application (application_id {application_id:#x}); \
                 it was left as it is"
            ),
            Self::NewerSchema { found, known } => write!(
                f,
                "has schema version {found}, newer than the {known} this scheduler knows: a newer \
                 nixdispatch wrote it; run that version or restore a backup"
            ),
            Self::BadRow { table, reason } => write!(f, "table `{table}`: {reason}"),
            Self::Failed { doing } => write!(f, "{doing} failed"),
        }
    }
}

impl Error {
    /// An [`Error::InvalidArgument`] for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument { .. } | Error::Protocol(_) => {
                tonic::Status::invalid_argument(msg)
            }
            Error::Core(core) => match core {
                CoreError::UnknownLease { .. } | CoreError::UnknownHost { .. } => {
                    tonic::Status::not_found(msg)
                }
                CoreError::Superseded { .. } => tonic::Status::aborted(msg),
                CoreError::NotHolder { .. } => tonic::Status::permission_denied(msg),
                // Named here, where the core's limit meets the configuration's key.
                CoreError::TooManyWaiting { .. } => tonic::Status::resource_exhausted(format!(
                    "{msg} (queue.max_waiting_per_member); wait for some to be served"
                )),
            },
            Error::Unauthenticated { .. } => tonic::Status::unauthenticated(msg),
            Error::PermissionDenied { .. } | Error::NotProvisioned { .. } => {
                tonic::Status::permission_denied(msg)
            }
            Error::LimitReached { .. } | Error::TooLarge { .. } => {
                tonic::Status::resource_exhausted(msg)
            }
            Error::Config { .. } | Error::ConfigParse { .. } => {
                tonic::Status::failed_precondition(msg)
            }
            // A lock is held only as long as a backup or another scheduler holds it: retry.
            Error::Store {
                problem: StoreProblem::Locked,
                ..
            } => tonic::Status::unavailable(msg),
            Error::Io { .. } | Error::Store { .. } | Error::Transport(_) | Error::Reflection(_) => {
                tonic::Status::internal(msg)
            }
        }
    }
}
