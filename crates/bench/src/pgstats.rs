//! PostgreSQL's own counters for the benchmark's database (`pg_stat_database`,
//! `pg_stat_user_tables`): what the worker really asked of PostgreSQL, whether or
//! not the worker counts it itself.
//!
//! Backends report their counters when they go idle (at most once a second) and
//! when they exit, so read the "after" snapshot once the worker has stopped.

use std::collections::BTreeMap;

use anyhow::Context as _;
use tokio_postgres::NoTls;

#[derive(Clone, Debug, Default)]
pub struct TableStats {
    /// Index and sequential scans (lookups), inserted, updated, deleted rows.
    pub scans: i64,
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
}

#[derive(Clone, Debug, Default)]
pub struct PgStats {
    /// Committed and rolled-back transactions (every autocommit statement is one).
    pub transactions: i64,
    /// Sessions (connections) opened.
    pub sessions: i64,
    pub tables: BTreeMap<String, TableStats>,
}

impl PgStats {
    pub async fn take(database_url: &str) -> anyhow::Result<PgStats> {
        let (client, conn) = tokio_postgres::connect(database_url, NoTls)
            .await
            .context("connecting to the benchmark's database")?;
        let conn = tokio::spawn(conn);
        // A fresh snapshot of the shared counters in this transaction.
        client
            .batch_execute("SELECT pg_stat_clear_snapshot()")
            .await?;
        let row = client
            .query_one(
                "SELECT (xact_commit + xact_rollback)::int8, sessions::int8 FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await?;
        let transactions: i64 = row.get(0);
        let sessions: i64 = row.get(1);
        let mut tables = BTreeMap::new();
        for r in client
            .query(
                "SELECT relname::text, (coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::int8,
                        n_tup_ins::int8, n_tup_upd::int8, n_tup_del::int8
                 FROM pg_stat_user_tables",
                &[],
            )
            .await?
        {
            tables.insert(
                r.get::<_, String>(0),
                TableStats {
                    scans: r.get(1),
                    inserted: r.get(2),
                    updated: r.get(3),
                    deleted: r.get(4),
                },
            );
        }
        drop(client);
        let _ = conn.await;
        Ok(PgStats {
            transactions,
            sessions,
            tables,
        })
    }

    /// `self - before`. Our own reading connection's few transactions are not removed.
    pub fn since(&self, before: &PgStats) -> PgStats {
        let tables = self
            .tables
            .iter()
            .map(|(name, t)| {
                let b = before.tables.get(name).cloned().unwrap_or_default();
                (
                    name.clone(),
                    TableStats {
                        scans: t.scans - b.scans,
                        inserted: t.inserted - b.inserted,
                        updated: t.updated - b.updated,
                        deleted: t.deleted - b.deleted,
                    },
                )
            })
            .filter(|(_, t)| t.scans != 0 || t.inserted != 0 || t.updated != 0 || t.deleted != 0)
            .collect();
        PgStats {
            transactions: self.transactions - before.transactions,
            sessions: self.sessions - before.sessions,
            tables,
        }
    }
}
