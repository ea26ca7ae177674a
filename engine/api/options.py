"""Command-line options of `cairn serve`."""

from __future__ import annotations

import argparse
import re
from typing import Final

from engine.bus.options import add_bus_options
from engine.config import (
    DEFAULT_LISTEN,
    MAX_DURATION_SECONDS,
    MAX_INT64,
    EnvironmentFlag,
    env_default,
    names_env_variable,
    parse_ascii_duration,
    parse_ascii_integer,
    parse_file_path,
    parse_listen,
    parse_trusted_proxies,
)

DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_UPLOAD_EXPIRY_HOURS = 24.0
# Seconds without a byte of the request, or without progress sending the
# response, before the connection is closed. 60 s is the default of nginx's
# client_header_timeout, client_body_timeout and send_timeout
# (ngx_http_core_module). A client on a slow link still moves some bytes
# within that time, and a stalled one ties up a connection, a worker thread
# and, for a download, an open file.
DEFAULT_READ_IDLE_TIMEOUT = 60.0
DEFAULT_WRITE_IDLE_TIMEOUT = 60.0
# The largest blob an upload may store. Amazon ECR's service quotas page
# gives 52,000 MiB as its maximum layer size, so 64 GiB admits the layers of
# any image that ECR stores. The limit bounds what one upload can write to
# the disk, but many uploads together can still fill it.
DEFAULT_MAX_BLOB_SIZE = "64GiB"

# Only binary multiples are accepted. Decimal units (GB) and bare letters (G)
# are rejected, because they leave a factor of 1000 or 1024 to guess.
_BYTE_UNITS: Final = {
    "": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
# One ASCII space may separate the number from its unit, as in "512 MiB".
_BYTE_SIZE: Final = re.compile(r"([0-9]{1,19})(?: ?([A-Za-z]+))?")


@names_env_variable
def parse_rate_limit(value: str) -> int:
    """Parse --rate-limit: a whole number of requests per second, at least 1."""
    rate = parse_ascii_integer(value)
    if rate is None or rate < 1:
        raise argparse.ArgumentTypeError(
            f"invalid rate limit {value!r}: expected a whole number of requests "
            f"per second, from 1 to {MAX_INT64}"
        )
    return rate


@names_env_variable
def parse_timeout(value: str) -> float | None:
    """Parse a timeout in seconds, returning None for 0 (no timeout)."""
    seconds = parse_ascii_duration(value)
    if seconds is None:
        raise argparse.ArgumentTypeError(
            f"invalid timeout {value!r}: expected a number of seconds up to "
            f"{MAX_DURATION_SECONDS}, or 0 to turn the timeout off"
        )
    return seconds or None


@names_env_variable
def parse_byte_size(value: str) -> int | None:
    """Parse a size in bytes, with an optional KiB, MiB, GiB or TiB suffix,
    returning None for 0 (no limit). Whitespace before or after is rejected,
    as in every other number of an option."""
    match = _BYTE_SIZE.fullmatch(value)
    size = -1
    if match is not None:
        unit = (match.group(2) or "").lower()
        if unit in _BYTE_UNITS:
            size = int(match.group(1)) * _BYTE_UNITS[unit]
    if not 0 <= size <= MAX_INT64:
        raise argparse.ArgumentTypeError(
            f"invalid size {value!r}: expected a number of bytes with an "
            "optional KiB, MiB, GiB or TiB suffix, e.g. 64GiB, or 0 for no "
            "limit"
        )
    return size or None


def _parse_duration(value: str, unit: str, unit_seconds: int, positive: bool) -> float:
    amount = parse_ascii_duration(value, unit_seconds)
    if amount is None or (positive and amount == 0):
        minimum = " greater than 0" if positive else ", 0 or more"
        maximum = MAX_DURATION_SECONDS // unit_seconds
        raise argparse.ArgumentTypeError(
            f"invalid duration {value!r}: expected a number{minimum}, up to "
            f"{maximum} {unit}"
        )
    return amount


@names_env_variable
def parse_duration(value: str) -> float:
    """Parse a number of seconds, 0 or more."""
    return _parse_duration(value, "seconds", 1, positive=False)


@names_env_variable
def parse_positive_duration(value: str) -> float:
    """Parse a number of seconds, more than 0."""
    return _parse_duration(value, "seconds", 1, positive=True)


@names_env_variable
def parse_minutes(value: str) -> float:
    """Parse a number of minutes, 0 or more."""
    return _parse_duration(value, "minutes", 60, positive=False)


@names_env_variable
def parse_positive_hours(value: str) -> float:
    """Parse a number of hours, more than 0."""
    return _parse_duration(value, "hours", 3600, positive=True)


def add_upload_expiry_option(parser: argparse.ArgumentParser, note: str = "") -> None:
    """Add --upload-expiry, which `cairn serve` and `cairn gc` share."""
    parser.add_argument(
        "--upload-expiry",
        # 0 would expire an upload between two of its requests.
        type=parse_positive_hours,
        default=env_default("UPLOAD_EXPIRY", str(DEFAULT_UPLOAD_EXPIRY_HOURS)),
        metavar="HOURS",
        help="hours, more than 0, that an upload may sit idle before its "
        f"session and staging file are deleted{note} (env CAIRN_UPLOAD_EXPIRY; "
        f"default {DEFAULT_UPLOAD_EXPIRY_HOURS:g})",
    )


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=env_default("LISTEN", DEFAULT_LISTEN) or DEFAULT_LISTEN,
        help=f"HOST:PORT to listen on (env CAIRN_LISTEN; default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--relative-urls",
        action=EnvironmentFlag,
        env="RELATIVE_URLS",
        help="send Location headers as paths instead of absolute URLs built "
        "from the Host and X-Forwarded-* headers (env CAIRN_RELATIVE_URLS=1)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=parse_duration,
        default=env_default("SHUTDOWN_TIMEOUT") or str(DEFAULT_SHUTDOWN_TIMEOUT),
        metavar="SECONDS",
        help="seconds to let in-flight requests finish after SIGTERM or SIGINT "
        "before they are cancelled; 0 does not wait "
        "(env CAIRN_SHUTDOWN_TIMEOUT; "
        f"default {DEFAULT_SHUTDOWN_TIMEOUT:g})",
    )
    add_upload_expiry_option(parser, "; checked hourly")
    parser.add_argument(
        "--read-idle-timeout",
        type=parse_timeout,
        default=env_default("READ_IDLE_TIMEOUT", str(DEFAULT_READ_IDLE_TIMEOUT)),
        metavar="SECONDS",
        help="seconds a client may send nothing while the server waits for "
        "a request (a new connection's first request, or the rest of a "
        "request's head or body) before the connection is closed; 0 turns "
        "it off (env CAIRN_READ_IDLE_TIMEOUT; "
        f"default {DEFAULT_READ_IDLE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--write-idle-timeout",
        type=parse_timeout,
        default=env_default("WRITE_IDLE_TIMEOUT", str(DEFAULT_WRITE_IDLE_TIMEOUT)),
        metavar="SECONDS",
        help="seconds a client may take no byte of a response that the "
        "server is sending before the connection is closed; 0 turns it off "
        "(env CAIRN_WRITE_IDLE_TIMEOUT; "
        f"default {DEFAULT_WRITE_IDLE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-blob-size",
        type=parse_byte_size,
        default=env_default("MAX_BLOB_SIZE", DEFAULT_MAX_BLOB_SIZE),
        metavar="SIZE",
        help="largest blob an upload may store, in bytes or with a KiB, MiB, "
        "GiB or TiB suffix. A larger one gets 413 SIZE_INVALID and its upload "
        "is discarded, and 0 turns the limit off (env CAIRN_MAX_BLOB_SIZE; "
        f"default {DEFAULT_MAX_BLOB_SIZE})",
    )
    parser.add_argument(
        "--no-direct-io",
        action=EnvironmentFlag,
        env="NO_DIRECT_IO",
        help="write uploads through the page cache, not with O_DIRECT, even "
        "where the data directory's file system takes O_DIRECT "
        "(env CAIRN_NO_DIRECT_IO=1)",
    )
    parser.add_argument(
        "--auth-file",
        type=parse_file_path,
        default=env_default("AUTH_FILE"),
        help="users file for HTTP Basic authentication, one name:role:scrypt$... "
        "line per user (see `cairn users add`); every request except "
        "/_cairn/health then needs credentials (env CAIRN_AUTH_FILE; "
        "default: no authentication)",
    )
    parser.add_argument(
        "--rate-limit",
        type=parse_rate_limit,
        default=env_default("RATE_LIMIT"),
        metavar="N",
        help="requests per second allowed from each client address, with "
        "bursts of 2N; more get 429 with Retry-After (env CAIRN_RATE_LIMIT; "
        "default: no limit)",
    )
    parser.add_argument(
        "--trusted-proxies",
        type=parse_trusted_proxies,
        default=env_default("TRUSTED_PROXIES", ""),
        metavar="ADDRESSES",
        help="comma-separated addresses of reverse proxies whose "
        "X-Forwarded-For and X-Forwarded-Proto headers name the client; "
        "the rate limit and the event log then see the client's address "
        "(env CAIRN_TRUSTED_PROXIES; default: none, every client is its "
        "connection's address)",
    )
    parser.add_argument(
        "--tls-cert",
        type=parse_file_path,
        default=env_default("TLS_CERT"),
        metavar="FILE",
        help="PEM certificate, followed by any intermediate certificates, to "
        "serve HTTPS with; needs --tls-key (env CAIRN_TLS_CERT; default: "
        "plain HTTP). `cairn certificate` writes a self-signed one",
    )
    parser.add_argument(
        "--tls-key",
        type=parse_file_path,
        default=env_default("TLS_KEY"),
        metavar="FILE",
        help="PEM private key of --tls-cert, unencrypted (env CAIRN_TLS_KEY)",
    )
    add_bus_options(parser)
