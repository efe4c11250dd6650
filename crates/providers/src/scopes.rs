//! The OAuth scopes mail-dispatch asks for, in one place, and the check that
//! what a provider granted covers what sending needs.
//!
//! Microsoft (learn.microsoft.com/graph/permissions-reference):
//! - `User.Read` for `GET /v1.0/me` (the account's address and ids); `openid`,
//!   `email` and `profile` only shape the ID token and do not allow `/me`.
//! - `Mail.Send` for `sendMail` as the signed-in user; `Mail.Send.Shared` (opt-in)
//!   to send as a mailbox the user has Send As rights on.
//! - `Mail.ReadWrite` (opt-in, `MAIL_DISPATCH_GRAPH_LARGE_MESSAGES`) for drafts and
//!   attachment upload sessions, the only way past Graph's 4 MB request limit
//!   (graph/outlook-large-attachments). It grants reading, changing and deleting
//!   every message of the mailbox.
//! - `offline_access` for a refresh token; a refresh returns a new refresh token
//!   only when it asks for `offline_access` again.
//!
//! Google (developers.google.com/workspace/gmail/api/auth/scopes):
//! - `gmail.send` (sensitive) for `users.messages.send`;
//!   `gmail.settings.basic` (restricted, opt-in) to list send-as aliases.
//! - Google's consent screen lets the user untick scopes: the token response's
//!   `scope` says what was granted.

use mail_dispatch_domain::ProviderKind;

pub const OFFLINE_ACCESS: &str = "offline_access";
pub const MICROSOFT_USER_READ: &str = "https://graph.microsoft.com/User.Read";
pub const MICROSOFT_MAIL_SEND: &str = "https://graph.microsoft.com/Mail.Send";
pub const MICROSOFT_MAIL_READ_WRITE: &str = "https://graph.microsoft.com/Mail.ReadWrite";
pub const MICROSOFT_MAIL_SEND_SHARED: &str = "https://graph.microsoft.com/Mail.Send.Shared";
pub const GOOGLE_GMAIL_SEND: &str = "https://www.googleapis.com/auth/gmail.send";
pub const GOOGLE_SETTINGS_BASIC: &str = "https://www.googleapis.com/auth/gmail.settings.basic";

/// OpenID Connect scopes: they shape the ID token, grant no API access, and
/// cannot be unticked on Google's consent screen.
const OIDC: &[&str] = &["openid", "email", "profile"];

/// What mail-dispatch requests from Microsoft, large messages off.
pub fn microsoft(shared_mailboxes: bool) -> Vec<String> {
    microsoft_with(shared_mailboxes, false)
}

/// What mail-dispatch requests from Microsoft: `Mail.Send.Shared` with shared
/// mailboxes, `Mail.ReadWrite` with large messages.
pub fn microsoft_with(shared_mailboxes: bool, large_messages: bool) -> Vec<String> {
    let mut s: Vec<String> = [
        OFFLINE_ACCESS,
        "openid",
        "email",
        "profile",
        MICROSOFT_USER_READ,
        MICROSOFT_MAIL_SEND,
    ]
    .map(str::to_owned)
    .to_vec();
    if shared_mailboxes {
        s.push(MICROSOFT_MAIL_SEND_SHARED.into());
    }
    if large_messages {
        s.push(MICROSOFT_MAIL_READ_WRITE.into());
    }
    s
}

/// What mail-dispatch requests from Google.
pub fn google(check_aliases: bool) -> Vec<String> {
    let mut s: Vec<String> = [GOOGLE_GMAIL_SEND, "openid", "email"]
        .map(str::to_owned)
        .to_vec();
    if check_aliases {
        s.push(GOOGLE_SETTINGS_BASIC.into());
    }
    s
}

/// The API permission a scope names, without the resource prefix and case:
/// Entra answers `Mail.Send` or `https://graph.microsoft.com/Mail.Send`
/// depending on the request; Google lists `email` as `…/auth/userinfo.email`.
fn permission(scope: &str) -> String {
    let s = scope
        .strip_prefix("https://graph.microsoft.com/")
        .unwrap_or(scope);
    let s = match s {
        "https://www.googleapis.com/auth/userinfo.email" => "email",
        "https://www.googleapis.com/auth/userinfo.profile" => "profile",
        other => other,
    };
    s.to_ascii_lowercase()
}

/// The requested API scopes the grant lacks (OpenID Connect and
/// `offline_access` aside: their absence shows elsewhere). `granted` is the
/// token response's `scope`; RFC 6749 §5.1 lets a provider omit it when it
/// granted exactly what was asked, so `None` means everything was granted.
pub fn missing(requested: &[String], granted: Option<&str>) -> Vec<String> {
    let Some(granted) = granted else {
        return vec![];
    };
    let granted: Vec<String> = granted.split_whitespace().map(permission).collect();
    requested
        .iter()
        .filter(|s| !OIDC.contains(&s.as_str()) && s.as_str() != OFFLINE_ACCESS)
        .filter(|s| !granted.contains(&permission(s)))
        .cloned()
        .collect()
}

/// The scopes of a Microsoft refresh: the granted ones, and always
/// `offline_access` (without it Entra returns no new refresh token).
pub fn microsoft_refresh(granted: Option<&str>, requested: &[String]) -> Vec<String> {
    let mut scopes: Vec<String> = match granted {
        Some(g) => g.split_whitespace().map(str::to_owned).collect(),
        None => requested.to_vec(),
    };
    if !scopes.iter().any(|s| s == OFFLINE_ACCESS) {
        scopes.push(OFFLINE_ACCESS.into());
    }
    scopes
}

/// A short, human name of a scope, for messages to an organization's admin.
pub fn label(provider: ProviderKind, scope: &str) -> String {
    match provider {
        ProviderKind::Google => scope
            .strip_prefix("https://www.googleapis.com/auth/")
            .unwrap_or(scope)
            .to_owned(),
        _ => scope
            .strip_prefix("https://graph.microsoft.com/")
            .unwrap_or(scope)
            .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microsoft_requests_user_read_for_me_and_mail_send() {
        let s = microsoft(false);
        assert!(s.contains(&MICROSOFT_USER_READ.to_owned()));
        assert!(s.contains(&MICROSOFT_MAIL_SEND.to_owned()));
        assert!(s.contains(&OFFLINE_ACCESS.to_owned()));
        assert!(!s.contains(&MICROSOFT_MAIL_SEND_SHARED.to_owned()));
        assert!(microsoft(true).contains(&MICROSOFT_MAIL_SEND_SHARED.to_owned()));
        assert!(!s.contains(&MICROSOFT_MAIL_READ_WRITE.to_owned()));
        let large = microsoft_with(false, true);
        assert!(large.contains(&MICROSOFT_MAIL_READ_WRITE.to_owned()));
        assert_eq!(
            missing(&large, Some("User.Read Mail.Send openid")),
            vec![MICROSOFT_MAIL_READ_WRITE.to_owned()],
            "a grant without Mail.ReadWrite is incomplete when large messages are on"
        );
    }

    #[test]
    fn missing_compares_permissions_whatever_their_spelling() {
        let requested = microsoft(false);
        assert!(missing(&requested, Some("User.Read Mail.Send openid profile email")).is_empty());
        assert!(
            missing(
                &requested,
                Some("https://graph.microsoft.com/mail.send https://graph.microsoft.com/User.Read")
            )
            .is_empty()
        );
        assert_eq!(
            missing(
                &requested,
                Some("https://graph.microsoft.com/Mail.Send openid")
            ),
            vec![MICROSOFT_USER_READ.to_owned()]
        );
        assert!(
            missing(&requested, None).is_empty(),
            "no scope: as requested"
        );
        let google = google(false);
        assert_eq!(
            missing(
                &google,
                Some("openid https://www.googleapis.com/auth/userinfo.email")
            ),
            vec![GOOGLE_GMAIL_SEND.to_owned()]
        );
        assert!(
            missing(
                &google,
                Some("openid https://www.googleapis.com/auth/userinfo.email https://www.googleapis.com/auth/gmail.send")
            )
            .is_empty()
        );
    }

    #[test]
    fn microsoft_refreshes_always_ask_for_offline_access() {
        let r = microsoft_refresh(Some("https://graph.microsoft.com/Mail.Send"), &[]);
        assert!(r.contains(&OFFLINE_ACCESS.to_owned()));
        let r = microsoft_refresh(Some("offline_access Mail.Send"), &[]);
        assert_eq!(r.iter().filter(|s| *s == OFFLINE_ACCESS).count(), 1);
    }
}
