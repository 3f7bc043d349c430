"""Public ids: random, URL-safe tokens with a kind prefix (`file-…`, `ftjob-…`)."""

from __future__ import annotations

import re

# What new_id() makes, with room to spare; anything else names no object and is never looked up.
_PLAUSIBLE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def looks_like_id(value: object) -> bool:
    """Whether `value` could be an object id (so text with NULs or paths never reaches a query)."""
    return isinstance(value, str) and bool(_PLAUSIBLE_ID.fullmatch(value))
