//! The idempotency ledger: a job id is claimed before sending, completed with its
//! result after, and marked published once the broker confirmed the result.

use std::time::Duration;

use crate::{Store, StoreError};

/// What claiming a job id found.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// This worker may send the job. `claims` counts how many times it was claimed
    /// (more than one after a retry or a crash take-over).
    Acquired { claims: i32 },
    /// Another worker holds a live claim on it: do not send now.
    Busy,
    /// The outcome is known but its result was not confirmed published: publish
    /// this stored result, without sending again.
    Completed(Option<serde_json::Value>),
    /// Finished and its result published: nothing to do.
    Published,
}

impl Store {
    /// Claims `job_id` for `lease`. A claim whose lease expired (its worker
    /// crashed) is taken over; a job waiting for a retry is claimable again; a
    /// completed job whose publisher's lease expired is handed over for publishing.
    pub async fn claim_job(
        &self,
        job_id: &str,
        organization_id: &str,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        let lease_secs = lease.as_secs_f64();
        let claimed = client
            .query_opt(
                "INSERT INTO job_ledger (job_id, organization_id, state, lease_until)
                 VALUES ($1, $2, 'claimed', now() + make_interval(secs => $3::float8))
                 ON CONFLICT (job_id) DO UPDATE SET
                     state = CASE WHEN job_ledger.state = 'completed' THEN 'completed' ELSE 'claimed' END,
                     lease_until = EXCLUDED.lease_until,
                     claims = job_ledger.claims + 1,
                     updated_at = now()
                 WHERE job_ledger.state = 'retrying'
                    OR (job_ledger.state IN ('claimed', 'completed') AND job_ledger.lease_until < now())
                 RETURNING state, claims, result",
                &[&job_id, &organization_id, &lease_secs],
            )
            .await?;
        if let Some(row) = claimed {
            let state: &str = row.get(0);
            return Ok(if state == "completed" {
                Claim::Completed(row.get::<_, Option<serde_json::Value>>(2))
            } else {
                Claim::Acquired { claims: row.get(1) }
            });
        }
        let row = client
            .query_one("SELECT state FROM job_ledger WHERE job_id = $1", &[&job_id])
            .await?;
        let state: &str = row.get(0);
        Ok(if state == "published" {
            Claim::Published
        } else {
            Claim::Busy
        })
    }

    /// Records the outcome of a claimed job (before its result is published).
    /// `lease` protects the publishing that follows from a concurrent redelivery.
    pub async fn complete_job(
        &self,
        job_id: &str,
        result: &serde_json::Value,
        lease: Duration,
    ) -> Result<(), StoreError> {
        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        client
            .execute(
                "UPDATE job_ledger SET state = 'completed', result = $2,
                     lease_until = now() + make_interval(secs => $3::float8), updated_at = now()
                 WHERE job_id = $1 AND state <> 'published'",
                &[&job_id, result, &lease.as_secs_f64()],
            )
            .await?;
        Ok(())
    }

    /// Records an outcome for a job id that was never claimed (an invalid job whose
    /// id was readable). `Acquired` means this caller publishes it.
    pub async fn complete_unclaimed_job(
        &self,
        job_id: &str,
        organization_id: &str,
        result: &serde_json::Value,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        let inserted = client
            .execute(
                "INSERT INTO job_ledger (job_id, organization_id, state, result, lease_until)
                 VALUES ($1, $2, 'completed', $3, now() + make_interval(secs => $4::float8))
                 ON CONFLICT (job_id) DO NOTHING",
                &[&job_id, &organization_id, result, &lease.as_secs_f64()],
            )
            .await?;
        if inserted == 1 {
            return Ok(Claim::Acquired { claims: 1 });
        }
        drop(client);
        self.claim_job(job_id, organization_id, lease).await
    }

    /// The results of these jobs were confirmed by the broker (one statement for
    /// a batch: see the worker's batcher).
    pub async fn mark_published(&self, job_ids: &[String]) -> Result<(), StoreError> {
        if job_ids.is_empty() {
            return Ok(());
        }
        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        client
            .execute(
                "UPDATE job_ledger SET state = 'published', updated_at = now() WHERE job_id = ANY($1)",
                &[&job_ids],
            )
            .await?;
        Ok(())
    }

    /// Releases a claim: the job waits in a delay queue and its next delivery may
    /// claim it again. (A job handed back at shutdown keeps its claim until the
    /// lease expires: its send may have been under way.)
    pub async fn release_job(&self, job_id: &str) -> Result<(), StoreError> {
        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        client
            .execute(
                "UPDATE job_ledger SET state = 'retrying', lease_until = NULL, updated_at = now()
                 WHERE job_id = $1 AND state = 'claimed'",
                &[&job_id],
            )
            .await?;
        Ok(())
    }

    /// Publishing a completed job's result failed: let its next delivery publish
    /// it at once instead of waiting for the publish lease to expire.
    pub async fn release_publish(&self, job_id: &str) -> Result<(), StoreError> {
        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        client
            .execute(
                "UPDATE job_ledger SET lease_until = now(), updated_at = now()
                 WHERE job_id = $1 AND state = 'completed'",
                &[&job_id],
            )
            .await?;
        Ok(())
    }

    /// Deletes finished ledger entries older than `retention`, `batch` rows per
    /// statement so no statement holds locks for long; rows another replica is
    /// deleting are skipped. Returns how many were deleted.
    pub async fn prune_ledger(&self, retention: Duration, batch: i64) -> Result<u64, StoreError> {
        let client = self.ledger_client().await?;
        let mut total = 0;
        loop {
            let n = client
                .execute(
                    "DELETE FROM job_ledger WHERE job_id IN (
                         SELECT job_id FROM job_ledger
                         WHERE state = 'published' AND updated_at < now() - make_interval(secs => $1::float8)
                         LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    &[&retention.as_secs_f64(), &batch],
                )
                .await?;
            total += n;
            if (n as i64) < batch {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    /// Makes a finished job id claimable again (dead-letter replay with a fresh budget).
    pub async fn reopen_job(&self, job_id: &str) -> Result<(), StoreError> {
        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        client
            .execute(
                "UPDATE job_ledger SET state = 'retrying', result = NULL, lease_until = NULL, updated_at = now()
                 WHERE job_id = $1",
                &[&job_id],
            )
            .await?;
        Ok(())
    }
}
