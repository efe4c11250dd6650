//! The stand-ins refuse what the real providers refuse (issue #10 §1): one test
//! per refusal, each showing the refusal (status and error code) and, where
//! there is one, the compliant call being accepted. Driven with plain HTTP: no
//! RabbitMQ or PostgreSQL needed.

use std::collections::HashMap;

use base64::Engine as _;
use mail_dispatch_test_support::StandIns;
use mail_dispatch_test_support::standins::{AccountInfo, Consent, SendingQuota, Vendor};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::Digest as _;

const CLIENT_ID: &str = "client-123";
const REDIRECT: &str = "https://app.example/v1/oauth/callback";
const MS_SCOPES: &str = "offline_access https://graph.microsoft.com/Mail.Send https://graph.microsoft.com/User.Read openid email profile";
const GMAIL_SEND: &str = "https://www.googleapis.com/auth/gmail.send";
const GMAIL_SETTINGS: &str = "https://www.googleapis.com/auth/gmail.settings.basic";

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn location(resp: &reqwest::Response) -> Option<url::Url> {
    resp.headers()
        .get("location")
        .map(|l| url::Url::parse(l.to_str().unwrap()).unwrap())
}

fn params(url: &url::Url) -> HashMap<String, String> {
    url.query_pairs().into_owned().collect()
}

fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

const VERIFIER: &str = "a-pkce-code-verifier-long-enough-0123456789-abcdefghij";

fn challenge() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(VERIFIER))
}

/// What the product does: GET the authorize endpoint (PKCE S256), as the browser would.
async fn authorize(s: &StandIns, vendor: Vendor, tenant: &str, scope: &str) -> reqwest::Response {
    let base = match vendor {
        Vendor::Microsoft => format!("{}/{tenant}/oauth2/v2.0/authorize", s.microsoft_login.uri()),
        Vendor::Google => format!("{}/o/oauth2/v2/auth", s.google_oauth.uri()),
    };
    let mut url = url::Url::parse(&base).unwrap();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", CLIENT_ID)
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("state", "the-state")
        .append_pair("scope", scope)
        .append_pair("code_challenge", &challenge())
        .append_pair("code_challenge_method", "S256");
    if vendor == Vendor::Google {
        url.query_pairs_mut()
            .append_pair("access_type", "offline")
            .append_pair("prompt", "consent");
    }
    http().get(url).send().await.unwrap()
}

fn token_url(s: &StandIns, vendor: Vendor) -> String {
    match vendor {
        Vendor::Microsoft => format!("{}/common/oauth2/v2.0/token", s.microsoft_login.uri()),
        Vendor::Google => format!("{}/token", s.google_oauth.uri()),
    }
}

/// The whole connect flow: authorize, then redeem the code. Returns the token response.
async fn connect(s: &StandIns, vendor: Vendor, tenant: &str, scope: &str) -> Value {
    let resp = authorize(s, vendor, tenant, scope).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let back = params(&location(&resp).unwrap());
    assert_eq!(back["state"], "the-state");
    let code = back
        .get("code")
        .unwrap_or_else(|| panic!("no code: {back:?}"));
    let resp = http()
        .post(token_url(s, vendor))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("client_id", CLIENT_ID),
            ("client_secret", "secret"),
            ("code_verifier", VERIFIER),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.json().await.unwrap()
}

async fn refresh(
    s: &StandIns,
    vendor: Vendor,
    refresh_token: &str,
    scope: Option<&str>,
) -> (StatusCode, Value) {
    let mut f = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
        ("client_id", CLIENT_ID),
        ("client_secret", "secret"),
    ];
    if let Some(scope) = scope {
        f.push(("scope", scope));
    }
    let resp = http()
        .post(token_url(s, vendor))
        .form(&f)
        .send()
        .await
        .unwrap();
    (resp.status(), resp.json().await.unwrap())
}

async fn me(s: &StandIns, token: &str, select: Option<&str>) -> (StatusCode, Value) {
    let mut url = url::Url::parse(&format!("{}/v1.0/me", s.graph.uri())).unwrap();
    if let Some(select) = select {
        url.query_pairs_mut().append_pair("$select", select);
    }
    let resp = http().get(url).bearer_auth(token).send().await.unwrap();
    (resp.status(), resp.json().await.unwrap())
}

async fn send_mail(s: &StandIns, token: &str, from: &str, name: &str) -> (StatusCode, Value) {
    let body = json!({"message": {
        "subject": "Hello", "body": {"contentType": "Text", "content": "Hi"},
        "from": {"emailAddress": {"address": from, "name": name}},
        "toRecipients": [{"emailAddress": {"address": "someone@example.org"}}],
    }, "saveToSentItems": false});
    let resp = http()
        .post(format!("{}/v1.0/me/sendMail", s.graph.uri()))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn gmail_send(s: &StandIns, token: &str) -> reqwest::Response {
    gmail_send_to(s, token, "a@example.org").await
}

async fn gmail_send_to(s: &StandIns, token: &str, to: &str) -> reqwest::Response {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        "From: ops@customer.com\r\nTo: {to}\r\nSubject: Hi\r\n\r\nHello\r\n"
    ));
    http()
        .post(format!("{}/gmail/v1/users/me/messages/send", s.gmail.uri()))
        .bearer_auth(token)
        .json(&json!({"raw": raw}))
        .send()
        .await
        .unwrap()
}

async fn gmail_send_as(s: &StandIns, token: &str) -> (StatusCode, Value) {
    let resp = http()
        .get(format!(
            "{}/gmail/v1/users/me/settings/sendAs",
            s.gmail.uri()
        ))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (resp.status(), resp.json().await.unwrap())
}

fn graph_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn graph_me_without_user_read_is_403_authorization_request_denied() {
    let s = StandIns::start().await;
    let (status, body) = me(&s, "not-a-token", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(graph_code(&body), "InvalidAuthenticationToken");

    // openid/email/profile only shape the ID token; Mail.Send does not read the profile.
    let (token, _) = s.issue_with_scopes(
        Vendor::Microsoft,
        "admin@customer.com",
        &["openid", "email", "profile", "offline_access", "Mail.Send"],
    );
    let (status, body) = me(&s, &token, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(graph_code(&body), "Authorization_RequestDenied");
    assert_eq!(
        body["error"]["message"],
        "Insufficient privileges to complete the operation."
    );

    let (token, _) = s.issue(Vendor::Microsoft, "admin@customer.com");
    let (status, body) = me(&s, &token, None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["userPrincipalName"], "admin@customer.com");
    assert_eq!(body["mail"], "admin@customer.com");

    // A broader user permission reads /me too.
    let (token, _) = s.issue_with_scopes(
        Vendor::Microsoft,
        "admin@customer.com",
        &["User.ReadBasic.All"],
    );
    assert_eq!(me(&s, &token, None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn graph_me_honours_select() {
    let s = StandIns::start().await;
    let mut info = s.account_info("admin@customer.com");
    info.proxy_addresses = vec![
        "SMTP:admin@customer.com".into(),
        "smtp:alias@customer.com".into(),
    ];
    s.set_account("admin@customer.com", info.clone());
    let (token, _) = s.issue(Vendor::Microsoft, "admin@customer.com");

    let (status, body) = me(&s, &token, Some("mail,userPrincipalName,proxyAddresses")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(
        keys.len(),
        4,
        "only the selected properties and @odata.context: {body}"
    );
    assert_eq!(
        body["@odata.context"],
        "https://graph.microsoft.com/v1.0/$metadata#users(mail,userPrincipalName,proxyAddresses)/$entity"
    );
    assert_eq!(body["mail"], "admin@customer.com");
    assert_eq!(
        body["proxyAddresses"],
        json!(["SMTP:admin@customer.com", "smtp:alias@customer.com"])
    );

    // Without $select: the default set, no proxyAddresses; the id is the account's oid.
    let (_, body) = me(&s, &token, None).await;
    assert_eq!(body["id"], info.id);
    assert!(body.get("proxyAddresses").is_none());

    // A property users do not have is refused.
    let (status, body) = me(&s, &token, Some("mail,notAProperty")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(graph_code(&body), "BadRequest");
}

#[tokio::test]
async fn graph_me_mail_is_null_for_an_account_without_mailbox() {
    let s = StandIns::start().await;
    let mut info = s.account_info("nomail@customer.com");
    info.mail = None;
    s.set_account("nomail@customer.com", info);
    let (token, _) = s.issue(Vendor::Microsoft, "nomail@customer.com");
    let (status, body) = me(&s, &token, Some("mail,userPrincipalName")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["mail"], Value::Null);
    assert!(
        body.as_object().unwrap().contains_key("mail"),
        "null, not absent"
    );
    assert_eq!(body["userPrincipalName"], "nomail@customer.com");
}

#[tokio::test]
async fn send_mail_without_mail_send_is_403_error_access_denied() {
    let s = StandIns::start().await;
    let (token, _) = s.issue_with_scopes(
        Vendor::Microsoft,
        "admin@customer.com",
        &["openid", "offline_access", "User.Read"],
    );
    let (status, body) = send_mail(&s, &token, "admin@customer.com", "Admin").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(graph_code(&body), "ErrorAccessDenied");
    assert_eq!(
        body["error"]["message"],
        "Access is denied. Check credentials and try again."
    );
    assert!(s.graph_messages().is_empty());

    let (token, _) = s.issue(Vendor::Microsoft, "admin@customer.com");
    let (status, _) = send_mail(&s, &token, "admin@customer.com", "Admin").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(s.graph_messages().len(), 1);
}

#[tokio::test]
async fn send_mail_from_another_mailbox_needs_mail_send_shared_and_send_as() {
    let s = StandIns::start().await;
    let account = "admin@customer.com";
    let shared = "notifications@customer.com";

    // Mail.Send only, no right: refused.
    let (plain, _) = s.issue(Vendor::Microsoft, account);
    let (status, body) = send_mail(&s, &plain, shared, "Notifications").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(graph_code(&body), "ErrorSendAsDenied");

    // Mail.Send.Shared without the Send As right: refused.
    let (with_shared, _) = s.issue_with_scopes(
        Vendor::Microsoft,
        account,
        &[
            "openid",
            "offline_access",
            "User.Read",
            "Mail.Send",
            "Mail.Send.Shared",
        ],
    );
    let (status, body) = send_mail(&s, &with_shared, shared, "Notifications").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(graph_code(&body), "ErrorSendAsDenied");

    // The Send As right without Mail.Send.Shared: refused.
    s.grant_send_as(account, shared);
    let (status, body) = send_mail(&s, &plain, shared, "Notifications").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(graph_code(&body), "ErrorSendAsDenied");

    // Both: accepted (the address compared without regard to case).
    let (status, _) = send_mail(
        &s,
        &with_shared,
        "Notifications@Customer.com",
        "Notifications",
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);

    // The account's own proxy address needs neither.
    let mut info = s.account_info(account);
    info.proxy_addresses.push("smtp:alias@customer.com".into());
    s.set_account(account, info);
    let (status, _) = send_mail(&s, &plain, "alias@customer.com", "Admin").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(s.graph_messages().len(), 2);
}

#[tokio::test]
async fn send_mail_with_an_at_sign_in_the_display_name_is_send_as_denied() {
    let s = StandIns::start().await;
    let (token, _) = s.issue(Vendor::Microsoft, "admin@customer.com");
    let (status, body) = send_mail(&s, &token, "admin@customer.com", "admin@customer.com").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(graph_code(&body), "ErrorSendAsDenied");
    let (status, _) = send_mail(&s, &token, "admin@customer.com", "Admin at Customer").await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

fn assert_insufficient_scopes(body: &Value, method: &str) {
    let e = &body["error"];
    assert_eq!(e["code"], 403);
    assert_eq!(
        e["message"],
        "Request had insufficient authentication scopes."
    );
    assert_eq!(e["status"], "PERMISSION_DENIED");
    assert_eq!(e["errors"][0]["reason"], "insufficientPermissions");
    assert_eq!(e["errors"][0]["message"], "Insufficient Permission");
    let d = &e["details"][0];
    assert_eq!(d["@type"], "type.googleapis.com/google.rpc.ErrorInfo");
    assert_eq!(d["reason"], "ACCESS_TOKEN_SCOPE_INSUFFICIENT");
    assert_eq!(d["metadata"]["service"], "gmail.googleapis.com");
    assert_eq!(d["metadata"]["method"], method);
}

#[tokio::test]
async fn gmail_send_without_a_send_scope_is_403_insufficient_permissions() {
    let s = StandIns::start().await;
    let (token, _) = s.issue_with_scopes(Vendor::Google, "ops@customer.com", &["openid", "email"]);
    let resp = gmail_send(&s, &token).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(
        resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("insufficient_scope")
    );
    let body: Value = resp.json().await.unwrap();
    assert_insufficient_scopes(&body, "caribou.api.proto.MailboxService.SendMessage");
    assert!(s.gmail_messages().is_empty());

    let (token, _) = s.issue(Vendor::Google, "ops@customer.com");
    assert_eq!(gmail_send(&s, &token).await.status(), StatusCode::OK);
    // A broader scope sends too.
    let (token, _) = s.issue_with_scopes(
        Vendor::Google,
        "ops@customer.com",
        &["https://mail.google.com/"],
    );
    assert_eq!(gmail_send(&s, &token).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn gmail_send_as_list_without_a_settings_scope_is_403() {
    let s = StandIns::start().await;
    // gmail.send alone does not list aliases.
    let (token, _) = s.issue(Vendor::Google, "ops@customer.com");
    let (status, body) = gmail_send_as(&s, &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_insufficient_scopes(&body, "caribou.api.proto.MailboxService.ListSendAs");

    let (token, _) = s.issue_with_scopes(
        Vendor::Google,
        "ops@customer.com",
        &["openid", "email", GMAIL_SEND, GMAIL_SETTINGS],
    );
    let (status, body) = gmail_send_as(&s, &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["sendAs"][0]["sendAsEmail"], "ops@customer.com");
}

#[tokio::test]
async fn google_granular_consent_grants_only_what_the_user_left_ticked() {
    let s = StandIns::start().await;
    s.set_consent(
        Vendor::Google,
        Consent::Partial {
            account: "ops@customer.com".into(),
            // `email` cannot be unticked: only gmail.send goes.
            unticked: vec![GMAIL_SEND.into(), "email".into()],
        },
    );
    let scope = format!("openid email {GMAIL_SEND} {GMAIL_SETTINGS}");
    let tokens = connect(&s, Vendor::Google, "", &scope).await;
    let granted: Vec<&str> = tokens["scope"].as_str().unwrap().split(' ').collect();
    assert!(granted.contains(&"openid"), "{granted:?}");
    assert!(
        granted.contains(&"https://www.googleapis.com/auth/userinfo.email"),
        "Google names email by its URL: {granted:?}"
    );
    assert!(granted.contains(&GMAIL_SETTINGS), "{granted:?}");
    assert!(!granted.contains(&GMAIL_SEND), "unticked: {granted:?}");
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(
        s.granted_scopes(access).unwrap().len(),
        granted.len(),
        "the token carries what the response says"
    );
    // The token cannot send.
    assert_eq!(gmail_send(&s, access).await.status(), StatusCode::FORBIDDEN);

    // Approve grants everything.
    s.set_consent(Vendor::Google, Consent::Approve("ops@customer.com".into()));
    let tokens = connect(&s, Vendor::Google, "", &scope).await;
    assert!(tokens["scope"].as_str().unwrap().contains(GMAIL_SEND));
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(gmail_send(&s, access).await.status(), StatusCode::OK);
    // Microsoft has no granular consent: Partial is an approval there.
    s.set_consent(
        Vendor::Microsoft,
        Consent::Partial {
            account: "admin@customer.com".into(),
            unticked: vec!["Mail.Send".into()],
        },
    );
    let tokens = connect(&s, Vendor::Microsoft, "common", MS_SCOPES).await;
    assert!(tokens["scope"].as_str().unwrap().contains("Mail.Send"));
}

#[tokio::test]
async fn id_tokens_carry_the_directory_claims() {
    let s = StandIns::start().await;
    s.set_consent(
        Vendor::Microsoft,
        Consent::Approve("admin@customer.com".into()),
    );
    let info = s.account_info("admin@customer.com");
    let tokens = connect(&s, Vendor::Microsoft, "common", MS_SCOPES).await;
    let c = claims(tokens["id_token"].as_str().unwrap());
    assert_eq!(
        c["iss"],
        format!("https://login.microsoftonline.com/{}/v2.0", info.tenant_id)
    );
    assert_eq!(c["aud"], CLIENT_ID);
    assert_eq!(c["oid"], info.id);
    assert_eq!(c["tid"], info.tenant_id);
    assert!(c["sub"].is_string());
    assert_eq!(c["preferred_username"], "admin@customer.com");
    assert_eq!(c["name"], info.display_name);
    assert_eq!(c["email"], "admin@customer.com");
    // Same domain, same tenant; stable ids.
    assert_eq!(
        s.account_info("other@customer.com").tenant_id,
        info.tenant_id
    );
    assert_eq!(s.account_info("admin@customer.com").id, info.id);

    // No mailbox: no email claim.
    let mut nomail = s.account_info("nomail@customer.com");
    nomail.mail = None;
    s.set_account("nomail@customer.com", nomail);
    s.set_consent(
        Vendor::Microsoft,
        Consent::Approve("nomail@customer.com".into()),
    );
    let tokens = connect(&s, Vendor::Microsoft, "common", MS_SCOPES).await;
    let c = claims(tokens["id_token"].as_str().unwrap());
    assert!(c.get("email").is_none(), "{c}");

    // Google: sub, hd for Workspace, none for gmail.com.
    s.set_consent(Vendor::Google, Consent::Approve("ops@customer.com".into()));
    let tokens = connect(
        &s,
        Vendor::Google,
        "",
        &format!("openid email {GMAIL_SEND}"),
    )
    .await;
    let c = claims(tokens["id_token"].as_str().unwrap());
    assert_eq!(c["iss"], "https://accounts.google.com");
    assert_eq!(c["aud"], CLIENT_ID);
    assert_eq!(c["sub"], s.account_info("ops@customer.com").id);
    assert_eq!(c["email"], "ops@customer.com");
    assert_eq!(c["email_verified"], true);
    assert_eq!(c["hd"], "customer.com");
    assert!(c["name"].is_string());
    s.set_consent(Vendor::Google, Consent::Approve("someone@gmail.com".into()));
    let tokens = connect(
        &s,
        Vendor::Google,
        "",
        &format!("openid email {GMAIL_SEND}"),
    )
    .await;
    assert!(
        claims(tokens["id_token"].as_str().unwrap())
            .get("hd")
            .is_none()
    );
}

#[tokio::test]
async fn a_tenant_blocking_user_consent_sends_users_back_with_access_denied_aadsts90094() {
    let s = StandIns::start().await;
    s.block_user_consent("customer.com");
    s.set_consent(
        Vendor::Microsoft,
        Consent::Approve("user@customer.com".into()),
    );
    let resp = authorize(&s, Vendor::Microsoft, "organizations", MS_SCOPES).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let back = location(&resp).unwrap();
    assert!(back.as_str().starts_with(REDIRECT));
    let q = params(&back);
    assert_eq!(q["error"], "access_denied");
    assert!(q["error_description"].starts_with("AADSTS90094: "), "{q:?}");
    assert_eq!(q["state"], "the-state");
    assert!(!q.contains_key("code"));

    // Another tenant is not affected.
    s.set_consent(Vendor::Microsoft, Consent::Approve("user@other.com".into()));
    let resp = authorize(&s, Vendor::Microsoft, "organizations", MS_SCOPES).await;
    assert!(params(&location(&resp).unwrap()).contains_key("code"));
}

async fn admin_consent(s: &StandIns, tenant: &str, scope: &str) -> reqwest::Response {
    let mut url = url::Url::parse(&format!(
        "{}/{tenant}/v2.0/adminconsent",
        s.microsoft_login.uri()
    ))
    .unwrap();
    url.query_pairs_mut()
        .append_pair("client_id", CLIENT_ID)
        .append_pair("scope", scope)
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("state", "admin-state");
    http().get(url).send().await.unwrap()
}

#[tokio::test]
async fn admin_consent_refuses_the_common_tenant() {
    let s = StandIns::start().await;
    s.set_consent(
        Vendor::Microsoft,
        Consent::Approve("it@customer.com".into()),
    );
    let resp = admin_consent(&s, "common", MS_SCOPES).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(location(&resp).is_none(), "an error page, no redirect");
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!(s.admin_consent_requests().len(), 1);
}

#[tokio::test]
async fn admin_consent_for_the_tenant_lets_its_users_connect() {
    let s = StandIns::start().await;
    s.block_user_consent("customer.com");
    let tid = s.account_info("it@customer.com").tenant_id;
    s.set_consent(
        Vendor::Microsoft,
        Consent::Approve("it@customer.com".into()),
    );
    let resp = admin_consent(&s, &tid, MS_SCOPES).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let back = location(&resp).unwrap();
    assert!(back.as_str().starts_with(REDIRECT));
    let q = params(&back);
    assert_eq!(q["admin_consent"], "True");
    assert_eq!(q["tenant"], tid);
    assert_eq!(q["state"], "admin-state");
    assert!(q["scope"].contains("https://graph.microsoft.com/Mail.Send"));
    assert!(!q.contains_key("code"), "admin consent returns no code");
    let recorded = s.admin_consent_requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0]["client_id"], CLIENT_ID);

    // Now a user of that tenant connects.
    s.set_consent(
        Vendor::Microsoft,
        Consent::Approve("user@customer.com".into()),
    );
    let tokens = connect(&s, Vendor::Microsoft, "organizations", MS_SCOPES).await;
    assert!(tokens["access_token"].is_string());

    // An admin of another directory cannot consent for this tenant.
    s.set_consent(Vendor::Microsoft, Consent::Approve("it@other.com".into()));
    let q = params(&location(&admin_consent(&s, &tid, MS_SCOPES).await).unwrap());
    assert_eq!(q["error"], "access_denied");
    assert!(q["error_description"].starts_with("AADSTS50020: "), "{q:?}");
}

#[tokio::test]
async fn admin_consent_refused_by_the_admin_is_access_denied_aadsts65004() {
    let s = StandIns::start().await;
    s.set_consent(Vendor::Microsoft, Consent::Deny);
    let resp = admin_consent(&s, "organizations", MS_SCOPES).await;
    assert_eq!(resp.status(), StatusCode::FOUND);
    let q = params(&location(&resp).unwrap());
    assert_eq!(q["error"], "access_denied");
    assert!(q["error_description"].starts_with("AADSTS65004: "), "{q:?}");
    assert_eq!(q["admin_consent"], "True");
    assert_eq!(q["state"], "admin-state");
}

#[tokio::test]
async fn a_personal_microsoft_account_is_refused_on_organizations() {
    let s = StandIns::start().await;
    s.set_account(
        "someone@outlook.com",
        AccountInfo {
            id: "00000000-0000-0000-0123-456789abcdef".into(),
            tenant_id: "9188040d-6c67-4c5b-b112-36a304b66dad".into(),
            display_name: "Someone".into(),
            mail: None,
            personal: true,
            hosted_domain: None,
            proxy_addresses: Vec::new(),
        },
    );
    s.set_consent(
        Vendor::Microsoft,
        Consent::Approve("someone@outlook.com".into()),
    );

    let resp = authorize(&s, Vendor::Microsoft, "organizations", MS_SCOPES).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(location(&resp).is_none(), "no redirect back");
    let page = resp.text().await.unwrap();
    assert!(page.contains("AADSTS500200"), "{page}");
    assert!(page.contains("Personal Microsoft accounts are not supported for this application"));

    // A tenant id refuses it too.
    let tid = s.account_info("admin@customer.com").tenant_id;
    let resp = authorize(&s, Vendor::Microsoft, &tid, MS_SCOPES).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(resp.text().await.unwrap().contains("AADSTS50020"));

    // common lets it in, with the consumer tenant.
    let tokens = connect(&s, Vendor::Microsoft, "common", MS_SCOPES).await;
    let c = claims(tokens["id_token"].as_str().unwrap());
    assert_eq!(c["tid"], "9188040d-6c67-4c5b-b112-36a304b66dad");
}

#[tokio::test]
async fn a_refresh_without_offline_access_gets_no_refresh_token() {
    let s = StandIns::start().await;
    let (_, rt) = s.issue(Vendor::Microsoft, "admin@customer.com");
    let (status, body) = refresh(
        &s,
        Vendor::Microsoft,
        &rt,
        Some("https://graph.microsoft.com/Mail.Send openid"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("refresh_token").is_none(), "{body}");
    assert_eq!(
        body["scope"],
        "https://graph.microsoft.com/Mail.Send openid"
    );
    let access = body["access_token"].as_str().unwrap();
    assert_eq!(
        s.granted_scopes(access).unwrap(),
        vec!["https://graph.microsoft.com/Mail.Send", "openid"],
        "the new access token carries the requested scopes"
    );
    // It was asked for Mail.Send only: /me is refused with it.
    assert_eq!(me(&s, access, None).await.0, StatusCode::FORBIDDEN);

    // With offline_access (bare names are Graph scopes): a new refresh token.
    let (status, body) = refresh(
        &s,
        Vendor::Microsoft,
        &rt,
        Some("offline_access Mail.Send User.Read"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let rotated = body["refresh_token"].as_str().expect("a new refresh token");
    assert_ne!(rotated, rt);
    assert_eq!(
        body["scope"],
        "offline_access https://graph.microsoft.com/Mail.Send https://graph.microsoft.com/User.Read"
    );
    let refreshes = s.refreshes(Vendor::Microsoft);
    assert_eq!(refreshes.len(), 2, "every refresh request is recorded");
    assert_eq!(refreshes[1]["scope"], "offline_access Mail.Send User.Read");
}

#[tokio::test]
async fn a_refresh_asking_for_an_ungranted_scope_is_invalid_grant_aadsts65001() {
    let s = StandIns::start().await;
    let (_, rt) = s.issue(Vendor::Microsoft, "admin@customer.com");
    let (status, body) = refresh(
        &s,
        Vendor::Microsoft,
        &rt,
        Some("offline_access https://graph.microsoft.com/Mail.Send.Shared"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(body["error_codes"], json!([65001]));
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS65001: ")
    );
}

#[tokio::test]
async fn fail_refresh_answers_entras_documented_error_for_each_code() {
    let s = StandIns::start().await;
    let (_, rt) = s.issue(Vendor::Microsoft, "admin@customer.com");
    let cases: &[(u32, &str, u16)] = &[
        (700016, "unauthorized_client", 400),
        (7000112, "unauthorized_client", 400),
        (50105, "invalid_grant", 400),
        (53003, "invalid_grant", 400),
        (70044, "interaction_required", 400),
        (50076, "invalid_grant", 400),
        (700082, "invalid_grant", 400),
        (65001, "invalid_grant", 400),
        (7000215, "invalid_client", 401),
        (7000222, "invalid_client", 401),
        (70008, "invalid_grant", 400),
        (50173, "invalid_grant", 400),
    ];
    for &(code, error, status) in cases {
        s.fail_refresh("admin@customer.com", Some(code));
        let (got, body) = refresh(&s, Vendor::Microsoft, &rt, Some(MS_SCOPES)).await;
        assert_eq!(got.as_u16(), status, "AADSTS{code}: {body}");
        assert_eq!(body["error"], error, "AADSTS{code}");
        assert_eq!(body["error_codes"], json!([code]));
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .starts_with(&format!("AADSTS{code}: ")),
            "{body}"
        );
        for field in ["timestamp", "trace_id", "correlation_id"] {
            assert!(body[field].is_string(), "{field} in {body}");
        }
        assert_eq!(
            body["error_uri"],
            format!("https://login.microsoftonline.com/error?code={code}")
        );
    }
    s.fail_refresh("admin@customer.com", None);
    let (status, body) = refresh(&s, Vendor::Microsoft, &rt, Some(MS_SCOPES)).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Google: invalid_grant whatever the code; lifted with None.
    let (_, grt) = s.issue(Vendor::Google, "ops@customer.com");
    s.fail_refresh("ops@customer.com", Some(70008));
    let (status, body) = refresh(&s, Vendor::Google, &grt, None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(
        body["error_description"],
        "Token has been expired or revoked."
    );
    s.fail_refresh("ops@customer.com", None);
    let (status, body) = refresh(&s, Vendor::Google, &grt, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.get("refresh_token").is_none(),
        "Google does not rotate"
    );
    assert_eq!(s.refreshes(Vendor::Google).len(), 2);
}

#[tokio::test]
async fn the_consent_page_waits_for_the_click_and_still_refuses_a_bad_request_first() {
    let s = StandIns::start().await;
    s.set_consent(Vendor::Google, Consent::Approve("admin@example.com".into()));
    s.show_consent_page(Vendor::Google, true);
    // The request's checks come before any page, as at the provider.
    let bad = http()
        .get(format!(
            "{}/o/oauth2/v2/auth?response_type=code&client_id={CLIENT_ID}&redirect_uri={REDIRECT}&state=s",
            s.google_oauth.uri()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    // A page that names the account, with an "Accept" link back to the same request.
    let page = authorize(&s, Vendor::Google, "", GMAIL_SEND).await;
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("admin@example.com"), "{html}");
    let href = html
        .split("id=\"accept\" href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .replace("&amp;", "&");
    let clicked = http()
        .get(format!("{}{href}", s.google_oauth.uri()))
        .send()
        .await
        .unwrap();
    assert_eq!(clicked.status(), StatusCode::FOUND);
    let back = params(&location(&clicked).unwrap());
    assert_eq!(back["state"], "the-state");
    assert!(back.contains_key("code"), "{back:?}");
}

fn upload_url(s: &StandIns, upload_type: &str) -> String {
    format!(
        "{}/upload/gmail/v1/users/me/messages/send?uploadType={upload_type}",
        s.gmail.uri()
    )
}

/// A message of `len` bytes (headers, then filler).
fn message_of(len: usize) -> Vec<u8> {
    let mut m = b"From: ops@customer.com\r\nTo: a@example.org\r\nSubject: Big\r\n\r\n".to_vec();
    m.resize(len, b'x');
    m
}

#[tokio::test]
async fn gmail_refuses_a_simple_upload_over_5_mb_a_resumable_one_over_35_mb_and_an_upload_without_its_type()
 {
    let s = StandIns::start().await;
    let (token, _) = s.issue(Vendor::Google, "ops@customer.com");
    let media = |body: Vec<u8>| {
        http()
            .post(upload_url(&s, "media"))
            .bearer_auth(&token)
            .header("Content-Type", "message/rfc822")
            .body(body)
            .send()
    };
    assert_eq!(
        media(message_of(1024)).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        media(message_of(6 * 1024 * 1024)).await.unwrap().status(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "uploadType=media is for 5 MB or less"
    );
    let opened = http()
        .post(upload_url(&s, "resumable"))
        .bearer_auth(&token)
        .header("X-Upload-Content-Type", "message/rfc822")
        .header("X-Upload-Content-Length", 35 * 1024 * 1024 + 1)
        .send()
        .await
        .unwrap();
    assert_eq!(
        opened.status(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "35 MB at most"
    );
    let untyped = http()
        .post(format!(
            "{}/upload/gmail/v1/users/me/messages/send",
            s.gmail.uri()
        ))
        .bearer_auth(&token)
        .body(message_of(1024))
        .send()
        .await
        .unwrap();
    assert_eq!(untyped.status(), StatusCode::BAD_REQUEST);
    let body: Value = untyped.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("uploadType"),
        "{body}"
    );
    assert_eq!(
        s.gmail_messages().len(),
        1,
        "only the small simple upload was sent"
    );
}

#[tokio::test]
async fn a_gmail_resumable_upload_takes_256_kib_multiples_reports_its_progress_and_sends_at_the_last_chunk()
 {
    let s = StandIns::start().await;
    let (token, _) = s.issue(Vendor::Google, "ops@customer.com");
    let raw = message_of(600 * 1024);
    let opened = http()
        .post(upload_url(&s, "resumable"))
        .bearer_auth(&token)
        .header("X-Upload-Content-Type", "message/rfc822")
        .header("X-Upload-Content-Length", raw.len())
        .send()
        .await
        .unwrap();
    assert_eq!(opened.status(), StatusCode::OK);
    let session = location(&opened).expect("the session URI in Location");
    assert!(params(&session).contains_key("upload_id"));
    let put = |range: String, body: Vec<u8>| {
        http()
            .put(session.clone())
            .header("Content-Range", range)
            .body(body)
            .send()
    };
    let total = raw.len();
    let odd = put(format!("bytes 0-99999/{total}"), raw[..100_000].to_vec())
        .await
        .unwrap();
    assert_eq!(
        odd.status(),
        StatusCode::BAD_REQUEST,
        "not a multiple of 256 KiB"
    );
    let status = put(format!("bytes */{total}"), vec![]).await.unwrap();
    assert_eq!(status.status().as_u16(), 308);
    assert!(
        status.headers().get("range").is_none(),
        "nothing received yet"
    );
    let first = put(format!("bytes 0-262143/{total}"), raw[..262_144].to_vec())
        .await
        .unwrap();
    assert_eq!(first.status().as_u16(), 308);
    assert_eq!(first.headers()["range"], "bytes=0-262143");
    assert!(
        s.gmail_messages().is_empty(),
        "nothing is sent before the last chunk"
    );
    let last = put(
        format!("bytes 262144-{}/{total}", total - 1),
        raw[262_144..].to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(last.status(), StatusCode::OK);
    let sent: Value = last.json().await.unwrap();
    assert_eq!(sent["labelIds"], json!(["SENT"]));
    let again = put(format!("bytes */{total}"), vec![]).await.unwrap();
    assert_eq!(
        again.status(),
        StatusCode::OK,
        "a status query after the end says it was sent"
    );
    assert_eq!(s.gmail_messages(), vec![raw]);
}

#[tokio::test]
async fn graph_refuses_a_send_mail_request_over_4_mb_with_413() {
    let s = StandIns::start().await;
    let (token, _) = s.issue(Vendor::Microsoft, "ops@customer.com");
    let attachment = base64::engine::general_purpose::STANDARD.encode(vec![1u8; 3_200_000]);
    let resp = http()
        .post(format!("{}/v1.0/me/sendMail", s.graph.uri()))
        .bearer_auth(&token)
        .json(&json!({"message": {
            "subject": "Big",
            "toRecipients": [{"emailAddress": {"address": "a@example.org"}}],
            "attachments": [{"@odata.type": "#microsoft.graph.fileAttachment",
                "name": "big.bin", "contentBytes": attachment}],
        }}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(graph_code(&body), "RequestEntityTooLarge");
    assert!(s.graph_messages().is_empty());
}

/// `sendMail` from `account`'s own mailbox: (status, Retry-After, body).
async fn send_mail_full(s: &StandIns, token: &str) -> (StatusCode, Option<String>, Value) {
    let body = json!({"message": {
        "subject": "Hello", "body": {"contentType": "Text", "content": "Hi"},
        "toRecipients": [{"emailAddress": {"address": "someone@example.org"}}],
    }, "saveToSentItems": false});
    let resp = http()
        .post(format!("{}/v1.0/me/sendMail", s.graph.uri()))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    (
        status,
        retry_after,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn a_fifth_concurrent_graph_request_to_one_mailbox_is_429_application_throttled() {
    let s = StandIns::start().await;
    s.set_send_delay(std::time::Duration::from_millis(600));
    let (token, _) = s.issue(Vendor::Microsoft, "ops@customer.com");
    let (other, _) = s.issue(Vendor::Microsoft, "sales@customer.com");
    // Four in flight at once: Graph's limit per app and mailbox.
    let four: Vec<_> = (0..4)
        .map(|_| {
            let (s, token) = (s.clone(), token.clone());
            tokio::spawn(async move { send_mail_full(&s, &token).await })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while s.send_attempts(Vendor::Microsoft) < 4 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // The fifth is refused at once, as documented, with a Retry-After.
    let (status, retry_after, body) = send_mail_full(&s, &token).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(graph_code(&body), "ApplicationThrottled");
    assert_eq!(
        body["error"]["message"],
        "Application is over its MailboxConcurrency limit."
    );
    assert_eq!(retry_after.as_deref(), Some("1"));
    // Another mailbox has its own four.
    let (status, _, _) = send_mail_full(&s, &other).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    for t in four {
        assert_eq!(t.await.unwrap().0, StatusCode::ACCEPTED);
    }
    assert_eq!(s.concurrency_throttled("ops@customer.com"), 1);
    assert_eq!(s.concurrency_throttled("sales@customer.com"), 0);
    assert_eq!(s.peak_concurrency("ops@customer.com"), 4);
    // A limit on requests in flight, not a rate: once they answered, the
    // mailbox takes four more at once.
    let again: Vec<_> = (0..4)
        .map(|_| {
            let (s, token) = (s.clone(), token.clone());
            tokio::spawn(async move { send_mail_full(&s, &token).await.0 })
        })
        .collect();
    for t in again {
        assert_eq!(t.await.unwrap(), StatusCode::ACCEPTED);
    }
    assert_eq!(s.concurrency_throttled("ops@customer.com"), 1);
    assert_eq!(s.graph_messages().len(), 9);
}

/// A `sendMail` request as the product sends it, with extra message properties
/// and request headers; the raw answer.
async fn send_mail_with(
    s: &StandIns,
    token: &str,
    message: Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut m = json!({
        "subject": "Hello", "body": {"contentType": "Text", "content": "Hi"},
        "toRecipients": [{"emailAddress": {"address": "someone@example.org"}}],
    });
    for (k, v) in message.as_object().unwrap() {
        m[k] = v.clone();
    }
    let mut req = http()
        .post(format!("{}/v1.0/me/sendMail", s.graph.uri()))
        .bearer_auth(token)
        .json(&json!({"message": m, "saveToSentItems": false}));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn alice(s: &StandIns) -> AccountInfo {
    let mut info = s.account_info("alice@customer.com");
    info.display_name = "Alice Martin".into();
    info.proxy_addresses = vec![
        "SMTP:alice@customer.com".into(),
        "smtp:compliance@customer.com".into(),
    ];
    info
}

#[tokio::test]
async fn exchange_shows_the_directory_display_name_not_the_name_sent() {
    let s = StandIns::start().await;
    s.set_account("alice@customer.com", alice(&s));
    let (token, _) = s.issue(Vendor::Microsoft, "alice@customer.com");
    let (status, _) = send_mail(&s, &token, "alice@customer.com", "Compliance Team").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let got = s.received().pop().unwrap();
    assert_eq!(got.seen_from.name.as_deref(), Some("Alice Martin"));
    assert_eq!(got.seen_from.address, "alice@customer.com");
    assert_eq!(got.shown(), "Alice Martin <alice@customer.com>");
}

#[tokio::test]
async fn exchange_rewrites_an_alias_to_the_primary_address_unless_the_tenant_allows_aliases() {
    let s = StandIns::start().await;
    s.set_account("alice@customer.com", alice(&s));
    let (token, _) = s.issue(Vendor::Microsoft, "alice@customer.com");

    let (status, _) = send_mail(&s, &token, "compliance@customer.com", "Compliance").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let got = s.received().pop().unwrap();
    assert_eq!(got.from, "compliance@customer.com", "what was asked");
    assert_eq!(
        got.shown(),
        "Alice Martin <alice@customer.com>",
        "what is seen"
    );

    // Set-OrganizationConfig -SendFromAliasEnabled $true.
    s.allow_send_from_aliases("customer.com", true);
    send_mail(&s, &token, "compliance@customer.com", "Compliance").await;
    assert_eq!(
        s.received().pop().unwrap().shown(),
        "Alice Martin <compliance@customer.com>"
    );
    s.allow_send_from_aliases("customer.com", false);
    send_mail(&s, &token, "compliance@customer.com", "Compliance").await;
    assert_eq!(
        s.received().pop().unwrap().seen_from.address,
        "alice@customer.com"
    );
}

#[tokio::test]
async fn send_on_behalf_shows_the_user_on_behalf_of_the_mailbox() {
    let s = StandIns::start().await;
    s.set_account("alice@customer.com", alice(&s));
    let mut shared = s.account_info("notifications@customer.com");
    shared.display_name = "Customer Notifications".into();
    s.set_account("notifications@customer.com", shared);
    s.grant_send_on_behalf("alice@customer.com", "notifications@customer.com");

    // Send on Behalf rights still need Mail.Send.Shared.
    let (plain, _) = s.issue(Vendor::Microsoft, "alice@customer.com");
    let (status, body) = send_mail(&s, &plain, "notifications@customer.com", "N").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(graph_code(&body), "ErrorSendAsDenied");

    let (shared_scope, _) = s.issue_with_scopes(
        Vendor::Microsoft,
        "alice@customer.com",
        &[
            "openid",
            "offline_access",
            "User.Read",
            "Mail.Send",
            "Mail.Send.Shared",
        ],
    );
    let (status, _) = send_mail(&s, &shared_scope, "notifications@customer.com", "N").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        s.received().pop().unwrap().shown(),
        "Alice Martin on behalf of Customer Notifications <notifications@customer.com>"
    );

    // With Send As, the mailbox alone (its own directory name).
    s.grant_send_as("alice@customer.com", "notifications@customer.com");
    send_mail(&s, &shared_scope, "notifications@customer.com", "N").await;
    assert_eq!(
        s.received().pop().unwrap().shown(),
        "Customer Notifications <notifications@customer.com>"
    );
}

#[tokio::test]
async fn graph_echoes_the_client_request_id_and_dates_its_answers() {
    let s = StandIns::start().await;
    let (token, _) = s.issue(Vendor::Microsoft, "admin@customer.com");
    let id = "8d5e0f0a-2b0e-4c35-9d0c-3f5c4b6f6a11";
    let resp = send_mail_with(
        &s,
        &token,
        json!({}),
        &[
            ("client-request-id", id),
            ("return-client-request-id", "true"),
        ],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(resp.headers()["client-request-id"], id);
    assert!(!resp.headers()["request-id"].is_empty());
    assert!(
        chrono::DateTime::parse_from_rfc2822(resp.headers()["date"].to_str().unwrap()).is_ok(),
        "an HTTP Date"
    );
    // Without return-client-request-id, Graph does not echo it.
    let resp = send_mail_with(&s, &token, json!({}), &[("client-request-id", id)]).await;
    assert_ne!(resp.headers()["client-request-id"], id);
    // Refusals echo it too.
    let resp = send_mail_with(
        &s,
        "not-a-token",
        json!({}),
        &[
            ("client-request-id", id),
            ("return-client-request-id", "true"),
        ],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(resp.headers()["client-request-id"], id);
    let calls = s.graph_client_request_ids();
    assert_eq!(calls.len(), 3);
    assert!(
        calls
            .iter()
            .all(|(path, sent)| path == "/v1.0/me/sendMail" && sent.as_deref() == Some(id))
    );
}

#[tokio::test]
async fn graph_keeps_the_internet_message_id_sent_and_refuses_a_malformed_one() {
    let s = StandIns::start().await;
    let (token, _) = s.issue(Vendor::Microsoft, "admin@customer.com");
    let resp = send_mail_with(
        &s,
        &token,
        json!({"internetMessageId": "<job-1.org_42@customer.com>"}),
        &[],
    )
    .await;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    assert_eq!(
        s.received().pop().unwrap().message_id,
        "<job-1.org_42@customer.com>"
    );
    for bad in ["job-1.org_42@customer.com", "<no-at-sign>", "<a b@c>"] {
        let resp = send_mail_with(&s, &token, json!({"internetMessageId": bad}), &[]).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(graph_code(&body), "ErrorInvalidProperty");
    }
    // None given: Exchange makes one up.
    send_mail_with(&s, &token, json!({}), &[]).await;
    let made = s.received().pop().unwrap().message_id;
    assert!(
        made.starts_with('<') && made.ends_with(".PROD.OUTLOOK.COM>"),
        "{made}"
    );
    assert_eq!(s.received().len(), 2);
}

#[tokio::test]
async fn gmail_replaces_an_unverified_from_with_the_account_and_keeps_the_message_id() {
    let s = StandIns::start().await;
    let (token, _) = s.issue(Vendor::Google, "ops@customer.com");
    let send = |from: &'static str| {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
            "From: Team <{from}>\r\nTo: a@example.org\r\nSubject: Hi\r\nMessage-ID: <job-7.org@customer.com>\r\n\r\nHello\r\n"
        ));
        let token = token.clone();
        let url = format!("{}/gmail/v1/users/me/messages/send", s.gmail.uri());
        async move {
            http()
                .post(url)
                .bearer_auth(token)
                .json(&json!({"raw": raw}))
                .send()
                .await
                .unwrap()
        }
    };
    // Not the account, not an alias: 200 all the same, from the account.
    assert_eq!(send("team@customer.com").await.status(), StatusCode::OK);
    let got = s.received().pop().unwrap();
    assert_eq!(got.shown(), "Team <ops@customer.com>");
    assert_eq!(got.message_id, "<job-7.org@customer.com>");
    // A verified alias is kept.
    s.set_aliases("ops@customer.com", &["team@customer.com"]);
    send("team@customer.com").await;
    assert_eq!(
        s.received().pop().unwrap().shown(),
        "Team <team@customer.com>"
    );
}

const MS_LARGE_SCOPES: &[&str] = &[
    "offline_access",
    "openid",
    "User.Read",
    "Mail.Send",
    "Mail.ReadWrite",
];

async fn create_draft(s: &StandIns, token: &str) -> reqwest::Response {
    http()
        .post(format!("{}/v1.0/me/messages", s.graph.uri()))
        .bearer_auth(token)
        .json(&json!({
            "subject": "Export",
            "body": {"contentType": "Text", "content": "attached"},
            "from": {"emailAddress": {"address": "ops@customer.com"}},
            "toRecipients": [{"emailAddress": {"address": "a@example.org"}}],
        }))
        .send()
        .await
        .unwrap()
}

async fn draft_id(s: &StandIns, token: &str) -> String {
    let created = create_draft(s, token).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let body: Value = created.json().await.unwrap();
    assert_eq!(body["isDraft"], true);
    body["id"].as_str().unwrap().to_owned()
}

async fn open_upload(s: &StandIns, token: &str, id: &str, size: usize) -> reqwest::Response {
    http()
        .post(format!(
            "{}/v1.0/me/messages/{id}/attachments/createUploadSession",
            s.graph.uri()
        ))
        .bearer_auth(token)
        .json(
            &json!({"AttachmentItem": {"attachmentType": "file", "name": "export.bin",
            "size": size, "contentType": "application/octet-stream"}}),
        )
        .send()
        .await
        .unwrap()
}

async fn send_draft(s: &StandIns, token: &str, id: &str) -> reqwest::Response {
    http()
        .post(format!("{}/v1.0/me/messages/{id}/send", s.graph.uri()))
        .bearer_auth(token)
        .header("Content-Length", 0)
        .send()
        .await
        .unwrap()
}

async fn put_fragment(url: &str, range: String, body: Vec<u8>) -> reqwest::Response {
    http()
        .put(url)
        .header("Content-Range", range)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn graph_drafts_need_mail_read_write_and_sending_one_needs_mail_send() {
    let s = StandIns::start().await;
    let (send_only, _) = s.issue(Vendor::Microsoft, "ops@customer.com");
    let refused = create_draft(&s, &send_only).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        graph_code(&refused.json().await.unwrap()),
        "ErrorAccessDenied"
    );
    let (read_write_only, _) = s.issue_with_scopes(
        Vendor::Microsoft,
        "ops@customer.com",
        &["offline_access", "Mail.ReadWrite"],
    );
    let id = draft_id(&s, &read_write_only).await;
    let unsent = send_draft(&s, &read_write_only, &id).await;
    assert_eq!(
        unsent.status(),
        StatusCode::FORBIDDEN,
        "send needs Mail.Send"
    );
    let (both, _) = s.issue_with_scopes(Vendor::Microsoft, "ops@customer.com", MS_LARGE_SCOPES);
    assert_eq!(
        send_draft(&s, &both, &id).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(s.graph_messages().len(), 1);
    assert!(s.graph_drafts().is_empty(), "a sent draft is no draft");
    // Another mailbox's token does not reach this one's drafts.
    let id = draft_id(&s, &both).await;
    let (other, _) = s.issue_with_scopes(Vendor::Microsoft, "sales@customer.com", MS_LARGE_SCOPES);
    assert_eq!(
        send_draft(&s, &other, &id).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn a_graph_upload_session_takes_in_order_fragments_of_4_mb_at_most_without_authorization_and_sends_them_byte_for_byte()
 {
    let s = StandIns::start().await;
    let (token, _) = s.issue_with_scopes(Vendor::Microsoft, "ops@customer.com", MS_LARGE_SCOPES);
    let id = draft_id(&s, &token).await;
    let over = open_upload(&s, &token, &id, 150 * 1024 * 1024 + 1).await;
    assert_eq!(over.status(), StatusCode::BAD_REQUEST, "150 MB at most");
    let data: Vec<u8> = (0..5 * 1000 * 1000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let total = data.len();
    let opened = open_upload(&s, &token, &id, total).await;
    assert_eq!(opened.status(), StatusCode::CREATED);
    let session: Value = opened.json().await.unwrap();
    assert_eq!(session["nextExpectedRanges"], json!(["0"]));
    assert!(session["expirationDateTime"].is_string());
    let url = session["uploadUrl"].as_str().unwrap().to_owned();

    let with_token = http()
        .put(&url)
        .bearer_auth(&token)
        .header("Content-Range", format!("bytes 0-99/{total}"))
        .body(data[..100].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(
        with_token.status(),
        StatusCode::UNAUTHORIZED,
        "the upload URL is pre-authenticated"
    );
    let big = 4 * 1024 * 1024 + 1;
    let too_big = put_fragment(
        &url,
        format!("bytes 0-{}/{total}", big - 1),
        data[..big].to_vec(),
    )
    .await;
    assert_eq!(
        too_big.status(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "4 MB a fragment"
    );
    let skipped = put_fragment(
        &url,
        format!("bytes 1000-1999/{total}"),
        data[1000..2000].to_vec(),
    )
    .await;
    assert_eq!(skipped.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(graph_code(&skipped.json().await.unwrap()), "InvalidRange");
    let mismatch = put_fragment(&url, format!("bytes 0-999/{total}"), data[..10].to_vec()).await;
    assert_eq!(
        mismatch.status(),
        StatusCode::BAD_REQUEST,
        "range and body disagree"
    );

    let first = put_fragment(
        &url,
        format!("bytes 0-3276799/{total}"),
        data[..3_276_800].to_vec(),
    )
    .await;
    assert_eq!(first.status(), StatusCode::OK);
    let progress: Value = first.json().await.unwrap();
    assert_eq!(progress["nextExpectedRanges"], json!(["3276800"]));
    let again = put_fragment(
        &url,
        format!("bytes 0-3276799/{total}"),
        data[..3_276_800].to_vec(),
    )
    .await;
    assert_eq!(
        again.status(),
        StatusCode::RANGE_NOT_SATISFIABLE,
        "a fragment already taken is out of order"
    );
    let last = put_fragment(
        &url,
        format!("bytes 3276800-{}/{total}", total - 1),
        data[3_276_800..].to_vec(),
    )
    .await;
    assert_eq!(last.status(), StatusCode::CREATED);
    assert!(
        last.headers()["location"]
            .to_str()
            .unwrap()
            .contains("/Attachments('"),
        "the attachment's URL"
    );
    assert!(s.graph_messages().is_empty(), "nothing sent before /send");
    assert_eq!(
        send_draft(&s, &token, &id).await.status(),
        StatusCode::ACCEPTED
    );
    let sent = s.graph_messages().pop().unwrap();
    let attachment = &sent["message"]["attachments"][0];
    assert_eq!(attachment["name"], "export.bin");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(attachment["contentBytes"].as_str().unwrap())
        .unwrap();
    assert!(bytes == data, "the attachment arrived byte for byte");
}

#[tokio::test]
async fn a_graph_upload_session_expires_without_fragments() {
    let s = StandIns::start().await;
    s.set_graph_upload_session_ttl(std::time::Duration::from_millis(300));
    let (token, _) = s.issue_with_scopes(Vendor::Microsoft, "ops@customer.com", MS_LARGE_SCOPES);
    let id = draft_id(&s, &token).await;
    let session: Value = open_upload(&s, &token, &id, 4000)
        .await
        .json()
        .await
        .unwrap();
    let url = session["uploadUrl"].as_str().unwrap().to_owned();
    // Each fragment extends the session.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let first = put_fragment(&url, "bytes 0-999/4000".into(), vec![1; 1000]).await;
    assert_eq!(first.status(), StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let second = put_fragment(&url, "bytes 1000-1999/4000".into(), vec![2; 1000]).await;
    assert_eq!(second.status(), StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let expired = put_fragment(&url, "bytes 2000-3999/4000".into(), vec![3; 2000]).await;
    assert_eq!(expired.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        graph_code(&expired.json().await.unwrap()),
        "ErrorItemNotFound"
    );
}

#[tokio::test]
async fn a_graph_draft_over_the_tenants_maximum_size_is_refused_at_send_and_a_deleted_draft_is_gone()
 {
    let s = StandIns::start().await;
    s.set_graph_max_message_bytes(1_000_000);
    let (token, _) = s.issue_with_scopes(Vendor::Microsoft, "ops@customer.com", MS_LARGE_SCOPES);
    let id = draft_id(&s, &token).await;
    let attach = |bytes: Vec<u8>| {
        http()
            .post(format!(
                "{}/v1.0/me/messages/{id}/attachments",
                s.graph.uri()
            ))
            .bearer_auth(&token)
            .json(&json!({"@odata.type": "#microsoft.graph.fileAttachment",
                "name": "a.bin", "contentType": "application/octet-stream",
                "contentBytes": base64::engine::general_purpose::STANDARD.encode(bytes)}))
            .send()
    };
    // 800 kB is 1.07 MB in base64: over the tenant's maximum once sent.
    assert_eq!(
        attach(vec![7; 800_000]).await.unwrap().status(),
        StatusCode::CREATED
    );
    let refused = send_draft(&s, &token, &id).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        graph_code(&refused.json().await.unwrap()),
        "ErrorMessageSizeExceeded"
    );
    assert!(s.graph_messages().is_empty());
    let deleted = http()
        .delete(format!("{}/v1.0/me/messages/{id}", s.graph.uri()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_eq!(s.graph_deleted_drafts(), vec![id.clone()]);
    assert!(s.graph_drafts().is_empty());
    assert_eq!(
        send_draft(&s, &token, &id).await.status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn gmail_over_the_users_rolling_sending_limit_is_429_user_rate_limit_exceeded_and_suspends_the_user()
 {
    let s = StandIns::start().await;
    let window = std::time::Duration::from_secs(2);
    s.set_sending_quota(
        "ops@customer.com",
        Some(SendingQuota {
            messages: Some(2),
            ..SendingQuota::google_workspace(window)
        }),
    );
    let (token, _) = s.issue(Vendor::Google, "ops@customer.com");
    for _ in 0..2 {
        assert_eq!(gmail_send(&s, &token).await.status(), StatusCode::OK);
    }
    let resp = gmail_send(&s, &token).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["errors"][0]["reason"], "rateLimitExceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("User-rate limit exceeded.  Retry after ")
            && message.ends_with("(Mail sending)"),
        "{message}"
    );
    // "Can't send new messages for up to 24 hours": suspended for the window,
    // even once the first sends left it.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        gmail_send(&s, &token).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    tokio::time::sleep(window).await;
    assert_eq!(gmail_send(&s, &token).await.status(), StatusCode::OK);
    assert_eq!(s.quota_refusals("ops@customer.com"), 2);
    assert_eq!(s.gmail_messages().len(), 3);
}

#[tokio::test]
async fn gmail_counts_external_recipients_against_the_users_external_limit() {
    let s = StandIns::start().await;
    s.set_sending_quota(
        "ops@customer.com",
        Some(SendingQuota {
            external_recipients: Some(1),
            ..SendingQuota::google_workspace(std::time::Duration::from_secs(60))
        }),
    );
    let (token, _) = s.issue(Vendor::Google, "ops@customer.com");
    // From ops@customer.com to a@example.org: one external recipient.
    assert_eq!(gmail_send(&s, &token).await.status(), StatusCode::OK);
    assert_eq!(
        gmail_send(&s, &token).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

/// Google's unique recipients per day: "individual addresses count once a
/// day" (3,000, of which 2,000 external): a repeated address adds nothing, a
/// new one past the limit is refused like the other limits.
#[tokio::test]
async fn gmail_counts_each_address_once_against_the_users_unique_recipient_limits() {
    let s = StandIns::start().await;
    s.set_sending_quota(
        "ops@customer.com",
        Some(SendingQuota {
            unique_recipients: Some(3),
            unique_external_recipients: Some(2),
            ..SendingQuota::google_workspace(std::time::Duration::from_secs(60))
        }),
    );
    let (token, _) = s.issue(Vendor::Google, "ops@customer.com");
    for to in [
        "a@example.org",
        "b@example.org",
        "A@example.org",
        "b@example.org",
    ] {
        assert_eq!(
            gmail_send_to(&s, &token, to).await.status(),
            StatusCode::OK,
            "{to}"
        );
    }
    // A third external address: over the 2 unique external.
    let resp = gmail_send_to(&s, &token, "c@example.org").await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["errors"][0]["reason"], "rateLimitExceeded");

    // And the total of unique addresses, internal ones included.
    let s = StandIns::start().await;
    s.set_sending_quota(
        "ops@customer.com",
        Some(SendingQuota {
            unique_recipients: Some(2),
            ..SendingQuota::google_workspace(std::time::Duration::from_secs(60))
        }),
    );
    let (token, _) = s.issue(Vendor::Google, "ops@customer.com");
    for to in ["x@customer.com", "y@customer.com", "x@customer.com"] {
        assert_eq!(
            gmail_send_to(&s, &token, to).await.status(),
            StatusCode::OK,
            "{to}"
        );
    }
    assert_eq!(
        gmail_send_to(&s, &token, "z@customer.com").await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn exchange_over_the_recipient_rate_limit_accepts_the_send_and_bounces_it() {
    let s = StandIns::start().await;
    s.set_sending_quota(
        "admin@customer.com",
        Some(SendingQuota {
            recipients: Some(1),
            ..SendingQuota::exchange_online(std::time::Duration::from_secs(60))
        }),
    );
    let (token, _) = s.issue(Vendor::Microsoft, "admin@customer.com");
    let (status, _) = send_mail(&s, &token, "admin@customer.com", "Admin").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Graph says 202 all the same: the recipient rate limit shows up as an NDR.
    let (status, _) = send_mail(&s, &token, "admin@customer.com", "Admin").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(s.received().len(), 1, "delivered");
    assert_eq!(s.bounced().len(), 1, "bounced (NDR 5.2.2)");
    assert_eq!(s.quota_refusals("admin@customer.com"), 1);
}

#[tokio::test]
async fn a_used_up_google_project_quota_refuses_every_account_with_429_rate_limit_exceeded() {
    let s = StandIns::start().await;
    let (alice, _) = s.issue(Vendor::Google, "alice@one.example");
    let (bob, _) = s.issue(Vendor::Google, "bob@two.example");
    s.exhaust_gmail_project_quota(std::time::Duration::from_millis(400));
    // Every user of the project is refused, not only the one that used it up.
    for token in [&alice, &bob] {
        let resp = gmail_send(&s, token).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["errors"][0]["reason"], "rateLimitExceeded");
        assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(body["error"]["details"][0]["reason"], "RATE_LIMIT_EXCEEDED");
        let message = body["error"]["message"].as_str().unwrap();
        // The project's limit, not a user's: no "per user", no time to retry at.
        assert!(message.contains("'Queries per minute'"), "{message}");
        assert!(!message.contains("per user") && !message.contains("Retry after"));
    }
    assert_eq!(s.project_throttled("alice@one.example"), 1);
    assert_eq!(s.project_throttled("bob@two.example"), 1);
    assert!(s.gmail_messages().is_empty());
    // A per-user limit stays the user's: the other user still sends.
    tokio::time::sleep(std::time::Duration::from_millis(450)).await;
    s.set_mailbox_limit("alice@one.example", Some(0.001));
    assert_eq!(gmail_send(&s, &alice).await.status(), StatusCode::OK);
    let resp = gmail_send(&s, &alice).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("User-rate limit exceeded.  Retry after ")
    );
    assert_eq!(gmail_send(&s, &bob).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_mailbox_blocked_from_sending_is_403_error_message_submission_blocked() {
    let s = StandIns::start().await;
    let (token, _) = s.issue(Vendor::Microsoft, "ops@customer.com");
    let (other, _) = s.issue(Vendor::Microsoft, "sales@customer.com");
    s.block_sending("ops@customer.com");
    let (status, body) = send_mail(&s, &token, "ops@customer.com", "Ops").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(graph_code(&body), "ErrorMessageSubmissionBlocked");
    // Only that account: the tenant's other mailboxes send.
    let (status, _) = send_mail(&s, &other, "sales@customer.com", "Sales").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(s.graph_messages().len(), 1);
    // Until an admin releases it.
    s.unblock_sending("ops@customer.com");
    let (status, _) = send_mail(&s, &token, "ops@customer.com", "Ops").await;
    assert_eq!(status, StatusCode::ACCEPTED);
}
