-- Realtime evaluations the platform could not complete (the function failed to answer, the data
-- gateway stayed unavailable, or the function's circuit breaker was open), after their bounded
-- retries: the events were acknowledged, so this row is what is left of each. It names everything
-- needed to evaluate it again. One row per evaluation: a redelivered event that dead-letters again
-- updates it (attempts add up).
CREATE TABLE IF NOT EXISTS realtime_dead_letters (
    id             bigserial PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    tenant         text NOT NULL,
    user_id        text NOT NULL,
    script_id      text NOT NULL,
    version        integer NOT NULL,
    params_hash    text NOT NULL,
    instrument_key text NOT NULL,
    timeframe      text NOT NULL,
    event_time     timestamptz NOT NULL,
    reason         text NOT NULL,  -- invocation_failed | data_source_unavailable | circuit_open
    error          text NOT NULL,
    attempts       integer NOT NULL,
    call_id        text,
    CONSTRAINT realtime_dead_letters_evaluation
        UNIQUE (tenant, script_id, version, params_hash, instrument_key, timeframe, event_time)
);
CREATE INDEX IF NOT EXISTS realtime_dead_letters_tenant ON realtime_dead_letters (tenant, at);
