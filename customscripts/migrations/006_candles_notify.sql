-- Every change to candles is announced on channel cs_candles (payload: instrument_key|timeframe),
-- at commit, once per series and transaction (PostgreSQL folds identical notifications). The data
-- gateway keeps market windows in memory and drops a series' windows when it is announced
-- (customscripts/gateway/api.py). Row-level, because TimescaleDB hypertables take no transition tables.
CREATE OR REPLACE FUNCTION cs_notify_candle_change() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('cs_candles', OLD.instrument_key || '|' || OLD.timeframe);
    ELSE
        PERFORM pg_notify('cs_candles', NEW.instrument_key || '|' || NEW.timeframe);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS candles_notify ON candles;
CREATE TRIGGER candles_notify AFTER INSERT OR UPDATE OR DELETE ON candles
    FOR EACH ROW EXECUTE FUNCTION cs_notify_candle_change();
