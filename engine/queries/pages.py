"""Keyset pages and the opaque cursors that continue them."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Final

from engine.domain.errors import Unsupported

MAX_PAGE_SIZE: Final = 1000
# Positions and sizes are 64-bit integers in SQL.
MAX_INTEGER: Final = 2**63 - 1
# Cursor strings are repository names or tags, at most 255 characters.
MAX_STRING: Final = 255
DEFAULT_PAGE_SIZE: Final = 100


@dataclass(frozen=True, slots=True)
class Page:
    """Up to ``n`` items and the cursor of the next page, None on the last."""

    items: list[dict[str, Any]]
    next_cursor: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, key: str) -> dict[str, Any]:
        return {**self.extra, key: self.items, "next_cursor": self.next_cursor}


def encode_cursor(*values: Any) -> str:
    """Encode the sort key of the last item shown as a URL-safe string."""
    raw = json.dumps(list(values), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, types: tuple[type, ...]) -> list[Any]:
    """Decode a cursor made by ``encode_cursor`` whose values have ``types``.

    Raises Unsupported for anything else, since a cursor comes from a client.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
    except (binascii.Error, ValueError):
        values = None
    valid = (
        isinstance(values, list)
        and len(values) == len(types)
        and all(
            _valid_value(value, kind) for value, kind in zip(values, types, strict=True)
        )
    )
    if not valid:
        raise Unsupported(
            "invalid cursor: pass the next_cursor of a previous page unchanged",
            {"parameter": "cursor", "value": cursor},
        )
    assert isinstance(values, list)
    return values


def _valid_value(value: Any, kind: type) -> bool:
    if isinstance(value, bool) or not isinstance(value, kind):
        return False
    if isinstance(value, int):
        return 0 <= value <= MAX_INTEGER
    if isinstance(value, str):
        return len(value) <= MAX_STRING and value.isprintable()
    return True


def check_page_size(n: int) -> int:
    if not 1 <= n <= MAX_PAGE_SIZE:
        raise Unsupported(
            f"n must be an integer from 1 to {MAX_PAGE_SIZE}",
            {"parameter": "n", "value": n},
        )
    return n
