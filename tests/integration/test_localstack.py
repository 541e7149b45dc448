"""The local stack: every service answers over a real connection, and data survives a restart."""

from __future__ import annotations

import io

import psycopg
import redis
from minio import Minio

from customscripts.local import stack as localstack


def test_every_service_is_healthy(stack):
    report = localstack.status(stack)
    assert {name: s["healthy"] for name, s in report.items()} == {
        "postgres": True, "redis": True, "nats": True, "s3": True, "provider": True}


def test_migrations_are_recorded_once(stack):
    from customscripts import db

    assert db.migrate(stack) == []  # already applied by `up`
    with psycopg.connect(stack.pg_dsn) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
    assert names == sorted(set(names)) and "001_registry.sql" in names


def test_redis_data_survives_restart(stack, uid):
    r = redis.Redis(host=stack.redis_host, port=stack.redis_port)
    r.set(f"test:persist:{uid}", "kept")
    r.save()
    localstack.down(stack, only={"redis"})
    localstack.up(stack, only={"redis"})
    r = redis.Redis(host=stack.redis_host, port=stack.redis_port)
    assert r.get(f"test:persist:{uid}") == b"kept"


def test_s3_and_postgres_data_survive_restart(stack, uid):
    client = Minio(stack.s3_endpoint, access_key=stack.s3_access_key, secret_key=stack.s3_secret_key,
                   secure=stack.s3_secure)
    client.put_object(stack.s3_bucket, f"test/{uid}.txt", io.BytesIO(b"kept"), 4)
    with psycopg.connect(stack.pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS test_persist (k text PRIMARY KEY)")
        conn.execute("INSERT INTO test_persist VALUES (%s)", (uid,))
    localstack.down(stack, only={"s3", "postgres"})
    assert localstack.status(stack)["postgres"]["pid"] is None
    localstack.up(stack, only={"s3", "postgres"})
    assert client.get_object(stack.s3_bucket, f"test/{uid}.txt").read() == b"kept"
    with psycopg.connect(stack.pg_dsn) as conn:
        assert conn.execute("SELECT k FROM test_persist WHERE k = %s", (uid,)).fetchone() == (uid,)


def test_s3_rejects_wrong_credentials(stack):
    import pytest
    from minio.error import S3Error

    client = Minio(stack.s3_endpoint, access_key="intruder", secret_key="wrong-secret-key", secure=False)
    with pytest.raises(S3Error):
        client.list_objects(stack.s3_bucket).__next__()
