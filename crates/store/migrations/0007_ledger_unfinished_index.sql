-- Entries left unfinished (a crashed worker's claim, a job whose result was never
-- confirmed, a retry that never came back) are pruned after the retention too;
-- they are few, and this index finds them without a scan of the whole ledger.
CREATE INDEX job_ledger_unfinished_at ON job_ledger (updated_at) WHERE state <> 'published';
