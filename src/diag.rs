//! What the client programs that Nix or sshd start (the hook, the gate) share for reporting
//! trouble: their stderr belongs to the member's Nix, so they log to a file only, and they
//! put an error with its sources on one line.

use std::path::Path;
use std::sync::Mutex;

/// Logs to `log_file` (appended) at `level` (`RUST_LOG` syntax, `info` when it does not
/// parse); without a file, or when it cannot be opened, nothing is logged: stderr is never
/// used, because Nix or the member reads it.
pub fn init_file_logging(log_file: Option<&Path>, level: &str) {
    let Some(path) = log_file else { return };
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .try_init();
}

/// The `Display` of an error and all its sources, `a: b: c` (a source whose text the
/// message already contains is not repeated).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}
