-- Which account a grant belongs to, in the provider's stable ids: Microsoft's
-- object id (oid) and tenant id (tid); Google's subject (sub) and Workspace
-- domain (hd, null for consumer accounts). A reconnect to another account is
-- told apart by these, not by the address.
ALTER TABLE integrations ADD COLUMN account_id text;
ALTER TABLE integrations ADD COLUMN account_tenant text;
-- When the grant was last refreshed (or obtained): the keep-alive refreshes
-- grants idle for too long, before the provider expires them for inactivity.
ALTER TABLE integrations ADD COLUMN last_refreshed_at timestamptz;
UPDATE integrations SET last_refreshed_at = updated_at;

-- A state is issued either for the user's consent (connect) or for a tenant
-- administrator's consent (Microsoft's adminconsent endpoint: no code comes back).
ALTER TABLE oauth_states ADD COLUMN purpose text NOT NULL DEFAULT 'connect'
    CHECK (purpose IN ('connect', 'admin_consent'));

-- Grants received by the callback, waiting for the host application to confirm
-- them in the admin's own session (POST …/integration/confirm). Until then they
-- are not used; unconfirmed ones expire and are revoked where the provider allows.
-- The one-time `connection` value is kept as its SHA-256 only.
CREATE TABLE pending_connections (
    connection_hash         bytea PRIMARY KEY,
    organization_id         text NOT NULL,
    provider                text NOT NULL CHECK (provider IN ('microsoft', 'google')),
    account_email           text NOT NULL,
    account_id              text,
    account_tenant          text,
    granted_scopes          text,
    refresh_token           bytea NOT NULL,
    access_token            bytea,
    access_token_expires_at timestamptz,
    created_at              timestamptz NOT NULL DEFAULT now(),
    expires_at              timestamptz NOT NULL,
    confirmed_at            timestamptz
);

CREATE INDEX pending_connections_expires_at ON pending_connections (expires_at);
