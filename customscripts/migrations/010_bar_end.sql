-- Bars are visible at their end (customscripts/bartime.py): a bar labelled `time` (its start) is read
-- as of T only when its end <= T, candle-close events carry the bar's end, and outputs and derived
-- metrics are stamped with it. Before this migration reads compared the start, so every stored output
-- and derived metric is stamped one bar early; they move to the bar's end here.

-- bartime.bar_end in SQL (tests/unit/test_bartime.py holds the two equal): fixed timeframes end n
-- units after the start; weeks on the Monday, months on the 1st (00:00 UTC) n units after the
-- bar's own week or month. IMMUTABLE: every zone is explicit.
CREATE OR REPLACE FUNCTION cs_bar_end(start timestamptz, timeframe text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE substring(timeframe FROM '^[0-9]+(mo|s|m|h|d|w)$')
        WHEN 's'  THEN start + make_interval(secs => substring(timeframe FROM '^[0-9]+')::int)
        WHEN 'm'  THEN start + make_interval(mins => substring(timeframe FROM '^[0-9]+')::int)
        WHEN 'h'  THEN start + make_interval(hours => substring(timeframe FROM '^[0-9]+')::int)
        WHEN 'd'  THEN start + make_interval(secs => 86400 * substring(timeframe FROM '^[0-9]+')::int)
        WHEN 'w'  THEN (date_trunc('week', start AT TIME ZONE 'UTC')
                        + make_interval(weeks => substring(timeframe FROM '^[0-9]+')::int)) AT TIME ZONE 'UTC'
        WHEN 'mo' THEN (date_trunc('month', start AT TIME ZONE 'UTC')
                        + make_interval(months => substring(timeframe FROM '^[0-9]+')::int)) AT TIME ZONE 'UTC'
    END
$$;

-- Every candle carries its end; a writer cannot set another one (the trigger computes it).
ALTER TABLE candles ADD COLUMN IF NOT EXISTS end_time timestamptz;

CREATE OR REPLACE FUNCTION cs_candle_end() RETURNS trigger AS $$
BEGIN
    NEW.end_time := cs_bar_end(NEW.time, NEW.timeframe);
    IF NEW.end_time IS NULL THEN
        RAISE EXCEPTION 'invalid timeframe %', NEW.timeframe USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS candles_end_time ON candles;
CREATE TRIGGER candles_end_time BEFORE INSERT OR UPDATE OF time, timeframe, end_time ON candles
    FOR EACH ROW EXECUTE FUNCTION cs_candle_end();

UPDATE candles SET end_time = cs_bar_end(time, timeframe) WHERE end_time IS DISTINCT FROM cs_bar_end(time, timeframe);
ALTER TABLE candles ALTER COLUMN end_time SET NOT NULL;
-- As-of reads: the newest bars whose end is at or before T.
CREATE INDEX IF NOT EXISTS candles_end ON candles (instrument_key, timeframe, end_time);

-- Derived metrics (loader: `source` 'derived from ... candles ...') were stamped with their bar's
-- start; their value needs the bar's close, so it exists at the bar's end. The bar is the candle of
-- the instrument at that time, of the timeframe the source names (one row per metric and time).
-- Rows are moved by delete and re-insert, which hypertables accept across chunks.
CREATE TEMP TABLE metrics_shift ON COMMIT DROP AS
SELECT m.time AS old_time, c.end_time AS new_time, m.instrument_key, m.name
FROM metrics m
JOIN LATERAL (
    SELECT c.end_time FROM candles c
    WHERE c.instrument_key = m.instrument_key AND c.time = m.time
      AND m.source ~ ('[ (]' || c.timeframe || '[ )]|candles ' || c.timeframe || '$')
    ORDER BY c.timeframe LIMIT 1
) c ON true
WHERE m.source LIKE 'derived from %';

CREATE TEMP TABLE metrics_moved ON COMMIT DROP AS
SELECT s.new_time AS time, m.instrument_key, m.name, m.value, m.source
FROM metrics m JOIN metrics_shift s
  ON s.instrument_key = m.instrument_key AND s.name = m.name AND s.old_time = m.time;
DELETE FROM metrics m USING metrics_shift s
WHERE s.instrument_key = m.instrument_key AND s.name = m.name AND s.old_time = m.time;
INSERT INTO metrics (time, instrument_key, name, value, source)
SELECT time, instrument_key, name, value, source FROM metrics_moved
ON CONFLICT DO NOTHING;

-- Script outputs: every row is a realtime publish stamped with its event, the bar's start; it moves
-- to the bar's end (the event time the scheduler now gives, so a redelivered event still finds it).
CREATE TEMP TABLE outputs_moved ON COMMIT DROP AS
SELECT COALESCE(cs_bar_end(time, timeframe), time) AS time, tenant, instrument_key, timeframe, script_id, version, params_hash,
       value, value_json, metadata, status, call_id, created_at
FROM script_outputs;
DELETE FROM script_outputs;
INSERT INTO script_outputs (time, tenant, instrument_key, timeframe, script_id, version, params_hash,
                            value, value_json, metadata, status, call_id, created_at)
SELECT * FROM outputs_moved
ON CONFLICT ON CONSTRAINT script_outputs_event_key DO NOTHING;

-- Dead letters name their evaluation by its event time: the same move, all rows at once (one row's new
-- time is often another's old one, which a row-by-row UPDATE under the unique key would refuse).
CREATE TEMP TABLE dead_letters_moved ON COMMIT DROP AS
SELECT id, at, tenant, user_id, script_id, version, params_hash, instrument_key, timeframe,
       COALESCE(cs_bar_end(event_time, timeframe), event_time) AS event_time, reason, error, attempts, call_id
FROM realtime_dead_letters;
DELETE FROM realtime_dead_letters;
INSERT INTO realtime_dead_letters (id, at, tenant, user_id, script_id, version, params_hash, instrument_key,
                                   timeframe, event_time, reason, error, attempts, call_id)
SELECT * FROM dead_letters_moved
ON CONFLICT ON CONSTRAINT realtime_dead_letters_evaluation DO NOTHING;
