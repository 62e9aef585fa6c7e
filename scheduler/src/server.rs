//! The scheduler's gRPC server: the three services, `grpc.health.v1`, and server
//! reflection (v1 and v1alpha), with graceful shutdown, over the operator state store.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nixdispatch::proto::{
    admin_service_server::AdminServiceServer, agent_service_server::AgentServiceServer,
    lease_service_server::LeaseServiceServer,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tracing::info;

use crate::Error;
use crate::config::Config;
use crate::probe::Prober;
use crate::service::{AdminService, AgentService, LeaseService, Shared, TokioClock, metrics};
use crate::store::Store;

/// How often leases are checked for expiry. Expiry is also checked on every lease call, so
/// this only bounds how long a dead lease shows in `ListLeases` and metrics.
const TICK: Duration = Duration::from_secs(1);

/// How often learned durations and usage records are written to the state database.
/// Each write is one transaction of the records that changed; a crash loses at most this
/// much learning, never an operator's decision.
const PERSIST_EVERY: Duration = Duration::from_secs(60);

/// How long in-flight calls may take to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the scheduler on `listener` until `shutdown` completes, with the operator state
/// database `config.state` names, or in memory when it names none (the binary also looks
/// at systemd's `STATE_DIRECTORY`: see [`open_store`]).
///
/// On shutdown the health service turns NOT_SERVING first, agent streams are closed with
/// `UNAVAILABLE` (agents reconnect to the next scheduler), no new connections are accepted,
/// and in-flight calls get ten seconds to finish.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    config.validate()?;
    let store = open_store(&config, None).await?;
    serve(listener, config, store, shutdown).await
}

/// Opens the operator state store for `config` (see [`Store::open`]; `state_directory` is
/// systemd's `STATE_DIRECTORY`, the default place of the file), off the runtime's workers:
/// opening may wait up to `state.busy_timeout_millis` for a lock.
pub async fn open_store(config: &Config, state_directory: Option<PathBuf>) -> Result<Store, Error> {
    let state = config.state.clone();
    match tokio::task::spawn_blocking(move || Store::open(&state, state_directory.as_deref())).await
    {
        Ok(store) => store,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// [`run`] with an open store: restores its operator state, then serves.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    store: Store,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    config.validate()?;
    metrics::describe();
    let max_message = config.limits.max_message_bytes;
    let limits = config.limits.clone();
    let config_tls = config.tls.clone();
    let (down_tx, down_rx) = watch::channel(false);
    let prober = Arc::new(Prober::new(&config.probe)?);
    let shared = Shared::new(config, store, Arc::new(TokioClock::new()), down_rx)?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AgentServiceServer<AgentService>>()
        .await;
    health
        .set_serving::<LeaseServiceServer<LeaseService>>()
        .await;
    health
        .set_serving::<AdminServiceServer<AdminService>>()
        .await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nixdispatch::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(nixdispatch::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let ticker = {
        let shared = shared.clone();
        let down = crate::service::shutting_down(shared.shutdown.clone());
        tokio::spawn(async move {
            tokio::pin!(down);
            let mut every = tokio::time::interval(TICK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut persist = tokio::time::interval(PERSIST_EVERY);
            persist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            persist.tick().await;
            loop {
                tokio::select! {
                    _ = every.tick() => shared.tick(),
                    _ = persist.tick() => {
                        // A committed disk write: off the runtime's workers. One at a time.
                        let shared = shared.clone();
                        let _ = tokio::task::spawn_blocking(move || shared.save_queue_changes()).await;
                    }
                    () = &mut down => break,
                }
            }
        })
    };

    let prober = tokio::spawn(crate::service::probe::run(shared.clone(), prober));
    // The fleet's gauges, as fresh as the agents' reports they come from.
    let gauges = {
        let shared = shared.clone();
        let every = Duration::from_millis(shared.config().agents.report_interval_millis);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(every);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                shared.fleet_metrics().await;
            }
        })
    };

    let local = listener.local_addr().map_err(|source| Error::Io {
        what: "reading the listener's address".into(),
        source,
    })?;
    if !shared.auth.enforced() && !local.ip().is_loopback() {
        return Err(Error::Config {
            key: "auth".into(),
            reason: format!(
                "listening on {local}, which is not loopback, needs an [auth] section: without \
                 one anybody who can connect may register builders and drain hosts"
            ),
        });
    }
    let tls = config_tls.server_config(local)?;
    info!(%local, policy = shared.policy_name(), tls = tls.is_some(), auth = shared.auth.enforced(), "scheduler listening");
    let authenticator = crate::auth::Authenticator::new(shared.auth.clone());

    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        shutdown.await;
        info!("shutting down: health NOT_SERVING, closing agent streams");
        health
            .set_not_serving::<AgentServiceServer<AgentService>>()
            .await;
        health
            .set_not_serving::<LeaseServiceServer<LeaseService>>()
            .await;
        health
            .set_not_serving::<AdminServiceServer<AdminService>>()
            .await;
        // The whole server too (service name ""), which is what load balancers ask.
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        let _ = down_tx.send(true);
        let _ = drained_tx.send(());
    };

    // `serve_with_incoming` ignores the builder's TCP settings; the bounded incoming stream
    // sets TCP_NODELAY itself, caps connections and drops peers that never speak.
    let incoming = crate::incoming::bounded(listener, limits.bounds());
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .layer(crate::limits::oversize_layer())
        .http2_keepalive_interval(Some(limits.keepalive_interval()))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout()))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(
            AgentServiceServer::new(AgentService::new(shared.clone()))
                .max_decoding_message_size(max_message),
            authenticator.clone(),
        ))
        .add_service(InterceptedService::new(
            LeaseServiceServer::new(LeaseService::new(shared.clone()))
                .max_decoding_message_size(max_message),
            authenticator.clone(),
        ))
        .add_service(InterceptedService::new(
            AdminServiceServer::new(AdminService::new(shared.clone()))
                .max_decoding_message_size(max_message),
            authenticator.clone(),
        ))
        .serve_with_incoming_shutdown(incoming, stop);
    tokio::pin!(server);

    let result = tokio::select! {
        r = &mut server => r.map_err(Error::from),
        () = async {
            let _ = drained_rx.await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => {
            info!("in-flight calls did not finish in time; stopping anyway");
            Ok(())
        }
    };
    ticker.abort();
    prober.abort();
    gauges.abort();
    // What was learned since the last interval.
    let last = shared.clone();
    let _ = tokio::task::spawn_blocking(move || last.save_queue_changes()).await;
    info!("scheduler stopped");
    result
}
