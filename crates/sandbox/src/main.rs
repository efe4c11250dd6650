//! `mail-dispatch-sandbox`: a local Microsoft and Google for demos and load tests.

#![forbid(unsafe_code)]

mod control;
mod demo;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mail_dispatch_standins::StandIns;
use mail_dispatch_standins::{Consent, Vendor};

#[derive(Parser, Debug)]
#[command(
    name = "mail-dispatch-sandbox",
    version,
    about = "Local stand-in for Microsoft 365 and Google Workspace (never for production)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the sandbox until Ctrl-C.
    Serve(ServeArgs),
    /// Runs the sandbox and the service, connects organizations, sends notifications, prints a summary.
    Demo(demo::DemoArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// The account consent pages sign in as, for Microsoft.
    #[arg(long, default_value = "admin@contoso.example")]
    microsoft_account: String,
    /// The account consent pages sign in as, for Google.
    #[arg(long, default_value = "admin@fabrikam.example")]
    google_account: String,
    /// Delay of every send answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Share of sends answering 503, from 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
}

/// Starts the sandbox on `listen` with its pages and controls.
pub async fn start(listen: SocketAddr) -> anyhow::Result<StandIns> {
    let listener = std::net::TcpListener::bind(listen)
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let sandbox = StandIns::start_on(listener).await;
    control::mount(&sandbox).await;
    Ok(sandbox)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => {
                let sandbox = start(args.listen).await?;
                sandbox.set_consent(Vendor::Microsoft, Consent::Approve(args.microsoft_account));
                sandbox.set_consent(Vendor::Google, Consent::Approve(args.google_account));
                control::apply_faults(&sandbox, Some(args.latency_ms), Some(args.fault_rate), 0, 5, 0);
                let base = sandbox.graph.uri();
                println!("mail-dispatch sandbox on {base} — NOT a real mail provider, never for production");
                println!("  messages:  {base}/_sandbox/  (JSON: {base}/_sandbox/messages)");
                println!("  point the service at it:");
                println!("    MAIL_DISPATCH_MICROSOFT_LOGIN_URL={base} MAIL_DISPATCH_GRAPH_URL={base}");
                println!("    MAIL_DISPATCH_GOOGLE_AUTH_URL={base}/o/oauth2/v2/auth MAIL_DISPATCH_GOOGLE_TOKEN_URL={base}/token");
                println!("    MAIL_DISPATCH_GOOGLE_REVOKE_URL={base}/revoke MAIL_DISPATCH_GMAIL_URL={base}");
                println!("    MAIL_DISPATCH_MICROSOFT_CLIENT_ID=sandbox MAIL_DISPATCH_GOOGLE_CLIENT_ID=sandbox");
                tokio::signal::ctrl_c().await?;
                Ok(())
            }
            Command::Demo(args) => demo::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
