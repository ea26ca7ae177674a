"""Keyset pages and the opaque cursors that continue them.

A cursor carries the sort key of the last item shown and a hash of the
listing that it pages (see Listing), so a cursor passed to another listing
gets an error instead of a page of that listing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
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


@dataclass(frozen=True, slots=True)
class Listing:
    """A listing that cursors page: its name and the query parameters that
    choose and order its items.

    ``parameters`` maps each parameter's name in the query API to its value,
    None when the request leaves it out. A time counts by its instant, so
    "Z" and "+00:00" give the same listing, and a list counts as a set.
    """

    name: str
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """Return the hash of the listing that its cursors carry."""
        document = {
            "listing": self.name,
            "parameters": {
                name: _key_value(value) for name, value in self.parameters.items()
            },
        }
        raw = json.dumps(document, sort_keys=True, separators=(",", ":"))
        # The first 128 bits of SHA-256 tell listings apart. A cursor is no
        # secret, so the hash needs no key.
        return hashlib.sha256(raw.encode()).hexdigest()[:32]

    def encode_cursor(self, *values: Any) -> str:
        """Encode the sort key of the last item shown, tied to this listing."""
        return encode_cursor(*values, self.key())

    def decode_cursor(self, cursor: str, types: tuple[type, ...]) -> list[Any]:
        """Decode a cursor made by ``encode_cursor`` of this listing.

        Raises Unsupported for a cursor that is invalid or that another
        listing made.
        """
        *values, key = decode_cursor(cursor, (*types, str))
        if key != self.key():
            raise Unsupported(
                "the cursor belongs to another listing: pass the next_cursor "
                f"of a page with the same {_join(['path', *self.parameters])}",
                {"parameter": "cursor", "value": cursor},
            )
        return values


def point_parameters(position: int, point: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the listing parameters of a read at ``position``.

    ``point`` maps ``at`` and ``position`` to the values of the request that
    chose ``position``, None for one it leaves out. Without ``point`` the
    read is at ``position`` as given. A cursor then continues only a
    listing at the same point, because its pages come from that state.
    """
    if point is None:
        return {"at": None, "position": position}
    return {"at": point.get("at"), "position": point.get("position")}


def _join(words: list[str]) -> str:
    """Join ``words`` as "a", "a and b" or "a, b and c"."""
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " and " + words[-1]


def _key_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, list | tuple | set | frozenset):
        return sorted(_key_value(item) for item in value)
    return value


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
