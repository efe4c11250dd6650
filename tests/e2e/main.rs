//! End-to-end suite: real RabbitMQ and PostgreSQL, in-process workers, local
//! stand-ins of Microsoft and Google. One test binary (`cargo test --workspace`).

mod admin;
mod config_changes;
mod connect;
mod delivery;
mod dispatch;
mod faults;
mod fidelity;
mod graph_large;
mod invalid_jobs;
mod limits;
mod memory;
mod operability;
mod pacing;
mod permissions;
mod pipeline;
mod portal;
mod process;
mod standins;
mod support;
mod tls;
mod tokens;
