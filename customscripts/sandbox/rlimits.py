"""Per-child resource limits, applied in the forked child before any user code runs.

Why: RLIMIT_CPU backs up the supervisor's wall-clock kill, RLIMIT_AS turns a memory bomb into
MemoryError, RLIMIT_FSIZE bounds any single file write, RLIMIT_NOFILE stops fd exhaustion, and
RLIMIT_NPROC=0 is a second wall (behind seccomp) against fork and thread bombs. Stdlib only.
"""

from __future__ import annotations

import resource

MB = 1024 * 1024


def current_vm_bytes() -> int:
    """Virtual size of this process now (the zygote baseline the memory budget is added to)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[0])
        return pages * resource.getpagesize()
    except OSError:
        return 0


def apply(*, cpu_seconds: float, memory_mb: int, baseline_vm: int, fsize_mb: int, nofile: int = 16) -> None:
    """Lower every limit (soft and hard). Raising back needs CAP_SYS_RESOURCE, which the child lacks,
    and seccomp additionally denies setrlimit/prlimit64 afterwards."""
    cpu = max(1, int(cpu_seconds + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    as_bytes = baseline_vm + memory_mb * MB
    resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
    fsize = fsize_mb * MB
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0))
