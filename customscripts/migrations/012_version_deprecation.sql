-- Deprecating a published version (issue 16): no new subscriptions to it, running ones go on and the
-- listing shows it. A column beside the immutable version row, not its `status`: the permission
-- check reads `status = 'published'`, and a deprecated version stays usable by those already on it.
ALTER TABLE script_versions ADD COLUMN IF NOT EXISTS deprecated_at timestamptz;
ALTER TABLE script_versions ADD COLUMN IF NOT EXISTS deprecation_reason text;

-- GET /scripts pages through a tenant's scripts in id order.
CREATE INDEX IF NOT EXISTS scripts_tenant_id_idx ON scripts (tenant, script_id);
