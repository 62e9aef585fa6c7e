//! The nixdispatch agent: reports a builder's real capacity to the scheduler.
//!
//! Every builder runs one agent. It discovers what the host is (systems, features and slots
//! from the local Nix, the SSH host key), dials out to the scheduler, registers, and then
//! reports how busy the host really is (load, pressure, memory, disk, and the Nix builds
//! running, counted from the process table so builds the scheduler did not place count too)
//! before each deadline the scheduler gives. It reconnects forever with back-off and says
//! goodbye on a clean shutdown.
//!
//! Map: [`config`] (TOML and defaults → validated settings), [`discover`] (`nix config`
//! and host key parsers), [`sample`] (the pure `/proc`, `dscl` and build-counting parsers,
//! and the sampler), [`backoff`], and the private session loop.
//!
//! Architecture invariant: parsers do no I/O; the session loop never blocks on anything but
//! the scheduler and one sample's worth of `/proc` reads.

pub mod backoff;
pub mod config;
pub mod discover;
mod error;
pub mod sample;
mod session;

use std::future::Future;

pub use config::{Config, Settings, Timing};
pub use error::{Error, Result};

/// Runs the agent until `shutdown` completes: resolves `config` (asking the local Nix only
/// for what is unset), then keeps a session with the scheduler, reconnecting as needed.
///
/// Returns an error only for a configuration that cannot work (a bad key, a missing host
/// key); a scheduler that is down is retried forever, never an error.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    // Discovery may wait on a slow `nix`; a shutdown meanwhile ends the agent at once.
    let settings = tokio::select! {
        biased;
        () = shutdown.as_mut() => return Ok(()),
        settings = config.resolve() => settings?,
    };
    run_with_settings(settings, shutdown).await;
    Ok(())
}

/// Runs the agent on already resolved settings (tests adjust them, e.g. the proc root).
pub async fn run_with_settings(settings: Settings, shutdown: impl Future<Output = ()>) {
    session::run(settings, shutdown).await;
}
