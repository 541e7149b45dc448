-- Results of one-time executes run with `store: true`, kept apart from `script_outputs`: the realtime
-- publish is the value of record for its event, and a one-time execute (any timestamp a caller picks)
-- must never be able to write it first. One row per (tenant, call id); read back only inside the
-- tenant (GET /executions/{call_id}). The data gateway's read-only role is not granted this table, so
-- no script ever reads a one-time result as another script's output.
CREATE TABLE IF NOT EXISTS onetime_results (
    tenant         text NOT NULL,
    call_id        text NOT NULL,
    user_id        text NOT NULL,
    script_id      text NOT NULL,
    version        integer NOT NULL,
    instrument_key text NOT NULL,
    timeframe      text NOT NULL,
    params_hash    text NOT NULL,
    as_of          timestamptz NOT NULL,
    value          double precision,
    value_json     jsonb,
    metadata       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, call_id)
);
CREATE INDEX IF NOT EXISTS onetime_results_created ON onetime_results (created_at);

-- History written by one-time executes before this migration is moved out of the way of the realtime
-- publish (which would otherwise find it first and keep it, ON CONFLICT DO NOTHING): rows whose call id
-- is a one-time execute's (its audit row) become that call's stored result, and rows stamped after now
-- (no event has happened there yet) are dropped.
INSERT INTO onetime_results (tenant, call_id, user_id, script_id, version, instrument_key, timeframe,
                             params_hash, as_of, value, value_json, metadata, created_at)
SELECT DISTINCT ON (o.tenant, o.call_id) o.tenant, o.call_id, a.user_id, o.script_id, o.version,
       o.instrument_key, o.timeframe, o.params_hash, o.time, o.value, o.value_json, o.metadata, o.created_at
FROM script_outputs o
JOIN audit a ON a.call_id = o.call_id AND a.action = 'execute' AND a.tenant = o.tenant
            AND a.script_id = o.script_id
ORDER BY o.tenant, o.call_id, o.time
ON CONFLICT (tenant, call_id) DO NOTHING;
DELETE FROM script_outputs o
USING audit a
WHERE a.call_id = o.call_id AND a.action = 'execute' AND a.tenant = o.tenant AND a.script_id = o.script_id;
DELETE FROM script_outputs WHERE time > now();
