//! Shared pacing state: mailbox pauses (announced by NOTIFY) and the rolling
//! 24-hour sending counts.

use std::time::Duration;

use chrono::{DateTime, Utc};

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

    /// The mailbox's pause still running, if any: its end and its reason
    /// (`throttled`, `sending_blocked`, …).
    pub async fn mailbox_pause(
        &self,
        organization_id: &str,
    ) -> Result<Option<(DateTime<Utc>, String)>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT paused_until, reason FROM mailbox_pauses
                 WHERE organization_id = $1 AND paused_until > now()",
                &[&organization_id],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Ends the mailbox's pause now: the provider has just taken a message of
    /// it (the admin's test send), so whatever paused it is over. Announced as
    /// a pause ending now, which every replica's pacer takes as a lift. Returns
    /// the reason of the pause lifted, if one was running.
    pub async fn lift_mailbox_pause(
        &self,
        organization_id: &str,
    ) -> Result<Option<String>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "UPDATE mailbox_pauses SET paused_until = now(), updated_at = now()
                 WHERE organization_id = $1 AND paused_until > now()
                 RETURNING reason",
                &[&organization_id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Pauses still running (loaded at start, when notifications may have been missed).
    pub async fn active_pauses(&self) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT organization_id, paused_until FROM mailbox_pauses WHERE paused_until > now()", &[])
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Adds what this replica sent to the shared rolling-window counts, one
    /// `(organization, counter, units)` each (0 units: only read the total back),
    /// and returns, for each counter listed, the total of every replica over the
    /// last `window` and when its oldest bucket leaves it.
    ///
    /// Cost per call (one every 2 s per replica with anything to write): an
    /// `INSERT … ON CONFLICT` of one row per counter written, a `SELECT` summing at
    /// most 288 buckets per counter listed (a primary-key range), and a `DELETE` of
    /// the buckets that left the window (by the `bucket` index). No query per job.
    pub async fn add_window_counts(
        &self,
        counts: &[(String, i16, i32)],
        window: Duration,
    ) -> Result<Vec<WindowTotal>, StoreError> {
        if counts.is_empty() {
            return Ok(vec![]);
        }
        let orgs: Vec<&str> = counts.iter().map(|c| c.0.as_str()).collect();
        let counters: Vec<i16> = counts.iter().map(|c| c.1).collect();
        let units: Vec<i32> = counts.iter().map(|c| c.2).collect();
        let window_secs = window.as_secs_f64();
        let bucket_secs = window_bucket(window).as_secs_f64();
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO mailbox_sends (organization_id, counter, bucket, units)
                 SELECT o, c, to_timestamp(floor(extract(epoch FROM now())::float8 / $4::float8) * $4::float8), u
                 FROM unnest($1::text[], $2::int2[], $3::int[]) AS t(o, c, u) WHERE u > 0
                 ON CONFLICT (organization_id, counter, bucket)
                 DO UPDATE SET units = mailbox_sends.units + EXCLUDED.units",
                &[&orgs, &counters, &units, &bucket_secs],
            )
            .await?;
        // A bucket counts until its end is a whole window old: a send is never
        // forgotten before the provider forgets it.
        let rows = client
            .query(
                "SELECT s.organization_id, s.counter, sum(s.units)::int4,
                        min(s.bucket) + make_interval(secs => $3::float8 + $4::float8),
                        (array_agg(s.units ORDER BY s.bucket))[1]
                 FROM mailbox_sends s
                 JOIN (SELECT DISTINCT o, c FROM unnest($1::text[], $2::int2[]) AS t(o, c)) t
                   ON s.organization_id = t.o AND s.counter = t.c
                 WHERE s.bucket > now() - make_interval(secs => $3::float8 + $4::float8)
                 GROUP BY s.organization_id, s.counter",
                &[&orgs, &counters, &window_secs, &bucket_secs],
            )
            .await?;
        client
            .execute(
                "DELETE FROM mailbox_sends WHERE bucket < now() - make_interval(secs => $1::float8 + $2::float8)",
                &[&window_secs, &bucket_secs],
            )
            .await?;
        let mut totals: Vec<WindowTotal> = rows
            .iter()
            .map(|r| WindowTotal {
                organization_id: r.get(0),
                counter: r.get(1),
                total: r.get(2),
                oldest_leaves_at: r.get(3),
                oldest_units: r.get(4),
            })
            .collect();
        // A counter with nothing left in the window is read back as zero.
        for (org, counter, _) in counts {
            if !totals
                .iter()
                .any(|t| &t.organization_id == org && t.counter == *counter)
            {
                totals.push(WindowTotal {
                    organization_id: org.clone(),
                    counter: *counter,
                    total: 0,
                    oldest_leaves_at: None,
                    oldest_units: None,
                });
            }
        }
        Ok(totals)
    }
}

/// The length of one bucket of the rolling-window counts: a 288th of the window
/// (5 minutes for 24 hours), at least a second. A send is counted until the end
/// of its bucket is a window old, so it may be counted up to one bucket longer
/// than the provider counts it: never shorter.
pub fn window_bucket(window: Duration) -> Duration {
    (window / 288).max(Duration::from_secs(1))
}

/// One mailbox counter's total over the rolling window, over every replica.
#[derive(Clone, Debug, PartialEq)]
pub struct WindowTotal {
    pub organization_id: String,
    /// The pacer's counter code (recipients, messages, external recipients).
    pub counter: i16,
    pub total: i32,
    /// When the oldest bucket still counted leaves the window (`None`: nothing counted).
    pub oldest_leaves_at: Option<DateTime<Utc>>,
    /// What that bucket holds.
    pub oldest_units: Option<i32>,
}

#[cfg(test)]
mod tests {
    use crate::{PoolSettings, Store, TokenCipher};
    use secrecy::SecretString;

    #[tokio::test]
    async fn window_counts_are_summed_over_replicas_and_the_window_only() {
        let db = mail_dispatch_test_db::TempDatabase::create("md_test_").await;
        let key = SecretString::from(TokenCipher::generate_key());
        let store = Store::connect(
            &db.url,
            TokenCipher::new(&key, &[]).unwrap(),
            PoolSettings::default(),
        )
        .unwrap();
        store.migrate().await.unwrap();
        let day = std::time::Duration::from_secs(24 * 3600);
        // Sent 25 hours ago: out of the window, and pruned.
        let client = db.client().await;
        client
            .execute(
                "INSERT INTO mailbox_sends VALUES ('org', 0, now() - interval '25 hours', 50)",
                &[],
            )
            .await
            .unwrap();
        // Sent 23 hours ago: still counted, and the oldest.
        client
            .execute(
                "INSERT INTO mailbox_sends VALUES ('org', 0, date_bin('5 minutes', now() - interval '23 hours', 'epoch'), 7)",
                &[],
            )
            .await
            .unwrap();
        // Two replicas flush, one reads another counter back with nothing to write.
        store
            .add_window_counts(&[("org".into(), 0, 3)], day)
            .await
            .unwrap();
        let totals = store
            .add_window_counts(&[("org".into(), 0, 2), ("org".into(), 1, 0)], day)
            .await
            .unwrap();
        let recipients = totals.iter().find(|t| t.counter == 0).unwrap();
        assert_eq!(recipients.total, 12);
        assert_eq!(recipients.oldest_units, Some(7));
        let leaves = recipients.oldest_leaves_at.unwrap() - chrono::Utc::now();
        assert!(
            leaves > chrono::Duration::minutes(55) && leaves <= chrono::Duration::minutes(65),
            "the oldest leaves about an hour (and a bucket) from now: {leaves}"
        );
        let messages = totals.iter().find(|t| t.counter == 1).unwrap();
        assert_eq!((messages.total, messages.oldest_leaves_at), (0, None));
        let rows: i64 = client
            .query_one("SELECT count(*) FROM mailbox_sends", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 2, "the bucket out of the window was pruned");
    }

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
