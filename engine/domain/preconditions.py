"""If-Match and If-None-Match on manifests and blobs (RFC 9110 section 13.1).

A manifest's or blob's entity tag is its digest, the ETag that GET and HEAD
send. A
client that guards a write with one of these fields, such as a create-only
tag with ``If-None-Match: *`` or a tag move with ``If-Match: "<digest it
last saw>"``, gets 412 instead of a write over a change it has not seen.
The registry checks them inside the transaction of the write, against what
the reference names at that moment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.domain.errors import PreconditionFailed

ANY = "*"


@dataclass(frozen=True)
class Preconditions:
    """The entity tags of If-Match and If-None-Match, None when absent.

    Each tag is kept without its quotes. If-Match compares strongly, so a
    weak tag (``W/"..."``) in it matches nothing; If-None-Match compares
    weakly, so one there matches its digest.
    """

    if_match: frozenset[str] | None = None
    if_none_match: frozenset[str] | None = None
    if_match_text: str | None = None
    if_none_match_text: str | None = None

    @classmethod
    def from_headers(
        cls, if_match: str | None, if_none_match: str | None
    ) -> Preconditions | None:
        """Parse the two fields; return None when neither is given."""
        if if_match is None and if_none_match is None:
            return None
        return cls(
            if_match=None if if_match is None else _tags(if_match, weak=False),
            if_none_match=(
                None if if_none_match is None else _tags(if_none_match, weak=True)
            ),
            if_match_text=if_match,
            if_none_match_text=if_none_match,
        )

    def check(self, current: str | None, detail: dict[str, Any]) -> None:
        """Raise PreconditionFailed unless both fields hold for ``current``,
        the digest that the reference names now (None for nothing).

        ``detail`` names the reference; the error adds the field, its value
        and ``current``.
        """
        if self.if_match is not None and not _matches(self.if_match, current):
            raise PreconditionFailed(
                _message("If-Match", current),
                {
                    **detail,
                    "header": "If-Match",
                    "value": self.if_match_text,
                    "current": current,
                },
            )
        if self.if_none_match is not None and _matches(self.if_none_match, current):
            raise PreconditionFailed(
                _message("If-None-Match", current),
                {
                    **detail,
                    "header": "If-None-Match",
                    "value": self.if_none_match_text,
                    "current": current,
                },
            )


def _tags(value: str, *, weak: bool) -> frozenset[str]:
    """Return the entity tags of a field value, unquoted.

    A weak tag is kept only for a weak comparison. An unquoted tag, which RFC
    9110 does not allow, is taken as written, as GET's If-None-Match takes
    it.
    """
    tags = set()
    for part in value.split(","):
        tag = part.strip()
        if tag.startswith("W/"):
            if not weak:
                continue
            tag = tag[2:]
        tag = tag.strip('"')
        if tag:
            tags.add(tag)
    return frozenset(tags)


def _matches(tags: frozenset[str], current: str | None) -> bool:
    if current is None:
        return False
    return ANY in tags or current in tags


def _message(header: str, current: str | None) -> str:
    if current is None:
        return (
            "precondition failed: the reference names no manifest, and "
            f"{header} requires one"
        )
    if header == "If-Match":
        return (
            f"precondition failed: the reference names {current}, which "
            "If-Match does not list"
        )
    return (
        f"precondition failed: the reference names {current}, which "
        "If-None-Match lists or matches with *"
    )
