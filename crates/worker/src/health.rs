//! Connection state shared with `/readyz` and the gauges.

use std::sync::atomic::{AtomicBool, Ordering};

/// What the worker knows of its connections.
#[derive(Debug, Default)]
pub struct Health {
    amqp: AtomicBool,
    database: AtomicBool,
}

impl Health {
    pub fn set_amqp(&self, up: bool) {
        self.amqp.store(up, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::AMQP_CONNECTED).set(if up { 1.0 } else { 0.0 });
    }

    pub fn set_database(&self, up: bool) {
        self.database.store(up, Ordering::Relaxed);
        metrics::gauge!(crate::metrics::DATABASE_UP).set(if up { 1.0 } else { 0.0 });
    }

    pub fn amqp(&self) -> bool {
        self.amqp.load(Ordering::Relaxed)
    }

    pub fn database(&self) -> bool {
        self.database.load(Ordering::Relaxed)
    }
}
