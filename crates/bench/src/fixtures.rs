//! What the worker is given to do: the organizations and their integrations
//! (stored as a finished connect flow would leave them, with tokens the sandbox
//! accepts) and the jobs, all alike so that runs compare.

use anyhow::Context as _;
use futures_util::{StreamExt as _, TryStreamExt as _};
use mail_dispatch_domain::ProviderKind;
use mail_dispatch_standins::StandIns;
use mail_dispatch_standins::Vendor;
use mail_dispatch_store::{Fallback, NewConnection, Store};
use secrecy::SecretString;
use serde_json::json;

use crate::load::Job;

fn org_id(i: usize) -> String {
    format!("bench-org-{i}")
}

/// Organization `i`: Microsoft, Google or the platform sender, in turn.
fn vendor_of(i: usize) -> Option<Vendor> {
    match i % 3 {
        0 => Some(Vendor::Microsoft),
        1 => Some(Vendor::Google),
        _ => None,
    }
}

/// N jobs, round-robin over the organizations, no attachments.
pub fn make_jobs(n: usize, orgs: usize) -> anyhow::Result<Vec<Job>> {
    make_jobs_for(n, |i| org_id(i % orgs))
}

/// N jobs, job `i` for organization `org(i)`, no attachments.
pub fn make_jobs_for(n: usize, org: impl Fn(usize) -> String) -> anyhow::Result<Vec<Job>> {
    let jobs: Vec<Job> = (0..n)
        .map(|i| {
            let id = uuid::Uuid::new_v4().to_string();
            let org = org(i);
            let body = json!({
                "id": id,
                "organization_id": org,
                "workspace_id": format!("{org}-main"),
                "category": "task_assigned",
                "to": [{"email": "alice@example.com", "name": "Alice Martin"}],
                "subject": "Nouvelle tâche : revue du registre des traitements",
                "text": "Bonjour Alice,\n\nLa tâche « Revue du registre des traitements » vous a été assignée. Échéance : 5 décembre.",
                "html": "<p>Bonjour Alice,</p><p>La tâche « Revue du registre des traitements » vous a été assignée. Échéance : 5 décembre.</p>",
                "headers": {"X-Entity-Ref-ID": format!("task-{i}")},
            });
            Job {
                id,
                body: serde_json::to_vec(&body).expect("serializable"),
            }
        })
        .collect();
    if let Some(first) = jobs.first() {
        mail_dispatch_domain::Job::decode(&first.body)
            .map_err(|e| anyhow::anyhow!("the benchmark's job is invalid: {e}"))?;
    }
    Ok(jobs)
}

/// Stores a connected, tested, active integration for every Microsoft and Google
/// organization, with tokens the sandbox accepts (valid 50 minutes).
pub async fn store_integrations(
    store: &Store,
    standins: &StandIns,
    orgs: usize,
) -> anyhow::Result<()> {
    let connections = (0..orgs)
        .filter_map(|i| vendor_of(i).map(|v| (org_id(i), format!("admin@org{i}.example"), v)));
    store_connections(store, standins, connections).await
}

/// Stores a connected, tested, active integration for each (organization,
/// account, vendor).
pub async fn store_connections(
    store: &Store,
    standins: &StandIns,
    connections: impl Iterator<Item = (String, String, Vendor)>,
) -> anyhow::Result<()> {
    futures_util::stream::iter(connections)
        .map(|(org, account, vendor)| async move {
            let (access, refresh) = standins.issue(vendor, &account);
            store
                .save_connection(&NewConnection {
                    organization_id: org.clone(),
                    provider: match vendor {
                        Vendor::Microsoft => ProviderKind::Microsoft,
                        Vendor::Google => ProviderKind::Google,
                    },
                    account_email: account.clone(),
                    refresh_token: SecretString::from(refresh),
                    access_token: Some((
                        SecretString::from(access),
                        chrono::Utc::now() + chrono::Duration::minutes(50),
                    )),
                    granted_scopes: None,
                    account_id: None,
                    account_tenant: None,
                })
                .await?;
            store
                .save_sender(&org, &account, Some("Bench Notifications"), Fallback::None)
                .await?;
            store
                .record_test(&org, &json!({"status": "sent"}), true)
                .await?;
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(16)
        .try_collect::<()>()
        .await
        .context("storing the integrations")
}
