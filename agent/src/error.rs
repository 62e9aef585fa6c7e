//! The crate's one error type.
//!
//! Each variant carries the structured context an operator needs (the config key, the file,
//! the command) and keeps its cause as `#[source]`, so a log line shows the whole chain.

use std::path::PathBuf;

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for [`crate::Config`] (unknown key, wrong type).
    #[error("invalid config file {path}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// Why, naming the key.
        #[source]
        source: toml::de::Error,
    },
    /// A config value is out of range or malformed.
    #[error("invalid value for `{key}`: {reason}")]
    InvalidConfig {
        /// The config key (same name as the TOML key, and as the flag without `--`).
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The connection to the scheduler cannot be prepared (endpoint, credential, CA).
    #[error(transparent)]
    Client(#[from] nixdispatch::client::ClientError),
    /// A file the agent needs (host key, credential) could not be read.
    #[error("cannot read `{key}` file {path}")]
    ReadFile {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Running `nix` to discover the defaults failed.
    #[error("cannot run `{command}` to discover the Nix settings")]
    NixCommand {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `nix` ran but exited with an error.
    #[error("`{command}` failed ({status}): {stderr}")]
    NixFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The first line(s) of its stderr.
        stderr: String,
    },
    /// The output of `nix config show --json` could not be understood.
    #[error("cannot parse the Nix settings: {reason}")]
    NixConfig {
        /// What is wrong.
        reason: String,
    },
    /// A sample file (`/proc/...`) is truncated, garbage or out of range.
    #[error("bad sample from {source_name}: {reason}")]
    BadSample {
        /// Which source (`/proc/loadavg`, ...).
        source_name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A sample source could not be read.
    #[error("cannot read {path}")]
    ReadSample {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A setting required by the protocol could neither be discovered nor was configured.
    #[error("`{key}` is not configured and could not be discovered: {reason}")]
    Undiscovered {
        /// The config key to set.
        key: &'static str,
        /// Why discovery failed.
        reason: String,
    },
    /// The gate socket could not be set up (`[gate] socket`).
    #[error("cannot serve the gate socket {path}")]
    GateSocket {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A gate asked for something the connecting user may not do.
    #[error("{user} (uid {uid}) may not {action}: {reason}")]
    GateRefused {
        /// The connecting user's name (or `?` when the uid has none).
        user: String,
        /// The connecting uid.
        uid: u32,
        /// What was asked.
        action: String,
        /// Why not.
        reason: String,
    },
    /// A gate's request is malformed (the field is named).
    #[error("invalid `{field}`: {reason}")]
    GateRequest {
        /// The request field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A gate named a lease that was not taken through this socket (or was forgotten).
    #[error("lease {lease_id} was not granted through this gate socket")]
    GateUnknownLease {
        /// The lease.
        lease_id: String,
    },
    /// The scheduler could not be asked for a gate.
    #[error("the scheduler cannot be reached: {reason}")]
    GateUpstream {
        /// Why.
        reason: String,
    },
}

/// The status a gate on the local socket receives for an error: the one place the agent's
/// errors become gRPC codes.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::GateRefused { .. } => tonic::Status::permission_denied(msg),
            Error::GateRequest { .. } => tonic::Status::invalid_argument(msg),
            Error::GateUnknownLease { .. } => tonic::Status::not_found(msg),
            Error::GateUpstream { .. } => tonic::Status::unavailable(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
