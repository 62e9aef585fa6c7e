//! nixdispatch: a remote-build scheduler for Nix community builders.
//!
//! This crate holds what every component shares: the generated gRPC protocol
//! ([`proto`]), and the client side of the system: the Nix build hook, the operator CLI and
//! the member-side `doctor`.
//! The scheduler lives in `nixdispatch-scheduler`, the builder agent in `nixdispatch-agent`.
//! See `ARCHITECTURE.md` at the repository root for the map.

pub mod cli;
pub mod client;
pub mod diag;
pub mod doctor;
pub mod drain;
pub mod gate;
pub mod hook;
pub mod proto;
pub mod status;
pub mod validate;
