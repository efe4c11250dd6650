#![doc = include_str!("../README.md")]

// The public surface is what the binary, the admin API and the tests use; the
// rest stays inside the crate.
mod config;
mod dispatch;
#[cfg(test)]
mod fakes;
mod health;
pub mod in_flight;
pub mod keepalive;
pub mod metrics;
pub mod pacing;
mod ports;
mod published;
mod resolver;
pub mod runner;
mod sender;
mod services;
mod tokens;
mod upkeep;

pub use config::{
    DEFAULT_CONCURRENCY, DEFAULT_MEMORY_BUDGET_BYTES, DEFAULT_SENDING_BLOCKED_PAUSE, WorkerConfig,
};
pub use dispatch::{DeadLetter, Decision, DelayReason, Dispatcher, Finish, Incoming};
pub use health::{DATABASE_CHECK_TIMEOUT, Health};
pub use ports::{JobLedger, Ports, Routes, SendMail, SendReport};
pub use published::PublishedMarks;
pub use resolver::{Resolver, Route};
pub use sender::{InProcessRetry, SendFailure, Senders};
pub use services::{CacheConfig, OnPacingEvent, PacingEvent, ProviderEndpoints, Services};
pub use tokens::{KeepAlive, MAX_CACHED_TOKENS, TokenError, Tokens};
