-- The hosted settings page ("portal"). The host application asks for a link
-- (server to server); the link is single use and short-lived; opening it starts
-- a browser session bound to one organization. Only SHA-256 hashes of the link
-- token and of the session cookie are kept, so a copy of this table opens nothing.
CREATE TABLE portal_links (
    token_hash      bytea PRIMARY KEY,
    organization_id text NOT NULL,
    return_url      text NOT NULL,
    locale          text,
    product_name    text,
    accent_color    text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    used_at         timestamptz
);

CREATE INDEX portal_links_expires_at ON portal_links (expires_at);

CREATE TABLE portal_sessions (
    session_hash    bytea PRIMARY KEY,
    organization_id text NOT NULL,
    return_url      text NOT NULL,
    locale          text,
    product_name    text,
    accent_color    text,
    -- The synchronizer token every form of this session carries (CSRF). Alone
    -- it opens nothing: the cookie is needed too.
    csrf_token      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL
);

CREATE INDEX portal_sessions_expires_at ON portal_sessions (expires_at);

-- A connect started from the portal is bound to the browser session that
-- started it: its state, then the consent it brought back. Only that session
-- can confirm it (a consent finished in another browser never attaches).
ALTER TABLE oauth_states ADD COLUMN portal_session bytea;
ALTER TABLE pending_connections ADD COLUMN portal_session bytea;

-- Test sends from the portal, for their rate limit per organization.
CREATE TABLE portal_test_sends (
    organization_id text NOT NULL,
    sent_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX portal_test_sends_org ON portal_test_sends (organization_id, sent_at);
