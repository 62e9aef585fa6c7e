//! The fleet's gauges and the probe metrics, rendered by the real Prometheus exporter. Its
//! own test binary, so that it may own the process-wide metrics recorder.

use std::time::Duration;

mod common;

use tokio::sync::oneshot;

/// Per-system capacity, per-host state, availability and report age, the probe's result and
/// breaker, and the cause of a refused request appear under their documented names for a
/// builder whose sshd never answers (a listener that accepts and stays silent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_and_probe_gauges() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();

    // Connections complete in the kernel's backlog and then hear nothing: probes time out.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();

    let mut config = nixdispatch_scheduler::config::Config::default();
    config.agents.report_interval_millis = 100;
    config.probe.enabled = true;
    config.probe.timeout_millis = 200;
    config.probe.failures_to_open = 1;
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
    let uri = format!("ssh-ng://root@127.0.0.1:{port}");
    let agent = common::agent(
        common::channel(&addr.to_string()).await,
        common::register("b1", &uri, common::KEY, 6),
    )
    .await;

    let want = r#"nixdispatch_host_probe_failing{host="b1"} 1"#;
    for _ in 0..500 {
        if handle.render().contains(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A request now finds the only builder out because of its probe.
    let mut leases = nixdispatch::proto::lease_service_client::LeaseServiceClient::connect(
        format!("http://{addr}"),
    )
    .await
    .unwrap();
    leases
        .acquire(nixdispatch::proto::AcquireRequest {
            system: "x86_64-linux".into(),
            drv_path: "/nix/store/a.drv".into(),
            client_id: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let text = handle.render();
    for expected in [
        r#"nixdispatch_lease_refused_total{outcome="postpone",cause="probe_failed"} 1"#,
        want,
        r#"nixdispatch_probe_total{result="timeout"}"#,
        r#"nixdispatch_probe_breaker_changes_total{change="opened"} 1"#,
        r#"nixdispatch_host_state{host="b1",state="ready"} 1"#,
        r#"nixdispatch_host_state{host="b1",state="gone"} 0"#,
        r#"nixdispatch_host_slots{host="b1"} 6"#,
        r#"nixdispatch_host_report_age_seconds{host="b1"}"#,
        r#"nixdispatch_system_hosts{system="x86_64-linux",available="true"}"#,
        r#"nixdispatch_system_waiting{system="x86_64-linux"} 0"#,
        "# HELP nixdispatch_host_probe_failing",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    let _ = stop.send(());
    drop(agent);
    server.await.unwrap().unwrap();
}
