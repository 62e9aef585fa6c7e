//! The scheduler's Prometheus metrics, rendered by the real exporter. This file is its own
//! test binary so that it may own the process-wide metrics recorder.

use nixdispatch::proto::{
    AcquireRequest, ReleaseRequest, lease_service_client::LeaseServiceClient,
};
use tokio::sync::oneshot;

/// Lease calls show up under their documented names, with bounded labels.
#[tokio::test]
async fn lease_calls_are_counted() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(nixdispatch_scheduler::server::run(
        listener,
        nixdispatch_scheduler::config::Config::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let mut leases = LeaseServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let req = AcquireRequest {
        system: "x86_64-linux".into(),
        drv_path: "/nix/store/a.drv".into(),
        client_id: "c".into(),
        ..Default::default()
    };
    leases.acquire(req.clone()).await.unwrap();
    leases.acquire(req).await.unwrap();
    let bad = ReleaseRequest {
        lease_id: "x".into(),
        outcome: 0,
        duration_millis: 0,
    };
    leases.release(bad).await.unwrap_err();

    let text = handle.render();
    assert!(
        text.contains(r#"nixdispatch_lease_acquire_total{outcome="decline_permanently"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"nixdispatch_rpc_rejected_total{service="lease"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("# HELP nixdispatch_lease_acquire_total"),
        "{text}"
    );
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
