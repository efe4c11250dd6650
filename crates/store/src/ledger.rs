//! The idempotency ledger: a job id is claimed before sending, completed with its
//! result after, and marked published once the broker confirmed the result. Rows
//! are keyed by organization and job id ([`JobKey`]): job ids are unique within
//! an organization only.
//!
//! Every statement here is prepared once per connection (`prepare_cached`) and
//! counted in `QueryCounts::ledger_writes` once per execution. Claims and
//! completions also come in batched forms ([`Store::claim_jobs`],
//! [`Store::complete_jobs`]): one statement for many jobs, which the group-commit
//! batcher (`ledger_batch.rs`) uses to merge concurrent requests.

use std::collections::HashMap;
use std::time::Duration;

use crate::{Store, StoreError};

/// A job's row in the ledger: the organization and the job id it gave.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKey {
    // Field order is the primary key's: sorting keys sorts them as the index does.
    pub organization_id: String,
    pub job_id: String,
}

impl JobKey {
    pub fn new(organization_id: impl Into<String>, job_id: impl Into<String>) -> Self {
        JobKey {
            organization_id: organization_id.into(),
            job_id: job_id.into(),
        }
    }
}

/// Who holds a claim: a value drawn afresh for every claim (PostgreSQL
/// sequence `job_ledger_claim_id_seq`). Completing, releasing and extending a
/// claim take it, and act only while the row still carries it: once a claim's
/// lease ran out and another delivery took the job over, its former holder can
/// change nothing of the job (a fencing token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClaimOwner(pub i64);

/// What claiming a job id found.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// This worker may send the job, as `owner`. `claims` counts the claims in a
    /// row that recorded no outcome: 1 for a new job or one released after a
    /// failed attempt ([`Store::release_job`] starts the count again), more when
    /// a claim whose lease ran out is taken over, i.e. each time a worker died
    /// or stalled while holding it.
    Acquired { claims: i32, owner: ClaimOwner },
    /// A send of this job was at the provider when its worker had to drop it
    /// ([`Store::mark_ambiguous`]): the message may have been accepted. This
    /// worker now holds the claim (as `owner`) to record the job's outcome, and
    /// must not send it again.
    Ambiguous { owner: ClaimOwner },
    /// Another worker holds a live claim on it: do not send now.
    Busy,
    /// The outcome is known but its result was not confirmed published: publish
    /// this stored result, without sending again.
    Completed(Option<serde_json::Value>),
    /// Finished and its result published: nothing to do.
    Published,
}

/// Claims a batch of job ids in one statement. The input is distinct and sorted by
/// key (so that concurrent batches, from this or another replica, lock rows in
/// the same order). In a data-modifying CTE the outer `SELECT` sees `job_ledger`
/// as it was before the statement: a job id that `claimed` did not return shows
/// its unchanged state there (`existing`). `existing` is NULL only when another
/// transaction inserted the row after this statement's snapshot: that row is
/// claimed or completed under a live lease, hence `Busy`. Every claim draws a
/// new owner (`EXCLUDED.claim_id` is the proposed row's, from the column's
/// sequence default). An ambiguous row stays ambiguous when claimed: its new
/// owner records the outcome, it does not send.
pub(crate) const CLAIM_JOBS: &str = "
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[]) AS t(job_id, organization_id)
),
claimed AS (
    INSERT INTO job_ledger (job_id, organization_id, state, lease_until)
    SELECT job_id, organization_id, 'claimed', now() + make_interval(secs => $3::float8)
    FROM input
    ON CONFLICT (organization_id, job_id) DO UPDATE SET
        state = CASE WHEN job_ledger.state IN ('completed', 'ambiguous') THEN job_ledger.state
                     ELSE 'claimed' END,
        lease_until = EXCLUDED.lease_until,
        claims = job_ledger.claims + 1,
        claim_id = EXCLUDED.claim_id,
        updated_at = now()
    WHERE job_ledger.state = 'retrying'
       OR (job_ledger.state IN ('claimed', 'completed', 'ambiguous')
           AND job_ledger.lease_until < now())
    RETURNING organization_id, job_id, state, claims, result, claim_id
)
SELECT i.organization_id, i.job_id, c.state, c.claims, c.result, l.state AS existing, c.claim_id
FROM input i
LEFT JOIN claimed c ON c.organization_id = i.organization_id AND c.job_id = i.job_id
LEFT JOIN job_ledger l ON l.organization_id = i.organization_id AND l.job_id = i.job_id";

/// Records the outcomes of a batch of claimed jobs in one statement (distinct
/// keys, sorted), each only while its row still carries the caller's owner;
/// returns the keys it recorded. (A released row keeps its owner until the next
/// claim: its holder may still record a final outcome, e.g. a give-up.)
pub(crate) const COMPLETE_JOBS: &str = "
UPDATE job_ledger l SET state = 'completed', result = i.result,
    lease_until = now() + make_interval(secs => $4::float8), updated_at = now()
FROM unnest($1::text[], $2::text[], $3::jsonb[], $5::int8[])
    AS i(job_id, organization_id, result, claim_id)
WHERE l.organization_id = i.organization_id AND l.job_id = i.job_id
  AND l.claim_id = i.claim_id AND l.state <> 'published'
RETURNING l.organization_id, l.job_id";

/// A job's outcome to record, with the owner of the claim it is recorded for.
pub(crate) type Completion = (JobKey, (serde_json::Value, ClaimOwner));

/// The job ids and organization ids of `keys`, as two statement parameters.
fn columns<'a>(keys: impl Iterator<Item = &'a JobKey>) -> (Vec<&'a str>, Vec<&'a str>) {
    keys.map(|k| (k.job_id.as_str(), k.organization_id.as_str()))
        .unzip()
}

impl Store {
    /// Claims `key` for `lease`. A claim whose lease expired (its worker
    /// crashed) is taken over; a job waiting for a retry is claimable again; a
    /// completed job whose publisher's lease expired is handed over for publishing.
    ///
    /// One statement. The public [`Store::claim_job`] lets concurrent callers
    /// share one (group commit).
    pub(crate) async fn claim_job_now(
        &self,
        key: &JobKey,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let mut claims = self.claim_jobs(std::slice::from_ref(key), lease).await?;
        Ok(claims.pop().expect("one answer per job id"))
    }

    /// [`Store::claim_job_now`] for many keys at once, in ONE statement; the
    /// answers come in the order of `keys`. A key given twice is answered as if
    /// claimed twice in a row: the first occurrence claims it, a later one finds
    /// that claim (`Busy`, or `Published` if it was published).
    pub(crate) async fn claim_jobs(
        &self,
        keys: &[JobKey],
        lease: Duration,
    ) -> Result<Vec<Claim>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // Distinct keys, sorted: ON CONFLICT cannot touch a row twice in one
        // statement, and a fixed order keeps concurrent batches from deadlocking.
        let mut order: Vec<&JobKey> = keys.iter().collect();
        order.sort();
        order.dedup();
        let (job_ids, orgs) = columns(order.into_iter());

        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        let statement = client.prepare_cached(CLAIM_JOBS).await?;
        let rows = client
            .query(&statement, &[&job_ids, &orgs, &lease.as_secs_f64()])
            .await?;
        drop(client);

        let mut found: HashMap<JobKey, Claim> = HashMap::with_capacity(rows.len());
        for row in rows {
            let owner = || ClaimOwner(row.get(6));
            let claim = match row.get::<_, Option<&str>>(2) {
                Some("completed") => Claim::Completed(row.get(4)),
                Some("ambiguous") => Claim::Ambiguous { owner: owner() },
                Some(_) => Claim::Acquired {
                    claims: row.get(3),
                    owner: owner(),
                },
                None if row.get::<_, Option<&str>>(5) == Some("published") => Claim::Published,
                None => Claim::Busy,
            };
            found.insert(
                JobKey::new(row.get::<_, String>(0), row.get::<_, String>(1)),
                claim,
            );
        }
        let mut answered = std::collections::HashSet::with_capacity(keys.len());
        keys.iter()
            .map(|key| {
                let claim = found.get(key).ok_or_else(|| {
                    StoreError::Unavailable(format!("no claim answer for job id {}", key.job_id))
                })?;
                Ok(if answered.insert(key) {
                    claim.clone()
                } else if *claim == Claim::Published {
                    Claim::Published
                } else {
                    // The first occurrence just claimed (or found claimed) it.
                    Claim::Busy
                })
            })
            .collect()
    }

    /// Records the outcome of a job claimed by `owner` (before its result is
    /// published); `false` if the claim is no longer `owner`'s (taken over
    /// after its lease ran out): nothing was recorded. `lease` protects the
    /// publishing that follows from a concurrent redelivery.
    ///
    /// One statement. The public [`Store::complete_job`] lets concurrent callers
    /// share one (group commit); this form is for the tests of that.
    #[cfg(test)]
    pub(crate) async fn complete_job_now(
        &self,
        key: &JobKey,
        owner: ClaimOwner,
        result: &serde_json::Value,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let done = self
            .complete_jobs(&[(key.clone(), (result.clone(), owner))], lease)
            .await?;
        Ok(done[0])
    }

    /// [`Store::complete_job_now`] for many `(key, (result, owner))` at once,
    /// in ONE statement; the answers come in the order of `items`. A key given
    /// twice keeps its last result (and both are answered as that one).
    pub(crate) async fn complete_jobs(
        &self,
        items: &[Completion],
        lease: Duration,
    ) -> Result<Vec<bool>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        // Distinct keys (the last occurrence wins), sorted.
        let mut order: Vec<(usize, &Completion)> = items.iter().enumerate().collect();
        order.sort_by(|a, b| a.1.0.cmp(&b.1.0).then(b.0.cmp(&a.0)));
        order.dedup_by(|a, b| a.1.0 == b.1.0);
        let (job_ids, orgs) = columns(order.iter().map(|(_, (key, _))| key));
        let results: Vec<&serde_json::Value> = order.iter().map(|(_, (_, (r, _)))| r).collect();
        let owners: Vec<i64> = order.iter().map(|(_, (_, (_, o)))| o.0).collect();

        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        let statement = client.prepare_cached(COMPLETE_JOBS).await?;
        let rows = client
            .query(
                &statement,
                &[&job_ids, &orgs, &results, &lease.as_secs_f64(), &owners],
            )
            .await?;
        let recorded: std::collections::HashSet<JobKey> = rows
            .iter()
            .map(|row| JobKey::new(row.get::<_, String>(0), row.get::<_, String>(1)))
            .collect();
        Ok(items
            .iter()
            .map(|(key, _)| recorded.contains(key))
            .collect())
    }

    /// Records an outcome for a job id that was never claimed (an invalid job whose
    /// id was readable). `Acquired` means this caller publishes it (and holds the
    /// row's claim).
    pub async fn complete_unclaimed_job(
        &self,
        key: &JobKey,
        result: &serde_json::Value,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        let statement = client
            .prepare_cached(
                "INSERT INTO job_ledger (job_id, organization_id, state, result, lease_until)
                 VALUES ($1, $2, 'completed', $3, now() + make_interval(secs => $4::float8))
                 ON CONFLICT (organization_id, job_id) DO NOTHING
                 RETURNING claim_id",
            )
            .await?;
        let inserted = client
            .query_opt(
                &statement,
                &[
                    &key.job_id,
                    &key.organization_id,
                    result,
                    &lease.as_secs_f64(),
                ],
            )
            .await?;
        if let Some(row) = inserted {
            return Ok(Claim::Acquired {
                claims: 1,
                owner: ClaimOwner(row.get(0)),
            });
        }
        drop(client);
        self.claim_job_now(key, lease).await
    }

    /// The results of these jobs were confirmed by the broker (one statement for
    /// a batch: see the worker's batcher).
    pub async fn mark_published(&self, keys: &[JobKey]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let (job_ids, orgs) = columns(keys.iter());
        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE job_ledger l SET state = 'published', updated_at = now()
                 FROM unnest($1::text[], $2::text[]) AS i(job_id, organization_id)
                 WHERE l.organization_id = i.organization_id AND l.job_id = i.job_id",
            )
            .await?;
        client.execute(&statement, &[&job_ids, &orgs]).await?;
        Ok(())
    }

    /// Releases a claim after an attempt whose outcome is known (a failure to
    /// retry, or nothing sent): the job waits in a delay queue and its next
    /// delivery may claim it again. The claim count starts again: only claims in a
    /// row without an outcome tell of a job that kills its workers. (A job handed
    /// back at shutdown while its send was at the provider is not released but
    /// marked ambiguous: [`Store::mark_ambiguous`].) Only `owner`'s claim is
    /// released; returns whether it was.
    pub async fn release_job(&self, key: &JobKey, owner: ClaimOwner) -> Result<bool, StoreError> {
        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE job_ledger SET state = 'retrying', lease_until = NULL, claims = 0,
                     updated_at = now()
                 WHERE organization_id = $1 AND job_id = $2 AND state = 'claimed'
                   AND claim_id = $3",
            )
            .await?;
        let n = client
            .execute(&statement, &[&key.organization_id, &key.job_id, &owner.0])
            .await?;
        Ok(n == 1)
    }

    /// Extends `owner`'s live claim by `lease` from now (while its send is still
    /// running), so that no redelivered copy takes it over and sends again.
    /// Returns whether the claim was still `owner`'s to extend: `false` once its
    /// lease ran out and another delivery took the job over.
    pub async fn extend_claim(
        &self,
        key: &JobKey,
        owner: ClaimOwner,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let client = self.ledger_client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE job_ledger SET lease_until = now() + make_interval(secs => $3::float8)
                 WHERE organization_id = $1 AND job_id = $2 AND state = 'claimed'
                   AND claim_id = $4",
            )
            .await?;
        let n = client
            .execute(
                &statement,
                &[
                    &key.organization_id,
                    &key.job_id,
                    &lease.as_secs_f64(),
                    &owner.0,
                ],
            )
            .await?;
        Ok(n == 1)
    }

    /// `owner` had to drop its job while a send was at the provider (the
    /// shutdown grace ran out): the provider may have accepted the message.
    /// The row turns `ambiguous`, claimable at once: the next delivery records
    /// a final outcome without sending ([`Claim::Ambiguous`]). Returns whether
    /// the claim was still `owner`'s.
    pub async fn mark_ambiguous(
        &self,
        key: &JobKey,
        owner: ClaimOwner,
    ) -> Result<bool, StoreError> {
        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE job_ledger SET state = 'ambiguous', lease_until = now(), updated_at = now()
                 WHERE organization_id = $1 AND job_id = $2 AND state = 'claimed'
                   AND claim_id = $3",
            )
            .await?;
        let n = client
            .execute(&statement, &[&key.organization_id, &key.job_id, &owner.0])
            .await?;
        Ok(n == 1)
    }

    /// Publishing a completed job's result failed: let its next delivery publish
    /// it at once instead of waiting for the publish lease to expire.
    pub async fn release_publish(&self, key: &JobKey) -> Result<(), StoreError> {
        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE job_ledger SET lease_until = now(), updated_at = now()
                 WHERE organization_id = $1 AND job_id = $2 AND state = 'completed'",
            )
            .await?;
        client
            .execute(&statement, &[&key.organization_id, &key.job_id])
            .await?;
        Ok(())
    }

    /// Deletes finished ledger entries older than `retention`, `batch` rows per
    /// statement so no statement holds locks for long; rows another replica is
    /// deleting are skipped. Returns how many were deleted.
    pub async fn prune_ledger(&self, retention: Duration, batch: i64) -> Result<u64, StoreError> {
        let client = self.ledger_client().await?;
        // Published entries, then the ones left unfinished (a crashed worker's
        // claim, a result never confirmed, a retry that never came back): past the
        // retention, which is far beyond any job's maximum age, nobody will claim
        // them again, and a stored result that old must not be published for an
        // id reused later. Each kind has its own partial index.
        let mut total = 0;
        for state in ["= 'published'", "<> 'published'"] {
            let statement = client
                .prepare_cached(&format!(
                    "DELETE FROM job_ledger WHERE (organization_id, job_id) IN (
                         SELECT organization_id, job_id FROM job_ledger
                         WHERE state {state} AND updated_at < now() - make_interval(secs => $1::float8)
                         LIMIT $2 FOR UPDATE SKIP LOCKED)"
                ))
                .await?;
            loop {
                let n = client
                    .execute(&statement, &[&retention.as_secs_f64(), &batch])
                    .await?;
                total += n;
                if (n as i64) < batch {
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        Ok(total)
    }

    /// Makes a finished job id claimable again (dead-letter replay with a fresh
    /// budget, claim count included).
    pub async fn reopen_job(&self, key: &JobKey) -> Result<(), StoreError> {
        crate::QueryCounts::bump(&self.counts().ledger_writes);
        let client = self.ledger_client().await?;
        let statement = client
            .prepare_cached(
                "UPDATE job_ledger SET state = 'retrying', result = NULL, lease_until = NULL,
                     claims = 0, updated_at = now()
                 WHERE organization_id = $1 AND job_id = $2",
            )
            .await?;
        client
            .execute(&statement, &[&key.organization_id, &key.job_id])
            .await?;
        Ok(())
    }
}
