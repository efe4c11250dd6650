-- Whether Microsoft Graph keeps a copy of each notification in the sender's Sent
-- Items (`saveToSentItems`): the organization's choice, off by default as before.
ALTER TABLE integrations ADD COLUMN save_to_sent_items boolean NOT NULL DEFAULT false;
-- What recipients see as the sender (name and address), as learnt when the sender
-- was saved and tested: providers rewrite the From (Exchange shows the directory's
-- display name and rewrites aliases; Gmail replaces an unverified address).
ALTER TABLE integrations ADD COLUMN recipients_see jsonb;
