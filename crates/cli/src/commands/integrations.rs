//! `integrations list` / `show`: the operators' view of configured organizations,
//! never a token.

use anyhow::Context as _;
use clap::Subcommand;

use crate::settings::Settings;

use super::open_store;

#[derive(Subcommand, Debug)]
pub enum IntegrationsCommand {
    /// Every configured organization and its status.
    List,
    /// One organization's integration.
    Show { org: String },
}

pub async fn integrations(
    settings: &Settings,
    command: &IntegrationsCommand,
) -> anyhow::Result<()> {
    let store = open_store(settings, false).await?;
    match command {
        IntegrationsCommand::List => {
            let all = store
                .list_integrations()
                .await
                .context("reading integrations")?;
            println!(
                "{:<24} {:<10} {:<15} {:<32} LAST ERROR",
                "ORGANIZATION", "PROVIDER", "STATUS", "SENDER"
            );
            for i in &all {
                println!(
                    "{:<24} {:<10} {:<15} {:<32} {}",
                    i.organization_id,
                    i.provider.as_str(),
                    i.status.as_str(),
                    i.sender_email.as_deref().unwrap_or("-"),
                    i.last_error.as_deref().unwrap_or("-")
                );
            }
            println!("{} integration(s)", all.len());
        }
        IntegrationsCommand::Show { org } => {
            let Some(i) = store
                .integration(org)
                .await
                .context("reading the integration")?
            else {
                println!("{org}: not_configured (the platform sender is used)");
                return Ok(());
            };
            // The same view as the admin API's GET …/integration.
            let view = mail_dispatch_admin::integration_view_with_pause(&store, org, Some(&i))
                .await
                .context("reading the mailbox's pause")?;
            println!("{}", serde_json::to_string_pretty(&view)?);
        }
    }
    Ok(())
}
