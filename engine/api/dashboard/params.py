"""Query parameters of the dashboard API, checked before any query runs.

Each parser raises the 400 UNSUPPORTED error that names the parameter and
the value, so a client sees what to change. A parameter sent with an empty
value is invalid, like any other value that does not parse; to use the
default, leave the parameter out.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

from engine.api.errors import repeated_parameter, unsupported
from engine.api.forwarded import client_address
from engine.api.http import Request
from engine.domain.events import EventType
from engine.domain.names import validate_repository_name, validate_tag
from engine.queries.pages import MAX_INTEGER

# Characters a repository name may contain; a prefix is a name cut anywhere.
_PREFIX: Final = re.compile(r"[a-z0-9._/-]{1,255}")
# RFC 3339 section 5.6 date-time: the "T" and "Z" in either case, seconds
# required, and an offset of "Z" or +hh:mm / -hh:mm.
_RFC3339: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
MAX_TEXT: Final = 255
_MAX_DIGITS: Final = len(str(MAX_INTEGER))


# The parameters that read the log as of a past point. Only a tag list, a tag
# and the catalog take them, because only the tag history and the catalog
# keep past states.
POINT_PARAMETERS: Final = ("at", "position")
# Event families, such as "tag", and the types of each.
_TYPES: Final = frozenset(str(t) for t in EventType)
_FAMILIES: Final = {
    family: tuple(str(t) for t in EventType if str(t).startswith(family + "."))
    for family in {str(t).split(".")[0] for t in EventType}
}


# The only parameter that may be given more than once: each value adds
# event types to the filter.
REPEATABLE: Final = frozenset({"type"})


def reject_unknown(request: Request, accepted: frozenset[str]) -> None:
    """Raise the 400 error for the first query parameter not in ``accepted``,
    or given twice when it takes one value, so that a misspelled, misplaced
    or repeated parameter is never ignored."""
    for name, values in request.query.items():
        if name in accepted:
            if len(values) > 1 and name not in REPEATABLE:
                raise repeated_parameter(name, values)
            continue
        if name in POINT_PARAMETERS:
            message = (
                f"{name} is not supported here, because only a tag list, a tag "
                "and the catalog can be read as of a past point"
            )
        elif accepted:
            message = (
                f"unknown query parameter {name}. This endpoint takes "
                f"{', '.join(sorted(accepted))}"
            )
        else:
            message = (
                f"unknown query parameter {name}. This endpoint takes no "
                "query parameters"
            )
        raise unsupported(
            message, parameter=name, value=values[0], supported=sorted(accepted)
        )


def param(request: Request, name: str) -> str | None:
    """Return the parameter's value, None when absent; 400 when empty."""
    value = request.param(name)
    if value == "":
        raise unsupported(
            f"{name} is empty: give a value or leave the parameter out",
            parameter=name,
            value=value,
        )
    return value


def integer(
    request: Request,
    name: str,
    default: int | None,
    *,
    minimum: int = 0,
    maximum: int = MAX_INTEGER,
) -> int | None:
    """Return parameter ``name`` as an integer from ``minimum`` to ``maximum``."""
    value = param(request, name)
    if value is None:
        return default
    # The length check keeps int() away from strings of thousands of digits.
    valid = value.isascii() and value.isdigit() and len(value) <= _MAX_DIGITS
    if not valid or not minimum <= int(value) <= maximum:
        raise unsupported(
            f"{name} must be an integer from {minimum} to {maximum}",
            parameter=name,
            value=value,
        )
    return int(value)


def choice(request: Request, name: str, choices: tuple[str, ...], default: str) -> str:
    value = param(request, name)
    if value is None:
        return default
    if value not in choices:
        raise unsupported(
            f"{name} must be one of {', '.join(choices)}",
            parameter=name,
            value=value,
            supported=list(choices),
        )
    return value


# The range of times that the parameters take, as UTC instants.
TIME_RANGE_START: Final = datetime(1970, 1, 1, tzinfo=UTC)
TIME_RANGE_END: Final = datetime(9999, 1, 1, tzinfo=UTC)


def time(request: Request, name: str) -> datetime | None:
    """Return parameter ``name`` as an aware datetime, RFC 3339 with an offset."""
    value = param(request, name)
    if value is None:
        return None
    moment = None
    # fromisoformat also takes ISO 8601 forms that RFC 3339 excludes, such
    # as week dates, basic format and times without seconds.
    if _RFC3339.fullmatch(value):
        try:
            # RFC 3339 section 5.6 allows a lower-case "t" and "z", which
            # fromisoformat rejects, and the other characters are digits.
            moment = datetime.fromisoformat(value.upper())
        except ValueError:
            moment = None
    if moment is None or moment.tzinfo is None:
        raise unsupported(
            f"{name} must be an RFC 3339 time with a UTC offset, such as "
            "2026-12-01T00:00:00Z (send '+' in an offset as %2B)",
            parameter=name,
            value=value,
        )
    # Compared as instants, so the offset counts: 1970-01-01T00:00:00+05:00
    # is still in 1969.
    if not TIME_RANGE_START <= moment < TIME_RANGE_END:
        raise unsupported(
            f"{name} must be a time from 1970-01-01T00:00:00Z up to the end "
            "of 9998 in UTC",
            parameter=name,
            value=value,
        )
    return moment


def text(request: Request, name: str) -> str | None:
    """Return a free-text parameter such as an actor, at most 255 printable
    characters."""
    value = param(request, name)
    if value is None:
        return None
    if len(value) > MAX_TEXT or not value.isprintable():
        raise unsupported(
            f"{name} must be at most {MAX_TEXT} printable characters",
            parameter=name,
            value=value,
        )
    return value


def address(request: Request) -> str | None:
    """Return the ``address`` filter, which must be an IPv4 or IPv6 address.

    Events record an IP address in its standard spelling (see
    engine.api.forwarded), so the filter is compared in that spelling too:
    0:0::1 finds the events of ::1, and ::ffff:192.0.2.1 those of
    192.0.2.1. An event that an earlier cairn recorded
    with a forwarded value that is no IP address, such as "unknown", has no
    address this filter takes.
    """
    value = param(request, "address")
    if value is None:
        return None
    try:
        return client_address(value)
    except ValueError:
        raise unsupported(
            "address must be an IPv4 or IPv6 address, such as 127.0.0.1 or ::1",
            parameter="address",
            value=value,
        ) from None


def prefix(request: Request) -> str | None:
    value = param(request, "prefix")
    if value is None:
        return None
    if not _PREFIX.fullmatch(value):
        raise unsupported(
            "prefix must be the start of a repository name: lowercase letters, "
            "digits, '.', '_', '-' and '/'",
            parameter="prefix",
            value=value,
        )
    return value


def cursor(request: Request) -> str | None:
    return param(request, "cursor")


def repository(request: Request) -> str:
    """Return the repository name from the path, raising NameInvalid."""
    return validate_repository_name(request.path_params["name"])


def optional_repository(request: Request) -> str | None:
    value = param(request, "repository")
    return validate_repository_name(value) if value is not None else None


def tag(request: Request) -> str:
    return validate_tag(request.path_params["tag"])


def types(request: Request) -> list[str]:
    """Return the event types in ``type``, repeatable or comma-separated.

    A family, such as ``tag``, stands for each of its types, as it does for
    `cairn events tail --type`.

    Raises the 400 error for a ``type`` that names no type, such as
    ``type=`` from an unset variable, which would otherwise select every
    event, and for a name that is neither a type nor a family.
    """
    requested: list[str] = []
    for value in request.query.get("type", []):
        parts = [part.strip() for part in value.split(",") if part.strip()]
        if not parts:
            raise unsupported(
                "type names no event type: give one or more types, or leave "
                "the parameter out",
                parameter="type",
                value=value,
            )
        for part in parts:
            if part in _FAMILIES:
                requested.extend(_FAMILIES[part])
            elif part in _TYPES:
                requested.append(part)
            else:
                raise unsupported(
                    f"unknown event type {part!r}. Give an event type, such as "
                    "tag.set, or a family, such as tag",
                    parameter="type",
                    value=part,
                    supported=[*sorted(_FAMILIES), *sorted(_TYPES)],
                )
    return requested
