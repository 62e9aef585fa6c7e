//! `nixdispatch-scheduler`: parse flags, load the configuration, bind, serve until SIGTERM
//! or SIGINT. All logic lives in the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Parser;
use nixdispatch_scheduler::config::Config;
use tracing::info;

/// The nixdispatch scheduler. Runs on embedded defaults without a configuration file.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file (every key optional; unknown keys are an error).
    #[arg(long, env = "NIXDISPATCH_SCHEDULER_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, overriding `listen` from the file (default 127.0.0.1:50051).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Once listening, write the bound `host:port` here (for `--listen 127.0.0.1:0`):
    /// a readiness signal for scripts and tests.
    #[arg(long)]
    address_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(tmp, path)
}

/// Installs the SIGTERM and SIGINT handlers now (before readiness is announced, so an early
/// signal is never met by the default action) and returns a future that ends on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(addr) = config.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            // Every gauge is set at least once per report interval (see
            // `service::metrics`), so one that stops changing belongs to a host the scheduler
            // forgot: drop its series, or a retired builder would alert forever.
            .idle_timeout(
                metrics_util::MetricKindMask::GAUGE,
                Some(nixdispatch_scheduler::service::metrics::gauge_idle_timeout(
                    std::time::Duration::from_millis(config.agents.report_interval_millis),
                )),
            )
            .install()
            .with_context(|| format!("starting the metrics endpoint on {addr}"))?;
        info!(%addr, "serving Prometheus metrics");
    }
    // systemd's `StateDirectory=` sets it (a colon-separated list when a unit names several;
    // ours names one). Read here, in the binary, and never in the library, so that servers
    // that tests and benches start in-process are never steered by the environment. Opened
    // before the listener is bound and the address file written: a scheduler that cannot
    // use its state never looks ready.
    let state_directory = std::env::var_os("STATE_DIRECTORY").and_then(|v| {
        std::env::split_paths(&v)
            .next()
            .filter(|p| !p.as_os_str().is_empty())
    });
    config.validate()?;
    let store = nixdispatch_scheduler::server::open_store(&config, state_directory).await?;
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    if let Some(path) = &args.address_file {
        let addr = listener.local_addr()?;
        write_atomically(path, &addr.to_string())
            .with_context(|| format!("writing the address file {}", path.display()))?;
    }
    nixdispatch_scheduler::server::serve(listener, config, store, shutdown).await?;
    Ok(())
}
