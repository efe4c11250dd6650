//! Fleet-wide concurrency of a mailbox: slot leases shared by every replica.
//!
//! Each call is one statement, so a Graph send costs PostgreSQL one round trip
//! before it (acquire) and one after (release); a send that outlives a third
//! of its lease adds an extension.

use std::time::Duration;

use crate::{Store, StoreError};

/// One of a mailbox's slots, held until released or until the lease expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotLease {
    pub organization_id: String,
    pub slot: i32,
    /// Fencing: only this lease's holder may extend or release it.
    holder: i64,
}

impl SlotLease {
    /// A lease as a store of slots hands it out (for in-memory stand-ins of
    /// the store); `holder` fences it.
    pub fn new(organization_id: &str, slot: i32, holder: i64) -> Self {
        SlotLease {
            organization_id: organization_id.to_owned(),
            slot,
            holder,
        }
    }
}

impl Store {
    /// Takes a free slot among the mailbox's first `slots` for `lease`, or
    /// `None` when all are held. A slot is free once its lease expired (its
    /// holder released it, or died). Rows locked by a concurrent acquirer are
    /// skipped rather than waited for, and a mailbox's rows are created on its
    /// first sends.
    pub async fn acquire_mailbox_slot(
        &self,
        organization_id: &str,
        slots: usize,
        lease: Duration,
    ) -> Result<Option<SlotLease>, StoreError> {
        let holder: i64 = rand::random();
        let slots = i32::try_from(slots.max(1)).unwrap_or(i32::MAX);
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "WITH free AS (
                     SELECT slot FROM mailbox_slots
                     WHERE organization_id = $1 AND slot < $2 AND expires_at <= now()
                     ORDER BY slot LIMIT 1
                     FOR UPDATE SKIP LOCKED
                 ), taken AS (
                     UPDATE mailbox_slots m
                     SET holder = $3, expires_at = now() + make_interval(secs => $4::float8)
                     FROM free WHERE m.organization_id = $1 AND m.slot = free.slot
                     RETURNING m.slot
                 ), created AS (
                     INSERT INTO mailbox_slots (organization_id, slot, holder, expires_at)
                     SELECT $1, s, $3, now() + make_interval(secs => $4::float8)
                     FROM generate_series(0, $2 - 1) AS s
                     WHERE NOT EXISTS (SELECT 1 FROM free)
                       AND NOT EXISTS (SELECT 1 FROM mailbox_slots x
                                       WHERE x.organization_id = $1 AND x.slot = s)
                     ORDER BY s LIMIT 1
                     ON CONFLICT DO NOTHING
                     RETURNING slot
                 )
                 SELECT slot FROM taken UNION ALL SELECT slot FROM created",
            )
            .await?;
        let row = client
            .query_opt(
                &statement,
                &[&organization_id, &slots, &holder, &lease.as_secs_f64()],
            )
            .await?;
        Ok(row.map(|r| SlotLease {
            organization_id: organization_id.to_owned(),
            slot: r.get(0),
            holder,
        }))
    }

    /// Extends a held lease to `lease` from now; `false` if it is not held any
    /// more (it expired and another replica took the slot).
    pub async fn extend_mailbox_slot(
        &self,
        slot: &SlotLease,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE mailbox_slots SET expires_at = now() + make_interval(secs => $4::float8)
                 WHERE organization_id = $1 AND slot = $2 AND holder = $3",
            )
            .await?;
        let n = client
            .execute(
                &statement,
                &[
                    &slot.organization_id,
                    &slot.slot,
                    &slot.holder,
                    &lease.as_secs_f64(),
                ],
            )
            .await?;
        Ok(n == 1)
    }

    /// Frees a held slot at once (a lease taken over meanwhile is left alone),
    /// and announces it on the `mail_dispatch_slot` channel so that a replica whose job waits
    /// for one of the mailbox's slots tries again at once.
    pub async fn release_mailbox_slot(&self, slot: &SlotLease) -> Result<(), StoreError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "WITH freed AS (
                     UPDATE mailbox_slots SET expires_at = '-infinity'
                     WHERE organization_id = $1 AND slot = $2 AND holder = $3
                     RETURNING organization_id
                 )
                 SELECT pg_notify('mail_dispatch_slot', organization_id) FROM freed",
            )
            .await?;
        client
            .query(
                &statement,
                &[&slot.organization_id, &slot.slot, &slot.holder],
            )
            .await?;
        Ok(())
    }

    /// Deletes the slots of mailboxes that sent nothing for a day, so the table
    /// stays as small as the set of mailboxes sending lately.
    pub async fn prune_mailbox_slots(&self) -> Result<u64, StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM mailbox_slots WHERE expires_at < now() - interval '1 day'",
                &[],
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{PoolSettings, Store, TokenCipher};
    use secrecy::SecretString;

    async fn store() -> (mail_dispatch_test_db::TempDatabase, Store) {
        let db = mail_dispatch_test_db::TempDatabase::create("md_test_").await;
        let key = SecretString::from(TokenCipher::generate_key());
        let store = Store::connect(
            &db.url,
            TokenCipher::new(&key, &[]).unwrap(),
            PoolSettings::default(),
        )
        .unwrap();
        store.migrate().await.unwrap();
        (db, store)
    }

    const LEASE: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_mailbox_has_at_most_its_slots_held_at_once_even_when_asked_together() {
        let (_db, store) = store().await;
        let tries: Vec<_> = (0..12)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.acquire_mailbox_slot("org", 4, LEASE).await })
            })
            .collect();
        let mut held = Vec::new();
        for t in tries {
            if let Some(lease) = t.await.unwrap().unwrap() {
                held.push(lease);
            }
        }
        let mut slots: Vec<i32> = held.iter().map(|l| l.slot).collect();
        slots.sort();
        slots.dedup();
        assert_eq!(slots.len(), held.len(), "no slot held twice");
        assert!(held.len() <= 4);
        // Another mailbox has its own slots.
        assert!(
            store
                .acquire_mailbox_slot("other", 4, LEASE)
                .await
                .unwrap()
                .is_some()
        );
        // Once the remaining ones are taken, the fifth is refused; a release frees one.
        while held.len() < 4 {
            held.push(
                store
                    .acquire_mailbox_slot("org", 4, LEASE)
                    .await
                    .unwrap()
                    .expect("a free slot"),
            );
        }
        assert_eq!(
            store.acquire_mailbox_slot("org", 4, LEASE).await.unwrap(),
            None
        );
        store.release_mailbox_slot(&held[2]).await.unwrap();
        let again = store.acquire_mailbox_slot("org", 4, LEASE).await.unwrap();
        assert_eq!(again.map(|l| l.slot), Some(held[2].slot));
    }

    #[tokio::test]
    async fn an_expired_lease_frees_its_slot_and_its_old_holder_cannot_touch_it() {
        let (_db, store) = store().await;
        let old = store
            .acquire_mailbox_slot("org", 1, Duration::from_millis(50))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            store.acquire_mailbox_slot("org", 1, LEASE).await.unwrap(),
            None
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let new = store
            .acquire_mailbox_slot("org", 1, LEASE)
            .await
            .unwrap()
            .expect("the crashed holder's slot is free once its lease expired");
        assert!(!store.extend_mailbox_slot(&old, LEASE).await.unwrap());
        store.release_mailbox_slot(&old).await.unwrap();
        assert_eq!(
            store.acquire_mailbox_slot("org", 1, LEASE).await.unwrap(),
            None,
            "the old holder's release left the new lease alone"
        );
        assert!(store.extend_mailbox_slot(&new, LEASE).await.unwrap());
    }
}
