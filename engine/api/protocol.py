"""cairn's HTTP/1.1 protocol: uvicorn's httptools protocol with seven additions.

Zero-copy send: every request's scope advertises the ASGI extension
``http.response.zerocopysend``. After ``http.response.start`` the app may send
``{"type": "http.response.zerocopysend", "file": ..., "offset": ...,
"count": ..., "more_body": ...}``, and the server copies those bytes from the
file to the socket with ``os.sendfile`` in a worker thread, so they never pass
through Python. A client on the loopback interface gets them through a
2 MiB buffer instead (see LOOPBACK_COPY_BYTES), still off the event loop.

Rejected requests: httptools rejects, among others, an unknown method, a
malformed Content-Length, raw non-ASCII bytes in the path and an invalid
header. Such a request gets a 400 with the OCI error body that the app sends
elsewhere, in place of uvicorn's plain-text "Invalid HTTP request
received.", a 414 when its target exceeds MAX_TARGET_BYTES, or a 431 when
its headers exceed MAX_HEADER_BYTES. Its code is
UNSUPPORTED, the code cairn gives other malformed input that no specific
OCI code covers: the request fails before routing, so NAME_INVALID or
MANIFEST_INVALID would name a part that was never looked at.

Idle timeouts: a connection closes when the client sends nothing for
``read_idle_timeout`` seconds while the server waits for a request (a new
connection's first request, or the rest of a request's head or body), or
takes nothing for ``write_idle_timeout`` seconds while the server has
response bytes to send. A client that is slow but keeps moving bytes is never
cut off. Time during which the server itself stops reading (its body buffer
is full, or it has not yet sent ``100 Continue``) does not count. Between
requests, uvicorn's keep-alive timeout applies instead. Each request's scope
advertises the extension ``cairn.idle_timeout``, a dict in which the app may
store ``request_id`` for the server's log line, and in which the server sets
``timed_out`` to ``"read"`` or ``"write"`` when it closes the connection of
that request. The app then receives ``http.disconnect``, and its sends fail
or are dropped as after any disconnect.

Lingering close: a response that ends the connection while its request's
body is still arriving, such as an early 413, is followed by the server's
FIN, and the rest of the body is read and discarded until the client closes,
for at most LINGER_SECONDS and LINGER_MAX_BYTES. The discarded bytes count
as activity for the read idle timeout, which closes the connection early
only when the client stops sending. Each request cycle gets a transport
whose close() does this.

Closing idle TLS connections: a TLS connection that the server closes on the
keep-alive timeout, on the read idle timeout, on a graceful shutdown, or after
a response that ends it while no request body arrives, sends close_notify and
closes its TCP connection without waiting for the client's close_notify (see
_close_without_close_notify_wait).

Uncopied request bodies: the app receives the body from a PendingBody, which
keeps the parser's bytes objects, instead of from uvicorn's bytearray. Each
request's scope advertises the extension ``cairn.body_batch``, in which the
app may set how many body bytes should wait before it is woken (see
engine/api/pending_body.py).

Connection peer: each request's scope advertises the extension
``cairn.connection_peer``, whose ``client`` is the connection's address.
uvicorn's proxy header handling replaces the scope's ``client`` behind a
trusted proxy, and the app then still has the proxy's address (see
engine/api/forwarded.py).

The class depends on internals of uvicorn 0.55's
``uvicorn.protocols.http.httptools_impl``: it overrides ``_start_asgi_task``,
``data_received`` (replacing the latter's error handling), ``shutdown``
(repeating its check of the cycle) and ``timeout_keep_alive_handler``,
replaces the receive callable of ``RequestResponseCycle``, calls private
helpers of the base class, and reads and sets the state of
``RequestResponseCycle``, of the pipeline queue and of ``FlowControl``.
pyproject.toml pins uvicorn to the minor version it was checked against.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import re
import select
import struct
import termios
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

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

from engine.api.app import API_VERSION_HEADER, IDLE_TIMEOUT, ZEROCOPY_SEND
from engine.api.errors import ErrorCode, error_body
from engine.api.forwarded import CONNECTION_PEER
from engine.api.options import DEFAULT_READ_IDLE_TIMEOUT, DEFAULT_WRITE_IDLE_TIMEOUT
from engine.api.pending_body import BODY_BATCH, PendingBody, receive_from
from engine.api.threads import ThreadPool

log = structlog.get_logger(__name__)

# Worker threads that run sendfile at once, for all connections of the
# process; more responses wait for a free thread. A pool of their own keeps
# blob downloads from delaying the handlers' database calls.
MAX_SENDFILE_THREADS: Final = 16
_sendfile_pool: Final = ThreadPool(MAX_SENDFILE_THREADS, "cairn-sendfile")

# How long a worker thread waits for the socket to become writable before it
# returns and the event loop waits instead, in milliseconds. A client that
# keeps reading usually frees buffer space within this time, so its transfer
# stays in one thread, and a stalled client occupies a thread at most this
# long at a time.
THREAD_WRITABLE_WAIT_MS: Final = 50

# To a client on the loopback interface the file is copied through a buffer
# of this size instead of with sendfile. Over loopback the receiver copies
# the bytes straight out of the page-cache pages that sendfile queued, which
# costs it more than copying from the socket buffers a write fills. Fewer,
# larger writes also wake the receiver less often. Pulls of a cached 256 MiB
# blob with the benchmark's client (2 vCPUs, Linux 6.18 under Firecracker)
# ran at a median of 1,980 MiB/s with sendfile (12 pulls). With writes of
# 64 KiB they ran at 1,360 (24 pulls), of 1 MiB at 2,350 (36), of 2 MiB at
# 2,460 (12) and of 4 MiB at 2,610 (12). Over a real network sendfile saves the server
# that copy.
LOOPBACK_COPY_BYTES: Final = 2 * 1024 * 1024

# Maximum bytes of one request's header names and values. A longer head
# gets a 431, so a client cannot make the server hold headers of any size.
MAX_HEADER_BYTES: Final = 64 * 1024

# Maximum bytes of a request target. uvicorn parses each target with
# httptools.parse_url, which in httptools 0.9 rejects one longer than this
# because http_parser stores its offsets in 16 bits. A longer target gets a
# 414 as soon as more than this many bytes of it have arrived.
MAX_TARGET_BYTES: Final = 65535

# The first bytes of a TLS handshake record (content type 22, major version
# 3): a client that speaks TLS to this plain-HTTP server.
TLS_HANDSHAKE_RECORD: Final = b"\x16\x03"

# After a response that ends a connection while its request's body is still
# arriving (an early 413, say), the server stops sending but keeps reading
# and discarding the body for at most this long and this many bytes, then
# closes. Closing at once with unread bytes would make the kernel reset the
# connection, and a client still sending could lose the response with it.
LINGER_SECONDS: Final = 5.0
LINGER_MAX_BYTES: Final = 64 * 1024 * 1024

# The idle timeouts are checked this many times per timeout, so one fires
# between 1 and about 1.5 timeouts after the last byte moved (a check that
# the timer runs a little early finds the timeout not yet expired).
IDLE_CHECKS_PER_TIMEOUT: Final = 4

# SIOCOUTQ, which Linux defines as TIOCOUTQ: the bytes in a TCP socket's send
# queue, unsent or not yet acknowledged by the peer. The queue shrinks as the
# client reads, in steps far smaller than the free space that makes the
# socket writable again, which can be more than a MiB.
_SEND_QUEUE_IOCTL: Final = termios.TIOCOUTQ

# Maximum bytes of a rejected request's head kept to name the offending part,
# and maximum characters of a value quoted in the error detail.
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_QUOTED_CHARS: Final = 200

_TOKEN: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# RFC 9110 field-value characters: HTAB, SP, VCHAR and obs-text.
_FIELD_VALUE: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


class HeadersTooLarge(httptools.HttpParserCallbackError):
    """A request's headers are larger than MAX_HEADER_BYTES."""


class TargetTooLong(httptools.HttpParserCallbackError):
    """A request's target is longer than MAX_TARGET_BYTES."""


class ConnectionClosed(ConnectionError):
    """The connection closed during a zero-copy send.

    ``bytes_sent`` is the number of the range's bytes sent before it closed.
    """

    def __init__(self, message: str, bytes_sent: int = 0) -> None:
        super().__init__(message)
        self.bytes_sent = bytes_sent


class FileSendFailed(OSError):
    """Reading the file failed, or the file ended early, during a zero-copy send.

    ``bytes_sent`` is the number of the range's bytes sent before the failure.
    """

    def __init__(self, message: str, bytes_sent: int) -> None:
        super().__init__(message)
        self.bytes_sent = bytes_sent


@dataclass(eq=False, slots=True)
class _FileTransfer:
    """Bytes sent so far by one zero-copy send.

    The worker thread advances ``sent`` and the event loop reads it.
    """

    sent: int = 0


class CairnHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with zero-copy send, OCI 400 errors and
    idle timeouts."""

    # Seconds, or None for no timeout; configured_protocol sets them.
    read_idle_timeout: ClassVar[float | None] = DEFAULT_READ_IDLE_TIMEOUT
    write_idle_timeout: ClassVar[float | None] = DEFAULT_WRITE_IDLE_TIMEOUT
    # Whether a loopback client's file bodies are copied through a buffer
    # (see LOOPBACK_COPY_BYTES) instead of sent with sendfile.
    copy_on_loopback: ClassVar[bool] = True

    def __init__(
        self,
        *args: Any,
        tcp_transport: asyncio.Transport | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # The TCP transport under the TLS transport, on a connection that
        # HttpsPortProtocol handed over; None on a plain HTTP connection.
        self._tcp_transport = tcp_transport
        self._zerocopy = False
        self._peer_is_loopback = False
        self._socket_fd: int | None = None
        self._connection_lost = False
        self._writable_waiter: asyncio.Future[None] | None = None
        self._transfer: _FileTransfer | None = None
        # The cycle whose app task runs now. self.cycle is the last request
        # parsed, which may still wait in self.pipeline.
        self._running_cycle: RequestResponseCycle | None = None
        # Each cycle's body bytes not yet received by its app; see
        # engine/api/pending_body.py.
        self._pending_bodies: weakref.WeakKeyDictionary[
            RequestResponseCycle, PendingBody
        ] = weakref.WeakKeyDictionary()
        # The head of the request being parsed, kept while the request
        # started at the beginning of a received chunk, so a rejection can
        # quote the offending part. None when that is not known.
        self._head_chunks: list[bytes] | None = None
        self._chunk = b""
        self._chunk_starts_message = True
        self._messages_begun_in_chunk = 0
        self._message_open = False
        # Bytes of the target and of the header names and values of the
        # request being parsed. Then the bytes received while its head is
        # incomplete, which is None once its headers are complete.
        self._target_bytes = 0
        self._header_bytes = 0
        self._head_received: int | None = None
        self._rejected = False
        self._pending_rejection: bytes | None = None
        self._lingering = False
        self._lingered_bytes = 0
        self._linger_timer: asyncio.TimerHandle | None = None
        # Idle timeouts: while the server waits on the client, one timer per
        # connection runs _check_idle, which compares these counters with
        # their values at its previous run.
        timeouts = [
            timeout
            for timeout in (self.read_idle_timeout, self.write_idle_timeout)
            if timeout is not None
        ]
        self._idle_check_interval = (
            min(timeouts) / IDLE_CHECKS_PER_TIMEOUT if timeouts else None
        )
        self._idle_check: asyncio.TimerHandle | None = None
        self._bytes_received = 0
        self._body_received = 0
        self._writes_resumed = 0
        # When the current stretch without progress began, as the last check
        # saw it (None when the server was not waiting), and the counters then.
        self._read_idle_since: float | None = None
        self._read_sample = 0
        self._write_idle_since: float | None = None
        self._write_sample: tuple[object, ...] = ()

    # ---- connection ---------------------------------------------------------

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        # sendfile needs a plain socket, because TLS encrypts in user space.
        sock = transport.get_extra_info("socket")
        self._socket_fd = sock.fileno() if sock is not None else None
        self._zerocopy = sock is not None and not is_ssl(transport)
        self._peer_is_loopback = self.copy_on_loopback and _is_loopback(
            transport.get_extra_info("peername")
        )
        # The first request is awaited under the read idle timeout.
        self._arm_idle_check()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connection_lost = True
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        super().connection_lost(exc)
        waiter = self._writable_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool | None:  # type: ignore[override]
        """Respond to a request whose client closed its sending side after it.

        A client such as `nc -N` shuts down its side of the connection once
        the request is sent, and then reads the response. After a complete
        request whose response has not been sent, the connection stays open
        for that response and closes after it. A close with no request, or
        in the middle of one, ends the connection at once, and the app
        receives a disconnect. Over TLS the transport closes at once.
        """
        cycle = self.cycle
        if (
            cycle is None
            or self._message_open
            or self._rejected
            or self._lingering
            or cycle.response_complete
            or is_ssl(self.transport)
        ):
            return None
        cycle.keep_alive = False
        return True

    def shutdown(self) -> None:
        """Close the connection now if it is idle, or after its response.

        uvicorn calls this on a graceful shutdown, and waits until every
        connection is lost.
        """
        if self.cycle is None or self.cycle.response_complete:
            self._close_without_close_notify_wait()
        else:
            self.cycle.keep_alive = False

    def _close_without_close_notify_wait(self) -> None:
        """Close the connection; over TLS, without waiting for the client.

        Closing a TLS transport sends close_notify, then waits for the
        client's close_notify for asyncio's ssl_shutdown_timeout (30 s in
        Python 3.11) before the connection is lost, and an idle keep-alive
        client never sends one. RFC 8446 (section 6.1) lets the closing side
        close its read side without waiting. Python 3.11's TLS transport has
        written its close_notify to the TCP transport when close() returns,
        so closing the TCP transport then sends the buffered response bytes,
        the close_notify and a FIN, in that order.
        """
        if not self.transport.is_closing():
            self.transport.close()
        tcp_transport = self._tcp_transport
        if tcp_transport is not None and not tcp_transport.is_closing():
            tcp_transport.close()

    def timeout_keep_alive_handler(self) -> None:
        """Close the connection: no request came within the keep-alive timeout."""
        self._close_without_close_notify_wait()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_open = True
        self._target_bytes = 0
        self._header_bytes = 0
        self._head_received = 0
        self._body_received = 0
        self._messages_begun_in_chunk += 1
        if self._chunk_starts_message and self._messages_begun_in_chunk == 1:
            self._head_chunks = [self._chunk[:MAX_HEAD_BYTES]]
        else:
            self._head_chunks = None
        extensions: dict[str, dict[object, object]] = {
            IDLE_TIMEOUT: {},
            CONNECTION_PEER: {"client": self.client},
            BODY_BATCH: {},
        }
        if self._zerocopy:
            extensions[ZEROCOPY_SEND] = {}
        self.scope["extensions"] = extensions

    def on_url(self, url: bytes) -> None:
        # llhttp passes the target in pieces, one per received chunk, which
        # uvicorn joins. Counting them rejects a long target as soon as it
        # passes the limit, before the rest of it arrives.
        self._target_bytes += len(url)
        if self._target_bytes > MAX_TARGET_BYTES:
            raise TargetTooLong(f"request target exceeds {MAX_TARGET_BYTES} bytes")
        super().on_url(url)

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
        # for the app. This one lets up to MAX_PENDING_BYTES gather first
        # (see PendingBody.full).
        cycle = self.cycle
        if cycle.response_complete or (
            self.parser.should_upgrade() and self._should_upgrade()
        ):
            return
        self._body_received += len(body)
        pending = self._pending_body(cycle)
        pending.append(body)
        if pending.full:
            self.flow.pause_reading()
        if pending.ready(cycle.scope):
            cycle.message_event.set()

    def _pending_body(self, cycle: RequestResponseCycle) -> PendingBody:
        pending = self._pending_bodies.get(cycle)
        if pending is None:
            pending = self._pending_bodies[cycle] = PendingBody()
        return pending

    def _start_asgi_task(
        self, cycle: RequestResponseCycle, app: ASGI3Application
    ) -> None:
        self._running_cycle = cycle
        # The cycle closes the connection after a response that ends it; this
        # transport lets such a close linger while the request body arrives.
        transport = _CycleTransport(self.transport, self._close_after_response)
        cycle.transport = transport  # type: ignore[assignment]
        if self._zerocopy:
            app = self._with_zerocopy(cycle, transport, app)
        app = self._with_pending_body(cycle, app)
        super()._start_asgi_task(cycle, app)

    def _with_pending_body(
        self, cycle: RequestResponseCycle, app: ASGI3Application
    ) -> ASGI3Application:
        """Wrap ``app`` so that it receives the body from the cycle's
        PendingBody instead of from uvicorn's bytearray."""
        receive = receive_from(cycle, self._pending_body(cycle))

        async def app_with_pending_body(
            scope: Scope, _receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            await app(scope, receive, send)

        return app_with_pending_body

    def on_response_complete(self) -> None:
        if self.transport.get_write_buffer_size() > 0:
            # The client has yet to take the end of the response.
            self._arm_idle_check()
        super().on_response_complete()
        if self._pending_rejection is not None and not self._response_in_flight():
            self._send_rejection(self._pending_rejection)

    # ---- zero-copy send -----------------------------------------------------

    def _with_zerocopy(
        self,
        cycle: RequestResponseCycle,
        transport: _CycleTransport,
        app: ASGI3Application,
    ) -> ASGI3Application:
        """Wrap ``app`` so that its zero-copy messages reach _send_file, and
        its response head goes out with the first body bytes."""

        async def app_with_zerocopy(
            scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
        ) -> None:
            async def send_message(message: ASGISendEvent) -> None:
                # uvicorn's message types do not include the extension's.
                event: Mapping[str, Any] = message
                kind = event["type"]
                if kind == ZEROCOPY_SEND:
                    transport.flush_head()
                    await self._send_file(cycle, event)
                    return
                if kind == "http.response.start":
                    transport.hold_head()
                try:
                    await send(message)
                finally:
                    if kind != "http.response.start":
                        # A body that wrote nothing, such as HEAD's.
                        transport.flush_head()

            await app(scope, receive, send_message)

        return app_with_zerocopy

    async def _send_file(
        self, cycle: RequestResponseCycle, message: Mapping[str, Any]
    ) -> None:
        """Send a zero-copy message's file range as (part of) the body.

        Raises ConnectionError when the client has gone or the write idle
        timeout closed the connection (the ASGI HTTP spec lets ``send`` raise
        OSError on a closed connection), and FileSendFailed when the file
        cannot be read or ends before ``count`` bytes. Both close the
        connection, and both carry ``bytes_sent``.
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
        the socket unwritable for THREAD_WRITABLE_WAIT_MS. Raises
        ConnectionClosed or FileSendFailed with the bytes sent so far, and
        lets CancelledError through with them in ``bytes_sent``.
        """
        await self._flush_transport()
        if self._connection_lost or self.transport.is_closing():
            raise ConnectionClosed("client disconnected before the response body")
        # The duplicate keeps the socket open while a thread uses it, even if
        # the transport closes its own descriptor and the number is reused.
        sock_fd = os.dup(self.transport.get_extra_info("socket").fileno())
        transfer = _FileTransfer()
        self._transfer = transfer
        self._arm_idle_check()
        try:
            while transfer.sent < count:
                if self._connection_lost:
                    raise ConnectionClosed(
                        "client disconnected during the response", transfer.sent
                    )
                # A cancelled task still waits for the thread, so sock_fd is
                # never closed while the thread uses it.
                await _sendfile_pool.run(
                    _send_until_blocked,
                    sock_fd,
                    file_fd,
                    offset,
                    count,
                    transfer,
                    self._is_connection_lost,
                    self._peer_is_loopback,
                )
                if transfer.sent < count:
                    await self._wait_writable(sock_fd)
        except ConnectionClosed:
            raise
        except ConnectionError as error:
            raise ConnectionClosed(
                f"client disconnected during the response: {error}", transfer.sent
            ) from error
        except OSError as error:
            raise FileSendFailed(str(error), transfer.sent) from error
        except asyncio.CancelledError as error:
            # A shutdown that ends in-flight requests cancels this send. The
            # app logs the bytes that went out, as for the errors above.
            error.bytes_sent = transfer.sent  # type: ignore[attr-defined]
            raise
        finally:
            self._transfer = None
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

    # ---- idle timeouts --------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_idle_check()

    def resume_writing(self) -> None:
        self._writes_resumed += 1
        super().resume_writing()

    def _arm_idle_check(self) -> None:
        if (
            self._idle_check is None
            and self._idle_check_interval is not None
            and not self._connection_lost
        ):
            self._idle_check = self.loop.call_later(
                self._idle_check_interval, self._check_idle
            )

    def _check_idle(self) -> None:
        """Close the connection if the client has moved no byte for a timeout.

        Runs every ``_idle_check_interval`` seconds while the server waits on
        the client. Progress is any change of the counters since the last
        check, so no timer is created per chunk.
        """
        self._idle_check = None
        if self._connection_lost:
            return
        now = self.loop.time()
        waiting = False

        read_timeout = self.read_idle_timeout
        if read_timeout is not None and self._awaiting_request():
            waiting = True
            if (
                self._read_idle_since is None
                or self._bytes_received != self._read_sample
            ):
                self._read_idle_since = now
                self._read_sample = self._bytes_received
            elif now - self._read_idle_since >= read_timeout:
                self._read_idle_since = None
                self._read_timed_out(read_timeout)
        else:
            self._read_idle_since = None

        write_timeout = self.write_idle_timeout
        if write_timeout is not None and self._output_pending():
            waiting = True
            sample = self._write_progress()
            if self._write_idle_since is None or sample != self._write_sample:
                self._write_idle_since = now
                self._write_sample = sample
            elif now - self._write_idle_since >= write_timeout:
                self._write_timed_out(write_timeout)
                return
        else:
            self._write_idle_since = None

        if waiting:
            self._arm_idle_check()

    def _awaiting_request(self) -> bool:
        """Return True while the server waits for request bytes from the client."""
        if self._rejected or self.flow.read_paused or self.transport.is_closing():
            return False
        if not self._message_open:
            # Only before a connection's first request: between requests,
            # uvicorn's keep-alive timeout closes an idle connection.
            return self.cycle is None
        if self._head_received is not None:
            # A pipelined head may wait while an earlier response goes out.
            return not self._response_in_flight()
        # uvicorn sends 100 Continue on the app's first receive, and until
        # then the client waits for it.
        return not self.cycle.waiting_for_100_continue

    def _output_pending(self) -> bool:
        return self._transfer is not None or self.transport.get_write_buffer_size() > 0

    def _write_progress(self) -> tuple[object, ...]:
        """Return values that stay equal only while no response byte moves.

        While the client takes nothing, nothing is added either: the
        transport pauses the app's writes, and the socket is not writable
        for sendfile.
        """
        transfer = self._transfer
        return (
            self._writes_resumed,
            transfer,
            transfer.sent if transfer is not None else 0,
            self.transport.get_write_buffer_size(),
            self._send_queue_bytes(),
        )

    def _send_queue_bytes(self) -> int | None:
        """Return the socket's send queue length, or None where it is unknown."""
        if self._socket_fd is None:
            return None
        try:
            raw = fcntl.ioctl(self._socket_fd, _SEND_QUEUE_IOCTL, bytes(4))
        except OSError:
            return None
        length: int = struct.unpack("i", raw)[0]
        return length

    def _read_timed_out(self, timeout: float) -> None:
        remote = self.client[0] if self.client else None
        if self._lingering:
            # The request has its response already, so only the draining
            # of its body ends early.
            log.debug(
                "lingering_close_timed_out",
                bytes_drained=self._lingered_bytes,
                timeout_s=timeout,
                remote=remote,
            )
            self.transport.close()
            return
        if not self._message_open or self._head_received is not None:
            log.warning(
                "request_head_timed_out",
                partial_head=self._message_open,
                timeout_s=timeout,
                remote=remote,
            )
            if self._message_open:
                # A connection that sent no byte has no request to respond to.
                self._send_timeout(
                    "timed out waiting for the rest of the request head",
                    {"idle_timeout_s": timeout},
                )
            self._close_without_close_notify_wait()
            return
        cycle = self.cycle
        details = _idle_timeout_details(cycle)
        details["timed_out"] = "read"
        log.warning(
            "request_body_timed_out",
            request_id=details.get("request_id"),
            method=cycle.scope["method"],
            path=cycle.scope["path"],
            bytes_received=self._body_received,
            timeout_s=timeout,
            remote=remote,
        )
        # Its app receives http.disconnect, and its sends are ignored.
        cycle.disconnected = True
        cycle.message_event.set()
        if not cycle.response_started:
            detail: dict[str, str | int | float] = {
                "idle_timeout_s": timeout,
                "bytes_received": self._body_received,
            }
            declared = _content_length(cycle.scope["headers"])
            if declared is not None:
                detail["content_length"] = declared
            self._send_timeout(
                "timed out waiting for the rest of the request body", detail
            )
        self._close_without_close_notify_wait()

    def _send_timeout(
        self, message: str, detail: Mapping[str, str | int | float]
    ) -> None:
        """Write a 408 with an OCI error body, so that a client still
        waiting, such as one whose Content-Length promised more than it
        sent, learns why the connection closes."""
        if not self.transport.is_closing():
            self.transport.write(
                rejection_response(
                    408,
                    message,
                    detail,
                    self.server_state.default_headers,
                    code=ErrorCode.UNKNOWN,
                )
            )

    def _write_timed_out(self, timeout: float) -> None:
        cycle = self._running_cycle
        fields: dict[str, object] = {}
        if cycle is not None:
            details = _idle_timeout_details(cycle)
            details["timed_out"] = "write"
            fields = {
                "request_id": details.get("request_id"),
                "method": cycle.scope["method"],
                "path": cycle.scope["path"],
            }
        log.warning(
            "response_timed_out",
            **fields,
            bytes_buffered=self.transport.get_write_buffer_size(),
            timeout_s=timeout,
            remote=self.client[0] if self.client else None,
        )
        # close() would wait until the client takes the buffered bytes.
        self.transport.abort()

    # ---- rejected requests --------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            # Drained bytes are activity for the read idle timeout, so a
            # client still sending is not cut off before it reads the
            # response.
            self._bytes_received += len(data)
            self._lingered_bytes += len(data)
            if self._lingered_bytes > LINGER_MAX_BYTES:
                self.transport.close()
            return
        if self._rejected:
            # The parser stopped at the error, so later bytes have no meaning.
            return
        self._bytes_received += len(data)
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
            return
        finally:
            self._chunk = b""
        if self._message_open and self._idle_check is None:
            # The rest of this request's head or body is awaited.
            self._arm_idle_check()

    def _close_after_response(self) -> None:
        """Close the connection, or linger if the request body still arrives.

        The response is complete. While lingering, the server has sent its
        FIN and discards what the client sends, until the client closes, or
        for LINGER_SECONDS or LINGER_MAX_BYTES, whichever ends first.
        """
        body_arriving = self._message_open and not self._rejected
        if (
            not body_arriving
            or self._lingering
            or self.transport.is_closing()
            or not self.transport.can_write_eof()
        ):
            if not body_arriving:
                self._close_without_close_notify_wait()
            else:
                self.transport.close()
            return
        self._lingering = True
        self.transport.write_eof()
        self.flow.resume_reading()
        self._linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _reject(self, error: httptools.HttpParserError) -> None:
        """Send a 400, 414 or 431 OCI error for a request that httptools
        rejected.

        The error follows every response to the requests before it on the
        connection, and then the connection closes.
        """
        self._rejected = True
        head = b"".join(self._head_chunks) if self._head_chunks is not None else None
        status, message, detail = describe_rejection(error, head)
        remote = self.client[0] if self.client else None
        if head is not None and head.startswith(TLS_HANDSHAKE_RECORD):
            # podman and skopeo try HTTPS first, and fall back to plain HTTP
            # for a registry configured as insecure, so every push to a
            # plain-HTTP cairn can begin with one of these.
            log.info("tls_handshake_rejected", remote=remote)
        else:
            log.warning(
                "request_rejected",
                status=status,
                error=message,
                detail=detail,
                remote=remote,
            )
        response = rejection_response(
            status, message, detail, self.server_state.default_headers
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


def configured_protocol(
    *, read_idle_timeout: float | None, write_idle_timeout: float | None
) -> type[CairnHttpProtocol]:
    """Return CairnHttpProtocol with these idle timeouts in seconds.

    None turns a timeout off. uvicorn creates the protocol itself, so the
    settings travel as class attributes.
    """
    read_timeout, write_timeout = read_idle_timeout, write_idle_timeout

    class ConfiguredHttpProtocol(CairnHttpProtocol):
        read_idle_timeout = read_timeout
        write_idle_timeout = write_timeout

    return ConfiguredHttpProtocol


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """Return the Content-Length in a request's ``headers``, which the
    parser has checked, or None without one."""
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None


def _idle_timeout_details(cycle: RequestResponseCycle) -> dict[object, object]:
    """Return the request's ``cairn.idle_timeout`` extension dict."""
    extensions = cycle.scope.get("extensions") or {}
    return extensions.setdefault(IDLE_TIMEOUT, {})


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _send_until_blocked(
    sock_fd: int,
    file_fd: int,
    offset: int,
    count: int,
    transfer: _FileTransfer,
    stopped: Callable[[], bool],
    copy: bool,
) -> None:
    """Send the rest of ``count`` bytes of ``file_fd`` from ``offset`` to the
    non-blocking socket, adding each call's bytes to ``transfer.sent``.

    With ``copy`` the bytes go by pread and write through a
    LOOPBACK_COPY_BYTES buffer, and otherwise by sendfile. Returns when all
    are sent, when the socket stayed unwritable for THREAD_WRITABLE_WAIT_MS
    or when ``stopped()`` became true. Raises ConnectionError (EPIPE,
    ECONNRESET) when the client has gone, and OSError when the file ends
    before ``count`` bytes.
    """
    if copy:
        send_some = _copier(sock_fd, file_fd, count - transfer.sent)
    else:
        send_some = _sendfiler(sock_fd, file_fd)
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    while transfer.sent < count and not stopped():
        sent = transfer.sent
        try:
            chunk = send_some(offset + sent, count - sent)
        except BlockingIOError:
            # poll also returns on POLLERR and POLLHUP, and the next send
            # then raises the connection's error.
            if not poller.poll(THREAD_WRITABLE_WAIT_MS):
                break
            continue
        if chunk == 0:
            raise OSError(f"file ended {count - sent} bytes before the range's end")
        # The event loop reads this while the thread runs, to see progress.
        transfer.sent = sent + chunk


def _sendfiler(sock_fd: int, file_fd: int) -> Callable[[int, int], int]:
    def send_some(position: int, remaining: int) -> int:
        return os.sendfile(sock_fd, file_fd, position, remaining)

    return send_some


def _copier(sock_fd: int, file_fd: int, total: int) -> Callable[[int, int], int]:
    """Return a send step that copies through one buffer, of at most
    LOOPBACK_COPY_BYTES and no larger than the ``total`` bytes left to send.
    Bytes read but not yet written stay in the buffer for the next step,
    which is always asked for the position right after the bytes written so
    far."""
    buffer = memoryview(bytearray(min(LOOPBACK_COPY_BYTES, total)))
    pending = buffer[:0]

    def send_some(position: int, remaining: int) -> int:
        nonlocal pending
        if not pending:
            length = min(len(buffer), remaining)
            read = os.preadv(file_fd, [buffer[:length]], position)
            if read == 0:
                return 0
            pending = buffer[:read]
        written = os.write(sock_fd, pending)
        pending = pending[written:]
        return written

    return send_some


def _is_loopback(peer: object) -> bool:
    """Return True when ``peer``, a socket's peer name, is a loopback address."""
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False
    try:
        return ipaddress.ip_address(peer[0].split("%", 1)[0]).is_loopback
    except ValueError:
        return False


# ---- describing a rejected request -------------------------------------------

# Words in llhttp's error reasons, which httptools passes on as the exception
# message, in order of precedence. Each comes with the part of the request it
# names and the message of the 400.
_REASON_PARTS: Final = (
    ("method", "method", "unsupported HTTP method"),
    ("url path", "path", "invalid characters in the request path"),
    ("url query", "query", "invalid characters in the request query"),
    ("url", "target", "invalid request target"),
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
) -> tuple[int, str, dict[str, str | int]]:
    """Return the status, message and detail for a request httptools rejected.

    The status is 414 (RFC 9110) for a target over MAX_TARGET_BYTES and 431
    (RFC 6585) for headers over MAX_HEADER_BYTES, each with the limit in the
    detail, and 400 otherwise. ``head`` is the request's bytes
    from its first byte, when known. The detail has ``reason``, the parser's
    words, and ``part``, the part of the request they name (method, path,
    query, target, header, body, version or request). It quotes the
    offending bytes as ``value`` (and the header's name as ``header``) where
    ``head`` contains them.
    """
    if _is_headers_too_large(error):
        too_large: dict[str, str | int] = {
            "part": "header",
            "reason": _reason(error),
            "limit": MAX_HEADER_BYTES,
        }
        return 431, "request headers too large", too_large
    if _is_target_too_long(error):
        too_long: dict[str, str | int] = {
            "part": "target",
            "reason": _reason(error),
            "limit": MAX_TARGET_BYTES,
        }
        lines = _head_lines(head)
        request_line = lines[0].split(b" ") if lines else []
        if len(request_line) > 1:
            too_long["value"] = quote_bytes(request_line[1])
        return 414, "request target too long", too_long
    reason = _reason(error)
    lowered = reason.lower()
    if isinstance(error, httptools.HttpParserInvalidMethodError):
        lowered = "method"
    part, message = "request", "invalid HTTP request"
    for keyword, keyword_part, keyword_message in _REASON_PARTS:
        if keyword in lowered:
            part, message = keyword_part, keyword_message
            break
    detail: dict[str, str | int] = {"part": part, "reason": reason}

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
    return 400, message, detail


def _headers_too_large() -> HeadersTooLarge:
    return HeadersTooLarge(f"request headers exceed {MAX_HEADER_BYTES} bytes")


def _is_headers_too_large(error: httptools.HttpParserError) -> bool:
    # A HeadersTooLarge raised in a parser callback reaches the protocol as
    # the context of the parser's own error.
    return isinstance(error, HeadersTooLarge) or isinstance(
        error.__context__, HeadersTooLarge
    )


def _is_target_too_long(error: httptools.HttpParserError) -> bool:
    return isinstance(error, TargetTooLong) or isinstance(
        error.__context__, TargetTooLong
    )


def _reason(error: httptools.HttpParserError) -> str:
    """Return llhttp's reason, or httptools.parse_url's for a failed callback."""
    if isinstance(error, HeadersTooLarge | TargetTooLong):
        return str(error)
    cause = error.__context__
    if isinstance(cause, HeadersTooLarge | TargetTooLong):
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
    status: int,
    message: str,
    detail: Mapping[str, str | int | float],
    default_headers: list[tuple[bytes, bytes]],
    *,
    code: ErrorCode = ErrorCode.UNSUPPORTED,
) -> bytes:
    """Return the bytes of an error response with the OCI error body, closing
    the connection."""
    body = error_body(code, message, dict(detail))
    lines = [STATUS_LINE[status]]
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


class _CycleTransport:
    """A proxy for the connection's transport, given to one request cycle.

    Its close() calls ``close`` instead, so that the close can linger. After
    hold_head(), the next write (uvicorn's response head) is kept and sent
    together with the write after it (the first body bytes), in one
    writev(2). A small response then costs one system call, not two. The
    event loop holds the GIL through each call, because uvloop 0.23 writes
    without releasing it. flush_head() sends a kept head alone, for a
    response whose body goes another way or has no bytes. Every other
    attribute is the transport's.
    """

    def __init__(self, transport: asyncio.Transport, close: Callable[[], None]):
        self._transport = transport
        self._close = close
        self._holding = False
        self._head: bytes | None = None

    def hold_head(self) -> None:
        self._holding = True

    def flush_head(self) -> None:
        self._holding = False
        head, self._head = self._head, None
        if head is not None:
            self._transport.write(head)

    def write(self, data: bytes) -> None:
        if self._holding:
            self._holding = False
            self._head = data
            return
        head, self._head = self._head, None
        if head is None:
            self._transport.write(data)
        elif data:
            self._transport.writelines((head, data))
        else:
            self._transport.write(head)

    def close(self) -> None:
        self.flush_head()
        self._close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
