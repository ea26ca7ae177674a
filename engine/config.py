"""Settings shared by every `cairn` command, from options or CAIRN_* variables."""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

DEFAULT_DATA_DIR = "./cairn-data"
DEFAULT_LISTEN = "127.0.0.1:5000"

T = TypeVar("T")

_TRUE_WORDS: Final = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS: Final = frozenset({"0", "false", "no", "off"})
# The password in a URL's user information: after "scheme://user:" and up to
# the last "@" before the path. Matched on the text, so that it can be hidden
# in a URL that does not parse.
_URL_PASSWORD: Final = re.compile(
    r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@]*:)[^/?#]*@"
)
# All of a URL's user information, with or without a scheme before it.
_URL_USERINFO: Final = re.compile(
    r"^(?P<head>(?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?[^/?#]*@"
)
NATS_SCHEMES: Final = ("nats", "tls", "ws", "wss")

# Numbers in options are ASCII. int() and float() also read other scripts'
# digits, "_" between digits and surrounding whitespace, which the HTTP API
# rejects, so the options reject them too.
_ASCII_INTEGER: Final = re.compile(r"[0-9]{1,19}")
_ASCII_NUMBER: Final = re.compile(
    r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
)
MAX_INT64: Final = 2**63 - 1
# The maximum duration of an option, about 292 years. It is Go's maximum
# time.Duration, which NATS reads an ack wait as, and Python's
# threading.TIMEOUT_MAX on Linux, and a time that far back is still a
# valid datetime.
MAX_DURATION_SECONDS: Final = MAX_INT64 // 10**9


class EnvironmentValue(str):
    """The text of a CAIRN_* environment variable, given to argparse as a default.

    argparse converts a string default with the option's type only when it
    parses the command that has the option, so an invalid value stops that
    command and no other. ``variable`` lets the error name the variable.
    """

    variable: str

    # ``variable`` has a default because copy and pickle call __new__ with
    # the text alone and then restore the attribute.
    def __new__(cls, value: str, variable: str = "") -> EnvironmentValue:
        text = super().__new__(cls, value)
        text.variable = variable
        return text


def env_default(name: str, default: str | None = None) -> str | None:
    """Return CAIRN_<name> as an EnvironmentValue, or ``default`` when unset.

    An option whose ``type`` checks the result needs the names_env_variable
    decorator on that type, so that its error names the variable.
    """
    variable = f"CAIRN_{name}"
    value = os.environ.get(variable)
    if value is None:
        return default
    return EnvironmentValue(value, variable)


def names_env_variable(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Make the argparse type ``parse`` name the variable of an invalid default.

    Its error on a value from env_default ends with the variable's name, so
    that a user who did not type the value learns where it comes from.
    """

    @functools.wraps(parse)
    def parse_naming_variable(value: str) -> T:
        try:
            return parse(value)
        except argparse.ArgumentTypeError as error:
            if not isinstance(value, EnvironmentValue):
                raise
            raise argparse.ArgumentTypeError(
                f"{error} (from environment variable {value.variable})"
            ) from None

    return parse_naming_variable


@names_env_variable
def parse_boolean(value: str) -> bool:
    """Parse 1, true, yes or on, and 0, false, no or off, in any letter case."""
    word = value.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(
        f"invalid boolean {value!r}: expected 1, true, yes or on, "
        "or 0, false, no or off"
    )


class EnvironmentFlag(argparse.Action):
    """An option like ``store_true`` whose default is a CAIRN_* variable.

    ``add_argument("--no-nats", action=EnvironmentFlag, env="NO_NATS")``
    reads CAIRN_NO_NATS with parse_boolean, and an unset or empty variable
    means false. The flag on the command line sets true whatever the
    variable contains.
    """

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        env: str,
        help: str | None = None,
    ) -> None:
        super().__init__(
            option_strings,
            dest,
            nargs=0,
            default=env_default(env) or False,
            type=parse_boolean,
            help=help,
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, True)


def add_storage_options(parser: argparse.ArgumentParser) -> None:
    """Add --data-dir and --database, the options every storage command takes."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env_default("DATA_DIR", DEFAULT_DATA_DIR) or DEFAULT_DATA_DIR),
        help="directory for blobs and the SQLite database (env CAIRN_DATA_DIR; "
        f"default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--database",
        dest="database_url",
        type=parse_database_url,
        default=env_default("DATABASE_URL"),
        help="SQLAlchemy URL of a PostgreSQL database, e.g. "
        "postgresql://user@host/db; default: SQLite in the data directory "
        "(env CAIRN_DATABASE_URL)",
    )


def hide_url_userinfo(url: str) -> str:
    """Return ``url`` with its whole user information, which may be a token,
    as ``***``."""
    return _URL_USERINFO.sub(r"\g<head>***@", url)


def hide_url_password(url: str) -> str:
    """Return ``url`` with the password of its user information as ``***``."""
    return _URL_PASSWORD.sub(r"\g<head>***@", url)


@names_env_variable
def parse_database_url(value: str) -> str | None:
    """Parse --database, returning None for an empty value (SQLite)."""
    from engine.database_url import check_database_url

    if not value:
        return None
    try:
        check_database_url(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


@names_env_variable
def parse_file_path(value: str) -> Path:
    """Parse the name of a file, rejecting an empty one.

    Path("") is the current directory, so an empty value, as from an unset
    shell variable, would name a directory instead of a file.
    """
    if not value:
        raise argparse.ArgumentTypeError(
            "invalid file name '': expected the path of a file"
        )
    return Path(value)


@names_env_variable
def parse_nats_url(value: str) -> str:
    """Parse a NATS server URL: nats://, tls://, ws:// or wss://, or HOST:PORT.

    nats-py reads HOST:PORT as nats://HOST:PORT, and a bare word as a host
    name on port 4222. A bare word is rejected here, because a value such as
    ``junk`` is more likely a mistake than the name of a NATS host.
    """
    redacted = hide_url_userinfo(value)
    expected = "expected a URL such as nats://127.0.0.1:4222"
    scheme, separator, _ = value.partition("://")
    if separator and scheme not in NATS_SCHEMES:
        raise argparse.ArgumentTypeError(
            f"invalid NATS URL {redacted!r}: the scheme is not one of "
            f"{', '.join(NATS_SCHEMES)}; {expected}"
        )
    try:
        parts = urlsplit(value if separator else f"nats://{value}")
        port = parts.port
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"invalid NATS URL {redacted!r}: {error}; {expected}"
        ) from None
    if not parts.hostname or (not separator and port is None):
        raise argparse.ArgumentTypeError(f"invalid NATS URL {redacted!r}: {expected}")
    return value


@dataclass(frozen=True, slots=True)
class StorageSettings:
    data_dir: Path
    database_url: str | None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StorageSettings:
        return cls(data_dir=args.data_dir, database_url=args.database_url)


MAX_PORT = 65535


def parse_ascii_integer(value: str) -> int | None:
    """Return ``value`` as an int from 0 to 2^63-1 written in ASCII digits,
    or None when it is not one."""
    if _ASCII_INTEGER.fullmatch(value) is None:
        return None
    number = int(value)
    return number if number <= MAX_INT64 else None


def parse_ascii_duration(value: str, unit_seconds: int = 1) -> float | None:
    """Return ``value``, a number of units of ``unit_seconds`` seconds each
    written in ASCII such as 30, 0.5 or 1e3, or None when it is not one or
    is longer than MAX_DURATION_SECONDS."""
    if _ASCII_NUMBER.fullmatch(value) is None:
        return None
    number = float(value)
    return number if number <= MAX_DURATION_SECONDS // unit_seconds else None


@names_env_variable
def parse_listen(value: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 hosts in brackets) into host and port."""
    host, sep, port = value.rpartition(":")
    if not sep or parse_ascii_integer(port) is None or not host:
        raise argparse.ArgumentTypeError(
            f"invalid listen address {value!r}: expected HOST:PORT, e.g. 127.0.0.1:5000"
        )
    if int(port) > MAX_PORT:
        raise argparse.ArgumentTypeError(
            f"invalid listen address {value!r}: port {port} is not in 0-{MAX_PORT}"
        )
    return host.strip("[]"), int(port)


@names_env_variable
def parse_port(value: str) -> int:
    """Parse a TCP port number, 0 to MAX_PORT; 0 lets the system pick one."""
    port = parse_ascii_integer(value)
    if port is None or port > MAX_PORT:
        raise argparse.ArgumentTypeError(
            f"invalid port {value!r}: expected an integer from 0 to {MAX_PORT}"
        )
    return int(value)


@names_env_variable
def parse_trusted_proxies(value: str) -> list[str]:
    """Split a comma-separated list of proxy addresses, checking each one.

    An entry is an IP address, a network such as 10.0.0.0/8, or ``*`` for
    every address, which are the forms uvicorn's proxy header handling
    matches against a TCP peer. A blank value means no proxies. A blank
    entry in a list, as in ``a,,b`` or ``a,``, is rejected, because an
    address is usually missing there.
    """
    if not value.strip():
        return []
    proxies = [entry.strip() for entry in value.split(",")]
    for number, proxy in enumerate(proxies, start=1):
        if not proxy:
            raise argparse.ArgumentTypeError(
                f"invalid trusted proxy '' at entry {number} of {value!r}: "
                "expected an IP address, a network such as 10.0.0.0/8, or *"
            )
        if proxy == "*":
            continue
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid trusted proxy {proxy!r}: expected an IP address, a "
                "network such as 10.0.0.0/8, or *"
            ) from None
    return proxies
