//! What the dispatch use case and the admin API share, built once by the
//! composition root (the binary, or a test's app) and handed to both.
//!
//! The admin API receives these services, never the dispatcher: a process that
//! only serves the admin API builds no pacer and runs none of the worker's loops.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mail_dispatch_providers::{
    GmailSender, GraphSender, OAuthApp, PlatformSender, TokenService, TransportUrlError,
    api_http_client, oauth_http_client,
};
use mail_dispatch_store::{IntegrationChange, Store, spawn_change_listener};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use crate::{Resolver, Senders, Tokens};

/// Where the providers are (every URL configurable: tests point them at stand-ins).
#[derive(Clone, Debug)]
pub struct ProviderEndpoints {
    pub graph_url: url::Url,
    /// Graph's draft-and-upload-session path for large messages; `None`: off.
    pub graph_large_messages: Option<mail_dispatch_providers::graph::LargeMessages>,
    pub gmail_url: url::Url,
    pub microsoft: Option<OAuthApp>,
    pub google: Option<OAuthApp>,
    /// `smtp://…`, `smtps://…` or `file://DIR`.
    pub platform_transport: String,
    pub http_timeout: Duration,
}

/// How long the shared caches trust what they hold.
#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    /// An access token is refreshed when it expires within this margin.
    pub token_refresh_margin: Duration,
    /// Longest time a resolved configuration is trusted without a notification.
    pub config_cache_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            token_refresh_margin: Duration::from_secs(120),
            config_cache_ttl: Duration::from_secs(300),
        }
    }
}

/// What the change listener says about mailbox pauses and slots.
#[derive(Clone, Copy, Debug)]
pub enum PacingEvent<'a> {
    /// A replica paused this mailbox until then.
    Paused {
        organization_id: &'a str,
        until: DateTime<Utc>,
    },
    /// This mailbox's pause was lifted (announced as a pause ending now or
    /// earlier: a real pause always ends later than its announcement).
    Lifted { organization_id: &'a str },
    /// The listener reconnected: pauses announced meanwhile were missed.
    Missed,
    /// A replica gave back one of this organization's Graph mailbox slots.
    SlotFreed { organization_id: &'a str },
}

/// Called with each [`PacingEvent`].
pub type OnPacingEvent = Arc<dyn Fn(PacingEvent<'_>) + Send + Sync>;

/// The shared services.
pub struct Services {
    pub store: Store,
    /// Which sender each organization uses, cached.
    pub resolver: Resolver,
    /// Graph, Gmail, the platform sender, and the access tokens they need.
    pub senders: Senders,
}

impl Services {
    /// Builds the senders, the token service and the caches.
    pub fn build(
        store: Store,
        endpoints: &ProviderEndpoints,
        caches: CacheConfig,
    ) -> Result<Arc<Self>, TransportUrlError> {
        let api = api_http_client(endpoints.http_timeout);
        let service = TokenService::new(
            oauth_http_client(endpoints.http_timeout),
            endpoints.microsoft.as_ref(),
            endpoints.google.as_ref(),
        );
        let tokens = Arc::new(
            Tokens::new(store.clone(), service, caches.token_refresh_margin)
                .with_refresh_lease(endpoints.http_timeout + crate::tokens::REFRESH_LEASE_MARGIN),
        );
        let senders = Senders {
            graph: GraphSender::new(api.clone(), &endpoints.graph_url)
                .with_large_messages(endpoints.graph_large_messages)
                .with_timeout(endpoints.http_timeout),
            gmail: GmailSender::new(api, &endpoints.gmail_url).with_timeout(endpoints.http_timeout),
            platform: PlatformSender::from_url(&endpoints.platform_transport)?,
            tokens,
        };
        Ok(Arc::new(Services {
            resolver: Resolver::new(store.clone(), caches.config_cache_ttl),
            store,
            senders,
        }))
    }

    /// Keeps the route and token caches in step with PostgreSQL: every change, from
    /// any replica or the admin API, evicts its entries. Mailbox pauses and freed
    /// mailbox slots go to `on_pacing` (the worker's pacer; an admin-only process
    /// has none). Aborting the returned task stops the listener.
    pub fn follow_changes(
        self: &Arc<Self>,
        on_pacing: Option<OnPacingEvent>,
    ) -> tokio::task::JoinHandle<()> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let listener = spawn_change_listener(&self.store, tx);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let _listener = AbortOnDropHandle::new(listener);
            while let Some(change) = rx.recv().await {
                this.resolver.apply(&change);
                match &change {
                    IntegrationChange::Organization(org) => this.senders.tokens.forget(org),
                    IntegrationChange::All => {
                        this.senders.tokens.forget_all();
                        if let Some(on_pacing) = &on_pacing {
                            on_pacing(PacingEvent::Missed);
                        }
                    }
                    IntegrationChange::Pause {
                        organization_id,
                        until,
                    } => {
                        if let Some(on_pacing) = &on_pacing {
                            on_pacing(if *until <= Utc::now() {
                                PacingEvent::Lifted { organization_id }
                            } else {
                                PacingEvent::Paused {
                                    organization_id,
                                    until: *until,
                                }
                            });
                        }
                    }
                    IntegrationChange::SlotFreed(organization_id) => {
                        if let Some(on_pacing) = &on_pacing {
                            on_pacing(PacingEvent::SlotFreed { organization_id });
                        }
                        // Several a second for a busy mailbox: not worth a log line.
                        continue;
                    }
                }
                tracing::debug!(?change, "integration change applied to caches");
            }
        })
    }
}
