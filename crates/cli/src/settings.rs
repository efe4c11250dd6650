//! Configuration from flags or the environment (contract §6): one typed
//! [`Settings`], validated before anything connects.
//!
//! The settings are grouped by concern, one file each, and `--help` lists them
//! under one heading per group. The README's "Configuration" table documents every
//! variable; `settings/tests.rs` holds that table and these flags to each other, so
//! neither gains or loses a variable, or changes a default, alone.

mod admin;
mod amqp;
mod database;
mod keys;
mod platform;
mod providers;
mod telemetry;
mod worker;

use clap::Args;
use mail_dispatch_domain::{Mailbox, ProviderKind};
use mail_dispatch_providers::OAuthApp;
use secrecy::SecretString;
use url::Url;

pub use self::admin::AdminSettings;
pub use self::amqp::{AmqpSettings, DEFAULT_AMQP_URL};
pub use self::database::{DEFAULT_DATABASE_URL, DatabaseSettings};
pub use self::keys::KeySettings;
pub use self::platform::PlatformSettings;
pub use self::providers::ProviderSettings;
pub use self::telemetry::TelemetrySettings;
pub use self::worker::WorkerSettings;

/// Every setting, from flags or the environment.
#[derive(Args, Debug, Clone)]
pub struct Settings {
    #[command(flatten)]
    pub amqp: AmqpSettings,
    #[command(flatten)]
    pub database: DatabaseSettings,
    #[command(flatten)]
    pub keys: KeySettings,
    #[command(flatten)]
    pub admin: AdminSettings,
    #[command(flatten)]
    pub telemetry: TelemetrySettings,
    #[command(flatten)]
    pub platform: PlatformSettings,
    #[command(flatten)]
    pub providers: ProviderSettings,
    #[command(flatten)]
    pub worker: WorkerSettings,
}

impl Settings {
    /// The token key: configured, or in development mode kept in a local file.
    pub fn token_key(&self) -> anyhow::Result<SecretString> {
        self.keys.token_key()
    }

    pub fn cipher(&self) -> anyhow::Result<mail_dispatch_store::TokenCipher> {
        self.keys.cipher()
    }

    pub fn default_sender(&self) -> anyhow::Result<Mailbox> {
        self.platform.default_sender()
    }

    pub fn topology(&self) -> mail_dispatch_broker::Topology {
        self.amqp.topology()
    }

    /// `{MAIL_DISPATCH_PUBLIC_URL}/v1/oauth/callback`: register it with both providers.
    pub fn redirect_url(&self) -> anyhow::Result<Url> {
        self.admin.redirect_url()
    }

    pub fn microsoft_scopes(&self) -> Vec<String> {
        self.providers.microsoft_scopes()
    }

    pub fn google_scopes(&self) -> Vec<String> {
        self.providers.google_scopes()
    }

    pub fn oauth_app(&self, provider: ProviderKind) -> anyhow::Result<Option<OAuthApp>> {
        self.providers.oauth_app(provider, &self.redirect_url()?)
    }

    /// Checks what can be checked before connecting anywhere.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.worker.validate()?;
        self.database.validate()?;
        self.default_sender()?;
        self.telemetry.validate()?;
        self.cipher()?;
        self.admin_config()?;
        Ok(())
    }

    /// The admin API's settings; `None` when no admin token is configured.
    pub fn admin_config(&self) -> anyhow::Result<Option<mail_dispatch_admin::AdminConfig>> {
        self.admin.admin_config(&self.providers)
    }

    pub fn worker_config(&self) -> anyhow::Result<mail_dispatch_worker::WorkerConfig> {
        let mut c = mail_dispatch_worker::WorkerConfig::new(
            self.amqp.amqp_url.clone(),
            self.default_sender()?,
        );
        c.topology = self.topology();
        self.worker.apply(&mut c);
        Ok(c)
    }
}

#[cfg(test)]
mod tests;
