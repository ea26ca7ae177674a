"""A thin request and response layer over raw ASGI.

cairn needs little from a web framework: path routing, headers, streamed
bodies in both directions. This module is all of it, so the hot paths
(blob uploads and downloads) stay one function call away from ASGI.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Final
from urllib.parse import quote

from engine.api.errors import ErrorCode, HTTPError, repeated_parameter, unsupported
from engine.api.forwarded import request_address
from engine.api.pending_body import BODY_BATCH
from engine.api.target import parse_query, request_path
from engine.domain.events import Actor
from engine.encoding import encode_json

if TYPE_CHECKING:
    from engine.api.app import AppState
    from engine.registry import Repository

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Host names and ports as they may appear in a Host or X-Forwarded-Host
# header. Anything else (spaces, slashes, control characters) is ignored
# rather than echoed into a Location header.
# Counts, offsets and positions: ASCII digits only (str.isdigit and the \d
# of re also accept other scripts' digits, which int() may then reject), and
# at most 19 of them, so every value fits a signed 64-bit column.
_DECIMAL: Final = re.compile(r"[0-9]{1,19}")
MAX_INT64: Final = 2**63 - 1


def parse_decimal(value: str) -> int | None:
    """Return ``value`` as a non-negative int64, or None when it is not one."""
    if not _DECIMAL.fullmatch(value):
        return None
    number = int(value)
    return number if number <= MAX_INT64 else None


_HOST: Final = re.compile(r"^[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]{1,255}$")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_FORWARDED_PAIR: Final = re.compile(r'\s*([A-Za-z]+)\s*=\s*("[^"]*"|[^;,]*)')


# Cached, because each request checks its Host here and again for the
# Location URLs it builds, and clients send few distinct values.
@functools.lru_cache(maxsize=256)
def _valid_authority(host: str) -> bool:
    """Return whether an absolute URL can carry ``host`` as its authority.

    That is a name or IPv4 address, or an IPv6 address in brackets. At most
    one ':' and a port from 0 to 65535 may follow.
    """
    if not _HOST.fullmatch(host):
        return False
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return False
        try:
            ipaddress.IPv6Address(host[1:end])
        except ValueError:
            return False
        rest = host[end + 1 :]
    else:
        name = host.split(":", 1)[0]
        if not name or "[" in name or "]" in name:
            return False
        rest = host[len(name) :]
    if not rest:
        return True
    port = rest.removeprefix(":")
    if port == rest:
        return False
    return port == "" or (port.isdigit() and int(port) <= 65535)


class ClientDisconnected(Exception):
    """The client closed the connection before its request body ended."""


class Request:
    """One HTTP request: its scope, headers, query and body stream."""

    def __init__(
        self,
        scope: Scope,
        receive: Receive,
        state: AppState,
        request_id: str,
    ) -> None:
        self.scope = scope
        self._receive = receive
        self.state = state
        self.request_id = request_id
        self.method: str = scope["method"]
        # A byte that is not part of valid UTF-8 keeps its escape, such as
        # %ff, in the path, its parameters and the query (see engine.api.target).
        self.path = request_path(scope)
        self.path_params: dict[str, str] = {}
        self.headers = _header_map(scope.get("headers", []))
        self.query = parse_query(scope.get("query_string", b""))
        self.bytes_in = 0
        # Response body bytes sent, counted by engine.api.app as they go out.
        self.bytes_out = 0
        # Set by engine.api.app once the server has taken the response's
        # status and headers, after which no error response can replace it.
        self.response_started = False
        self.body_finished = not self.has_body
        # The authenticated user name, set before the handler runs when the
        # app has a users file; None on an open registry.
        self.user: str | None = None

    @property
    def has_body(self) -> bool:
        length = self.header("content-length")
        if length is not None:
            return length.strip() not in ("", "0")
        return self.header("transfer-encoding") is not None

    def check_transfer_coding(self) -> None:
        """Raise HTTPError unless Transfer-Encoding is absent or lists chunked
        alone.

        Empty list elements are ignored, as RFC 9110 section 5.6.1 requires.
        A list with no coding, or whose last coding is not chunked, gets a
        400 because the body's end cannot be found (RFC 9112 section 6.3).
        A list with chunked twice also gets a 400, because RFC 9112 section
        6.1 forbids applying chunked more than once. Any other coding before
        a final chunked, such as gzip, gets a 501, the status RFC 9112
        section 6.1 recommends for a coding the server does not decode.
        llhttp decodes chunked alone and would hand the app the bytes of such
        a coding still encoded, so they would be stored as sent.

        In cairn serve, llhttp rejects the 400 cases with a 400 of its own.
        The app checks them too, for other ASGI servers.
        """
        value = self.header("transfer-encoding")
        if value is None:
            return
        codings = [part.strip().lower() for part in value.split(",")]
        codings = [coding for coding in codings if coding]
        if codings == ["chunked"]:
            return
        raise _transfer_coding_error(value, codings)

    def check_host(self) -> None:
        """Raise HTTPError 400 unless Host is one host name or IP address with
        an optional port.

        RFC 9112 section 3.2 requires the 400 for an HTTP/1.1 request without
        Host, and for any request with more than one Host line or with an
        invalid value. An HTTP/1.0 request may leave Host out. Location URLs
        are built from Host, so an accepted value always gives an absolute
        URL, unless a proxy header overrides it.
        """
        values = self.headers.get("host", [])
        if len(values) == 1 and _valid_authority(values[0]):
            return
        if not values and self.scope.get("http_version") != "1.1":
            return
        raise _host_error(values)

    def header(self, name: str) -> str | None:
        """Return the header's values joined with commas, or None."""
        values = self.headers.get(name.lower())
        return ", ".join(values) if values else None

    def content_length(self) -> int | None:
        """Return Content-Length as a number, or None when absent or malformed."""
        value = self.header("content-length")
        if value is None:
            return None
        return parse_decimal(value.strip())

    def param(self, name: str) -> str | None:
        """Return the value of query parameter ``name``.

        Raises HTTPError 400 for a parameter given more than once, because
        picking one of its values would act on a request the client did not
        make. Also raises it for a value with control characters, which no
        name, tag or media type contains and PostgreSQL cannot store.
        """
        values: list[str] | None = self.query.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise repeated_parameter(name, values)
        _reject_control_characters(name, values)
        return values[0]

    def params(self, name: str) -> list[str]:
        """Return every value of query parameter ``name``, in request order.

        Raises HTTPError 400 for a value with control characters, as param
        does.
        """
        values: list[str] = self.query.get(name, [])
        _reject_control_characters(name, values)
        return values

    async def wait_for_disconnect(self) -> None:
        """Return once the client has gone; call only after the body is read."""
        while (await self._receive())["type"] != "http.disconnect":
            pass

    def repository(self) -> Repository:
        """Return the repository named in the path, raising NameInvalid."""
        return self.state.registry.repository(
            self.path_params["name"], actor=self.actor, request_id=self.request_id
        )

    @functools.cached_property
    def address(self) -> str | None:
        """The client's IP address, for the rate limit and the events' actor,
        or None when the server reports no address (see engine.api.forwarded)."""
        return request_address(
            self.scope, self.request_id, self.state.forwarded_warnings
        )

    @property
    def actor(self) -> Actor:
        return Actor(user=self.user, address=self.address)

    def batch_body(self, size: int) -> None:
        """Ask the server to wake ``stream`` only once ``size`` body bytes
        wait, or the body ends. A server without the BODY_BATCH extension
        delivers pieces as they come."""
        batch = (self.scope.get("extensions") or {}).get(BODY_BATCH)
        if batch is not None:
            batch["bytes"] = size

    async def stream(self) -> AsyncIterator[bytes]:
        """Yield the body as the server delivers it.

        Raises ClientDisconnected when the connection closes first.
        """
        while not self.body_finished:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected("client disconnected during the request body")
            chunk = message.get("body", b"")
            if not message.get("more_body", False):
                self.body_finished = True
            if chunk:
                self.bytes_in += len(chunk)
                yield chunk

    def base_url(self) -> str | None:
        """Return scheme://host as the client sees this server, or None.

        The host comes from the Forwarded, X-Forwarded-Host or Host headers,
        in that order, so URLs stay right behind a reverse proxy. None means
        no usable host was sent; callers then return a relative URL.
        """
        forwarded = _parse_forwarded(self.header("forwarded"))
        scheme = forwarded.get("proto") or _first(self.header("x-forwarded-proto"))
        host = forwarded.get("host") or _first(self.header("x-forwarded-host"))
        host = host or self.header("host")
        if not host:
            server = self.scope.get("server")
            if server and server[1] is not None:
                address = server[0]
                if ":" in address:
                    # An IPv6 address goes in brackets, as RFC 3986 requires.
                    address = f"[{address}]"
                host = f"{address}:{server[1]}"
        scheme = (scheme or self.scope.get("scheme") or "http").lower()
        if scheme not in ("http", "https") or not host or not _valid_authority(host):
            return None
        return f"{scheme}://{host}"

    def url_for(self, path: str) -> str:
        """Return the URL of ``path`` on this server, absolute when possible."""
        if self.state.relative_urls:
            return path
        base = self.base_url()
        return f"{base}{path}" if base else path


@dataclass
class Response:
    """A response whose body is bytes, an async stream of chunks or a file.

    A streamed response sets ``content_length`` when it is known; without it
    the server uses chunked transfer encoding. A file response sends
    ``content_length`` bytes of ``file`` from ``file_offset``, and the app
    closes the file once the response is sent.
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    content_length: int | None = None
    file: BinaryIO | None = None
    file_offset: int = 0

    def __post_init__(self) -> None:
        if self.file is not None and self.content_length is None:
            raise ValueError("a file response needs content_length")

    def header(self, name: str, value: str) -> Response:
        self.headers.append((name, value))
        return self


def _reject_control_characters(name: str, values: list[str]) -> None:
    for value in values:
        if _CONTROL.search(value):
            raise unsupported(
                f"query parameter {name} contains control characters",
                parameter=name,
                value=value,
            )


def json_response(
    document: Any, status: int = 200, headers: list[tuple[str, str]] | None = None
) -> Response:
    body = encode_json(document)
    return Response(
        status,
        [("Content-Type", "application/json"), *(headers or [])],
        body,
    )


def empty_response(
    status: int, headers: list[tuple[str, str]] | None = None
) -> Response:
    return Response(status, headers or [])


def repository_path(name: str, *parts: str) -> str:
    """Return /v2/<name>/<parts...> with each part percent-encoded."""
    encoded = "/".join(quote(part, safe=":") for part in parts)
    return f"/v2/{name}/{encoded}"


def _transfer_coding_error(value: str, codings: list[str]) -> HTTPError:
    """Build the error for a Transfer-Encoding ``value`` other than chunked
    alone. ``codings`` are its non-empty elements, lowercased."""
    detail: dict[str, object] = {
        "header": "Transfer-Encoding",
        "value": value,
        "supported": ["chunked"],
    }
    remedy = "send the body with chunked alone or with a Content-Length"
    if not codings:
        problem = "lists no transfer coding, so the body's end cannot be found"
    elif codings[-1] != "chunked":
        problem = "does not end with chunked, so the body's end cannot be found"
    elif codings.count("chunked") > 1:
        problem = "lists chunked more than once, which HTTP/1.1 forbids"
    else:
        unknown = [coding for coding in codings if coding != "chunked"]
        detail["unsupported"] = unknown
        return HTTPError(
            ErrorCode.UNSUPPORTED,
            501,
            f"Transfer-Encoding {value!r} lists {', '.join(unknown)}, which "
            f"cairn does not decode: {remedy}",
            detail,
        )
    return HTTPError(
        ErrorCode.UNSUPPORTED,
        400,
        f"Transfer-Encoding {value!r} {problem}: {remedy}",
        detail,
    )


def _host_error(values: list[str]) -> HTTPError:
    """Build the 400 for the Host header ``values``, one per header line."""
    if not values:
        message = (
            "missing Host header: an HTTP/1.1 request must name the registry's "
            "host, and its port unless it is the scheme's default"
        )
    elif len(values) > 1:
        quoted = ", ".join(repr(value) for value in values)
        message = (
            f"the Host header is given {len(values)} times ({quoted}), but a "
            "request may give it once"
        )
    else:
        message = (
            f"invalid Host header {values[0]!r}: expected a host name, an IPv4 "
            "address or a bracketed IPv6 address, with an optional port from 0 "
            "to 65535"
        )
    detail = {"header": "Host", "values": values}
    return HTTPError(ErrorCode.UNSUPPORTED, 400, message, detail)


def _header_map(raw: list[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        headers.setdefault(key, []).append(value.decode("latin-1"))
    return headers


def _first(value: str | None) -> str | None:
    """Return the first entry of a comma-separated proxy header."""
    if not value:
        return None
    return value.split(",", 1)[0].strip() or None


def _parse_forwarded(value: str | None) -> dict[str, str]:
    """Return the proto and host of the first hop of an RFC 7239 header."""
    if not value:
        return {}
    first_hop = value.split(",", 1)[0]
    pairs: dict[str, str] = {}
    for match in _FORWARDED_PAIR.finditer(first_hop):
        pairs[match.group(1).lower()] = match.group(2).strip().strip('"')
    return pairs
