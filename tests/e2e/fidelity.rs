//! Issue #13 points 4–6: what recipients really see, sends that can be told
//! apart (the job's Message-ID at the recipient, a `client-request-id` per Graph
//! call), and Sent Items as the organization's choice.

use std::collections::HashSet;

use mail_dispatch_domain::message::message_id_for;
use mail_dispatch_test_support::standins::{self, Consent, Vendor};
use mail_dispatch_test_support::{PLATFORM_SENDER, TestApp, TestAppOptions};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::admin::Api;
use crate::support::WAIT;

/// `alice@customer.com`, whose directory name is "Alice Martin" and who has the
/// alias `compliance@customer.com`, connected to `org` through the admin API.
async fn connect_alice(app: &TestApp, api: &Api<'_>, org: &str) {
    let mut info = app.standins.account_info("alice@customer.com");
    info.display_name = "Alice Martin".into();
    info.proxy_addresses = vec![
        "SMTP:alice@customer.com".into(),
        "smtp:compliance@customer.com".into(),
    ];
    app.standins.set_account("alice@customer.com", info);
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("alice@customer.com".into()),
    );
    let connected = api.connect_confirmed(org, "microsoft").await;
    assert_eq!(connected["status"], "connected", "{connected}");
}

#[tokio::test(flavor = "multi_thread")]
async fn save_and_test_reports_the_name_exchange_will_really_show() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    connect_alice(&app, &api, "org_ms").await;

    let outcome = api
        .save_sender_ok(
            "org_ms",
            json!({"email": "alice@customer.com", "name": "Compliance Team - Customer Inc"}),
        )
        .await;
    assert_eq!(outcome["status"], "sent", "{outcome:#}");
    let seen = &outcome["recipients_see"];
    assert_eq!(seen["name"], "Alice Martin", "{outcome:#}");
    assert_eq!(seen["email"], "alice@customer.com");
    assert_eq!(seen["differs"], true);
    assert_eq!(seen["reasons"], json!(["directory_display_name"]));
    // What the product reported is what the recipient of the test got.
    let test = app.standins.received().pop().unwrap();
    assert_eq!(test.shown(), "Alice Martin <alice@customer.com>");
    // The admin's view keeps saying so, and the configured sender is unchanged.
    let view = api.integration("org_ms").await;
    assert_eq!(view["recipients_see"], *seen);
    assert_eq!(view["sender"]["name"], "Compliance Team - Customer Inc");

    // An alias: Exchange sends from the primary address (the tenant's default).
    let outcome = api
        .save_sender_ok(
            "org_ms",
            json!({"email": "compliance@customer.com", "name": "Alice Martin"}),
        )
        .await;
    let seen = &outcome["recipients_see"];
    assert_eq!(seen["email"], "alice@customer.com", "{outcome:#}");
    assert_eq!(seen["reasons"], json!(["alias_rewritten_to_primary"]));
    assert!(
        seen["message"]
            .as_str()
            .unwrap()
            .contains("SendFromAliasEnabled")
    );
    assert_eq!(
        app.standins.received().pop().unwrap().seen_from.address,
        "alice@customer.com"
    );

    // As configured: nothing differs.
    let outcome = api
        .save_sender_ok(
            "org_ms",
            json!({"email": "alice@customer.com", "name": "Alice Martin"}),
        )
        .await;
    assert_eq!(outcome["recipients_see"]["differs"], false, "{outcome:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gmail_sender_refused_says_what_gmail_would_have_shown() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    app.standins
        .set_consent(Vendor::Google, Consent::Approve("ops@customer.com".into()));
    api.connect_confirmed("org_g", "google").await;
    let (status, body) = api
        .save_sender("org_g", json!({"email": "ceo@customer.com", "name": "CEO"}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Gmail would send from ops@customer.com"),
        "{body}"
    );
    let outcome = api
        .save_sender_ok("org_g", json!({"email": "ops@customer.com", "name": "Ops"}))
        .await;
    assert_eq!(
        outcome["recipients_see"],
        json!({"name": "Ops", "email": "ops@customer.com", "differs": false, "reasons": [],
               "message": "Recipients see Ops <ops@customer.com>, as configured."})
    );
    assert_eq!(
        app.standins.received().pop().unwrap().shown(),
        "Ops <ops@customer.com>"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_jobs_message_id_reaches_recipients_through_graph_gmail_and_the_platform_sender() {
    let app = TestApp::spawn().await;
    app.connect_mailbox(
        "org_ms",
        Vendor::Microsoft,
        "admin@customer.com",
        "Customer",
    )
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "ops@customer.com", "Ops")
        .await;
    let mut tap = app.amqp.tap_results().await;
    // Graph's first answer is a 503: the retry must carry the same Message-ID.
    app.standins
        .script(Vendor::Microsoft, [standins::graph_unavailable()]);

    for (org, domain) in [
        ("org_ms", "customer.com"),
        ("org_g", "customer.com"),
        ("org_p", PLATFORM_SENDER.split('@').nth(1).unwrap()),
    ] {
        let job = app.job(org);
        let id = job["id"].as_str().unwrap().to_owned();
        app.amqp.publish_job(&job).await;
        let r = tap.result(&id, WAIT).await;
        assert_eq!(r["status"], "sent", "{r:#}");
        let expected = format!("<{}>", message_id_for(&id, org, domain));
        match org {
            "org_p" => {
                let eml = std::fs::read_to_string(app.outbox_files().pop().unwrap()).unwrap();
                let parsed = mail_parser::MessageParser::default()
                    .parse(eml.as_bytes())
                    .unwrap();
                assert_eq!(
                    format!("<{}>", parsed.message_id().unwrap()),
                    expected,
                    "platform sender"
                );
            }
            _ => {
                let got = app.standins.received().pop().unwrap();
                assert_eq!(got.message_id, expected, "{org}");
            }
        }
    }
    // Two sendMail calls for the Graph job (503, then 202), each with its own
    // client-request-id; every Graph call carried one.
    let calls = app.standins.graph_client_request_ids();
    let sends: Vec<&String> = calls
        .iter()
        .filter(|(path, _)| path == "/v1.0/me/sendMail")
        .map(|(_, id)| id.as_ref().expect("a client-request-id on every call"))
        .collect();
    assert_eq!(sends.len(), 2, "{calls:?}");
    let distinct: HashSet<&&String> = sends.iter().collect();
    assert_eq!(distinct.len(), 2, "one id per call: {sends:?}");
    assert!(
        sends.iter().all(|id| uuid::Uuid::parse_str(id).is_ok()),
        "GUIDs: {sends:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sent_items_is_the_organizations_choice() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    connect_alice(&app, &api, "org_ms").await;
    let mut tap = app.amqp.tap_results().await;
    let save_flag = |app: &TestApp| -> Value {
        app.standins.graph_messages().pop().unwrap()["saveToSentItems"].clone()
    };

    // Default as before: no copy in Sent Items.
    let outcome = api
        .save_sender_ok(
            "org_ms",
            json!({"email": "alice@customer.com", "name": "A"}),
        )
        .await;
    assert_eq!(outcome["integration"]["save_to_sent_items"], false);
    assert_eq!(save_flag(&app), false, "the test message");

    let outcome = api
        .save_sender_ok(
            "org_ms",
            json!({"email": "alice@customer.com", "name": "A", "save_to_sent_items": true}),
        )
        .await;
    assert_eq!(outcome["status"], "sent");
    assert_eq!(save_flag(&app), true, "the test message honours the choice");
    assert_eq!(api.integration("org_ms").await["save_to_sent_items"], true);
    // Omitted on a later save: unchanged.
    api.save_sender_ok(
        "org_ms",
        json!({"email": "alice@customer.com", "name": "B"}),
    )
    .await;
    assert_eq!(save_flag(&app), true);

    // Jobs follow it (the change reaches workers by NOTIFY).
    let job = app.job("org_ms");
    app.amqp.publish_job(&job).await;
    let r = tap.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["provider"], "microsoft", "{r:#}");
    assert_eq!(save_flag(&app), true, "the job");

    // Gmail always keeps a copy: false cannot be honoured there.
    app.standins
        .set_consent(Vendor::Google, Consent::Approve("ops@customer.com".into()));
    api.connect_confirmed("org_g", "google").await;
    let (status, body) = api
        .save_sender(
            "org_g",
            json!({"email": "ops@customer.com", "save_to_sent_items": false}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["code"], "invalid_request");
    let outcome = api
        .save_sender_ok("org_g", json!({"email": "ops@customer.com"}))
        .await;
    assert_eq!(outcome["integration"]["save_to_sent_items"], Value::Null);
}

#[tokio::test(flavor = "multi_thread")]
async fn save_and_test_of_a_shared_mailbox_warns_of_its_own_name_and_on_behalf() {
    let app = TestApp::spawn_with(TestAppOptions {
        microsoft_shared_mailboxes: true,
        ..Default::default()
    })
    .await;
    let api = Api::new(&app);
    connect_alice(&app, &api, "org_ms").await;
    let mut shared = app.standins.account_info("notifications@customer.com");
    shared.display_name = "Customer Notifications".into();
    app.standins
        .set_account("notifications@customer.com", shared);
    app.standins
        .grant_send_on_behalf("alice@customer.com", "notifications@customer.com");

    let outcome = api
        .save_sender_ok(
            "org_ms",
            json!({"email": "notifications@customer.com", "name": "Compliance Team"}),
        )
        .await;
    assert_eq!(outcome["status"], "sent", "{outcome:#}");
    let seen = &outcome["recipients_see"];
    assert_eq!(seen["reasons"], json!(["other_mailbox"]), "{outcome:#}");
    assert_eq!(seen["email"], "notifications@customer.com");
    let message = seen["message"].as_str().unwrap();
    assert!(
        message.contains("\"Alice Martin on behalf of notifications@customer.com\""),
        "{message}"
    );
    // Which is what the test's recipient got: Send on Behalf only.
    assert_eq!(
        app.standins.received().pop().unwrap().shown(),
        "Alice Martin on behalf of Customer Notifications <notifications@customer.com>"
    );
}
