//! Canned refusals and faults, shaped as the providers document them.

use std::time::Duration;

use serde_json::json;
use wiremock::ResponseTemplate;

/// A Graph error: `{"error":{"code","message","innerError":{"date","request-id","client-request-id"}}}`
/// with the `request-id` and `client-request-id` headers
/// (https://learn.microsoft.com/en-us/graph/errors).
pub(super) fn graph_error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    let id = uuid::Uuid::new_v4().to_string();
    ResponseTemplate::new(status)
        .insert_header("request-id", id.as_str())
        .insert_header("client-request-id", id.as_str())
        .set_body_json(json!({"error": {"code": code, "message": message,
            "innerError": {"date": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string(),
                           "request-id": id, "client-request-id": id}}}))
}

/// A Google API error: `{"error":{"code","message","errors":[{"message","domain","reason"}],"status"}}`
/// (https://developers.google.com/workspace/gmail/api/guides/handle-errors).
pub(super) fn google_error(
    status: u16,
    reason: &str,
    message: &str,
    state: &str,
) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .set_body_json(json!({"error": {"code": status, "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}], "status": state}}))
}

/// An Entra ID token endpoint error, HTTP 400:
/// `{"error","error_description","error_codes","timestamp","trace_id","correlation_id","error_uri"}`
/// (https://learn.microsoft.com/entra/identity-platform/reference-error-codes#handling-error-codes-in-your-application).
pub(super) fn microsoft_token_error(
    aadsts: u32,
    error: &str,
    description: &str,
) -> ResponseTemplate {
    entra_error(400, aadsts, error, description, None)
}

/// An Entra ID token endpoint error with its HTTP status and, when Entra sends
/// one, its `suberror`. `error_description` starts with `AADSTS<code>: ` and
/// ends with the trace and correlation ids and the timestamp, as Entra writes it.
pub(super) fn entra_error(
    status: u16,
    aadsts: u32,
    error: &str,
    description: &str,
    suberror: Option<&str>,
) -> ResponseTemplate {
    let trace = uuid::Uuid::new_v4().to_string();
    let correlation = uuid::Uuid::new_v4().to_string();
    let now = chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string();
    let mut body = json!({
        "error": error,
        "error_description": format!("AADSTS{aadsts}: {description}\r\nTrace ID: {trace}\r\nCorrelation ID: {correlation}\r\nTimestamp: {now}"),
        "error_codes": [aadsts],
        "timestamp": now,
        "trace_id": trace, "correlation_id": correlation,
        "error_uri": format!("https://login.microsoftonline.com/error?code={aadsts}"),
    });
    if let Some(sub) = suberror {
        body["suberror"] = json!(sub);
    }
    ResponseTemplate::new(status).set_body_json(body)
}

/// What a refresh failure names: the client that asked, the account, its tenant.
pub(super) struct RefreshContext<'a> {
    pub client_id: &'a str,
    pub account: &'a str,
    pub tenant_id: &'a str,
}

/// The refresh-grant refusal Entra answers for `aadsts`: the documented `error`
/// value, HTTP status and message. Codes and messages:
/// https://learn.microsoft.com/entra/identity-platform/reference-error-codes#aadsts-error-codes ;
/// `error` values and statuses as Entra sends them on `/token` (cited per code).
pub(super) fn entra_refresh_failure(aadsts: u32, c: &RefreshContext<'_>) -> ResponseTemplate {
    let issued = (chrono::Utc::now() - chrono::Duration::days(120))
        .format("%Y-%m-%dT%H:%M:%S%.6f0Z")
        .to_string();
    let (status, error, suberror, description) = match aadsts {
        // unauthorized_client, HTTP 400 ("Refresh request failed. Status Code = '400'",
        // https://github.com/Azure/go-autorest/issues/626).
        700016 => (
            400,
            "unauthorized_client",
            None,
            format!(
                "Application with identifier '{}' was not found in the directory '{}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.",
                c.client_id, c.tenant_id
            ),
        ),
        // unauthorized_client (https://github.com/Worklytics/psoxy/pull/74).
        7000112 => (
            400,
            "unauthorized_client",
            None,
            format!("Application '{0}'({0}) is disabled.", c.client_id),
        ),
        // EntitlementGrantsNotFound: the grant can no longer be used → invalid_grant
        // (the `error` table: "authentication material ... otherwise unusable").
        50105 => (
            400,
            "invalid_grant",
            None,
            format!(
                "Your administrator has configured the application {0} ('{0}') to block users unless they are specifically granted ('assigned') access to the application. The signed in user '{1}' is blocked because they are not a direct member of a group with access, nor had access directly assigned by an administrator. Please contact your administrator to assign access to this application.",
                c.client_id, c.account
            ),
        ),
        // invalid_grant on a token refresh
        // (https://github.com/OfficeDev/BotBuilder-MicrosoftTeams/issues/284).
        53003 => (
            400,
            "invalid_grant",
            None,
            "Access has been blocked by Conditional Access policies. The access policy does not allow token issuance.".to_owned(),
        ),
        // Sign-in frequency: interaction_required with suberror token_expired
        // (https://github.com/microsoft/vscode-azure-account/issues/673, and
        // AzureAD/microsoft-authentication-library-for-js#5456 for 70044).
        70044 => (
            400,
            "interaction_required",
            Some("token_expired"),
            "The session has expired or is invalid due to sign-in frequency checks by conditional access.".to_owned(),
        ),
        // invalid_grant with suberror basic_action on a refresh
        // (https://github.com/microsoftgraph/microsoft-graph-docs-contrib/issues/6306).
        50076 => (
            400,
            "invalid_grant",
            Some("basic_action"),
            "Due to a configuration change made by your administrator, or because you moved to a new location, you must use multi-factor authentication to access '00000003-0000-0000-c000-000000000000'.".to_owned(),
        ),
        // ExpiredOrRevokedGrantInactiveToken
        // (https://github.com/microsoft/azuredatastudio/pull/24423).
        700082 => (
            400,
            "invalid_grant",
            None,
            format!(
                "The refresh token has expired due to inactivity. The token was issued on {issued} and was inactive for 90.00:00:00."
            ),
        ),
        // DelegationDoesNotExist: invalid_grant
        // (https://github.com/KelvinTegelaar/CIPP/issues/1716), suberror consent_required.
        65001 => (
            400,
            "invalid_grant",
            Some("consent_required"),
            format!(
                "The user or administrator has not consented to use the application with ID '{0}' named '{0}'. Send an interactive authorization request for this user and resource.",
                c.client_id
            ),
        ),
        // invalid_client, HTTP 401 (https://github.com/BookStackApp/BookStack/issues/4089,
        // https://github.com/keycloak/keycloak/issues/31294).
        7000215 => (
            401,
            "invalid_client",
            None,
            format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{}'.",
                c.client_id
            ),
        ),
        // InvalidClientSecretExpiredKeysProvided: invalid_client, HTTP 401 like 7000215.
        7000222 => (
            401,
            "invalid_client",
            None,
            format!(
                "The provided client secret keys for app '{}' are expired. Visit the Azure portal to create new keys for your app: https://aka.ms/NewClientSecret, or consider using certificate credentials for added security: https://aka.ms/certCreds.",
                c.client_id
            ),
        ),
        // ExpiredOrRevokedGrant (what `revoke_account` answers too).
        70008 => (
            400,
            "invalid_grant",
            None,
            "The provided authorization code or refresh token has expired due to inactivity. Send a new interactive authorization request for this user and resource.".to_owned(),
        ),
        // FreshTokenNeeded (https://github.com/microsoft/azuredatastudio/pull/22853).
        50173 => (
            400,
            "invalid_grant",
            None,
            format!(
                "The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password. The grant was issued on '{issued}' and the TokensValidFrom date (before which tokens are not valid) for this user is '{}'.",
                chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6f0Z")
            ),
        ),
        _ => (
            400,
            "invalid_grant",
            None,
            "The provided grant is not valid.".to_owned(),
        ),
    };
    entra_error(status, aadsts, error, &description, suberror)
}

/// Graph 429 as documented for ApplicationThrottled, with `Retry-After` in seconds.
pub fn graph_throttled(retry_after_secs: u64) -> ResponseTemplate {
    graph_error(
        429,
        "ApplicationThrottled",
        "Application is over its MailboxConcurrency limit.",
    )
    .insert_header("Retry-After", retry_after_secs.to_string().as_str())
}

/// Graph 503 serviceNotAvailable.
pub fn graph_unavailable() -> ResponseTemplate {
    graph_error(
        503,
        "serviceNotAvailable",
        "Service unavailable. Please try again later.",
    )
}

/// Graph 403 ErrorSendAsDenied: no Send As right on the `from` mailbox, or a
/// display name containing `@`
/// (https://learn.microsoft.com/graph/outlook-send-mail-from-other-user).
pub fn graph_send_as_denied() -> ResponseTemplate {
    graph_error(
        403,
        "ErrorSendAsDenied",
        "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account., Cannot submit message.",
    )
}

/// Graph 400 ErrorInvalidRecipients.
pub fn graph_invalid_recipients() -> ResponseTemplate {
    graph_error(
        400,
        "ErrorInvalidRecipients",
        "At least one recipient isn't valid., A message can't be sent because it contains no recipients.",
    )
}

/// Graph 403 ErrorAccessDenied on `sendMail` when the token lacks `Mail.Send`
/// (facts.md; the body as Graph sends it:
/// https://github.com/Azure/azure-cli/issues/28628).
pub(super) fn graph_access_denied() -> ResponseTemplate {
    graph_error(
        403,
        "ErrorAccessDenied",
        "Access is denied. Check credentials and try again.",
    )
}

/// Graph 403 Authorization_RequestDenied: a directory read (`/me`) with a token
/// that carries no user-read permission
/// (https://learn.microsoft.com/en-us/graph/api/user-get#permissions ; the code
/// and message as Graph sends them when `User.Read` is missing:
/// https://techcommunity.microsoft.com/discussions/teamsdeveloper/authorization-requestdenied/4070461).
pub(super) fn graph_authorization_denied() -> ResponseTemplate {
    graph_error(
        403,
        "Authorization_RequestDenied",
        "Insufficient privileges to complete the operation.",
    )
}

/// Google 403 for a token without any scope the method accepts: the legacy
/// `errors[]` entry `insufficientPermissions` plus the `google.rpc.ErrorInfo`
/// detail `ACCESS_TOKEN_SCOPE_INSUFFICIENT`
/// (https://cloud.google.com/dotnet/docs/reference/Google.Api.CommonProtos/2.10.0/Google.Api.ErrorReason ;
/// the Gmail body with `metadata.method` `caribou.api.proto.MailboxService.<Method>`:
/// https://github.com/googleworkspace/cli/issues/282), and the RFC 6750
/// `WWW-Authenticate: Bearer ... error="insufficient_scope"` header
/// (https://github.com/kwent/react-google-contacts/issues/6).
pub(super) fn gmail_insufficient_scope(method: &str, accepted: &[&str]) -> ResponseTemplate {
    let message = "Request had insufficient authentication scopes.";
    ResponseTemplate::new(403)
        .insert_header(
            "WWW-Authenticate",
            format!(
                "Bearer realm=\"https://accounts.google.com/\", error=\"insufficient_scope\", scope=\"{}\"",
                accepted.join(" ")
            )
            .as_str(),
        )
        .set_body_json(json!({"error": {
            "code": 403,
            "message": message,
            "errors": [{"message": "Insufficient Permission", "domain": "global", "reason": "insufficientPermissions"}],
            "status": "PERMISSION_DENIED",
            "details": [{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
                "domain": "googleapis.com",
                "metadata": {"service": "gmail.googleapis.com", "method": method},
            }],
        }}))
}

/// Gmail 429 whose message carries the time to retry at.
pub fn gmail_rate_limited(retry_in: Duration) -> ResponseTemplate {
    let at = chrono::Utc::now() + chrono::Duration::from_std(retry_in).unwrap();
    let message = format!(
        "User-rate limit exceeded.  Retry after {}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    google_error(429, "rateLimitExceeded", &message, "RESOURCE_EXHAUSTED")
}

/// Gmail's answer to a send over the user's sending limits: 429 "User-rate
/// limit exceeded" for mail sending, with the time to retry at
/// (https://developers.google.com/workspace/gmail/api/guides/handle-errors).
pub(super) fn gmail_sending_limit(retry_in: Duration) -> ResponseTemplate {
    let at = chrono::Utc::now() + chrono::Duration::from_std(retry_in).unwrap();
    let message = format!(
        "User-rate limit exceeded.  Retry after {} (Mail sending)",
        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    );
    google_error(429, "rateLimitExceeded", &message, "RESOURCE_EXHAUSTED")
}

/// Gmail 429 for the Google Cloud project's quota, which every user of the
/// project shares (https://developers.google.com/workspace/gmail/api/reference/quota:
/// per-project and per-user limits). The message and the `google.rpc.ErrorInfo`
/// detail `RATE_LIMIT_EXCEEDED` are Google Cloud's quota error
/// (https://cloud.google.com/docs/quotas/troubleshoot); unlike the per-user
/// limits it carries no time to retry at.
pub fn gmail_project_rate_limited() -> ResponseTemplate {
    let message = "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service 'gmail.googleapis.com' for consumer 'project_number:1234567890'.";
    ResponseTemplate::new(429).set_body_json(json!({"error": {
        "code": 429,
        "message": message,
        "errors": [{"message": message, "domain": "global", "reason": "rateLimitExceeded"}],
        "status": "RESOURCE_EXHAUSTED",
        "details": [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "RATE_LIMIT_EXCEEDED",
            "domain": "googleapis.com",
            "metadata": {
                "service": "gmail.googleapis.com",
                "consumer": "projects/1234567890",
                "quota_metric": "gmail.googleapis.com/default",
                "quota_limit": "DefaultPerMinutePerProject",
            },
        }],
    }}))
}

/// Graph 403 ErrorMessageSubmissionBlocked: Exchange refuses every submission
/// of the account (EWS `ResponseCodeType`: message submission blocked; an
/// account on Restricted entities after an outbound spam policy tripped), until
/// an admin unblocks it.
pub fn graph_submission_blocked() -> ResponseTemplate {
    graph_error(
        403,
        "ErrorMessageSubmissionBlocked",
        "Cannot send mail. The account has been blocked from sending mail.",
    )
}

/// Gmail 503 backendError.
pub fn gmail_unavailable() -> ResponseTemplate {
    google_error(
        503,
        "backendError",
        "The service is currently unavailable.",
        "UNAVAILABLE",
    )
}

/// Gmail 403 dailyLimitExceeded.
pub fn gmail_daily_limit() -> ResponseTemplate {
    google_error(
        403,
        "dailyLimitExceeded",
        "Daily Limit Exceeded",
        "PERMISSION_DENIED",
    )
}

/// A mailbox's send limit, as a provider enforces it: a token bucket of
/// `per_second` sends, with a burst of one second's worth.
pub(super) struct MailboxLimit {
    pub(super) per_second: f64,
    pub(super) tokens: f64,
    pub(super) refilled: std::time::Instant,
    pub(super) throttled: u64,
}

impl MailboxLimit {
    pub(super) fn new(per_second: f64) -> Self {
        MailboxLimit {
            per_second,
            tokens: per_second.max(1.0),
            refilled: std::time::Instant::now(),
            throttled: 0,
        }
    }

    /// Takes a token, or says how long until one is there.
    pub(super) fn take(&mut self) -> Result<(), Duration> {
        let now = std::time::Instant::now();
        let burst = self.per_second.max(1.0);
        self.tokens = (self.tokens
            + now.duration_since(self.refilled).as_secs_f64() * self.per_second)
            .min(burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            self.throttled += 1;
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

/// Graph's concurrent requests per app and mailbox: a request counts from its
/// arrival until its answer leaves (the stand-in's send delay), and one that
/// arrives while `limit` others are in flight is refused with 429
/// `ApplicationThrottled` "over its MailboxConcurrency limit"
/// (https://learn.microsoft.com/graph/throttling-limits#outlook-service-limits:
/// "4 concurrent requests" per app ID and mailbox).
pub(super) struct MailboxConcurrency {
    /// When each request in flight answers.
    pub(super) answers_at: Vec<std::time::Instant>,
    /// Requests refused for being over the limit.
    pub(super) throttled: u64,
    /// The most requests seen in flight at once (accepted ones only).
    pub(super) peak: usize,
    /// Accepted requests, the time they kept the mailbox busy in all, and
    /// from the first one's start to the last one's answer.
    pub(super) accepted: u64,
    pub(super) busy: Duration,
    pub(super) first: Option<std::time::Instant>,
    pub(super) last_answer: Option<std::time::Instant>,
}

/// Graph's documented limit of concurrent requests per app and mailbox.
pub(super) const GRAPH_MAILBOX_CONCURRENCY: usize = 4;

/// What Graph answers in `Retry-After` to a concurrency 429: 1 s, as observed
/// (msgraph-sdk-javascript#297: "retry-after set to 1 on every 429").
pub(super) const CONCURRENCY_RETRY_AFTER_SECS: u64 = 1;

impl MailboxConcurrency {
    pub(super) fn new() -> Self {
        MailboxConcurrency {
            answers_at: Vec::new(),
            throttled: 0,
            peak: 0,
            accepted: 0,
            busy: Duration::ZERO,
            first: None,
            last_answer: None,
        }
    }

    /// Admits a request that will answer after `busy`, or refuses it (counted)
    /// when `limit` requests are in flight already.
    pub(super) fn enter(&mut self, limit: usize, busy: Duration) -> Result<(), ()> {
        let now = std::time::Instant::now();
        self.answers_at.retain(|t| *t > now);
        if self.answers_at.len() >= limit {
            self.throttled += 1;
            return Err(());
        }
        self.answers_at.push(now + busy);
        self.peak = self.peak.max(self.answers_at.len());
        self.accepted += 1;
        self.busy += busy;
        self.first.get_or_insert(now);
        self.last_answer = self.last_answer.max(Some(now + busy));
        Ok(())
    }
}
