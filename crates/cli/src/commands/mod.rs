//! The subcommands, one module each, and what they share (opening the store and
//! the broker, the provider endpoints, the shutdown signal).

mod dead_letters;
mod enqueue;
mod integrations;
mod run;

use std::time::Duration;

use anyhow::Context as _;
use mail_dispatch_broker::Broker;
use mail_dispatch_domain::ProviderKind;
use mail_dispatch_store::Store;
use mail_dispatch_worker::ProviderEndpoints;

use crate::settings::Settings;

pub use dead_letters::{DeadLettersCommand, dead_letters};
pub use enqueue::{EnqueueArgs, enqueue};
pub use integrations::{IntegrationsCommand, integrations};
pub use run::{Roles, migrate, run, run_until};

/// Connects to PostgreSQL (creating the database if needed) and migrates.
async fn open_store(settings: &Settings, migrate: bool) -> anyhow::Result<Store> {
    if migrate {
        Store::ensure_database(&settings.database.database_url)
            .await
            .context("cannot reach PostgreSQL (MAIL_DISPATCH_DATABASE_URL)")?;
    }
    let pool = settings.database.pool_settings();
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
        graph_large_messages: settings.providers.graph_large_messages(),
        gmail_url: settings.providers.gmail_url.clone(),
        microsoft: settings.oauth_app(ProviderKind::Microsoft)?,
        google: settings.oauth_app(ProviderKind::Google)?,
        platform_transport: settings.platform.default_transport.clone(),
        http_timeout: Duration::from_secs(30),
    })
}
