//! `mail-dispatch`: sends organizations' notification e-mails through their own
//! Microsoft 365 or Google Workspace account, or the platform sender.
//!
//! The binary is a thin wrapper over [`main`], so that the end-to-end suite can
//! build the same program and run it as a real process.

#![forbid(unsafe_code)]

pub mod commands;
pub mod serve;
pub mod settings;
pub mod telemetry;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::settings::Settings;

#[derive(Parser, Debug)]
#[command(
    name = "mail-dispatch",
    version,
    about = "Notification e-mail dispatch through each organization's own provider"
)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Worker, admin API and metrics in one process (the default deployment).
    Run,
    /// The worker role only.
    Worker,
    /// The admin API role only.
    Admin,
    /// Applies database migrations and exits.
    Migrate,
    /// Publishes one job (smoke tests and operators).
    Enqueue(commands::EnqueueArgs),
    /// Operators' view of organizations' integrations (never tokens).
    Integrations {
        #[command(subcommand)]
        command: commands::IntegrationsCommand,
    },
    /// Prints the admin API's OpenAPI document.
    Openapi,
    /// Inspect and re-queue dead-lettered jobs.
    DeadLetters {
        #[command(subcommand)]
        command: commands::DeadLettersCommand,
    },
}

#[derive(Parser, Debug)]
struct SettingsOnly {
    #[command(flatten)]
    settings: Settings,
}

/// Settings from flags (e.g. `["--queue-prefix", "demo."]`), the environment and the
/// defaults, for programs that embed the service (the sandbox's demo).
pub fn settings_from_args<I: IntoIterator<Item = String>>(args: I) -> anyhow::Result<Settings> {
    let argv = std::iter::once("mail-dispatch".to_owned()).chain(args);
    Ok(SettingsOnly::try_parse_from(argv)?.settings)
}

/// The whole program: parses arguments and environment, runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(&cli.settings.telemetry.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Openapi = cli.command {
        use utoipa::OpenApi as _;
        let doc = mail_dispatch_admin::ApiDoc::openapi();
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("the document serializes")
        );
        return ExitCode::SUCCESS;
    }
    let result = runtime.block_on(async move {
        cli.settings.validate()?;
        match cli.command {
            Command::Run => {
                commands::run(
                    &cli.settings,
                    commands::Roles {
                        worker: true,
                        admin: true,
                    },
                )
                .await
            }
            Command::Worker => {
                commands::run(
                    &cli.settings,
                    commands::Roles {
                        worker: true,
                        admin: false,
                    },
                )
                .await
            }
            Command::Admin => {
                commands::run(
                    &cli.settings,
                    commands::Roles {
                        worker: false,
                        admin: true,
                    },
                )
                .await
            }
            Command::Migrate => commands::migrate(&cli.settings).await,
            Command::Enqueue(args) => commands::enqueue(&cli.settings, &args).await,
            Command::Integrations { command } => {
                commands::integrations(&cli.settings, &command).await
            }
            Command::DeadLetters { command } => {
                commands::dead_letters(&cli.settings, &command).await
            }
            Command::Openapi => Ok(()),
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
