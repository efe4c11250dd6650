//! `dead-letters list` / `replay`: inspect and re-queue dead-lettered jobs.

use anyhow::{Context as _, bail};
use clap::Subcommand;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use mail_dispatch_broker::headers;
use mail_dispatch_broker::{Outgoing, header_str, json_properties};
use mail_dispatch_store::JobKey;

use crate::settings::Settings;

use super::{connect_broker, open_store};

#[derive(Subcommand, Debug)]
pub enum DeadLettersCommand {
    /// Lists dead-lettered jobs with their reason and attempt history.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Re-queues dead-lettered jobs with a fresh attempt budget.
    Replay {
        #[arg(long, conflicts_with = "all")]
        id: Option<String>,
        #[arg(long)]
        all: bool,
    },
}

pub async fn dead_letters(settings: &Settings, command: &DeadLettersCommand) -> anyhow::Result<()> {
    let broker = connect_broker(settings, "mail-dispatch-dead-letters").await?;
    let topology = settings.topology();
    broker
        .declare(&topology)
        .await
        .context("declaring the topology")?;
    // Messages taken with basic.get stay unacked on this channel until acked;
    // closing it returns every one not acked to the queue, in order.
    let channel = broker.channel().await?;
    let result = match command {
        DeadLettersCommand::List { limit } => {
            let mut n = 0;
            while n < *limit {
                let Some(message) = channel
                    .basic_get(
                        topology.dead_queue.as_str().into(),
                        BasicGetOptions::default(),
                    )
                    .await?
                else {
                    break;
                };
                n += 1;
                let p = &message.delivery.properties;
                let job_id = header_str(p, headers::JOB_ID)
                    .filter(|s| !s.is_empty())
                    .or_else(|| p.message_id().as_ref().map(|m| m.to_string()))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{job_id}\treason={}\tattempts={}\tdead_at={}\n\t{}",
                    header_str(p, headers::REASON)
                        .unwrap_or_else(|| "unknown (broker dead-lettered)".into()),
                    header_str(p, headers::ATTEMPTS).unwrap_or_else(|| "-".into()),
                    header_str(p, headers::DEAD_AT).unwrap_or_else(|| "-".into()),
                    header_str(p, headers::DETAIL).unwrap_or_default(),
                );
            }
            println!("{n} dead-lettered job(s) shown");
            Ok(())
        }
        DeadLettersCommand::Replay { id, all } => {
            if id.is_none() && !all {
                bail!("give --id ID or --all");
            }
            let store = open_store(settings, false).await?;
            let mut replayed = 0;
            while let Some(message) = channel
                .basic_get(
                    topology.dead_queue.as_str().into(),
                    BasicGetOptions::default(),
                )
                .await?
            {
                let delivery = &message.delivery;
                let p = &delivery.properties;
                let job_id = header_str(p, headers::JOB_ID)
                    .filter(|s| !s.is_empty())
                    .or_else(|| p.message_id().as_ref().map(|m| m.to_string()));
                if id.is_some() && job_id != *id {
                    continue;
                }
                // A fresh budget: the ledger would otherwise treat it as finished.
                // It knows a job by its organization too; a body without a
                // readable one was never recorded.
                if let (Some(job_id), Some(org)) = (&job_id, organization_of(&delivery.data)) {
                    store
                        .reopen_job(&JobKey::new(org, job_id))
                        .await
                        .context("reopening the job in the ledger")?;
                }
                let mut properties = json_properties();
                if let Some(m) = p.message_id() {
                    properties = properties.with_message_id(m.clone());
                }
                broker
                    .publish(Outgoing {
                        exchange: &topology.jobs_exchange,
                        routing_key: &topology.jobs_routing_key,
                        body: &delivery.data,
                        properties,
                        mandatory: true,
                    })
                    .await
                    .context("re-publishing the job")?;
                delivery.ack(BasicAckOptions::default()).await?;
                replayed += 1;
                println!("replayed {}", job_id.as_deref().unwrap_or("(no id)"));
            }
            println!("{replayed} job(s) replayed");
            Ok(())
        }
    };
    let _ = channel.close(200, "done".into()).await;
    broker.close().await;
    result
}

/// The `organization_id` of a job's body, when it is readable.
fn organization_of(body: &[u8]) -> Option<String> {
    let job: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(job.get("organization_id")?.as_str()?.to_owned())
}
