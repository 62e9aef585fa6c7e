//! The builder-side gate (`nixdispatch-gate`): sshd's forced command for members, which makes
//! every remote build on the box wait for a lease from the scheduler, whatever Nix or Lix the
//! member runs and without anything installed on the member's machine.
//!
//! Layers, from pure to I/O:
//! - [`wire`]: the protocols' primitives (u64, strings, lists, framed and sized bulk data).
//! - [`worker`] and [`serve`]: the two protocols' grammars, both directions; [`drv`]: a
//!   derivation's system and features, from the wire or from a `.drv` file.
//! - [`session`]: one relayed session, sans I/O: bytes in, what to forward, which build to
//!   hold, when its result went back.
//! - [`command`]: what the member asked sshd to run; [`wait`]: how a held build waits and
//!   what the member reads; [`config`]: the TOML configuration; [`error`]: the error type.
//! - `scheduler` and `run`: the gRPC calls with hard time bounds, and the processes and
//!   file descriptors.
//!
//! Architecture invariant: nothing but `run` touches file descriptors or processes, and
//! nothing but `scheduler` talks to the network; the framing never blocks and never panics
//! on any input (property-tested and fuzzed). See `docs/gate.md` for deployment.

pub mod command;
pub mod config;
pub mod drv;
pub mod error;
mod run;
mod scheduler;
pub mod serve;
pub mod session;
pub mod wait;
pub mod wire;
pub mod worker;

#[cfg(test)]
mod tests;

pub use run::main;

pub(crate) use crate::diag::error_chain;
