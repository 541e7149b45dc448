"""customscripts: user-written Python indicators run as sandboxed OpenFaaS functions."""

__version__ = "0.1.0"
