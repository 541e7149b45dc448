"""OutputStore: idempotent batched writes; reads scoped by tenant, version, params and as-of."""

from __future__ import annotations

import pytest

from customscripts import db
from customscripts.outputs import OutputRow, OutputStore, params_hash


@pytest.fixture
def store(stack) -> OutputStore:
    return OutputStore(db.pool(stack.pg_dsn))


def _row(uid, t, value, **kw):
    base = dict(time=t, tenant=f"t-{uid}", instrument_key="GOOG", timeframe="1d", script_id=f"s-{uid}",
                version=1, params_hash=params_hash({"n": 14}), value=value)
    return OutputRow(**{**base, **kw})


def test_publishing_the_same_event_twice_leaves_one_row(store, uid):
    rows = [_row(uid, 1000.0 + i, float(i)) for i in range(50)]
    assert store.write_many(rows) == 50
    assert store.write_many([*rows, _row(uid, 2000.0, 99.0)]) == 1
    hist = store.history(f"t-{uid}", f"s-{uid}", "GOOG", "1d", params_hash({"n": 14}), as_of=10_000,
                         limit=500)
    assert len(hist["time"]) == 51 and hist["time"] == sorted(hist["time"])


def test_dict_values_metadata_versions_and_as_of(store, uid):
    store.write_many([
        _row(uid, 100.0, {"upper": 2.0, "lower": 1.0}, metadata={"note": "band"}),
        _row(uid, 200.0, 5.0, version=2),
        _row(uid, 300.0, None, call_id="c1"),
    ])
    key = (f"t-{uid}", f"s-{uid}", "GOOG", "1d", params_hash({"n": 14}))
    assert store.latest(*key, as_of=150) == {"value": {"upper": 2.0, "lower": 1.0}, "timestamp": 100.0,
                                             "metadata": {"note": "band"}, "version": 1}
    assert store.latest(*key, as_of=250)["version"] == 2
    assert store.latest(*key, as_of=250, versions=[1])["timestamp"] == 100.0
    assert store.latest(*key, as_of=99) is None
    assert store.latest(f"other-{uid}", *key[1:], as_of=1e9) is None
    assert store.history(*key, as_of=1e9, start=150)["time"] == [200.0, 300.0]


def test_invalid_ids_never_reach_sql(store, uid):
    from customscripts.errors import Invalid

    with pytest.raises(Invalid):
        store.write_many([_row(uid, 1.0, 1.0, script_id="../x")])


@pytest.mark.parametrize("bad", [dict(version=True), dict(version=1.0), dict(time=float("nan")),
                                 dict(script_id=["s"]), dict(tenant="../t")])
def test_an_invalid_row_after_valid_ones_of_the_same_batch_is_still_refused(store, uid, bad):
    """Each distinct value is checked once per batch: a value equal to a checked one (True == 1 == 1.0)
    or unhashable is checked on its own, and nothing of the batch is written."""
    from customscripts.errors import Invalid

    good = [_row(uid, 1000.0 + i, float(i)) for i in range(3)]
    with pytest.raises((Invalid, ValueError)):
        store.write_many([*good, _row(uid, 1000.0, 9.0, **bad)])
    assert store.history(f"t-{uid}", f"s-{uid}", "GOOG", "1d", params_hash({"n": 14}), as_of=1e9)["time"] == []
