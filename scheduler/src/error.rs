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
    /// The reflection service could not be built from the descriptor sets.
    #[error("building gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The gRPC server failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
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
            },
            Error::Config { .. } | Error::ConfigParse { .. } => {
                tonic::Status::failed_precondition(msg)
            }
            Error::Io { .. } | Error::Transport(_) | Error::Reflection(_) => {
                tonic::Status::internal(msg)
            }
        }
    }
}
