//! The nixdispatch scheduler: it keeps the per-system view of every builder, hands out the
//! least-loaded suitable host for each build, and counts each lease at once.
//!
//! - [`core`]: the pure scheduling state machine (no I/O, time passed in).
//! - [`service`]: the gRPC adapter (agent, lease and admin services).
//! - [`server`]: wires the services, health and reflection into one tonic server.
//! - [`store`]: the operator state database (drains), written through by the service.
//! - [`config`]: the TOML configuration and its embedded defaults.
//! - [`auth`]: who is calling (members, operators, provisioned builders) and what they may do.
//! - [`tls`]: the server's TLS settings.
//! - [`probe`]: the scheduler's own SSH probe of one builder (the service decides when).

pub mod auth;
pub mod config;
pub mod core;
mod error;
mod incoming;
mod limits;
pub mod probe;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;

pub use error::{Error, StoreProblem};
