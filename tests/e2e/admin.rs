//! The connect flow through the admin API, with a client that behaves like the
//! admin's browser (it follows the redirects of the consent pages and callback).

use std::collections::HashMap;
use std::time::Duration;

use mail_dispatch_store::IntegrationStatus;
use mail_dispatch_test_support::standins::{Consent, Vendor};
use mail_dispatch_test_support::{ADMIN_TOKEN, APP_ORIGIN, TestApp, TestAppOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::support::WAIT;

const RETURN_TO: &str = "https://app.example/settings/smtp";

/// The host application's calls to the admin API, and the admin's browser (also
/// used by `connect.rs`).
pub(crate) struct Api<'a> {
    app: &'a TestApp,
    pub(crate) http: reqwest::Client,
}

impl<'a> Api<'a> {
    pub(crate) fn new(app: &'a TestApp) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Api { app, http }
    }

    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_as(Some(ADMIN_TOKEN), method, path, body).await
    }

    pub(crate) async fn call_as(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.app.admin_url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `POST …/authorize`'s whole answer.
    pub(crate) async fn authorize_response(&self, org: &str, provider: &str) -> Value {
        let (status, body) = self
            .call(
                Method::POST,
                &format!("/v1/organizations/{org}/integration/authorize"),
                Some(json!({"provider": provider, "return_to": RETURN_TO})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    pub(crate) async fn authorize(&self, org: &str, provider: &str) -> String {
        self.authorize_response(org, provider).await["authorization_url"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The query the browser comes back to the host application with.
    pub(crate) async fn browse_query(&self, start: &str) -> HashMap<String, String> {
        self.browse(start)
            .await
            .query_pairs()
            .into_owned()
            .collect()
    }

    /// Consent and confirmation: the confirmation's answer.
    pub(crate) async fn connect_confirmed(&self, org: &str, provider: &str) -> Value {
        let back = self.consent(org, provider).await;
        assert_eq!(back["status"], "connected", "{back:?}");
        let (status, body) = self.confirm(org, &back["connection"]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Save and test, which must answer 200.
    pub(crate) async fn save_sender_ok(&self, org: &str, body: Value) -> Value {
        let (status, body) = self.save_sender(org, body).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// The admin's browser: follows redirects until it is sent back to the host application.
    pub(crate) async fn browse(&self, start: &str) -> url::Url {
        let mut url = start.to_owned();
        for _ in 0..5 {
            let resp = self.http.get(&url).send().await.unwrap();
            assert!(
                resp.status().is_redirection(),
                "{url} answered {}: {}",
                resp.status(),
                resp.text().await.unwrap()
            );
            let location = resp.headers()["location"].to_str().unwrap().to_owned();
            if location.starts_with(APP_ORIGIN) {
                return url::Url::parse(&location).unwrap();
            }
            url = location;
        }
        panic!("too many redirects");
    }

    /// The consent, as far as the browser's return to the host application.
    pub(crate) async fn consent(&self, org: &str, provider: &str) -> HashMap<String, String> {
        let url = self.authorize(org, provider).await;
        let back = self.browse(&url).await;
        assert_eq!(back.path(), "/settings/smtp");
        back.query_pairs().into_owned().collect()
    }

    /// The host application confirms a consent in the admin's session.
    pub(crate) async fn confirm(&self, org: &str, connection: &str) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            &format!("/v1/organizations/{org}/integration/confirm"),
            Some(json!({"connection": connection})),
        )
        .await
    }

    /// The whole connect flow: consent, then the host application's confirmation.
    /// Returns the browser's return parameters, `status` replaced by the confirmation's.
    pub(crate) async fn connect(&self, org: &str, provider: &str) -> HashMap<String, String> {
        let mut params = self.consent(org, provider).await;
        if let Some(connection) = params.get("connection").cloned() {
            let (status, body) = self.confirm(org, &connection).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            params.insert("status".into(), body["status"].as_str().unwrap().into());
            if let Some(code) = body["test"]["error"]["code"].as_str() {
                params.insert("error".into(), code.into());
            }
        }
        params
    }

    pub(crate) async fn save_sender(&self, org: &str, body: Value) -> (StatusCode, Value) {
        self.call(
            Method::PUT,
            &format!("/v1/organizations/{org}/integration/sender"),
            Some(body),
        )
        .await
    }

    pub(crate) async fn integration(&self, org: &str) -> Value {
        let (status, body) = self
            .call(
                Method::GET,
                &format!("/v1/organizations/{org}/integration"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }
}

async fn provider_of_job(
    app: &TestApp,
    tap: &mut mail_dispatch_test_support::ResultsTap,
    org: &str,
) -> Value {
    let job = app.job(org);
    app.amqp.publish_job(&job).await;
    tap.result(job["id"].as_str().unwrap(), WAIT).await
}

/// Polls until the organization's jobs use `provider` (configuration reaches workers by NOTIFY).
pub(crate) async fn eventually_provider(
    app: &TestApp,
    tap: &mut mail_dispatch_test_support::ResultsTap,
    org: &str,
    provider: &str,
) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = provider_of_job(app, tap, org).await;
        if r["provider"] == provider {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {} after 5 s: {r:#}",
            r["provider"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn connecting_microsoft_then_saving_and_testing_the_sender_routes_jobs_through_graph() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("admin@customer.com".into()),
    );
    let mut tap = app.amqp.tap_results().await;

    let url = api.authorize("org_ms", "microsoft").await;
    let consent = url::Url::parse(&url).unwrap();
    let q: HashMap<String, String> = consent.query_pairs().into_owned().collect();
    assert_eq!(consent.path(), "/organizations/oauth2/v2.0/authorize");
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(
        q["redirect_uri"],
        format!("{}/v1/oauth/callback", app.admin_url)
    );
    let scopes: Vec<&str> = q["scope"].split(' ').collect();
    for s in [
        "offline_access",
        "https://graph.microsoft.com/Mail.Send",
        "https://graph.microsoft.com/User.Read",
        "openid",
        "email",
        "profile",
    ] {
        assert!(scopes.contains(&s), "scope {s} requested: {scopes:?}");
    }
    assert!(q["state"].len() >= 43, "a random state");

    let back = api.browse(&url).await;
    let params: HashMap<String, String> = back.query_pairs().into_owned().collect();
    assert_eq!(params["status"], "connected");
    assert_eq!(params["provider"], "microsoft");
    let exchange = &app.standins.code_exchanges(Vendor::Microsoft)[0];
    assert!(
        exchange.contains_key("code_verifier"),
        "the code is exchanged with the PKCE verifier"
    );
    // Not used until the host application confirms it in the admin's session.
    assert_eq!(api.integration("org_ms").await["status"], "not_configured");
    let (status, confirmed) = api.confirm("org_ms", &params["connection"]).await;
    assert_eq!(status, StatusCode::OK, "{confirmed}");
    assert_eq!(confirmed["status"], "connected");
    let (status, again) = api.confirm("org_ms", &params["connection"]).await;
    assert_eq!(
        (status, again["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("connection_used"))
    );

    let view = api.integration("org_ms").await;
    assert_eq!(view["status"], "pending_sender");
    assert_eq!(view["provider"], "microsoft");
    assert_eq!(view["account_email"], "admin@customer.com");
    // Not active yet: still the platform sender.
    assert_eq!(
        provider_of_job(&app, &mut tap, "org_ms").await["provider"],
        "default"
    );

    let (status, outcome) = api
        .save_sender(
            "org_ms",
            json!({"email": "admin@customer.com", "name": "Compliance Team - Customer Inc"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{outcome}");
    assert_eq!(outcome["status"], "sent", "{outcome:#}");
    assert_eq!(outcome["integration"]["status"], "active");
    assert_eq!(
        outcome["integration"]["sender"],
        json!({"email": "admin@customer.com", "name": "Compliance Team - Customer Inc"})
    );
    let test = &app.standins.graph_messages()[0]["message"];
    assert_eq!(
        test["from"]["emailAddress"]["address"],
        "admin@customer.com"
    );
    assert_eq!(
        test["toRecipients"][0]["emailAddress"]["address"], "admin@customer.com",
        "the test goes to the account by default"
    );
    assert!(test["subject"].as_str().unwrap().contains("Microsoft 365"));
    assert!(
        test["body"]["content"]
            .as_str()
            .unwrap()
            .contains("admin@customer.com")
    );

    let r = eventually_provider(&app, &mut tap, "org_ms", "microsoft").await;
    assert_eq!(r["status"], "sent");
    assert_eq!(r["sender"]["email"], "admin@customer.com");
}

#[tokio::test(flavor = "multi_thread")]
async fn connecting_google_then_saving_and_testing_the_sender_routes_jobs_through_gmail() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    app.standins
        .set_consent(Vendor::Google, Consent::Approve("ops@customer.com".into()));
    let mut tap = app.amqp.tap_results().await;
    let params = api.connect("org_g", "google").await;
    assert_eq!(params["status"], "connected");
    let q = &app.standins.authorize_requests(Vendor::Google)[0];
    assert_eq!(q["access_type"], "offline");
    assert_eq!(q["prompt"], "consent");
    assert!(q["scope"].contains("https://www.googleapis.com/auth/gmail.send"));
    assert!(
        !q["scope"].contains("gmail.settings.basic"),
        "alias checks are off: no restricted scope"
    );
    assert_eq!(
        api.integration("org_g").await["account_email"],
        "ops@customer.com",
        "learnt from the id_token"
    );

    let (status, outcome) = api
        .save_sender("org_g", json!({"email": "ops@customer.com", "name": "Équipe Conformité", "test_recipient": "it@customer.com"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(outcome["status"], "sent", "{outcome:#}");
    let raw = app.standins.gmail_messages().pop().unwrap();
    let msg = mail_parser::MessageParser::default().parse(&raw).unwrap();
    assert_eq!(
        msg.to().unwrap().first().unwrap().address(),
        Some("it@customer.com")
    );
    assert_eq!(
        msg.from().unwrap().first().unwrap().name(),
        Some("Équipe Conformité")
    );

    let r = eventually_provider(&app, &mut tap, "org_g", "google").await;
    assert_eq!(r["status"], "sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_test_send_leaves_the_integration_inactive_and_jobs_on_the_platform_sender() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("admin@customer.com".into()),
    );
    api.connect("org_ms", "microsoft").await;
    // The stand-in refuses another mailbox as Graph does: no Mail.Send.Shared, no Send As.
    let (status, outcome) = api
        .save_sender(
            "org_ms",
            json!({"email": "ceo@customer.com", "name": "CEO"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(outcome["status"], "failed");
    assert_eq!(outcome["error"]["code"], "sender_not_allowed");
    assert_eq!(outcome["error"]["provider_code"], "ErrorSendAsDenied");
    assert!(
        outcome["error"]["message"]
            .as_str()
            .unwrap()
            .contains("MAIL_DISPATCH_MICROSOFT_SHARED_MAILBOXES"),
        "the admin learns what is missing: {outcome}"
    );
    assert_eq!(outcome["integration"]["status"], "pending_sender");
    assert!(
        outcome["integration"]["sender"].is_null(),
        "an untested sender is not saved"
    );
    assert_eq!(
        outcome["integration"]["last_test"]["sender"]["email"],
        "ceo@customer.com"
    );
    let mut tap = app.amqp.tap_results().await;
    assert_eq!(
        provider_of_job(&app, &mut tap, "org_ms").await["provider"],
        "default"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gmail_sender_that_is_not_the_account_is_refused_unless_it_is_a_verified_alias() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    app.standins
        .set_consent(Vendor::Google, Consent::Approve("ops@customer.com".into()));
    api.connect("org_g", "google").await;
    let (status, body) = api
        .save_sender("org_g", json!({"email": "ceo@customer.com", "name": "CEO"}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["code"], "sender_not_allowed");
    assert_eq!(app.standins.gmail_messages().len(), 0, "nothing sent");
    assert_eq!(api.integration("org_g").await["status"], "pending_sender");
    let mut tap = app.amqp.tap_results().await;
    assert_eq!(
        provider_of_job(&app, &mut tap, "org_g").await["provider"],
        "default"
    );

    // With alias checks on, a verified alias is accepted.
    let app = TestApp::spawn_with(TestAppOptions {
        google_check_aliases: true,
        ..Default::default()
    })
    .await;
    let api = Api::new(&app);
    app.standins
        .set_consent(Vendor::Google, Consent::Approve("ops@customer.com".into()));
    app.standins
        .set_aliases("ops@customer.com", &["notifications@customer.com"]);
    api.connect("org_g", "google").await;
    let (status, body) = api
        .save_sender(
            "org_g",
            json!({"email": "notifications@customer.com", "name": "N"}),
        )
        .await;
    assert_eq!(
        (status, body["status"].clone()),
        (StatusCode::OK, json!("sent")),
        "{body}"
    );
    let (status, body) = api
        .save_sender("org_g", json!({"email": "ceo@customer.com", "name": "CEO"}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            json!("sender_not_allowed")
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnecting_after_needs_reauth_restores_active() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("admin@customer.com".into()),
    );
    api.connect("org_ms", "microsoft").await;
    let (_, outcome) = api
        .save_sender(
            "org_ms",
            json!({"email": "admin@customer.com", "name": "Admin"}),
        )
        .await;
    assert_eq!(outcome["status"], "sent");
    let mut tap = app.amqp.tap_results().await;
    eventually_provider(&app, &mut tap, "org_ms", "microsoft").await;

    // The customer's tenant revokes the grant.
    app.standins.revoke_account("admin@customer.com");
    let r = provider_of_job(&app, &mut tap, "org_ms").await;
    assert_eq!(r["error"]["code"], "auth_revoked");
    assert_eq!(api.integration("org_ms").await["status"], "needs_reauth");

    // The admin reconnects: the saved sender is tested again and the integration is active.
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("admin@customer.com".into()),
    );
    let sends_before = app.standins.graph_messages().len();
    let params = api.connect("org_ms", "microsoft").await;
    assert_eq!(params["status"], "active", "{params:?}");
    assert_eq!(
        app.standins.graph_messages().len(),
        sends_before + 1,
        "the test ran again"
    );
    let view = api.integration("org_ms").await;
    assert_eq!(view["status"], "active");
    assert_eq!(view["sender"]["email"], "admin@customer.com");
    let r = eventually_provider(&app, &mut tap, "org_ms", "microsoft").await;
    assert_eq!(r["status"], "sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn disconnecting_revokes_the_google_grant_and_returns_the_organization_to_the_platform_sender()
 {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    app.standins
        .set_consent(Vendor::Google, Consent::Approve("ops@customer.com".into()));
    api.connect("org_g", "google").await;
    api.save_sender("org_g", json!({"email": "ops@customer.com", "name": "Ops"}))
        .await;
    let mut tap = app.amqp.tap_results().await;
    eventually_provider(&app, &mut tap, "org_g", "google").await;

    let (status, body) = api
        .call(Method::DELETE, "/v1/organizations/org_g/integration", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"status": "not_configured", "deleted": true, "revoked": true})
    );
    let revoked = app.standins.revocations();
    assert_eq!(revoked.len(), 1);
    assert!(
        revoked[0].starts_with("1//g-rt-"),
        "the refresh token was revoked"
    );
    assert_eq!(api.integration("org_g").await["status"], "not_configured");
    let r = eventually_provider(&app, &mut tap, "org_g", "default").await;
    assert_eq!(r["status"], "sent");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_organization_route_requires_the_bearer_token() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    let routes = [
        (Method::GET, "/v1/organizations/org_1/integration", None),
        (Method::DELETE, "/v1/organizations/org_1/integration", None),
        (
            Method::POST,
            "/v1/organizations/org_1/integration/authorize",
            Some(json!({"provider": "google", "return_to": RETURN_TO})),
        ),
        (
            Method::PUT,
            "/v1/organizations/org_1/integration/sender",
            Some(json!({"email": "a@customer.com"})),
        ),
        (
            Method::POST,
            "/v1/organizations/org_1/integration/confirm",
            Some(json!({"connection": "anything"})),
        ),
    ];
    for (method, path, body) in routes {
        for token in [
            None,
            Some("wrong-token"),
            Some(""),
            Some("test-admin-token-012345678"),
        ] {
            let (status, resp) = api.call_as(token, method.clone(), path, body.clone()).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
            assert_eq!(resp["error"]["code"], "unauthorized");
        }
    }
    assert_eq!(
        app.db.store.oauth_state_count().await.unwrap(),
        0,
        "nothing stored"
    );
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let resp = api
        .http
        .get(format!(
            "{}/v1/organizations/org_1/integration",
            app.admin_url
        ))
        .header("authorization", format!("bearer {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn disconnecting_an_integration_whose_token_cannot_be_decrypted_still_disconnects() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    app.standins
        .set_consent(Vendor::Google, Consent::Approve("ops@customer.com".into()));
    api.connect("org_g", "google").await;
    app.db
        .client()
        .await
        .execute(
            "UPDATE integrations SET refresh_token = '\\x00010203'::bytea WHERE organization_id = 'org_g'",
            &[],
        )
        .await
        .unwrap();
    let (status, body) = api
        .call(Method::DELETE, "/v1/organizations/org_g/integration", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"status": "not_configured", "deleted": true, "revoked": false})
    );
    assert_eq!(api.integration("org_g").await["status"], "not_configured");
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_expired_and_reused_states_are_rejected_with_nothing_stored() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    app.standins
        .set_consent(Vendor::Google, Consent::Approve("ops@customer.com".into()));

    // Forged: nowhere safe to send the browser back to.
    let resp = api
        .http
        .get(format!(
            "{}/v1/oauth/callback?code=abc&state=forged-state",
            app.admin_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(app.db.store.integration("org_g").await.unwrap().is_none());

    // Expired.
    let verifier = secrecy::SecretString::from("v".repeat(43));
    app.db
        .store
        .create_oauth_state(
            "expired-state",
            "org_g",
            mail_dispatch_domain::ProviderKind::Google,
            &verifier,
            RETURN_TO,
            Duration::ZERO,
            mail_dispatch_store::StatePurpose::Connect,
            None,
        )
        .await
        .unwrap();
    let back = api
        .browse(&format!(
            "{}/v1/oauth/callback?code=abc&state=expired-state",
            app.admin_url
        ))
        .await;
    let q: HashMap<String, String> = back.query_pairs().into_owned().collect();
    assert_eq!(
        (q["status"].as_str(), q["error"].as_str()),
        ("error", "state_expired")
    );
    assert!(app.db.store.integration("org_g").await.unwrap().is_none());

    // Reused: the same callback a second time (e.g. replayed from history).
    let consent = api.authorize("org_g", "google").await;
    let resp = api.http.get(&consent).send().await.unwrap();
    let callback = resp.headers()["location"].to_str().unwrap().to_owned();
    let first = api.browse(&callback).await;
    assert!(first.query().unwrap().contains("status=connected"));
    api.call(Method::DELETE, "/v1/organizations/org_g/integration", None)
        .await;
    let again = api.browse(&callback).await;
    let q: HashMap<String, String> = again.query_pairs().into_owned().collect();
    assert_eq!(
        (q["status"].as_str(), q["error"].as_str()),
        ("error", "state_reused")
    );
    assert!(
        app.db.store.integration("org_g").await.unwrap().is_none(),
        "nothing stored by the replay"
    );
    assert_eq!(
        app.standins.code_exchanges(Vendor::Google).len(),
        1,
        "the code was not exchanged again"
    );

    // The provider refused: the browser goes back with the provider's error.
    app.standins.set_consent(Vendor::Google, Consent::Deny);
    let q = api.connect("org_g", "google").await;
    assert_eq!(
        (q["status"].as_str(), q["error"].as_str()),
        ("error", "access_denied")
    );
    assert!(app.db.store.integration("org_g").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn return_to_must_be_on_an_allowed_origin() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    for bad in [
        "https://evil.example/steal",
        "https://app.example.evil.example/settings",
        "http://app.example/settings",
        "https://app.example:8443/settings",
        "javascript:alert(1)",
        "//evil.example",
        "/relative",
    ] {
        let (status, body) = api
            .call(
                Method::POST,
                "/v1/organizations/org_1/integration/authorize",
                Some(json!({"provider": "google", "return_to": bad})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {body}");
        assert!(
            matches!(
                body["error"]["code"].as_str(),
                Some("return_to_not_allowed" | "invalid_request")
            ),
            "{bad}: {body}"
        );
    }
    assert_eq!(app.db.store.oauth_state_count().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_organizations_calls_never_reach_another_organizations_integration() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("admin@a.example".into()),
    );
    api.connect("org_a", "microsoft").await;
    api.save_sender("org_a", json!({"email": "admin@a.example", "name": "A"}))
        .await;

    assert_eq!(api.integration("org_b").await["status"], "not_configured");
    let (status, body) = api
        .save_sender("org_b", json!({"email": "admin@a.example", "name": "B"}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (StatusCode::CONFLICT, json!("not_configured"))
    );
    let (_, body) = api
        .call(Method::DELETE, "/v1/organizations/org_b/integration", None)
        .await;
    assert_eq!(body["deleted"], false);
    assert_eq!(api.integration("org_a").await["status"], "active");

    // A state issued for B completes B's connection, never A's.
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("admin@b.example".into()),
    );
    api.connect("org_b", "microsoft").await;
    assert_eq!(
        api.integration("org_a").await["account_email"],
        "admin@a.example"
    );
    assert_eq!(
        api.integration("org_b").await["account_email"],
        "admin@b.example"
    );
    // And B's jobs do not use A's provider.
    let mut tap = app.amqp.tap_results().await;
    assert_eq!(
        provider_of_job(&app, &mut tap, "org_b").await["provider"],
        "default"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn responses_never_carry_tokens_and_bad_bodies_get_clear_errors() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("admin@customer.com".into()),
    );
    api.connect("org_ms", "microsoft").await;
    let (_, outcome) = api
        .save_sender(
            "org_ms",
            json!({"email": "admin@customer.com", "name": "Admin"}),
        )
        .await;
    let view = api.integration("org_ms").await;
    for body in [outcome.to_string(), view.to_string()] {
        assert!(
            !body.contains("ms-at-") && !body.contains("ms-rt-"),
            "a token in a response: {body}"
        );
    }

    let path = "/v1/organizations/org_ms/integration/sender";
    let url = format!("{}{path}", app.admin_url);
    let big = json!({"email": "a@customer.com", "name": "x".repeat(20_000)});
    let resp = api
        .http
        .put(&url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "payload_too_large"
    );
    let resp = api
        .http
        .put(&url)
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_request"
    );
    let resp = api
        .http
        .put(&url)
        .bearer_auth(ADMIN_TOKEN)
        .body("email=a")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    for (body, code) in [
        (json!({"email": "not an address"}), "invalid_sender"),
        (
            json!({"email": "a@customer.com", "name": "Team @ Customer"}),
            "invalid_sender",
        ),
        (
            json!({"email": "a@customer.com", "name": "Team\r\nBcc: x@evil.example"}),
            "invalid_sender",
        ),
        (
            json!({"email": "a@customer.com", "fallback": "sometimes"}),
            "invalid_request",
        ),
        (json!({"name": "no email"}), "invalid_request"),
    ] {
        let (status, resp) = api.save_sender("org_ms", body.clone()).await;
        assert!(status.is_client_error(), "{body}: {status}");
        assert_eq!(resp["error"]["code"], code, "{body}: {resp}");
    }
    let (status, resp) = api
        .call(
            Method::POST,
            "/v1/organizations/org_ms/integration/authorize",
            Some(json!({"provider": "yahoo", "return_to": RETURN_TO})),
        )
        .await;
    assert_eq!(
        (status, resp["error"]["code"].clone()),
        (StatusCode::UNPROCESSABLE_ENTITY, json!("invalid_request"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_lists_every_route() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    let (status, doc) = api
        .call_as(None, Method::GET, "/v1/openapi.json", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/v1/organizations/{org}/integration/authorize", "post"),
        ("/v1/organizations/{org}/integration/confirm", "post"),
        ("/v1/oauth/callback", "get"),
        ("/v1/organizations/{org}/integration/sender", "put"),
        ("/v1/organizations/{org}/integration", "get"),
        ("/v1/organizations/{org}/integration", "delete"),
        ("/v1/organizations/{org}/portal-sessions", "post"),
    ] {
        let op = &paths.get(path).unwrap_or_else(|| panic!("{path} missing"))[method];
        assert!(op.is_object(), "{method} {path} missing");
        assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
        if path.starts_with("/v1/organizations") {
            assert_eq!(
                op["security"][0]["admin_token"],
                json!([]),
                "{method} {path} declares the bearer token"
            );
        }
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["admin_token"]["scheme"],
        "bearer"
    );
    for schema in [
        "AuthorizeRequest",
        "ConfirmRequest",
        "ConfirmResponse",
        "SenderRequest",
        "TestOutcome",
        "IntegrationView",
        "ErrorBody",
        "PortalSessionRequest",
        "PortalSessionResponse",
    ] {
        assert!(
            doc["components"]["schemas"][schema].is_object(),
            "{schema} missing"
        );
    }
    // The admin API says what recipients see, and Sent Items is a sender setting.
    let schemas = &doc["components"]["schemas"];
    for (schema, field) in [
        ("TestOutcome", "recipients_see"),
        ("IntegrationView", "recipients_see"),
        ("IntegrationView", "save_to_sent_items"),
        ("SenderRequest", "save_to_sent_items"),
        ("RecipientsSee", "differs"),
    ] {
        assert!(
            schemas[schema]["properties"][field].is_object(),
            "{schema}.{field} missing"
        );
    }
    assert!(schemas["RewriteReason"].is_object());
    // Every API route the router serves is documented, and nothing else (the
    // hosted settings page's `/portal/…` pages are HTML for browsers, not API).
    assert_eq!(paths.len(), 6);
    let _ = IntegrationStatus::Active;
}

/// The admin listener bounds what a client can hold: a connection that stops
/// sending is closed, and past the connection cap new clients wait until a slot
/// frees (a slowloris or a socket flood cannot take the API down).
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_listener_closes_idle_connections_and_caps_their_number() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let app = TestApp::spawn_with(TestAppOptions {
        admin_connection_limits: mail_dispatch_admin::ConnectionLimits {
            max_connections: 2,
            idle: Duration::from_millis(500),
            lifetime: Duration::from_secs(30),
        },
        ..Default::default()
    })
    .await;
    let addr = app.admin_url.trim_start_matches("http://").to_owned();

    // A request trickled and never finished: closed after the idle limit.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection is closed: {closed:?}"
    );

    // Two connections held open take both slots: a third client is not served...
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let request = b"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    third.write_all(request).await.unwrap();
    let mut first_byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), third.read(&mut first_byte))
            .await
            .is_err(),
        "served past the cap"
    );
    // ...until a slot frees (here: the held connections go idle and are closed).
    let answered = tokio::time::timeout(Duration::from_secs(5), third.read(&mut first_byte)).await;
    assert!(
        matches!(answered, Ok(Ok(1))),
        "served once a slot freed: {answered:?}"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_organization_keeps_part_of_its_mailboxs_sending_limits_with_limit_percent() {
    let app = TestApp::spawn().await;
    let api = Api::new(&app);
    app.standins
        .set_consent(Vendor::Google, Consent::Approve("ops@customer.com".into()));
    api.connect("org_g", "google").await;
    let integration = api.integration("org_g").await;
    assert_eq!(integration["limit_percent"], 100, "all of it by default");
    assert_eq!(
        integration["google_account"], "workspace",
        "the id token named a Workspace domain (hd)"
    );
    let (status, body) = api
        .save_sender(
            "org_g",
            json!({"email": "ops@customer.com", "name": "Ops", "limit_percent": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body:#}");
    assert_eq!(body["error"]["code"], "invalid_request");
    let (status, outcome) = api
        .save_sender(
            "org_g",
            json!({"email": "ops@customer.com", "name": "Ops", "limit_percent": 60}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(outcome["integration"]["limit_percent"], 60, "{outcome:#}");
    assert_eq!(api.integration("org_g").await["limit_percent"], 60);
    // Saving the sender again without it leaves the share as it was.
    let (status, _) = api
        .save_sender("org_g", json!({"email": "ops@customer.com", "name": "Ops"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(api.integration("org_g").await["limit_percent"], 60);
}
