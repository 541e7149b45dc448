"""One CPU group per tenant for the local provider's script functions.

Why: on a cluster every script function is a pod whose CPU the scheduler places by its request and
caps by its limit, so one tenant's spinning scripts cannot take the CPU other tenants' executions
need. Local processes have no such bound, and the kernel's autogroups make it worse: every sandbox
runs in a session of its own, so eight spinning sandboxes weigh as much as eight platform processes.
Here each tenant's functions (supervisor, zygote, children: the whole process tree) share one
control group of CPU weight `CS_TENANT_CPU_SHARES`, so under contention a tenant gets one tenant's
share however many functions it keeps busy, and when the machine is idle a tenant still uses it all.

cgroup v1 (`cpu.shares`) and v2 (`cpu.weight`) are both handled; where neither can be written (not
root, no delegation) the provider says so once and functions run without (`tenant_group` returns None).
It lives here, not in customscripts/local/, because the function side (`join`, called by faas/runner.py
when the provider names a group in CS_CPU_GROUP) runs from the build context, which has no local/.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

V1_CPU = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")
PREFIX = "customscripts-tenant-"


def _v1() -> bool:
    return (V1_CPU / "cpu.shares").exists()


def _v2() -> bool:
    try:
        return "cpu" in (V2_ROOT / "cgroup.controllers").read_text().split()
    except OSError:
        return False


def tenant_group(tenant: str, shares: int) -> Path | None:
    """The tenant's group (created on first use), or None when no CPU controller can be written."""
    name = PREFIX + hashlib.sha256(tenant.encode()).hexdigest()[:16]
    try:
        if _v1():
            group = V1_CPU / name
            group.mkdir(exist_ok=True)
            (group / "cpu.shares").write_text(str(int(shares)))
            return group
        if _v2():
            (V2_ROOT / "cgroup.subtree_control").write_text("+cpu")
            group = V2_ROOT / name
            group.mkdir(exist_ok=True)
            (group / "cpu.weight").write_text(str(max(1, min(10_000, int(shares) * 100 // 1024))))
            return group
    except OSError:
        return None
    return None


def join(group: str) -> None:
    """Move this process into `group` (before it starts anything: children inherit it)."""
    with open(os.path.join(group, "cgroup.procs"), "w") as fh:
        fh.write(str(os.getpid()))
