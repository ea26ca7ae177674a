"""Shell-style patterns for event types and repository names.

Patterns follow ``fnmatch`` and match case-sensitively. ``*`` also matches
``/``, so ``library/*`` covers ``library/alpine`` and ``library/a/b``; use
``library/*/*`` style patterns to be stricter. An empty pattern list matches
everything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import Final

# Repository names contain lower-case letters, digits, ".", "_", "-" and
# "/"; the rest is fnmatch syntax.
_REPOSITORY_PATTERN: Final = re.compile(r"[a-z0-9._/*?\[\]!-]+")


def check_repository_pattern(pattern: str) -> str:
    """Return ``pattern``, or raise ValueError when it contains a character
    that no repository name contains, such as an upper-case letter, and so
    could never match."""
    if not _REPOSITORY_PATTERN.fullmatch(pattern):
        raise ValueError(
            f"invalid repository pattern {pattern!r}: repository names contain "
            "only lower-case letters, digits, '.', '_', '-' and '/', so it "
            "would match none"
        )
    return pattern


def matches_any(value: str, patterns: Iterable[str]) -> bool:
    """Return True when ``value`` matches one of ``patterns``, or there are none."""
    patterns = tuple(patterns)
    if not patterns:
        return True
    return any(fnmatchcase(value, pattern) for pattern in patterns)
