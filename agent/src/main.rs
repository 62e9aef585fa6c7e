//! `nixdispatch-agent`: parse flags and the config file, set up logging, run the agent until
//! SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use nixdispatch_agent::Config;

/// Reports this builder's capacity to the nixdispatch scheduler.
///
/// Every setting has a default (see `Config` in the crate docs); a flag overrides the config
/// file, which overrides the default. Settings given explicitly are not discovered from Nix.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// TOML config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Scheduler endpoint [default: http://127.0.0.1:50051].
    #[arg(long, value_name = "URL")]
    scheduler: Option<String>,
    /// Stable host id [default: the host name].
    #[arg(long)]
    host_id: Option<String>,
    /// Store URI clients use [default: ssh-ng://<hostname>].
    #[arg(long, value_name = "URI")]
    store_uri: Option<String>,
    /// SSH host public key file [default: /etc/ssh/ssh_host_ed25519_key.pub].
    #[arg(long, value_name = "FILE")]
    host_key_file: Option<PathBuf>,
    /// Systems, comma-separated [default: Nix's `system` and `extra-platforms`].
    #[arg(long, value_delimiter = ',')]
    systems: Option<Vec<String>>,
    /// Supported features, comma-separated [default: Nix's `system-features`].
    #[arg(long, value_delimiter = ',')]
    features: Option<Vec<String>>,
    /// Mandatory features, comma-separated [default: none].
    #[arg(long, value_delimiter = ',')]
    mandatory_features: Option<Vec<String>>,
    /// Build slots [default: Nix's `max-jobs`].
    #[arg(long, value_name = "N")]
    max_jobs: Option<u32>,
    /// Relative speed of a slot [default: 1].
    #[arg(long, value_name = "F")]
    speed_factor: Option<f64>,
    /// Nix store directory, for its free space [default: /nix/store].
    #[arg(long, value_name = "DIR")]
    store_dir: Option<PathBuf>,
    /// Build directory, for its free space [default: $TMPDIR or /tmp].
    #[arg(long, value_name = "DIR")]
    build_dir: Option<PathBuf>,
    /// This host's token file (never the token itself on the command line).
    #[arg(long, value_name = "FILE")]
    credential_file: Option<PathBuf>,
    /// PEM file of the CA that signed the scheduler's certificate (https:// schedulers).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// The name on the scheduler's certificate, when the --scheduler URL does not use it.
    #[arg(long, value_name = "NAME")]
    tls_domain: Option<String>,
    /// `nix` binary used for discovery [default: nix].
    #[arg(long, value_name = "PATH")]
    nix_bin: Option<PathBuf>,
    /// Build users group for counting builds; empty for none [default: Nix's `build-users-group`].
    #[arg(long, value_name = "GROUP")]
    build_users_group: Option<String>,
    /// Serve the builder-side gate on this Unix socket (`[gate] socket`) [default: none].
    #[arg(long, value_name = "PATH")]
    gate_socket: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `--features ''` means "none", not one empty feature.
fn list(values: Vec<String>) -> Vec<String> {
    values.into_iter().filter(|v| !v.is_empty()).collect()
}

impl Cli {
    fn apply(self, c: &mut Config) {
        if let Some(v) = self.scheduler {
            c.scheduler = v;
        }
        if let Some(v) = self.host_id {
            c.host_id = Some(v);
        }
        if let Some(v) = self.store_uri {
            c.store_uri = Some(v);
        }
        if let Some(v) = self.host_key_file {
            c.host_key_file = v;
        }
        if let Some(v) = self.systems {
            c.systems = Some(list(v));
        }
        if let Some(v) = self.features {
            c.features = Some(list(v));
        }
        if let Some(v) = self.mandatory_features {
            c.mandatory_features = list(v);
        }
        if let Some(v) = self.max_jobs {
            c.max_jobs = Some(v);
        }
        if let Some(v) = self.speed_factor {
            c.speed_factor = v;
        }
        if let Some(v) = self.store_dir {
            c.store_dir = v;
        }
        if let Some(v) = self.build_dir {
            c.build_dir = Some(v);
        }
        if let Some(v) = self.credential_file {
            c.credential_file = Some(v);
        }
        if let Some(v) = self.ca_file {
            c.ca_file = Some(v);
        }
        if let Some(v) = self.tls_domain {
            c.tls_domain = Some(v);
        }
        if let Some(v) = self.nix_bin {
            c.nix_bin = v;
        }
        if let Some(v) = self.build_users_group {
            c.build_users_group = Some(v);
        }
        if let Some(v) = self.gate_socket {
            c.gate.socket = Some(v);
        }
    }
}

/// Completes on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let mut config = match &cli.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    cli.apply(&mut config);
    // One thread is plenty for a stream and a sample every few seconds, and keeps the
    // resident memory small.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(nixdispatch_agent::run(config, shutdown_signal()))?;
    Ok(())
}
