//! The Nix build hook (`nixdispatch-hook`): answers the daemon's `try`s from the scheduler
//! and hands accepted builds to the stock build-remote of the installed Nix.
//!
//! Layers, from pure to I/O:
//! - [`codec`]: the hook wire protocol (settings, `try`, inputs; replies and `@nix` lines).
//! - [`machine`]: a validated [`machine::Grant`] and its machines line.
//! - [`decision`]: what to answer a `try`, what a child's end means for the lease, the
//!   rewritten handshake, which build-remote to run.
//! - [`config`]: the TOML configuration.
//! - `scheduler`: the gRPC calls with hard time bounds.
//! - `lease`: the lease lifecycle (acquire, keep-alive, release, another host when one cannot
//!   be reached, cancel on a signal), behind a `Frontend` trait that the Nix-facing side
//!   implements.
//! - `run`: the text-protocol front end (Nix and Lix up to 2.93): fds 0 and 2, the child
//!   build-remote. A Cap'n Proto front end (Lix 2.94+) would be a second `Frontend`.
//! - `ssh`: the persistent SSH master connections that the child build-remote joins (names,
//!   arguments and files as pure functions; starting a master).
//!
//! Architecture invariant: nothing but `run` and `ssh` touch file descriptors or processes, nothing
//! but `scheduler` talks to the network, and nothing but `lease` decides what happens to a
//! lease. See `docs/hook.md` for deployment.

pub mod codec;
pub mod config;
pub mod decision;
mod lease;
pub mod machine;
mod run;
mod scheduler;
mod ssh;

pub use run::main;
