-- A token refresh in progress. Whoever sets refresh_holder (a fresh id per
-- refresh) may call the provider's token endpoint until refreshing_until, outside
-- any transaction, and then stores what it got only if it still holds the lease.
-- Others use the stored token once the holder stored it, or take over once the
-- lease expired (its holder died). No connection or row lock is held meanwhile.
ALTER TABLE integrations ADD COLUMN refreshing_until timestamptz;
ALTER TABLE integrations ADD COLUMN refresh_holder text;

-- Taking or releasing a lease changes nothing a cache holds: no notification
-- (every replica would otherwise forget the organization's route and token).
CREATE OR REPLACE FUNCTION mail_dispatch_notify_integration() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND to_jsonb(OLD) - 'refreshing_until' - 'refresh_holder'
         = to_jsonb(NEW) - 'refreshing_until' - 'refresh_holder' THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('mail_dispatch_integration',
                      CASE WHEN TG_OP = 'DELETE' THEN OLD.organization_id ELSE NEW.organization_id END);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
