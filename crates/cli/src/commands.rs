//! The subcommands.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::ShortString;
use mail_dispatch_broker::headers;
use mail_dispatch_broker::{Broker, Outgoing, header_str, json_properties};
use mail_dispatch_domain::ProviderKind;
use mail_dispatch_store::{PoolSettings, Store};
use mail_dispatch_worker::{CacheConfig, Dispatcher, Health, ProviderEndpoints, Services};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;

/// Connects to PostgreSQL (creating the database if needed) and migrates.
async fn open_store(settings: &Settings, migrate: bool) -> anyhow::Result<Store> {
    if migrate {
        Store::ensure_database(&settings.database.database_url)
            .await
            .context("cannot reach PostgreSQL (MAIL_DISPATCH_DATABASE_URL)")?;
    }
    let pool = PoolSettings {
        max_size: settings.database.db_pool_size.max(1),
        ..PoolSettings::default()
    };
    let store = Store::connect(&settings.database.database_url, settings.cipher()?, pool)
        .context("MAIL_DISPATCH_DATABASE_URL")?;
    if migrate {
        store.migrate().await.context("database migration failed")?;
    }
    Ok(store)
}

async fn connect_broker(settings: &Settings, name: &str) -> anyhow::Result<Broker> {
    Broker::connect(&settings.amqp.amqp_url, name)
        .await
        .context("cannot reach RabbitMQ (MAIL_DISPATCH_AMQP_URL)")
}

/// A future that completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler can be installed");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub fn endpoints(settings: &Settings) -> anyhow::Result<ProviderEndpoints> {
    Ok(ProviderEndpoints {
        graph_url: settings.providers.graph_url.clone(),
        gmail_url: settings.providers.gmail_url.clone(),
        microsoft: settings.oauth_app(ProviderKind::Microsoft)?,
        google: settings.oauth_app(ProviderKind::Google)?,
        platform_transport: settings.platform.default_transport.clone(),
        http_timeout: Duration::from_secs(30),
    })
}

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
            services.clone(),
            settings.worker_config()?,
        )))
    } else {
        None
    };
    let follower = match &dispatcher {
        Some(dispatcher) => dispatcher.run_upkeep(),
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
                axum::serve(listener, app)
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
            dispatcher.clone(),
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

/// Refreshes the integrations-by-status gauge and the database gauge.
async fn report_integration_gauges(store: Store, health: Arc<Health>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match store.count_integrations_by_status().await {
            Ok(counts) => {
                health.set_database(true);
                for status in ["pending_sender", "active", "needs_reauth"] {
                    let n = counts
                        .iter()
                        .find(|(s, _)| s == status)
                        .map(|(_, n)| *n)
                        .unwrap_or(0);
                    metrics::gauge!(mail_dispatch_worker::metrics::INTEGRATIONS, "status" => status).set(n as f64);
                }
            }
            Err(e) => {
                health.set_database(false);
                tracing::warn!(error = %e, "database check failed");
            }
        }
    }
}

pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    open_store(settings, true).await?;
    println!("migrations applied");
    Ok(())
}

#[derive(Args, Debug)]
pub struct EnqueueArgs {
    #[arg(long)]
    pub org: String,
    /// Recipient address; repeat for several.
    #[arg(long, required = true)]
    pub to: Vec<String>,
    #[arg(long)]
    pub subject: String,
    #[arg(long)]
    pub text: Option<String>,
    #[arg(long)]
    pub html: Option<String>,
    /// Job id (default: a new UUID).
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long)]
    pub workspace: Option<String>,
    #[arg(long)]
    pub category: Option<String>,
}

pub async fn enqueue(settings: &Settings, args: &EnqueueArgs) -> anyhow::Result<()> {
    if args.text.is_none() && args.html.is_none() {
        bail!("give --text or --html");
    }
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut job = json!({
        "id": id,
        "organization_id": args.org,
        "to": args.to.iter().map(|e| json!({"email": e})).collect::<Vec<_>>(),
        "subject": args.subject,
    });
    for (key, value) in [
        ("text", &args.text),
        ("html", &args.html),
        ("workspace_id", &args.workspace),
        ("category", &args.category),
    ] {
        if let Some(v) = value {
            job[key] = json!(v);
        }
    }
    let body = serde_json::to_vec(&job)?;
    // Refuse to publish what the worker would only dead-letter.
    mail_dispatch_domain::Job::decode(&body).map_err(|e| anyhow::anyhow!("invalid job: {e}"))?;
    let broker = connect_broker(settings, "mail-dispatch-enqueue").await?;
    let topology = settings.topology();
    broker
        .declare(&topology)
        .await
        .context("declaring the topology")?;
    broker
        .publish(Outgoing {
            exchange: &topology.jobs_exchange,
            routing_key: &topology.jobs_routing_key,
            body: &body,
            properties: json_properties()
                .with_message_id(ShortString::from(id.as_str()))
                .with_timestamp(chrono::Utc::now().timestamp() as u64),
            mandatory: true,
        })
        .await
        .context("publishing the job")?;
    broker.close().await;
    println!("{id}");
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum IntegrationsCommand {
    /// Every configured organization and its status.
    List,
    /// One organization's integration.
    Show { org: String },
}

pub async fn integrations(
    settings: &Settings,
    command: &IntegrationsCommand,
) -> anyhow::Result<()> {
    let store = open_store(settings, false).await?;
    match command {
        IntegrationsCommand::List => {
            let all = store
                .list_integrations()
                .await
                .context("reading integrations")?;
            println!(
                "{:<24} {:<10} {:<15} {:<32} LAST ERROR",
                "ORGANIZATION", "PROVIDER", "STATUS", "SENDER"
            );
            for i in &all {
                println!(
                    "{:<24} {:<10} {:<15} {:<32} {}",
                    i.organization_id,
                    i.provider.as_str(),
                    i.status.as_str(),
                    i.sender_email.as_deref().unwrap_or("-"),
                    i.last_error.as_deref().unwrap_or("-")
                );
            }
            println!("{} integration(s)", all.len());
        }
        IntegrationsCommand::Show { org } => {
            let Some(i) = store
                .integration(org)
                .await
                .context("reading the integration")?
            else {
                println!("{org}: not_configured (the platform sender is used)");
                return Ok(());
            };
            let view = json!({
                "organization_id": i.organization_id,
                "provider": i.provider.as_str(),
                "status": i.status.as_str(),
                "account_email": i.account_email,
                "sender": {"email": i.sender_email, "name": i.sender_name},
                "fallback": i.fallback.as_str(),
                "connected_at": i.connected_at,
                "last_test_at": i.last_test_at,
                "last_test": i.last_test,
                "last_error": i.last_error,
            });
            println!("{}", serde_json::to_string_pretty(&view)?);
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum DeadLettersCommand {
    /// Lists dead-lettered jobs with their reason and attempt history.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Re-queues dead-lettered jobs with a fresh attempt budget.
    Replay {
        #[arg(long, conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
    },
}

pub async fn dead_letters(settings: &Settings, command: &DeadLettersCommand) -> anyhow::Result<()> {
    let broker = connect_broker(settings, "mail-dispatch-dead-letters").await?;
    let topology = settings.topology();
    broker
        .declare(&topology)
        .await
        .context("declaring the topology")?;
    // Messages taken with basic.get stay unacked on this channel until acked;
    // closing it returns every one not acked to the queue, in order.
    let channel = broker.channel().await?;
    let result = match command {
        DeadLettersCommand::List { limit } => {
            let mut n = 0;
            while n < *limit {
                let Some(message) = channel
                    .basic_get(
                        topology.dead_queue.as_str().into(),
                        BasicGetOptions::default(),
                    )
                    .await?
                else {
                    break;
                };
                n += 1;
                let p = &message.delivery.properties;
                let job_id = header_str(p, headers::JOB_ID)
                    .filter(|s| !s.is_empty())
                    .or_else(|| p.message_id().as_ref().map(|m| m.to_string()))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{job_id}\treason={}\tattempts={}\tdead_at={}\n\t{}",
                    header_str(p, headers::REASON)
                        .unwrap_or_else(|| "unknown (broker dead-lettered)".into()),
                    header_str(p, headers::ATTEMPTS).unwrap_or_else(|| "-".into()),
                    header_str(p, headers::DEAD_AT).unwrap_or_else(|| "-".into()),
                    header_str(p, headers::DETAIL).unwrap_or_default(),
                );
            }
            println!("{n} dead-lettered job(s) shown");
            Ok(())
        }
        DeadLettersCommand::Replay { id, all } => {
            if id.is_none() && !all {
                bail!("give --id ID or --all");
            }
            let store = open_store(settings, false).await?;
            let mut replayed = 0;
            while let Some(message) = channel
                .basic_get(
                    topology.dead_queue.as_str().into(),
                    BasicGetOptions::default(),
                )
                .await?
            {
                let delivery = &message.delivery;
                let p = &delivery.properties;
                let job_id = header_str(p, headers::JOB_ID)
                    .filter(|s| !s.is_empty())
                    .or_else(|| p.message_id().as_ref().map(|m| m.to_string()));
                if id.is_some() && job_id != *id {
                    continue;
                }
                if let Some(job_id) = &job_id {
                    // A fresh budget: the ledger would otherwise treat it as finished.
                    store
                        .reopen_job(job_id)
                        .await
                        .context("reopening the job in the ledger")?;
                }
                let mut properties = json_properties();
                if let Some(m) = p.message_id() {
                    properties = properties.with_message_id(m.clone());
                }
                broker
                    .publish(Outgoing {
                        exchange: &topology.jobs_exchange,
                        routing_key: &topology.jobs_routing_key,
                        body: &delivery.data,
                        properties,
                        mandatory: true,
                    })
                    .await
                    .context("re-publishing the job")?;
                delivery.ack(BasicAckOptions::default()).await?;
                replayed += 1;
                println!("replayed {}", job_id.as_deref().unwrap_or("(no id)"));
            }
            println!("{replayed} job(s) replayed");
            Ok(())
        }
    };
    let _ = channel.close(200, "done".into()).await;
    broker.close().await;
    result
}
