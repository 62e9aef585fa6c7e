//! `nixdispatch`: the operator CLI. Asks the scheduler's AdminService and prints the answer
//! as a table, or as JSON with `--json`. Rendering lives in `nixdispatch::cli`. On a
//! member's machine, `nixdispatch doctor` checks the local Nix (`nixdispatch::doctor`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use std::io::{IsTerminal as _, Write as _};

use nixdispatch::cli::{self, Confirmation, Render};
use nixdispatch::client::{self, ClientConfig};
use nixdispatch::drain::{DrainStep, DrainWatch};
use nixdispatch::{proto, status};

/// The admin client the CLI uses.
type Admin = proto::admin_service_client::AdminServiceClient<client::AuthChannel>;

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
    /// PEM file of the CA that signed the scheduler's certificate (for an https:// scheduler).
    #[arg(long, env = "NIXDISPATCH_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// The name on the scheduler's certificate, when the endpoint does not use it.
    #[arg(long, env = "NIXDISPATCH_TLS_DOMAIN")]
    tls_domain: Option<String>,
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
    /// Stop new leases on a host; running builds finish. The host may not have connected
    /// yet: the drain applies when it does, and survives scheduler restarts.
    Drain {
        /// The host's id.
        host_id: String,
        /// Then wait until the host's builds have finished: its leases, and the builds its
        /// agent reports running (read from ListHosts every --poll seconds; progress on
        /// stderr). Exits 1 when --timeout passes first.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds.
        #[arg(long, default_value_t = 3600, requires = "wait")]
        timeout: u64,
        /// With --wait: seconds between two looks.
        #[arg(long, default_value_t = 2.0, requires = "wait")]
        poll: f64,
    },
    /// One screen: capacity per system, hosts, and builds per member.
    Status {
        /// Redraw every --interval seconds until interrupted.
        #[arg(long)]
        watch: bool,
        /// With --watch: seconds between two redraws.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
    },
    /// Let a drained host take leases again.
    Undrain {
        /// The host's id.
        host_id: String,
    },
    /// Provision a builder: its agent may then register HOST_ID, with exactly this store URI
    /// and host key, when it proves the token whose SHA-256 is given (the builder's operator
    /// runs `printf %s "$(cat agent.token)" | sha256sum`; the token never leaves the builder).
    Provision {
        /// The host id its agent registers.
        host_id: String,
        /// The store URI members' Nix will use, e.g. ssh-ng://nix@build01.example.org.
        #[arg(long)]
        store_uri: String,
        /// The builder's SSH host public key file (from the builder, never from a first
        /// connection).
        #[arg(long)]
        host_key_file: PathBuf,
        /// SHA-256 of the agent's token, 64 hex digits.
        #[arg(long)]
        token_sha256: String,
    },
    /// Remove a builder provisioned with `provision`; its agent's session is closed.
    Unprovision {
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
    /// On a member's machine: which build hook the running nix-daemon really uses, whether
    /// the scheduler is reached and takes the hook's credential, and whether every builder
    /// the member may be sent to answers over SSH with its pinned host key; a one-line fix
    /// for each problem. Run it as the user nix-daemon runs as (root). Exits 1 when
    /// something must change. Uses the hook's configuration, not the flags above.
    Doctor {
        /// The installed nixdispatch-hook to recommend [default: the one next to this
        /// program, else /usr/local/bin/nixdispatch-hook].
        #[arg(long)]
        hook: Option<PathBuf>,
        /// The hook's configuration file [default: NIXDISPATCH_HOOK_CONFIG of the running
        /// nix-daemon, else /etc/nixdispatch/hook.toml].
        #[arg(long, env = "NIXDISPATCH_HOOK_CONFIG")]
        hook_config: Option<PathBuf>,
    },
    /// The quotas in force, or change one (then the quotas after the change).
    Quota {
        #[command(subcommand)]
        change: Option<QuotaChange>,
    },
    /// Per member: running builds, quota, priority, builds, build and wait seconds.
    Usage,
}

#[derive(Debug, Subcommand)]
enum QuotaChange {
    /// A member's limit and priority (no limit: the default applies).
    Member {
        /// The member's client id.
        client_id: String,
        /// Most live leases at once.
        #[arg(long)]
        max_slots: Option<u32>,
        /// Fair-order weight: -100 doubles the member's share, 100 halves it.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        priority: i32,
    },
    /// A system's limit, all members together (no limit: removed).
    System {
        /// The system, e.g. x86_64-linux.
        system: String,
        /// Most live leases at once.
        #[arg(long)]
        max_slots: Option<u32>,
    },
    /// The limit of members without their own (no limit: unlimited).
    Default {
        /// Most live leases at once.
        #[arg(long)]
        max_slots: Option<u32>,
    },
}

/// The nixdispatch-hook installed next to this program, else the documented path.
fn default_hook() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("nixdispatch-hook")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin/nixdispatch-hook"))
}

/// `nixdispatch doctor`: this machine's Nix, then the scheduler and the builders as the
/// hook's configuration reaches them.
async fn doctor(
    hook: Option<PathBuf>,
    hook_config: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<(String, bool)> {
    use nixdispatch::doctor::{Check, Status};
    use nixdispatch::hook::config::HookConfig;
    let facts = nixdispatch::doctor::probe::facts().await;
    let mut report = nixdispatch::doctor::diagnose(&facts, &hook.unwrap_or_else(default_hook));
    let path =
        hook_config.unwrap_or_else(|| HookConfig::path_from_env(facts.hook_config.as_deref()));
    // The daemon's ssh options, which its builds use; else this shell's.
    let sshopts = facts
        .nix_sshopts
        .clone()
        .or_else(|| std::env::var("NIX_SSHOPTS").ok())
        .unwrap_or_default();
    match HookConfig::load(&path) {
        Ok(config) => {
            report.checks.push(Check {
                name: "hook-config".into(),
                status: Status::Ok,
                summary: if path.exists() {
                    format!("{} (scheduler {})", path.display(), config.scheduler)
                } else {
                    format!(
                        "{} does not exist: the defaults apply (scheduler {})",
                        path.display(),
                        config.scheduler
                    )
                },
                fix: None,
            });
            report
                .checks
                .extend(nixdispatch::doctor::reach::checks(&config, &sshopts).await);
        }
        Err(e) => report.checks.push(Check {
            name: "hook-config".into(),
            status: Status::Fail,
            summary: nixdispatch::diag::error_chain(&e),
            fix: Some(format!(
                "correct {} (docs/hook.md has a commented example)",
                path.display()
            )),
        }),
    }
    let out = if json {
        serde_json::to_string_pretty(&report.json())? + "\n"
    } else {
        report.table()
    };
    Ok((out, report.healthy()))
}

/// A positive number of seconds from a flag.
fn secs(v: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        v > 0.0 && v.is_finite(),
        "{v} is not a positive number of seconds"
    );
    Ok(Duration::from_secs_f64(v))
}

/// The four answers `status` shows.
async fn snapshot(admin: &mut Admin) -> anyhow::Result<status::Snapshot> {
    Ok(status::Snapshot {
        hosts: admin
            .list_hosts(proto::ListHostsRequest {})
            .await?
            .into_inner()
            .hosts,
        capacity: admin
            .get_capacity(proto::GetCapacityRequest {})
            .await?
            .into_inner()
            .systems,
        leases: admin
            .list_leases(proto::ListLeasesRequest {})
            .await?
            .into_inner()
            .leases,
        waiting: client::list_waiting(admin, 0).await?,
    })
}

/// `drain --wait`: drains, then reads ListHosts every `poll` until the host's builds have
/// finished (see `nixdispatch::drain`), printing progress to stderr when it changes.
async fn drain_and_wait(
    admin: &mut Admin,
    host_id: String,
    timeout: Duration,
    poll: Duration,
    json: bool,
) -> anyhow::Result<(String, bool)> {
    let drained = admin
        .drain_host(proto::DrainHostRequest {
            host_id: host_id.clone(),
        })
        .await?
        .into_inner();
    eprint!("{}", cli::host_line(&drained));
    let start = tokio::time::Instant::now();
    let mut watch = DrainWatch::new();
    let mut last = String::new();
    loop {
        let hosts = admin
            .list_hosts(proto::ListHostsRequest {})
            .await?
            .into_inner()
            .hosts;
        let host = hosts.into_iter().find(|h| h.host_id == host_id);
        let elapsed = start.elapsed();
        match watch.observe(elapsed, host.as_ref()) {
            DrainStep::Done { caveat } => {
                if json {
                    let v = serde_json::json!({
                        "host_id": host_id,
                        "drained": true,
                        "caveat": caveat,
                        "waited_seconds": elapsed.as_secs_f64(),
                    });
                    return Ok((serde_json::to_string_pretty(&v)? + "\n", true));
                }
                let caveat = caveat.map(|c| format!(" ({c})")).unwrap_or_default();
                return Ok((
                    format!("{host_id}: drained, nothing running{caveat}\n"),
                    true,
                ));
            }
            DrainStep::Waiting { progress } => {
                if progress != last {
                    eprintln!("[{:>4}s] {host_id}: {progress}", elapsed.as_secs());
                    last = progress;
                }
                if elapsed >= timeout {
                    return Ok((
                        format!(
                            "{host_id}: still busy after {}s: {last}\n",
                            timeout.as_secs()
                        ),
                        false,
                    ));
                }
            }
        }
        tokio::time::sleep(poll.min(timeout.saturating_sub(elapsed))).await;
    }
}

/// Runs the command; returns what to print and whether all is well.
async fn run(args: Args) -> anyhow::Result<(String, bool)> {
    if let Command::Doctor { hook, hook_config } = args.command {
        return doctor(hook, hook_config, args.json).await;
    }
    let mut config = ClientConfig::new(args.scheduler);
    config.credential_file = args.credential_file;
    config.ca_file = args.ca_file;
    config.tls_domain = args.tls_domain;
    config.connect_timeout = Duration::from_secs(5);
    config.request_timeout = Some(Duration::from_secs(30));
    let mut admin = client::admin_client(client::connect(&config).await?);
    match args.command {
        Command::Drain {
            host_id,
            wait: true,
            timeout,
            poll,
        } => {
            return drain_and_wait(
                &mut admin,
                host_id,
                secs(timeout as f64)?,
                secs(poll)?,
                args.json,
            )
            .await;
        }
        Command::Status { watch, interval } => {
            let interval = secs(interval)?;
            loop {
                let shot = snapshot(&mut admin).await?;
                let out = if args.json {
                    serde_json::to_string_pretty(&status::json(&shot))? + "\n"
                } else {
                    status::render(&shot)
                };
                if !watch {
                    return Ok((out, true));
                }
                if std::io::stdout().is_terminal() {
                    // Home and clear, then the new screen: a terminal shows one frame.
                    print!("\x1b[H\x1b[2J{out}");
                } else {
                    println!("{out}");
                }
                std::io::stdout().flush()?;
                tokio::time::sleep(interval).await;
            }
        }
        _ => {}
    }
    let answer: Box<dyn Render> = match args.command {
        Command::Hosts => Box::new(
            admin
                .list_hosts(proto::ListHostsRequest {})
                .await?
                .into_inner()
                .hosts,
        ),
        Command::Capacity => Box::new(
            admin
                .get_capacity(proto::GetCapacityRequest {})
                .await?
                .into_inner()
                .systems,
        ),
        Command::Leases => Box::new(
            admin
                .list_leases(proto::ListLeasesRequest {})
                .await?
                .into_inner()
                .leases,
        ),
        Command::Drain { host_id, .. } => Box::new(
            admin
                .drain_host(proto::DrainHostRequest { host_id })
                .await?
                .into_inner(),
        ),
        Command::Undrain { host_id } => Box::new(
            admin
                .undrain_host(proto::UndrainHostRequest { host_id })
                .await?
                .into_inner(),
        ),
        Command::Explain { system, features } => Box::new(
            admin
                .explain_placement(proto::ExplainPlacementRequest {
                    system,
                    required_features: features,
                })
                .await?
                .into_inner(),
        ),
        Command::Quota { change: None } => Box::new(
            admin
                .get_quotas(proto::GetQuotasRequest {})
                .await?
                .into_inner(),
        ),
        Command::Quota {
            change: Some(change),
        } => {
            use proto::set_quota_request::Target;
            let request = match change {
                QuotaChange::Member {
                    client_id,
                    max_slots,
                    priority,
                } => proto::SetQuotaRequest {
                    target: Some(Target::ClientId(client_id)),
                    max_slots,
                    priority,
                },
                QuotaChange::System { system, max_slots } => proto::SetQuotaRequest {
                    target: Some(Target::System(system)),
                    max_slots,
                    priority: 0,
                },
                QuotaChange::Default { max_slots } => proto::SetQuotaRequest {
                    target: Some(Target::DefaultMember(true)),
                    max_slots,
                    priority: 0,
                },
            };
            Box::new(admin.set_quota(request).await?.into_inner())
        }
        Command::Usage => Box::new(
            admin
                .get_usage(proto::GetUsageRequest {})
                .await?
                .into_inner()
                .members,
        ),
        Command::Provision {
            host_id,
            store_uri,
            host_key_file,
            token_sha256,
        } => {
            let host_public_key = std::fs::read_to_string(&host_key_file)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", host_key_file.display()))?
                .trim()
                .to_owned();
            admin
                .provision_host(proto::ProvisionHostRequest {
                    host_id: host_id.clone(),
                    store_uri: store_uri.clone(),
                    host_public_key,
                    token_sha256,
                })
                .await?;
            Box::new(Confirmation {
                line: format!("{host_id} provisioned at {store_uri}"),
                json: serde_json::json!({ "host_id": host_id, "store_uri": store_uri }),
            })
        }
        Command::Unprovision { host_id } => {
            let removed = admin
                .unprovision_host(proto::UnprovisionHostRequest {
                    host_id: host_id.clone(),
                })
                .await?
                .into_inner()
                .removed;
            Box::new(Confirmation {
                line: if removed {
                    format!("{host_id} unprovisioned")
                } else {
                    format!("{host_id} was not provisioned through the API")
                },
                json: serde_json::json!({ "host_id": host_id, "removed": removed }),
            })
        }
        Command::Doctor { .. } | Command::Status { .. } => unreachable!("answered above"),
    };
    Ok((
        if args.json {
            serde_json::to_string_pretty(&answer.json())? + "\n"
        } else {
            answer.table()
        },
        true,
    ))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok((out, healthy)) => {
            print!("{out}");
            if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
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
