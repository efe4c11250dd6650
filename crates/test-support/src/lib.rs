#![doc = include_str!("../README.md")]

mod amqp;
mod app;
mod db;
mod harness;
mod pg_tls;
mod proxy;

pub use amqp::{ResultsTap, TestAmqp};
pub use app::{
    ADMIN_TOKEN, APP_ORIGIN, MICROSOFT_TENANT, PLATFORM_SENDER, RunningWorker, TestApp,
    TestAppOptions,
};
pub use db::TestDb;
pub use harness::Harness;
/// The provider stand-ins (their own crate, shared with the sandbox and the benchmark).
pub use mail_dispatch_standins as standins;
pub use mail_dispatch_standins::StandIns;
pub use pg_tls::PgTlsServer;
pub use proxy::{FaultProxy, Mode as ProxyMode};

/// Where the tests find RabbitMQ and PostgreSQL (overridable for other machines).
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn postgres_url() -> String {
    mail_dispatch_test_db::server_url()
}

/// A short random suffix for names.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// Tests share one RabbitMQ and one PostgreSQL. Most tests only need their own
/// names and database (shared access); a test that restarts PostgreSQL or closes
/// every AMQP connection needs the services to itself (exclusive access).
static SERVICES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Held for the life of a test.
#[derive(Debug)]
pub enum ServicesGuard {
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    Exclusive(tokio::sync::RwLockWriteGuard<'static, ()>),
}

pub async fn services(exclusive: bool) -> ServicesGuard {
    if exclusive {
        ServicesGuard::Exclusive(SERVICES.write().await)
    } else {
        ServicesGuard::Shared(SERVICES.read().await)
    }
}
