-- A provider's 429 pauses that mailbox for every replica: the pause is stored
-- here and announced with NOTIFY so each worker's pacer learns it at once.
CREATE TABLE mailbox_pauses (
    organization_id text PRIMARY KEY,
    paused_until    timestamptz NOT NULL,
    reason          text NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION mail_dispatch_notify_pause() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('mail_dispatch_pause',
                      NEW.organization_id || ' ' || (extract(epoch FROM NEW.paused_until) * 1000)::bigint);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER mailbox_pauses_notify
    AFTER INSERT OR UPDATE ON mailbox_pauses
    FOR EACH ROW EXECUTE FUNCTION mail_dispatch_notify_pause();

-- What each mailbox sent per UTC day, summed over replicas (daily sending limits).
CREATE TABLE mailbox_daily (
    organization_id text NOT NULL,
    day             date NOT NULL,
    sent            integer NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, day)
);
