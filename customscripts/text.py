"""Text every store can hold. PostgreSQL text and jsonb cannot hold NUL, and UTF-8 (PostgreSQL, S3,
Redis clients) cannot encode a lone surrogate; JSON can carry both (`\\u0000`, `\\ud800`). So what a
caller or a script sends is refused with them (`unstorable`), and text the platform records anyway
(an error message in an audit row or a dead letter) has them replaced (`storable`)."""

from __future__ import annotations

import re
from typing import Any

UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def storable(text: str | None) -> str | None:
    return text if text is None or UNSTORABLE.search(text) is None else UNSTORABLE.sub(REPLACEMENT, text)


def unstorable(value: Any) -> bool:
    """Whether any string in a decoded JSON value, keys included, holds NUL or a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if UNSTORABLE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return False
