//! `run`, `worker` and `admin`: the composition root of a long-running process
//! (shared services once; the dispatcher and its background work only where the
//! process dispatches; the admin API where it serves it), and `migrate`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use mail_dispatch_store::Store;
use mail_dispatch_worker::{CacheConfig, Dispatcher, Health, Services};
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;

use super::{connect_broker, endpoints, open_store, shutdown_signal};

/// Which roles a process runs.
#[derive(Clone, Copy, Debug)]
pub struct Roles {
    pub worker: bool,
    pub admin: bool,
}

/// `run`, `worker` and `admin`, until SIGTERM or SIGINT.
pub async fn run(settings: &Settings, roles: Roles) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested; finishing in-flight jobs");
            shutdown.cancel();
        });
    }
    run_until(settings, roles, shutdown).await
}

/// The roles, until `shutdown` is cancelled (the demo stops the service this way).
pub async fn run_until(
    settings: &Settings,
    roles: Roles,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let admin_config = if roles.admin {
        match settings.admin_config()? {
            Some(c) => Some(c),
            None if roles.worker && settings.keys.dev => {
                tracing::warn!("MAIL_DISPATCH_ADMIN_TOKEN is not set: the admin API is off");
                None
            }
            None => bail!("MAIL_DISPATCH_ADMIN_TOKEN is not set (the admin API requires it)"),
        }
    } else {
        None
    };
    let metrics = crate::serve::install_recorder()?;
    let metrics_listener = crate::serve::bind(settings.telemetry.metrics_listen).await?;
    let admin_listener = match &admin_config {
        Some(_) => Some(
            tokio::net::TcpListener::bind(settings.admin.admin_listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} (MAIL_DISPATCH_ADMIN_LISTEN)",
                        settings.admin.admin_listen
                    )
                })?,
        ),
        None => None,
    };
    let store = open_store(settings, true).await?;
    if roles.worker {
        // Fail fast with a clear message if the broker is unreachable at start.
        connect_broker(settings, "mail-dispatch-startup-check")
            .await?
            .close()
            .await;
    }

    // The composition root: the shared services once; the dispatcher and its
    // background work only where this process dispatches.
    let services = Services::build(store.clone(), &endpoints(settings)?, CacheConfig::default())?;
    let dispatcher = if roles.worker {
        Some(Arc::new(Dispatcher::new(
            &services,
            settings.worker_config()?,
        )))
    } else {
        None
    };
    let follower = match &dispatcher {
        Some(dispatcher) => dispatcher.run_upkeep(&services),
        None => services.follow_changes(None),
    };
    let health = Arc::new(Health::default());
    health.set_database(true);

    let metrics_server = tokio::spawn(crate::serve::serve_metrics(
        metrics_listener,
        metrics,
        health.clone(),
        store.clone(),
        roles.worker,
        shutdown.clone(),
    ));
    let admin_server = match (admin_config, admin_listener) {
        (Some(config), Some(listener)) => {
            let state = mail_dispatch_admin::AdminState::new(services.clone(), config);
            let app = mail_dispatch_admin::app(state.clone());
            tracing::info!(listen = %settings.admin.admin_listen, "admin API listening");
            let shutdown = shutdown.clone();
            let upkeep = tokio::spawn(mail_dispatch_admin::run_upkeep(
                state.clone(),
                Duration::from_secs(60),
            ));
            Some(tokio::spawn(async move {
                let _upkeep = tokio_util::task::AbortOnDropHandle::new(upkeep);
                axum::serve(
                    mail_dispatch_admin::GuardedListener::new(
                        listener,
                        mail_dispatch_admin::ConnectionLimits::ADMIN,
                    ),
                    app,
                )
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
            }))
        }
        _ => None,
    };
    let gauges = tokio::spawn(report_integration_gauges(
        store.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    if let Some(dispatcher) = dispatcher {
        let keepalive = tokio::spawn(mail_dispatch_worker::keepalive::run(
            services.clone(),
            dispatcher.config.clone(),
            dispatcher.config.keepalive,
            shutdown.clone(),
        ));
        mail_dispatch_worker::runner::run(dispatcher, health, shutdown.clone()).await;
        keepalive.abort();
    } else {
        shutdown.cancelled().await;
    }
    shutdown.cancel();
    if let Some(admin) = admin_server {
        admin.await.context("admin API task")??;
    }
    follower.abort();
    let _ = gauges.await;
    metrics_server.await.context("metrics server task")??;
    Ok(())
}

/// Refreshes the database gauge and the integrations-by-status gauge. Each round
/// is bounded (the check by `DATABASE_CHECK_TIMEOUT`, the count by the store's
/// statement deadline), so a database that stops answering shows as down.
async fn report_integration_gauges(store: Store, health: Arc<Health>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        if !health.check_database(&store).await {
            tracing::warn!("database check failed");
            continue;
        }
        match store.count_integrations_by_status().await {
            Ok(counts) => {
                for status in ["pending_sender", "active", "needs_reauth"] {
                    let n = counts
                        .iter()
                        .find(|(s, _)| s == status)
                        .map(|(_, n)| *n)
                        .unwrap_or(0);
                    metrics::gauge!(mail_dispatch_worker::metrics::INTEGRATIONS, "status" => status).set(n as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not count integrations by status"),
        }
    }
}

pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    open_store(settings, true).await?;
    println!("migrations applied");
    Ok(())
}
