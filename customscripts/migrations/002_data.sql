-- Market data, metrics and script output history: what the data gateway reads (read-only role)
-- and what the realtime publisher writes. Hypertables when TimescaleDB is installed, plain tables
-- with the same schema otherwise; every unique key includes `time` so both forms accept it.

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
    END IF;
END
$$;

-- OHLCV bars; `time` is the bar's label (its open time, as in the source CSVs). A bar labelled t
-- becomes visible to as-of reads at t, the time its candle-close event carries.
CREATE TABLE IF NOT EXISTS candles (
    instrument_key text NOT NULL,
    timeframe      text NOT NULL,
    time           timestamptz NOT NULL,
    open           double precision NOT NULL,
    high           double precision NOT NULL,
    low            double precision NOT NULL,
    close          double precision NOT NULL,
    volume         double precision NOT NULL,
    PRIMARY KEY (instrument_key, timeframe, time)
);

-- signal_service-shaped metrics; `source` says where a value came from (e.g. derived from candles).
CREATE TABLE IF NOT EXISTS metrics (
    time           timestamptz NOT NULL,
    instrument_key text NOT NULL,
    name           text NOT NULL,
    value          double precision,
    source         text,
    PRIMARY KEY (instrument_key, name, time)
);

-- One row per published script output. Publishing the same event twice leaves one row: the unique
-- key is the event identity (tenant, script version, instrument, timeframe, params, time).
CREATE TABLE IF NOT EXISTS script_outputs (
    time           timestamptz NOT NULL,
    tenant         text NOT NULL,
    instrument_key text NOT NULL,
    timeframe      text NOT NULL,
    script_id      text NOT NULL,
    version        integer NOT NULL,
    params_hash    text NOT NULL,
    value          double precision,
    value_json     jsonb,
    metadata       jsonb NOT NULL DEFAULT '{}'::jsonb,
    status         text NOT NULL DEFAULT 'ok',
    call_id        text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT script_outputs_event_key
        UNIQUE (tenant, script_id, version, instrument_key, timeframe, params_hash, time)
);
-- Reads that do not pin a version (latest of any version of a script) use this one.
CREATE INDEX IF NOT EXISTS script_outputs_latest
    ON script_outputs (tenant, script_id, instrument_key, timeframe, params_hash, time DESC);

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') THEN
        PERFORM create_hypertable('candles', 'time', if_not_exists => TRUE, migrate_data => TRUE);
        PERFORM create_hypertable('metrics', 'time', if_not_exists => TRUE, migrate_data => TRUE);
        PERFORM create_hypertable('script_outputs', 'time', if_not_exists => TRUE, migrate_data => TRUE);
    END IF;
END
$$;
