//! `enqueue`: publishes one job (smoke tests, operators).

use anyhow::{Context as _, bail};
use clap::Args;
use lapin::types::ShortString;
use mail_dispatch_broker::{Outgoing, json_properties};
use serde_json::json;

use crate::settings::Settings;

use super::connect_broker;

#[derive(Args, Debug)]
pub struct EnqueueArgs {
    #[arg(long)]
    pub org: String,
    /// Recipient address; repeat for several.
    #[arg(long, required = true)]
    pub to: Vec<String>,
    #[arg(long)]
    pub subject: String,
    #[arg(long)]
    pub text: Option<String>,
    #[arg(long)]
    pub html: Option<String>,
    /// Job id (default: a new UUID).
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long)]
    pub workspace: Option<String>,
    #[arg(long)]
    pub category: Option<String>,
}

pub async fn enqueue(settings: &Settings, args: &EnqueueArgs) -> anyhow::Result<()> {
    if args.text.is_none() && args.html.is_none() {
        bail!("give --text or --html");
    }
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut job = json!({
        "id": id,
        "organization_id": args.org,
        "to": args.to.iter().map(|e| json!({"email": e})).collect::<Vec<_>>(),
        "subject": args.subject,
    });
    for (key, value) in [
        ("text", &args.text),
        ("html", &args.html),
        ("workspace_id", &args.workspace),
        ("category", &args.category),
    ] {
        if let Some(v) = value {
            job[key] = json!(v);
        }
    }
    let body = serde_json::to_vec(&job)?;
    // Refuse to publish what the worker would only dead-letter.
    mail_dispatch_domain::Job::decode(&body).map_err(|e| anyhow::anyhow!("invalid job: {e}"))?;
    let broker = connect_broker(settings, "mail-dispatch-enqueue").await?;
    let topology = settings.topology();
    broker
        .declare(&topology)
        .await
        .context("declaring the topology")?;
    broker
        .publish(Outgoing {
            exchange: &topology.jobs_exchange,
            routing_key: &topology.jobs_routing_key,
            body: &body,
            properties: json_properties()
                .with_message_id(ShortString::from(id.as_str()))
                .with_timestamp(chrono::Utc::now().timestamp() as u64),
            mandatory: true,
        })
        .await
        .context("publishing the job")?;
    broker.close().await;
    println!("{id}");
    Ok(())
}
