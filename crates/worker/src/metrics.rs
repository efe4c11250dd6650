//! Every metric mail-dispatch records, named `mail_dispatch_<name>_<unit>[_total]`.
//! Label values are bounded: providers, statuses, error codes, categories,
//! reasons — never an organization id, an address or a raw message.

use std::time::Duration;

use mail_dispatch_domain::{ErrorCode, JobResult, ProviderKind, ResultStatus};

pub const JOBS_RECEIVED: &str = "mail_dispatch_jobs_received_total";
pub const JOBS_COMPLETED: &str = "mail_dispatch_jobs_completed_total";
pub const SEND_ATTEMPTS: &str = "mail_dispatch_send_attempts_total";
pub const SEND_DURATION: &str = "mail_dispatch_send_duration_seconds";
pub const RETRIES_SCHEDULED: &str = "mail_dispatch_retries_scheduled_total";
pub const DEAD_LETTERS: &str = "mail_dispatch_dead_letters_total";
pub const JOB_LATENCY: &str = "mail_dispatch_job_latency_seconds";
pub const JOBS_IN_FLIGHT: &str = "mail_dispatch_jobs_in_flight";
pub const MEMORY_HELD_BYTES: &str = "mail_dispatch_job_memory_held_bytes";
pub const MEMORY_BUDGET_BYTES: &str = "mail_dispatch_job_memory_budget_bytes";
pub const DUPLICATES_SKIPPED: &str = "mail_dispatch_duplicates_skipped_total";
pub const TOKEN_REFRESHES: &str = "mail_dispatch_token_refreshes_total";
pub const PROVIDER_THROTTLED: &str = "mail_dispatch_provider_throttled_total";
pub const AMQP_CONNECTED: &str = "mail_dispatch_amqp_connected";
pub const DATABASE_UP: &str = "mail_dispatch_database_up";
pub const INTEGRATIONS: &str = "mail_dispatch_integrations";
pub const CONFIG_CACHE_EVICTIONS: &str = "mail_dispatch_config_cache_evictions_total";
pub const DB_STATEMENTS: &str = "mail_dispatch_db_statements_total";
pub const AMBIGUOUS_SENDS: &str = "mail_dispatch_ambiguous_sends_total";
pub const CLAIMS_LOST: &str = "mail_dispatch_claims_lost_total";
pub const RESULTS_UNCONFIRMED: &str = "mail_dispatch_results_unconfirmed_total";
pub const GRANT_KEEPALIVE: &str = "mail_dispatch_grant_keepalive_total";
pub const GRANT_KEEPALIVE_LAST_SWEEP: &str =
    "mail_dispatch_grant_keepalive_last_sweep_timestamp_seconds";

/// Histogram buckets (seconds), so replicas' histograms aggregate (summaries do not).
pub const SEND_DURATION_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
pub const JOB_LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Describes every metric (help texts in `/metrics`).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(JOBS_RECEIVED, "Job deliveries taken from the jobs queue.");
    describe_counter!(
        RESULTS_UNCONFIRMED,
        "Results whose publish confirm never came back (broker connection lost): published again by the job's next delivery, so consumers may see that job id twice."
    );
    describe_gauge!(
        MEMORY_HELD_BYTES,
        "Memory charged to the jobs in hand (4x their bodies); deliveries wait at the broker beyond the budget."
    );
    describe_gauge!(
        MEMORY_BUDGET_BYTES,
        "The worker's job memory budget (MAIL_DISPATCH_MEMORY_BUDGET_MIB)."
    );
    describe_counter!(
        JOBS_COMPLETED,
        "Final outcomes published, by provider, status and error code."
    );
    describe_counter!(
        SEND_ATTEMPTS,
        "Send attempts made to a provider, by provider and outcome."
    );
    describe_histogram!(
        SEND_DURATION,
        metrics::Unit::Seconds,
        "Duration of one send attempt, by provider."
    );
    describe_counter!(RETRIES_SCHEDULED, "Jobs sent to a delay queue, by reason.");
    describe_counter!(DEAD_LETTERS, "Jobs dead-lettered, by reason.");
    describe_histogram!(
        JOB_LATENCY,
        metrics::Unit::Seconds,
        "From job publish (or first seen) to its result."
    );
    describe_gauge!(JOBS_IN_FLIGHT, "Jobs being processed by this worker.");
    describe_counter!(
        DUPLICATES_SKIPPED,
        "Deliveries of job ids that already had a result."
    );
    describe_counter!(
        TOKEN_REFRESHES,
        "Access token refreshes, by provider and outcome."
    );
    describe_counter!(
        PROVIDER_THROTTLED,
        "Throttling answers (429) seen from providers."
    );
    describe_counter!(
        AMBIGUOUS_SENDS,
        "Send attempts whose outcome the provider did not tell (the message may have been accepted), by provider and cause (no_answer, gateway_timeout, shutdown)."
    );
    describe_counter!(
        CLAIMS_LOST,
        "Deliveries whose job claim was taken over by another delivery while they held it; their outcome was not recorded or published."
    );
    describe_counter!(
        GRANT_KEEPALIVE,
        "Idle grants refreshed by the keep-alive, by provider and outcome (refreshed, revoked, error)."
    );
    describe_gauge!(
        GRANT_KEEPALIVE_LAST_SWEEP,
        "When this worker's keep-alive last finished a sweep of idle grants (Unix time)."
    );
    describe_gauge!(AMQP_CONNECTED, "1 when the AMQP connection is open.");
    describe_gauge!(DATABASE_UP, "1 when PostgreSQL answered the last check.");
    describe_gauge!(INTEGRATIONS, "Integrations by status.");
    describe_counter!(
        CONFIG_CACHE_EVICTIONS,
        "Cached organization configurations evicted by change notifications."
    );
    describe_counter!(
        DB_STATEMENTS,
        "PostgreSQL statements run by this process, by purpose (config, token, refresh, ledger)."
    );
    register_zeroes();
}

/// Mirrors the store's statement counts into `mail_dispatch_db_statements_total`.
pub fn record_db_statements(counts: &mail_dispatch_store::QueryCounts) {
    let [config, token, refresh, ledger] = counts.snapshot();
    for (kind, n) in [
        ("config", config),
        ("token", token),
        ("refresh", refresh),
        ("ledger", ledger),
    ] {
        metrics::counter!(DB_STATEMENTS, "kind" => kind).absolute(n);
    }
}

/// Series that alerts and dashboards rate over exist from the start (at 0), so
/// that "no dead letters yet" reads as 0 rather than as no data.
fn register_zeroes() {
    metrics::counter!(JOBS_RECEIVED).absolute(0);
    metrics::counter!(DUPLICATES_SKIPPED).absolute(0);
    metrics::counter!(CONFIG_CACHE_EVICTIONS).absolute(0);
    metrics::counter!(CLAIMS_LOST).absolute(0);
    metrics::gauge!(JOBS_IN_FLIGHT).set(0.0);
    for reason in [
        ErrorCode::InvalidJob,
        ErrorCode::Throttled,
        ErrorCode::ProviderUnavailable,
    ] {
        metrics::counter!(DEAD_LETTERS, "reason" => reason.as_str()).absolute(0);
    }
    for reason in crate::dispatch::DelayReason::ALL {
        metrics::counter!(RETRIES_SCHEDULED, "reason" => reason.as_str()).absolute(0);
    }
    for provider in [ProviderKind::Microsoft, ProviderKind::Google] {
        metrics::counter!(PROVIDER_THROTTLED, "provider" => provider.as_str()).absolute(0);
        for outcome in ["ok", "revoked", "error", "misconfigured", "rejected"] {
            metrics::counter!(TOKEN_REFRESHES, "provider" => provider.as_str(), "outcome" => outcome).absolute(0);
        }
        for outcome in ["refreshed", "revoked", "error"] {
            metrics::counter!(GRANT_KEEPALIVE, "provider" => provider.as_str(), "outcome" => outcome).absolute(0);
        }
    }
}

pub(crate) fn send_attempt(provider: ProviderKind, outcome: &'static str, took: Duration) {
    metrics::counter!(SEND_ATTEMPTS, "provider" => provider.as_str(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!(SEND_DURATION, "provider" => provider.as_str()).record(took.as_secs_f64());
}

/// A send attempt whose outcome is unknown: the provider may have accepted it.
pub(crate) fn ambiguous_send(provider: ProviderKind, cause: &'static str) {
    metrics::counter!(AMBIGUOUS_SENDS, "provider" => provider.as_str(), "cause" => cause)
        .increment(1);
}

pub(crate) fn completed(result: &JobResult, latency: Duration) {
    let provider = result.provider.map(ProviderKind::as_str).unwrap_or("none");
    let status = match result.status {
        ResultStatus::Sent => "sent",
        ResultStatus::Failed => "failed",
    };
    let code = result
        .error
        .as_ref()
        .map(|e| e.code.as_str())
        .unwrap_or("none");
    metrics::counter!(JOBS_COMPLETED, "provider" => provider, "status" => status, "code" => code)
        .increment(1);
    metrics::histogram!(JOB_LATENCY, "provider" => provider, "status" => status)
        .record(latency.as_secs_f64());
}

pub(crate) fn retry_scheduled(reason: crate::dispatch::DelayReason) {
    metrics::counter!(RETRIES_SCHEDULED, "reason" => reason.as_str()).increment(1);
}

pub(crate) fn dead_letter(reason: ErrorCode) {
    metrics::counter!(DEAD_LETTERS, "reason" => reason.as_str()).increment(1);
}

pub(crate) fn token_refresh(provider: ProviderKind, outcome: &'static str) {
    metrics::counter!(TOKEN_REFRESHES, "provider" => provider.as_str(), "outcome" => outcome)
        .increment(1);
}

pub(crate) fn grant_keepalive(provider: ProviderKind, outcome: &'static str) {
    metrics::counter!(GRANT_KEEPALIVE, "provider" => provider.as_str(), "outcome" => outcome)
        .increment(1);
}
