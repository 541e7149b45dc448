"""The sandboxed execution engine (issue 3).

Trusted side: Supervisor, SandboxLimits, ExecutionRequest/ExecutionResult, DataSource.
Sandboxed side (imported inside bubblewrap): zygote, runtime, imports, rlimits, seccomp, protocol.
Exports are resolved lazily so that importing `customscripts.sandbox.zygote` inside the sandbox never
pulls in configuration, pydantic or jsonschema.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataSource": "datasource", "DependencyUnavailable": "datasource", "DataAccessError": "datasource",
    "DataDenied": "datasource", "ExecutionResult": "results", "SandboxLimits": "limits",
    "Supervisor": "supervisor", "ExecutionRequest": "supervisor", "IsolationUnavailable": "supervisor",
    "SampleDataSource": "sampledata",
}

__all__ = ["DataAccessError", "DataDenied", "DataSource", "DependencyUnavailable", "ExecutionRequest",
           "ExecutionResult", "IsolationUnavailable", "SampleDataSource", "SandboxLimits", "Supervisor"]

if TYPE_CHECKING:
    from .datasource import DataAccessError, DataDenied, DataSource, DependencyUnavailable
    from .limits import SandboxLimits
    from .results import ExecutionResult
    from .sampledata import SampleDataSource
    from .supervisor import ExecutionRequest, IsolationUnavailable, Supervisor


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
