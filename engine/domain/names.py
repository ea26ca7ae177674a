"""Repository names and tags, with the OCI distribution grammar."""

from __future__ import annotations

import re
from typing import Final

from engine.domain.errors import NameInvalid, TagInvalid

# OCI distribution spec v1.1, "Pulling manifests": a name is one or more
# path components joined by "/", each matching this pattern.
_NAME: Final = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
_TAG: Final = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
MAX_NAME_LENGTH: Final = 255


def validate_repository_name(name: str) -> str:
    """Return ``name`` unchanged if it is a valid repository name."""
    if not isinstance(name, str) or not name:
        raise NameInvalid("repository name is empty", {"name": name})
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(
            f"repository name is longer than {MAX_NAME_LENGTH} characters",
            {"name": name, "length": len(name)},
        )
    if not _NAME.fullmatch(name):
        raise NameInvalid(
            "invalid repository name: components must be lowercase letters "
            "and digits, separated by '.', '_', '__' or dashes, joined by '/'",
            {"name": name},
        )
    return name


def validate_tag(tag: str) -> str:
    """Return ``tag`` unchanged if it matches ``[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}``."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise TagInvalid(
            "invalid tag: 1 to 128 characters of letters, digits, '_', '.' "
            "and '-', not starting with '.' or '-'",
            {"tag": tag},
        )
    return tag


def is_tag(reference: str) -> bool:
    return bool(_TAG.fullmatch(reference))
