//! The sender: save and test, and the checks a sender goes through first
//! (display name rules, Gmail's From rewriting, Send As rights).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use mail_dispatch_domain::address::display_name_problem;
use mail_dispatch_domain::{
    EmailAddress, ErrorCode, JobError, Mailbox, OutgoingMessage, ProviderKind,
};
use mail_dispatch_store::{Fallback, Integration};
use mail_dispatch_worker::InProcessRetry;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AdminState;
use crate::error::{ApiError, ApiErrorCode, ErrorBody};
use crate::extract::{ApiJson, OrgId};
use crate::integration::{IntegrationView, view_with_pause};
use crate::recipients::{self, RecipientsSee};

#[derive(Debug, Deserialize, ToSchema)]
pub struct SenderRequest {
    /// The address notifications are sent from.
    pub email: String,
    /// The display name (no `@`, CR or LF).
    pub name: Option<String>,
    /// Where the test message goes; default: the connected account.
    pub test_recipient: Option<String>,
    /// `none` (default) or `platform_sender`: what happens if the grant stops working.
    pub fallback: Option<String>,
    /// Microsoft only: keep a copy of each notification in the sender's Sent
    /// Items (Graph `saveToSentItems`). Omitted: unchanged (`false` at first).
    /// Gmail always keeps one: `false` is refused for Google.
    pub save_to_sent_items: Option<bool>,
    /// The share (percent, 1–100) of the provider's sending limits (per rolling
    /// 24 h) mail-dispatch may use from this mailbox, leaving the rest to the
    /// people who also send from it. Absent: unchanged (100 for a new
    /// integration). Saved even when the test fails.
    #[schema(minimum = 1, maximum = 100)]
    pub limit_percent: Option<u8>,
    /// Google Workspace only: the account is on a trial, whose lower sending
    /// limits (500 messages and 500 external recipients per 24 h) then apply;
    /// nothing Google tells us reveals it. Absent: unchanged (`false` at
    /// first). Saved even when the test fails.
    pub google_trial: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TestError {
    pub code: String,
    pub message: String,
    pub provider_status: Option<u16>,
    pub provider_code: Option<String>,
}

/// Whether a test message went out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TestStatus {
    /// The provider accepted it: the integration is now active with this sender.
    Sent,
    Failed,
}

impl TestStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TestStatus::Sent => "sent",
            TestStatus::Failed => "failed",
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TestOutcome {
    /// `sent` (the integration is now active) or `failed`.
    pub status: TestStatus,
    pub provider_message_id: Option<String>,
    pub error: Option<TestError>,
    /// What recipients will see as the sender (name and address), when it was
    /// sent and the provider tells: `differs` says whether it is not what was
    /// configured, `reasons` and `message` why.
    pub recipients_see: Option<RecipientsSee>,
    pub integration: IntegrationView,
}

/// The test message: a small notification saying what was configured.
fn test_message(
    state: &AdminState,
    org: &str,
    provider: ProviderKind,
    sender: &Mailbox,
    to: &Mailbox,
) -> OutgoingMessage {
    let provider_name = match provider {
        ProviderKind::Microsoft => "Microsoft 365",
        ProviderKind::Google => "Google Workspace",
        ProviderKind::Default => "the platform sender",
    };
    let from = match &sender.name {
        Some(name) => format!("{name} <{}>", sender.email),
        None => sender.email.to_string(),
    };
    let product = &state.config.product_name;
    let text = format!(
        "This is a test message from {product}.\n\n\
         Notifications of organization {org} will be sent through {provider_name}, from {from}.\n\n\
         No action is needed. If you did not expect this message, tell your {product} administrator."
    );
    let html = format!(
        "<p>This is a test message from {product}.</p><p>Notifications of organization <b>{org}</b> will be sent \
         through <b>{provider_name}</b>, from <b>{from}</b>.</p><p>No action is needed.</p>",
        org = html_escape(org),
        from = html_escape(&from),
    );
    OutgoingMessage {
        from: sender.clone(),
        to: vec![to.clone()],
        cc: vec![],
        bcc: vec![],
        reply_to: None,
        subject: format!("{product}: {provider_name} is connected"),
        text: Some(text),
        html: Some(html),
        attachments: vec![],
        headers: [("X-Mail-Dispatch-Test".to_owned(), "1".to_owned())].into(),
        message_id: Some(format!("test-{}@{}", uuid_like(), sender.email.domain())),
        save_to_sent_items: false,
    }
}

fn uuid_like() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// What the admin chose: the sender and how its mail is delivered.
#[derive(Clone, Copy)]
pub(crate) struct SenderChoice<'a> {
    pub(crate) sender: &'a Mailbox,
    pub(crate) fallback: Fallback,
    pub(crate) save_to_sent_items: bool,
}

/// A test's outcome, to be recorded.
struct Tested {
    status: TestStatus,
    message_id: Option<String>,
    error: Option<JobError>,
    recipients_see: Option<RecipientsSee>,
}

/// Sends the test through the worker's own send path and records the outcome;
/// the integration becomes active (with this sender) only if it was sent.
async fn test_send(
    state: &AdminState,
    org: &str,
    integration: &Integration,
    choice: &SenderChoice<'_>,
    to: &Mailbox,
    verified_aliases: &[String],
) -> Result<TestOutcome, ApiError> {
    let store = &state.services.store;
    let provider = integration.provider;
    let SenderChoice {
        sender,
        fallback,
        save_to_sent_items,
    } = *choice;
    let message = OutgoingMessage {
        save_to_sent_items,
        ..test_message(state, org, provider, sender, to)
    };
    let retry = InProcessRetry {
        attempts: 2,
        max_wait: std::time::Duration::from_secs(2),
        backoff: mail_dispatch_domain::Backoff {
            base: std::time::Duration::from_millis(200),
            max: std::time::Duration::from_secs(2),
        },
    };
    let (outcome, _, _) = state
        .services
        .senders
        .send(provider, org, &message, retry)
        .await;
    let (status, message_id, error) = match outcome {
        Ok(accepted) => (TestStatus::Sent, accepted.provider_message_id, None),
        Err(mail_dispatch_worker::SendFailure::Send(e)) => {
            let mut error = e.to_job_error(e.final_code());
            if let Some(hint) = send_as_hint(state, integration, sender, &error) {
                error.message = format!("{} ({hint})", error.message);
            }
            (TestStatus::Failed, None, Some(error))
        }
        Err(mail_dispatch_worker::SendFailure::Revoked { reason, code, .. }) => {
            let mut error = JobError::new(
                ErrorCode::AuthRevoked,
                format!("the provider refused the grant: {reason}"),
            );
            error.provider_code = code;
            (TestStatus::Failed, None, Some(error))
        }
        Err(mail_dispatch_worker::SendFailure::Unreadable { reason, .. }) => (
            TestStatus::Failed,
            None,
            Some(JobError::new(ErrorCode::AuthRevoked, reason)),
        ),
        Err(mail_dispatch_worker::SendFailure::Store(e)) => return Err(ApiError::internal(e)),
    };
    let sent = status == TestStatus::Sent;
    if let Some(e) = &error
        && e.code == ErrorCode::AuthRevoked
    {
        let _ = store
            .mark_needs_reauth(org, e.provider_code.as_deref().unwrap_or("access refused"))
            .await;
    }
    let seen = if sent {
        let seen = recipients_see(state, org, integration, sender, verified_aliases).await;
        store
            .save_sender(org, sender.email.as_str(), sender.name.as_deref(), fallback)
            .await?;
        let json = seen
            .as_ref()
            .map(|s| serde_json::to_value(s).expect("serializable"));
        store
            .save_sender_delivery(org, save_to_sent_items, json.as_ref())
            .await?;
        // The provider just took a message from this mailbox: a pause for a
        // block (which the admin was asked to clear) or a throttle is over, on
        // every replica, rather than at its planned end (an hour for a block).
        match store.lift_mailbox_pause(org).await {
            Ok(Some(reason)) => {
                tracing::info!(
                    org.id = org,
                    reason,
                    "test send went out: the mailbox's pause is lifted"
                );
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(org.id = org, error = %e, "could not lift the mailbox's pause")
            }
        }
        seen
    } else {
        None
    };
    let tested = Tested {
        status,
        message_id,
        error,
        recipients_see: seen,
    };
    record_test(state, org, provider, sender, tested).await
}

/// What recipients will see, from what the provider's directory says with the
/// scopes already granted: Microsoft `GET /me` (`User.Read`); for Google, the
/// account and the aliases checked before the test. `None` when it cannot be
/// learnt (logged; the test itself passed).
async fn recipients_see(
    state: &AdminState,
    org: &str,
    integration: &Integration,
    sender: &Mailbox,
    verified_aliases: &[String],
) -> Option<RecipientsSee> {
    match integration.provider {
        ProviderKind::Microsoft => {
            let senders = &state.services.senders;
            let token = match senders
                .tokens
                .access_token(org, ProviderKind::Microsoft, None)
                .await
            {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(org.id = org, error = %e, "no access token to read the mailbox's directory entry");
                    return None;
                }
            };
            match senders.graph.me(&token).await {
                Ok(me) => Some(recipients::microsoft(sender, &me)),
                Err(e) => {
                    tracing::warn!(org.id = org, error = %e.message, "could not read the mailbox's directory entry (GET /me)");
                    None
                }
            }
        }
        ProviderKind::Google => Some(recipients::google(
            sender,
            integration.account_email.as_deref().unwrap_or_default(),
            verified_aliases,
        )),
        ProviderKind::Default => None,
    }
}

/// Stores a test's outcome (the integration turns active if it was sent).
async fn record_test(
    state: &AdminState,
    org: &str,
    provider: ProviderKind,
    sender: &Mailbox,
    tested: Tested,
) -> Result<TestOutcome, ApiError> {
    let Tested {
        status,
        message_id,
        error,
        recipients_see,
    } = tested;
    let store = &state.services.store;
    let sent = status == TestStatus::Sent;
    let record = serde_json::json!({
        "status": status.as_str(),
        "sender": {"email": sender.email.as_str(), "name": sender.name},
        "provider_message_id": message_id,
        "error": error,
        "recipients_see": recipients_see,
    });
    let integration = store.record_test(org, &record, sent).await?;
    state.services.senders.tokens.forget(org);
    tracing::info!(org.id = org, %provider, status = status.as_str(), "sender test");
    Ok(TestOutcome {
        status,
        provider_message_id: message_id,
        error: error.map(|e| TestError {
            code: e.code.as_str().into(),
            message: e.message,
            provider_status: e.provider_status,
            provider_code: e.provider_code,
        }),
        recipients_see,
        integration: view_with_pause(store, org, integration.as_ref()).await?,
    })
}

/// Graph refuses a sender other than the signed-in mailbox unless the app has
/// `Mail.Send.Shared` and the user Send As rights on it: say which is missing.
fn send_as_hint(
    state: &AdminState,
    integration: &Integration,
    sender: &Mailbox,
    error: &JobError,
) -> Option<&'static str> {
    let other_mailbox = !integration
        .account_email
        .as_deref()
        .is_some_and(|a| a.eq_ignore_ascii_case(sender.email.as_str()));
    (integration.provider == ProviderKind::Microsoft
        && error.provider_code.as_deref() == Some("ErrorSendAsDenied")
        && other_mailbox)
        .then_some(if state.config.microsoft_shared_mailboxes {
            "the connected user needs Send As rights on this mailbox in Exchange Online"
        } else {
            "sending as another mailbox needs MAIL_DISPATCH_MICROSOFT_SHARED_MAILBOXES=true on this deployment and Send As rights for the connected user"
        })
}

/// After a reconnect: the saved sender goes through the same check and test as
/// on its first save (the account may be another one).
pub(crate) async fn retest_saved_sender(
    state: &AdminState,
    org: &str,
    integration: &Integration,
    sender_email: &str,
) -> Result<TestOutcome, ApiError> {
    let provider = integration.provider;
    let email = EmailAddress::parse(sender_email).map_err(ApiError::internal)?;
    let sender = Mailbox::new(email.clone(), integration.sender_name.clone());
    let mut aliases = Vec::new();
    if provider == ProviderKind::Google {
        match check_google_sender(state, org, integration, &email).await {
            Ok(verified) => aliases = verified,
            Err(refused) => {
                let error = JobError::new(ErrorCode::SenderNotAllowed, refused.message);
                let tested = Tested {
                    status: TestStatus::Failed,
                    message_id: None,
                    error: Some(error),
                    recipients_see: None,
                };
                return record_test(state, org, provider, &sender, tested).await;
            }
        }
    }
    let recipient = integration
        .account_email
        .as_deref()
        .and_then(|a| EmailAddress::parse(a).ok())
        .ok_or_else(|| ApiError::internal("connected account without an address"))?;
    let choice = SenderChoice {
        sender: &sender,
        fallback: integration.fallback,
        save_to_sent_items: integration.save_to_sent_items,
    };
    test_send(
        state,
        org,
        integration,
        &choice,
        &Mailbox::new(recipient, None),
        &aliases,
    )
    .await
}

/// Saves the sender and sends a test message through the provider.
#[utoipa::path(put, path = "/v1/organizations/{org}/integration/sender", tag = "integration",
    params(("org" = String, Path, description = "Organization id")),
    request_body = SenderRequest,
    responses((status = 200, body = TestOutcome, description = "The test outcome: `sent` (now active) or `failed`"),
              (status = 401, body = ErrorBody), (status = 409, body = ErrorBody, description = "not_configured: connect a provider first"),
              (status = 422, body = ErrorBody, description = "invalid_sender, sender_not_allowed, invalid_request")),
    security(("admin_token" = [])))]
pub async fn put_sender(
    State(state): State<AdminState>,
    OrgId(org): OrgId,
    ApiJson(req): ApiJson<SenderRequest>,
) -> Result<Json<TestOutcome>, ApiError> {
    let store = &state.services.store;
    let Some(integration) = store.integration(&org).await? else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ApiErrorCode::NotConfigured,
            "connect a provider before saving a sender",
        ));
    };
    let sender = parse_sender(&req.email, req.name.as_deref()).map_err(|problem| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ApiErrorCode::InvalidSender,
            problem.to_string(),
        )
    })?;
    let fallback = match req.fallback.as_deref() {
        None => Fallback::None,
        Some(raw) => Fallback::parse(raw)
            .ok_or_else(|| ApiError::invalid("fallback must be `none` or `platform_sender`"))?,
    };
    let google_trial = match (req.google_trial, integration.provider) {
        (Some(trial), ProviderKind::Google) if integration.account_tenant.is_some() => Some(trial),
        (Some(true), ProviderKind::Google) => {
            return Err(ApiError::invalid(
                "google_trial: the connected account is a consumer Google account (no Workspace domain), whose limits are already the lower ones",
            ));
        }
        (Some(true), _) => {
            return Err(ApiError::invalid(
                "google_trial applies to Google Workspace accounts only",
            ));
        }
        _ => None,
    };
    if req.limit_percent.is_some_and(|p| !(1..=100).contains(&p)) {
        return Err(ApiError::invalid("limit_percent must be between 1 and 100"));
    }
    if req.limit_percent.is_some() || google_trial.is_some() {
        store
            .save_sending_budget(&org, req.limit_percent, google_trial)
            .await?;
    }
    let recipient = match req.test_recipient.as_deref() {
        Some(raw) => EmailAddress::parse(raw.trim())
            .map_err(|_| ApiError::invalid("test_recipient is not a valid address"))?,
        None => integration
            .account_email
            .as_deref()
            .and_then(|a| EmailAddress::parse(a).ok())
            .ok_or_else(|| ApiError::invalid("give a test_recipient"))?,
    };
    let save_to_sent_items = match (integration.provider, req.save_to_sent_items) {
        (ProviderKind::Google, Some(false)) => {
            return Err(ApiError::invalid(
                "save_to_sent_items: Gmail always keeps a copy of what it sends in Sent; only Microsoft 365 lets it be turned off",
            ));
        }
        (_, Some(choice)) => choice,
        (_, None) => integration.save_to_sent_items,
    };
    let outcome = save_and_test(
        &state,
        &org,
        &integration,
        SenderChoice {
            sender: &sender,
            fallback,
            save_to_sent_items,
        },
        recipient,
    )
    .await?;
    Ok(Json(outcome))
}

/// Why a sender is refused before any provider call: the rules of the API and
/// of the portal's form alike.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SenderProblem {
    #[error("email is not a valid address")]
    InvalidEmail,
    #[error("the sender name must not contain `@` (Microsoft refuses it with ErrorSendAsDenied)")]
    NameWithAt,
    #[error("the sender name {0}")]
    Name(String),
}

/// The sender as entered: a valid address and an optional display name
/// (trimmed; empty means none).
pub(crate) fn parse_sender(email: &str, name: Option<&str>) -> Result<Mailbox, SenderProblem> {
    let email = EmailAddress::parse(email.trim()).map_err(|_| SenderProblem::InvalidEmail)?;
    let name = name.map(str::trim).filter(|n| !n.is_empty());
    if let Some(name) = name {
        if name.contains('@') {
            return Err(SenderProblem::NameWithAt);
        }
        if let Some(problem) = display_name_problem(name) {
            return Err(SenderProblem::Name(problem.to_string()));
        }
    }
    Ok(Mailbox::new(email, name.map(str::to_owned)))
}

/// Checks the sender with the provider's rules (Gmail's aliases), sends the
/// test and, if it went out, saves the sender: the integration turns active.
pub(crate) async fn save_and_test(
    state: &AdminState,
    org: &str,
    integration: &Integration,
    choice: SenderChoice<'_>,
    recipient: EmailAddress,
) -> Result<TestOutcome, ApiError> {
    let aliases = if integration.provider == ProviderKind::Google {
        check_google_sender(state, org, integration, &choice.sender.email).await?
    } else {
        vec![]
    };
    test_send(
        state,
        org,
        integration,
        &choice,
        &Mailbox::new(recipient, None),
        &aliases,
    )
    .await
}

/// Gmail silently rewrites a From that is not the account or a verified alias:
/// refuse such a sender instead of letting the test "succeed" from another
/// address, and say what recipients would have seen. Returns the account's
/// verified aliases when they were read.
async fn check_google_sender(
    state: &AdminState,
    org: &str,
    integration: &Integration,
    email: &EmailAddress,
) -> Result<Vec<String>, ApiError> {
    let account = integration.account_email.as_deref().unwrap_or_default();
    if account.eq_ignore_ascii_case(email.as_str()) {
        return Ok(vec![]);
    }
    let not_allowed = |why: &str| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ApiErrorCode::SenderNotAllowed,
            format!(
                "with Google, the sender must be {why}: Gmail would send from {account} instead, without an error"
            ),
        )
    };
    if !state.config.google_check_aliases {
        return Err(not_allowed("the connected account's own address"));
    }
    let senders = &state.services.senders;
    let token = senders
        .tokens
        .access_token(org, ProviderKind::Google, None)
        .await
        .map_err(ApiError::internal)?;
    let aliases = senders.gmail.send_as_addresses(&token).await.map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ApiErrorCode::SenderNotAllowed,
            format!(
                "could not read the account's aliases, so {email} cannot be checked: if it is not a verified send-as alias, Gmail would send from {account} instead, without an error ({e})"
            ),
        )
    })?;
    if aliases
        .iter()
        .any(|a| a.eq_ignore_ascii_case(email.as_str()))
    {
        Ok(aliases)
    } else {
        Err(not_allowed(
            "the connected account's address or one of its verified send-as aliases",
        ))
    }
}
