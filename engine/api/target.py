"""Percent-decoding of the request target: the path and the query parameters.

A percent-encoded sequence that decodes as UTF-8 gives its character, as
uvicorn and urllib.parse decode it. A byte that is not part of valid UTF-8
keeps the form the client sent, such as ``%ff``, where those decoders put
U+FFFD. An error detail then names the value received, and ``a%ff`` and
``a%fe`` stay two values. Repository names, tags, digests and upload ids
cannot contain "%", so such a value fails their checks as before.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import unquote_to_bytes

# One percent-encoded byte, as urllib.parse.unquote_to_bytes decodes it.
_ESCAPE: Final = re.compile(rb"%[0-9A-Fa-f]{2}")
# The lone surrogates that the "surrogateescape" error handler puts in place
# of the bytes 0x80 to 0xFF that are not part of valid UTF-8.
_FIRST_ESCAPED: Final = "\udc80"
_LAST_ESCAPED: Final = "\udcff"


def decode_component(raw: bytes) -> str:
    """Percent-decode ``raw`` as UTF-8, keeping each byte that is not part of
    valid UTF-8 in its received form.

    A byte sent percent-encoded keeps its escape, with its letter case. A
    byte of 0x80 or more sent as it is becomes an uppercase escape, so the
    result is always valid Unicode.
    """
    decoded = unquote_to_bytes(raw)
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        pass

    # The received form of each decoded byte, in order.
    received: list[str] = []
    position = 0
    for match in _ESCAPE.finditer(raw):
        received.extend(_received_byte(byte) for byte in raw[position : match.start()])
        received.append(match.group().decode("ascii"))
        position = match.end()
    received.extend(_received_byte(byte) for byte in raw[position:])

    characters: list[str] = []
    offset = 0
    for character in decoded.decode("utf-8", "surrogateescape"):
        if _FIRST_ESCAPED <= character <= _LAST_ESCAPED:
            characters.append(received[offset])
            offset += 1
        else:
            characters.append(character)
            offset += len(character.encode("utf-8"))
    return "".join(characters)


def _received_byte(byte: int) -> str:
    return chr(byte) if byte < 0x80 else f"%{byte:02X}"


def request_path(scope: Mapping[str, Any]) -> str:
    """Decode the request's path as decode_component does.

    The ASGI server has decoded ``path`` already, with U+FFFD for bytes that
    are not UTF-8, so only such a path is decoded again from ``raw_path``. A
    ``raw_path`` that does not decode to ``path`` that way, or none at all,
    leaves ``path`` as the server gave it.
    """
    path: str = scope["path"]
    raw: bytes | None = scope.get("raw_path")
    if not raw or "\ufffd" not in path:
        return path
    if unquote_to_bytes(raw).decode("utf-8", "replace") != path:
        return path
    return decode_component(raw)


def parse_query(raw: bytes) -> dict[str, list[str]]:
    """Parse query string ``raw`` into each parameter's values, in request
    order.

    It splits and decodes as urllib.parse.parse_qs with keep_blank_values
    does, so a parameter without "=" has the value "" and "+" is a space,
    but each name and value is decoded by decode_component.
    """
    query: dict[str, list[str]] = {}
    for field in raw.split(b"&"):
        if not field:
            continue
        name, _, value = field.replace(b"+", b" ").partition(b"=")
        query.setdefault(decode_component(name), []).append(decode_component(value))
    return query
