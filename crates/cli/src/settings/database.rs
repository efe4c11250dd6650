//! PostgreSQL: where the database is and how many connections a process opens.

use clap::Args;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/mail_dispatch";

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "PostgreSQL")]
pub struct DatabaseSettings {
    // Hidden in `--help`: the URL usually carries a password.
    #[arg(long, env = "MAIL_DISPATCH_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// PostgreSQL connections per process (plus one for notifications).
    #[arg(long, env = "MAIL_DISPATCH_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
}
