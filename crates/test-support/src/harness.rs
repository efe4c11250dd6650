//! The dispatch use case without a broker: a test database, the stand-ins and a
//! `Dispatcher` whose `handle` a test calls directly, one delivery in, one
//! decision out. Nothing is consumed or published: the test reads the decision.

use std::path::PathBuf;
use std::sync::Arc;

use mail_dispatch_worker::{CacheConfig, Decision, Dispatcher, Incoming, Services};

use serde_json::Value;

use crate::app::{connect, provider_endpoints, worker_config};
use crate::standins::Vendor;
use crate::{StandIns, TestAppOptions, TestDb};

/// A dispatcher over a test database and the stand-ins, with no broker.
pub struct Harness {
    pub dispatcher: Arc<Dispatcher>,
    /// The services the dispatcher works through (their caches, for a test to evict).
    pub services: Arc<Services>,
    pub standins: StandIns,
    pub outbox: PathBuf,
    pub db: TestDb,
}

impl Harness {
    pub async fn new(options: TestAppOptions) -> Harness {
        let (db, standins) = tokio::join!(TestDb::new(), StandIns::start());
        let outbox = std::env::temp_dir().join(crate::unique("md-outbox-"));
        let endpoints = provider_endpoints(&standins, "http://127.0.0.1:9", &options, &outbox);
        let services =
            Services::build(db.store.clone(), &endpoints, CacheConfig::default()).unwrap();
        let config = worker_config(
            &options,
            mail_dispatch_broker::Topology::with_prefix(&crate::unique("unused-")),
        );
        Harness {
            dispatcher: Arc::new(Dispatcher::new(&services, config)),
            services,
            standins,
            outbox,
            db,
        }
    }

    /// Decides what to do with a first delivery of `job`.
    pub async fn handle(&self, job: &Value) -> Decision {
        self.handle_incoming(&Incoming::new(serde_json::to_vec(job).unwrap()))
            .await
    }

    pub async fn handle_incoming(&self, incoming: &Incoming) -> Decision {
        self.dispatcher.handle(incoming).await
    }

    /// As [`crate::TestApp::connect`].
    pub async fn connect(&self, org: &str, vendor: Vendor, account: &str) -> (String, String) {
        connect(
            &self.db,
            &self.standins,
            org,
            vendor,
            account,
            account,
            "Sender",
        )
        .await
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.outbox);
    }
}
