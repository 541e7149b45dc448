-- Script catalog: mirrors what queries need; MinIO holds the code and meta.json.
CREATE TABLE scripts (
    script_id      text PRIMARY KEY,
    owner_id       text NOT NULL,
    tenant         text NOT NULL,
    name           text NOT NULL,
    runtime_mode   text NOT NULL CHECK (runtime_mode IN ('realtime', 'onetime')),
    marketplace    boolean NOT NULL DEFAULT false,
    draft_sha256   text,
    latest_version integer,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX scripts_owner ON scripts (tenant, owner_id);

CREATE TABLE script_versions (
    script_id    text NOT NULL REFERENCES scripts (script_id),
    version      integer NOT NULL CHECK (version > 0),
    code_sha256  text NOT NULL,
    meta_sha256  text NOT NULL,
    status       text NOT NULL CHECK (status IN ('published', 'deprecated')),
    runtime_mode text NOT NULL,
    depends_on   text[] NOT NULL DEFAULT '{}',
    permissions  jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (script_id, version)
);

-- A marketplace subscription lets a user of another tenant run a listed script in their own tenant.
CREATE TABLE marketplace_subscriptions (
    script_id  text NOT NULL REFERENCES scripts (script_id),
    user_id    text NOT NULL,
    tenant     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (script_id, user_id, tenant)
);

-- One row per execution attempt, denied ones included.
CREATE TABLE audit (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    call_id      text,
    script_id    text NOT NULL,
    version      integer,
    user_id      text NOT NULL,
    tenant       text NOT NULL,
    action       text NOT NULL,
    params_hash  text,
    output_hash  text,
    status       text NOT NULL,
    duration_ms  double precision,
    cpu_ms       double precision,
    memory_mb    double precision,
    detail       text
);
CREATE INDEX audit_script ON audit (script_id, at);
