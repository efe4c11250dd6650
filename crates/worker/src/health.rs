//! Connection state shared with `/readyz` and the gauges.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mail_dispatch_store::Store;

/// How long a database check may take before it counts as "down": below the
/// readiness probe's own timeout (3 s in `deploy/kubernetes`), so the probe gets
/// an answer rather than a timeout.
pub const DATABASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// A check this recent answers the next caller too.
const DATABASE_CHECK_REUSE: Duration = Duration::from_secs(1);

/// What the worker knows of its connections.
#[derive(Debug, Default)]
pub struct Health {
    amqp: AtomicBool,
    database: AtomicBool,
    /// When the database was last checked. Held while checking: one check at a
    /// time per process, so probes, however many and however often, take at
    /// most one pooled connection.
    last_check: tokio::sync::Mutex<Option<Instant>>,
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

    /// Checks that PostgreSQL answers with every migration applied, records the
    /// answer, and returns it: `false` within [`DATABASE_CHECK_TIMEOUT`] however
    /// the database fails. Concurrent callers share one check.
    pub async fn check_database(&self, store: &Store) -> bool {
        let check = async {
            let mut last = self.last_check.lock().await;
            if last.is_some_and(|at| at.elapsed() < DATABASE_CHECK_REUSE) {
                return self.database();
            }
            let up = matches!(store.ping().await, Ok(true));
            self.set_database(up);
            *last = Some(Instant::now());
            up
        };
        match tokio::time::timeout(DATABASE_CHECK_TIMEOUT, check).await {
            Ok(up) => up,
            Err(_) => {
                self.set_database(false);
                false
            }
        }
    }
}
