//! What SREs read: `/metrics` passes `promtool check metrics`, and every metric the
//! dashboard and the alerts query exists in it.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use mail_dispatch_test_support::standins::{self, Vendor};
use mail_dispatch_test_support::{TestApp, TestAppOptions};
use serde_json::json;

use crate::process::Program;
use crate::support::WAIT;

/// `mail_dispatch_*` metric names mentioned in a file, histogram suffixes removed.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("mail_dispatch_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        let name = &text[start..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
        // `mail_dispatch_.*`-style patterns name no metric.
        if !base.ends_with('_') {
            names.insert(base.to_owned());
        }
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_pass_promtool_and_cover_every_metric_of_the_dashboard_and_alerts() {
    let app = TestApp::spawn_with(TestAppOptions {
        in_process_worker: false,
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    app.connect_mailbox("org_ms", Vendor::Microsoft, "m@customer.com", "M")
        .await;
    // A refresh (the access token stops working) and a throttled attempt that waits in a delay queue.
    app.standins.invalidate_all_access(Vendor::Google);
    app.standins
        .script(Vendor::Microsoft, [standins::graph_throttled(2)]);
    let mut tap = app.amqp.tap_results().await;
    let program = Program::start(&app, "worker").await;
    let jobs = [app.job("org_g"), app.job("org_ms"), app.job("org_plain")];
    for job in &jobs {
        app.amqp.publish_job(job).await;
    }
    app.amqp
        .publish_job(&json!({"id": "broken", "organization_id": "org_plain"}))
        .await;
    for job in &jobs {
        assert_eq!(
            tap.result(job["id"].as_str().unwrap(), WAIT).await["status"],
            "sent"
        );
    }
    tap.result("broken", WAIT).await;

    let (status, metrics) = program.get("/metrics").await.expect("metrics answer");
    assert_eq!(status, 200);
    let (status, health) = program.get("/healthz").await.unwrap();
    assert_eq!((status, health.trim()), (200, "ok"));

    // On PATH, or fetched by scripts/promtool (so that `cargo test` alone works).
    let promtool_path = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/promtool"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "promtool".into());
    let mut promtool = Command::new(promtool_path)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool is required (scripts/promtool fetches it from Debian's `prometheus` package)",
        );
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let exported = metric_names(&metrics);
    for required in [
        "mail_dispatch_jobs_received_total",
        "mail_dispatch_jobs_completed_total",
        "mail_dispatch_send_attempts_total",
        "mail_dispatch_send_duration_seconds",
        "mail_dispatch_retries_scheduled_total",
        "mail_dispatch_dead_letters_total",
        "mail_dispatch_job_latency_seconds",
        "mail_dispatch_jobs_in_flight",
        "mail_dispatch_token_refreshes_total",
        "mail_dispatch_integrations",
        "mail_dispatch_amqp_connected",
        "mail_dispatch_database_up",
        "mail_dispatch_provider_throttled_total",
    ] {
        assert!(
            exported.contains(required),
            "{required} missing from /metrics"
        );
    }
    assert!(
        metrics.contains("mail_dispatch_send_duration_seconds_bucket{"),
        "histograms, not summaries"
    );
    assert!(
        metrics
            .contains(r#"mail_dispatch_token_refreshes_total{provider="google",outcome="ok"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"mail_dispatch_dead_letters_total{reason="invalid_job"} 1"#));
    assert!(
        !metrics.contains("org_g") && !metrics.contains("@customer.com"),
        "no organization ids or addresses in labels"
    );

    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    for file in [
        "deploy/grafana/dashboards/mail-dispatch.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{file} queries no mail_dispatch metric");
        for name in used {
            assert!(
                exported.contains(&name),
                "{file} queries {name}, which /metrics does not export"
            );
        }
    }
    let (code, _) = program.terminate(Duration::from_secs(20)).await;
    assert_eq!(code, 0);
}
