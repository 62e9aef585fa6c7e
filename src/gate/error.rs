//! The gate's one error type.

use std::path::PathBuf;

/// Why the gate cannot do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The configuration file exists but cannot be read.
    #[error("cannot read {path}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is not valid TOML for this schema.
    #[error("{path}: {source}")]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A key has a value the gate cannot use.
    #[error("{path}: `{key}` {problem}")]
    ConfigInvalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// No usable member or host identity.
    #[error("invalid {what} {value:?}: 1 to 128 printable ASCII characters without spaces")]
    Identity {
        /// `member` or `host id`.
        what: &'static str,
        /// The value found.
        value: String,
    },
    /// A program could not be started.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Relaying failed.
    #[error("relay I/O failed while {what}")]
    Io {
        /// What the relay was doing.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}
