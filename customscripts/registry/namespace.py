"""Per-tenant script ids: a client-chosen id names a script only inside the caller's tenant.

Why: with one global namespace, creating a script under an id another tenant already uses
answered 409 while reading it answered 404, so anyone could enumerate private ids. Now the id a
client chooses, `X`, becomes the platform-wide id `X-<tag>`, where `<tag>` is the first TAG_LEN
hex digits of a sha256 of the caller's tenant. Two tenants choosing `X` get two different scripts,
so creating `X` answers the same (201, `X-<own tag>`) whether or not another tenant has an `X`:
nothing about other tenants can be learnt from it. Ids the server generates (`s-<hex>`) carry the
tag too.

The platform-wide id is *the* id: function names, object keys, tokens, outputs, Redis keys,
`depends_on` as stored, `get_script_output(...)` inside scripts, and every cross-tenant
(marketplace) reference use it. As a convenience the API also accepts the bare chosen id in paths
and `depends_on`, and resolves it inside the caller's tenant only (`resolve` in
registry/service.py): an own script `X-<own tag>` first, else `X` as a platform-wide id.
"""

from __future__ import annotations

import functools
import hashlib
import secrets

from customscripts import ids
from customscripts.errors import Invalid

TAG_LEN = 12
MAX_ID = 63  # ids.script_id
MAX_CHOSEN_ID = MAX_ID - 1 - TAG_LEN


@functools.lru_cache(maxsize=4096)
def tenant_suffix(tenant: str) -> str:
    """`-<tag>`: what every script id of `tenant` ends with."""
    return "-" + hashlib.sha256(f"customscripts-script-namespace:{tenant}".encode()).hexdigest()[:TAG_LEN]


def qualify(chosen: str, tenant: str) -> str:
    """The platform-wide id of the id `chosen` inside `tenant` (unchanged if it already is one)."""
    sid = ids.script_id(chosen)
    suffix = tenant_suffix(tenant)
    if sid.endswith(suffix):
        return sid
    if len(sid) > MAX_CHOSEN_ID:
        raise Invalid(f"a chosen script id has at most {MAX_CHOSEN_ID} characters "
                      f"(the tenant's {TAG_LEN + 1}-character tag is added)", code="invalid_script_id")
    return sid + suffix


def new_script_id(tenant: str) -> str:
    """A fresh server-chosen id in `tenant`."""
    return qualify("s-" + secrets.token_hex(6), tenant)


def is_own(script_id: str, tenant: str) -> bool:
    """Whether `script_id` is already a platform-wide id of `tenant`'s namespace."""
    return script_id.endswith(tenant_suffix(tenant))
