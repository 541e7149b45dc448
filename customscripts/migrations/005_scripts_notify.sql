-- Every change to a scripts row is announced on channel cs_scripts (payload: the script id), at
-- commit. Registry replicas keep script rows in memory for the execute path and drop a row when it
-- is announced (customscripts/registry/catalog.py, ScriptCache).
CREATE OR REPLACE FUNCTION cs_notify_script_change() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('cs_scripts', COALESCE(NEW.script_id, OLD.script_id));
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS scripts_notify ON scripts;
CREATE TRIGGER scripts_notify AFTER INSERT OR UPDATE OR DELETE ON scripts
    FOR EACH ROW EXECUTE FUNCTION cs_notify_script_change();
