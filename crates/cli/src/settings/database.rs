//! PostgreSQL: where the database is, how many connections a process opens, and
//! how long anything waits for it.
//!
//! A process opens at most `MAIL_DISPATCH_DB_POOL_SIZE` +
//! `MAIL_DISPATCH_DB_LEDGER_POOL_SIZE` + 1 (`LISTEN`) connections, plus one for a
//! moment at start (creating the database if missing).

use std::time::Duration;

use clap::Args;
use mail_dispatch_store::PoolSettings;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/mail_dispatch";

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "PostgreSQL")]
pub struct DatabaseSettings {
    // Hidden in `--help`: the URL usually carries a password.
    #[arg(long, env = "MAIL_DISPATCH_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// Connections of the main pool (integrations, tokens, pacing).
    #[arg(long, env = "MAIL_DISPATCH_DB_POOL_SIZE", default_value_t = mail_dispatch_store::DEFAULT_POOL_SIZE)]
    pub db_pool_size: usize,
    /// Connections of the idempotency ledger's pool.
    #[arg(
        long,
        env = "MAIL_DISPATCH_DB_LEDGER_POOL_SIZE",
        default_value_t = mail_dispatch_store::DEFAULT_LEDGER_POOL_SIZE
    )]
    pub db_ledger_pool_size: usize,
    /// PostgreSQL's `statement_timeout` (the worker gives up 1 s later).
    #[arg(
        long,
        env = "MAIL_DISPATCH_DB_STATEMENT_TIMEOUT_SECS",
        default_value_t = mail_dispatch_store::DEFAULT_STATEMENT_TIMEOUT.as_secs()
    )]
    pub db_statement_timeout_secs: u64,
    /// PostgreSQL's `lock_timeout`.
    #[arg(
        long,
        env = "MAIL_DISPATCH_DB_LOCK_TIMEOUT_SECS",
        default_value_t = mail_dispatch_store::DEFAULT_LOCK_TIMEOUT.as_secs()
    )]
    pub db_lock_timeout_secs: u64,
    /// A connection that stops answering is closed within this time (`tcp_user_timeout`, keepalives).
    #[arg(
        long,
        env = "MAIL_DISPATCH_DB_SOCKET_TIMEOUT_SECS",
        default_value_t = mail_dispatch_store::DEFAULT_SOCKET_TIMEOUT.as_secs()
    )]
    pub db_socket_timeout_secs: u64,
}

impl DatabaseSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.db_pool_size >= 1 && self.db_ledger_pool_size >= 1,
            "MAIL_DISPATCH_DB_POOL_SIZE and MAIL_DISPATCH_DB_LEDGER_POOL_SIZE must be at least 1"
        );
        anyhow::ensure!(
            self.db_statement_timeout_secs >= 1 && self.db_lock_timeout_secs >= 1,
            "MAIL_DISPATCH_DB_STATEMENT_TIMEOUT_SECS and MAIL_DISPATCH_DB_LOCK_TIMEOUT_SECS must be at least 1"
        );
        anyhow::ensure!(
            self.db_socket_timeout_secs >= 3,
            "MAIL_DISPATCH_DB_SOCKET_TIMEOUT_SECS must be at least 3"
        );
        Ok(())
    }

    /// The store's pools and timeouts.
    pub fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            max_size: self.db_pool_size.max(1),
            ledger_max_size: self.db_ledger_pool_size.max(1),
            statement_timeout: Duration::from_secs(self.db_statement_timeout_secs.max(1)),
            lock_timeout: Duration::from_secs(self.db_lock_timeout_secs.max(1)),
            socket_timeout: Duration::from_secs(self.db_socket_timeout_secs.max(3)),
            ..PoolSettings::default()
        }
    }
}
