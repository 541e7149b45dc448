"""The local provider's container runtime: a published script served through `POST /execute` by a
container of its own image, and the container's layers attacked from inside it.

The stack's provider is restarted with CS_PROVIDER_RUNTIME=container for this module (registry-fn and
gateway-fn then run as containers of their images too) and back in process mode afterwards. Skipped,
with the reason printed, only where no container engine can run a container.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator

import pytest

from customscripts.bartime import bar_end
from customscripts.config import Settings
from customscripts.faas import images
from customscripts.faas.naming import function_name
from customscripts.local import containers
from customscripts.local import stack as localstack
from customscripts.marketdata.loader import read_csv, sample_csv
from tests.integration.registry_support import Caller
from tests.integration.test_execute_e2e import AS_OF, RSI_SCRIPT, reference_rsi

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def container_stack(stack: Settings, api: str) -> Iterator[images.Engine]:
    status = images.probe()
    if not status.usable:
        print(f"container runtime not tested: {status.reason}")
        pytest.skip(f"no container engine can run here: {status.reason}")
    assert status.engine is not None
    localstack.down(stack, only={"provider"})
    os.environ["CS_PROVIDER_RUNTIME"] = "container"
    try:
        localstack.up(stack, only={"provider"})
        yield status.engine
    finally:
        localstack.down(stack, only={"provider"})
        os.environ.pop("CS_PROVIDER_RUNTIME", None)
        localstack.up(stack, only={"provider"})


def _container(engine: images.Engine, function: str) -> dict:
    names = subprocess.run(engine.command("ps", "--filter", f"label={containers.LABEL}", "--format",
                                          "{{.Names}}"), capture_output=True, text=True, check=True).stdout.split()
    matching = [n for n in names if n.endswith(f"-{function}")]
    assert matching, f"no container of {function} among {names}"
    out = subprocess.run(engine.command("inspect", matching[0]), capture_output=True, text=True, check=True)
    return json.loads(out.stdout)[0]


def _exec(engine: images.Engine, name: str, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(engine.command("exec", name, "python", "-c", code), capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def published(container_stack: images.Engine, api: str) -> tuple[Caller, str, str]:
    caller = Caller(api, "ctr-user", "ctr-tenant")
    sid = caller.sid("ctr-rsi-" + os.urandom(3).hex())
    caller.create_published(sid, RSI_SCRIPT)
    return caller, sid, function_name(sid, 1)


def test_execute_is_served_by_the_versions_container(container_stack: images.Engine,
                                                      published: tuple[Caller, str, str]) -> None:
    caller, sid, fn = published
    resp = caller.call("POST", f"/scripts/{sid}/execute",
                       {"instrument_key": "GOOG", "timeframe": "1d", "timestamp": AS_OF, "params": {"period": 14}})
    assert resp.status_code == 200, resp.text
    # the bars that have closed by AS_OF (customscripts/bartime.py)
    bars = [row for row in read_csv(sample_csv("GOOG.csv")) if bar_end(row.time.timestamp(), "1d") <= AS_OF][-200:]
    expected = reference_rsi([float(row.close) for row in bars], 14)
    assert resp.json()["output"]["value"] == pytest.approx(expected, abs=1e-9)
    info = _container(container_stack, fn)
    host = info["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["NetworkMode"] == "none"
    assert host["Memory"] > 0 and host["NanoCpus"] > 0
    assert info["Config"]["User"].split(":")[0] not in ("", "0", "root")


def test_a_script_container_reaches_nothing_but_its_sockets(container_stack: images.Engine,
                                                            published: tuple[Caller, str, str]) -> None:
    """From inside the container (the layer below the sandbox): no network, no writable root, no root user."""
    info = _container(container_stack, published[2])
    name = info["Name"].lstrip("/")
    probe = _exec(container_stack, name, (
        "import os, socket, json\n"
        "out = {'uid': os.getuid()}\n"
        "for host, port in [('127.0.0.1', 54329), ('127.0.0.1', 8080), ('1.1.1.1', 53)]:\n"
        "    s = socket.socket(); s.settimeout(2)\n"
        "    try:\n"
        "        s.connect((host, port)); out[f'{host}:{port}'] = 'open'\n"
        "    except OSError as e:\n"
        "        out[f'{host}:{port}'] = type(e).__name__\n"
        "for path in ['/home/app/x', '/etc/x', '/home/app/function/script.py']:\n"
        "    try:\n"
        "        open(path, 'a').close(); out[path] = 'written'\n"
        "    except OSError as e:\n"
        "        out[path] = e.errno\n"
        "out['interfaces'] = sorted(n for _, n in socket.if_nameindex())\n"
        "out['sockets'] = sorted(os.listdir('/run/cs'))\n"
        "print(json.dumps(out))\n"))
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert seen["uid"] != 0
    assert all(seen[k] != "open" for k in ("127.0.0.1:54329", "127.0.0.1:8080", "1.1.1.1:53")), seen
    assert all(seen[k] != "written" for k in ("/home/app/x", "/etc/x", "/home/app/function/script.py")), seen
    assert seen["interfaces"] == ["lo"], seen  # --network none: loopback only, nothing routes out
    assert seen["sockets"] == [containers.FUNCTION_SOCKET, "gateway-fn.sock"], seen
