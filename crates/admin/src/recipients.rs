//! What recipients will see as the sender, which is not always what the admin
//! typed: the providers rewrite the From.
//!
//! - Exchange Online ignores the display name sent with Graph and shows the
//!   sending mailbox's directory `displayName` (not documented by Microsoft;
//!   msgraph-sdk-php#183, microsoft-graph-docs-contrib#5240).
//! - It rewrites a proxy-address alias to the primary address unless the tenant
//!   has `Set-OrganizationConfig -SendFromAliasEnabled $true` (a tenant setting
//!   that `User.Read` cannot read, so the answer says "unless").
//! - A mailbox the user has only Send on Behalf rights on shows "user on behalf
//!   of mailbox" (learn.microsoft.com/graph/outlook-send-mail-from-other-user);
//!   Send As and Send on Behalf cannot be told apart with the scopes granted.
//! - Gmail replaces a From that is neither the account nor one of its verified
//!   send-as aliases with the account's address, and still answers 200
//!   (googleapis/google-api-php-client#2393).
//!
//! Pure functions of what the provider's directory says; tested below.

use mail_dispatch_domain::Mailbox;
use mail_dispatch_providers::graph::GraphUser;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Why recipients see something other than the configured sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RewriteReason {
    /// Exchange shows the mailbox's directory display name, not the name sent.
    DirectoryDisplayName,
    /// The address is an alias of the mailbox: Exchange shows the primary
    /// address unless the tenant allows sending from aliases.
    AliasRewrittenToPrimary,
    /// Another mailbox: Exchange shows its own directory name (which `User.Read`
    /// cannot read), and "user on behalf of mailbox" if the user has only Send on
    /// Behalf rights on it.
    OtherMailbox,
    /// Gmail replaces a From it cannot match to the account or a verified alias.
    GmailFromRewritten,
}

/// What recipients will see as the sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RecipientsSee {
    /// The display name shown; null when the provider shows a name the granted
    /// scopes cannot read (another mailbox's directory name) or none.
    pub name: Option<String>,
    /// The From address shown.
    pub email: String,
    /// Whether this differs from the configured sender (name or address).
    pub differs: bool,
    /// Why, when it differs.
    pub reasons: Vec<RewriteReason>,
    /// The same in words, for the admin.
    pub message: String,
}

fn same_address(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Exchange's view of `configured` sent by the signed-in user `me`
/// (`GET /me?$select=displayName,mail,proxyAddresses,…`).
pub fn microsoft(configured: &Mailbox, me: &GraphUser) -> RecipientsSee {
    let wanted = configured.email.as_str();
    let primary = me
        .mail
        .clone()
        .or_else(|| me.user_principal_name.clone())
        .unwrap_or_else(|| wanted.to_owned());
    let directory_name = me.display_name.clone().filter(|n| !n.trim().is_empty());
    let alias = !same_address(wanted, &primary)
        && (me
            .user_principal_name
            .as_deref()
            .is_some_and(|u| same_address(u, wanted))
            || me.proxy_addresses.iter().any(|p| {
                let bare = p.split_once(':').map_or(p.as_str(), |(_, a)| a);
                same_address(bare, wanted)
            }));
    let own = alias || same_address(wanted, &primary);
    let mut reasons = Vec::new();
    let mut said = Vec::new();
    if !own {
        if configured.name.is_some() {
            reasons.push(RewriteReason::OtherMailbox);
        }
        said.push(format!(
            "Exchange shows {wanted}'s own directory display name{}; if {} has only Send on Behalf rights on it (not Send As), recipients see \"{} on behalf of {wanted}\"",
            configured
                .name
                .as_deref()
                .map(|n| format!(", not \"{n}\" (unless that is its directory name)"))
                .unwrap_or_default(),
            primary,
            directory_name.as_deref().unwrap_or(&primary),
        ));
        return RecipientsSee {
            name: None,
            email: wanted.to_owned(),
            differs: !reasons.is_empty(),
            reasons,
            message: said.join(". ") + ".",
        };
    }
    if configured.name != directory_name {
        reasons.push(RewriteReason::DirectoryDisplayName);
        said.push(format!(
            "Exchange ignores the configured name{} and shows the mailbox's directory name{}",
            configured
                .name
                .as_deref()
                .map(|n| format!(" \"{n}\""))
                .unwrap_or_default(),
            directory_name
                .as_deref()
                .map(|n| format!(" \"{n}\""))
                .unwrap_or_else(|| " (none is set)".into()),
        ));
    }
    let email = if alias {
        reasons.push(RewriteReason::AliasRewrittenToPrimary);
        said.push(format!(
            "{wanted} is an alias of {primary}: Exchange sends from {primary} unless the tenant allows sending from aliases (Set-OrganizationConfig -SendFromAliasEnabled $true)"
        ));
        primary.clone()
    } else {
        wanted.to_owned()
    };
    let seen = match &directory_name {
        Some(n) => format!("{n} <{email}>"),
        None => email.clone(),
    };
    let message = if reasons.is_empty() {
        format!("Recipients see {seen}, as configured.")
    } else {
        format!("Recipients will see {seen}. {}.", said.join(". "))
    };
    RecipientsSee {
        name: directory_name,
        email,
        differs: !reasons.is_empty(),
        reasons,
        message,
    }
}

/// Gmail's view of `configured` sent by `account`: unchanged when it is the
/// account or one of `verified_aliases`, else the account's address.
pub fn google(configured: &Mailbox, account: &str, verified_aliases: &[String]) -> RecipientsSee {
    let wanted = configured.email.as_str();
    let kept =
        same_address(wanted, account) || verified_aliases.iter().any(|a| same_address(a, wanted));
    let email = if kept { wanted } else { account }.to_owned();
    let seen = match &configured.name {
        Some(n) => format!("{n} <{email}>"),
        None => email.clone(),
    };
    if kept {
        return RecipientsSee {
            name: configured.name.clone(),
            email,
            differs: false,
            reasons: vec![],
            message: format!("Recipients see {seen}, as configured."),
        };
    }
    RecipientsSee {
        name: configured.name.clone(),
        message: format!(
            "Recipients would see {seen}: Gmail replaces a From that is not the account ({account}) or one of its verified send-as aliases, without an error."
        ),
        email,
        differs: true,
        reasons: vec![RewriteReason::GmailFromRewritten],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_dispatch_domain::EmailAddress;

    fn mailbox(email: &str, name: Option<&str>) -> Mailbox {
        Mailbox::new(EmailAddress::parse(email).unwrap(), name.map(str::to_owned))
    }

    fn me() -> GraphUser {
        GraphUser {
            id: "oid".into(),
            display_name: Some("Alice Martin".into()),
            mail: Some("alice@customer.com".into()),
            user_principal_name: Some("alice@customer.onmicrosoft.com".into()),
            proxy_addresses: vec![
                "SMTP:alice@customer.com".into(),
                "smtp:compliance@customer.com".into(),
            ],
        }
    }

    #[test]
    fn exchange_shows_the_directory_name_of_the_own_mailbox() {
        let seen = microsoft(
            &mailbox("Alice@Customer.com", Some("Compliance Team")),
            &me(),
        );
        assert_eq!(seen.name.as_deref(), Some("Alice Martin"));
        assert_eq!(seen.email, "Alice@Customer.com");
        assert!(seen.differs);
        assert_eq!(seen.reasons, vec![RewriteReason::DirectoryDisplayName]);
        assert!(
            seen.message.contains("Alice Martin <Alice@Customer.com>"),
            "{}",
            seen.message
        );

        let same = microsoft(&mailbox("alice@customer.com", Some("Alice Martin")), &me());
        assert!(!same.differs, "{same:?}");
        assert!(same.reasons.is_empty());
    }

    #[test]
    fn an_alias_is_reported_as_the_primary_address_unless_the_tenant_allows_aliases() {
        let seen = microsoft(
            &mailbox("compliance@customer.com", Some("Alice Martin")),
            &me(),
        );
        assert_eq!(seen.email, "alice@customer.com");
        assert_eq!(seen.reasons, vec![RewriteReason::AliasRewrittenToPrimary]);
        assert!(seen.message.contains("SendFromAliasEnabled"));
        // The UPN, when it is not the primary address, is rewritten too.
        let upn = microsoft(&mailbox("alice@customer.onmicrosoft.com", None), &me());
        assert_eq!(upn.email, "alice@customer.com");
        assert!(
            upn.reasons
                .contains(&RewriteReason::AliasRewrittenToPrimary)
        );
    }

    #[test]
    fn another_mailbox_shows_its_own_name_and_maybe_on_behalf() {
        let seen = microsoft(
            &mailbox("notifications@customer.com", Some("Notifications")),
            &me(),
        );
        assert_eq!(seen.name, None);
        assert_eq!(seen.email, "notifications@customer.com");
        assert_eq!(seen.reasons, vec![RewriteReason::OtherMailbox]);
        assert!(
            seen.message
                .contains("Alice Martin on behalf of notifications@customer.com")
        );
    }

    #[test]
    fn gmail_keeps_the_account_and_verified_aliases_and_rewrites_the_rest() {
        let aliases = vec!["team@customer.com".to_owned()];
        let own = google(
            &mailbox("ops@customer.com", Some("Ops")),
            "ops@customer.com",
            &[],
        );
        assert!(!own.differs);
        let alias = google(
            &mailbox("Team@customer.com", Some("Team")),
            "ops@customer.com",
            &aliases,
        );
        assert!(!alias.differs);
        let other = google(
            &mailbox("ceo@customer.com", Some("CEO")),
            "ops@customer.com",
            &aliases,
        );
        assert_eq!(other.email, "ops@customer.com");
        assert_eq!(other.name.as_deref(), Some("CEO"));
        assert_eq!(other.reasons, vec![RewriteReason::GmailFromRewritten]);
    }
}
