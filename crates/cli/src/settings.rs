//! Configuration from the environment (contract §6), one typed `Settings`,
//! validated before anything connects.
//!
//! | variable | default |
//! |---|---|
//! | `MAIL_DISPATCH_AMQP_URL` | `amqp://guest:guest@127.0.0.1:5672/%2f` |
//! | `MAIL_DISPATCH_DATABASE_URL` | `postgres://postgres@127.0.0.1:5432/mail_dispatch` |
//! | `MAIL_DISPATCH_TOKEN_KEY` | required, base64 of 32 bytes (unless `MAIL_DISPATCH_DEV=true`) |
//! | `MAIL_DISPATCH_TOKEN_KEY_PREVIOUS` | comma-separated older keys, decrypt only (rotation) |
//! | `MAIL_DISPATCH_DEV` | `false`; `true` generates a key in `MAIL_DISPATCH_DEV_KEY_FILE` |
//! | `MAIL_DISPATCH_DEV_KEY_FILE` | `.mail-dispatch-dev-key` |
//! | `MAIL_DISPATCH_ADMIN_TOKEN` | bearer token of the admin API |
//! | `MAIL_DISPATCH_ADMIN_LISTEN` | `127.0.0.1:8080` |
//! | `MAIL_DISPATCH_PUBLIC_URL` | `http://127.0.0.1:8080` |
//! | `MAIL_DISPATCH_METRICS_LISTEN` | `127.0.0.1:9090` |
//! | `MAIL_DISPATCH_DEFAULT_SENDER` / `_NAME` | `no-reply@localhost` / `Notifications` |
//! | `MAIL_DISPATCH_DEFAULT_TRANSPORT` | `file://./outbox` |
//! | `MAIL_DISPATCH_MICROSOFT_CLIENT_ID` / `_SECRET` / `_TENANT` | — / — / `organizations` |
//! | `MAIL_DISPATCH_MICROSOFT_LOGIN_URL` | `https://login.microsoftonline.com` |
//! | `MAIL_DISPATCH_GRAPH_URL` | `https://graph.microsoft.com` |
//! | `MAIL_DISPATCH_GOOGLE_CLIENT_ID` / `_SECRET` | — |
//! | `MAIL_DISPATCH_GOOGLE_AUTH_URL` | `https://accounts.google.com/o/oauth2/v2/auth` |
//! | `MAIL_DISPATCH_GOOGLE_TOKEN_URL` | `https://oauth2.googleapis.com/token` |
//! | `MAIL_DISPATCH_GOOGLE_REVOKE_URL` | `https://oauth2.googleapis.com/revoke` |
//! | `MAIL_DISPATCH_GMAIL_URL` | `https://gmail.googleapis.com` |
//! | `MAIL_DISPATCH_RETURN_ORIGINS` | origin of the public URL |
//! | `MAIL_DISPATCH_MICROSOFT_SHARED_MAILBOXES` | `false` |
//! | `MAIL_DISPATCH_GOOGLE_CHECK_ALIASES` | `false` |
//! | `MAIL_DISPATCH_CONCURRENCY` | `64` |
//! | `MAIL_DISPATCH_MAX_ATTEMPTS` | `8` |
//! | `MAIL_DISPATCH_MAX_AGE_SECS` | `21600` (6 h) |
//! | `MAIL_DISPATCH_SHUTDOWN_GRACE_SECS` | `25` |
//! | `MAIL_DISPATCH_DB_POOL_SIZE` | `16` PostgreSQL connections per process |
//! | `MAIL_DISPATCH_CLAIM_LEASE_SECS` | `120`: how long a crashed worker's claim on a job blocks a resend |
//! | `MAIL_DISPATCH_ORG_MAX_IN_FLIGHT` | `16` jobs of one organization in flight per worker |
//! | `MAIL_DISPATCH_GRAPH_MAILBOX_CONCURRENCY` | `4` concurrent Graph sends per mailbox per worker |
//! | `MAIL_DISPATCH_GMAIL_MAILBOX_PER_MINUTE` | `60` Gmail sends per mailbox and minute per worker |
//! | `MAIL_DISPATCH_MICROSOFT_DAILY_RECIPIENTS` | `10000` per mailbox and UTC day, all replicas |
//! | `MAIL_DISPATCH_GOOGLE_DAILY_MESSAGES` | `2000` per user and UTC day, all replicas |
//! | `MAIL_DISPATCH_LEDGER_RETENTION_SECS` | `604800` (7 days) |
//! | `MAIL_DISPATCH_KEEPALIVE_INTERVAL_SECS` | `3600` |
//! | `MAIL_DISPATCH_KEEPALIVE_IDLE_DAYS` | `14` |
//! | `MAIL_DISPATCH_CONNECTION_TTL_SECS` | `900` |
//! | `MAIL_DISPATCH_QUEUE_PREFIX` | empty: prefix of every exchange and queue name |
//! | `MAIL_DISPATCH_PRODUCT_NAME` | `mail-dispatch`: named in test messages |
//! | `MAIL_DISPATCH_LOG_FORMAT` | `pretty` (`json` for production) |

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use mail_dispatch_domain::{EmailAddress, Mailbox, ProviderKind};
use mail_dispatch_providers::OAuthApp;
use secrecy::SecretString;
use url::Url;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/mail_dispatch";
/// Every setting, from flags or the environment.
#[derive(Args, Debug, Clone)]
pub struct Settings {
    #[arg(long, env = "MAIL_DISPATCH_AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    #[arg(long, env = "MAIL_DISPATCH_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    #[arg(long, env = "MAIL_DISPATCH_TOKEN_KEY", hide_env_values = true)]
    pub token_key: Option<String>,
    #[arg(
        long,
        env = "MAIL_DISPATCH_TOKEN_KEY_PREVIOUS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub token_key_previous: Vec<String>,
    /// Development mode: generate and keep a token key in a local file.
    #[arg(long, env = "MAIL_DISPATCH_DEV", default_value_t = false)]
    pub dev: bool,
    #[arg(
        long,
        env = "MAIL_DISPATCH_DEV_KEY_FILE",
        default_value = ".mail-dispatch-dev-key"
    )]
    pub dev_key_file: PathBuf,
    #[arg(long, env = "MAIL_DISPATCH_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
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
    #[arg(
        long,
        env = "MAIL_DISPATCH_METRICS_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub metrics_listen: SocketAddr,
    #[arg(
        long,
        env = "MAIL_DISPATCH_DEFAULT_SENDER",
        default_value = "no-reply@localhost"
    )]
    pub default_sender: String,
    #[arg(
        long,
        env = "MAIL_DISPATCH_DEFAULT_SENDER_NAME",
        default_value = "Notifications"
    )]
    pub default_sender_name: String,
    #[arg(
        long,
        env = "MAIL_DISPATCH_DEFAULT_TRANSPORT",
        default_value = "file://./outbox",
        hide_env_values = true
    )]
    pub default_transport: String,
    #[arg(long, env = "MAIL_DISPATCH_MICROSOFT_CLIENT_ID")]
    pub microsoft_client_id: Option<String>,
    #[arg(
        long,
        env = "MAIL_DISPATCH_MICROSOFT_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub microsoft_client_secret: Option<String>,
    #[arg(
        long,
        env = "MAIL_DISPATCH_MICROSOFT_TENANT",
        default_value = "organizations"
    )]
    pub microsoft_tenant: String,
    #[arg(
        long,
        env = "MAIL_DISPATCH_MICROSOFT_LOGIN_URL",
        default_value = "https://login.microsoftonline.com"
    )]
    pub microsoft_login_url: Url,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GRAPH_URL",
        default_value = "https://graph.microsoft.com"
    )]
    pub graph_url: Url,
    #[arg(long, env = "MAIL_DISPATCH_GOOGLE_CLIENT_ID")]
    pub google_client_id: Option<String>,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub google_client_secret: Option<String>,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_AUTH_URL",
        default_value = "https://accounts.google.com/o/oauth2/v2/auth"
    )]
    pub google_auth_url: Url,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_TOKEN_URL",
        default_value = "https://oauth2.googleapis.com/token"
    )]
    pub google_token_url: Url,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_REVOKE_URL",
        default_value = "https://oauth2.googleapis.com/revoke"
    )]
    pub google_revoke_url: Url,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GMAIL_URL",
        default_value = "https://gmail.googleapis.com"
    )]
    pub gmail_url: Url,
    #[arg(long, env = "MAIL_DISPATCH_RETURN_ORIGINS", value_delimiter = ',')]
    pub return_origins: Vec<String>,
    #[arg(
        long,
        env = "MAIL_DISPATCH_MICROSOFT_SHARED_MAILBOXES",
        default_value_t = false
    )]
    pub microsoft_shared_mailboxes: bool,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_CHECK_ALIASES",
        default_value_t = false
    )]
    pub google_check_aliases: bool,
    #[arg(long, env = "MAIL_DISPATCH_CONCURRENCY", default_value_t = mail_dispatch_worker::config::DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    #[arg(long, env = "MAIL_DISPATCH_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
    #[arg(long, env = "MAIL_DISPATCH_MAX_AGE_SECS", default_value_t = 6 * 3600)]
    pub max_age_secs: u64,
    #[arg(long, env = "MAIL_DISPATCH_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
    /// PostgreSQL connections per process (plus one for notifications).
    #[arg(long, env = "MAIL_DISPATCH_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
    #[arg(long, env = "MAIL_DISPATCH_CLAIM_LEASE_SECS", default_value_t = 120)]
    pub claim_lease_secs: u64,
    /// Jobs of one organization in flight at once in a worker (fairness).
    #[arg(long, env = "MAIL_DISPATCH_ORG_MAX_IN_FLIGHT", default_value_t = 16)]
    pub org_max_in_flight: usize,
    /// Concurrent Graph sends per mailbox in a worker (Graph allows 4 per app and mailbox).
    #[arg(
        long,
        env = "MAIL_DISPATCH_GRAPH_MAILBOX_CONCURRENCY",
        default_value_t = 4
    )]
    pub graph_mailbox_concurrency: usize,
    /// Gmail sends per mailbox and minute in a worker.
    #[arg(
        long,
        env = "MAIL_DISPATCH_GMAIL_MAILBOX_PER_MINUTE",
        default_value_t = 60
    )]
    pub gmail_mailbox_per_minute: u32,
    /// Exchange Online recipients per mailbox and day (all replicas).
    #[arg(
        long,
        env = "MAIL_DISPATCH_MICROSOFT_DAILY_RECIPIENTS",
        default_value_t = 10_000
    )]
    pub microsoft_daily_recipients: u32,
    /// Google Workspace messages per user and day (all replicas).
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_DAILY_MESSAGES",
        default_value_t = 2_000
    )]
    pub google_daily_messages: u32,
    /// Finished idempotency-ledger entries older than this are pruned.
    #[arg(long, env = "MAIL_DISPATCH_LEDGER_RETENTION_SECS", default_value_t = 7 * 24 * 3600)]
    pub ledger_retention_secs: u64,
    /// How often each worker looks for idle grants to refresh.
    #[arg(
        long,
        env = "MAIL_DISPATCH_KEEPALIVE_INTERVAL_SECS",
        default_value_t = 3600
    )]
    pub keepalive_interval_secs: u64,
    /// A grant unused for this many days is refreshed (Microsoft expires them after 90).
    #[arg(long, env = "MAIL_DISPATCH_KEEPALIVE_IDLE_DAYS", default_value_t = 14)]
    pub keepalive_idle_days: u64,
    /// How long a consent received by the callback waits for the host application's confirmation.
    #[arg(long, env = "MAIL_DISPATCH_CONNECTION_TTL_SECS", default_value_t = 900)]
    pub connection_ttl_secs: u64,
    #[arg(long, env = "MAIL_DISPATCH_QUEUE_PREFIX", default_value = "")]
    pub queue_prefix: String,
    /// Product name shown in test messages.
    #[arg(
        long,
        env = "MAIL_DISPATCH_PRODUCT_NAME",
        default_value = "mail-dispatch"
    )]
    pub product_name: String,
    #[arg(long, env = "MAIL_DISPATCH_LOG_FORMAT", default_value = "pretty")]
    pub log_format: String,
}

impl Settings {
    /// The token key: configured, or in development mode kept in a local file.
    pub fn token_key(&self) -> anyhow::Result<SecretString> {
        if let Some(key) = &self.token_key {
            return Ok(SecretString::from(key.clone()));
        }
        if !self.dev {
            bail!(
                "MAIL_DISPATCH_TOKEN_KEY is not set (base64 of 32 random bytes: `openssl rand -base64 32`); set MAIL_DISPATCH_DEV=true for a local development key"
            );
        }
        let path = &self.dev_key_file;
        let key = match std::fs::read_to_string(path) {
            Ok(k) => k.trim().to_owned(),
            Err(_) => {
                let k = mail_dispatch_store::TokenCipher::generate_key();
                write_private(path, &k)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                k
            }
        };
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(file = %path.display(), "development mode: token key kept in a local file; never use this in production");
        });
        Ok(SecretString::from(key))
    }

    pub fn cipher(&self) -> anyhow::Result<mail_dispatch_store::TokenCipher> {
        let previous: Vec<SecretString> = self
            .token_key_previous
            .iter()
            .map(|k| SecretString::from(k.clone()))
            .collect();
        mail_dispatch_store::TokenCipher::new(&self.token_key()?, &previous)
            .context("MAIL_DISPATCH_TOKEN_KEY")
    }

    pub fn default_sender(&self) -> anyhow::Result<Mailbox> {
        let email =
            EmailAddress::parse(&self.default_sender).context("MAIL_DISPATCH_DEFAULT_SENDER")?;
        let name = (!self.default_sender_name.is_empty()).then(|| self.default_sender_name.clone());
        Ok(Mailbox::new(email, name))
    }

    pub fn topology(&self) -> mail_dispatch_broker::Topology {
        mail_dispatch_broker::Topology::with_prefix(&self.queue_prefix)
    }

    fn microsoft_endpoint(&self, leaf: &str) -> anyhow::Result<Url> {
        let base = self.microsoft_login_url.as_str().trim_end_matches('/');
        Url::parse(&format!(
            "{base}/{}/oauth2/v2.0/{leaf}",
            self.microsoft_tenant
        ))
        .context("MAIL_DISPATCH_MICROSOFT_LOGIN_URL")
    }

    /// `{MAIL_DISPATCH_PUBLIC_URL}/v1/oauth/callback`: register it with both providers.
    pub fn redirect_url(&self) -> anyhow::Result<Url> {
        let base = self.public_url.as_str().trim_end_matches('/');
        Url::parse(&format!("{base}/v1/oauth/callback")).context("MAIL_DISPATCH_PUBLIC_URL")
    }

    pub fn microsoft_scopes(&self) -> Vec<String> {
        mail_dispatch_providers::scopes::microsoft(self.microsoft_shared_mailboxes)
    }

    pub fn google_scopes(&self) -> Vec<String> {
        mail_dispatch_providers::scopes::google(self.google_check_aliases)
    }

    pub fn oauth_app(&self, provider: ProviderKind) -> anyhow::Result<Option<OAuthApp>> {
        Ok(match provider {
            ProviderKind::Microsoft => match &self.microsoft_client_id {
                None => None,
                Some(id) => Some(OAuthApp {
                    client_id: id.clone(),
                    client_secret: self.microsoft_client_secret.clone().map(SecretString::from),
                    auth_url: self.microsoft_endpoint("authorize")?,
                    token_url: self.microsoft_endpoint("token")?,
                    scopes: self.microsoft_scopes(),
                    redirect_url: Some(self.redirect_url()?),
                }),
            },
            ProviderKind::Google => match &self.google_client_id {
                None => None,
                Some(id) => Some(OAuthApp {
                    client_id: id.clone(),
                    client_secret: self.google_client_secret.clone().map(SecretString::from),
                    auth_url: self.google_auth_url.clone(),
                    token_url: self.google_token_url.clone(),
                    scopes: self.google_scopes(),
                    redirect_url: Some(self.redirect_url()?),
                }),
            },
            ProviderKind::Default => None,
        })
    }

    /// Checks what can be checked before connecting anywhere.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.concurrency == 0 || self.concurrency > 2000 {
            bail!(
                "MAIL_DISPATCH_CONCURRENCY must be between 1 and 2000 (quorum queues cap prefetch at 2000)"
            );
        }
        if self.max_attempts == 0 {
            bail!("MAIL_DISPATCH_MAX_ATTEMPTS must be at least 1");
        }
        self.default_sender()?;
        if !matches!(self.log_format.as_str(), "pretty" | "json") {
            bail!("MAIL_DISPATCH_LOG_FORMAT must be `pretty` or `json`");
        }
        self.cipher()?;
        self.admin_config()?;
        Ok(())
    }

    /// The admin API's settings; `None` when no admin token is configured.
    pub fn admin_config(&self) -> anyhow::Result<Option<mail_dispatch_admin::AdminConfig>> {
        let Some(token) = self.admin_token.clone().filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        if token.len() < 16 {
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
            admin_token: SecretString::from(token),
            return_origins: origins,
            google_revoke_url: self.google_revoke_url.clone(),
            google_check_aliases: self.google_check_aliases,
            state_ttl: mail_dispatch_admin::STATE_TTL,
            connection_ttl: Duration::from_secs(self.connection_ttl_secs.max(1)),
            microsoft_shared_mailboxes: self.microsoft_shared_mailboxes,
            product_name: self.product_name.clone(),
        }))
    }

    pub fn worker_config(&self) -> anyhow::Result<mail_dispatch_worker::WorkerConfig> {
        let mut c =
            mail_dispatch_worker::WorkerConfig::new(self.amqp_url.clone(), self.default_sender()?);
        c.topology = self.topology();
        c.concurrency = self.concurrency;
        c.retry.max_attempts = self.max_attempts;
        c.retry.max_age = Duration::from_secs(self.max_age_secs);
        c.shutdown_grace = Duration::from_secs(self.shutdown_grace_secs);
        c.claim_lease = Duration::from_secs(self.claim_lease_secs.max(1));
        c.pacing = mail_dispatch_worker::pacing::PacingConfig {
            org_max_in_flight: self.org_max_in_flight.max(1),
            graph_mailbox_concurrency: self.graph_mailbox_concurrency.max(1),
            gmail_mailbox_per_minute: self.gmail_mailbox_per_minute.max(1),
            microsoft_daily_recipients: self.microsoft_daily_recipients,
            google_daily_messages: self.google_daily_messages,
        };
        c.ledger_retention = Duration::from_secs(self.ledger_retention_secs);
        c.keepalive = mail_dispatch_worker::keepalive::KeepAliveConfig {
            interval: Duration::from_secs(self.keepalive_interval_secs.max(1)),
            idle_after: Duration::from_secs(self.keepalive_idle_days * 24 * 3600),
            ..Default::default()
        };
        Ok(c)
    }
}

/// Writes a file only its owner can read (the development token key).
fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents.as_bytes())
}
