-- Both providers count their sending limits over a rolling 24 hours, not per
-- calendar day: what each mailbox sent is kept in short time buckets (a 288th
-- of the window: 5 minutes for 24 h), one row per mailbox, counter and bucket,
-- summed over the buckets still in the window. Replaces the per-UTC-day count.
DROP TABLE mailbox_daily;

CREATE TABLE mailbox_sends (
    organization_id text NOT NULL,
    -- 0 recipients, 1 messages, 2 external recipients (see the worker's pacer).
    counter         smallint NOT NULL,
    bucket          timestamptz NOT NULL,
    units           integer NOT NULL,
    PRIMARY KEY (organization_id, counter, bucket)
);
-- For pruning the buckets that left the window.
CREATE INDEX mailbox_sends_bucket ON mailbox_sends (bucket);

-- An organization may keep part of its mailbox's limits for the people who also
-- send from it: the share (percent) of each provider limit mail-dispatch may use.
ALTER TABLE integrations ADD COLUMN limit_percent smallint NOT NULL DEFAULT 100
    CHECK (limit_percent BETWEEN 1 AND 100);
