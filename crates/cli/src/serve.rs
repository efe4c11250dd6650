//! The metrics listener: `/metrics` (Prometheus), `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use mail_dispatch_store::Store;
use mail_dispatch_worker::Health;
use mail_dispatch_worker::metrics as m;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Installs the Prometheus recorder, with histogram buckets (not summaries).
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(m::SEND_DURATION.into()),
            m::SEND_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(Matcher::Full(m::JOB_LATENCY.into()), m::JOB_LATENCY_BUCKETS)?
        .install_recorder()?;
    m::describe();
    Ok(handle)
}

#[derive(Clone)]
struct Probe {
    metrics: PrometheusHandle,
    health: Arc<Health>,
    store: Store,
    needs_amqp: bool,
}

/// Binds the metrics listener (at start, so a taken port fails the start).
pub async fn bind(listen: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!("cannot listen on {listen} (MAIL_DISPATCH_METRICS_LISTEN): {e}")
    })
}

pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    store: Store,
    needs_amqp: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(p): State<Probe>| async move {
                m::record_db_statements(p.store.counts());
                p.metrics.render()
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(Probe {
            metrics,
            health,
            store,
            needs_amqp,
        });
    tracing::info!(listen = %listener.local_addr()?, "metrics and health endpoints listening");
    axum::serve(
        mail_dispatch_admin::GuardedListener::new(
            listener,
            mail_dispatch_admin::ConnectionLimits::METRICS,
        ),
        app,
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await?;
    Ok(())
}

async fn readyz(State(p): State<Probe>) -> (StatusCode, String) {
    let database = p.health.check_database(&p.store).await;
    let amqp = !p.needs_amqp || p.health.amqp();
    let body = format!(
        "amqp: {}\ndatabase: {}\n",
        up(amqp),
        if database {
            "up (migrations applied)"
        } else {
            "down"
        }
    );
    let status = if amqp && database {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, body)
}

fn up(b: bool) -> &'static str {
    if b { "up" } else { "down" }
}
