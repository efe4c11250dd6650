//! Graph messages over the 4 MB request limit (#13 point 1): with
//! `MAIL_DISPATCH_GRAPH_LARGE_MESSAGES` they go through a draft and upload
//! sessions; without it they fail `message_too_large`, naming the option.

use base64::Engine as _;
use mail_dispatch_test_support::standins::{Vendor, graph_unavailable};
use mail_dispatch_test_support::{TestApp, TestAppOptions};
use serde_json::{Value, json};

use crate::support::WAIT;

const ACCOUNT: &str = "ops@customer.com";
/// What the connect flow requests with the option on.
const LARGE_SCOPES: &[&str] = &[
    "offline_access",
    "openid",
    "email",
    "profile",
    "User.Read",
    "Mail.Send",
    "Mail.ReadWrite",
];

/// Not compressible, not repetitive: any shift or loss of a fragment shows.
fn content(len: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn with_attachment(app: &TestApp, org: &str, bytes: &[u8]) -> Value {
    let mut job = app.job(org);
    job["attachments"] = json!([{
        "filename": "export.bin",
        "content_type": "application/octet-stream",
        "content_base64": base64::engine::general_purpose::STANDARD.encode(bytes),
    }, {
        "filename": "notice.txt",
        "content_type": "text/plain",
        "content_base64": base64::engine::general_purpose::STANDARD.encode(b"small one"),
    }]);
    job
}

async fn large_app() -> TestApp {
    TestApp::spawn_with(TestAppOptions {
        graph_large_messages: true,
        ..Default::default()
    })
    .await
}

fn attachment_bytes(message: &Value, name: &str) -> Vec<u8> {
    let a = message["message"]["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap_or_else(|| panic!("{name} attached"));
    base64::engine::general_purpose::STANDARD
        .decode(a["contentBytes"].as_str().unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_20_mb_attachment_reaches_graph_byte_for_byte_through_a_draft_and_upload_sessions() {
    let app = large_app().await;
    app.connect_with_scopes("org_m", Vendor::Microsoft, ACCOUNT, LARGE_SCOPES)
        .await;
    let mut results = app.amqp.tap_results().await;
    let bytes = content(20 * 1000 * 1000);
    let job = with_attachment(&app, "org_m", &bytes);
    app.amqp.publish_job(&job).await;

    let result = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(result["status"], "sent", "{result:#}");
    let sent = app.standins.graph_messages();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0]["message"]["subject"], job["subject"]);
    assert_eq!(
        sent[0]["message"]["toRecipients"][0]["emailAddress"]["address"],
        "alice@example.com"
    );
    assert!(
        attachment_bytes(&sent[0], "export.bin") == bytes,
        "the 20 MB attachment arrived byte for byte"
    );
    assert_eq!(attachment_bytes(&sent[0], "notice.txt"), b"small one");
    let message_id = sent[0]["message"]["internetMessageId"].as_str().unwrap();
    assert_eq!(
        app.standins.received().pop().unwrap().message_id,
        message_id,
        "the draft carried the job's Message-ID to recipients"
    );
    assert!(app.standins.graph_drafts().is_empty(), "the draft was sent");
    assert!(app.standins.graph_deleted_drafts().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_option_a_message_over_graphs_request_limit_fails_message_too_large_naming_it()
{
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_m", Vendor::Microsoft, ACCOUNT, "Ops")
        .await;
    let mut results = app.amqp.tap_results().await;
    let job = with_attachment(&app, "org_m", &content(5 * 1000 * 1000));
    app.amqp.publish_job(&job).await;

    let result = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(result["status"], "failed", "{result:#}");
    assert_eq!(result["error"]["code"], "message_too_large", "{result:#}");
    let message = result["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("MAIL_DISPATCH_GRAPH_LARGE_MESSAGES"),
        "the admin learns which option allows it: {message}"
    );
    assert_eq!(app.standins.send_attempts(Vendor::Microsoft), 0);
    assert!(app.standins.graph_drafts().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_fragment_deletes_the_draft_and_the_retry_sends_the_message_once() {
    let app = large_app().await;
    app.connect_with_scopes("org_m", Vendor::Microsoft, ACCOUNT, LARGE_SCOPES)
        .await;
    // Graph's upload service fails the first fragment.
    app.standins.script_graph_uploads([graph_unavailable()]);
    let mut results = app.amqp.tap_results().await;
    let bytes = content(6 * 1000 * 1000);
    let job = with_attachment(&app, "org_m", &bytes);
    app.amqp.publish_job(&job).await;

    let result = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(result["status"], "sent", "{result:#}");
    assert_eq!(
        app.standins.graph_deleted_drafts().len(),
        1,
        "the failed attempt's draft was deleted"
    );
    assert!(
        app.standins.graph_drafts().is_empty(),
        "no draft left in the mailbox"
    );
    let sent = app.standins.graph_messages();
    assert_eq!(sent.len(), 1, "sent once");
    assert!(attachment_bytes(&sent[0], "export.bin") == bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_without_mail_read_write_fails_a_large_message_asking_for_a_reconnect() {
    let app = large_app().await;
    // Connected before the operator turned the option on.
    app.connect_mailbox("org_m", Vendor::Microsoft, ACCOUNT, "Ops")
        .await;
    let mut results = app.amqp.tap_results().await;
    let job = with_attachment(&app, "org_m", &content(5 * 1000 * 1000));
    app.amqp.publish_job(&job).await;

    let result = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(result["status"], "failed", "{result:#}");
    let message = result["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("Mail.ReadWrite") && message.contains("reconnect"),
        "{message}"
    );
    assert!(app.standins.graph_messages().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_option_the_connect_flow_asks_for_mail_read_write_and_its_grant_sends_large_messages()
 {
    let app = large_app().await;
    let host = crate::admin::Api::new(&app);
    let auth = host.authorize_response("org_ms", "microsoft").await;
    let url = url::Url::parse(auth["authorization_url"].as_str().unwrap()).unwrap();
    let scope = url
        .query_pairs()
        .find(|(k, _)| k == "scope")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    assert!(scope.contains("Mail.ReadWrite"), "{scope}");

    app.standins.set_consent(
        Vendor::Microsoft,
        mail_dispatch_test_support::standins::Consent::Approve(ACCOUNT.into()),
    );
    let confirmed = host.connect_confirmed("org_ms", "microsoft").await;
    assert_eq!(confirmed["status"], "connected");
    host.save_sender_ok("org_ms", json!({"email": ACCOUNT}))
        .await;
    let mut results = app.amqp.tap_results().await;
    let bytes = content(5 * 1000 * 1000);
    let job = with_attachment(&app, "org_ms", &bytes);
    app.amqp.publish_job(&job).await;
    let result = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(result["status"], "sent", "{result:#}");
    let sent = app.standins.graph_messages();
    assert!(attachment_bytes(&sent[sent.len() - 1], "export.bin") == bytes);
}
