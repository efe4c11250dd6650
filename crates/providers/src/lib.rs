#![doc = include_str!("../README.md")]

mod error;
pub mod gmail;
pub mod graph;
pub mod mime;
pub mod oauth;
pub mod platform;
pub mod scopes;

use std::time::Duration;

pub use error::{SendError, ThrottleScope, parse_gmail_retry_after, parse_retry_after};
pub use gmail::GmailSender;
pub use graph::GraphSender;
pub use oauth::{OAuthApp, RefreshError, TokenGrant, TokenService};
pub use platform::{PlatformSender, TransportUrlError};

/// A provider accepted a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// Gmail's message id, Graph's `request-id`, or the Message-ID of an SMTP/file send.
    pub provider_message_id: Option<String>,
}

/// The HTTP client for provider APIs: bounded timeouts, no redirects.
pub fn api_http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(64)
        .user_agent(concat!("mail-dispatch/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a TLS backend is compiled in")
}

/// The HTTP client for token endpoints. It must not follow redirects.
pub fn oauth_http_client(timeout: Duration) -> reqwest::Client {
    api_http_client(timeout)
}
