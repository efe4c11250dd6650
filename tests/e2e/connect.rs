//! The connect flow as real tenants behave (issue #10), against the strict
//! stand-ins: scopes, admin consent, confirmation by the host application,
//! reconnects to another account, keep-alive of idle grants, token errors by
//! cause, and the fallback of the job that finds a grant dead.

use std::time::Duration;

use mail_dispatch_store::{Fallback, IntegrationStatus};
use mail_dispatch_test_support::standins::{Consent, Vendor};
use mail_dispatch_test_support::{TestApp, TestAppOptions};
use reqwest::StatusCode;
use serde_json::json;

use crate::admin::Api;
use crate::support::WAIT;

#[tokio::test(flavor = "multi_thread")]
async fn microsoft_connect_reads_me_with_user_read_and_stores_the_accounts_stable_ids() {
    let app = TestApp::spawn().await;
    let host = Api::new(&app);
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("it@customer.com".into()),
    );
    let confirmed = host.connect_confirmed("org_ms", "microsoft").await;
    assert_eq!(confirmed["status"], "connected");
    let stored = app.db.store.integration("org_ms").await.unwrap().unwrap();
    let info = app.standins.account_info("it@customer.com");
    assert_eq!(stored.account_email.as_deref(), Some("it@customer.com"));
    assert_eq!(stored.account_id.as_deref(), Some(info.id.as_str()), "oid");
    assert_eq!(
        stored.account_tenant.as_deref(),
        Some(info.tenant_id.as_str()),
        "tid"
    );
    let token = app
        .db
        .store
        .access_token("org_ms")
        .await
        .unwrap()
        .unwrap()
        .0;
    let granted = app
        .standins
        .granted_scopes(secrecy::ExposeSecret::expose_secret(&token))
        .unwrap()
        .join(" ");
    assert!(granted.contains("User.Read"), "{granted}");
    assert!(granted.contains("Mail.Send"), "{granted}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_microsoft_user_without_a_mailbox_or_a_personal_account_is_refused_with_its_reason() {
    let app = TestApp::spawn().await;
    let host = Api::new(&app);
    let mut info = app.standins.account_info("nomail@customer.com");
    info.mail = None;
    app.standins.set_account("nomail@customer.com", info);
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("nomail@customer.com".into()),
    );
    let back = host.consent("org_ms", "microsoft").await;
    assert_eq!(
        (back["status"].as_str(), back["error"].as_str()),
        ("error", "no_mailbox"),
        "{back:?}"
    );
    assert!(app.db.store.integration("org_ms").await.unwrap().is_none());
    assert_eq!(
        app.db
            .store
            .pending_connection_count("org_ms")
            .await
            .unwrap(),
        0
    );

    // A personal account cannot even sign in at the `organizations` authority.
    let mut info = app.standins.account_info("someone@outlook.com");
    info.personal = true;
    app.standins.set_account("someone@outlook.com", info);
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("someone@outlook.com".into()),
    );
    let auth = host.authorize_response("org_ms", "microsoft").await;
    let resp = host
        .http
        .get(auth["authorization_url"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(app.db.store.integration("org_ms").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consent_without_the_send_scope_stores_nothing_and_names_the_missing_permission() {
    let app = TestApp::spawn().await;
    let host = Api::new(&app);
    app.standins.set_consent(
        Vendor::Google,
        Consent::Partial {
            account: "ops@customer.com".into(),
            unticked: vec!["https://www.googleapis.com/auth/gmail.send".into()],
        },
    );
    let back = host.consent("org_g", "google").await;
    assert_eq!(back["status"], "error", "{back:?}");
    assert_eq!(back["error"], "scope_not_granted");
    assert_eq!(back["missing"], "gmail.send");
    assert!(!back.contains_key("connection"));
    assert!(app.db.store.integration("org_g").await.unwrap().is_none());
    assert_eq!(
        app.db
            .store
            .pending_connection_count("org_g")
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        app.standins.revocations().len(),
        1,
        "the useless grant is revoked at Google"
    );
    assert_eq!(host.integration("org_g").await["status"], "not_configured");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_that_blocks_user_consent_needs_admin_consent_then_the_admin_connects() {
    let app = TestApp::spawn().await;
    let host = Api::new(&app);
    app.standins.block_user_consent("customer.com");
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("it@customer.com".into()),
    );
    let auth = host.authorize_response("org_ms", "microsoft").await;
    let back = host
        .browse_query(auth["authorization_url"].as_str().unwrap())
        .await;
    assert_eq!(
        (back["status"].as_str(), back["error"].as_str()),
        ("error", "admin_approval_required"),
        "{back:?}"
    );
    assert!(app.db.store.integration("org_ms").await.unwrap().is_none());

    // A tenant administrator grants the app for the tenant through the admin-consent page.
    let admin_url = auth["admin_consent_url"]
        .as_str()
        .expect("admin consent URL");
    assert!(
        admin_url.contains("/organizations/v2.0/adminconsent"),
        "{admin_url}"
    );
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("globaladmin@customer.com".into()),
    );
    let back = host.browse_query(admin_url).await;
    assert_eq!(back["status"], "admin_consent_granted", "{back:?}");
    assert!(!back.contains_key("connection"), "nothing to confirm yet");
    assert!(app.db.store.integration("org_ms").await.unwrap().is_none());

    // Now the user's own consent goes through.
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("it@customer.com".into()),
    );
    let confirmed = host.connect_confirmed("org_ms", "microsoft").await;
    assert_eq!(confirmed["integration"]["account_email"], "it@customer.com");
    let outcome = host
        .save_sender_ok("org_ms", json!({"email": "it@customer.com", "name": "IT"}))
        .await;
    assert_eq!(outcome["status"], "sent", "{outcome}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consent_that_is_never_confirmed_is_never_used_and_expires_revoked() {
    let app = TestApp::spawn_with(TestAppOptions {
        connection_ttl: Duration::from_secs(1),
        admin_upkeep_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let host = Api::new(&app);
    // Consent phishing: the URL for org_victim is opened by someone else, who consents.
    app.standins.set_consent(
        Vendor::Google,
        Consent::Approve("stranger@elsewhere.example".into()),
    );
    let back = host.consent("org_victim", "google").await;
    assert_eq!(back["status"], "connected");
    let connection = back["connection"].clone();
    // The host application never confirms it (that browser was not the admin's session).
    assert_eq!(
        host.integration("org_victim").await["status"],
        "not_configured"
    );
    let mut tap = app.amqp.tap_results().await;
    let job = app.job("org_victim");
    app.amqp.publish_job(&job).await;
    let r = tap.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["provider"], "default", "{r}");
    // Another organization cannot claim it either.
    let (status, body) = host.confirm("org_attacker", &connection).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("connection_unknown"))
    );

    // It expires, and the grant is revoked at Google.
    let deadline = std::time::Instant::now() + WAIT;
    while app.standins.revocations().is_empty() {
        assert!(std::time::Instant::now() < deadline, "never revoked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = host.confirm("org_victim", &connection).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::GONE, json!("connection_expired"))
    );
    assert!(
        app.db
            .store
            .integration("org_victim")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(app.standins.gmail_messages().len(), 0, "never used");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_google_reconnect_to_another_account_checks_the_saved_sender_again() {
    let app = TestApp::spawn().await;
    let host = Api::new(&app);
    app.standins
        .set_consent(Vendor::Google, Consent::Approve("ops@customer.com".into()));
    host.connect_confirmed("org_g", "google").await;
    let outcome = host
        .save_sender_ok("org_g", json!({"email": "ops@customer.com", "name": "Ops"}))
        .await;
    assert_eq!(outcome["status"], "sent");
    let sent_before = app.standins.gmail_messages().len();

    // Same account again: the saved sender passes and stays active.
    let confirmed = host.connect_confirmed("org_g", "google").await;
    assert_eq!(confirmed["status"], "active", "{confirmed}");
    assert_eq!(confirmed["account_changed"], false);

    // Another account: Gmail would silently rewrite the From, so the sender is refused.
    app.standins.set_consent(
        Vendor::Google,
        Consent::Approve("intern@customer.com".into()),
    );
    let confirmed = host.connect_confirmed("org_g", "google").await;
    assert_eq!(confirmed["account_changed"], true, "{confirmed}");
    assert_eq!(confirmed["status"], "test_failed", "{confirmed}");
    assert_eq!(confirmed["test"]["error"]["code"], "sender_not_allowed");
    assert_eq!(confirmed["integration"]["status"], "pending_sender");
    assert_eq!(
        app.standins.gmail_messages().len(),
        sent_before + 1,
        "only the same-account reconnect sent a test; nothing went out from the other account"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_keep_alive_refreshes_an_idle_grant_once_and_flags_a_dead_one_before_any_job() {
    let keepalive = mail_dispatch_worker::keepalive::KeepAliveConfig {
        interval: Duration::from_millis(200),
        idle_after: Duration::from_secs(3600),
        batch: 100,
    };
    let app = TestApp::spawn_with(TestAppOptions {
        keepalive: Some(keepalive),
        ..Default::default()
    })
    .await;
    let second = app.start_worker().await; // another replica sweeping too
    app.connect_mailbox("org_idle", Vendor::Microsoft, "quarterly@customer.com", "Q")
        .await;
    app.connect_mailbox("org_dead", Vendor::Google, "gone@customer.com", "G")
        .await;
    app.connect_mailbox("org_busy", Vendor::Microsoft, "busy@customer.com", "B")
        .await;
    let mut tap = app.amqp.tap_results().await;
    app.standins.revoke_account("gone@customer.com");
    // org_idle and org_dead were last refreshed 60 days ago; org_busy just now.
    let client = tokio_postgres::connect(&app.db.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(client.1);
    client
        .0
        .execute(
            "UPDATE integrations SET last_refreshed_at = now() - interval '60 days'
             WHERE organization_id IN ('org_idle', 'org_dead')",
            &[],
        )
        .await
        .unwrap();

    let event = tap
        .wait_for(WAIT, |s| s.routing_key == "integration.needs_reauth")
        .await
        .expect("the dead grant is announced without any job");
    assert_eq!(event.body["organization_id"], "org_dead");
    let dead = app.db.store.integration("org_dead").await.unwrap().unwrap();
    assert_eq!(dead.status, IntegrationStatus::NeedsReauth);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let idle = app.db.store.integration("org_idle").await.unwrap().unwrap();
        if idle
            .last_refreshed_at
            .is_some_and(|t| t > chrono::Utc::now() - chrono::Duration::minutes(1))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never refreshed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Several sweeps of two replicas later: one refresh each, none for the busy grant.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let refreshed: Vec<String> = app
        .standins
        .refreshes(Vendor::Microsoft)
        .iter()
        .map(|f| f["refresh_token"].clone())
        .collect();
    assert_eq!(
        refreshed.len(),
        1,
        "exactly once across replicas: {refreshed:?}"
    );
    assert!(
        app.standins.refreshes(Vendor::Microsoft)[0]["scope"].contains("offline_access"),
        "Microsoft refreshes ask for offline_access"
    );
    assert_eq!(app.standins.refreshes(Vendor::Google).len(), 1);
    let events = tap.settle(Duration::from_millis(300)).await;
    assert_eq!(
        events
            .iter()
            .filter(|s| s.routing_key == "integration.needs_reauth")
            .count(),
        1,
        "one event for the dead grant"
    );
    assert!(
        events.iter().all(|s| !s.routing_key.starts_with("result.")),
        "no job involved"
    );
    second.stop().await;
}

/// Every Entra condition at refresh time: the organization's own ones turn the
/// integration `needs_reauth` with what its admin must do; the operator's client
/// secret is retried and never blamed on the organization.
#[tokio::test(flavor = "multi_thread")]
async fn token_errors_are_classified_by_their_aadsts_cause() {
    let app = TestApp::spawn_with(TestAppOptions {
        max_attempts: 2,
        in_process_attempts: 1,
        ..Default::default()
    })
    .await;
    let mut tap = app.amqp.tap_results().await;
    let organization_conditions = [
        (700016, "not registered"),
        (7000112, "disabled"),
        (50105, "not assigned"),
        (53003, "Conditional Access"),
        (70044, "sign-in frequency"),
        (50076, "multi-factor"),
        (700082, "90 days"),
        (65001, "consent"),
    ];
    let operator_conditions = [7000215, 7000222];
    let mut jobs = Vec::new();
    for code in organization_conditions
        .iter()
        .map(|(c, _)| *c)
        .chain(operator_conditions)
    {
        let org = format!("org_{code}");
        let account = format!("user{code}@customer.com");
        let (access, refresh) = app.standins.issue(Vendor::Microsoft, &account);
        app.store_grant(
            &org,
            Vendor::Microsoft,
            &account,
            &access,
            &refresh,
            chrono::Utc::now() - chrono::Duration::minutes(1),
        )
        .await;
        app.db
            .store
            .save_sender(&org, &account, Some("N"), Fallback::None)
            .await
            .unwrap();
        app.db
            .store
            .record_test(&org, &json!({"status": "sent"}), true)
            .await
            .unwrap();
        app.standins.fail_refresh(&account, Some(code));
        let job = app.job(&org);
        app.amqp.publish_job(&job).await;
        jobs.push((code, org, job["id"].as_str().unwrap().to_owned()));
    }
    for (code, org, job_id) in &jobs {
        let r = tap.result(job_id, Duration::from_secs(60)).await;
        let integration = app.db.store.integration(org).await.unwrap().unwrap();
        if let Some((_, words)) = organization_conditions.iter().find(|(c, _)| c == code) {
            assert_eq!(r["error"]["code"], "auth_revoked", "{code}: {r}");
            assert_eq!(
                r["error"]["provider_code"],
                format!("AADSTS{code}"),
                "{code}: {r}"
            );
            assert_eq!(integration.status, IntegrationStatus::NeedsReauth, "{code}");
            let reason = integration.last_error.unwrap_or_default();
            assert!(
                reason.contains(words),
                "{code}: the admin is told the cause: {reason}"
            );
            let event = tap
                .wait_for(WAIT, |s| {
                    s.routing_key == "integration.needs_reauth" && s.body["organization_id"] == *org
                })
                .await;
            assert!(event.is_some(), "{code}: event published");
        } else {
            assert_eq!(r["error"]["code"], "provider_unavailable", "{code}: {r}");
            assert_eq!(r["attempts"], 2, "{code}: retried within the job's budget");
            assert_eq!(
                integration.status,
                IntegrationStatus::Active,
                "{code}: the operator's secret is not the organization's problem"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_fallback_the_job_that_finds_the_grant_dead_goes_out_through_the_platform_sender()
{
    let app = TestApp::spawn().await;
    let (access, refresh) = app.standins.issue(Vendor::Microsoft, "admin@customer.com");
    app.store_grant(
        "org_ms",
        Vendor::Microsoft,
        "admin@customer.com",
        &access,
        &refresh,
        chrono::Utc::now() - chrono::Duration::minutes(1),
    )
    .await;
    app.db
        .store
        .save_sender(
            "org_ms",
            "admin@customer.com",
            Some("Customer Compliance"),
            Fallback::PlatformSender,
        )
        .await
        .unwrap();
    app.db
        .store
        .record_test("org_ms", &json!({"status": "sent"}), true)
        .await
        .unwrap();
    app.standins.revoke_account("admin@customer.com");
    let mut tap = app.amqp.tap_results().await;
    let job = app.job("org_ms");
    app.amqp.publish_job(&job).await;
    let r = tap.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["status"], "sent", "{r:#}");
    assert_eq!(r["provider"], "default");
    assert_eq!(r["fallback"], true);
    assert_eq!(r["sender"]["name"], "Customer Compliance");
    crate::support::assert_valid_result(&r);
    let event = tap
        .wait_for(WAIT, |s| s.routing_key == "integration.needs_reauth")
        .await;
    assert!(event.is_some(), "the host application is told");
    let files = app.outbox_files();
    assert_eq!(files.len(), 1, "sent by the platform sender");
    let eml = std::fs::read_to_string(&files[0]).unwrap();
    assert!(eml.contains("Reply-To:"), "{eml}");
    assert!(eml.contains("admin@customer.com"));
    assert_eq!(app.standins.graph_messages().len(), 0);
}
