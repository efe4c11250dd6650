//! Shared pacing state: mailbox pauses (announced by NOTIFY) and daily counts.

use chrono::{DateTime, NaiveDate, Utc};

use crate::{Store, StoreError};

impl Store {
    /// Pauses a mailbox until `until` for every replica (a later pause wins).
    pub async fn pause_mailbox(
        &self,
        organization_id: &str,
        until: DateTime<Utc>,
        reason: &str,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO mailbox_pauses (organization_id, paused_until, reason) VALUES ($1, $2, $3)
                 ON CONFLICT (organization_id) DO UPDATE SET
                     paused_until = EXCLUDED.paused_until, reason = EXCLUDED.reason, updated_at = now()
                 WHERE mailbox_pauses.paused_until < EXCLUDED.paused_until",
                &[&organization_id, &until, &reason],
            )
            .await?;
        // Pauses over for a day are of no use to anyone: the table stays as small as
        // the set of mailboxes throttled lately.
        client
            .execute(
                "DELETE FROM mailbox_pauses WHERE paused_until < now() - interval '1 day'",
                &[],
            )
            .await?;
        Ok(())
    }

    /// Pauses still running (loaded at start, when notifications may have been missed).
    pub async fn active_pauses(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT organization_id, paused_until FROM mailbox_pauses WHERE paused_until > now()", &[])
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Adds what this replica sent to the shared daily counts; returns the totals
    /// of every replica for those mailboxes and days.
    pub async fn add_daily_counts(
        &self,
        counts: &[(String, NaiveDate, i32)],
    ) -> Result<Vec<(String, NaiveDate, i32)>, StoreError> {
        if counts.is_empty() {
            return Ok(vec![]);
        }
        let orgs: Vec<&str> = counts.iter().map(|c| c.0.as_str()).collect();
        let days: Vec<NaiveDate> = counts.iter().map(|c| c.1).collect();
        let sent: Vec<i32> = counts.iter().map(|c| c.2).collect();
        let client = self.client().await?;
        let rows = client
            .query(
                "INSERT INTO mailbox_daily (organization_id, day, sent)
                 SELECT * FROM unnest($1::text[], $2::date[], $3::int[])
                 ON CONFLICT (organization_id, day) DO UPDATE SET sent = mailbox_daily.sent + EXCLUDED.sent
                 RETURNING organization_id, day, sent",
                &[&orgs, &days, &sent],
            )
            .await?;
        client
            .execute(
                "DELETE FROM mailbox_daily WHERE day < current_date - 2",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use crate::{PoolSettings, Store, TokenCipher};
    use secrecy::SecretString;

    #[tokio::test]
    async fn pauses_over_for_a_day_are_pruned_when_a_mailbox_is_paused() {
        let db = mail_dispatch_test_db::TempDatabase::create("md_test_").await;
        let key = SecretString::from(TokenCipher::generate_key());
        let store = Store::connect(
            &db.url,
            TokenCipher::new(&key, &[]).unwrap(),
            PoolSettings::default(),
        )
        .unwrap();
        store.migrate().await.unwrap();
        let client = db.client().await;
        client
            .execute(
                "INSERT INTO mailbox_pauses (organization_id, paused_until, reason)
                 VALUES ('old', now() - interval '2 days', 'throttled')",
                &[],
            )
            .await
            .unwrap();
        store
            .pause_mailbox(
                "new",
                chrono::Utc::now() + chrono::Duration::seconds(30),
                "throttled",
            )
            .await
            .unwrap();
        let orgs: Vec<String> = client
            .query("SELECT organization_id FROM mailbox_pauses ORDER BY 1", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(orgs, ["new"]);
    }
}
