#![doc = include_str!("../README.md")]

mod cipher;
mod conn;
mod group_commit;
mod integrations;
mod ledger;
mod ledger_batch;
mod listener;
mod mailbox_slots;
mod oauth_states;
mod pacing;
mod pending_connections;
mod portal;
mod tls;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

pub use cipher::{CipherError, TokenCipher};
pub use integrations::{
    Fallback, Integration, IntegrationStatus, NewConnection, RefreshDecision, RefreshLease,
    StoredTokens,
};
pub use ledger::{Claim, ClaimOwner, JobKey};
pub use listener::{IntegrationChange, spawn_change_listener};
pub use mailbox_slots::SlotLease;
pub use oauth_states::{OAuthState, StateLookup, StatePurpose};
pub use pacing::{WindowTotal, window_bucket};
pub use pending_connections::{ConfirmLookup, ExpiredConnection};
pub use portal::{LinkLookup, PortalSession, PortalSettings, SessionLookup};

/// Errors of the store. Callers branch on `Unavailable` (retry later, do not ack).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be reached or did not answer in time.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Cipher(#[from] CipherError),
    #[error("invalid database URL: {0}")]
    Config(String),
    /// One error answered to every request of a batched ledger statement.
    #[error(transparent)]
    Shared(std::sync::Arc<StoreError>),
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::Query(e),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

impl StoreError {
    /// Whether the failure is the database being unreachable, as opposed to a
    /// query the database refused.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Query(e) => e.is_closed() || e.code().is_none(),
            StoreError::Shared(e) => e.is_unavailable(),
            _ => false,
        }
    }
}

/// Connections of the main pool by default.
pub const DEFAULT_POOL_SIZE: usize = 16;
/// Connections of the ledger pool by default. Claims and completions are batched
/// (one statement of each kind at a time, `group_commit.rs`), so the ledger needs
/// few: those two, publish marks, and releases of delayed jobs.
pub const DEFAULT_LEDGER_POOL_SIZE: usize = 4;
/// How long a caller waits for a pooled connection, or for a new one to open.
pub const POOL_TIMEOUT: Duration = Duration::from_secs(5);
/// `statement_timeout` by default. Every statement of the store is a lookup or a
/// write by key, or a batch of them: milliseconds when PostgreSQL is healthy.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// `lock_timeout` by default: a statement waits this long for a row another
/// session holds, then fails (and its caller retries later) rather than queueing.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(2);
/// `tcp_user_timeout` by default, which also sets the keepalive schedule: a
/// connection that stops answering is closed by the kernel within this time.
pub const DEFAULT_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How much longer than `statement_timeout` the client waits for an answer: the
/// server's own cancellation (a clear error) normally comes first.
pub const CLIENT_MARGIN: Duration = Duration::from_secs(1);

/// Pool sizes and PostgreSQL timeouts. deadpool and tokio-postgres have no
/// timeouts by default: without these, a database that stops answering would
/// hang every worker until the kernel gives up on the socket (minutes to hours).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSettings {
    /// Connections of the main pool (integrations, tokens, pacing, OAuth state).
    pub max_size: usize,
    /// Connections of the idempotency ledger's pool.
    pub ledger_max_size: usize,
    /// Pool wait, connect and recycle timeout.
    pub timeout: Duration,
    /// PostgreSQL's `statement_timeout` on every connection; the client gives up
    /// on an answer [`CLIENT_MARGIN`] later.
    pub statement_timeout: Duration,
    /// PostgreSQL's `lock_timeout` on every connection.
    pub lock_timeout: Duration,
    /// `tcp_user_timeout`, and keepalives that probe an idle connection within it.
    pub socket_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_size: DEFAULT_POOL_SIZE,
            ledger_max_size: DEFAULT_LEDGER_POOL_SIZE,
            timeout: POOL_TIMEOUT,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            socket_timeout: DEFAULT_SOCKET_TIMEOUT,
        }
    }
}

impl PoolSettings {
    /// How long the client waits for the answer to one statement.
    pub fn statement_deadline(&self) -> Duration {
        self.statement_timeout + CLIENT_MARGIN
    }

    /// Connections a process opens at most: both pools, plus the `LISTEN`
    /// connection (one more, briefly, at start: see [`Store::ensure_database`]).
    pub fn max_connections(&self) -> usize {
        self.max_size + self.ledger_max_size + 1
    }

    /// `-c` options every session starts with.
    fn session_options(&self) -> String {
        format!(
            "-c statement_timeout={} -c lock_timeout={}",
            self.statement_timeout.as_millis(),
            self.lock_timeout.as_millis()
        )
    }

    /// Applies the socket timeouts where the URL did not set its own.
    fn apply_socket_timeouts(&self, config: &mut tokio_postgres::Config) {
        // tokio-postgres' keepalive default: the first probe after 2 hours idle.
        const LIBRARY_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 3600);
        const PROBES: u32 = 3;
        let timeout = self.socket_timeout.max(Duration::from_secs(3));
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(timeout);
        }
        // Idle for half the timeout, then PROBES probes over the other half: a
        // connection whose peer is gone is closed within the timeout even when
        // nothing is being sent on it (the LISTEN connection, an idle pooled one).
        if config.get_keepalives_idle() == LIBRARY_KEEPALIVES_IDLE {
            config.keepalives_idle(timeout / 2);
        }
        if config.get_keepalives_interval().is_none() {
            config.keepalives_interval(timeout / 2 / PROBES);
        }
        if config.get_keepalives_retries().is_none() {
            config.keepalives_retries(PROBES);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(self.timeout);
        }
    }

    /// `config` as the store uses it: socket timeouts, and `ours` session options
    /// *before* those of the URL, so that an operator's `options=-c …` is kept
    /// and wins over a default for the same setting (PostgreSQL applies the last).
    fn configure(&self, url: &tokio_postgres::Config, ours: &str) -> tokio_postgres::Config {
        let mut config = url.clone();
        self.apply_socket_timeouts(&mut config);
        let options = match url.get_options().map(str::trim) {
            Some(theirs) if !theirs.is_empty() => format!("{ours} {theirs}"),
            _ => ours.to_owned(),
        };
        config.options(options);
        config
    }
}

/// Statements run by this process, by purpose (benchmarks report them per job;
/// tests check that steady traffic reads configuration from memory).
#[derive(Debug, Default)]
pub struct QueryCounts {
    pub config_reads: std::sync::atomic::AtomicU64,
    pub token_reads: std::sync::atomic::AtomicU64,
    pub token_refreshes: std::sync::atomic::AtomicU64,
    pub ledger_writes: std::sync::atomic::AtomicU64,
}

impl QueryCounts {
    pub(crate) fn bump(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// (config reads, token reads, token refreshes, ledger writes) so far.
    pub fn snapshot(&self) -> [u64; 4] {
        use std::sync::atomic::Ordering::Relaxed;
        [
            self.config_reads.load(Relaxed),
            self.token_reads.load(Relaxed),
            self.token_refreshes.load(Relaxed),
            self.ledger_writes.load(Relaxed),
        ]
    }
}

/// The PostgreSQL store.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// Connections for the idempotency ledger, with `synchronous_commit = off`:
    /// a ledger write is durable once PostgreSQL's WAL writer flushes it (within
    /// `wal_writer_delay`, 200 ms by default), not before each answer. A crash of
    /// the worker loses nothing; only a crash of PostgreSQL itself can lose the last
    /// fraction of a second of ledger writes, which at worst re-opens the duplicate
    /// window for the jobs in flight then. Integrations and tokens stay synchronous.
    ledger_pool: Pool,
    /// Group commit of ledger claims and completions (`ledger_batch.rs`).
    ledger_batch: ledger_batch::LedgerBatcher,
    counts: std::sync::Arc<QueryCounts>,
    cipher: std::sync::Arc<TokenCipher>,
    /// The main pool's connection settings (also the `LISTEN` connection's).
    pg_config: tokio_postgres::Config,
    /// TLS as the URL's `sslmode` asks (`tls.rs`), for every connection.
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    settings: PoolSettings,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// How long a start waits for another process's migration before giving up.
const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(60);

/// The embedded migrations, in order.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../migrations/0001_init.sql")),
    (2, "oauth", include_str!("../migrations/0002_oauth.sql")),
    (3, "pacing", include_str!("../migrations/0003_pacing.sql")),
    (4, "connect", include_str!("../migrations/0004_connect.sql")),
    (
        5,
        "ledger_per_organization",
        include_str!("../migrations/0005_ledger_per_organization.sql"),
    ),
    (
        6,
        "refresh_lease",
        include_str!("../migrations/0006_refresh_lease.sql"),
    ),
    (
        7,
        "ledger_unfinished_index",
        include_str!("../migrations/0007_ledger_unfinished_index.sql"),
    ),
    (
        8,
        "claim_owner",
        include_str!("../migrations/0008_claim_owner.sql"),
    ),
    (
        9,
        "mailbox_slots",
        include_str!("../migrations/0009_mailbox_slots.sql"),
    ),
    (10, "portal", include_str!("../migrations/0010_portal.sql")),
    (
        11,
        "sender_delivery",
        include_str!("../migrations/0011_sender_delivery.sql"),
    ),
    (
        12,
        "rolling_limits",
        include_str!("../migrations/0012_rolling_limits.sql"),
    ),
    (
        13,
        "google_trial",
        include_str!("../migrations/0013_google_trial.sql"),
    ),
];
/// Arbitrary constant taken with `pg_advisory_lock` while migrating.
const MIGRATION_LOCK: i64 = 0x6d61_696c_6469_7370;

impl Store {
    /// Creates the pools. Connections are opened lazily; call [`Store::ping`] to check.
    pub fn connect(
        database_url: &str,
        cipher: TokenCipher,
        pool: PoolSettings,
    ) -> Result<Self, StoreError> {
        let (database_url, tls) = tls::configure(database_url)?;
        let url_config: tokio_postgres::Config = database_url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Config(e.to_string()))?;
        let build = |config: tokio_postgres::Config, max_size: usize| {
            let manager = Manager::from_config(
                config,
                tls.clone(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(max_size.max(1))
                .wait_timeout(Some(pool.timeout))
                .create_timeout(Some(pool.timeout))
                .recycle_timeout(Some(pool.timeout))
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| StoreError::Config(e.to_string()))
        };
        let pg_config = pool.configure(&url_config, &pool.session_options());
        // No sequential scans: every ledger statement finds its rows by key (or by
        // the partial index, for pruning), but a generic plan cached while the
        // ledger was small (a fresh deployment, a test) would keep a seq scan +
        // hash join forever on that connection. Measured: PostgreSQL's CPU per job
        // then grew with the table. With seq scans ruled out, the cached generic
        // plans stay index lookups and no statement is planned again.
        let ledger_config = pool.configure(
            &url_config,
            &format!(
                "{} -c synchronous_commit=off -c enable_seqscan=off",
                pool.session_options()
            ),
        );
        Ok(Store {
            pool: build(pg_config.clone(), pool.max_size)?,
            ledger_pool: build(ledger_config, pool.ledger_max_size)?,
            ledger_batch: Default::default(),
            counts: Default::default(),
            cipher: std::sync::Arc::new(cipher),
            pg_config,
            tls,
            settings: pool,
        })
    }

    pub(crate) async fn client(&self) -> Result<conn::Conn, StoreError> {
        let object = self.pool.get().await?;
        Ok(conn::Conn::new(object, self.settings.statement_deadline()))
    }

    pub(crate) async fn ledger_client(&self) -> Result<conn::Conn, StoreError> {
        let object = self.ledger_pool.get().await?;
        Ok(conn::Conn::new(object, self.settings.statement_deadline()))
    }

    /// The pool sizes and timeouts this store was opened with.
    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    /// Statements run through this store (and its clones) so far.
    pub fn counts(&self) -> &QueryCounts {
        &self.counts
    }

    pub fn cipher(&self) -> &TokenCipher {
        &self.cipher
    }

    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.pg_config
    }

    /// The TLS connector of this store's connections.
    pub(crate) fn tls(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        self.tls.clone()
    }

    /// Creates the database named in the URL if it does not exist and the role
    /// may create it. Connects to the `postgres` maintenance database to do so.
    pub async fn ensure_database(database_url: &str) -> Result<(), StoreError> {
        let (database_url, tls) = tls::configure(database_url)?;
        let config: tokio_postgres::Config = database_url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Config(e.to_string()))?;
        let Some(name) = config.get_dbname().map(str::to_owned) else {
            return Ok(());
        };
        let mut admin = config.clone();
        admin.dbname("postgres");
        PoolSettings::default().apply_socket_timeouts(&mut admin);
        let (client, conn) = admin
            .connect(tls)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
            .await?
            .is_some();
        if !exists {
            let quoted = format!("\"{}\"", name.replace('"', "\"\""));
            match client
                .batch_execute(&format!("CREATE DATABASE {quoted}"))
                .await
            {
                Ok(()) => tracing::info!(database = %name, "created database"),
                // Another replica created it at the same moment.
                Err(e)
                    if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
                Err(e) => return Err(e.into()),
            }
        }
        drop(client);
        let _ = conn.await;
        Ok(())
    }

    /// The newest migration applied to the database, if any.
    async fn schema_version(client: &conn::Conn) -> Result<Option<i32>, StoreError> {
        let exists: bool = client
            .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
            .await?
            .get(0);
        if !exists {
            return Ok(None);
        }
        Ok(client
            .query_one("SELECT max(version) FROM schema_migrations", &[])
            .await?
            .get(0))
    }

    /// Applies the migrations not yet applied. Safe to run from several replicas at
    /// once: they take turns under an advisory lock, on a connection of their own
    /// (a pooled one could go back to the pool still holding it), and a replica
    /// that waits longer than `MIGRATION_LOCK_WAIT` gives up with an error rather
    /// than hanging behind a blocked migration. A database that is already up to
    /// date is left alone: no lock, no DDL, so a runtime role without DDL rights
    /// works once `mail-dispatch migrate` ran with an owner's.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let latest = MIGRATIONS.last().map(|m| m.0);
        {
            let client = self.client().await?;
            if Self::schema_version(&client).await? >= latest {
                return Ok(());
            }
        }
        let (mut client, conn) = self
            .pg_config
            .connect(self.tls.clone())
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let conn = tokio::spawn(conn);
        // Without the pool's statement and lock timeouts: a migration may rewrite
        // a large table.
        client
            .batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")
            .await?;
        let deadline = tokio::time::Instant::now() + MIGRATION_LOCK_WAIT;
        loop {
            let locked: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&MIGRATION_LOCK])
                .await?
                .get(0);
            if locked {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "another process has held the migration lock for over {} s (a migration blocked behind a long transaction?)",
                    MIGRATION_LOCK_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let result = async {
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (
                        version integer PRIMARY KEY,
                        name text NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now())",
                )
                .await?;
            for (version, name, sql) in MIGRATIONS {
                let applied = client
                    .query_opt(
                        "SELECT 1 FROM schema_migrations WHERE version = $1",
                        &[version],
                    )
                    .await?
                    .is_some();
                if applied {
                    continue;
                }
                let tx = client.transaction().await?;
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    &[version, name],
                )
                .await?;
                tx.commit().await?;
                tracing::info!(version, name, "applied migration");
            }
            Ok::<_, StoreError>(())
        }
        .await;
        // Closing the session releases the lock as well.
        drop(client);
        let _ = conn.await;
        result
    }

    /// Whether the database answers and its schema is at least as new as this
    /// binary's (for `/readyz`). Migrations only add, so a replica of the previous
    /// version stays ready while a rolling update migrates ahead of it.
    /// Bounded like every statement: an unreachable database is an error within
    /// the pool timeout or the statement deadline, never a hang.
    pub async fn ping(&self) -> Result<bool, StoreError> {
        let client = self.client().await?;
        Ok(Self::schema_version(&client).await? >= MIGRATIONS.last().map(|m| m.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    async fn store_for(database: &mail_dispatch_test_db::TempDatabase, query: &str) -> Store {
        let key = SecretString::from(TokenCipher::generate_key());
        let store = Store::connect(
            &format!("{}{query}", database.url),
            TokenCipher::new(&key, &[]).unwrap(),
            PoolSettings::default(),
        )
        .unwrap();
        store.migrate().await.expect("migrations apply");
        store
    }

    async fn show(conn: &conn::Conn, setting: &str) -> String {
        conn.query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    #[tokio::test]
    async fn every_session_has_statement_and_lock_timeouts() {
        let database = mail_dispatch_test_db::TempDatabase::create("md_test_").await;
        let store = store_for(&database, "").await;
        for conn in [
            store.client().await.unwrap(),
            store.ledger_client().await.unwrap(),
        ] {
            assert_eq!(show(&conn, "statement_timeout").await, "5s");
            assert_eq!(show(&conn, "lock_timeout").await, "2s");
        }
        let ledger = store.ledger_client().await.unwrap();
        assert_eq!(show(&ledger, "synchronous_commit").await, "off");
        let config = store.pg_config();
        assert_eq!(config.get_tcp_user_timeout(), Some(&DEFAULT_SOCKET_TIMEOUT));
        assert_eq!(config.get_keepalives_idle(), DEFAULT_SOCKET_TIMEOUT / 2);
        assert_eq!(config.get_keepalives_retries(), Some(3));
    }

    #[tokio::test]
    async fn options_and_socket_settings_in_the_url_are_kept_and_win() {
        let database = mail_dispatch_test_db::TempDatabase::create("md_test_").await;
        let store = store_for(
            &database,
            "?options=-c%20statement_timeout%3D1234%20-c%20application_name%3Dops&tcp_user_timeout=30",
        )
        .await;
        for conn in [
            store.client().await.unwrap(),
            store.ledger_client().await.unwrap(),
        ] {
            assert_eq!(show(&conn, "statement_timeout").await, "1234ms");
            assert_eq!(show(&conn, "application_name").await, "ops");
            assert_eq!(
                show(&conn, "lock_timeout").await,
                "2s",
                "ours where theirs is silent"
            );
        }
        let ledger = store.ledger_client().await.unwrap();
        assert_eq!(show(&ledger, "synchronous_commit").await, "off");
        assert_eq!(
            store.pg_config().get_tcp_user_timeout(),
            Some(&Duration::from_secs(30))
        );
    }

    #[tokio::test]
    async fn a_statement_waiting_for_a_row_lock_fails_after_the_lock_timeout() {
        let database = mail_dispatch_test_db::TempDatabase::create("md_test_").await;
        let store = store_for(&database, "").await;
        let holder = database.client().await;
        holder
            .batch_execute(
                "INSERT INTO integrations (organization_id, provider, status, account_email, refresh_token)
                 VALUES ('org_locked', 'google', 'active', 'a@b.c', '\\x00')",
            )
            .await
            .unwrap();
        holder
            .batch_execute(
                "BEGIN; SELECT 1 FROM integrations WHERE organization_id = 'org_locked' FOR UPDATE",
            )
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let refused = store.mark_needs_reauth("org_locked", "test").await;
        let waited = started.elapsed();
        match refused {
            Err(StoreError::Query(e)) => assert_eq!(
                e.code(),
                Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE),
                "{e}"
            ),
            other => panic!("expected a lock timeout, got {other:?}"),
        }
        assert!(
            waited >= DEFAULT_LOCK_TIMEOUT && waited < DEFAULT_LOCK_TIMEOUT * 2,
            "{waited:?}"
        );
        holder.batch_execute("ROLLBACK").await.unwrap();
    }

    #[tokio::test]
    async fn one_refresh_lease_at_a_time_and_a_lost_lease_stores_nothing() {
        use secrecy::ExposeSecret as _;
        let database = mail_dispatch_test_db::TempDatabase::create("md_test_").await;
        let store = store_for(&database, "").await;
        let lease = Duration::from_secs(30);
        assert!(matches!(
            store.take_refresh_lease("org_none", lease).await.unwrap(),
            RefreshLease::Missing
        ));
        store
            .save_connection(&NewConnection {
                organization_id: "org_1".into(),
                provider: mail_dispatch_domain::ProviderKind::Google,
                account_email: "a@b.c".into(),
                account_id: None,
                account_tenant: None,
                refresh_token: SecretString::from("rt-1"),
                access_token: None,
                granted_scopes: None,
            })
            .await
            .unwrap();
        let RefreshLease::Held { holder, tokens } =
            store.take_refresh_lease("org_1", lease).await.unwrap()
        else {
            panic!("the first caller holds the lease");
        };
        assert_eq!(tokens.refresh_token.unwrap().expose_secret(), "rt-1");
        assert!(matches!(
            store.take_refresh_lease("org_1", lease).await.unwrap(),
            RefreshLease::Busy { .. }
        ));
        assert!(
            !store
                .finish_refresh("org_1", "someone else", RefreshDecision::Keep)
                .await
                .unwrap()
        );
        let expires_at = chrono::Utc::now() + chrono::Duration::hours(1);
        let store_token = |holder: String| {
            let store = store.clone();
            async move {
                store
                    .finish_refresh(
                        "org_1",
                        &holder,
                        RefreshDecision::Store {
                            access_token: SecretString::from("at-new"),
                            expires_at,
                            refresh_token: Some(SecretString::from("rt-2")),
                        },
                    )
                    .await
                    .unwrap()
            }
        };
        assert!(store_token(holder.clone()).await, "the holder stores");
        assert!(!store_token(holder).await, "once: the lease is released");

        // A lease that expired is taken over; its first holder then stores nothing.
        let RefreshLease::Held { holder: first, .. } = store
            .take_refresh_lease("org_1", Duration::ZERO)
            .await
            .unwrap()
        else {
            panic!("free again");
        };
        let RefreshLease::Held {
            holder: second,
            tokens,
        } = store.take_refresh_lease("org_1", lease).await.unwrap()
        else {
            panic!("an expired lease is taken over");
        };
        assert_eq!(tokens.access_token.unwrap().0.expose_secret(), "at-new");
        assert!(!store_token(first).await, "a lost lease stores nothing");
        // A reconnect ends any lease: the refresh under way is stale.
        store
            .save_connection(&NewConnection {
                organization_id: "org_1".into(),
                provider: mail_dispatch_domain::ProviderKind::Google,
                account_email: "a@b.c".into(),
                account_id: None,
                account_tenant: None,
                refresh_token: SecretString::from("rt-3"),
                access_token: None,
                granted_scopes: None,
            })
            .await
            .unwrap();
        assert!(!store_token(second).await);
        let stored = store.stored_tokens("org_1").await.unwrap().unwrap();
        assert_eq!(stored.refresh_token.unwrap().expose_secret(), "rt-3");
    }
}
