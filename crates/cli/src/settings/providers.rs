//! Microsoft and Google: the OAuth apps, their endpoints (overridden by the
//! sandbox and the tests), the mail APIs, and the optional scopes.

use anyhow::Context as _;
use clap::Args;
use mail_dispatch_domain::ProviderKind;
use mail_dispatch_providers::OAuthApp;
use secrecy::SecretString;
use url::Url;

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Providers")]
pub struct ProviderSettings {
    #[arg(long, env = "MAIL_DISPATCH_MICROSOFT_CLIENT_ID")]
    pub microsoft_client_id: Option<String>,
    #[arg(
        long,
        env = "MAIL_DISPATCH_MICROSOFT_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub microsoft_client_secret: Option<SecretString>,
    #[arg(
        long,
        env = "MAIL_DISPATCH_MICROSOFT_TENANT",
        default_value = "organizations"
    )]
    pub microsoft_tenant: String,
    #[arg(
        long,
        env = "MAIL_DISPATCH_MICROSOFT_LOGIN_URL",
        default_value = "https://login.microsoftonline.com"
    )]
    pub microsoft_login_url: Url,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GRAPH_URL",
        default_value = "https://graph.microsoft.com"
    )]
    pub graph_url: Url,
    #[arg(
        long,
        env = "MAIL_DISPATCH_MICROSOFT_SHARED_MAILBOXES",
        default_value_t = false
    )]
    pub microsoft_shared_mailboxes: bool,
    /// Graph messages over the 4 MB request limit go through a draft and
    /// upload sessions; needs (and requests) `Mail.ReadWrite`.
    #[arg(
        long,
        env = "MAIL_DISPATCH_GRAPH_LARGE_MESSAGES",
        default_value_t = false
    )]
    pub graph_large_messages: bool,
    /// The tenants' maximum message size (Exchange Online's default, 35 MB),
    /// attachments counted in base64.
    #[arg(
        long,
        env = "MAIL_DISPATCH_GRAPH_MAX_MESSAGE_BYTES",
        default_value_t = mail_dispatch_providers::graph::DEFAULT_MAX_MESSAGE_BYTES
    )]
    pub graph_max_message_bytes: usize,
    #[arg(long, env = "MAIL_DISPATCH_GOOGLE_CLIENT_ID")]
    pub google_client_id: Option<String>,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub google_client_secret: Option<SecretString>,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_AUTH_URL",
        default_value = "https://accounts.google.com/o/oauth2/v2/auth"
    )]
    pub google_auth_url: Url,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_TOKEN_URL",
        default_value = "https://oauth2.googleapis.com/token"
    )]
    pub google_token_url: Url,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_REVOKE_URL",
        default_value = "https://oauth2.googleapis.com/revoke"
    )]
    pub google_revoke_url: Url,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GMAIL_URL",
        default_value = "https://gmail.googleapis.com"
    )]
    pub gmail_url: Url,
    #[arg(
        long,
        env = "MAIL_DISPATCH_GOOGLE_CHECK_ALIASES",
        default_value_t = false
    )]
    pub google_check_aliases: bool,
}

impl ProviderSettings {
    fn microsoft_endpoint(&self, leaf: &str) -> anyhow::Result<Url> {
        let base = self.microsoft_login_url.as_str().trim_end_matches('/');
        Url::parse(&format!(
            "{base}/{}/oauth2/v2.0/{leaf}",
            self.microsoft_tenant
        ))
        .context("MAIL_DISPATCH_MICROSOFT_LOGIN_URL")
    }

    pub fn microsoft_scopes(&self) -> Vec<String> {
        mail_dispatch_providers::scopes::microsoft_with(
            self.microsoft_shared_mailboxes,
            self.graph_large_messages,
        )
    }

    /// The large-message path of Graph, when turned on.
    pub fn graph_large_messages(&self) -> Option<mail_dispatch_providers::graph::LargeMessages> {
        self.graph_large_messages
            .then_some(mail_dispatch_providers::graph::LargeMessages {
                max_message_bytes: self.graph_max_message_bytes,
            })
    }

    pub fn google_scopes(&self) -> Vec<String> {
        mail_dispatch_providers::scopes::google(self.google_check_aliases)
    }

    /// The provider's OAuth app, `None` without a client id; `redirect_url` is the
    /// admin API's callback.
    pub fn oauth_app(
        &self,
        provider: ProviderKind,
        redirect_url: &Url,
    ) -> anyhow::Result<Option<OAuthApp>> {
        Ok(match provider {
            ProviderKind::Microsoft => match &self.microsoft_client_id {
                None => None,
                Some(id) => Some(OAuthApp {
                    client_id: id.clone(),
                    client_secret: self.microsoft_client_secret.clone(),
                    auth_url: self.microsoft_endpoint("authorize")?,
                    token_url: self.microsoft_endpoint("token")?,
                    scopes: self.microsoft_scopes(),
                    redirect_url: Some(redirect_url.clone()),
                }),
            },
            ProviderKind::Google => self.google_client_id.as_ref().map(|id| OAuthApp {
                client_id: id.clone(),
                client_secret: self.google_client_secret.clone(),
                auth_url: self.google_auth_url.clone(),
                token_url: self.google_token_url.clone(),
                scopes: self.google_scopes(),
                redirect_url: Some(redirect_url.clone()),
            }),
            ProviderKind::Default => None,
        })
    }
}
