//! Assembling a dispatcher from settings: shared by the binary and the tests.

use std::sync::Arc;
use std::time::Duration;

use mail_dispatch_providers::{
    GmailSender, GraphSender, OAuthApp, PlatformSender, TokenService, TransportUrlError,
    api_http_client, oauth_http_client,
};
use mail_dispatch_store::{IntegrationChange, Store, spawn_change_listener};
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

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

/// Past this many mailboxes with a daily count, the pacer forgets those far below
/// their limit (the next flush brings a sending mailbox's total back).
const PACER_DAILY_ENTRIES: usize = 10_000;

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
            pacer: crate::pacing::Pacer::new(config.pacing),
            published: Default::default(),
            store,
            senders,
            config,
        })
    }

    /// Keeps the configuration and token caches and the mailbox pauses in step with
    /// PostgreSQL (every change, from any replica or the admin API, evicts its
    /// entries), and runs the upkeep: daily counts flushed every 2 s, finished
    /// ledger entries pruned every 10 minutes.
    pub fn follow_changes(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let listener = spawn_change_listener(self.store.pg_config().clone(), tx);
        let upkeep = {
            let this = Arc::clone(self);
            tokio::spawn(async move {
                this.pacer.load_pauses(&this.store).await;
                let marks = this.published.run(&this.store);
                tokio::pin!(marks);
                let mut flush = tokio::time::interval(Duration::from_secs(2));
                let mut prune = tokio::time::interval(Duration::from_secs(600));
                loop {
                    tokio::select! {
                        () = &mut marks => {}
                        _ = flush.tick() => {
                            this.pacer.flush_daily(&this.store).await;
                            this.pacer.prune(chrono::Utc::now(), PACER_DAILY_ENTRIES);
                        }
                        _ = prune.tick() => match this.store.prune_ledger(this.config.ledger_retention, 1000).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(deleted = n, "pruned finished ledger entries"),
                            Err(e) => tracing::warn!(error = %e, "ledger pruning failed"),
                        },
                    }
                }
            })
        };
        let this = Arc::clone(self);
        tokio::spawn(async move {
            // Aborting this task (shutdown) stops the listener and the upkeep too.
            let _listener = AbortOnDropHandle::new(listener);
            let _upkeep = AbortOnDropHandle::new(upkeep);
            while let Some(change) = rx.recv().await {
                this.resolver.apply(&change);
                match &change {
                    IntegrationChange::Organization(org) => this.senders.tokens.forget(org),
                    IntegrationChange::All => this.senders.tokens.forget_all(),
                    IntegrationChange::Pause {
                        organization_id,
                        until,
                    } => this.pacer.apply_pause(organization_id, *until),
                }
                tracing::debug!(?change, "integration change applied to caches");
            }
        })
    }
}
