-- A published version's image build (customscripts/faas/buildqueue.py): publish queues it in the same
-- transaction (when a builder is configured), a worker claims it (queued -> building, with a lease so a
-- build whose worker died is claimed again), and it ends built (the image ref) or failed (the log),
-- retried up to CS_BUILD_ATTEMPTS. NULL status: no image is tracked (no builder, or published before).
ALTER TABLE script_versions ADD COLUMN IF NOT EXISTS build_status text
    CHECK (build_status IN ('queued', 'building', 'built', 'failed'));
ALTER TABLE script_versions ADD COLUMN IF NOT EXISTS build_image text;
ALTER TABLE script_versions ADD COLUMN IF NOT EXISTS build_log text;
ALTER TABLE script_versions ADD COLUMN IF NOT EXISTS build_attempts integer NOT NULL DEFAULT 0;
ALTER TABLE script_versions ADD COLUMN IF NOT EXISTS build_queued_at timestamptz;
ALTER TABLE script_versions ADD COLUMN IF NOT EXISTS build_started_at timestamptz;
ALTER TABLE script_versions ADD COLUMN IF NOT EXISTS build_finished_at timestamptz;
ALTER TABLE script_versions ADD COLUMN IF NOT EXISTS build_lease_until timestamptz;
CREATE INDEX IF NOT EXISTS script_versions_build_queue ON script_versions (build_queued_at)
    WHERE build_status IN ('queued', 'building');
