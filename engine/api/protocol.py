"""cairn's HTTP/1.1 protocol: uvicorn's httptools protocol with two additions.

Zero-copy send: every request's scope advertises the ASGI extension
``http.response.zerocopysend``. After ``http.response.start`` the app may send
``{"type": "http.response.zerocopysend", "file": ..., "offset": ...,
"count": ..., "more_body": ...}``, and the server copies those bytes from the
file to the socket with ``os.sendfile``, so they never pass through Python.

Rejected requests: httptools rejects, among others, an unknown method, a
malformed Content-Length, raw non-ASCII bytes in the path and an invalid
header. Such a request gets a 400 with the OCI error body that the app sends
elsewhere, in place of uvicorn's plain-text "Invalid HTTP request
received.". Its code is
UNSUPPORTED, the code cairn gives other malformed input that no specific
OCI code covers: the request fails before routing, so NAME_INVALID or
MANIFEST_INVALID would name a part that was never looked at.

The class depends on internals of uvicorn 0.55's
``uvicorn.protocols.http.httptools_impl``: it overrides ``_start_asgi_task``
and ``data_received`` (replacing the latter's error handling), calls private
helpers of the base class, and reads and sets the state of
``RequestResponseCycle`` and of the pipeline queue. pyproject.toml pins
uvicorn to the minor version it was checked against.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final

import anyio
import anyio.lowlevel
import anyio.to_thread
import httptools
import structlog
from uvicorn._types import (
    ASGI3Application,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import is_ssl

from engine.api.app import API_VERSION_HEADER, ZEROCOPY_SEND
from engine.api.errors import ErrorCode, error_body

log = structlog.get_logger(__name__)

# Worker threads that run sendfile at once, for all connections of one event
# loop; more responses wait for a free thread. Separate from anyio's default
# limiter, so blob downloads never delay the handlers' database calls.
MAX_SENDFILE_THREADS: Final = 16

# How long a worker thread waits for the socket to become writable before it
# returns and the event loop waits instead, in milliseconds. A client that
# keeps reading usually frees buffer space within this time, so its transfer
# stays in one thread, and a stalled client occupies a thread at most this
# long at a time.
THREAD_WRITABLE_WAIT_MS: Final = 50

# Bytes of request body received before the socket stops being read until
# the app takes them. uvicorn's own limit is 64 KiB.
BODY_BUFFER_LIMIT: Final = 1024 * 1024

# Maximum bytes of one request's header names and values. A longer head
# gets a 400, so a client cannot make the server hold headers of any size.
MAX_HEADER_BYTES: Final = 64 * 1024

# Maximum bytes of a rejected request's head kept to name the offending part,
# and maximum characters of a value quoted in the error detail.
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_QUOTED_CHARS: Final = 200

_TOKEN: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# RFC 9110 field-value characters: HTAB, SP, VCHAR and obs-text.
_FIELD_VALUE: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")

_sendfile_limiter: anyio.lowlevel.RunVar[anyio.CapacityLimiter] = anyio.lowlevel.RunVar(
    "cairn_sendfile_limiter"
)


class HeadersTooLarge(httptools.HttpParserCallbackError):
    """A request's headers are larger than MAX_HEADER_BYTES."""


class ConnectionClosed(ConnectionError):
    """The client closed the connection during a zero-copy send."""


class CairnHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with zero-copy send and OCI 400 errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._zerocopy = False
        self._connection_lost = False
        self._writable_waiter: asyncio.Future[None] | None = None
        # The cycle whose app task runs now. self.cycle is the last request
        # parsed, which may still wait in self.pipeline.
        self._running_cycle: RequestResponseCycle | None = None
        # The head of the request being parsed, kept while the request
        # started at the beginning of a received chunk, so a rejection can
        # quote the offending part. None when that is not known.
        self._head_chunks: list[bytes] | None = None
        self._chunk = b""
        self._chunk_starts_message = True
        self._messages_begun_in_chunk = 0
        self._message_open = False
        # Header bytes of the request being parsed, and bytes received while
        # its head was incomplete; None once its headers are complete.
        self._header_bytes = 0
        self._head_received: int | None = None
        self._rejected = False
        self._pending_rejection: bytes | None = None

    # ---- connection ---------------------------------------------------------

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        # sendfile needs a plain socket, because TLS encrypts in user space.
        sock = transport.get_extra_info("socket")
        self._zerocopy = sock is not None and not is_ssl(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection_lost = True
        super().connection_lost(exc)
        waiter = self._writable_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_open = True
        self._header_bytes = 0
        self._head_received = 0
        self._messages_begun_in_chunk += 1
        if self._chunk_starts_message and self._messages_begun_in_chunk == 1:
            self._head_chunks = [self._chunk[:MAX_HEAD_BYTES]]
        else:
            self._head_chunks = None
        if self._zerocopy:
            self.scope["extensions"] = {ZEROCOPY_SEND: {}}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _headers_too_large()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_received = None
        super().on_headers_complete()
        self._head_chunks = None

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._message_open = False

    def on_body(self, body: bytes) -> None:
        # uvicorn's own on_body stops reading the socket once 64 KiB wait
        # for the app. Upload bodies go to disk in 1 MiB buffers, so this
        # lets up to BODY_BUFFER_LIMIT gather first.
        cycle = self.cycle
        if cycle.response_complete or (
            self.parser.should_upgrade() and self._should_upgrade()
        ):
            return
        cycle.body += body
        if len(cycle.body) > BODY_BUFFER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def _start_asgi_task(
        self, cycle: RequestResponseCycle, app: ASGI3Application
    ) -> None:
        self._running_cycle = cycle
        if self._zerocopy:
            app = self._with_zerocopy(cycle, app)
        super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._pending_rejection is not None and not self._response_in_flight():
            self._send_rejection(self._pending_rejection)

    # ---- zero-copy send -----------------------------------------------------

    def _with_zerocopy(
        self, cycle: RequestResponseCycle, app: ASGI3Application
    ) -> ASGI3Application:
        """Wrap ``app`` so that its zero-copy messages reach _send_file."""

        async def app_with_zerocopy(
            scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            async def send_message(message: ASGISendEvent) -> None:
                # uvicorn's message types do not include the extension's.
                event: Mapping[str, Any] = message
                if event["type"] == ZEROCOPY_SEND:
                    await self._send_file(cycle, event)
                else:
                    await send(message)

            await app(scope, receive, send_message)

        return app_with_zerocopy

    async def _send_file(
        self, cycle: RequestResponseCycle, message: Mapping[str, Any]
    ) -> None:
        """Send a zero-copy message's file range as (part of) the body.

        Raises ConnectionError when the client has gone (the ASGI HTTP spec
        lets ``send`` raise OSError on a closed connection) and OSError when
        the file cannot be read or ends before ``count`` bytes. Both close
        the connection.
        """
        if cycle.disconnected or self._connection_lost:
            raise ConnectionClosed("client disconnected before the response body")
        if not cycle.response_started or cycle.response_complete:
            raise RuntimeError(
                f"'{ZEROCOPY_SEND}' is valid only after 'http.response.start'"
                " and before the response completes"
            )
        file = message["file"]
        file_fd = file if isinstance(file, int) else file.fileno()
        offset: int | None = message.get("offset")
        start = os.lseek(file_fd, 0, os.SEEK_CUR) if offset is None else offset
        count: int | None = message.get("count")
        if count is None:
            count = max(os.fstat(file_fd).st_size - start, 0)
        if cycle.scope["method"] == "HEAD":
            count = 0
        if not cycle.chunked_encoding and count > cycle.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")

        if count > 0:
            if cycle.chunked_encoding:
                self.transport.write(b"%x\r\n" % count)
            try:
                await self._sendfile(file_fd, start, count)
            except ConnectionError:
                cycle.disconnected = True
                self.transport.close()
                raise
            except BaseException:
                # Part of the body may have gone out, so the connection can
                # carry no further response.
                self.transport.close()
                raise
            if cycle.chunked_encoding:
                self.transport.write(b"\r\n")
            else:
                cycle.expected_content_length -= count
            if offset is None:
                os.lseek(file_fd, start + count, os.SEEK_SET)

        more_body = bool(message.get("more_body", False))
        await cycle.send(
            {"type": "http.response.body", "body": b"", "more_body": more_body}
        )

    async def _sendfile(self, file_fd: int, offset: int, count: int) -> None:
        """Copy ``count`` bytes of ``file_fd`` from ``offset`` to the socket.

        The transport's buffered bytes (the response head, at least) go out
        first. Then worker threads run os.sendfile on a duplicate of the
        socket's descriptor, and the event loop waits whenever a thread finds
        the socket unwritable for THREAD_WRITABLE_WAIT_MS.
        """
        await self._flush_transport()
        if self._connection_lost or self.transport.is_closing():
            raise ConnectionClosed("client disconnected before the response body")
        # The duplicate keeps the socket open while a thread uses it, even if
        # the transport closes its own descriptor and the number is reused.
        sock_fd = os.dup(self.transport.get_extra_info("socket").fileno())
        try:
            sent = 0
            while sent < count:
                if self._connection_lost:
                    raise ConnectionClosed("client disconnected during the response")
                # abandon_on_cancel=False: a cancelled task still waits for the
                # thread, so sock_fd is never closed while the thread uses it.
                sent += await anyio.to_thread.run_sync(
                    _sendfile_until_blocked,
                    sock_fd,
                    file_fd,
                    offset + sent,
                    count - sent,
                    self._is_connection_lost,
                    abandon_on_cancel=False,
                    limiter=_limiter(),
                )
                if sent < count:
                    await self._wait_writable(sock_fd)
        finally:
            os.close(sock_fd)

    def _is_connection_lost(self) -> bool:
        return self._connection_lost

    async def _flush_transport(self) -> None:
        """Wait until the transport has written every byte it buffers."""
        transport = self.transport
        if transport.get_write_buffer_size() == 0:
            return
        low, high = transport.get_write_buffer_limits()
        # With a high-water mark of 0 the transport pauses writing at once and
        # resumes it, which ends FlowControl.drain, only when its buffer is
        # empty. connection_lost resumes it too.
        transport.set_write_buffer_limits(high=0)
        try:
            while transport.get_write_buffer_size() > 0:
                if self._connection_lost:
                    raise ConnectionClosed("client disconnected during the response")
                await self.flow.drain()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)

    async def _wait_writable(self, sock_fd: int) -> None:
        """Wait until the socket is writable or the connection is lost."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._writable_waiter = waiter
        loop.add_writer(sock_fd, _resolve, waiter)
        try:
            await waiter
        finally:
            loop.remove_writer(sock_fd)
            self._writable_waiter = None

    # ---- rejected requests --------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            # The parser stopped at the error, so later bytes have no meaning.
            return
        self._chunk = data
        self._chunk_starts_message = not self._message_open
        self._messages_begun_in_chunk = 0
        if self._head_chunks is not None and self._message_open:
            self._head_chunks.append(data)
            if sum(map(len, self._head_chunks)) > MAX_HEAD_BYTES:
                self._head_chunks = None
        self._unset_keepalive_if_required()
        if self._head_received is not None:
            # httptools gathers a header's value across chunks before it
            # calls on_header, so a head still open after this many bytes
            # is rejected before it can grow further.
            if self._head_received > MAX_HEADER_BYTES + MAX_HEAD_BYTES:
                self._reject(_headers_too_large())
                return
            self._head_received += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # As in the base class. cairn runs with ws="none", so this only
            # logs that the upgrade is unsupported.
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as error:
            self._reject(error)
        finally:
            self._chunk = b""

    def _reject(self, error: httptools.HttpParserError) -> None:
        """Send a 400 OCI error for a request that httptools rejected.

        The 400 follows every response to the requests before it on the
        connection, and then the connection closes.
        """
        self._rejected = True
        head = b"".join(self._head_chunks) if self._head_chunks is not None else None
        message, detail = describe_rejection(error, head)
        log.warning(
            "request_rejected",
            error=message,
            detail=detail,
            remote=self.client[0] if self.client else None,
        )
        response = rejection_response(
            message, detail, self.server_state.default_headers
        )

        # A request whose headers were parsed already has a cycle, and an
        # error in its body means that its app never gets the rest of it.
        failed: RequestResponseCycle | None = self.cycle
        if failed is None or failed.scope is not self.scope:
            failed = None
        elif any(queued is failed for queued, _ in self.pipeline):
            self.pipeline = deque(
                entry for entry in self.pipeline if entry[0] is not failed
            )
        elif failed.response_started:
            # Its response is under way, so no 400 can follow it.
            self.transport.close()
            return
        else:
            # Its app receives http.disconnect, and its sends are ignored.
            failed.disconnected = True
            failed.message_event.set()
            if self._running_cycle is failed:
                self._running_cycle = None

        if self._response_in_flight():
            self._pending_rejection = response
        else:
            self._send_rejection(response)

    def _response_in_flight(self) -> bool:
        running = self._running_cycle
        return bool(self.pipeline) or (
            running is not None and not running.response_complete
        )

    def _send_rejection(self, response: bytes) -> None:
        self._pending_rejection = None
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


def _limiter() -> anyio.CapacityLimiter:
    try:
        return _sendfile_limiter.get()
    except LookupError:
        limiter = anyio.CapacityLimiter(MAX_SENDFILE_THREADS)
        _sendfile_limiter.set(limiter)
        return limiter


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _sendfile_until_blocked(
    sock_fd: int,
    file_fd: int,
    offset: int,
    count: int,
    stopped: Callable[[], bool],
) -> int:
    """Send up to ``count`` bytes of ``file_fd`` to the non-blocking socket.

    Returns the number of bytes sent: ``count``, or fewer when the socket
    stayed unwritable for THREAD_WRITABLE_WAIT_MS or ``stopped()`` became
    true. Raises ConnectionError (EPIPE, ECONNRESET) when the client has
    gone, and OSError when the file ends before ``count`` bytes.
    """
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    sent = 0
    while sent < count and not stopped():
        try:
            chunk = os.sendfile(sock_fd, file_fd, offset + sent, count - sent)
        except BlockingIOError:
            # poll also returns on POLLERR and POLLHUP, and the next sendfile
            # then raises the connection's error.
            if not poller.poll(THREAD_WRITABLE_WAIT_MS):
                break
            continue
        if chunk == 0:
            raise OSError(f"file ended {count - sent} bytes before the range's end")
        sent += chunk
    return sent


# ---- describing a rejected request -------------------------------------------

# Words in llhttp's error reasons, which httptools passes on as the exception
# message, in order of precedence. Each comes with the part of the request it
# names and the message of the 400.
_REASON_PARTS: Final = (
    ("method", "method", "unsupported HTTP method"),
    ("url path", "path", "invalid characters in the request path"),
    ("url query", "query", "invalid characters in the request query"),
    ("url", "target", "invalid request target"),
    ("headers exceed", "header", "request headers too large"),
    ("content-length", "header", "invalid Content-Length header"),
    ("transfer-encoding", "header", "invalid Transfer-Encoding header"),
    ("header", "header", "invalid header"),
    ("chunk", "body", "invalid chunked request body"),
    ("crlf", "request", "invalid line ending in the request line"),
    ("version", "version", "invalid HTTP version"),
    ("expected http/", "version", "invalid HTTP version"),
)


def describe_rejection(
    error: httptools.HttpParserError, head: bytes | None
) -> tuple[str, dict[str, str]]:
    """Return the message and detail of the 400 for a request httptools rejected.

    ``head`` is the request's bytes from its first byte, when known. The
    detail has ``reason``, the parser's words, and ``part``, the part of
    the request they name (method, path, query, target, header, body,
    version or request). It quotes the offending bytes as ``value`` (and the
    header's name as ``header``) where ``head`` contains them.
    """
    reason = _reason(error)
    lowered = reason.lower()
    if isinstance(error, httptools.HttpParserInvalidMethodError):
        lowered = "method"
    part, message = "request", "invalid HTTP request"
    for keyword, keyword_part, keyword_message in _REASON_PARTS:
        if keyword in lowered:
            part, message = keyword_part, keyword_message
            break
    detail = {"part": part, "reason": reason}

    lines = _head_lines(head)
    request_line = lines[0].split(b" ") if lines else []
    value: bytes | None = None
    if part == "method" and request_line:
        value = request_line[0]
    elif part in ("path", "query", "target") and len(request_line) > 1:
        value = request_line[1]
    elif part == "version" and len(request_line) > 2:
        value = b" ".join(request_line[2:])
    elif part == "header":
        for name in ("Content-Length", "Transfer-Encoding"):
            if name.lower() in lowered:
                detail["header"] = name
                values = _header_values(lines, name.encode())
                value = b", ".join(values) if values else None
                break
        else:
            bad = _invalid_header(lines)
            if bad is not None:
                detail["header"] = quote_bytes(bad[0])
                value = bad[1]
    if value is not None:
        detail["value"] = quote_bytes(value)
    return message, detail


def _headers_too_large() -> HeadersTooLarge:
    return HeadersTooLarge(f"request headers exceed {MAX_HEADER_BYTES} bytes")


def _reason(error: httptools.HttpParserError) -> str:
    """Return llhttp's reason, or httptools.parse_url's for a failed callback."""
    if isinstance(error, HeadersTooLarge):
        return str(error)
    cause = error.__context__
    if isinstance(cause, HeadersTooLarge):
        return str(cause)
    if isinstance(error, httptools.HttpParserCallbackError) and isinstance(
        cause, httptools.HttpParserInvalidURLError
    ):
        # uvicorn's on_headers_complete parses the URL again with
        # httptools.parse_url, which rejects targets that llhttp accepts,
        # such as the authority form of CONNECT. The messages of other
        # exceptions raised in callbacks are not quoted to the client.
        return str(cause)
    return str(error) or type(error).__name__


def rejection_response(
    message: str, detail: dict[str, str], default_headers: list[tuple[bytes, bytes]]
) -> bytes:
    """Return the bytes of a 400 with the OCI error body, closing the connection."""
    body = error_body(ErrorCode.UNSUPPORTED, message, detail)
    lines = [STATUS_LINE[400]]
    for name, value in default_headers:
        lines.append(name + b": " + value + b"\r\n")
    version_name, version_value = API_VERSION_HEADER
    lines += [
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        version_name.lower().encode() + b": " + version_value.encode() + b"\r\n",
        b"connection: close\r\n",
        b"\r\n",
        body,
    ]
    return b"".join(lines)


def quote_bytes(raw: bytes) -> str:
    """Return ``raw`` as printable ASCII, other bytes as \\xNN, shortened."""
    text = "".join(
        chr(byte) if 0x20 <= byte < 0x7F and byte != 0x5C else f"\\x{byte:02x}"
        for byte in raw[:MAX_QUOTED_CHARS]
    )
    return text + "..." if len(raw) > MAX_QUOTED_CHARS else text


def _head_lines(head: bytes | None) -> list[bytes]:
    """Return the request line and header lines of ``head``, without CRLF."""
    if head is None:
        return []
    # llhttp skips empty lines before a request line.
    head = head.lstrip(b"\r\n")
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        head = head[:end]
    return head.split(b"\r\n")


def _header_values(lines: list[bytes], name: bytes) -> list[bytes]:
    values = []
    for line in lines[1:]:
        field, colon, value = line.partition(b":")
        if colon and field.strip().lower() == name.lower():
            values.append(value.strip(b" \t"))
    return values


def _invalid_header(lines: list[bytes]) -> tuple[bytes, bytes | None] | None:
    """Return the name and value of the first invalid header line.

    A line without a colon gives the whole line as its name and no value.
    """
    for line in lines[1:]:
        field, colon, value = line.partition(b":")
        if not colon:
            return line, None
        if not _TOKEN.fullmatch(field) or not _FIELD_VALUE.fullmatch(value):
            return field, value.strip(b" \t")
    return None
