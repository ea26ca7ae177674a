"""Checks of a database URL, made before cairn opens a connection with it.

A URL that cannot name a registry's database is rejected here, while the
command line is parsed, so that the user sees which option or variable is
wrong instead of a driver's traceback at the first connection.
"""

from __future__ import annotations

import re
from typing import Final

import sqlalchemy as sa

from engine.config import MAX_PORT, hide_url_password, parse_ascii_integer
from engine.db import normalise_url

# cairn's SQLite code uses the sqlite3 module and its bulk writes use
# psycopg 3's COPY, so no other driver works.
SUPPORTED_DRIVERS: Final = {"sqlite": "pysqlite", "postgresql": "psycopg"}
EXAMPLE_URLS: Final = (
    "e.g. postgresql://user@host/db or sqlite:////var/lib/cairn/cairn.db"
)
_SQLITE_MEMORY_NAMES: Final = ("", ":memory:")
# libpq's password and sslpassword (of the client key) parameters.
_QUERY_PASSWORD: Final = re.compile(r"(?P<head>[?&](?:ssl)?password=)[^&#]*")


def redacted_database_url(url: str) -> str:
    """Return ``url`` as written, with every password in it as ``***``.

    psycopg also reads passwords from the query string, so the values of
    ``password`` and ``sslpassword`` parameters are hidden too.
    """
    return _QUERY_PASSWORD.sub(r"\g<head>***", hide_url_password(url))


def check_database_url(url: str) -> None:
    """Raise ValueError unless ``url`` can name a registry's database.

    It must be a SQLite URL that names a file or a PostgreSQL URL that
    psycopg accepts. The message shows the URL with its passwords hidden.
    """
    try:
        parsed = sa.make_url(normalise_url(url))
    except (sa.exc.ArgumentError, ValueError) as error:
        raise ValueError(
            f"invalid database URL {redacted_database_url(url)!r}: {error}; "
            "expected e.g. postgresql://user@host/db"
        ) from None

    redacted = redacted_database_url(url)
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_DRIVERS:
        raise ValueError(
            f"unsupported database {redacted!r}: cairn supports SQLite and "
            "PostgreSQL URLs, e.g. postgresql://user@host/db"
        )
    if parsed.get_driver_name() != SUPPORTED_DRIVERS[backend]:
        raise ValueError(
            f"unsupported database driver {parsed.get_driver_name()!r} in "
            f"{redacted!r}: cairn connects to PostgreSQL with psycopg and to "
            f"SQLite with sqlite3, so write the URL without a driver, {EXAMPLE_URLS}"
        )

    parts = [parsed.database, parsed.username, parsed.password, parsed.host]
    for values in parsed.query.values():
        parts.extend([values] if isinstance(values, str) else values)
    if any(part is not None and "\x00" in part for part in parts):
        raise ValueError(f"invalid database URL {redacted!r}: it contains a NUL byte")

    if backend == "sqlite":
        reason = _sqlite_url_error(parsed)
    else:
        reason = _postgresql_url_error(parsed)
    if reason is not None:
        raise ValueError(f"invalid database URL {redacted!r}: {reason}")


def _sqlite_url_error(url: sa.URL) -> str | None:
    """Return why a SQLite URL cannot hold a registry, or None when it can."""
    database = url.database or ""
    if (
        database in _SQLITE_MEMORY_NAMES
        or database.startswith("file::memory:")
        or url.query.get("mode") == "memory"
    ):
        return (
            "an in-memory SQLite database cannot hold a registry, because each "
            "connection gets its own empty one and nothing outlives the "
            "process; name a file such as sqlite:////var/lib/cairn/cairn.db, "
            "or leave it unset for cairn.db in the data directory"
        )
    if url.host or url.port is not None or url.username or url.password:
        return (
            "a SQLite URL names a file, not a host; expected "
            "sqlite:////absolute/path.db or sqlite:///relative/path.db"
        )
    if url.query:
        names = ", ".join(sorted(url.query))
        return (
            "cairn sets SQLite's connection options itself, so a SQLite URL "
            f"takes no query parameters (found: {names})"
        )
    return None


def _postgresql_url_error(url: sa.URL) -> str | None:
    """Return why psycopg would reject a PostgreSQL URL, or None when it
    would try to connect."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo, timeout_from_conninfo

    # SQLAlchemy leaves out a port of 0, so libpq would use its default.
    if url.port == 0:
        return _port_error("0")
    try:
        _, params = url.get_dialect()().create_connect_args(url)
    except (sa.exc.ArgumentError, ValueError) as error:
        return str(error)
    try:
        conninfo = conninfo_to_dict(make_conninfo("", **params))
        timeout_from_conninfo(conninfo)
    except psycopg.ProgrammingError as error:
        # libpq's message ends with a newline.
        return str(error).strip()

    # libpq takes one port per host, separated by commas, and an empty one
    # means the default.
    for port in str(conninfo.get("port") or "").split(","):
        number = parse_ascii_integer(port)
        if port and (number is None or not 1 <= number <= MAX_PORT):
            return _port_error(port)
    return None


def _port_error(port: str) -> str:
    return f"port {port} is not in 1-{MAX_PORT}"
