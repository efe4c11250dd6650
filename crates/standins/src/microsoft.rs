//! Microsoft identity platform (authorize, admin consent, token) and Microsoft
//! Graph (`/me`, `sendMail`) stand-ins, with the refusals of the real services.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value, json};
use wiremock::{Request, Respond, ResponseTemplate};

use super::faults::{
    CONCURRENCY_RETRY_AFTER_SECS, RefreshContext, entra_refresh_failure, graph_access_denied,
    graph_authorization_denied, graph_error, graph_send_as_denied, graph_submission_blocked,
    graph_throttled, graph_unavailable, microsoft_token_error,
};
use super::{
    AccountInfo, Consent, Grant, Received, State, Vendor, domain_of, error_page, exchange_code,
    form, has_scope, normalize_scopes, query, redirect_back, unsigned_jwt, uuid_from,
};

pub(super) const GRAPH: &str = "https://graph.microsoft.com/";

/// The tenant id of every personal Microsoft account
/// (https://learn.microsoft.com/entra/identity-platform/id-token-claims-reference, `iss`).
pub(super) const CONSUMERS_TENANT: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";

/// What the product asks for (and `StandIns::issue` grants).
pub(super) const DEFAULT_SCOPES: &[&str] = &[
    "openid",
    "email",
    "profile",
    "offline_access",
    "https://graph.microsoft.com/User.Read",
    "https://graph.microsoft.com/Mail.Send",
];

/// OpenID Connect scopes: not Graph permissions, never prefixed
/// (https://learn.microsoft.com/entra/identity-platform/scopes-oidc#openid-connect-scopes).
const OIDC_SCOPES: &[&str] = &["openid", "email", "profile", "offline_access"];

/// Delegated permissions that let `GET /me` read the signed-in user: `User.Read`
/// or a broader one (https://learn.microsoft.com/en-us/graph/api/user-get#permissions).
const USER_READ: &[&str] = &[
    "User.Read",
    "User.ReadWrite",
    "User.ReadBasic.All",
    "User.Read.All",
    "User.ReadWrite.All",
    "Directory.Read.All",
    "Directory.ReadWrite.All",
    "Directory.AccessAsUser.All",
];

/// `Mail.Send` and `Mail.Send.Shared` both let the user send as themselves
/// (https://learn.microsoft.com/en-us/graph/api/user-sendmail#permissions).
pub(super) const MAIL_SEND: &[&str] = &["Mail.Send", "Mail.Send.Shared"];

/// `Mail.Send` and `https://graph.microsoft.com/Mail.Send` are the same scope:
/// a bare name is a Microsoft Graph permission
/// (https://learn.microsoft.com/entra/identity-platform/scopes-oidc).
pub(super) fn normalize_scope(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    if OIDC_SCOPES.contains(&lower.as_str()) {
        lower
    } else if lower.starts_with(GRAPH) {
        format!("{GRAPH}{}", &s[GRAPH.len()..])
    } else if s.contains("://") {
        s.to_owned()
    } else {
        format!("{GRAPH}{s}")
    }
}

fn has_graph(scopes: &[String], permission: &str) -> bool {
    has_scope(scopes, &format!("{GRAPH}{permission}"))
}

/// Claims of a v2.0 ID token (https://learn.microsoft.com/entra/identity-platform/id-token-claims-reference):
/// `email` only when the account has a mailbox address.
fn id_token(info: &AccountInfo, account: &str, client_id: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    let tid = info.effective_tenant();
    let mut claims = json!({
        "ver": "2.0",
        "iss": format!("https://login.microsoftonline.com/{tid}/v2.0"),
        "aud": client_id,
        "iat": now, "nbf": now, "exp": now + 3600,
        "oid": info.id,
        "tid": tid,
        // `sub` is pairwise: one value per user and application.
        "sub": uuid_from(&format!("sub:{}:{client_id}", info.id)),
        "preferred_username": account,
        "name": info.display_name,
    });
    if let Some(mail) = &info.mail {
        claims["email"] = json!(mail);
    }
    unsigned_jwt(&claims)
}

/// Why this account cannot sign in through this authority, as an error page
/// (Entra shows these on its own page; nothing goes back to the client).
fn sign_in_refused(
    info: &AccountInfo,
    account: &str,
    tenant: &str,
    client_id: &str,
) -> Option<ResponseTemplate> {
    let t = tenant.to_ascii_lowercase();
    match t.as_str() {
        "common" | "consumers" => None,
        // https://github.com/files-community/Files/issues/17852 (AADSTS500200 on an
        // organizations-only app).
        "organizations" if info.personal => Some(error_page(
            400,
            &format!(
                "AADSTS500200: User account '{account}' is a personal Microsoft account. Personal Microsoft accounts are not supported for this application unless explicitly invited to an organization. Try signing out and signing back in with an organizational account."
            ),
        )),
        "organizations" => None,
        // A tenant id or domain: the account must belong to it (AADSTS50020,
        // https://learn.microsoft.com/entra/identity-platform/reference-error-codes#aadsts-error-codes).
        _ if !info.personal
            && (t == info.tenant_id.to_ascii_lowercase() || t == domain_of(account)) =>
        {
            None
        }
        _ => Some(error_page(
            400,
            &not_in_tenant(info, account, tenant, client_id),
        )),
    }
}

fn not_in_tenant(info: &AccountInfo, account: &str, tenant: &str, client_id: &str) -> String {
    let idp = if info.personal {
        "live.com".to_owned()
    } else {
        format!("https://sts.windows.net/{}/", info.tenant_id)
    };
    format!(
        "AADSTS50020: User account '{account}' from identity provider '{idp}' does not exist in tenant '{tenant}' and cannot access the application '{client_id}'({client_id}) in that tenant. The account needs to be added as an external user in the tenant first. Sign out and sign in again with a different Azure Active Directory user account."
    )
}

fn trace_suffix() -> String {
    format!(
        "\r\nTrace ID: {}\r\nCorrelation ID: {}\r\nTimestamp: {}",
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ")
    )
}

/// Whether an admin of the account's tenant consented to these scopes for this client.
fn admin_consented(
    s: &State,
    info: &AccountInfo,
    account: &str,
    client_id: &str,
    scopes: &[String],
) -> bool {
    [info.tenant_id.to_ascii_lowercase(), domain_of(account)]
        .into_iter()
        .filter_map(|key| s.admin_consents.get(&(key, client_id.to_owned())))
        .any(|consented| {
            has_graph(consented, ".default") || scopes.iter().all(|x| has_scope(consented, x))
        })
}

/// The authorize endpoint once the request is well formed.
pub(super) fn authorize(
    s: &mut State,
    q: &HashMap<String, String>,
    tenant: &str,
    back: url::Url,
    consent: Option<Consent>,
) -> ResponseTemplate {
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
    let account = match consent {
        // Microsoft has no granular consent: a partial approval is an approval.
        Some(Consent::Approve(a)) | Some(Consent::Partial { account: a, .. }) => a,
        Some(Consent::Deny) | None => return super::consent_denied(back, get("state")),
    };
    let info = s.account_info(&account);
    if let Some(page) = sign_in_refused(&info, &account, tenant, get("client_id")) {
        return page;
    }
    let scopes = normalize_scopes(Vendor::Microsoft, get("scope"));
    if s.consent_blocked.contains(&domain_of(&account))
        && !admin_consented(s, &info, &account, get("client_id"), &scopes)
    {
        // The user may not consent and no admin has: "Need admin approval", and
        // back to the app with access_denied. Code and message:
        // https://learn.microsoft.com/entra/identity/enterprise-apps/application-sign-in-unexpected-user-consent-error
        // (AADSTS90094); redirect error shape:
        // https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow#error-response
        let description = format!(
            "AADSTS90094: {} needs permission to access resources in your organization that only an admin can grant. Please ask an admin to grant permission to this app before you can use it.{}",
            get("client_id"),
            trace_suffix()
        );
        return redirect_back(
            back,
            &[
                ("error", "access_denied"),
                ("error_description", &description),
                (
                    "error_uri",
                    "https://login.microsoftonline.com/error?code=90094",
                ),
                ("state", get("state")),
            ],
        );
    }
    let code = s.issue_code(Vendor::Microsoft, account, q, scopes);
    redirect_back(back, &[("code", &code), ("state", get("state"))])
}

/// `GET /{tenant}/v2.0/adminconsent`
/// (https://learn.microsoft.com/entra/identity-platform/v2-admin-consent).
pub(super) struct AdminConsent(pub(super) Arc<Mutex<State>>);
impl Respond for AdminConsent {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let q = query(request);
        s.admin_consent_requests.push(q.clone());
        let get = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
        let tenant = request
            .url
            .path_segments()
            .and_then(|mut p| p.next())
            .unwrap_or_default()
            .to_owned();
        // "Do not use 'common', as personal accounts cannot provide admin consent
        // except in the context of a tenant" (v2-admin-consent, `tenant`).
        if tenant.eq_ignore_ascii_case("common") || tenant.eq_ignore_ascii_case("consumers") {
            return error_page(
                400,
                &format!(
                    "invalid_request: the admin consent endpoint needs a tenant ('organizations', a tenant id or a domain), not '{tenant}': personal accounts cannot provide admin consent except in the context of a tenant."
                ),
            );
        }
        if get("client_id").is_empty() || get("scope").is_empty() {
            return error_page(
                400,
                "AADSTS900144: The request body must contain the following parameter: 'client_id' and 'scope'.",
            );
        }
        let Ok(back) = url::Url::parse(get("redirect_uri")) else {
            return error_page(400, "AADSTS900971: No reply address provided.");
        };
        let state = get("state");
        let account = match s.consent.get(&Vendor::Microsoft).cloned() {
            Some(Consent::Approve(a)) | Some(Consent::Partial { account: a, .. }) => a,
            // The admin cancels: access_denied with AADSTS65004, admin_consent=True
            // (as observed: https://github.com/MicrosoftDocs/azure-docs/issues/114009).
            Some(Consent::Deny) | None => {
                let description = format!(
                    "AADSTS65004: User declined to consent to access the app.{}",
                    trace_suffix()
                );
                return redirect_back(
                    back,
                    &[
                        ("error", "access_denied"),
                        ("error_description", &description),
                        (
                            "error_uri",
                            "https://login.microsoftonline.com/error?code=65004",
                        ),
                        ("admin_consent", "True"),
                        ("state", state),
                    ],
                );
            }
        };
        let info = s.account_info(&account);
        if tenant.eq_ignore_ascii_case("organizations") && info.personal {
            return sign_in_refused(&info, &account, &tenant, get("client_id"))
                .expect("personal accounts are refused on organizations");
        }
        let t = tenant.to_ascii_lowercase();
        if !t.eq("organizations")
            && (info.personal
                || (t != info.tenant_id.to_ascii_lowercase() && t != domain_of(&account)))
        {
            // An admin of another directory (same issue thread as AADSTS65004).
            let description = format!(
                "{}{}",
                not_in_tenant(&info, &account, &tenant, get("client_id")),
                trace_suffix()
            );
            return redirect_back(
                back,
                &[
                    ("error", "access_denied"),
                    ("error_description", &description),
                    (
                        "error_uri",
                        "https://login.microsoftonline.com/error?code=50020",
                    ),
                    ("admin_consent", "True"),
                    ("state", state),
                ],
            );
        }
        let scopes = normalize_scopes(Vendor::Microsoft, get("scope"));
        for key in [info.tenant_id.to_ascii_lowercase(), domain_of(&account)] {
            let consented = s
                .admin_consents
                .entry((key, get("client_id").to_owned()))
                .or_default();
            for x in &scopes {
                if !has_scope(consented, x) {
                    consented.push(x.clone());
                }
            }
        }
        redirect_back(
            back,
            &[
                ("admin_consent", "True"),
                ("tenant", &info.tenant_id),
                ("scope", &scopes.join(" ")),
                ("state", state),
            ],
        )
    }
}

/// `POST /{tenant}/oauth2/v2.0/token`: authorization-code and refresh-token grants.
pub(super) struct Token(pub(super) Arc<Mutex<State>>);
impl Respond for Token {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let f = form(request);
        s.token_requests.push((Vendor::Microsoft, f.clone()));
        match f.get("grant_type").map(String::as_str) {
            Some("authorization_code") => redeem_code(&mut s, &f),
            Some("refresh_token") => refresh(&mut s, &f),
            _ => microsoft_token_error(
                9002313,
                "invalid_grant",
                "Invalid request. Request is malformed or invalid.",
            ),
        }
    }
}

/// A token response for `scopes`: a refresh token only with `offline_access`, an
/// ID token only with `openid`
/// (https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow#successful-response-2).
fn token_response(
    s: &mut State,
    account: &str,
    client_id: &str,
    scopes: Vec<String>,
    refresh_grant: Grant,
) -> Value {
    let grant = Grant {
        vendor: Vendor::Microsoft,
        account: account.to_owned(),
        scopes: scopes.clone(),
    };
    let access = s.mint_access(grant);
    let mut body = json!({
        "token_type": "Bearer", "scope": scopes.join(" "), "expires_in": 3599, "ext_expires_in": 3599,
        "access_token": access,
    });
    if has_scope(&scopes, "offline_access") {
        body["refresh_token"] = json!(s.mint_refresh(refresh_grant));
    }
    if has_scope(&scopes, "openid") {
        let info = s.account_info(account);
        body["id_token"] = json!(id_token(&info, account, client_id));
    }
    body
}

fn redeem_code(s: &mut State, f: &HashMap<String, String>) -> ResponseTemplate {
    match exchange_code(s, Vendor::Microsoft, f) {
        Ok(issued) => {
            let grant = Grant {
                vendor: Vendor::Microsoft,
                account: issued.account.clone(),
                scopes: issued.scopes.clone(),
            };
            let body = token_response(s, &issued.account, &issued.client_id, issued.scopes, grant);
            ResponseTemplate::new(200).set_body_json(body)
        }
        Err(why) => microsoft_token_error(
            70000,
            "invalid_grant",
            &format!("The provided value for the 'code' parameter is not valid. ({why})"),
        ),
    }
}

/// The refresh grant (https://learn.microsoft.com/entra/identity-platform/v2-oauth2-auth-code-flow#refresh-the-access-token):
/// the requested scopes must have been granted (else AADSTS65001), the new
/// access token carries them, and a new refresh token comes back only when the
/// request asks for `offline_access`. A request without `scope` gets the granted
/// scopes (the docs mark `scope` required; Entra tolerates its absence).
fn refresh(s: &mut State, f: &HashMap<String, String>) -> ResponseTemplate {
    let delay = s.token_delay;
    let grant = f
        .get("refresh_token")
        .and_then(|t| s.refresh.get(t))
        .cloned()
        .filter(|g| g.vendor == Vendor::Microsoft);
    let Some(grant) = grant else {
        return microsoft_token_error(
            9002313,
            "invalid_grant",
            "Invalid request. Request is malformed or invalid.",
        );
    };
    let client_id = f.get("client_id").cloned().unwrap_or_default();
    if s.revoked_accounts.contains(&grant.account) {
        return microsoft_token_error(
            70008,
            "invalid_grant",
            "The provided authorization code or refresh token has expired due to inactivity.",
        );
    }
    let info = s.account_info(&grant.account);
    let context = RefreshContext {
        client_id: &client_id,
        account: &grant.account,
        tenant_id: info.effective_tenant(),
    };
    if let Some(&code) = s.refresh_failures.get(&grant.account) {
        return entra_refresh_failure(code, &context);
    }
    let requested = match f.get("scope") {
        Some(sc) if !sc.trim().is_empty() => normalize_scopes(Vendor::Microsoft, sc),
        _ => grant.scopes.clone(),
    };
    let mut scopes: Vec<String> = Vec::new();
    for x in requested {
        if x.eq_ignore_ascii_case(&format!("{GRAPH}.default")) {
            // `.default`: every Graph permission of the grant.
            for g in grant.scopes.iter().filter(|g| g.starts_with(GRAPH)) {
                if !has_scope(&scopes, g) {
                    scopes.push(g.clone());
                }
            }
        } else if !has_scope(&grant.scopes, &x) {
            return entra_refresh_failure(65001, &context);
        } else if !has_scope(&scopes, &x) {
            scopes.push(x);
        }
    }
    let body = token_response(s, &grant.account, &client_id, scopes, grant.clone());
    ResponseTemplate::new(200)
        .set_delay(delay)
        .set_body_json(body)
}

/// Graph `GET /v1.0/me`: needs `User.Read` or a broader user permission; honours
/// `$select` (https://learn.microsoft.com/en-us/graph/api/user-get).
pub(super) struct GraphMe(pub(super) Arc<Mutex<State>>);
impl Respond for GraphMe {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let response = me(&s, request);
        with_request_ids(&mut s, request, response)
    }
}

fn me(s: &State, request: &Request) -> ResponseTemplate {
    {
        let Some(grant) = s.bearer_grant(request, Vendor::Microsoft) else {
            return graph_error(401, "InvalidAuthenticationToken", "Access token is empty.");
        };
        if !USER_READ.iter().any(|p| has_graph(&grant.scopes, p)) {
            return graph_authorization_denied();
        }
        let info = s.account_info(&grant.account);
        let user = user_properties(&info, &grant.account);
        let select = query(request).get("$select").cloned();
        let body = match select {
            None => {
                let mut m = Map::new();
                m.insert(
                    "@odata.context".into(),
                    json!("https://graph.microsoft.com/v1.0/$metadata#users/$entity"),
                );
                // The default property set of a user (proxyAddresses only on $select).
                for p in [
                    "businessPhones",
                    "displayName",
                    "givenName",
                    "jobTitle",
                    "mail",
                    "mobilePhone",
                    "officeLocation",
                    "preferredLanguage",
                    "surname",
                    "userPrincipalName",
                    "id",
                ] {
                    m.insert(p.into(), user.get(p).cloned().unwrap_or(Value::Null));
                }
                Value::Object(m)
            }
            Some(list) => {
                let mut picked: Vec<(&'static str, Value)> = Vec::new();
                for wanted in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
                    let Some(name) = USER_PROPERTIES
                        .iter()
                        .find(|p| p.eq_ignore_ascii_case(wanted))
                    else {
                        return graph_error(
                            400,
                            "BadRequest",
                            &format!(
                                "Parsing OData Select and Expand failed: Could not find a property named '{wanted}' on type 'microsoft.graph.user'."
                            ),
                        );
                    };
                    if !picked.iter().any(|(n, _)| n == name) {
                        picked.push((name, user.get(*name).cloned().unwrap_or(Value::Null)));
                    }
                }
                let names: Vec<&str> = picked.iter().map(|(n, _)| *n).collect();
                let mut m = Map::new();
                m.insert(
                    "@odata.context".into(),
                    json!(format!(
                        "https://graph.microsoft.com/v1.0/$metadata#users({})/$entity",
                        names.join(",")
                    )),
                );
                for (n, v) in picked {
                    m.insert(n.into(), v);
                }
                Value::Object(m)
            }
        };
        let id = uuid::Uuid::new_v4().to_string();
        ResponseTemplate::new(200)
            .set_body_json(body)
            .insert_header("request-id", id.as_str())
            .insert_header("client-request-id", id.as_str())
    }
}

/// Properties of `microsoft.graph.user` (v1.0) that `$select` accepts; those the
/// stand-in does not model read as null.
const USER_PROPERTIES: &[&str] = &[
    "aboutMe",
    "accountEnabled",
    "ageGroup",
    "assignedLicenses",
    "assignedPlans",
    "birthday",
    "businessPhones",
    "city",
    "companyName",
    "country",
    "createdDateTime",
    "creationType",
    "department",
    "displayName",
    "employeeHireDate",
    "employeeId",
    "employeeType",
    "externalUserState",
    "faxNumber",
    "givenName",
    "hireDate",
    "id",
    "identities",
    "imAddresses",
    "interests",
    "jobTitle",
    "mail",
    "mailNickname",
    "mobilePhone",
    "mySite",
    "officeLocation",
    "onPremisesDomainName",
    "onPremisesSamAccountName",
    "onPremisesSyncEnabled",
    "onPremisesUserPrincipalName",
    "otherMails",
    "pastProjects",
    "postalCode",
    "preferredDataLocation",
    "preferredLanguage",
    "preferredName",
    "proxyAddresses",
    "responsibilities",
    "schools",
    "showInAddressList",
    "skills",
    "state",
    "streetAddress",
    "surname",
    "usageLocation",
    "userPrincipalName",
    "userType",
];

fn user_properties(info: &AccountInfo, account: &str) -> Map<String, Value> {
    let (given, surname) = match info.display_name.split_once(' ') {
        Some((g, rest)) => (json!(g), json!(rest)),
        None => (json!(info.display_name), Value::Null),
    };
    let local = account.split('@').next().unwrap_or_default();
    let mut m = Map::new();
    m.insert("id".into(), json!(info.id));
    m.insert("displayName".into(), json!(info.display_name));
    m.insert("givenName".into(), given);
    m.insert("surname".into(), surname);
    m.insert("jobTitle".into(), Value::Null);
    m.insert(
        "mail".into(),
        info.mail.as_ref().map_or(Value::Null, |x| json!(x)),
    );
    m.insert("userPrincipalName".into(), json!(account));
    m.insert("proxyAddresses".into(), json!(info.proxy_addresses));
    m.insert("preferredLanguage".into(), json!("fr-FR"));
    m.insert("businessPhones".into(), json!([]));
    m.insert("mobilePhone".into(), Value::Null);
    m.insert("officeLocation".into(), Value::Null);
    m.insert("mailNickname".into(), json!(local));
    m.insert("otherMails".into(), json!([]));
    m.insert("imAddresses".into(), json!([]));
    m.insert("accountEnabled".into(), json!(true));
    m.insert("userType".into(), json!("Member"));
    m
}

/// Whether `address` is the account's own: its `mail`, its UPN, or one of its
/// proxy addresses (`SMTP:`/`smtp:` prefixes ignored).
fn own_address(info: &AccountInfo, account: &str, address: &str) -> bool {
    address.eq_ignore_ascii_case(account)
        || info
            .mail
            .as_deref()
            .is_some_and(|m| m.eq_ignore_ascii_case(address))
        || info.proxy_addresses.iter().any(|p| {
            let bare = p.split_once(':').map_or(p.as_str(), |(_, a)| a);
            bare.eq_ignore_ascii_case(address)
        })
}

/// Graph's request ids: `request-id` is Graph's own; `client-request-id` echoes
/// the caller's when it sent one (and asked for it back with
/// `return-client-request-id: true`), else it is a new one
/// (https://learn.microsoft.com/graph/best-practices-concept#reliability-and-support).
/// Records the call. `Date` is added by the HTTP server, as Graph's is.
fn with_request_ids(
    s: &mut State,
    request: &Request,
    response: ResponseTemplate,
) -> ResponseTemplate {
    let sent = request
        .headers
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    s.graph_calls
        .push((request.url.path().to_owned(), sent.clone()));
    let echo = request
        .headers
        .get("return-client-request-id")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    match sent {
        Some(id) if echo => response.insert_header("client-request-id", id.as_str()),
        _ => response,
    }
}

/// Graph `POST /v1.0/me/sendMail`.
/// Graph's request size limit, 4 MB.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

pub(super) struct GraphSend(pub(super) Arc<Mutex<State>>);
impl Respond for GraphSend {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut s = self.0.lock().unwrap();
        let response = graph_send(&mut s, request);
        with_request_ids(&mut s, request, response)
    }
}

/// `sendMail`: the checks Graph makes before a request holds one of its
/// mailbox's concurrent requests, then [`send_mail`].
fn graph_send(s: &mut State, request: &Request) -> ResponseTemplate {
    {
        *s.send_attempts.entry(Vendor::Microsoft).or_default() += 1;
        s.attempt_times
            .push((Vendor::Microsoft, std::time::Instant::now()));
        let delay = s.send_delay;
        // Graph takes requests of 4 MB at most (graph/throttling-limits,
        // "Outlook service limits"); past that, the documented way is a draft and
        // upload sessions.
        if request.body.len() > MAX_REQUEST_BYTES {
            return graph_error(
                413,
                "RequestEntityTooLarge",
                "The maximum request length supported is 4MB.",
            );
        }
        let Some(grant) = s.bearer_grant(request, Vendor::Microsoft) else {
            return graph_error(
                401,
                "InvalidAuthenticationToken",
                "Access token has expired or is not yet valid.",
            )
            .insert_header(
                "WWW-Authenticate",
                "Bearer realm=\"\", error=\"invalid_token\"",
            );
        };
        // sendMail needs Mail.Send (https://learn.microsoft.com/en-us/graph/api/user-sendmail#permissions).
        if !MAIL_SEND.iter().any(|p| has_graph(&grant.scopes, p)) {
            return graph_access_denied();
        }
        let account = grant.account.clone();
        if let Err(wait) = s.over_limit(&account) {
            // Graph gives Retry-After in whole seconds.
            return graph_throttled(wait.as_secs_f64().ceil().max(1.0) as u64);
        }
        // Outlook counts the requests in flight per app and mailbox; this one is
        // in flight until its answer leaves, after the send delay (every answer
        // from here on takes it).
        if s.enter_graph(&account, delay).is_err() {
            return graph_throttled(CONCURRENCY_RETRY_AFTER_SECS);
        }
        // Exchange refuses the submission of a blocked account whatever it is.
        if s.graph_blocked.contains(&account.to_ascii_lowercase()) {
            return graph_submission_blocked().set_delay(delay);
        }
        send_mail(s, request, &grant, account).set_delay(delay)
    }
}

/// The rest of `sendMail` once the request holds one of its mailbox's
/// concurrent requests: scripted faults, the body's checks, the acceptance.
fn send_mail(s: &mut State, request: &Request, grant: &Grant, account: String) -> ResponseTemplate {
    {
        if let Some(scripted) = s
            .scripted
            .get_mut(&Vendor::Microsoft)
            .and_then(VecDeque::pop_front)
        {
            return scripted;
        }
        if s.fault_rate > 0.0 && rand::random::<f64>() < s.fault_rate {
            return graph_unavailable();
        }
        let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
            return graph_error(400, "BadRequest", "Unable to read JSON request payload.");
        };
        accept_message(s, body, grant, account)
    }
}

/// The checks of a message about to leave and its acceptance, shared by
/// `sendMail` and a draft's `send` (`microsoft_drafts.rs`): `body` is in
/// `sendMail`'s shape, `{"message": {...}, "saveToSentItems": bool}`.
pub(super) fn accept_message(
    s: &mut State,
    body: Value,
    grant: &Grant,
    account: String,
) -> ResponseTemplate {
    {
        // Graph refuses an empty internetMessageHeaders array and non-X- names.
        if let Some(h) = body["message"].get("internetMessageHeaders") {
            let ok = h.as_array().is_some_and(|a| {
                !a.is_empty()
                    && a.len() <= 5
                    && a.iter().all(|x| {
                        x["name"]
                            .as_str()
                            .is_some_and(|n| n.to_ascii_lowercase().starts_with("x-"))
                    })
            });
            if !ok {
                return graph_error(
                    400,
                    "InvalidInternetMessageHeader",
                    "The internet message header name 'Subject' should start with 'x-' or 'X-'.",
                );
            }
        }
        // A message id that is not `<left@right>`. Microsoft does not document the
        // refusal's shape; Exchange refuses such a value, and the generic
        // `ErrorInvalidProperty` code of graph/errors stands for it here.
        let message_id = match body["message"].get("internetMessageId") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_str().filter(|v| valid_msg_id(v)) {
                Some(v) => Some(v.to_owned()),
                None => {
                    return graph_error(
                        400,
                        "ErrorInvalidProperty",
                        "The value of the property 'InternetMessageId' is not valid: expected <id-left@id-right>.",
                    );
                }
            },
        };
        let from = &body["message"]["from"]["emailAddress"];
        // Exchange refuses a display name containing '@' (facts.md: ErrorSendAsDenied).
        if from["name"].as_str().is_some_and(|n| n.contains('@')) {
            return graph_send_as_denied();
        }
        let id = uuid::Uuid::new_v4().to_string();
        let info = s.account_info(&account);
        let primary = info.mail.clone().unwrap_or_else(|| account.clone());
        let me = super::SeenMailbox {
            name: Some(info.display_name.clone()),
            address: primary.clone(),
        };
        // What recipients see. Exchange ignores `from.name`: the directory's display
        // name of the sending mailbox is shown (not documented by Microsoft; seen in
        // msgraph-sdk-php#183, microsoft-graph-docs-contrib#5240).
        let (seen_from, seen_sender) = match from["address"].as_str().filter(|a| !a.is_empty()) {
            None => (me, None),
            Some(address) if address.eq_ignore_ascii_case(&primary) => (me, None),
            // One of the mailbox's own aliases: rewritten to the primary address
            // unless the tenant has SendFromAliasEnabled (Set-OrganizationConfig).
            Some(address) if own_address(&info, &account, address) => {
                let tenant_allows = [info.tenant_id.to_ascii_lowercase(), domain_of(&account)]
                    .iter()
                    .any(|t| s.alias_sending.contains(t));
                let shown = if tenant_allows { address } else { &primary };
                (
                    super::SeenMailbox {
                        name: me.name.clone(),
                        address: shown.to_owned(),
                    },
                    None,
                )
            }
            // Another mailbox: Mail.Send.Shared and the Send As or Send on Behalf
            // right (https://learn.microsoft.com/graph/outlook-send-mail-from-other-user);
            // on behalf, recipients see "user on behalf of mailbox".
            Some(address) => {
                let shared = has_graph(&grant.scopes, "Mail.Send.Shared");
                let has = |rights: &HashMap<String, std::collections::HashSet<String>>| {
                    rights
                        .get(&account.to_ascii_lowercase())
                        .is_some_and(|m| m.contains(&address.to_ascii_lowercase()))
                };
                let (send_as, on_behalf) = (has(&s.send_as), has(&s.send_on_behalf));
                if !shared || !(send_as || on_behalf) {
                    return graph_send_as_denied();
                }
                let other = s.account_info(address);
                let mailbox = super::SeenMailbox {
                    name: Some(other.display_name.clone()),
                    address: other.mail.clone().unwrap_or_else(|| address.to_owned()),
                };
                (mailbox, (!send_as).then_some(me))
            }
        };
        let address = |v: &Value| {
            v["emailAddress"]["address"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        let m = &body["message"];
        let message_id = message_id.unwrap_or_else(|| {
            // Exchange makes one up: `<…@….prod.outlook.com>`.
            format!(
                "<{}@PR3P195MB0001.EURP195.PROD.OUTLOOK.COM>",
                uuid::Uuid::new_v4().simple()
            )
        });
        if let Some(quota) = s.sending_quotas.get_mut(&account.to_ascii_lowercase()) {
            let all: Vec<String> = ["toRecipients", "ccRecipients", "bccRecipients"]
                .iter()
                .flat_map(|k| m[*k].as_array().cloned().unwrap_or_default())
                .map(|r| address(&r))
                .collect();
            // Exchange applies its recipient rate limit after the 202: the
            // message is accepted and bounces back to the sender (NDR 5.2.2).
            if quota.take(&account, &all, false).is_err() {
                s.bounced.push(Received {
                    provider: "microsoft",
                    received_at: chrono::Utc::now(),
                    id: id.clone(),
                    from: address(&m["from"]),
                    to: all,
                    subject: m["subject"].as_str().unwrap_or_default().to_owned(),
                    seen_from,
                    seen_sender,
                    message_id,
                });
                return ResponseTemplate::new(202)
                    .insert_header("request-id", id.as_str())
                    .insert_header("client-request-id", uuid::Uuid::new_v4().to_string());
            }
        }
        s.received.push(Received {
            provider: "microsoft",
            received_at: chrono::Utc::now(),
            id: id.clone(),
            from: address(&m["from"]),
            to: m["toRecipients"]
                .as_array()
                .map(|a| a.iter().map(address).collect())
                .unwrap_or_default(),
            subject: m["subject"].as_str().unwrap_or_default().to_owned(),
            seen_from,
            seen_sender,
            message_id,
        });
        s.graph_sends.push(body);
        ResponseTemplate::new(202)
            .insert_header("request-id", id.as_str())
            .insert_header("client-request-id", uuid::Uuid::new_v4().to_string())
    }
}

/// Whether an `internetMessageId` is an RFC 5322 `msg-id`: `<left@right>`, no
/// spaces. The property is "the message ID in the format specified by RFC2822",
/// writable while the message is a draft (learn.microsoft.com/graph/api/message-update).
fn valid_msg_id(v: &str) -> bool {
    v.strip_prefix('<')
        .and_then(|v| v.strip_suffix('>'))
        .and_then(|v| v.split_once('@'))
        .is_some_and(|(l, r)| {
            !l.is_empty()
                && !r.is_empty()
                && !format!("{l}{r}")
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || "<>@\"".contains(c))
        })
}
