//! A queued job becomes a message accepted by Graph, Gmail or the platform sender.

use base64::Engine as _;
use mail_dispatch_test_support::standins::Vendor;
use mail_dispatch_test_support::{PLATFORM_SENDER, TestApp};
use mail_parser::{MessageParser, MimeHeaders as _};
use serde_json::{Value, json};

use crate::support::{WAIT, assert_valid_result, job_schema_accepts};

/// Bytes that survive only if the attachment path is binary-safe.
fn pdf_bytes() -> Vec<u8> {
    let mut b = b"%PDF-1.7\n".to_vec();
    b.extend((0..=255u8).cycle().take(3000));
    b
}

fn full_job(org: &str) -> Value {
    json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "organization_id": org,
        "workspace_id": "ws_7",
        "category": "task_assigned",
        "to": [{"email": "alice@example.com", "name": "Alice Müller"}],
        "cc": [{"email": "bob@example.com"}],
        "bcc": [{"email": "audit@example.com", "name": "Audit"}],
        "reply_to": {"email": "dpo@customer.com", "name": "Délégué à la protection des données"},
        "subject": "Nouvelle tâche : revue du registre — échéance 30/11",
        "text": "Bonjour Alice,\nune tâche vous a été assignée : revue du registre.",
        "html": "<p>Bonjour Alice,</p><p>une tâche vous a été assignée : <b>revue du registre</b>.</p>",
        "attachments": [{
            "filename": "rapport d'activité été.pdf",
            "content_type": "application/pdf",
            "content_base64": base64::engine::general_purpose::STANDARD.encode(pdf_bytes()),
        }],
        "headers": {"X-Entity-Ref-ID": "task-991", "X-Workspace": "ws_7"},
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_microsoft_job_reaches_graph_with_sender_recipients_body_attachment_and_headers() {
    let app = TestApp::spawn().await;
    app.connect(
        "org_ms",
        Vendor::Microsoft,
        "admin@customer.com",
        "notifications@customer.com",
        "Équipe Conformité",
    )
    .await;
    let mut results = app.amqp.tap_results().await;
    let job = full_job("org_ms");
    assert!(job_schema_accepts(&job));
    app.amqp.publish_job(&job).await;

    let result = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_valid_result(&result);
    assert_eq!(result["status"], "sent", "{result:#}");
    assert_eq!(result["provider"], "microsoft");
    assert_eq!(result["attempts"], 1);
    assert_eq!(result["workspace_id"], "ws_7");
    assert_eq!(result["category"], "task_assigned");
    assert_eq!(
        result["sender"],
        json!({"email": "notifications@customer.com", "name": "Équipe Conformité"})
    );
    assert!(
        result["provider_message_id"]
            .as_str()
            .is_some_and(|id| id.len() == 36),
        "request-id kept: {result:#}"
    );

    let sent = app.standins.graph_messages();
    assert_eq!(sent.len(), 1);
    let m = &sent[0]["message"];
    assert_eq!(sent[0]["saveToSentItems"], false);
    assert_eq!(
        m["from"],
        json!({"emailAddress": {"address": "notifications@customer.com", "name": "Équipe Conformité"}})
    );
    assert_eq!(
        m["toRecipients"],
        json!([{"emailAddress": {"address": "alice@example.com", "name": "Alice Müller"}}])
    );
    assert_eq!(
        m["ccRecipients"],
        json!([{"emailAddress": {"address": "bob@example.com"}}])
    );
    assert_eq!(
        m["bccRecipients"],
        json!([{"emailAddress": {"address": "audit@example.com", "name": "Audit"}}])
    );
    assert_eq!(
        m["replyTo"],
        json!([{"emailAddress": {"address": "dpo@customer.com", "name": "Délégué à la protection des données"}}])
    );
    assert_eq!(m["subject"], job["subject"]);
    assert_eq!(
        m["body"],
        json!({"contentType": "HTML", "content": job["html"]})
    );
    let attachment = &m["attachments"][0];
    assert_eq!(attachment["@odata.type"], "#microsoft.graph.fileAttachment");
    assert_eq!(attachment["name"], "rapport d'activité été.pdf");
    assert_eq!(attachment["contentType"], "application/pdf");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(attachment["contentBytes"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes, pdf_bytes(), "attachment must arrive byte-identical");
    let mut headers = m["internetMessageHeaders"].as_array().unwrap().clone();
    headers.sort_by_key(|h| h["name"].as_str().unwrap().to_owned());
    assert_eq!(
        headers,
        vec![
            json!({"name": "X-Entity-Ref-ID", "value": "task-991"}),
            json!({"name": "X-Workspace", "value": "ws_7"})
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_graph_message_without_custom_headers_omits_internet_message_headers() {
    let app = TestApp::spawn().await;
    app.connect_mailbox(
        "org_ms",
        Vendor::Microsoft,
        "admin@customer.com",
        "Customer",
    )
    .await;
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_ms");
    app.amqp.publish_job(&job).await;
    let result = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(result["status"], "sent");
    let m = &app.standins.graph_messages()[0]["message"];
    assert!(
        m.get("internetMessageHeaders").is_none(),
        "an empty array is refused by Graph: {m:#}"
    );
    assert_eq!(m["body"]["contentType"], "Text");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_google_job_reaches_gmail_as_a_well_formed_mime_message() {
    let app = TestApp::spawn().await;
    app.connect_mailbox(
        "org_g",
        Vendor::Google,
        "ops@customer.com",
        "Équipe Conformité",
    )
    .await;
    let mut results = app.amqp.tap_results().await;
    let job = full_job("org_g");
    app.amqp.publish_job(&job).await;

    let result = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_valid_result(&result);
    assert_eq!(result["status"], "sent", "{result:#}");
    assert_eq!(result["provider"], "google");
    assert!(
        result["provider_message_id"]
            .as_str()
            .is_some_and(|id| id.len() == 16),
        "Gmail id kept: {result:#}"
    );

    let raw = app
        .standins
        .gmail_messages()
        .pop()
        .expect("Gmail received the message");
    let text = String::from_utf8(raw.clone()).expect("7-bit clean");
    assert!(
        text.is_ascii(),
        "non-ASCII must be encoded (RFC 2047 / transfer encodings)"
    );
    let msg = MessageParser::default().parse(&raw).unwrap();
    let from = msg.from().unwrap().first().unwrap();
    assert_eq!(from.address(), Some("ops@customer.com"));
    assert_eq!(from.name(), Some("Équipe Conformité"));
    assert_eq!(
        msg.to().unwrap().first().unwrap().name(),
        Some("Alice Müller")
    );
    assert_eq!(
        msg.cc().unwrap().first().unwrap().address(),
        Some("bob@example.com")
    );
    assert_eq!(
        msg.bcc().unwrap().first().unwrap().address(),
        Some("audit@example.com"),
        "Gmail reads Bcc from the header"
    );
    assert_eq!(
        msg.reply_to().unwrap().first().unwrap().address(),
        Some("dpo@customer.com")
    );
    assert_eq!(msg.subject(), job["subject"].as_str());
    // MIME bodies travel with CRLF line ends (RFC 5322 §2.3).
    assert_eq!(
        msg.body_text(0).unwrap().trim_end().replace("\r\n", "\n"),
        job["text"].as_str().unwrap()
    );
    assert_eq!(
        msg.body_html(0).unwrap().trim_end(),
        job["html"].as_str().unwrap()
    );
    assert_eq!(
        msg.header_raw("X-Entity-Ref-ID").map(str::trim),
        Some("task-991")
    );
    let attachment = msg.attachment(0).expect("one attachment");
    assert_eq!(
        attachment.attachment_name(),
        Some("rapport d'activité été.pdf")
    );
    assert_eq!(
        attachment.contents(),
        pdf_bytes().as_slice(),
        "attachment must arrive byte-identical"
    );
    let message_id = msg.message_id().unwrap();
    assert!(
        message_id.starts_with(&format!("job-{}", job["id"].as_str().unwrap())),
        "Message-ID from the job id: {message_id}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_organization_without_integration_goes_out_from_the_platform_sender_as_an_eml_file() {
    let app = TestApp::spawn().await;
    let mut results = app.amqp.tap_results().await;
    let job = full_job("org_plain");
    app.amqp.publish_job(&job).await;

    let result = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_valid_result(&result);
    assert_eq!(result["status"], "sent", "{result:#}");
    assert_eq!(result["provider"], "default");
    assert_eq!(result["sender"]["email"], PLATFORM_SENDER);
    assert!(result.get("fallback").is_none() || result["fallback"] == false);

    let files = app.outbox_files();
    assert_eq!(files.len(), 1);
    let raw = std::fs::read(&files[0]).unwrap();
    let msg = MessageParser::default()
        .parse(&raw)
        .expect("parseable .eml");
    assert_eq!(
        msg.from().unwrap().first().unwrap().address(),
        Some(PLATFORM_SENDER)
    );
    assert_eq!(msg.subject(), job["subject"].as_str());
    assert_eq!(
        msg.to().unwrap().first().unwrap().address(),
        Some("alice@example.com")
    );
    assert!(
        msg.bcc().is_none(),
        "Bcc is in the SMTP envelope, not the header"
    );
    assert_eq!(
        msg.attachment(0).unwrap().contents(),
        pdf_bytes().as_slice()
    );
    assert_eq!(
        Some(result["provider_message_id"].as_str().unwrap()),
        msg.message_id().map(|id| format!("<{id}>")).as_deref()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_of_several_organizations_each_go_through_their_own_provider() {
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_ms", Vendor::Microsoft, "a@ms.example", "MS")
        .await;
    app.connect_mailbox("org_g", Vendor::Google, "b@g.example", "G")
        .await;
    app.standins
        .set_send_delay(std::time::Duration::from_millis(200));
    let mut results = app.amqp.tap_results().await;
    let mut expected = std::collections::HashMap::new();
    for i in 0..30 {
        let org = ["org_ms", "org_g", "org_plain"][i % 3];
        let job = app.job(org);
        expected.insert(job["id"].as_str().unwrap().to_owned(), org);
        app.amqp.publish_job(&job).await;
    }
    let all = results.results(30, WAIT).await;
    for r in all {
        assert_eq!(r["status"], "sent");
        let provider = match expected[r["job_id"].as_str().unwrap()] {
            "org_ms" => "microsoft",
            "org_g" => "google",
            _ => "default",
        };
        assert_eq!(r["provider"], provider);
    }
    assert_eq!(app.standins.graph_messages().len(), 10);
    assert_eq!(app.standins.gmail_messages().len(), 10);
    assert_eq!(app.outbox_files().len(), 10);
}

/// A minimal SMTP relay (RFC 5321): accepts one session and hands back the
/// envelope and the message it received.
async fn smtp_relay() -> (u16, tokio::sync::oneshot::Receiver<(Vec<String>, String)>) {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let (read, mut write) = socket.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"220 relay.test ESMTP ready\r\n")
            .await
            .unwrap();
        let (mut envelope, mut data, mut in_data) = (Vec::new(), String::new(), false);
        let mut tx = Some(tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if in_data {
                if line == "." {
                    write
                        .write_all(b"250 2.0.0 queued as 4Y7Q\r\n")
                        .await
                        .unwrap();
                    // lettre keeps pooled connections open: the message is complete here.
                    if let Some(tx) = tx.take() {
                        let _ = tx.send((envelope, data));
                    }
                    return;
                } else {
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                    data.push_str("\r\n");
                }
                continue;
            }
            let upper = line.to_ascii_uppercase();
            let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                b"250-relay.test\r\n250 8BITMIME\r\n"
            } else if upper.starts_with("MAIL FROM") || upper.starts_with("RCPT TO") {
                envelope.push(line.clone());
                b"250 2.1.0 Ok\r\n"
            } else if upper == "DATA" {
                in_data = true;
                b"354 End data with <CR><LF>.<CR><LF>\r\n"
            } else if upper == "QUIT" {
                write.write_all(b"221 2.0.0 Bye\r\n").await.unwrap();
                break;
            } else {
                b"250 2.0.0 Ok\r\n"
            };
            write.write_all(reply).await.unwrap();
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_platform_sender_delivers_over_smtp_with_bcc_in_the_envelope_only() {
    let (port, received) = smtp_relay().await;
    let app = TestApp::spawn_with(mail_dispatch_test_support::TestAppOptions {
        platform_transport: Some(format!("smtp://127.0.0.1:{port}")),
        ..Default::default()
    })
    .await;
    let mut results = app.amqp.tap_results().await;
    let job = full_job("org_plain");
    app.amqp.publish_job(&job).await;
    let result = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(result["status"], "sent", "{result:#}");
    assert_eq!(result["provider"], "default");
    let (envelope, data) = tokio::time::timeout(WAIT, received).await.unwrap().unwrap();
    assert_eq!(envelope[0], format!("MAIL FROM:<{PLATFORM_SENDER}>"));
    for rcpt in ["alice@example.com", "bob@example.com", "audit@example.com"] {
        assert!(
            envelope.contains(&format!("RCPT TO:<{rcpt}>")),
            "{rcpt} in the envelope: {envelope:?}"
        );
    }
    let msg = MessageParser::default().parse(data.as_bytes()).unwrap();
    assert_eq!(msg.subject(), job["subject"].as_str());
    assert!(
        msg.bcc().is_none(),
        "Bcc travels in the envelope, not the header"
    );
    assert_eq!(
        msg.attachment(0).unwrap().contents(),
        pdf_bytes().as_slice()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_google_job_over_100_recipients_fails_as_recipient_rejected_without_calling_gmail() {
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    let mut results = app.amqp.tap_results().await;
    let with_recipients = |n: usize| {
        let mut job = app.job("org_g");
        job["bcc"] = (1..n)
            .map(|i| json!({"email": format!("u{i}@example.com")}))
            .collect();
        job
    };
    let too_many = with_recipients(101);
    app.amqp.publish_job(&too_many).await;
    let r = results.result(too_many["id"].as_str().unwrap(), WAIT).await;
    assert_valid_result(&r);
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["error"]["code"], "recipient_rejected", "{r:#}");
    assert_eq!(r["provider"], "google");
    assert_eq!(r["attempts"], 0);
    assert_eq!(
        app.standins.send_attempts(Vendor::Google),
        0,
        "no Gmail call"
    );
    assert_eq!(
        app.amqp.queue_len(&app.amqp.topology.dead_queue).await,
        0,
        "a refusal is a result, not a dead letter"
    );

    // Gmail's limit itself is fine.
    let at_limit = with_recipients(100);
    app.amqp.publish_job(&at_limit).await;
    let r = results.result(at_limit["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["status"], "sent", "{r:#}");
    assert_eq!(app.standins.gmail_messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_20_mb_attachment_reaches_gmail_byte_for_byte_through_a_resumable_upload() {
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_g", Vendor::Google, "ops@customer.com", "Ops")
        .await;
    let mut results = app.amqp.tap_results().await;
    // Not compressible, not repetitive: any shift or loss of a chunk shows.
    let content: Vec<u8> = (0..20 * 1000 * 1000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut job = app.job("org_g");
    job["attachments"] = json!([{
        "filename": "export.bin",
        "content_type": "application/octet-stream",
        "content_base64": base64::engine::general_purpose::STANDARD.encode(&content),
    }]);
    app.amqp.publish_job(&job).await;

    let result = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(result["status"], "sent", "{result:#}");
    let raw = app
        .standins
        .gmail_messages()
        .pop()
        .expect("Gmail received it");
    assert!(
        raw.len() > 20 * 1000 * 1000,
        "the whole message, in several chunks"
    );
    let msg = MessageParser::default().parse(&raw).unwrap();
    assert!(
        msg.attachment(0).unwrap().contents() == content.as_slice(),
        "the attachment arrived byte for byte"
    );
}
