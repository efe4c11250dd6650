//! Settings of the worker (mapped from the environment by the binary).

use std::time::Duration;

use mail_dispatch_broker::Topology;
use mail_dispatch_domain::{Mailbox, RetryPolicy};

/// Default number of jobs processed at once (contract §6).
pub const DEFAULT_CONCURRENCY: usize = 64;
/// Default memory budget of the jobs a worker holds (see `MemoryBudget`).
pub const DEFAULT_MEMORY_BUDGET_BYTES: u64 = 512 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub amqp_url: String,
    pub topology: Topology,
    /// Jobs processed at once; also the consumer prefetch.
    pub concurrency: usize,
    /// Memory the jobs in hand may take, counted as
    /// `mail_dispatch_broker::WORKING_COPIES` times their bodies: a delivery that
    /// would exceed it waits at the broker.
    pub memory_budget_bytes: u64,
    pub retry: RetryPolicy,
    /// Waits up to this long are slept in-process; longer ones go to a delay queue.
    pub max_in_process_wait: Duration,
    /// In-process attempts per delivery before handing the job to a delay queue.
    pub in_process_attempts: u32,
    /// How long a claim on a job id protects it from other workers.
    pub claim_lease: Duration,
    /// How long to let in-flight jobs finish on shutdown.
    pub shutdown_grace: Duration,
    /// The platform sender's address and name.
    pub default_sender: Mailbox,
    /// Name of this worker in AMQP connection names and consumer tags.
    pub instance: String,
    pub pacing: crate::pacing::PacingConfig,
    /// Finished ledger entries older than this are pruned.
    pub ledger_retention: Duration,
    /// Refreshing idle grants before providers expire them.
    pub keepalive: crate::keepalive::KeepAliveConfig,
    /// How long a mailbox the provider blocks from sending
    /// (`ErrorMessageSubmissionBlocked`) is paused: its jobs wait rather than
    /// meet the same refusal, until the organization's admin had time to act.
    pub sending_blocked_pause: Duration,
}

/// Default of [`WorkerConfig::sending_blocked_pause`].
pub const DEFAULT_SENDING_BLOCKED_PAUSE: Duration = Duration::from_secs(3600);

impl WorkerConfig {
    pub fn new(amqp_url: String, default_sender: Mailbox) -> Self {
        WorkerConfig {
            amqp_url,
            topology: Topology::default(),
            concurrency: DEFAULT_CONCURRENCY,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_BYTES,
            retry: RetryPolicy::default(),
            max_in_process_wait: Duration::from_secs(2),
            in_process_attempts: 3,
            claim_lease: Duration::from_secs(120),
            shutdown_grace: Duration::from_secs(25),
            default_sender,
            instance: format!("mail-dispatch-{}", std::process::id()),
            pacing: crate::pacing::PacingConfig::default(),
            ledger_retention: Duration::from_secs(7 * 24 * 3600),
            keepalive: crate::keepalive::KeepAliveConfig::default(),
            sending_blocked_pause: DEFAULT_SENDING_BLOCKED_PAUSE,
        }
    }
}
