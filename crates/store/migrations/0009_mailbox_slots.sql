-- Graph allows a few concurrent requests per app and mailbox, whatever the
-- number of processes sending: each replica takes one of the mailbox's slots
-- (a lease) for the time of a send. A row per (mailbox, slot), created on first
-- use; a slot whose lease expired (its holder crashed, or released it) is free.
CREATE TABLE mailbox_slots (
    organization_id text NOT NULL,
    slot            integer NOT NULL,
    -- A random number per lease: a holder whose lease ran out and was taken
    -- over can neither extend nor release the new holder's.
    holder          bigint NOT NULL,
    expires_at      timestamptz NOT NULL,
    PRIMARY KEY (organization_id, slot)
);
