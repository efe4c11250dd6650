#![doc = include_str!("../README.md")]

mod amqp;
mod app;
mod db;
pub mod standins;

pub use amqp::{ResultsTap, TestAmqp};
pub use app::{PLATFORM_SENDER, RunningWorker, TestApp, TestAppOptions};
pub use db::TestDb;
pub use standins::StandIns;

/// Where the tests find RabbitMQ and PostgreSQL (overridable for other machines).
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn postgres_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A short random suffix for names.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}
