"""Shared fixtures. `stack` brings the real local stack up once per run (reused if already up)."""

from __future__ import annotations

import uuid

import pytest

from customscripts.config import Settings, settings


@pytest.fixture(scope="session")
def stack() -> Settings:
    """Real PostgreSQL, Redis, NATS and S3 on loopback, started by the same code as `customscripts up`."""
    from customscripts.local import stack as localstack

    cfg = settings()
    localstack.up(cfg)
    return cfg


@pytest.fixture(scope="module")
def api(stack: Settings) -> str:
    """The public API's URL (registry-fn behind the provider), with the sample market data loaded."""
    from customscripts.marketdata.loader import load_sample_data

    load_sample_data(stack, echo=lambda _msg: None)
    return stack.registry_url


@pytest.fixture
def uid() -> str:
    """A fresh suffix so tests never see each other's scripts, users or tenants."""
    return uuid.uuid4().hex[:10]
