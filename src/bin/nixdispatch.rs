//! `nixdispatch`: the operator CLI. Asks the scheduler's AdminService and prints the answer
//! as a table, or as JSON with `--json`. Rendering lives in `nixdispatch::cli`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use nixdispatch::cli;
use nixdispatch::client::{self, ClientConfig};
use nixdispatch::proto;

/// Inspect and steer a nixdispatch scheduler.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The scheduler's endpoint.
    #[arg(
        long,
        env = "NIXDISPATCH_SCHEDULER",
        default_value = "http://127.0.0.1:50051"
    )]
    scheduler: String,
    /// File holding the operator's bearer token (sent as `authorization`).
    #[arg(long, env = "NIXDISPATCH_CREDENTIAL_FILE")]
    credential_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every host: state, slots, load, pressure, and why it is unavailable.
    Hosts,
    /// Free and used slots per system, and how many requests wait.
    Capacity,
    /// Every live lease, oldest first.
    Leases,
    /// Stop new leases on a host; running builds finish.
    Drain {
        /// The host's id.
        host_id: String,
    },
    /// Let a drained host take leases again.
    Undrain {
        /// The host's id.
        host_id: String,
    },
    /// Where a build for SYSTEM would go now, and why every other host would not take it.
    Explain {
        /// The system, e.g. x86_64-linux.
        system: String,
        /// Required features, comma-separated.
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
    },
}

async fn run(args: Args) -> anyhow::Result<String> {
    let mut config = ClientConfig::new(args.scheduler);
    config.credential_file = args.credential_file;
    config.connect_timeout = Duration::from_secs(5);
    config.request_timeout = Some(Duration::from_secs(30));
    let mut admin = client::admin_client(client::connect(&config).await?);
    let json = args.json;
    let render = |v: serde_json::Value| serde_json::to_string_pretty(&v).map(|s| s + "\n");
    Ok(match args.command {
        Command::Hosts => {
            let hosts = admin
                .list_hosts(proto::ListHostsRequest {})
                .await?
                .into_inner()
                .hosts;
            if json {
                render(serde_json::Value::Array(
                    hosts.iter().map(cli::host_json).collect(),
                ))?
            } else {
                cli::hosts_table(&hosts)
            }
        }
        Command::Capacity => {
            let systems = admin
                .get_capacity(proto::GetCapacityRequest {})
                .await?
                .into_inner()
                .systems;
            if json {
                render(cli::capacity_json(&systems))?
            } else {
                cli::capacity_table(&systems)
            }
        }
        Command::Leases => {
            let leases = admin
                .list_leases(proto::ListLeasesRequest {})
                .await?
                .into_inner()
                .leases;
            if json {
                render(cli::leases_json(&leases))?
            } else {
                cli::leases_table(&leases)
            }
        }
        Command::Drain { host_id } => {
            let h = admin
                .drain_host(proto::DrainHostRequest { host_id })
                .await?
                .into_inner();
            if json {
                render(cli::host_json(&h))?
            } else {
                cli::host_line(&h)
            }
        }
        Command::Undrain { host_id } => {
            let h = admin
                .undrain_host(proto::UndrainHostRequest { host_id })
                .await?
                .into_inner();
            if json {
                render(cli::host_json(&h))?
            } else {
                cli::host_line(&h)
            }
        }
        Command::Explain { system, features } => {
            let e = admin
                .explain_placement(proto::ExplainPlacementRequest {
                    system,
                    required_features: features,
                })
                .await?
                .into_inner();
            if json {
                render(cli::explain_json(&e))?
            } else {
                cli::explain_text(&e)
            }
        }
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // A gRPC status prints its code and message; other errors their chain.
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("nixdispatch: {:?}: {}", s.code(), s.message()),
                None => eprintln!("nixdispatch: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
