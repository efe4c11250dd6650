//! An organization's integration: the view the host application reads (never a
//! token), and disconnecting.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;

use mail_dispatch_domain::ProviderKind;
use mail_dispatch_store::Integration;

use crate::AdminState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::OrgId;

#[derive(Debug, Serialize, ToSchema)]
pub struct SenderView {
    pub email: String,
    pub name: Option<String>,
}

/// An integration as the host application sees it: never a token.
#[derive(Debug, Serialize, ToSchema)]
pub struct IntegrationView {
    pub organization_id: String,
    /// `microsoft`, `google`, or null when not configured.
    pub provider: Option<String>,
    /// `not_configured`, `pending_sender`, `active` or `needs_reauth`.
    pub status: String,
    pub account_email: Option<String>,
    pub sender: Option<SenderView>,
    /// `none` or `platform_sender`.
    pub fallback: Option<String>,
    /// Microsoft: whether Graph keeps a copy of each notification in the
    /// sender's Sent Items (`saveToSentItems`, default `false`). Null for Google
    /// (Gmail always keeps one) and when not configured.
    pub save_to_sent_items: Option<bool>,
    /// What recipients see as the sender (name and address), as learnt by the
    /// last successful save and test; `differs` when it is not the configured
    /// sender (e.g. Exchange shows the mailbox's directory name).
    pub recipients_see: Option<crate::recipients::RecipientsSee>,
    /// The share (percent) of the provider's sending limits per rolling 24 h
    /// that mail-dispatch uses from this mailbox (`limit_percent` of the sender
    /// settings); null when not configured.
    pub limit_percent: Option<u8>,
    /// Google only: `workspace` (the id token named a Workspace domain),
    /// `trial` (a Workspace account its organization says is on a trial:
    /// lower sending limits) or `consumer` (no Workspace domain: a gmail.com
    /// account, with lower sending limits).
    pub google_account: Option<String>,
    pub connected_at: Option<DateTime<Utc>>,
    pub last_test_at: Option<DateTime<Utc>>,
    #[schema(value_type = Option<Object>)]
    pub last_test: Option<serde_json::Value>,
    pub last_error: Option<String>,
    /// The mailbox's jobs are held back until `until` on every replica; null
    /// when they are not. A successful save and test lifts it.
    pub sending_paused: Option<SendingPause>,
}

/// Why and until when an organization's notifications wait.
#[derive(Debug, Serialize, ToSchema)]
pub struct SendingPause {
    pub until: DateTime<Utc>,
    /// `sending_blocked`: the provider blocks the account from sending (the
    /// organization's admin must act, then save and test); `throttled`: the
    /// provider asked to slow down (it ends on its own).
    pub reason: String,
}

/// `view` with the mailbox's running pause, if any, read from the store.
pub async fn view_with_pause(
    store: &mail_dispatch_store::Store,
    org: &str,
    i: Option<&Integration>,
) -> Result<IntegrationView, mail_dispatch_store::StoreError> {
    let mut v = view(org, i);
    if i.is_some() {
        v.sending_paused = store
            .mailbox_pause(org)
            .await?
            .map(|(until, reason)| SendingPause { until, reason });
    }
    Ok(v)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DisconnectResponse {
    /// Always `not_configured` afterwards: the platform sender is used.
    pub status: String,
    /// Whether an integration was there to delete.
    pub deleted: bool,
    /// Whether the provider revoked the grant (Google); Microsoft offers no per-grant revocation.
    pub revoked: bool,
}

/// The view of an organization's integration (never a token).
pub fn view(org: &str, i: Option<&Integration>) -> IntegrationView {
    match i {
        None => IntegrationView {
            organization_id: org.to_owned(),
            provider: None,
            status: "not_configured".into(),
            account_email: None,
            sender: None,
            fallback: None,
            save_to_sent_items: None,
            recipients_see: None,
            limit_percent: None,
            google_account: None,
            connected_at: None,
            last_test_at: None,
            last_test: None,
            last_error: None,
            sending_paused: None,
        },
        Some(i) => IntegrationView {
            organization_id: i.organization_id.clone(),
            provider: Some(i.provider.as_str().into()),
            status: i.status.as_str().into(),
            account_email: i.account_email.clone(),
            sender: i.sender_email.as_ref().map(|email| SenderView {
                email: email.clone(),
                name: i.sender_name.clone(),
            }),
            fallback: Some(i.fallback.as_str().into()),
            save_to_sent_items: (i.provider == ProviderKind::Microsoft)
                .then_some(i.save_to_sent_items),
            recipients_see: i
                .recipients_see
                .as_ref()
                .and_then(|v| serde_json::from_value(v.clone()).ok()),
            limit_percent: Some(i.limit_percent),
            google_account: (i.provider == ProviderKind::Google).then(|| {
                match (i.account_tenant.is_some(), i.google_trial) {
                    (true, false) => "workspace",
                    (true, true) => "trial",
                    (false, _) => "consumer",
                }
                .to_owned()
            }),
            connected_at: Some(i.connected_at),
            last_test_at: i.last_test_at,
            last_test: i.last_test.clone(),
            last_error: i.last_error.clone(),
            sending_paused: None,
        },
    }
}

/// The organization's integration (never a token).
#[utoipa::path(get, path = "/v1/organizations/{org}/integration", tag = "integration",
    params(("org" = String, Path, description = "Organization id")),
    responses((status = 200, body = IntegrationView), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn get_integration(
    State(state): State<AdminState>,
    OrgId(org): OrgId,
) -> Result<Json<IntegrationView>, ApiError> {
    let store = &state.services.store;
    let i = store.integration(&org).await?;
    Ok(Json(view_with_pause(store, &org, i.as_ref()).await?))
}

/// Disconnects: revokes what the provider lets revoke, deletes the tokens.
#[utoipa::path(delete, path = "/v1/organizations/{org}/integration", tag = "integration",
    params(("org" = String, Path, description = "Organization id")),
    responses((status = 200, body = DisconnectResponse), (status = 401, body = ErrorBody)),
    security(("admin_token" = [])))]
pub async fn delete_integration(
    State(state): State<AdminState>,
    OrgId(org): OrgId,
) -> Result<Json<DisconnectResponse>, ApiError> {
    Ok(Json(disconnect(&state, &org).await?))
}

/// Deletes the organization's integration (the platform sender takes over) and
/// revokes its grant where the provider allows it (Google).
pub(crate) async fn disconnect(
    state: &AdminState,
    org: &str,
) -> Result<DisconnectResponse, ApiError> {
    let deleted = state.services.store.delete_integration(org).await?;
    state.services.senders.tokens.forget(org);
    let revoked = match &deleted {
        Some((provider, Some(refresh))) => crate::connect::revoke(state, *provider, refresh).await,
        _ => false,
    };
    tracing::info!(org.id = %org, deleted = deleted.is_some(), revoked, "integration disconnected");
    Ok(DisconnectResponse {
        status: "not_configured".into(),
        deleted: deleted.is_some(),
        revoked,
    })
}
