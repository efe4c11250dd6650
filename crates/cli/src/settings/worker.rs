//! The worker: how many jobs it runs at once, how long it keeps retrying, how it
//! paces each organization and mailbox, how long it remembers finished jobs, and
//! how often it keeps idle grants alive.

use std::time::Duration;

use clap::Args;
use mail_dispatch_worker::WorkerConfig;
use mail_dispatch_worker::keepalive::KeepAliveConfig;
use mail_dispatch_worker::pacing::PacingConfig;

/// Quorum queues cap a consumer's prefetch, which is the concurrency, at 2000.
const MAX_CONCURRENCY: usize = 2000;

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Worker")]
pub struct WorkerSettings {
    #[arg(long, env = "MAIL_DISPATCH_CONCURRENCY", default_value_t = mail_dispatch_worker::DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// Memory the jobs in hand may take, in MiB (each counted at 4× its body).
    #[arg(
        long,
        env = "MAIL_DISPATCH_MEMORY_BUDGET_MIB",
        default_value_t = mail_dispatch_worker::DEFAULT_MEMORY_BUDGET_BYTES / (1024 * 1024)
    )]
    pub memory_budget_mib: u64,
    #[arg(long, env = "MAIL_DISPATCH_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
    #[arg(long, env = "MAIL_DISPATCH_MAX_AGE_SECS", default_value_t = 6 * 3600)]
    pub max_age_secs: u64,
    #[arg(long, env = "MAIL_DISPATCH_SHUTDOWN_GRACE_SECS", default_value_t = 25)]
    pub shutdown_grace_secs: u64,
    #[arg(long, env = "MAIL_DISPATCH_CLAIM_LEASE_SECS", default_value_t = 120)]
    pub claim_lease_secs: u64,
    /// Jobs of one organization in flight at once in a worker (fairness).
    #[arg(long, env = "MAIL_DISPATCH_ORG_MAX_IN_FLIGHT", default_value_t = 16)]
    pub org_max_in_flight: usize,
    /// Concurrent Graph sends per mailbox over all replicas (slot leases in
    /// PostgreSQL; Graph allows 4 per app and mailbox).
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
    /// Exchange Online recipients per mailbox and rolling 24 h (all replicas).
    #[arg(
        long,
        env = "MAIL_DISPATCH_MICROSOFT_DAILY_RECIPIENTS",
        default_value_t = 10_000
    )]
    pub microsoft_daily_recipients: u32,
    /// Google Workspace messages per user and rolling 24 h (all replicas).
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_DAILY_MESSAGES",
        default_value_t = 2_000
    )]
    pub google_daily_messages: u32,
    /// Google Workspace recipients per user and rolling 24 h (all replicas).
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_DAILY_RECIPIENTS",
        default_value_t = 10_000
    )]
    pub google_daily_recipients: u32,
    /// Google Workspace unique recipients per user and rolling 24 h (every
    /// recipient is counted as unique: never fewer than Google counts).
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_DAILY_UNIQUE_RECIPIENTS",
        default_value_t = 3_000
    )]
    pub google_daily_unique_recipients: u32,
    /// Google Workspace external recipients per user and rolling 24 h.
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_DAILY_EXTERNAL_RECIPIENTS",
        default_value_t = 2_000
    )]
    pub google_daily_external_recipients: u32,
    /// Consumer Google accounts: messages per rolling 24 h.
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_CONSUMER_DAILY_MESSAGES",
        default_value_t = 500
    )]
    pub google_consumer_daily_messages: u32,
    /// Consumer Google accounts: recipients per rolling 24 h.
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_CONSUMER_DAILY_RECIPIENTS",
        default_value_t = 500
    )]
    pub google_consumer_daily_recipients: u32,
    /// Google Workspace trial accounts (as their organization declares them):
    /// messages per rolling 24 h.
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_TRIAL_DAILY_MESSAGES",
        default_value_t = 500
    )]
    pub google_trial_daily_messages: u32,
    /// Google Workspace trial accounts: external recipients per rolling 24 h.
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_TRIAL_DAILY_EXTERNAL_RECIPIENTS",
        default_value_t = 500
    )]
    pub google_trial_daily_external_recipients: u32,
    /// The window the daily limits are counted over (the providers': 24 h;
    /// shorter only for tests).
    #[arg(long, env = "MAIL_DISPATCH_LIMIT_WINDOW_SECS", default_value_t = 24 * 3600)]
    pub limit_window_secs: u64,
    /// How long a mailbox the provider blocks from sending (Graph
    /// `ErrorMessageSubmissionBlocked`) is paused before a job tries it again.
    #[arg(
        long,
        env = "MAIL_DISPATCH_SENDING_BLOCKED_PAUSE_SECS",
        default_value_t = mail_dispatch_worker::DEFAULT_SENDING_BLOCKED_PAUSE.as_secs()
    )]
    pub sending_blocked_pause_secs: u64,
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
}

impl WorkerSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=MAX_CONCURRENCY).contains(&self.concurrency),
            "MAIL_DISPATCH_CONCURRENCY must be between 1 and 2000 (quorum queues cap prefetch at 2000)"
        );
        anyhow::ensure!(
            self.max_attempts != 0,
            "MAIL_DISPATCH_MAX_ATTEMPTS must be at least 1"
        );
        Ok(())
    }

    /// Sets everything of `c` that these settings own (not the broker, nor the
    /// platform sender).
    pub fn apply(&self, c: &mut WorkerConfig) {
        c.concurrency = self.concurrency;
        c.memory_budget_bytes = self.memory_budget_mib.max(1).saturating_mul(1024 * 1024);
        c.retry.max_attempts = self.max_attempts;
        c.retry.max_age = Duration::from_secs(self.max_age_secs);
        c.shutdown_grace = Duration::from_secs(self.shutdown_grace_secs);
        c.claim_lease = Duration::from_secs(self.claim_lease_secs.max(1));
        c.pacing = PacingConfig {
            org_max_in_flight: self.org_max_in_flight.max(1),
            graph_mailbox_concurrency: self.graph_mailbox_concurrency.max(1),
            gmail_mailbox_per_minute: self.gmail_mailbox_per_minute.max(1),
            microsoft_daily_recipients: self.microsoft_daily_recipients,
            google_daily_messages: self.google_daily_messages,
            google_daily_recipients: self.google_daily_recipients,
            google_daily_unique_recipients: self.google_daily_unique_recipients,
            google_daily_external_recipients: self.google_daily_external_recipients,
            google_consumer_daily_messages: self.google_consumer_daily_messages,
            google_consumer_daily_recipients: self.google_consumer_daily_recipients,
            google_trial_daily_messages: self.google_trial_daily_messages,
            google_trial_daily_external_recipients: self.google_trial_daily_external_recipients,
            window: Duration::from_secs(self.limit_window_secs.max(1)),
        };
        c.sending_blocked_pause = Duration::from_secs(self.sending_blocked_pause_secs.max(1));
        c.ledger_retention = Duration::from_secs(self.ledger_retention_secs);
        c.keepalive = KeepAliveConfig {
            interval: Duration::from_secs(self.keepalive_interval_secs.max(1)),
            idle_after: Duration::from_secs(self.keepalive_idle_days * 24 * 3600),
            ..Default::default()
        };
    }
}
