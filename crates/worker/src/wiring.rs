//! Assembling a dispatcher from settings: shared by the binary and the tests.

use std::sync::Arc;
use std::time::Duration;

use mail_dispatch_providers::{
    GmailSender, GraphSender, OAuthApp, PlatformSender, TokenService, TransportUrlError,
    api_http_client, oauth_http_client,
};
use mail_dispatch_store::{IntegrationChange, Store, spawn_change_listener};
use tokio::sync::mpsc;

use crate::{Dispatcher, Resolver, Senders, Tokens, WorkerConfig};

/// Where the providers are (every URL configurable: tests point them at stand-ins).
#[derive(Clone, Debug)]
pub struct ProviderEndpoints {
    pub graph_url: url::Url,
    pub gmail_url: url::Url,
    pub microsoft: Option<OAuthApp>,
    pub google: Option<OAuthApp>,
    /// `smtp://…`, `smtps://…` or `file://DIR`.
    pub platform_transport: String,
    pub http_timeout: Duration,
}

impl Dispatcher {
    /// Builds the dispatcher and its senders, caches and token service.
    pub fn build(
        store: Store,
        config: WorkerConfig,
        endpoints: &ProviderEndpoints,
    ) -> Result<Self, TransportUrlError> {
        let api = api_http_client(endpoints.http_timeout);
        let service = TokenService::new(
            oauth_http_client(endpoints.http_timeout),
            endpoints.microsoft.as_ref(),
            endpoints.google.as_ref(),
        );
        let tokens = Arc::new(Tokens::new(
            store.clone(),
            service,
            config.token_refresh_margin,
        ));
        let senders = Arc::new(Senders {
            graph: GraphSender::new(api.clone(), &endpoints.graph_url, false),
            gmail: GmailSender::new(api, &endpoints.gmail_url),
            platform: PlatformSender::from_url(&endpoints.platform_transport)?,
            tokens,
        });
        Ok(Dispatcher {
            resolver: Arc::new(Resolver::new(store.clone(), config.config_cache_ttl)),
            store,
            senders,
            config,
        })
    }

    /// Keeps the configuration and token caches in step with PostgreSQL: every
    /// integration change, from any replica or the admin API, evicts its entries.
    pub fn follow_changes(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let listener = spawn_change_listener(self.store.pg_config().clone(), tx);
        let this = Arc::clone(self);
        tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                this.resolver.apply(&change);
                match &change {
                    IntegrationChange::Organization(org) => this.senders.tokens.forget(org),
                    IntegrationChange::All => this.senders.tokens.forget_all(),
                }
                tracing::debug!(?change, "integration change applied to caches");
            }
            listener.abort();
        })
    }
}
