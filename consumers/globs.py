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
# Characters allowed outside a pattern's bracket expressions. fnmatch reads
# "[", "]" and "!" there as themselves, and no repository name contains them.
_OUTSIDE_BRACKETS: Final = re.compile(r"[a-z0-9._/*?-]*")


def check_repository_pattern(pattern: str) -> str:
    """Return ``pattern``, or raise ValueError when it contains a character
    that no repository name contains, such as an upper-case letter, or a "["
    without its "]", either of which makes it match no name. Other patterns
    that match nothing, such as "[z-a]", pass."""
    if not _REPOSITORY_PATTERN.fullmatch(pattern):
        raise ValueError(
            f"invalid repository pattern {pattern!r}: repository names contain "
            "only lower-case letters, digits, '.', '_', '-' and '/', so it "
            "would match none"
        )
    outside = _without_brackets(pattern)
    if outside is None:
        raise ValueError(
            f"invalid repository pattern {pattern!r}: a '[' has no closing ']', "
            "so it would match none. Close the set, as in 'team-[ab]/*'"
        )
    if not _OUTSIDE_BRACKETS.fullmatch(outside):
        raise ValueError(
            f"invalid repository pattern {pattern!r}: ']' and '!' are only "
            "special inside a '[...]' set, and no repository name contains "
            "them, so it would match none"
        )
    return pattern


def _without_brackets(pattern: str) -> str | None:
    """Return ``pattern`` without its bracket expressions, as fnmatch parses
    them, or None when a "[" has no closing "]".

    As in fnmatch, a "]" right after "[" or "[!" is part of the set.
    """
    outside = []
    index = 0
    while index < len(pattern):
        if pattern[index] != "[":
            outside.append(pattern[index])
            index += 1
            continue
        end = index + 1
        if pattern.startswith("!", end):
            end += 1
        if pattern.startswith("]", end):
            end += 1
        end = pattern.find("]", end)
        if end == -1:
            return None
        index = end + 1
    return "".join(outside)


def matches_any(value: str, patterns: Iterable[str]) -> bool:
    """Return True when ``value`` matches one of ``patterns``, or there are none."""
    patterns = tuple(patterns)
    if not patterns:
        return True
    return any(fnmatchcase(value, pattern) for pattern in patterns)
