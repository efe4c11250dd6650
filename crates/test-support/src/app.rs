//! A worker running in-process against a test database, a test prefix and the stand-ins.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mail_dispatch_domain::{EmailAddress, Mailbox, ProviderKind};
use mail_dispatch_providers::OAuthApp;
use mail_dispatch_store::{Fallback, NewConnection, PoolSettings, Store};
use mail_dispatch_worker::{
    CacheConfig, Dispatcher, Health, ProviderEndpoints, Services, WorkerConfig,
};
use secrecy::SecretString;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::standins::Vendor;
use crate::{FaultProxy, StandIns, TestAmqp, TestDb};

/// Knobs a test may turn.
#[derive(Clone, Debug)]
pub struct TestAppOptions {
    pub concurrency: usize,
    pub max_attempts: u32,
    pub max_age: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_in_process_wait: Duration,
    pub in_process_attempts: u32,
    pub claim_lease: Duration,
    pub shutdown_grace: Duration,
    /// The test disrupts the shared services (restarts, closes all connections).
    pub exclusive: bool,
    /// Start a worker in this process (tests that run the real program say no).
    pub in_process_worker: bool,
    /// `MAIL_DISPATCH_GOOGLE_CHECK_ALIASES`.
    pub google_check_aliases: bool,
    /// Pacing; the default is permissive so tests that are not about pacing are not paced.
    pub pacing: mail_dispatch_worker::pacing::PacingConfig,
    /// The platform sender's transport; default: `file://` into the test's outbox.
    pub platform_transport: Option<String>,
    /// `MAIL_DISPATCH_MICROSOFT_SHARED_MAILBOXES`.
    pub microsoft_shared_mailboxes: bool,
    /// `MAIL_DISPATCH_GRAPH_LARGE_MESSAGES` (with the default maximum message size).
    pub graph_large_messages: bool,
    /// How long a consent waits for the host application's confirmation.
    pub connection_ttl: Duration,
    /// How often the admin API expires unconfirmed consents.
    pub admin_upkeep_interval: Duration,
    /// The admin listener's connection limits.
    pub admin_connection_limits: mail_dispatch_admin::ConnectionLimits,
    /// The keep-alive of idle grants (off unless a test turns it on).
    pub keepalive: Option<mail_dispatch_worker::keepalive::KeepAliveConfig>,
    /// The workers and the admin API reach PostgreSQL through a [`FaultProxy`]
    /// (`TestApp::db_proxy`) that the test can blackhole, slow down or reset;
    /// the test's own `db.store` stays direct.
    pub database_through_proxy: bool,
    /// The pools and timeouts of the workers' and the admin API's store.
    pub pool: PoolSettings,
    /// The PostgreSQL server of the test's database (a URL of its maintenance
    /// database, e.g. [`crate::PgTlsServer::socket_url`]); default: the test server.
    pub database_server: Option<String>,
    /// Timeout of provider and token endpoint calls.
    pub http_timeout: Duration,
}

impl Default for TestAppOptions {
    fn default() -> Self {
        TestAppOptions {
            concurrency: 16,
            max_attempts: 4,
            max_age: Duration::from_secs(600),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(2),
            max_in_process_wait: Duration::from_secs(2),
            in_process_attempts: 2,
            claim_lease: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(5),
            exclusive: false,
            in_process_worker: true,
            google_check_aliases: false,
            pacing: mail_dispatch_worker::pacing::PacingConfig {
                org_max_in_flight: 1000,
                // Graph's own limit, which the stand-in enforces.
                graph_mailbox_concurrency: 4,
                gmail_mailbox_per_minute: 1_000_000,
                microsoft_daily_recipients: 1_000_000,
                google_daily_messages: 1_000_000,
                google_daily_recipients: 1_000_000,
                google_daily_unique_recipients: 1_000_000,
                google_daily_external_recipients: 1_000_000,
                google_consumer_daily_messages: 1_000_000,
                google_consumer_daily_recipients: 1_000_000,
                google_trial_daily_messages: 1_000_000,
                google_trial_daily_external_recipients: 1_000_000,
                window: mail_dispatch_worker::pacing::LIMIT_WINDOW,
            },
            platform_transport: None,
            microsoft_shared_mailboxes: false,
            graph_large_messages: false,
            connection_ttl: mail_dispatch_admin::CONNECTION_TTL,
            admin_upkeep_interval: Duration::from_secs(60),
            admin_connection_limits: mail_dispatch_admin::ConnectionLimits::ADMIN,
            keepalive: None,
            database_through_proxy: false,
            pool: PoolSettings::default(),
            database_server: None,
            http_timeout: Duration::from_secs(10),
        }
    }
}

/// A running worker.
pub struct RunningWorker {
    pub dispatcher: Arc<Dispatcher>,
    pub health: Arc<Health>,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    follower: tokio::task::JoinHandle<()>,
}

impl RunningWorker {
    /// Stops as on SIGTERM and waits for the worker to settle.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.handle).await;
        self.follower.abort();
    }
}

/// The Microsoft authority the tests use: the product's default.
pub const MICROSOFT_TENANT: &str = "organizations";

/// The admin API's bearer token in tests.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
/// The host application's origin, allowed for `return_to`.
pub const APP_ORIGIN: &str = "https://app.example";

/// Test database + AMQP prefix + stand-ins + a worker + the admin API.
pub struct TestApp {
    pub standins: StandIns,
    /// Base URL of the admin API (`http://127.0.0.1:port`).
    pub admin_url: String,
    admin: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    pub outbox: PathBuf,
    pub options: TestAppOptions,
    pub worker: Option<RunningWorker>,
    pub amqp: TestAmqp,
    pub db: TestDb,
    /// Between the services and PostgreSQL when `database_through_proxy` is set.
    pub db_proxy: Option<FaultProxy>,
    /// The store the workers and the admin API use (through `db_proxy` if any).
    pub services_store: Store,
    /// Dropped last: the services stay ours until cleanup is done.
    _services: crate::ServicesGuard,
}

pub const PLATFORM_SENDER: &str = "no-reply@platform.test";

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(TestAppOptions::default()).await
    }

    pub async fn spawn_with(options: TestAppOptions) -> TestApp {
        let services = crate::services(options.exclusive).await;
        let server = options
            .database_server
            .clone()
            .unwrap_or_else(crate::postgres_url);
        let (db, amqp, standins) =
            tokio::join!(TestDb::on(&server), TestAmqp::new(), StandIns::start());
        let outbox = std::env::temp_dir().join(crate::unique("md-outbox-"));
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_url = format!("http://{}", admin_listener.local_addr().unwrap());
        let (db_proxy, services_store) = if options.database_through_proxy {
            let proxy = FaultProxy::start(db.server_addr()).await;
            let store = db.store_at(proxy.addr(), options.pool);
            (Some(proxy), store)
        } else if options.pool == PoolSettings::default() {
            (None, db.store.clone())
        } else {
            (None, db.store_at(db.server_addr(), options.pool))
        };
        let mut app = TestApp {
            standins,
            admin_url,
            admin: None,
            outbox,
            options,
            worker: None,
            amqp,
            db,
            db_proxy,
            services_store,
            _services: services,
        };
        if app.options.in_process_worker {
            app.worker = Some(app.start_worker().await);
        }
        app.admin = Some(app.start_admin(admin_listener));
        app
    }

    pub fn endpoints(&self) -> ProviderEndpoints {
        provider_endpoints(&self.standins, &self.admin_url, &self.options, &self.outbox)
    }

    /// A fresh set of the shared services (one per replica).
    pub fn services(&self) -> Arc<Services> {
        Services::build(
            self.services_store.clone(),
            &self.endpoints(),
            CacheConfig::default(),
        )
        .unwrap()
    }

    pub fn worker_config(&self) -> WorkerConfig {
        worker_config(&self.options, self.amqp.topology.clone())
    }

    /// Starts a worker (another replica when one already runs).
    pub async fn start_worker(&self) -> RunningWorker {
        let services = self.services();
        let dispatcher = Arc::new(Dispatcher::new(&services, self.worker_config()));
        let follower = dispatcher.run_upkeep(&services);
        let health = Arc::new(Health::default());
        let shutdown = CancellationToken::new();
        if let Some(keepalive) = self.options.keepalive {
            tokio::spawn(mail_dispatch_worker::keepalive::run(
                services,
                dispatcher.config.clone(),
                keepalive,
                shutdown.clone(),
            ));
        }
        let handle = tokio::spawn(mail_dispatch_worker::runner::run(
            dispatcher.clone(),
            health.clone(),
            shutdown.clone(),
        ));
        // Wait until it consumes, so tests do not race the consumer's start.
        for _ in 0..100 {
            if health.amqp() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(health.amqp(), "worker did not connect to RabbitMQ");
        RunningWorker {
            dispatcher,
            health,
            shutdown,
            handle,
            follower,
        }
    }

    fn start_admin(
        &self,
        listener: tokio::net::TcpListener,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        // Like a separate `mail-dispatch admin` replica: its own services and
        // caches (kept in step with the workers' through PostgreSQL
        // notifications), and no worker machinery.
        let services = self.services();
        let follower = services.follow_changes(None);
        let config = mail_dispatch_admin::AdminConfig {
            admin_token: SecretString::from(ADMIN_TOKEN),
            return_origins: vec![Url::parse(APP_ORIGIN).unwrap().origin()],
            google_revoke_url: Url::parse(&format!("{}/revoke", self.standins.google_oauth.uri()))
                .unwrap(),
            google_check_aliases: self.options.google_check_aliases,
            state_ttl: mail_dispatch_admin::STATE_TTL,
            connection_ttl: self.options.connection_ttl,
            microsoft_shared_mailboxes: self.options.microsoft_shared_mailboxes,
            product_name: "Test Platform".into(),
            public_url: Url::parse(&self.admin_url).unwrap(),
            portal_session_ttl: mail_dispatch_admin::PORTAL_SESSION_TTL,
        };
        let state = mail_dispatch_admin::AdminState::new(services, config);
        let upkeep = tokio::spawn(mail_dispatch_admin::run_upkeep(
            state.clone(),
            self.options.admin_upkeep_interval,
        ));
        let router = mail_dispatch_admin::app(state);
        let limits = self.options.admin_connection_limits;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let handle = tokio::spawn(async move {
            let _upkeep = tokio_util::task::AbortOnDropHandle::new(upkeep);
            let listener = mail_dispatch_admin::GuardedListener::new(listener, limits);
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            follower.abort();
        });
        (shutdown, handle)
    }

    /// Stops the app's worker.
    pub async fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop().await;
        }
    }

    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.worker.as_ref().expect("worker running").dispatcher
    }

    /// Connects `org` to a provider as a finished connect flow would (grant stored,
    /// sender saved, test passed): its jobs go through the provider from now on.
    /// Returns the (access, refresh) tokens the stand-in issued.
    pub async fn connect(
        &self,
        org: &str,
        vendor: Vendor,
        account: &str,
        sender: &str,
        sender_name: &str,
    ) -> (String, String) {
        connect(
            &self.db,
            &self.standins,
            org,
            vendor,
            account,
            sender,
            sender_name,
        )
        .await
    }

    /// Connects `org` to `account`'s own mailbox, sending as the account
    /// itself under `sender_name` (what most tests need; see [`TestApp::connect`]).
    pub async fn connect_mailbox(
        &self,
        org: &str,
        vendor: Vendor,
        account: &str,
        sender_name: &str,
    ) -> (String, String) {
        self.connect(org, vendor, account, account, sender_name)
            .await
    }

    /// Like [`TestApp::connect`] with the account as sender, the grant carrying
    /// exactly `scopes` (e.g. `Mail.ReadWrite` for Graph's large messages).
    pub async fn connect_with_scopes(
        &self,
        org: &str,
        vendor: Vendor,
        account: &str,
        scopes: &[&str],
    ) -> (String, String) {
        let (access, refresh) = self.standins.issue_with_scopes(vendor, account, scopes);
        let expires_at = chrono::Utc::now() + chrono::Duration::minutes(50);
        store_grant(
            &self.db, org, vendor, account, &access, &refresh, expires_at,
        )
        .await;
        self.db
            .store
            .save_sender(org, account, None, Fallback::None)
            .await
            .unwrap();
        self.db
            .store
            .record_test(org, &serde_json::json!({"status": "sent"}), true)
            .await
            .unwrap();
        (access, refresh)
    }

    /// Stores a grant with the access token expiring at `expires_at`.
    pub async fn store_grant(
        &self,
        org: &str,
        vendor: Vendor,
        account: &str,
        access: &str,
        refresh: &str,
        expires_at: chrono::DateTime<chrono::Utc>,
    ) {
        store_grant(&self.db, org, vendor, account, access, refresh, expires_at).await
    }

    /// The environment that points the real program at this test's services.
    pub fn program_env(&self) -> Vec<(String, String)> {
        let o = &self.options;
        let e = self.endpoints();
        let v = |k: &str, val: String| (format!("MAIL_DISPATCH_{k}"), val);
        vec![
            v("AMQP_URL", crate::amqp_url()),
            v("DATABASE_URL", self.db.url.clone()),
            v(
                "TOKEN_KEY",
                secrecy::ExposeSecret::expose_secret(&self.db.key).to_owned(),
            ),
            v("QUEUE_PREFIX", self.amqp.prefix()),
            v("GRAPH_URL", e.graph_url.to_string()),
            v("GMAIL_URL", e.gmail_url.to_string()),
            v("MICROSOFT_LOGIN_URL", self.standins.microsoft_login.uri()),
            v("MICROSOFT_TENANT", MICROSOFT_TENANT.into()),
            v("MICROSOFT_CLIENT_ID", "ms-client-id".into()),
            v("MICROSOFT_CLIENT_SECRET", "ms-client-secret".into()),
            v(
                "GOOGLE_CLIENT_ID",
                "g-client-id.apps.googleusercontent.com".into(),
            ),
            v("GOOGLE_CLIENT_SECRET", "g-client-secret".into()),
            v(
                "GOOGLE_TOKEN_URL",
                format!("{}/token", self.standins.google_oauth.uri()),
            ),
            v(
                "GOOGLE_AUTH_URL",
                format!("{}/o/oauth2/v2/auth", self.standins.google_oauth.uri()),
            ),
            v(
                "GOOGLE_REVOKE_URL",
                format!("{}/revoke", self.standins.google_oauth.uri()),
            ),
            v("DEFAULT_TRANSPORT", e.platform_transport.clone()),
            v("ADMIN_TOKEN", ADMIN_TOKEN.into()),
            v("RETURN_ORIGINS", APP_ORIGIN.into()),
            v("DEFAULT_SENDER", PLATFORM_SENDER.into()),
            v("CONCURRENCY", o.concurrency.to_string()),
            v("MAX_ATTEMPTS", o.max_attempts.to_string()),
            v(
                "SHUTDOWN_GRACE_SECS",
                o.shutdown_grace.as_secs().to_string(),
            ),
            v("CLAIM_LEASE_SECS", o.claim_lease.as_secs().to_string()),
            v("ORG_MAX_IN_FLIGHT", o.pacing.org_max_in_flight.to_string()),
            v(
                "GRAPH_MAILBOX_CONCURRENCY",
                o.pacing.graph_mailbox_concurrency.to_string(),
            ),
            v(
                "GMAIL_MAILBOX_PER_MINUTE",
                o.pacing.gmail_mailbox_per_minute.to_string(),
            ),
            v(
                "MICROSOFT_DAILY_RECIPIENTS",
                o.pacing.microsoft_daily_recipients.to_string(),
            ),
            v(
                "GOOGLE_DAILY_MESSAGES",
                o.pacing.google_daily_messages.to_string(),
            ),
            v(
                "GOOGLE_DAILY_RECIPIENTS",
                o.pacing.google_daily_recipients.to_string(),
            ),
            v(
                "GOOGLE_DAILY_EXTERNAL_RECIPIENTS",
                o.pacing.google_daily_external_recipients.to_string(),
            ),
            v(
                "GOOGLE_DAILY_UNIQUE_RECIPIENTS",
                o.pacing.google_daily_unique_recipients.to_string(),
            ),
            v(
                "GOOGLE_TRIAL_DAILY_MESSAGES",
                o.pacing.google_trial_daily_messages.to_string(),
            ),
            v(
                "GOOGLE_TRIAL_DAILY_EXTERNAL_RECIPIENTS",
                o.pacing.google_trial_daily_external_recipients.to_string(),
            ),
            v(
                "GOOGLE_CONSUMER_DAILY_MESSAGES",
                o.pacing.google_consumer_daily_messages.to_string(),
            ),
            v(
                "GOOGLE_CONSUMER_DAILY_RECIPIENTS",
                o.pacing.google_consumer_daily_recipients.to_string(),
            ),
            v(
                "LIMIT_WINDOW_SECS",
                o.pacing.window.as_secs().max(1).to_string(),
            ),
            v("LOG_FORMAT", "json".into()),
        ]
    }

    /// `.eml` files the platform sender wrote.
    pub fn outbox_files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.outbox)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "eml"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }

    /// A valid job for `org` with a fresh id.
    pub fn job(&self, org: &str) -> Value {
        serde_json::json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "organization_id": org,
            "to": [{"email": "alice@example.com", "name": "Alice Martin"}],
            "subject": "Nouvelle tâche : revue du registre",
            "text": "Bonjour Alice, une tâche vous a été assignée.",
        })
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.admin.take() {
            stop.cancel();
            handle.abort();
        }
        if let Some(w) = self.worker.take() {
            w.shutdown.cancel();
            w.follower.abort();
            w.handle.abort();
        }
        let _ = std::fs::remove_dir_all(&self.outbox);
    }
}

/// Where a test's worker finds the providers: the stand-ins.
pub fn provider_endpoints(
    standins: &StandIns,
    admin_url: &str,
    options: &TestAppOptions,
    outbox: &std::path::Path,
) -> ProviderEndpoints {
    let ms = standins.microsoft_login.uri();
    let google = standins.google_oauth.uri();
    ProviderEndpoints {
        graph_url: Url::parse(&standins.graph.uri()).unwrap(),
        graph_large_messages: options.graph_large_messages.then_some(
            mail_dispatch_providers::graph::LargeMessages {
                max_message_bytes: mail_dispatch_providers::graph::DEFAULT_MAX_MESSAGE_BYTES,
            },
        ),
        gmail_url: Url::parse(&standins.gmail.uri()).unwrap(),
        microsoft: Some(OAuthApp {
            client_id: "ms-client-id".into(),
            client_secret: Some(SecretString::from("ms-client-secret")),
            auth_url: Url::parse(&format!("{ms}/{MICROSOFT_TENANT}/oauth2/v2.0/authorize"))
                .unwrap(),
            token_url: Url::parse(&format!("{ms}/{MICROSOFT_TENANT}/oauth2/v2.0/token")).unwrap(),
            scopes: mail_dispatch_providers::scopes::microsoft_with(
                options.microsoft_shared_mailboxes,
                options.graph_large_messages,
            ),
            redirect_url: Some(Url::parse(&format!("{}/v1/oauth/callback", admin_url)).unwrap()),
        }),
        google: Some(OAuthApp {
            client_id: "g-client-id.apps.googleusercontent.com".into(),
            client_secret: Some(SecretString::from("g-client-secret")),
            auth_url: Url::parse(&format!("{google}/o/oauth2/v2/auth")).unwrap(),
            token_url: Url::parse(&format!("{google}/token")).unwrap(),
            scopes: mail_dispatch_providers::scopes::google(options.google_check_aliases),
            redirect_url: Some(Url::parse(&format!("{}/v1/oauth/callback", admin_url)).unwrap()),
        }),
        platform_transport: options
            .platform_transport
            .clone()
            .unwrap_or_else(|| format!("file://{}", outbox.display())),
        http_timeout: options.http_timeout,
    }
}

/// A worker's configuration from a test's options.
pub fn worker_config(o: &TestAppOptions, topology: mail_dispatch_broker::Topology) -> WorkerConfig {
    let mut c = WorkerConfig::new(
        crate::amqp_url(),
        Mailbox::new(
            EmailAddress::parse(PLATFORM_SENDER).unwrap(),
            Some("Platform".into()),
        ),
    );
    c.topology = topology;
    c.concurrency = o.concurrency;
    c.retry.max_attempts = o.max_attempts;
    c.retry.max_age = o.max_age;
    c.retry.backoff.base = o.backoff_base;
    c.retry.backoff.max = o.backoff_max;
    c.max_in_process_wait = o.max_in_process_wait;
    c.in_process_attempts = o.in_process_attempts;
    c.claim_lease = o.claim_lease;
    c.shutdown_grace = o.shutdown_grace;
    c.instance = crate::unique("test-worker-");
    c.pacing = o.pacing;
    c
}

/// Connects `org` to a provider as a finished connect flow would (grant stored,
/// sender saved, test passed): its jobs go through the provider from now on.
/// Returns the (access, refresh) tokens the stand-in issued.
pub async fn connect(
    db: &TestDb,
    standins: &StandIns,
    org: &str,
    vendor: Vendor,
    account: &str,
    sender: &str,
    sender_name: &str,
) -> (String, String) {
    // A Microsoft sender other than the account is a mailbox the user has Send
    // As rights on, with `Mail.Send.Shared` granted (as Graph requires).
    let (access, refresh) = if vendor == Vendor::Microsoft && sender != account {
        standins.grant_send_as(account, sender);
        let scopes = mail_dispatch_providers::scopes::microsoft(true);
        let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
        standins.issue_with_scopes(vendor, account, &scopes)
    } else {
        standins.issue(vendor, account)
    };
    store_grant(
        db,
        org,
        vendor,
        account,
        &access,
        &refresh,
        chrono::Utc::now() + chrono::Duration::minutes(50),
    )
    .await;
    let store = &db.store;
    store
        .save_sender(org, sender, Some(sender_name), Fallback::None)
        .await
        .unwrap();
    store
        .record_test(org, &serde_json::json!({"status": "sent"}), true)
        .await
        .unwrap();
    (access, refresh)
}

/// Stores a grant with the access token expiring at `expires_at`.
pub async fn store_grant(
    db: &TestDb,
    org: &str,
    vendor: Vendor,
    account: &str,
    access: &str,
    refresh: &str,
    expires_at: chrono::DateTime<chrono::Utc>,
) {
    db.store
        .save_connection(&NewConnection {
            organization_id: org.into(),
            provider: match vendor {
                Vendor::Microsoft => ProviderKind::Microsoft,
                Vendor::Google => ProviderKind::Google,
            },
            account_email: account.into(),
            refresh_token: SecretString::from(refresh.to_owned()),
            access_token: Some((SecretString::from(access.to_owned()), expires_at)),
            granted_scopes: None,
            account_id: None,
            // What the connect flow keeps from Google's id token: `hd`, which the
            // stand-in gives every account but gmail.com ones (consumer).
            account_tenant: (vendor == Vendor::Google)
                .then(|| {
                    account
                        .rsplit_once('@')
                        .map(|(_, d)| d.to_ascii_lowercase())
                })
                .flatten()
                .filter(|d| d != "gmail.com"),
        })
        .await
        .unwrap();
}
