//! The admin API: its token and address, the public URL the providers redirect
//! to, where the host application may be sent back to, and how long a consent
//! waits for its confirmation, and how long a session of the hosted settings
//! page lasts.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use secrecy::{ExposeSecret as _, SecretString};
use url::Url;

use super::ProviderSettings;

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Admin API")]
pub struct AdminSettings {
    #[arg(long, env = "MAIL_DISPATCH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<SecretString>,
    #[arg(
        long,
        env = "MAIL_DISPATCH_ADMIN_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub admin_listen: SocketAddr,
    #[arg(
        long,
        env = "MAIL_DISPATCH_PUBLIC_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub public_url: Url,
    #[arg(long, env = "MAIL_DISPATCH_RETURN_ORIGINS", value_delimiter = ',')]
    pub return_origins: Vec<String>,
    /// How long a consent received by the callback waits for the host application's confirmation.
    #[arg(long, env = "MAIL_DISPATCH_CONNECTION_TTL_SECS", default_value_t = 900)]
    pub connection_ttl_secs: u64,
    /// Product name shown in test messages.
    #[arg(
        long,
        env = "MAIL_DISPATCH_PRODUCT_NAME",
        default_value = "mail-dispatch"
    )]
    pub product_name: String,
    /// How long a session of the hosted settings page lasts once its link is opened.
    #[arg(
        long,
        env = "MAIL_DISPATCH_PORTAL_SESSION_SECS",
        default_value_t = 3600
    )]
    pub portal_session_secs: u64,
}

impl AdminSettings {
    /// `{MAIL_DISPATCH_PUBLIC_URL}/v1/oauth/callback`: register it with both providers.
    pub fn redirect_url(&self) -> anyhow::Result<Url> {
        let base = self.public_url.as_str().trim_end_matches('/');
        Url::parse(&format!("{base}/v1/oauth/callback")).context("MAIL_DISPATCH_PUBLIC_URL")
    }

    /// The admin API's settings; `None` when no admin token is configured. The
    /// connect flow also needs some of the providers' settings.
    pub fn admin_config(
        &self,
        providers: &ProviderSettings,
    ) -> anyhow::Result<Option<mail_dispatch_admin::AdminConfig>> {
        let Some(token) = self
            .admin_token
            .clone()
            .filter(|t| !t.expose_secret().is_empty())
        else {
            return Ok(None);
        };
        if token.expose_secret().len() < 16 {
            bail!("MAIL_DISPATCH_ADMIN_TOKEN must be at least 16 characters");
        }
        let mut origins = Vec::new();
        let raw: Vec<String> = if self.return_origins.is_empty() {
            vec![self.public_url.to_string()]
        } else {
            self.return_origins.clone()
        };
        for o in raw {
            let url = Url::parse(o.trim())
                .with_context(|| format!("MAIL_DISPATCH_RETURN_ORIGINS: `{o}` is not a URL"))?;
            origins.push(url.origin());
        }
        Ok(Some(mail_dispatch_admin::AdminConfig {
            admin_token: token,
            return_origins: origins,
            google_revoke_url: providers.google_revoke_url.clone(),
            google_check_aliases: providers.google_check_aliases,
            state_ttl: mail_dispatch_admin::STATE_TTL,
            connection_ttl: Duration::from_secs(self.connection_ttl_secs.max(1)),
            microsoft_shared_mailboxes: providers.microsoft_shared_mailboxes,
            product_name: self.product_name.clone(),
            public_url: self.public_url.clone(),
            portal_session_ttl: Duration::from_secs(self.portal_session_secs.clamp(60, 86_400)),
        }))
    }
}
