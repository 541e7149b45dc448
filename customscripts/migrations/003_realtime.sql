-- Realtime subscriptions: one row per (tenant, user, script version, instrument, timeframe, params).
CREATE TABLE subscriptions (
    id             bigserial PRIMARY KEY,
    tenant         text NOT NULL,
    user_id        text NOT NULL,
    script_id      text NOT NULL REFERENCES scripts (script_id),
    version        integer NOT NULL,
    instrument_key text NOT NULL,
    timeframe      text NOT NULL,
    params         jsonb NOT NULL DEFAULT '{}'::jsonb,
    params_hash    text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT subscriptions_unique
        UNIQUE (tenant, user_id, script_id, version, instrument_key, timeframe, params_hash)
);
-- The scheduler's hot query: who is due on a candle close of (instrument, timeframe).
CREATE INDEX subscriptions_due ON subscriptions (instrument_key, timeframe);
CREATE INDEX subscriptions_version ON subscriptions (script_id, version);
