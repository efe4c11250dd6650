//! The hosted settings page (issue #14) in a real browser: headless Chromium
//! driven over WebDriver (`chromedriver`, Debian's `chromium-driver`), against
//! the real admin API, PostgreSQL, RabbitMQ and the providers' stand-ins. The
//! main states are saved as screenshots in `docs/portal/`.
//!
//! Chromium is slow to start on a busy machine: each test starts one (two for
//! the second-browser scenario) and walks a whole story with it.

use std::future::Future;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use mail_dispatch_store::IntegrationStatus;
use mail_dispatch_test_support::standins::{Consent, Vendor};
use mail_dispatch_test_support::{ADMIN_TOKEN, TestApp};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::admin::eventually_provider;

const RETURN_URL: &str = "https://app.example/settings/email";
/// Bound of a whole browser test.
const TEST_BUDGET: Duration = Duration::from_secs(240);
/// Bound of one wait for the page.
const PAGE_WAIT: Duration = Duration::from_secs(30);

/// Runs a browser test within its budget.
async fn bounded(test: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_BUDGET, test)
        .await
        .expect("the browser test did not finish in time");
}

/// A headless Chromium driven by its own chromedriver. The driver runs in its
/// own process group, killed (with the Chromium it started) when dropped.
struct Browser {
    client: Client,
    driver: std::process::Child,
}

impl Browser {
    async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = std::process::Command::new("chromedriver");
        command
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let driver = command.spawn().expect(
            "chromedriver not found: install Debian's chromium and chromium-driver (scripts/test does)",
        );
        let mut caps = serde_json::Map::new();
        let mut chrome = json!({"args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1280,900", "--lang=en-US", "--no-first-run", "--disable-extensions",
        ]});
        if std::path::Path::new("/usr/bin/chromium").exists() {
            chrome["binary"] = json!("/usr/bin/chromium");
        }
        caps.insert("goog:chromeOptions".into(), chrome);
        let url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("no WebDriver session from chromedriver: {e}"),
            }
        };
        Browser { client, driver }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    async fn path(&self) -> String {
        self.client.current_url().await.unwrap().path().to_owned()
    }

    /// Waits until the page's element `css` exists, and returns its text.
    async fn text(&self, css: &str) -> String {
        self.client
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .text()
            .await
            .unwrap()
    }

    async fn attr(&self, css: &str, name: &str) -> Option<String> {
        self.client
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .attr(name)
            .await
            .unwrap()
    }

    async fn exists(&self, css: &str) -> bool {
        self.client.find(Locator::Css(css)).await.is_ok()
    }

    /// The status the page shows (`data-status` of the status card).
    async fn status(&self) -> String {
        self.attr("#status", "data-status")
            .await
            .unwrap_or_default()
    }

    async fn fill(&self, css: &str, value: &str) {
        let field = self.client.find(Locator::Css(css)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(value).await.unwrap();
    }

    /// Clicks and waits for the next page: its URL's path to be `path`, and its
    /// `#heading` (every page of ours has one) or the consent page's `#accept`.
    async fn click_to(&self, css: &str, path: &str) {
        let before = self.client.current_url().await.unwrap();
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css}: {e}"))
            .click()
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + PAGE_WAIT;
        loop {
            let now = self.client.current_url().await.unwrap();
            if now.path() == path && (now != before || path == before.path()) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "after clicking {css}: at {now}, expected {path}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.client
            .wait()
            .at_most(PAGE_WAIT)
            .for_element(Locator::Css("#heading, #accept"))
            .await
            .unwrap();
    }

    /// Saves a screenshot in `docs/portal/`, of the page's first 1500 pixels
    /// at the current width.
    async fn screenshot(&self, name: &str) {
        let (width, height) = self.client.get_window_size().await.unwrap();
        self.client
            .set_window_size(width as u32, 1500)
            .await
            .unwrap();
        let png = self.client.screenshot().await;
        self.client
            .set_window_size(width as u32, height as u32)
            .await
            .unwrap();
        let png = png.unwrap();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/portal");
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(format!("{dir}/{name}.png"), png).unwrap();
    }

    /// Ends the WebDriver session (Chromium quits); the driver goes on drop.
    async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The driver's group: chromedriver and the Chromium it started.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.driver.wait();
    }
}

/// The host application asks for a link (server to server).
async fn portal_link(app: &TestApp, org: &str, body: Value) -> Value {
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/organizations/{org}/portal-sessions",
            app.admin_url
        ))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

async fn link(app: &TestApp, org: &str, locale: &str) -> String {
    portal_link(
        app,
        org,
        json!({"return_url": RETURN_URL, "locale": locale,
               "product_name": "Acme Workspace", "accent_color": "#0f766e"}),
    )
    .await["url"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_connects_microsoft_is_told_what_is_wrong_saves_a_tested_sender_and_disconnects() {
    bounded(async {
        let app = TestApp::spawn().await;
        let mut tap = app.amqp.tap_results().await;
        app.standins.set_consent(
            Vendor::Microsoft,
            Consent::Approve("admin@customer.com".into()),
        );
        app.standins.show_consent_page(Vendor::Microsoft, true);
        let browser = Browser::start().await;

        // The link opens the page; the token leaves the address bar.
        browser.goto(&link(&app, "org_ms", "en").await).await;
        assert_eq!(browser.path().await, "/portal");
        assert_eq!(browser.status().await, "not_configured");
        assert!(
            browser
                .text("#status")
                .await
                .contains("Platform sender in use")
        );
        assert_eq!(
            browser.attr(".back", "href").await.as_deref(),
            Some(RETURN_URL)
        );
        browser.screenshot("platform-sender").await;

        // Connect: the provider's consent page, then back, confirmed.
        browser
            .click_to(
                "#connect-microsoft",
                &format!(
                    "/{}/oauth2/v2.0/authorize",
                    mail_dispatch_test_support::MICROSOFT_TENANT
                ),
            )
            .await;
        browser.click_to("#accept", "/portal").await;
        assert_eq!(browser.status().await, "pending_sender");
        assert!(
            browser.text("#notice").await.contains("admin@customer.com"),
            "{}",
            browser.text("#notice").await
        );

        // A display name with "@": an inline error, nothing saved or sent.
        browser.fill("#email", "admin@customer.com").await;
        browser.fill("#name", "admin@customer").await;
        browser.click_to("#save", "/portal/sender").await;
        assert!(browser.text("#name-error").await.contains("cannot contain"));
        assert_eq!(
            browser.attr("#name", "aria-invalid").await.as_deref(),
            Some("true")
        );
        assert_eq!(
            browser.attr("#name", "value").await.as_deref(),
            Some("admin@customer")
        );
        browser.screenshot("inline-error").await;
        let stored = app.db.store.integration("org_ms").await.unwrap().unwrap();
        assert_eq!(stored.sender_email, None);
        assert!(app.standins.received().is_empty());

        // A sender the account may not send as: the failed test is shown, and
        // the organization stays on the platform sender.
        browser.fill("#email", "ceo@customer.com").await;
        browser.fill("#name", "Customer").await;
        browser.click_to("#save", "/portal").await;
        let notice = browser.text("#notice").await;
        assert!(notice.contains("The test failed"), "{notice}");
        assert!(
            notice.contains("does not let the connected account send"),
            "{notice}"
        );
        assert_eq!(browser.status().await, "pending_sender");
        assert_eq!(
            browser.attr("#last-test", "data-status").await.as_deref(),
            Some("failed")
        );
        browser.screenshot("test-failed").await;
        eventually_provider(&app, &mut tap, "org_ms", "default").await;

        // The right sender: sent, active, and what recipients will see.
        browser.fill("#email", "admin@customer.com").await;
        browser.fill("#name", "Customer Notifications").await;
        browser.click_to("#save", "/portal").await;
        let notice = browser.text("#notice").await;
        assert!(
            notice.contains("Recipients will see: Customer Notifications <admin@customer.com>"),
            "{notice}"
        );
        assert_eq!(browser.status().await, "active");
        assert!(
            browser
                .text("#status")
                .await
                .contains("through Microsoft 365")
        );
        browser.screenshot("active").await;
        let stored = app.db.store.integration("org_ms").await.unwrap().unwrap();
        assert_eq!(stored.status, IntegrationStatus::Active);
        assert_eq!(
            stored.sender_name.as_deref(),
            Some("Customer Notifications")
        );
        eventually_provider(&app, &mut tap, "org_ms", "microsoft").await;

        // On a phone-sized screen the page still reads as one column.
        browser.client.set_window_size(390, 900).await.unwrap();
        browser.goto(&format!("{}/portal", app.admin_url)).await;
        assert_eq!(browser.status().await, "active");
        browser.screenshot("active-narrow").await;
        browser.client.set_window_size(1280, 900).await.unwrap();

        // Exchange blocks the mailbox (a worker met ErrorMessageSubmissionBlocked
        // and paused it): the page says so and what to do; a save and test
        // that goes out, once the account is released, lifts the pause.
        assert!(!browser.exists("#paused").await);
        let until = chrono::Utc::now() + chrono::Duration::hours(1);
        app.db
            .store
            .pause_mailbox("org_ms", until, "sending_blocked")
            .await
            .unwrap();
        browser.goto(&format!("{}/portal", app.admin_url)).await;
        let paused = browser.text("#paused").await;
        assert!(
            paused.contains("Microsoft 365 is blocking this mailbox from sending"),
            "{paused}"
        );
        assert!(paused.contains("save and test below"), "{paused}");
        browser.screenshot("paused").await;
        browser.click_to("#save", "/portal").await;
        assert!(
            browser
                .text("#notice")
                .await
                .contains("Recipients will see")
        );
        assert!(!browser.exists("#paused").await, "lifted by the test send");
        assert!(
            app.db
                .store
                .mailbox_pause("org_ms")
                .await
                .unwrap()
                .is_none()
        );

        // Disconnect: what happens is said before; then the platform sender.
        assert!(
            browser
                .text("label[for=confirm-disconnect]")
                .await
                .contains("notifications will come from Acme Workspace's address")
        );
        browser
            .client
            .find(Locator::Css("#confirm-disconnect"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        browser.click_to("#disconnect", "/portal").await;
        assert_eq!(browser.status().await, "not_configured");
        assert!(browser.text("#notice").await.contains("Disconnected"));
        assert!(app.db.store.integration("org_ms").await.unwrap().is_none());
        eventually_provider(&app, &mut tap, "org_ms", "default").await;
        browser.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_connects_google_in_french_and_the_tested_sender_is_active() {
    bounded(async {
        let app = TestApp::spawn().await;
        app.standins
            .set_consent(Vendor::Google, Consent::Approve("admin@globex.com".into()));
        let browser = Browser::start().await;

        browser.goto(&link(&app, "org_g", "fr").await).await;
        assert_eq!(browser.attr("html", "lang").await.as_deref(), Some("fr"));
        assert!(
            browser
                .text("#status")
                .await
                .contains("Expéditeur de la plateforme")
        );

        // The stand-in answers the consent at once: straight back to the page.
        browser.click_to("#connect-google", "/portal").await;
        assert_eq!(browser.status().await, "pending_sender");
        assert_eq!(
            browser.attr("#email", "value").await.as_deref(),
            Some("admin@globex.com"),
            "the connected account is the sender by default"
        );
        browser.fill("#name", "Globex").await;
        browser.click_to("#save", "/portal").await;
        let notice = browser.text("#notice").await;
        assert!(
            notice.contains("Test envoyé. Les destinataires verront : Globex <admin@globex.com>"),
            "{notice}"
        );
        assert_eq!(browser.status().await, "active");
        assert!(browser.text("#status").await.contains("Actif"));
        browser.screenshot("google-active-fr").await;
        let received = app.standins.received();
        assert_eq!(received.len(), 1, "one test message");
        assert_eq!(received[0].provider, "google");
        let stored = app.db.store.integration("org_g").await.unwrap().unwrap();
        assert_eq!(stored.status, IntegrationStatus::Active);
        browser.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_reused_and_forged_links_show_a_clear_page_and_nothing_else() {
    bounded(async {
        let app = TestApp::spawn().await;
        let browser = Browser::start().await;

        // Reused: the first opening works, the second shows why not.
        let url = link(&app, "org_l", "en").await;
        browser.goto(&url).await;
        assert_eq!(browser.status().await, "not_configured");
        browser.goto(&url).await;
        assert_eq!(browser.text("#heading").await, "This link was already used");
        assert_eq!(browser.attr("#back", "href").await.as_deref(), Some(RETURN_URL));
        assert!(!browser.exists("form").await, "nothing else on the page");
        browser.screenshot("link-used").await;

        // Expired.
        let url = link(&app, "org_l", "en").await;
        app.db
            .client()
            .await
            .execute(
                "UPDATE portal_links SET expires_at = now() - interval '1 second' WHERE used_at IS NULL",
                &[],
            )
            .await
            .unwrap();
        browser.goto(&url).await;
        assert_eq!(browser.text("#heading").await, "This link has expired");
        assert_eq!(browser.attr("#back", "href").await.as_deref(), Some(RETURN_URL));
        assert!(!browser.exists("form").await);

        // Forged: no way back to offer, since no host application asked for it.
        browser
            .goto(&format!("{}/portal/start?token=forged", app.admin_url))
            .await;
        assert_eq!(browser.text("#heading").await, "This link is not valid");
        assert!(!browser.exists("#back").await);
        browser.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consent_finished_in_another_browser_session_is_not_attached() {
    bounded(async {
        let app = TestApp::spawn().await;
        app.standins.set_consent(
            Vendor::Microsoft,
            Consent::Approve("victim@other.com".into()),
        );
        app.standins.show_consent_page(Vendor::Microsoft, true);
        let (admin, other) = tokio::join!(Browser::start(), Browser::start());

        // The admin starts connecting, and the consent page is opened in
        // another browser (sent to someone, or copied), where it is accepted.
        admin.goto(&link(&app, "org_p", "en").await).await;
        admin
            .click_to(
                "#connect-microsoft",
                &format!(
                    "/{}/oauth2/v2.0/authorize",
                    mail_dispatch_test_support::MICROSOFT_TENANT
                ),
            )
            .await;
        let consent = admin.client.current_url().await.unwrap();
        other.goto(consent.as_str()).await;
        other.click_to("#accept", "/portal/return").await;
        assert_eq!(other.text("#heading").await, "Nothing was connected");
        assert!(
            other
                .text("#message")
                .await
                .contains("another browser session")
        );
        other.screenshot("other-browser").await;
        assert!(app.db.store.integration("org_p").await.unwrap().is_none());
        assert_eq!(
            app.db
                .store
                .pending_connection_count("org_p")
                .await
                .unwrap(),
            1,
            "the grant waits, unconfirmed, until it expires and is dropped"
        );

        // The admin's own session never saw the one-time value: its page still
        // shows the platform sender, and its own click on the same consent
        // (whose state is spent) attaches nothing either.
        admin.click_to("#accept", "/portal").await;
        assert_eq!(admin.status().await, "not_configured");
        assert!(admin.text("#notice").await.contains("already used"));
        assert!(app.db.store.integration("org_p").await.unwrap().is_none());

        // Even a browser with a session of the same organization (another
        // admin's) cannot attach a consent that this session started.
        other.goto(&link(&app, "org_p", "en").await).await;
        assert_eq!(other.status().await, "not_configured");
        admin
            .click_to(
                "#connect-microsoft",
                &format!(
                    "/{}/oauth2/v2.0/authorize",
                    mail_dispatch_test_support::MICROSOFT_TENANT
                ),
            )
            .await;
        let consent = admin.client.current_url().await.unwrap();
        other.goto(consent.as_str()).await;
        other.click_to("#accept", "/portal").await;
        assert_eq!(other.status().await, "not_configured");
        assert!(
            other
                .text("#notice")
                .await
                .contains("another browser session"),
            "{}",
            other.text("#notice").await
        );
        assert!(app.db.store.integration("org_p").await.unwrap().is_none());
        tokio::join!(admin.close(), other.close());
    })
    .await;
}

// ---------------------------------------------------------------------------
// Without a browser: the API's refusals, the response policy, CSRF, the limit.

#[tokio::test(flavor = "multi_thread")]
async fn portal_sessions_need_the_admin_token_an_allowed_return_url_and_a_strict_colour() {
    let app = TestApp::spawn().await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/organizations/org_a/portal-sessions", app.admin_url);
    let resp = http
        .post(&url)
        .json(&json!({"return_url": RETURN_URL}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    for (body, code) in [
        (
            json!({"return_url": "https://evil.example/x"}),
            "return_to_not_allowed",
        ),
        (
            json!({"return_url": RETURN_URL, "accent_color": "#fff;}body{x"}),
            "invalid_request",
        ),
        (
            json!({"return_url": RETURN_URL, "accent_color": "red"}),
            "invalid_request",
        ),
        (
            json!({"return_url": RETURN_URL, "locale": "de"}),
            "invalid_request",
        ),
        (
            json!({"return_url": RETURN_URL, "product_name": ""}),
            "invalid_request",
        ),
    ] {
        let resp = http
            .post(&url)
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(answer["error"]["code"], code, "{body}");
    }
    let answer = portal_link(&app, "org_a", json!({"return_url": RETURN_URL})).await;
    let link = answer["url"].as_str().unwrap();
    assert!(
        link.starts_with(&format!("{}/portal/start?token=", app.admin_url)),
        "{link}"
    );
    let expires =
        chrono::DateTime::parse_from_rfc3339(answer["expires_at"].as_str().unwrap()).unwrap();
    let ttl = expires.signed_duration_since(chrono::Utc::now());
    assert!(
        ttl > chrono::Duration::minutes(4) && ttl <= chrono::Duration::minutes(5),
        "{ttl}"
    );
}

/// A browser-like client without a cookie jar: the test carries the cookie.
struct Visitor {
    http: reqwest::Client,
    base: String,
    cookie: String,
}

impl Visitor {
    async fn open(app: &TestApp, org: &str) -> (Visitor, reqwest::Response) {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let link = portal_link(
            app,
            org,
            json!({"return_url": RETURN_URL, "accent_color": "#FFD500"}),
        )
        .await["url"]
            .as_str()
            .unwrap()
            .to_owned();
        let resp = http.get(&link).send().await.unwrap();
        let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
        let pair = cookie.split(';').next().unwrap().to_owned();
        (
            Visitor {
                http,
                base: app.admin_url.clone(),
                cookie: pair,
            },
            resp,
        )
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap()
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .form(form)
            .send()
            .await
            .unwrap()
    }

    async fn csrf(&self) -> String {
        let page = self.get("/portal").await.text().await.unwrap();
        let at = page.find("name=\"csrf\" value=\"").unwrap() + 19;
        page[at..].split('"').next().unwrap().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_portal_sets_a_scoped_http_only_cookie_a_strict_policy_and_refuses_forms_without_its_token()
 {
    let app = TestApp::spawn().await;
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("admin@customer.com".into()),
    );
    let (visitor, opened) = Visitor::open(&app, "org_c").await;
    assert_eq!(opened.status(), StatusCode::SEE_OTHER);
    assert_eq!(opened.headers()["location"], "/portal");
    let cookie = opened.headers()["set-cookie"].to_str().unwrap();
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/portal", "Max-Age=3600"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "served over http here: {cookie}"
    );

    let page = visitor.get("/portal").await;
    assert_eq!(page.status(), StatusCode::OK);
    let headers = page.headers().clone();
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("style-src 'self'"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("script-src"),
        "{csp}"
    );
    // The connect form's redirect goes to the providers' consent pages.
    let microsoft = app.standins.microsoft_login.uri();
    assert!(
        csp.contains(&format!("form-action 'self' {microsoft}")),
        "{csp}"
    );
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert_eq!(headers["cache-control"], "no-store");
    let html = page.text().await.unwrap();
    assert!(!html.contains("<script"), "no script");
    assert!(!html.contains("token="), "no token in the page");
    assert!(
        !html.contains(&visitor.cookie["mail_dispatch_portal=".len()..]),
        "no cookie value in the page"
    );

    // The accent colour reaches the page through its own stylesheet, with a
    // readable text colour on it.
    let theme = visitor.get("/portal/theme.css").await.text().await.unwrap();
    assert!(
        theme.contains("--accent: #ffd500; --on-accent: #111111;"),
        "{theme}"
    );

    // Forms without the session's token do nothing.
    let resp = visitor
        .post(
            "/portal/connect",
            &[("csrf", "wrong"), ("provider", "microsoft")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(app.db.store.oauth_state_count().await.unwrap(), 0);
    let resp = visitor
        .post("/portal/disconnect", &[("confirm", "yes")])
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // With it: straight to the consent page, with a state of this session.
    let csrf = visitor.csrf().await;
    let resp = visitor
        .post(
            "/portal/connect",
            &[("csrf", &csrf), ("provider", "microsoft")],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let location = resp.headers()["location"].to_str().unwrap();
    assert!(location.starts_with(&microsoft), "{location}");
    assert_eq!(
        app.db.store.oauth_state_count().await.unwrap(),
        2,
        "connect and admin consent"
    );

    // Without a cookie, no page.
    let resp = reqwest::get(format!("{}/portal", app.admin_url))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    // The callback cannot be framed either.
    let resp = reqwest::get(format!("{}/v1/oauth/callback", app.admin_url))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-frame-options"], "DENY");
}

#[tokio::test(flavor = "multi_thread")]
async fn test_sends_from_the_portal_are_limited_per_organization() {
    let app = TestApp::spawn().await;
    app.standins.set_consent(
        Vendor::Microsoft,
        Consent::Approve("admin@customer.com".into()),
    );
    let (visitor, _) = Visitor::open(&app, "org_r").await;
    // Connected through the admin API: the limit is about the test sends.
    crate::admin::Api::new(&app)
        .connect_confirmed("org_r", "microsoft")
        .await;
    let csrf = visitor.csrf().await;
    let save = [
        ("csrf", csrf.as_str()),
        ("email", "admin@customer.com"),
        ("name", "Customer"),
    ];
    for _ in 0..mail_dispatch_admin::TEST_SENDS_PER_WINDOW {
        let resp = visitor.post("/portal/sender", &save).await;
        assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    }
    let resp = visitor.post("/portal/sender", &save).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.text().await.unwrap().contains("Too many tests"));
    assert_eq!(
        app.standins.received().len(),
        mail_dispatch_admin::TEST_SENDS_PER_WINDOW as usize
    );
}
