-- A Google Workspace account on a trial has lower sending limits (500 messages
-- and 500 external recipients per 24 h), and nothing Google gives us (the id
-- token's `hd` included) tells it from a paid one: the organization says so.
ALTER TABLE integrations ADD COLUMN google_trial boolean NOT NULL DEFAULT false;
