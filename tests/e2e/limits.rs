//! The providers' sending limits, counted as they count them: over a rolling
//! 24 hours (shortened here through `MAIL_DISPATCH_LIMIT_WINDOW_SECS`), with
//! Google's recipients and consumer accounts, and an organization's own share.
//! The stand-ins enforce the same limits (Gmail answers 429 and suspends the
//! user; Exchange accepts and bounces), so overshooting shows as refusals there.

use std::time::Duration;

use mail_dispatch_test_support::standins::{SendingQuota, Vendor};
use mail_dispatch_test_support::{TestApp, TestAppOptions};
use mail_dispatch_worker::pacing::PacingConfig;
use serde_json::{Value, json};

fn options(pacing: PacingConfig) -> TestAppOptions {
    TestAppOptions {
        pacing,
        ..Default::default()
    }
}

fn permissive() -> PacingConfig {
    TestAppOptions::default().pacing
}

/// `n` jobs of `org` that may wait `budget` at most.
fn jobs(app: &TestApp, org: &str, n: usize, budget: chrono::Duration) -> Vec<Value> {
    let not_after = chrono::Utc::now() + budget;
    (0..n)
        .map(|_| {
            let mut j = app.job(org);
            j["not_after"] = json!(not_after.to_rfc3339());
            j
        })
        .collect()
}

/// Publishes `jobs` and returns how many were sent and how many failed
/// `quota_exceeded` (never offered to the provider).
async fn run(app: &TestApp, jobs: &[Value]) -> (usize, usize) {
    let mut tap = app.amqp.tap_results().await;
    for job in jobs {
        app.amqp.publish_job(job).await;
    }
    let (mut sent, mut over) = (0, 0);
    for job in jobs {
        let r = tap
            .result(job["id"].as_str().unwrap(), Duration::from_secs(60))
            .await;
        match r["status"].as_str() {
            Some("sent") => sent += 1,
            _ => {
                assert_eq!(r["error"]["code"], "quota_exceeded", "{r:#}");
                assert_eq!(r["attempts"], 0, "never offered to the provider");
                over += 1;
            }
        }
    }
    (sent, over)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_that_reaches_the_rolling_limit_is_deferred_then_sent_when_the_window_moves() {
    let window = Duration::from_secs(6);
    let app = TestApp::spawn_with(options(PacingConfig {
        google_daily_messages: 3,
        window,
        ..permissive()
    }))
    .await;
    app.connect_mailbox("org_g", Vendor::Google, "g@customer.com", "G")
        .await;
    app.standins.set_sending_quota(
        "g@customer.com",
        Some(SendingQuota {
            messages: Some(3),
            ..SendingQuota::google_workspace(window)
        }),
    );
    let burst = jobs(&app, "org_g", 6, chrono::Duration::seconds(60));
    let (sent, over) = run(&app, &burst).await;
    assert_eq!(
        (sent, over),
        (6, 0),
        "all sent once the window allowed them"
    );
    assert_eq!(
        app.standins.quota_refusals("g@customer.com"),
        0,
        "Gmail never refused (nor suspended) the user"
    );
    let mut at: Vec<_> = app
        .standins
        .received()
        .iter()
        .map(|r| r.received_at)
        .collect();
    at.sort();
    assert_eq!(at.len(), 6);
    let waited = (at[3] - at[0]).to_std().unwrap();
    assert!(
        waited >= window,
        "the 4th went out when the 1st left the window, not before: {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_organizations_lowered_share_of_the_limit_is_honoured() {
    let app = TestApp::spawn_with(options(PacingConfig {
        microsoft_daily_recipients: 10,
        window: Duration::from_secs(3600),
        ..permissive()
    }))
    .await;
    app.connect_mailbox("org_ms", Vendor::Microsoft, "ops@customer.com", "Ops")
        .await;
    // The people of the organization send from that mailbox too: it keeps 60 %
    // of the 10 recipients for them, and Exchange bounces past what is left.
    app.db
        .store
        .save_sending_budget("org_ms", Some(40), None)
        .await
        .unwrap()
        .unwrap();
    app.standins.set_sending_quota(
        "ops@customer.com",
        Some(SendingQuota {
            recipients: Some(4),
            ..SendingQuota::exchange_online(Duration::from_secs(3600))
        }),
    );
    let burst = jobs(&app, "org_ms", 7, chrono::Duration::seconds(4));
    let (sent, over) = run(&app, &burst).await;
    assert_eq!((sent, over), (4, 3));
    assert!(app.standins.bounced().is_empty(), "no NDR: nothing bounced");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_google_account_gets_the_lower_limit() {
    let app = TestApp::spawn_with(options(PacingConfig {
        google_daily_messages: 1_000,
        google_consumer_daily_messages: 2,
        window: Duration::from_secs(3600),
        ..permissive()
    }))
    .await;
    // A gmail.com account: Google's id token carries no `hd`.
    app.connect_mailbox("org_g", Vendor::Google, "someone@gmail.com", "Someone")
        .await;
    app.standins.set_sending_quota(
        "someone@gmail.com",
        Some(SendingQuota {
            messages: Some(2),
            ..SendingQuota::google_trial(Duration::from_secs(3600))
        }),
    );
    let i = app.db.store.integration("org_g").await.unwrap();
    let view = mail_dispatch_admin::integration_view("org_g", i.as_ref());
    assert_eq!(view.google_account.as_deref(), Some("consumer"));
    let burst = jobs(&app, "org_g", 4, chrono::Duration::seconds(4));
    let (sent, over) = run(&app, &burst).await;
    assert_eq!((sent, over), (2, 2));
    assert_eq!(app.standins.quota_refusals("someone@gmail.com"), 0);
}

/// Nothing Google gives us tells a trial Workspace account from a paid one (both
/// have `hd`): the organization says so in its sender settings, and Google's
/// trial limits apply to its mailbox from then on.
#[tokio::test(flavor = "multi_thread")]
async fn a_workspace_trial_declared_by_its_organization_gets_the_trial_limits() {
    let app = TestApp::spawn_with(options(PacingConfig {
        google_daily_messages: 1_000,
        google_trial_daily_messages: 2,
        window: Duration::from_secs(3600),
        ..permissive()
    }))
    .await;
    let account = "ops@customer.com";
    app.connect_mailbox("org_g", Vendor::Google, account, "Ops")
        .await;
    // Google's trial: the save-and-test message below counts too.
    app.standins.set_sending_quota(
        account,
        Some(SendingQuota {
            messages: Some(3),
            ..SendingQuota::google_trial(Duration::from_secs(3600))
        }),
    );
    let api = crate::admin::Api::new(&app);
    let before = api.integration("org_g").await;
    assert_eq!(before["google_account"], "workspace", "{before:#}");
    let outcome = api
        .save_sender_ok(
            "org_g",
            json!({"email": account, "name": "Ops", "google_trial": true}),
        )
        .await;
    assert_eq!(outcome["status"], "sent", "{outcome:#}");
    assert_eq!(outcome["integration"]["google_account"], "trial");

    let burst = jobs(&app, "org_g", 4, chrono::Duration::seconds(4));
    let (sent, over) = run(&app, &burst).await;
    assert_eq!((sent, over), (2, 2));
    assert_eq!(
        app.standins.quota_refusals(account),
        0,
        "Google refused nothing"
    );
}

/// `google_trial` means something for a Google Workspace account only.
#[tokio::test(flavor = "multi_thread")]
async fn google_trial_is_refused_where_it_means_nothing() {
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_ms", Vendor::Microsoft, "a@customer.com", "A")
        .await;
    app.connect_mailbox("org_c", Vendor::Google, "someone@gmail.com", "S")
        .await;
    let api = crate::admin::Api::new(&app);
    for (org, account, says) in [
        ("org_ms", "a@customer.com", "Google Workspace accounts only"),
        ("org_c", "someone@gmail.com", "consumer Google account"),
    ] {
        let (status, body) = api
            .save_sender(org, json!({"email": account, "google_trial": true}))
            .await;
        assert_eq!(
            status,
            reqwest::StatusCode::UNPROCESSABLE_ENTITY,
            "{body:#}"
        );
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{body:#}"
        );
    }
    assert_eq!(api.integration("org_c").await["google_account"], "consumer");
}

/// Google's 3,000 unique recipients per day hold whatever the other limits:
/// a mailbox that writes to new people all day is held at that number of
/// recipients (each counted, repeated or not: never fewer than Google), where
/// Google would otherwise suspend the user.
#[tokio::test(flavor = "multi_thread")]
async fn google_unique_recipients_are_never_exceeded() {
    let app = TestApp::spawn_with(options(PacingConfig {
        google_daily_messages: 1_000,
        google_daily_recipients: 1_000,
        google_daily_unique_recipients: 3,
        window: Duration::from_secs(3600),
        ..permissive()
    }))
    .await;
    let account = "ops@customer.com";
    app.connect_mailbox("org_g", Vendor::Google, account, "Ops")
        .await;
    app.standins.set_sending_quota(
        account,
        Some(SendingQuota {
            unique_recipients: Some(3),
            ..SendingQuota::google_workspace(Duration::from_secs(3600))
        }),
    );
    // Five jobs, each to a new colleague (internal: only the unique limit holds).
    let mut burst = jobs(&app, "org_g", 5, chrono::Duration::seconds(4));
    for (i, job) in burst.iter_mut().enumerate() {
        job["to"] = json!([{"email": format!("colleague{i}@customer.com")}]);
    }
    let (sent, over) = run(&app, &burst).await;
    assert_eq!((sent, over), (3, 2));
    assert_eq!(
        app.standins.quota_refusals(account),
        0,
        "Google refused nothing"
    );
}
