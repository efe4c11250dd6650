-- Job ids are unique within an organization only: two organizations' producers
-- may well use the same id scheme (`task-991`). Keyed by both, one
-- organization's job id never makes another's a duplicate, and a stored result
-- is only ever published again for the organization it belongs to. The existing
-- rows keep their keys (job_id alone was unique, so the pair is too).
ALTER TABLE job_ledger DROP CONSTRAINT job_ledger_pkey;
ALTER TABLE job_ledger ADD CONSTRAINT job_ledger_pkey PRIMARY KEY (organization_id, job_id);
