-- OAuth connect flow: one row per authorization request. The state is single
-- use (consumed_at) and expires; the PKCE verifier is encrypted like tokens.
CREATE TABLE oauth_states (
    state           text PRIMARY KEY,
    organization_id text NOT NULL,
    provider        text NOT NULL CHECK (provider IN ('microsoft', 'google')),
    pkce_verifier   bytea NOT NULL,
    return_to       text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    consumed_at     timestamptz
);

CREATE INDEX oauth_states_expires_at ON oauth_states (expires_at);

-- The scopes the organization consented to: refreshes ask for exactly these
-- (Microsoft refuses scopes beyond the original grant).
ALTER TABLE integrations ADD COLUMN granted_scopes text;
