-- A claim has an owner: every claim (a new row, a take-over, a claim after a
-- retry) draws a fresh `claim_id`, which the claimer keeps. Completing,
-- releasing and extending a claim check it, so a worker whose lease ran out and
-- whose job another delivery took over can no longer record, release or extend
-- anything of the job (fencing). The sequence makes owners unique. Rows from
-- before this migration keep a NULL owner
-- (a volatile default on ADD COLUMN would rewrite the whole table under an
-- exclusive lock): they match no owner, so only a take-over after their lease
-- (which draws an owner) can finish them.
CREATE SEQUENCE job_ledger_claim_id_seq AS bigint;
ALTER TABLE job_ledger ADD COLUMN claim_id bigint;
ALTER TABLE job_ledger ALTER COLUMN claim_id SET DEFAULT nextval('job_ledger_claim_id_seq');
ALTER SEQUENCE job_ledger_claim_id_seq OWNED BY job_ledger.claim_id;

-- `ambiguous`: a send was at the provider when its worker had to drop it (the
-- shutdown grace ran out): the provider may have accepted the message. A later
-- delivery does not send it again; it fails the job with a result that says so
-- (see the README, "paths that can send twice").
ALTER TABLE job_ledger DROP CONSTRAINT job_ledger_state_check;
ALTER TABLE job_ledger ADD CONSTRAINT job_ledger_state_check
    CHECK (state IN ('claimed', 'retrying', 'completed', 'published', 'ambiguous'));
