"""Image build time per script version with podman, first and cached, next to a plain container start.

Builds script versions from their shrinkwrapped contexts the way publish does (`PodmanBuilder`: offline
base image, wheelhouse, no network, nothing pulled): the first with every layer built again (`--no-cache`:
a machine with the base image and the wheelhouse but no layers), then new versions of the same script
with the layer cache (only the code layers change). Same-run baseline: `podman run --rm <base> true`.
Also times the base image and the wheelhouse when this run has to make them. Prints a table; no assertions.
Run: .venv/bin/python bench/bench_image_build.py [--versions 5] [--first 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from customscripts.faas import images
from customscripts.faas.builder import PodmanBuilder, image_for_context
from tests.integration.image_support import script_context

SCRIPT = "import numpy as np\n\ndef run(ctx):\n    return float(np.mean(get_market_data(limit=200).close[-20:]))\n"


def meta(version: int) -> dict:
    return {"script_id": "bench-img-0123456789ab", "version": version, "owner_id": "bench", "tenant": "bench",
            "name": "bench", "runtime_mode": "onetime", "status": "published", "tier": "pro",
            "code_sha256": "0" * 64, "permissions": {}, "input_schema": {}, "output_schema": {}, "depends_on": []}


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--versions", type=int, default=5, help="cached builds (new versions of one script)")
    ap.add_argument("--first", type=int, default=2, help="first builds (every layer built again)")
    ap.add_argument("--baseline-runs", type=int, default=5)
    args = ap.parse_args(argv)

    status = images.probe(build_base=False)
    engine = images.find_engine()
    base = images.base_image_ref()
    base_s = None
    if not engine.image_exists(base):
        base_s = timed(lambda: images.ensure_base_image(engine, progress=print))
        status = images.probe(fresh=True, build_base=False)
    if not status.usable:
        print(f"no container engine can run here: {status.reason}")
        return 1
    run = engine.run_command("--rm", "--network", "none", "--read-only", base, "true")
    baseline = [timed(lambda: subprocess.run(run, check=True, capture_output=True))
                for _ in range(args.baseline_runs)]

    made: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-img-") as tmp:
        root = Path(tmp)
        first_ctx = script_context(meta(1)["script_id"], 1, SCRIPT, meta(1), root)
        wheels_s = timed(lambda: images.ensure_wheelhouse(images.requirements_of(first_ctx), engine=engine,
                                                          image=base))
        first = []
        for n in range(args.first):
            image = image_for_context(first_ctx).replace(":", f"-first{n}:")
            first.append(PodmanBuilder(engine, no_cache=True).build(first_ctx, image).duration_s)
            made.append(image)
        cached = []
        for version in range(2, 2 + args.versions):
            source = SCRIPT + f"# version {version} {time.time_ns()}\n"
            ctx = script_context(meta(version)["script_id"], version, source, meta(version), root)
            outcome = PodmanBuilder(engine).build(ctx, image_for_context(ctx))
            cached.append(outcome.duration_s)
            made.append(outcome.image)
    subprocess.run(engine.command("rmi", "--force", *made), capture_output=True)

    def ms(values: list[float]) -> str:
        return f"p50 {statistics.median(values) * 1000:,.0f} ms (min {min(values) * 1000:,.0f}, " \
               f"max {max(values) * 1000:,.0f}, n={len(values)})"

    print(f"engine: {engine.name} ({' '.join(engine.runtime_flags())}); base image {base}")
    print(f"base image made in this run: {f'{base_s:.1f} s' if base_s is not None else 'no (present)'}")
    print(f"wheelhouse (script requirements): {wheels_s:.1f} s "
          f"{'(present: a lookup)' if wheels_s < 1 else '(made in this run)'}")
    print(f"{'baseline: podman run --rm base true':<48} {ms(baseline)}")
    print(f"{'first build of a version (--no-cache)':<48} {ms(first)}")
    print(f"{'build of a new version (layer cache)':<48} {ms(cached)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
