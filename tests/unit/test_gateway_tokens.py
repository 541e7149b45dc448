"""Execution tokens: signed scope of one execution; anything expired, tampered or foreign is 401."""

from __future__ import annotations

import base64
import json

import jwt
import pytest

from customscripts.config import settings
from customscripts.errors import Invalid, Unauthenticated
from customscripts.gateway.tokens import mint_execution_token, verify_execution_token
from customscripts.outputs import params_hash


def _mint(**overrides):
    args = dict(user="alice", tenant="acme", script_id="rsi-x", version=3, deps=["ema@2", "vol"],
                as_of=1_700_000_000.5, tier="pro")
    args.update(overrides)
    return mint_execution_token(**args)


def test_round_trip_carries_the_execution_scope():
    claims = verify_execution_token(_mint(call_id="c-1"))
    assert (claims.user, claims.tenant, claims.script_id, claims.version) == ("alice", "acme", "rsi-x", 3)
    assert claims.deps == ("ema@2", "vol") and claims.as_of == 1_700_000_000.5 and claims.tier == "pro"
    assert claims.call_id == "c-1"


def test_readable_versions_follow_the_closure_and_include_the_script_itself():
    claims = verify_execution_token(_mint())
    assert claims.readable_versions("ema") == [2]
    assert claims.readable_versions("vol") is None  # bare id: any version
    assert claims.readable_versions("rsi-x") == [3]
    with pytest.raises(LookupError):
        claims.readable_versions("other")


def test_expired_token_is_rejected():
    token = _mint(ttl_s=10, now=1_000.0)
    with pytest.raises(Unauthenticated) as err:
        verify_execution_token(token)
    assert err.value.code == "token_expired"


def test_tampered_payload_is_rejected():
    header, payload, signature = _mint().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["tenant"] = "victim"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(Unauthenticated) as err:
        verify_execution_token(f"{header}.{forged}.{signature}")
    assert err.value.code == "invalid_token"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_token_signed_with_another_secret_or_audience_is_rejected():
    cfg = settings()
    user_token = jwt.encode({"sub": "alice", "tenant": "acme", "tier": "pro", "exp": 4_000_000_000},
                            cfg.jwt_secret, algorithm="HS256")
    for token in (user_token, "", "not-a-jwt", _mint().replace(".", "x", 1)):
        with pytest.raises(Unauthenticated):
            verify_execution_token(token)


def test_alg_none_is_rejected():
    unsigned = jwt.encode({"sub": "alice", "aud": "customscripts-gateway"}, None, algorithm="none")
    with pytest.raises(Unauthenticated):
        verify_execution_token(unsigned)


def test_minting_validates_ids():
    with pytest.raises(Invalid):
        _mint(script_id="../etc")
    with pytest.raises(Invalid):
        _mint(deps=["ok@0"])


def test_params_hash_is_canonical_and_short():
    assert params_hash({"a": 1, "b": [1, 2]}) == params_hash({"b": [1, 2], "a": 1})
    assert params_hash(None) == params_hash({}) != params_hash({"a": 1})
    assert len(params_hash({})) == 16


@pytest.mark.parametrize("as_of", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_as_of_is_never_signed(as_of: float) -> None:
    """An as-of time of NaN or infinity would defeat the gateway's clamp: it is refused at minting."""
    with pytest.raises(ValueError, match="finite"):
        mint_execution_token(user="u", tenant="t", script_id="s", version=1, deps=[], as_of=as_of, tier="pro")
