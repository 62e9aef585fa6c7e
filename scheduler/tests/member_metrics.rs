//! Per-member usage counters, rendered by the real Prometheus exporter. Its own test binary,
//! so that it may own the process-wide metrics recorder.

use std::time::Duration;

mod common;

use nixdispatch::proto::{
    AcquireRequest, BuildOutcome, ReleaseRequest, acquire_response::Outcome,
    lease_service_client::LeaseServiceClient,
};
use tokio::sync::oneshot;

/// A member's finished build shows in `nixdispatch_member_builds_total` (and its build and
/// wait seconds under their names) with the member as the only label; a member that never
/// built has no build counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_usage_is_counted_per_member() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();

    let mut config = nixdispatch_scheduler::config::Config::default();
    // The usage counters are published with the fleet's gauges, every report interval.
    config.agents.report_interval_millis = 100;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(nixdispatch_scheduler::server::run(
        listener,
        config,
        async {
            let _ = stopped.await;
        },
    ));
    let agent = common::agent(
        common::channel(&addr.to_string()).await,
        common::register("b1", "ssh-ng://b1", common::KEY, 4),
    )
    .await;
    let mut leases = LeaseServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let acquire = |client: &str, drv: &str| AcquireRequest {
        system: "x86_64-linux".into(),
        drv_path: format!("/nix/store/{drv}.drv"),
        client_id: client.into(),
        ..Default::default()
    };
    let granted = |r: AcquireRequest| {
        let mut leases = leases.clone();
        async move {
            match leases.acquire(r).await.unwrap().into_inner().outcome {
                Some(Outcome::Granted(g)) => g.lease_id,
                other => panic!("expected a grant, got {other:?}"),
            }
        }
    };
    let alice = granted(acquire("alice", "a")).await;
    let _bob = granted(acquire("bob", "b")).await;
    leases
        .release(ReleaseRequest {
            lease_id: alice,
            outcome: BuildOutcome::Succeeded.into(),
            duration_millis: 0,
        })
        .await
        .unwrap();

    let want = r#"nixdispatch_member_builds_total{member="alice"} 1"#;
    let mut text = String::new();
    for _ in 0..500 {
        text = handle.render();
        if text.contains(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for expected in [
        want,
        r#"nixdispatch_member_builds_total{member="bob"} 0"#,
        r#"nixdispatch_member_build_seconds_total{member="alice"} 0"#,
        r#"nixdispatch_member_wait_seconds_total{member="alice"} 0"#,
        "# HELP nixdispatch_member_builds_total",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    let _ = stop.send(());
    drop(agent);
    server.await.unwrap().unwrap();
}
