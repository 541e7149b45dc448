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
