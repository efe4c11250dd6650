//! A pooled connection whose every statement has a deadline on this side too.
//!
//! `statement_timeout` makes PostgreSQL cancel a statement that runs too long, but
//! it cannot help when PostgreSQL never sees the statement, or its answer never
//! comes back: a network partition that leaves the socket half-open, a failover
//! behind a stale address. The kernel notices such a socket only once data goes
//! unacknowledged for `tcp_user_timeout`, and not at all behind a proxy that
//! acknowledges for the server. So the client gives up too, shortly after the
//! server would have, and that connection is taken out of the pool rather than
//! handed to the next caller with the lost answer still pending.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::Object;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement, ToStatement};

use crate::StoreError;

/// A connection of one of the store's pools (see the module documentation).
pub(crate) struct Conn {
    object: Option<Object>,
    deadline: Duration,
    /// A statement was sent and its answer not received: it timed out, or the
    /// caller's future was dropped mid-statement (an outer timeout). Such a
    /// connection may be dead, or behind a statement nobody waits for.
    unsettled: AtomicBool,
}

impl Conn {
    pub(crate) fn new(object: Object, deadline: Duration) -> Self {
        Conn {
            object: Some(object),
            deadline,
            unsettled: AtomicBool::new(false),
        }
    }

    fn client(&self) -> &Object {
        self.object.as_ref().expect("present until dropped")
    }

    async fn bounded<T>(
        &self,
        statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        self.unsettled.store(true, Ordering::Relaxed);
        match tokio::time::timeout(self.deadline, statement).await {
            Ok(answer) => {
                self.unsettled.store(false, Ordering::Relaxed);
                Ok(answer?)
            }
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer from PostgreSQL within {} ms",
                self.deadline.as_millis()
            ))),
        }
    }

    pub(crate) async fn query<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.bounded(self.client().query(statement, params)).await
    }

    pub(crate) async fn query_one<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, StoreError> {
        self.bounded(self.client().query_one(statement, params))
            .await
    }

    pub(crate) async fn query_opt<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        self.bounded(self.client().query_opt(statement, params))
            .await
    }

    pub(crate) async fn execute<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        self.bounded(self.client().execute(statement, params)).await
    }

    #[cfg(test)]
    pub(crate) async fn batch_execute(&self, statements: &str) -> Result<(), StoreError> {
        self.bounded(self.client().batch_execute(statements)).await
    }

    pub(crate) async fn prepare_cached(&self, query: &str) -> Result<Statement, StoreError> {
        self.bounded(self.client().prepare_cached(query)).await
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.unsettled.load(Ordering::Relaxed)
            && let Some(object) = self.object.take()
        {
            // Out of the pool: dropping the client closes the connection, and
            // the pool opens a fresh one when it needs one.
            drop(Object::take(object));
        }
    }
}
