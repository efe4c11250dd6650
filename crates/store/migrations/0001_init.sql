-- Per-organization provider integrations. Tokens are AES-256-GCM ciphertexts
-- (see cipher.rs); token_key_id names the key that encrypted them, so a key
-- rotation can find the rows still under an older key.
CREATE TABLE integrations (
    organization_id         text PRIMARY KEY,
    provider                text NOT NULL CHECK (provider IN ('microsoft', 'google')),
    status                  text NOT NULL CHECK (status IN ('pending_sender', 'active', 'needs_reauth')),
    account_email           text,
    sender_email            text,
    sender_name             text,
    fallback                text NOT NULL DEFAULT 'none' CHECK (fallback IN ('none', 'platform_sender')),
    -- Once active, an organization never silently falls back to the platform sender.
    ever_active             boolean NOT NULL DEFAULT false,
    refresh_token           bytea,
    access_token            bytea,
    access_token_expires_at timestamptz,
    token_key_id            text,
    connected_at            timestamptz NOT NULL DEFAULT now(),
    last_test_at            timestamptz,
    last_test               jsonb,
    last_error              text,
    updated_at              timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION mail_dispatch_notify_integration() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('mail_dispatch_integration',
                      CASE WHEN TG_OP = 'DELETE' THEN OLD.organization_id ELSE NEW.organization_id END);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER integrations_notify
    AFTER INSERT OR UPDATE OR DELETE ON integrations
    FOR EACH ROW EXECUTE FUNCTION mail_dispatch_notify_integration();

-- The idempotency ledger: one row per job id.
--   claimed   a worker is sending it, until lease_until
--   retrying  waiting in a delay queue; the next delivery may claim it
--   completed the outcome is known (result), its result not yet confirmed published
--   published the result was confirmed by the broker: nothing more to do
CREATE TABLE job_ledger (
    job_id          text PRIMARY KEY,
    organization_id text NOT NULL,
    state           text NOT NULL CHECK (state IN ('claimed', 'retrying', 'completed', 'published')),
    lease_until     timestamptz,
    claims          integer NOT NULL DEFAULT 1,
    result          jsonb,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX job_ledger_finished_at ON job_ledger (updated_at) WHERE state = 'published';
