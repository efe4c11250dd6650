//! Which sender an organization's jobs use, cached in memory.
//!
//! A steady stream of jobs must not query PostgreSQL for configuration on every
//! message: resolutions (including "no integration") are cached, evicted when
//! PostgreSQL notifies a change (`spawn_change_listener`), and expire after a TTL
//! as a safety net. The cache is bounded: past `max_entries` the oldest half is dropped.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mail_dispatch_domain::{EmailAddress, Mailbox, ProviderKind};

use crate::pacing::SendingBudget;
use mail_dispatch_store::{
    Fallback, Integration, IntegrationChange, IntegrationStatus, Store, StoreError,
};

/// How an organization's jobs are sent right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Through the organization's active integration, from its sender.
    /// `fallback`: the platform sender stands in if the grant turns out dead.
    Provider {
        provider: ProviderKind,
        sender: Mailbox,
        fallback: Fallback,
        /// Graph `saveToSentItems`: the organization's choice.
        save_to_sent_items: bool,
        /// What the mailbox's sending limits depend on: a consumer Google
        /// account (no `hd`), the organization's share.
        budget: SendingBudget,
    },
    /// Through the platform sender. `on_behalf_of` is set when the platform
    /// sender stands in for an organization whose grant stopped working
    /// (`fallback: platform_sender`): its name and, as Reply-To, its address.
    Platform { on_behalf_of: Option<Mailbox> },
    /// The organization's grant stopped working and it chose no fallback.
    Revoked { provider: ProviderKind },
}

impl Route {
    /// Contract §5: platform sender until first active; never a silent fallback after.
    pub fn for_integration(integration: Option<&Integration>) -> Route {
        let Some(i) = integration else {
            return Route::Platform { on_behalf_of: None };
        };
        let sender = i
            .sender_email
            .as_deref()
            .and_then(|e| EmailAddress::parse(e).ok())
            .map(|email| Mailbox::new(email, i.sender_name.clone()));
        match (i.status, sender) {
            (IntegrationStatus::Active, Some(sender)) => Route::Provider {
                provider: i.provider,
                sender,
                fallback: i.fallback,
                save_to_sent_items: i.save_to_sent_items,
                budget: SendingBudget {
                    // Google's id token carries `hd` for Workspace accounts only.
                    consumer: i.provider == ProviderKind::Google && i.account_tenant.is_none(),
                    trial: i.provider == ProviderKind::Google && i.google_trial,
                    limit_percent: i.limit_percent,
                },
            },
            _ if !i.ever_active => Route::Platform { on_behalf_of: None },
            (_, sender) => match (i.fallback, sender) {
                (Fallback::PlatformSender, Some(sender)) => Route::Platform {
                    on_behalf_of: Some(sender),
                },
                _ => Route::Revoked {
                    provider: i.provider,
                },
            },
        }
    }
}

/// The cached resolver.
pub struct Resolver {
    store: Store,
    ttl: Duration,
    max_entries: usize,
    cache: Mutex<HashMap<String, (Route, Instant)>>,
    /// Bumped by every change notification: a route read from PostgreSQL before a
    /// change arrived may be stale, and is then used once but not cached.
    changes: std::sync::atomic::AtomicU64,
}

impl Resolver {
    pub fn new(store: Store, ttl: Duration) -> Self {
        Resolver {
            store,
            ttl,
            max_entries: 100_000,
            cache: Mutex::new(HashMap::new()),
            changes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The route of an organization: from memory, or from PostgreSQL once.
    pub async fn resolve(&self, organization_id: &str) -> Result<Route, StoreError> {
        if let Some((route, at)) = self.cache.lock().expect("poisoned").get(organization_id)
            && at.elapsed() < self.ttl
        {
            return Ok(route.clone());
        }
        let loaded_at = Instant::now();
        let changes_before = self.changes();
        let integration = self.store.integration(organization_id).await?;
        let route = Route::for_integration(integration.as_ref());
        self.fill(organization_id, &route, loaded_at, changes_before);
        Ok(route)
    }

    fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Caches a route read from PostgreSQL, unless a change was notified since the
    /// read began (the route may predate it: the eviction must not be undone).
    fn fill(&self, organization_id: &str, route: &Route, loaded_at: Instant, changes_before: u64) {
        let mut cache = self.cache.lock().expect("poisoned");
        if self.changes() != changes_before {
            return;
        }
        if cache.len() >= self.max_entries {
            let mut ages: Vec<_> = cache.values().map(|(_, at)| *at).collect();
            ages.sort();
            let cutoff = ages[ages.len() / 2];
            cache.retain(|_, (_, at)| *at > cutoff);
        }
        cache.insert(organization_id.to_owned(), (route.clone(), loaded_at));
    }

    /// Applies a change notification.
    pub fn apply(&self, change: &IntegrationChange) {
        let mut cache = self.cache.lock().expect("poisoned");
        if !matches!(
            change,
            IntegrationChange::Pause { .. } | IntegrationChange::SlotFreed(_)
        ) {
            // Under the cache lock: a fill either sees this or comes before it.
            self.changes
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
        match change {
            IntegrationChange::Organization(org) => {
                if cache.remove(org).is_some() {
                    metrics::counter!(crate::metrics::CONFIG_CACHE_EVICTIONS).increment(1);
                }
            }
            IntegrationChange::All => cache.clear(),
            IntegrationChange::Pause { .. } | IntegrationChange::SlotFreed(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn integration(
        status: IntegrationStatus,
        ever_active: bool,
        fallback: Fallback,
    ) -> Integration {
        Integration {
            organization_id: "org".into(),
            provider: ProviderKind::Microsoft,
            status,
            account_email: Some("admin@customer.com".into()),
            account_id: None,
            account_tenant: None,
            last_refreshed_at: None,
            sender_email: Some("notifications@customer.com".into()),
            sender_name: Some("Compliance".into()),
            fallback,
            save_to_sent_items: false,
            recipients_see: None,
            limit_percent: 100,
            google_trial: false,
            ever_active,
            connected_at: Utc::now(),
            last_test_at: None,
            last_test: None,
            last_error: None,
            updated_at: Utc::now(),
        }
    }

    #[test]
    fn routes_follow_contract_section_5() {
        use Fallback::PlatformSender;
        use IntegrationStatus::*;
        let sender = Mailbox::new(
            EmailAddress::parse("notifications@customer.com").unwrap(),
            Some("Compliance".into()),
        );
        let platform = Route::Platform { on_behalf_of: None };
        assert_eq!(Route::for_integration(None), platform);
        assert_eq!(
            Route::for_integration(Some(&integration(PendingSender, false, Fallback::None))),
            platform
        );
        assert_eq!(
            Route::for_integration(Some(&integration(Active, true, Fallback::None))),
            Route::Provider {
                provider: ProviderKind::Microsoft,
                sender: sender.clone(),
                fallback: Fallback::None,
                save_to_sent_items: false,
                budget: SendingBudget::default(),
            }
        );
        assert_eq!(
            Route::for_integration(Some(&integration(NeedsReauth, true, Fallback::None))),
            Route::Revoked {
                provider: ProviderKind::Microsoft
            }
        );
        assert_eq!(
            Route::for_integration(Some(&integration(NeedsReauth, true, PlatformSender))),
            Route::Platform {
                on_behalf_of: Some(sender)
            }
        );
        // A reconnect whose test has not passed yet does not silently fall back either.
        assert_eq!(
            Route::for_integration(Some(&integration(PendingSender, true, Fallback::None))),
            Route::Revoked {
                provider: ProviderKind::Microsoft
            }
        );
    }

    /// A change notified while a route was being read keeps that (maybe stale)
    /// route out of the cache; without a change it is cached.
    #[tokio::test]
    async fn a_route_read_before_a_change_is_not_cached() {
        let key = secrecy::SecretString::from(mail_dispatch_store::TokenCipher::generate_key());
        let store = Store::connect(
            "postgres://nobody@127.0.0.1:1/none",
            mail_dispatch_store::TokenCipher::new(&key, &[]).unwrap(),
            mail_dispatch_store::PoolSettings::default(),
        )
        .unwrap();
        let resolver = Resolver::new(store, Duration::from_secs(300));
        let route = Route::Platform { on_behalf_of: None };
        let cached = |r: &Resolver| r.cache.lock().unwrap().contains_key("org_1");

        let before = resolver.changes();
        resolver.apply(&IntegrationChange::Organization("org_1".into()));
        resolver.fill("org_1", &route, Instant::now(), before);
        assert!(!cached(&resolver), "a stale read undid the eviction");

        let before = resolver.changes();
        resolver.fill("org_1", &route, Instant::now(), before);
        assert!(cached(&resolver));
    }
}
