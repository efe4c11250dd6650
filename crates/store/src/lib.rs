#![doc = include_str!("../README.md")]

mod cipher;
mod group_commit;
mod integrations;
mod ledger;
mod ledger_batch;
mod listener;
mod oauth_states;
mod pacing;
mod pending_connections;

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

pub use cipher::{CipherError, TokenCipher};
pub use integrations::{
    Fallback, Integration, IntegrationStatus, NewConnection, RefreshDecision, StoredTokens,
};
pub use ledger::{Claim, JobKey};
pub use listener::{IntegrationChange, spawn_change_listener};
pub use oauth_states::{OAuthState, StateLookup, StatePurpose};
pub use pending_connections::{ConfirmLookup, ExpiredConnection};

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

/// Pool limits. deadpool has no timeouts by default: without them a database
/// outage would hang every worker forever.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    pub max_size: usize,
    pub timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_size: 16,
            timeout: Duration::from_secs(5),
        }
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
    pg_config: tokio_postgres::Config,
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
];
/// Arbitrary constant taken with `pg_advisory_lock` while migrating.
const MIGRATION_LOCK: i64 = 0x6d61_696c_6469_7370;

impl Store {
    /// Creates the pool. Connections are opened lazily; call [`Store::ping`] to check.
    pub fn connect(
        database_url: &str,
        cipher: TokenCipher,
        pool: PoolSettings,
    ) -> Result<Self, StoreError> {
        let pg_config: tokio_postgres::Config = database_url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Config(e.to_string()))?;
        let build = |config: tokio_postgres::Config| {
            let manager = Manager::from_config(
                config,
                NoTls,
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            );
            Pool::builder(manager)
                .max_size(pool.max_size)
                .wait_timeout(Some(pool.timeout))
                .create_timeout(Some(pool.timeout))
                .recycle_timeout(Some(pool.timeout))
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| StoreError::Config(e.to_string()))
        };
        let mut ledger_config = pg_config.clone();
        // No sequential scans: every ledger statement finds its rows by key (or by
        // the partial index, for pruning), but a generic plan cached while the
        // ledger was small (a fresh deployment, a test) would keep a seq scan +
        // hash join forever on that connection. Measured: PostgreSQL's CPU per job
        // then grew with the table. With seq scans ruled out, the cached generic
        // plans stay index lookups and no statement is planned again.
        ledger_config.options("-c synchronous_commit=off -c enable_seqscan=off");
        Ok(Store {
            pool: build(pg_config.clone())?,
            ledger_pool: build(ledger_config)?,
            ledger_batch: Default::default(),
            counts: Default::default(),
            cipher: std::sync::Arc::new(cipher),
            pg_config,
        })
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    pub(crate) async fn ledger_client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.ledger_pool.get().await?)
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

    /// Creates the database named in the URL if it does not exist and the role
    /// may create it. Connects to the `postgres` maintenance database to do so.
    pub async fn ensure_database(database_url: &str) -> Result<(), StoreError> {
        let config: tokio_postgres::Config = database_url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Config(e.to_string()))?;
        let Some(name) = config.get_dbname().map(str::to_owned) else {
            return Ok(());
        };
        let mut admin = config.clone();
        admin.dbname("postgres");
        admin.connect_timeout(Duration::from_secs(5));
        let (client, conn) = admin
            .connect(NoTls)
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
    async fn schema_version(client: &tokio_postgres::Client) -> Result<Option<i32>, StoreError> {
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
            .connect(NoTls)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let conn = tokio::spawn(conn);
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
    pub async fn ping(&self) -> Result<bool, StoreError> {
        let client = self.client().await?;
        Ok(Self::schema_version(&client).await? >= MIGRATIONS.last().map(|m| m.0))
    }
}
