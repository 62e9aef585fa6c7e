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
//! and the sampler), [`backoff`], the private session loop, and [`gate`] (the local socket
//! through which the builder-side gate reaches the scheduler without holding the builder's
//! credential).
//!
//! Architecture invariant: parsers do no I/O; the session loop never blocks on anything but
//! the scheduler and one sample's worth of `/proc` reads.

pub mod backoff;
pub mod config;
pub mod discover;
mod error;
pub mod gate;
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
    // A gate socket that cannot be served is a configuration error, found at start.
    let listener = gate::bind(&settings.gate)?;
    run_with_listener(settings, listener, shutdown).await;
    Ok(())
}

/// Runs the agent on already resolved settings (tests adjust them, e.g. the proc root).
/// A gate socket that cannot be bound is logged and left out.
pub async fn run_with_settings(settings: Settings, shutdown: impl Future<Output = ()>) {
    let listener = gate::bind(&settings.gate).unwrap_or_else(|e| {
        let e: &dyn std::error::Error = &e;
        tracing::error!(error = e, "running without the gate socket");
        None
    });
    run_with_listener(settings, listener, shutdown).await;
}

/// The capacity session, and the gate socket beside it when there is one: two tasks that
/// never wait on each other, ended together by `shutdown`.
async fn run_with_listener(
    settings: Settings,
    listener: Option<tokio::net::UnixListener>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let gate = listener.map(|l| {
        tracing::info!(socket = ?settings.gate.socket, "serving the gate socket");
        tokio::spawn(gate::serve(
            l,
            settings.gate.clone(),
            settings.client.clone(),
            settings.register.host_id.clone(),
            async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            },
        ))
    });
    let path = settings.gate.socket.clone();
    session::run(settings, async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await;
    if let Some(g) = gate {
        // In-flight gate calls are bounded; do not wait past that.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), g).await;
        if let Some(p) = path {
            let _ = std::fs::remove_file(p);
        }
    }
}
