//! The process under test: `mail-dispatch worker`, started with only this run's
//! settings (none inherited from the caller's environment) and pointed at the
//! run's queues, database, outbox and sandbox.

use std::process::Stdio;
use std::time::Duration;

use mail_dispatch_standins::StandIns;
use tokio::process::Command;

use crate::child::{self, Proc};
use crate::ctx::Ctx;
use crate::{BenchArgs, Pacing};

/// Starts `mail-dispatch worker` against this run's queues, database and sandbox,
/// and waits until it is ready. Returns it and its metrics base URL.
pub async fn spawn(
    args: &BenchArgs,
    ctx: &Ctx,
    worker_bin: &std::path::Path,
    standins: &StandIns,
    http: &reqwest::Client,
    pacing: Pacing,
) -> anyhow::Result<(Proc, String)> {
    eprintln!("[bench] starting the worker");
    let metrics = format!("http://127.0.0.1:{}", child::free_port()?);
    let sb = standins.graph.uri();
    let mut cmd = Command::new(worker_bin);
    cmd.arg("worker");
    for (k, _) in std::env::vars() {
        if k.starts_with("MAIL_DISPATCH_") {
            cmd.env_remove(k);
        }
    }
    let env = [
        ("MAIL_DISPATCH_AMQP_URL", args.amqp_url.clone()),
        ("MAIL_DISPATCH_DATABASE_URL", ctx.db_url.clone()),
        ("MAIL_DISPATCH_TOKEN_KEY", ctx.token_key.clone()),
        ("MAIL_DISPATCH_QUEUE_PREFIX", ctx.prefix.clone()),
        ("MAIL_DISPATCH_CONCURRENCY", args.concurrency.to_string()),
        (
            "MAIL_DISPATCH_METRICS_LISTEN",
            metrics.trim_start_matches("http://").to_owned(),
        ),
        (
            "MAIL_DISPATCH_DEFAULT_TRANSPORT",
            format!("file://{}", ctx.outbox.display()),
        ),
        (
            "MAIL_DISPATCH_DEFAULT_SENDER",
            "no-reply@platform.example".into(),
        ),
        (
            "MAIL_DISPATCH_DEFAULT_SENDER_NAME",
            "Compliance Platform".into(),
        ),
        (
            "MAIL_DISPATCH_MICROSOFT_CLIENT_ID",
            "sandbox-microsoft-client".into(),
        ),
        (
            "MAIL_DISPATCH_MICROSOFT_CLIENT_SECRET",
            "sandbox-secret".into(),
        ),
        ("MAIL_DISPATCH_MICROSOFT_LOGIN_URL", sb.clone()),
        ("MAIL_DISPATCH_GRAPH_URL", sb.clone()),
        (
            "MAIL_DISPATCH_GOOGLE_CLIENT_ID",
            "sandbox-google-client.apps.googleusercontent.com".into(),
        ),
        (
            "MAIL_DISPATCH_GOOGLE_CLIENT_SECRET",
            "sandbox-secret".into(),
        ),
        (
            "MAIL_DISPATCH_GOOGLE_AUTH_URL",
            format!("{sb}/o/oauth2/v2/auth"),
        ),
        ("MAIL_DISPATCH_GOOGLE_TOKEN_URL", format!("{sb}/token")),
        ("MAIL_DISPATCH_GOOGLE_REVOKE_URL", format!("{sb}/revoke")),
        ("MAIL_DISPATCH_GMAIL_URL", sb.clone()),
        ("RUST_LOG", "warn".into()),
    ];
    cmd.envs(env).stdout(Stdio::null());
    if pacing == Pacing::Lifted {
        let c = args.concurrency.to_string();
        cmd.envs([
            ("MAIL_DISPATCH_ORG_MAX_IN_FLIGHT", c.as_str()),
            ("MAIL_DISPATCH_GRAPH_MAILBOX_CONCURRENCY", c.as_str()),
            ("MAIL_DISPATCH_GMAIL_MAILBOX_PER_MINUTE", "100000000"),
            ("MAIL_DISPATCH_MICROSOFT_DAILY_RECIPIENTS", "2000000000"),
            ("MAIL_DISPATCH_GOOGLE_DAILY_MESSAGES", "2000000000"),
            ("MAIL_DISPATCH_GOOGLE_DAILY_RECIPIENTS", "2000000000"),
            (
                "MAIL_DISPATCH_GOOGLE_DAILY_EXTERNAL_RECIPIENTS",
                "2000000000",
            ),
            ("MAIL_DISPATCH_GOOGLE_CONSUMER_DAILY_MESSAGES", "2000000000"),
            (
                "MAIL_DISPATCH_GOOGLE_CONSUMER_DAILY_RECIPIENTS",
                "2000000000",
            ),
            ("MAIL_DISPATCH_GOOGLE_DAILY_UNIQUE_RECIPIENTS", "2000000000"),
            ("MAIL_DISPATCH_GOOGLE_TRIAL_DAILY_MESSAGES", "2000000000"),
            (
                "MAIL_DISPATCH_GOOGLE_TRIAL_DAILY_EXTERNAL_RECIPIENTS",
                "2000000000",
            ),
        ]);
        // The sandbox enforces Graph's 4 concurrent requests per mailbox, as
        // Graph does: lifted, the worker would meet 429s it was told to ignore.
        standins.set_graph_concurrency(args.concurrency);
    }
    let mut worker = Proc::spawn("worker", cmd, &ctx.tmp.join("worker.log"))?;
    worker
        .wait_ready_url(http, &format!("{metrics}/readyz"), Duration::from_secs(60))
        .await?;
    Ok((worker, metrics))
}
