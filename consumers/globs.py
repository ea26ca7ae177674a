"""Shell-style patterns for event types and repository names.

Patterns follow ``fnmatch`` and match case-sensitively. ``*`` also matches
``/``, so ``library/*`` covers ``library/alpine`` and ``library/a/b``; use
``library/*/*`` style patterns to be stricter. An empty pattern list matches
everything.
"""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase


def matches_any(value: str, patterns: Iterable[str]) -> bool:
    """Return True when ``value`` matches one of ``patterns``, or there are none."""
    patterns = tuple(patterns)
    if not patterns:
        return True
    return any(fnmatchcase(value, pattern) for pattern in patterns)
