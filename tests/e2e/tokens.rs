//! Access tokens: refreshed once, rotated refresh tokens stored, revoked grants reported.

use std::time::Duration;

use mail_dispatch_store::IntegrationStatus;
use mail_dispatch_test_support::TestApp;
use mail_dispatch_test_support::standins::Vendor;
use secrecy::ExposeSecret as _;

use crate::support::{WAIT, assert_valid_result};

/// Stores a grant whose access token expired an hour ago (and that the provider no longer accepts).
async fn expired_grant(
    app: &TestApp,
    org: &str,
    vendor: Vendor,
    account: &str,
) -> (String, String) {
    let (access, refresh) = app.standins.issue(vendor, account);
    app.standins.invalidate_access(&access);
    app.store_grant(
        org,
        vendor,
        account,
        &access,
        &refresh,
        chrono::Utc::now() - chrono::Duration::hours(1),
    )
    .await;
    let store = &app.db.store;
    store
        .save_sender(
            org,
            account,
            Some("Sender"),
            mail_dispatch_store::Fallback::None,
        )
        .await
        .unwrap();
    store
        .record_test(org, &serde_json::json!({"status": "sent"}), true)
        .await
        .unwrap();
    (access, refresh)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_is_refreshed_once_for_fifty_jobs_in_flight() {
    let app = TestApp::spawn_with(mail_dispatch_test_support::TestAppOptions {
        concurrency: 64,
        ..Default::default()
    })
    .await;
    let (_, original_refresh) =
        expired_grant(&app, "org_ms", Vendor::Microsoft, "admin@customer.com").await;
    // A slow token endpoint widens the window in which 50 jobs want a token.
    app.standins.set_token_delay(Duration::from_millis(500));
    let mut results = app.amqp.tap_results().await;
    for _ in 0..50 {
        app.amqp.publish_job(&app.job("org_ms")).await;
    }
    for r in results.results(50, WAIT).await {
        assert_eq!(r["status"], "sent", "{r:#}");
    }
    let refreshes = app.standins.refreshes(Vendor::Microsoft);
    assert_eq!(refreshes.len(), 1, "one refresh for 50 jobs");
    let grant = &refreshes[0];
    assert_eq!(grant["refresh_token"], original_refresh);
    assert_eq!(grant["client_id"], "ms-client-id");
    assert!(
        grant["scope"].contains("offline_access"),
        "Microsoft refreshes carry the scopes"
    );
    assert_eq!(app.standins.graph_messages().len(), 50);
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_share_one_refresh_through_postgresql() {
    let app = TestApp::spawn().await;
    let second = app.start_worker().await;
    expired_grant(&app, "org_g", Vendor::Google, "ops@customer.com").await;
    app.standins.set_token_delay(Duration::from_millis(500));
    let mut results = app.amqp.tap_results().await;
    for _ in 0..30 {
        app.amqp.publish_job(&app.job("org_g")).await;
    }
    for r in results.results(30, WAIT).await {
        assert_eq!(r["status"], "sent", "{r:#}");
    }
    assert_eq!(
        app.standins.refreshes(Vendor::Google).len(),
        1,
        "one refresh across two replicas"
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn microsofts_rotated_refresh_token_replaces_the_stored_one() {
    let app = TestApp::spawn().await;
    let (_, original) =
        expired_grant(&app, "org_ms", Vendor::Microsoft, "admin@customer.com").await;
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_ms");
    app.amqp.publish_job(&job).await;
    assert_eq!(
        results.result(job["id"].as_str().unwrap(), WAIT).await["status"],
        "sent"
    );

    let stored = app
        .db
        .store
        .stored_tokens("org_ms")
        .await
        .unwrap()
        .and_then(|t| t.refresh_token)
        .expect("a refresh token is stored");
    assert_ne!(
        stored.expose_secret(),
        original,
        "the rotated refresh token must be stored"
    );
    assert!(stored.expose_secret().starts_with("ms-rt-"));
    // And it is the one the provider just issued: a later refresh uses it.
    app.standins.invalidate_access(
        app.db
            .store
            .access_token("org_ms")
            .await
            .unwrap()
            .unwrap()
            .0
            .expose_secret(),
    );
    let job = app.job("org_ms");
    app.amqp.publish_job(&job).await;
    assert_eq!(
        results.result(job["id"].as_str().unwrap(), WAIT).await["status"],
        "sent"
    );
    let refreshes = app.standins.refreshes(Vendor::Microsoft);
    assert_eq!(refreshes.len(), 2);
    assert_eq!(refreshes[1]["refresh_token"], stored.expose_secret());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_access_token_is_refreshed_once_and_the_message_resent() {
    let app = TestApp::spawn().await;
    let (access, _) = app
        .connect(
            "org_g",
            Vendor::Google,
            "ops@customer.com",
            "ops@customer.com",
            "Ops",
        )
        .await;
    // Not expired by the clock, but the provider says 401 (revoked access token).
    app.standins.invalidate_access(&access);
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_g");
    app.amqp.publish_job(&job).await;
    let result = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(result["status"], "sent", "{result:#}");
    assert_eq!(app.standins.refreshes(Vendor::Google).len(), 1);
    assert_eq!(
        app.standins.send_attempts(Vendor::Google),
        2,
        "one 401, one accepted send"
    );
    assert_eq!(app.standins.gmail_messages().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_grant_fails_jobs_with_auth_revoked_marks_needs_reauth_and_publishes_one_event() {
    let app = TestApp::spawn().await;
    expired_grant(&app, "org_ms", Vendor::Microsoft, "admin@customer.com").await;
    app.standins.revoke_account("admin@customer.com");
    let mut results = app.amqp.tap_results().await;
    let jobs: Vec<_> = (0..5).map(|_| app.job("org_ms")).collect();
    for job in &jobs {
        app.amqp.publish_job(job).await;
    }
    for job in &jobs {
        let r = results.result(job["id"].as_str().unwrap(), WAIT).await;
        assert_valid_result(&r);
        assert_eq!(r["status"], "failed");
        assert_eq!(r["error"]["code"], "auth_revoked", "{r:#}");
        assert_eq!(r["provider"], "microsoft");
    }
    let integration = app.db.store.integration("org_ms").await.unwrap().unwrap();
    assert_eq!(integration.status, IntegrationStatus::NeedsReauth);
    let reason = integration.last_error.unwrap();
    assert!(
        reason.contains("AADSTS70008") && reason.contains("reconnect"),
        "the cause and what to do: {reason}"
    );

    let seen = results.settle(Duration::from_millis(500)).await;
    let events: Vec<_> = seen
        .iter()
        .filter(|s| s.routing_key == "integration.needs_reauth")
        .collect();
    assert_eq!(events.len(), 1, "one event, not one per job");
    let e = &events[0].body;
    assert_eq!(e["event"], "integration.needs_reauth");
    assert_eq!(e["organization_id"], "org_ms");
    assert_eq!(e["provider"], "microsoft");
    assert!(e["reason"].as_str().unwrap().contains("AADSTS70008"));
    assert_eq!(
        app.standins.refreshes(Vendor::Microsoft).len(),
        1,
        "later jobs do not ask the provider again"
    );
    assert_eq!(app.standins.graph_messages().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_platform_fallback_a_revoked_organization_goes_out_from_the_platform_sender() {
    let app = TestApp::spawn().await;
    expired_grant(
        &app,
        "org_ms",
        Vendor::Microsoft,
        "notifications@customer.com",
    )
    .await;
    app.db
        .store
        .save_sender(
            "org_ms",
            "notifications@customer.com",
            Some("Compliance Team"),
            mail_dispatch_store::Fallback::PlatformSender,
        )
        .await
        .unwrap();
    app.standins.revoke_account("notifications@customer.com");
    let mut results = app.amqp.tap_results().await;
    // The job that discovers the refusal and the ones after it all go out.
    for _ in 0..2 {
        let job = app.job("org_ms");
        app.amqp.publish_job(&job).await;
        let r = results.result(job["id"].as_str().unwrap(), WAIT).await;
        assert_valid_result(&r);
        assert_eq!(r["status"], "sent", "{r:#}");
        assert_eq!(r["provider"], "default");
        assert_eq!(r["fallback"], true);
        assert_eq!(r["sender"]["name"], "Compliance Team");
    }
    let files = app.outbox_files();
    let raw = std::fs::read(&files[0]).unwrap();
    let msg = mail_parser::MessageParser::default().parse(&raw).unwrap();
    assert_eq!(
        msg.from().unwrap().first().unwrap().name(),
        Some("Compliance Team")
    );
    assert_eq!(
        msg.reply_to().unwrap().first().unwrap().address(),
        Some("notifications@customer.com")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_never_appear_in_plaintext_in_the_database() {
    let app = TestApp::spawn().await;
    let (old_access, old_refresh) =
        expired_grant(&app, "org_ms", Vendor::Microsoft, "admin@customer.com").await;
    let (g_access, g_refresh) = app
        .connect(
            "org_g",
            Vendor::Google,
            "ops@customer.com",
            "ops@customer.com",
            "Ops",
        )
        .await;
    let mut results = app.amqp.tap_results().await;
    let job = app.job("org_ms");
    app.amqp.publish_job(&job).await;
    assert_eq!(
        results.result(job["id"].as_str().unwrap(), WAIT).await["status"],
        "sent"
    );
    let new_access = app
        .db
        .store
        .access_token("org_ms")
        .await
        .unwrap()
        .unwrap()
        .0
        .expose_secret()
        .to_owned();
    let secrets = [old_access, old_refresh, g_access, g_refresh, new_access];

    let client = app.db.client().await;
    let tables: Vec<String> = client
        .query(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.contains(&"integrations".to_owned()));
    for table in tables {
        let rows = client
            .query(&format!("SELECT row_to_json(t)::text FROM {table} t"), &[])
            .await
            .unwrap();
        for row in rows {
            let text: String = row.get(0);
            for secret in &secrets {
                let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
                assert!(
                    !text.contains(secret.as_str()),
                    "{table} holds a token in plaintext"
                );
                assert!(
                    !text.contains(&hex),
                    "{table} holds a token as hex-encoded plaintext"
                );
            }
        }
    }
}

/// Graph refusing a fresh token a second time does not prove the grant dead:
/// one more refresh decides. If the provider grants it, the grant is kept and
/// the job is tried again; if it refuses, the integration needs reauthorization.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_401_after_a_refresh_is_confirmed_by_one_more_refresh_before_the_grant_is_dropped()
{
    let app = TestApp::spawn().await;
    for org in ["org_ok", "org_dead"] {
        let account = format!("admin@{org}.example");
        app.connect(org, Vendor::Microsoft, &account, &account, "Admin")
            .await;
    }
    let unauthorized = || {
        wiremock::ResponseTemplate::new(401).set_body_json(serde_json::json!({"error": {
            "code": "InvalidAuthenticationToken", "message": "Access token validation failure. Invalid audience.",
            "innerError": {"date": "2026-11-28T10:15:03", "request-id": "r", "client-request-id": "c"}}}))
    };
    let mut results = app.amqp.tap_results().await;

    // The grant still refreshes: kept, and the job goes out on a later attempt.
    app.standins
        .script(Vendor::Microsoft, [unauthorized(), unauthorized()]);
    let job = app.job("org_ok");
    app.amqp.publish_job(&job).await;
    let r = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["status"], "sent", "{r:#}");
    assert_eq!(
        app.standins.refreshes(Vendor::Microsoft).len(),
        2,
        "one refresh after each 401, not a loop"
    );
    let integration = app.db.store.integration("org_ok").await.unwrap().unwrap();
    assert_eq!(integration.status, IntegrationStatus::Active);

    // The confirming refresh is refused: the grant is dead. Token answers are
    // slowed so that the grant can be revoked between the two refreshes.
    app.standins.set_token_delay(Duration::from_millis(300));
    app.standins
        .script(Vendor::Microsoft, [unauthorized(), unauthorized()]);
    let job = app.job("org_dead");
    app.amqp.publish_job(&job).await;
    // The first refresh succeeds; the provider refuses the one that confirms.
    let deadline = std::time::Instant::now() + WAIT;
    while app.standins.refreshes(Vendor::Microsoft).len() < 3 {
        assert!(std::time::Instant::now() < deadline, "no refresh");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    app.standins.revoke_account("admin@org_dead.example");
    let r = results.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_eq!(r["error"]["code"], "auth_revoked", "{r:#}");
    let integration = app.db.store.integration("org_dead").await.unwrap().unwrap();
    assert_eq!(integration.status, IntegrationStatus::NeedsReauth);
    let event = results
        .wait_for(WAIT, |s| {
            s.routing_key == "integration.needs_reauth" && s.body["organization_id"] == "org_dead"
        })
        .await
        .expect("needs_reauth event");
    assert_eq!(event.body["organization_id"], "org_dead");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_cache_is_bounded_and_keeps_no_refresh_lock_behind() {
    let app = TestApp::spawn().await;
    let endpoints = app.endpoints();
    let service = mail_dispatch_providers::TokenService::new(
        mail_dispatch_providers::oauth_http_client(Duration::from_secs(5)),
        endpoints.microsoft.as_ref(),
        endpoints.google.as_ref(),
    );
    let tokens =
        mail_dispatch_worker::Tokens::new(app.db.store.clone(), service, Duration::from_secs(120))
            .with_max_entries(4);
    let mut issued = Vec::new();
    for i in 0..10 {
        let org = format!("org_{i}");
        let account = format!("user{i}@customer.com");
        let (access, refresh) = app.standins.issue(Vendor::Google, &account);
        let expires = chrono::Utc::now() + chrono::Duration::minutes(60 + i);
        app.store_grant(&org, Vendor::Google, &account, &access, &refresh, expires)
            .await;
        issued.push((org, access));
    }
    for (org, access) in &issued {
        let token = tokens
            .access_token(org, mail_dispatch_domain::ProviderKind::Google, None)
            .await
            .unwrap();
        assert_eq!(token.expose_secret(), access);
    }
    let (cached, locks) = tokens.entries();
    assert!(cached <= 4, "{cached} tokens cached, bound 4");
    assert!(cached >= 1);
    assert_eq!(locks, 0, "refresh locks are dropped once nobody waits");
    // The last one read is still served from memory; an evicted one is read again.
    let reads = |t: &TestApp| t.db.store.counts().snapshot()[1];
    let before = reads(&app);
    let (last_org, last_access) = issued.last().unwrap();
    let token = tokens
        .access_token(last_org, mail_dispatch_domain::ProviderKind::Google, None)
        .await
        .unwrap();
    assert_eq!(token.expose_secret(), last_access);
    assert_eq!(reads(&app), before, "cached token read from memory");
    let (first_org, first_access) = &issued[0];
    let token = tokens
        .access_token(first_org, mail_dispatch_domain::ProviderKind::Google, None)
        .await
        .unwrap();
    assert_eq!(token.expose_secret(), first_access);
    assert_eq!(
        reads(&app),
        before + 1,
        "evicted token read from PostgreSQL again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_token_endpoint_for_twenty_organizations_holds_no_connection_and_other_mail_keeps_flowing()
 {
    const TOKEN_DELAY: Duration = Duration::from_secs(25);
    let app = TestApp::spawn_with(mail_dispatch_test_support::TestAppOptions {
        concurrency: 64,
        // The endpoint is slow, not dead: its answers arrive within the HTTP timeout.
        http_timeout: TOKEN_DELAY + Duration::from_secs(5),
        ..Default::default()
    })
    .await;
    let slow_orgs: Vec<String> = (0..20).map(|n| format!("org_slow_{n:02}")).collect();
    for (n, org) in slow_orgs.iter().enumerate() {
        expired_grant(
            &app,
            org,
            Vendor::Microsoft,
            &format!("admin{n}@customer.com"),
        )
        .await;
    }
    app.connect_mailbox("org_google", Vendor::Google, "ops@other.com", "Ops")
        .await;
    app.standins.set_token_delay(TOKEN_DELAY);
    let mut results = app.amqp.tap_results().await;
    let slow_jobs: Vec<_> = slow_orgs.iter().map(|org| app.job(org)).collect();
    for job in &slow_jobs {
        app.amqp.publish_job(job).await;
    }
    // At least as many refreshes as the main pool has connections.
    let deadline = std::time::Instant::now() + WAIT;
    while app.standins.refreshes(Vendor::Microsoft).len() < 16 {
        assert!(
            std::time::Instant::now() < deadline,
            "the refreshes did not all start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Twenty refreshes wait on the token endpoint. Meanwhile no session sits in a
    // transaction, and mail of other organizations (the platform sender's, and
    // a Google organization with a valid token) goes out at once.
    let client = app.db.client().await;
    let in_transaction: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND state LIKE 'idle in transaction%'",
            &[&app.db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        in_transaction, 0,
        "no connection is held across the HTTP call"
    );
    let started = std::time::Instant::now();
    let others: Vec<_> = (0..10)
        .flat_map(|_| [app.job("org_platform"), app.job("org_google")])
        .collect();
    for job in &others {
        app.amqp.publish_job(job).await;
    }
    for job in &others {
        let left = Duration::from_secs(5).saturating_sub(started.elapsed());
        let r = results.result(job["id"].as_str().unwrap(), left).await;
        assert_eq!(r["status"], "sent", "{r:#}");
    }
    assert!(
        results
            .settle(Duration::from_millis(10))
            .await
            .iter()
            .filter(|s| s.routing_key.starts_with("result."))
            .count()
            == others.len(),
        "the slow refreshes are still under way"
    );

    // And the slow ones get their tokens, with one refresh each.
    for job in &slow_jobs {
        let r = results
            .result(job["id"].as_str().unwrap(), TOKEN_DELAY + WAIT)
            .await;
        assert_eq!(r["status"], "sent", "{r:#}");
    }
    assert_eq!(
        app.standins.refreshes(Vendor::Microsoft).len(),
        slow_orgs.len(),
        "one refresh per organization"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_undecryptable_stored_token_turns_the_integration_needs_reauth_with_one_event() {
    let app = TestApp::spawn().await;
    app.connect_mailbox("org_bad", Vendor::Google, "ops@customer.com", "Ops")
        .await;
    // One bit flipped in the last byte of each ciphertext: AES-GCM refuses them.
    let client = app.db.client().await;
    client
        .execute(
            "UPDATE integrations SET
                 access_token = set_byte(access_token, length(access_token) - 1,
                                         get_byte(access_token, length(access_token) - 1) # 1),
                 refresh_token = set_byte(refresh_token, length(refresh_token) - 1,
                                          get_byte(refresh_token, length(refresh_token) - 1) # 1)
             WHERE organization_id = 'org_bad'",
            &[],
        )
        .await
        .unwrap();
    let mut tap = app.amqp.tap_results().await;
    let job = app.job("org_bad");
    app.amqp.publish_job(&job).await;
    let r = tap.result(job["id"].as_str().unwrap(), WAIT).await;
    assert_valid_result(&r);
    assert_eq!(r["status"], "failed", "{r:#}");
    assert_eq!(r["error"]["code"], "auth_revoked", "{r:#}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("the stored token cannot be decrypted: ")
            && message.ends_with("; reconnect"),
        "{message}"
    );
    // Later jobs fail at once too, and announce nothing more.
    let later: Vec<_> = (0..2).map(|_| app.job("org_bad")).collect();
    for job in &later {
        app.amqp.publish_job(job).await;
    }
    for job in &later {
        let r = tap.result(job["id"].as_str().unwrap(), WAIT).await;
        assert_eq!(r["error"]["code"], "auth_revoked", "{r:#}");
    }
    let integration = app.db.store.integration("org_bad").await.unwrap().unwrap();
    assert_eq!(integration.status, IntegrationStatus::NeedsReauth);
    assert!(
        integration
            .last_error
            .unwrap()
            .starts_with("the stored token cannot be decrypted: ")
    );
    let events: Vec<_> = tap
        .settle(Duration::from_millis(500))
        .await
        .iter()
        .filter(|s| s.routing_key == "integration.needs_reauth")
        .map(|s| s.body.clone())
        .collect();
    assert_eq!(events.len(), 1, "one event: {events:#?}");
    assert_eq!(events[0]["organization_id"], "org_bad");
    assert_eq!(app.standins.gmail_messages().len(), 0, "nothing sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_under_a_key_that_is_not_configured_blocks_its_jobs_within_their_budget_only() {
    let max_age = Duration::from_secs(8);
    let app = TestApp::spawn_with(mail_dispatch_test_support::TestAppOptions {
        max_age,
        ..Default::default()
    })
    .await;
    app.connect_mailbox("org_key", Vendor::Google, "ops@customer.com", "Ops")
        .await;
    // Another key id in the stored form (after its length byte): a key this
    // deployment does not have, as after a key was removed too early.
    let client = app.db.client().await;
    client
        .execute(
            "UPDATE integrations SET
                 access_token = overlay(access_token PLACING convert_to('0123456789abcdef', 'UTF8') FROM 2 FOR 16),
                 refresh_token = overlay(refresh_token PLACING convert_to('0123456789abcdef', 'UTF8') FROM 2 FOR 16)
             WHERE organization_id = 'org_key'",
            &[],
        )
        .await
        .unwrap();
    let mut tap = app.amqp.tap_results().await;
    let job = app.job("org_key");
    let published = std::time::Instant::now();
    app.amqp.publish_job(&job).await;
    let r = tap
        .result(job["id"].as_str().unwrap(), max_age + WAIT)
        .await;
    // Delayed in 5 s steps until the next one would end past the budget.
    assert!(
        published.elapsed() >= max_age - Duration::from_secs(5),
        "retried while the key may come back: {:?}",
        published.elapsed()
    );
    assert_valid_result(&r);
    assert_eq!(r["status"], "failed", "{r:#}");
    // Past its maximum age, as any job the provider could not take in time.
    assert_eq!(r["error"]["code"], "provider_unavailable", "{r:#}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(message.contains("0123456789abcdef"), "{message}");
    let dead = app.amqp.drain(&app.amqp.topology.dead_queue).await;
    assert_eq!(
        dead.len(),
        1,
        "dead-lettered, to replay once the key is back"
    );
    // The grant is not thrown away: putting the key back is enough.
    let integration = app.db.store.integration("org_key").await.unwrap().unwrap();
    assert_eq!(integration.status, IntegrationStatus::Active);
    let refresh: Option<Vec<u8>> = client
        .query_one(
            "SELECT refresh_token FROM integrations WHERE organization_id = 'org_key'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(refresh.is_some());
}
