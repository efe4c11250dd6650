#![doc = include_str!("../README.md")]

pub mod config;
pub mod dispatch;
pub mod health;
pub mod keepalive;
pub mod metrics;
pub mod pacing;
pub mod published;
pub mod resolver;
pub mod runner;
pub mod sender;
pub mod tokens;
pub mod wiring;

pub use config::WorkerConfig;
pub use dispatch::{Decision, Dispatcher, Incoming};
pub use health::Health;
pub use resolver::{Resolver, Route};
pub use sender::{SendFailure, Senders};
pub use tokens::Tokens;
pub use wiring::ProviderEndpoints;
