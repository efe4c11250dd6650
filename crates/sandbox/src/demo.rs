//! The demo: the sandbox and the service in one process, the real OAuth flow, and
//! a handful of realistic notifications in French and English.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use futures_util::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use mail_dispatch_broker::{Broker, Outgoing, Topology, json_properties};
use mail_dispatch_standins::{Consent, Vendor};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[arg(long, default_value = "127.0.0.1:8090")]
    sandbox_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8080")]
    admin_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9090")]
    metrics_listen: SocketAddr,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/mail_dispatch_demo"
    )]
    database_url: String,
    /// Keep the sandbox and the service running after the summary (Ctrl-C to stop).
    #[arg(long)]
    keep_running: bool,
}

const PREFIX: &str = "demo.";

struct Org {
    id: &'static str,
    provider: Option<(&'static str, Vendor, &'static str)>,
    sender: (&'static str, &'static str),
}

const ORGS: [Org; 3] = [
    Org {
        id: "acme",
        provider: Some(("microsoft", Vendor::Microsoft, "it-admin@acme.example")),
        sender: ("notifications@acme.example", "Acme — Équipe Conformité"),
    },
    Org {
        id: "globex",
        provider: Some(("google", Vendor::Google, "privacy@globex.example")),
        sender: ("privacy@globex.example", "Globex Privacy Office"),
    },
    Org {
        id: "initech",
        provider: None,
        sender: ("", ""),
    },
];

fn notifications() -> Vec<(
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
)> {
    // (organization, category, recipient, subject, text)
    vec![
        (
            "acme",
            "task_assigned",
            "claire.dubois@acme.example",
            "Nouvelle tâche : revue du registre des traitements",
            "Bonjour Claire,\n\nLa tâche « Revue du registre des traitements » vous a été assignée. Échéance : 5 décembre.",
        ),
        (
            "acme",
            "compliance_alert",
            "dpo@acme.example",
            "Compliance alert: 3 processing activities lack a legal basis",
            "Three processing activities in the register have no legal basis recorded. Review them before the audit.",
        ),
        (
            "acme",
            "dsr_followup",
            "claire.dubois@acme.example",
            "Demande d'accès DSAR-118 : réponse attendue sous 30 jours",
            "La demande d'accès DSAR-118 a été reçue le 28 novembre. La réponse doit être envoyée avant le 28 décembre.",
        ),
        (
            "globex",
            "invitation",
            "mario.rossi@globex.example",
            "Invitation : rejoignez l'espace « Conformité RGPD »",
            "Bonjour Mario,\n\nVous êtes invité à rejoindre l'espace « Conformité RGPD » de Globex.",
        ),
        (
            "globex",
            "incident_followup",
            "security@globex.example",
            "Incident INC-2041: follow-up actions due Friday",
            "The post-incident review of INC-2041 lists 4 follow-up actions. Two are still open; both are due on Friday.",
        ),
        (
            "globex",
            "reminder",
            "mario.rossi@globex.example",
            "Reminder: annual vendor review starts Monday",
            "The annual review of processors and vendors starts on Monday. Your questionnaire is ready.",
        ),
        (
            "initech",
            "reminder",
            "peter.gibbons@initech.example",
            "Rappel : la revue annuelle des sous-traitants arrive à échéance",
            "Bonjour Peter,\n\nLa revue annuelle des sous-traitants doit être terminée avant vendredi.",
        ),
        (
            "initech",
            "invitation",
            "joanna@initech.example",
            "You're invited to the Initech compliance workspace",
            "Hi Joanna,\n\nYou have been invited to the Initech compliance workspace.",
        ),
    ]
}

/// Follows the browser's redirects from the consent page back to `return_to`.
async fn browse(http: &reqwest::Client, start: &str, back_to: &str) -> anyhow::Result<url::Url> {
    let mut url = start.to_owned();
    for _ in 0..6 {
        let resp = http.get(&url).send().await?;
        let Some(location) = resp
            .headers()
            .get("location")
            .and_then(|l| l.to_str().ok())
            .map(str::to_owned)
        else {
            bail!(
                "{url} answered {} without a redirect: {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        };
        if location.starts_with(back_to) {
            return Ok(url::Url::parse(&location)?);
        }
        url = location;
    }
    bail!("too many redirects")
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let sandbox = crate::start(args.sandbox_listen).await?;
    let sb = sandbox.graph.uri();
    let admin = format!("http://{}", args.admin_listen);
    let admin_token = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let flags: Vec<String> = [
        ("--amqp-url", args.amqp_url.clone()),
        ("--database-url", args.database_url.clone()),
        ("--queue-prefix", PREFIX.to_owned()),
        ("--admin-token", admin_token.clone()),
        ("--admin-listen", args.admin_listen.to_string()),
        ("--public-url", admin.clone()),
        ("--metrics-listen", args.metrics_listen.to_string()),
        ("--default-sender", "no-reply@platform.example".to_owned()),
        ("--default-sender-name", "Compliance Platform".to_owned()),
        ("--default-transport", "file://./outbox".to_owned()),
        ("--product-name", "Compliance Platform".to_owned()),
        (
            "--microsoft-client-id",
            "sandbox-microsoft-client".to_owned(),
        ),
        ("--microsoft-client-secret", "sandbox-secret".to_owned()),
        ("--microsoft-login-url", sb.clone()),
        ("--graph-url", sb.clone()),
        (
            "--google-client-id",
            "sandbox-google-client.apps.googleusercontent.com".to_owned(),
        ),
        ("--google-client-secret", "sandbox-secret".to_owned()),
        ("--google-auth-url", format!("{sb}/o/oauth2/v2/auth")),
        ("--google-token-url", format!("{sb}/token")),
        ("--google-revoke-url", format!("{sb}/revoke")),
        ("--gmail-url", sb.clone()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_owned(), v])
    .chain([
        "--dev".to_owned(),
        "--microsoft-shared-mailboxes".to_owned(),
    ])
    .collect();
    let settings = mail_dispatch::settings_from_args(flags)?;
    mail_dispatch::telemetry::init("pretty");
    settings.validate()?;

    println!("\n== mail-dispatch demo ==");
    println!(
        "sandbox (stand-in for Microsoft and Google, nothing leaves this machine): {sb}/_sandbox/"
    );
    let shutdown = CancellationToken::new();
    let service = {
        let settings = settings.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            mail_dispatch::commands::run_until(
                &settings,
                mail_dispatch::commands::Roles {
                    worker: true,
                    admin: true,
                },
                shutdown,
            )
            .await
        })
    };
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let ready = format!("http://{}/readyz", args.metrics_listen);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if service.is_finished() {
            return service.await?.context("the service stopped");
        }
        if http
            .get(&ready)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the service did not become ready (is RabbitMQ on 5672 and PostgreSQL on 5432?)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "service ready: admin API {admin}, metrics http://{}/metrics\n",
        args.metrics_listen
    );

    // A queue of our own on the results exchange, bound before any job is sent.
    let topology = Topology::with_prefix(PREFIX);
    let broker = Broker::connect(&args.amqp_url, "mail-dispatch-demo").await?;
    broker.declare(&topology).await?;
    let channel = broker.channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            topology.results_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut results = channel
        .basic_consume(
            queue.name().clone(),
            "demo".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let return_to = format!("{admin}/demo/settings");
    // Acme sends from a shared mailbox its admin has Send As rights on (the demo
    // runs with MAIL_DISPATCH_MICROSOFT_SHARED_MAILBOXES, so Mail.Send.Shared is requested).
    sandbox.grant_send_as("it-admin@acme.example", "notifications@acme.example");
    for org in ORGS.iter().filter(|o| o.provider.is_some()) {
        let (provider, vendor, account) = org.provider.expect("filtered");
        sandbox.set_consent(vendor, Consent::Approve(account.to_owned()));
        let auth: Value = http
            .post(format!(
                "{admin}/v1/organizations/{}/integration/authorize",
                org.id
            ))
            .bearer_auth(&admin_token)
            .json(&json!({"provider": provider, "return_to": return_to}))
            .send()
            .await?
            .json()
            .await?;
        let url = auth["authorization_url"]
            .as_str()
            .context("authorize answered no URL")?;
        let back = browse(&http, url, &return_to).await?;
        let outcome: HashMap<String, String> = back.query_pairs().into_owned().collect();
        // The host application confirms the consent in the admin's own session.
        let connection = outcome
            .get("connection")
            .with_context(|| format!("the consent came back without a connection: {outcome:?}"))?;
        let confirmed: Value = http
            .post(format!(
                "{admin}/v1/organizations/{}/integration/confirm",
                org.id
            ))
            .bearer_auth(&admin_token)
            .json(&json!({"connection": connection}))
            .send()
            .await?
            .json()
            .await?;
        println!(
            "{:<8} OAuth consent as {account:<26} → {}, confirmed → {}",
            org.id,
            outcome.get("status").map(String::as_str).unwrap_or("?"),
            confirmed["status"].as_str().unwrap_or("?")
        );
        let test: Value = http
            .put(format!(
                "{admin}/v1/organizations/{}/integration/sender",
                org.id
            ))
            .bearer_auth(&admin_token)
            .json(&json!({"email": org.sender.0, "name": org.sender.1, "fallback": "none"}))
            .send()
            .await?
            .json()
            .await?;
        println!(
            "{:<8} save and test {} <{}> → test {}, integration {}",
            org.id,
            org.sender.1,
            org.sender.0,
            test["status"].as_str().unwrap_or("?"),
            test["integration"]["status"].as_str().unwrap_or("?")
        );
    }
    println!("initech  not connected: the platform sender is used\n");
    // Configuration changes reach the worker by PostgreSQL NOTIFY; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let pdf =
        base64::engine::general_purpose::STANDARD.encode(b"%PDF-1.4\n% demo attachment\n%%EOF\n");
    let mut sent = Vec::new();
    for (org, category, to, subject, text) in notifications() {
        let id = uuid::Uuid::new_v4().to_string();
        let mut job = json!({
            "id": id, "organization_id": org, "workspace_id": format!("{org}-main"), "category": category,
            "to": [{"email": to}], "subject": subject, "text": text,
            "html": format!("<p>{}</p>", text.replace('\n', "<br>")),
        });
        if category == "dsr_followup" {
            job["attachments"] = json!([{"filename": "demande-DSAR-118.pdf", "content_type": "application/pdf", "content_base64": pdf}]);
        }
        broker
            .publish(Outgoing {
                exchange: &topology.jobs_exchange,
                routing_key: &topology.jobs_routing_key,
                body: &serde_json::to_vec(&job)?,
                properties: json_properties().with_message_id(id.as_str().into()),
                mandatory: true,
            })
            .await?;
        sent.push((id, org, category, subject));
    }
    println!(
        "{} notifications enqueued; waiting for their results…\n",
        sent.len()
    );

    let mut by_id: HashMap<String, Value> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while by_id.len() < sent.len() {
        let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(deadline, results.next()).await else {
            bail!("only {} of {} results arrived", by_id.len(), sent.len());
        };
        delivery.ack(BasicAckOptions::default()).await?;
        if delivery.routing_key.as_str().starts_with("result.") {
            let r: Value = serde_json::from_slice(&delivery.data)?;
            if let Some(id) = r["job_id"].as_str() {
                by_id.insert(id.to_owned(), r);
            }
        }
    }

    println!(
        "{:<8} {:<18} {:<10} {:<7} {:<54} subject",
        "org", "category", "provider", "status", "sender"
    );
    println!("{}", "-".repeat(140));
    for (id, org, category, subject) in &sent {
        let r = &by_id[id];
        let sender = format!(
            "{} <{}>",
            r["sender"]["name"].as_str().unwrap_or(""),
            r["sender"]["email"].as_str().unwrap_or("")
        );
        let subject: String = subject.chars().take(48).collect();
        println!(
            "{org:<8} {category:<18} {:<10} {:<7} {sender:<54} {subject}",
            r["provider"].as_str().unwrap_or("-"),
            r["status"].as_str().unwrap_or("-"),
        );
    }
    let received = sandbox.received();
    let graph = received
        .iter()
        .filter(|m| m.provider == "microsoft")
        .count();
    let gmail = received.iter().filter(|m| m.provider == "google").count();
    println!(
        "\nsandbox received {graph} message(s) through Graph sendMail and {gmail} through Gmail messages.send (test messages included)"
    );
    println!("platform sender wrote .eml files into ./outbox");
    if let Ok(metrics) = http
        .get(format!("http://{}/metrics", args.metrics_listen))
        .send()
        .await?
        .text()
        .await
    {
        println!("\nfrom http://{}/metrics:", args.metrics_listen);
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("mail_dispatch_jobs_completed_total"))
        {
            println!("  {line}");
        }
    }

    // The hosted settings page of the organization left on the platform sender:
    // a newcomer can connect it in the browser. The sandbox's consent pages then
    // wait for a click, as the providers' do.
    sandbox.set_consent(
        Vendor::Microsoft,
        Consent::Approve("it@initech.example".into()),
    );
    sandbox.set_consent(
        Vendor::Google,
        Consent::Approve("admin@initech.example".into()),
    );
    sandbox.show_consent_page(Vendor::Microsoft, true);
    sandbox.show_consent_page(Vendor::Google, true);
    let portal: Value = http
        .post(format!("{admin}/v1/organizations/initech/portal-sessions"))
        .bearer_auth(&admin_token)
        .json(&json!({"return_url": return_to, "product_name": "Compliance Platform", "accent_color": "#0f766e"}))
        .send()
        .await?
        .json()
        .await?;
    let portal_url = portal["url"]
        .as_str()
        .with_context(|| format!("no portal link: {portal}"))?;
    println!(
        "\ninitech's email settings page (opens once, within 5 minutes{}):\n  {portal_url}",
        if args.keep_running {
            ""
        } else {
            "; add --keep-running to keep the service up for it"
        }
    );

    if args.keep_running {
        println!(
            "\nstill running: sandbox {sb}/_sandbox/, admin {admin}, metrics http://{}/metrics — Ctrl-C to stop",
            args.metrics_listen
        );
        tokio::signal::ctrl_c().await?;
    }
    shutdown.cancel();
    broker.close().await;
    service.await?.context("the service")?;
    Ok(())
}
