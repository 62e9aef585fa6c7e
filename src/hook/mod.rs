//! The Nix build hook (`nixdispatch-hook`): answers the daemon's `try`s from the scheduler
//! and hands accepted builds to the stock build-remote of the installed Nix.
//!
//! Layers, from pure to I/O:
//! - [`codec`]: the hook wire protocol (settings, `try`, inputs; replies and `@nix` lines).
//! - [`machine`]: a validated [`machine::Grant`] and its machines line.
//! - [`decision`]: what to answer a `try`, what a child's end means for the lease, the
//!   rewritten handshake, which build-remote to run.
//! - [`config`]: the TOML configuration.
//! - `scheduler` and `run`: the gRPC calls with hard time bounds, and the process plumbing.
//!
//! Architecture invariant: nothing but `run` touches file descriptors or processes, and
//! nothing but `scheduler` talks to the network. See `docs/hook.md` for deployment.

pub mod codec;
pub mod config;
pub mod decision;
pub mod machine;
mod run;
mod scheduler;

pub use run::main;
