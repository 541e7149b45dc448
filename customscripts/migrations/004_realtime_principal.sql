-- The subscriber's claims (tier, features, teams, orgs) as of subscribing: the scheduler re-checks
-- permissions with them on every evaluation, so entitlement changes on the script side (allowed
-- users, teams, marketplace) take effect on the next event. Re-subscribing refreshes them.
ALTER TABLE subscriptions ADD COLUMN IF NOT EXISTS principal jsonb NOT NULL DEFAULT '{}'::jsonb;
CREATE INDEX IF NOT EXISTS subscriptions_user ON subscriptions (tenant, user_id);
