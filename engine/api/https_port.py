"""Connections to the HTTPS port: TLS, or a 400 for a plain HTTP request.

With --tls-cert, `cairn serve` creates its asyncio server without TLS and
HttpsPortProtocol looks at each connection's first byte before any TLS
layer reads it. It peeks at the byte (MSG_PEEK) on a duplicate of the
socket's descriptor, so the byte stays in the socket for the TLS handshake.

- An ASCII capital letter starts an HTTP method, such as GET or PUT: a client
  that sent plain HTTP, often from a URL typed with http:// instead of
  https://. It gets a 400 with an OCI error body that names the https://
  URL of the registry, and the connection closes. Go's net/http, which CNCF
  Distribution serves with, responds to such a request with "HTTP/1.0 400 Bad
  Request" and the body "Client sent an HTTP request to an HTTPS server."
  (src/net/http/server.go, conn.serve), though only for the first five bytes
  "GET /", "HEAD ", "POST ", "PUT /" and "OPTIO".
- Any other first byte, such as 0x16 (a TLS handshake record), starts TLS
  with asyncio's loop.start_tls, and the connection then goes to the HTTP
  protocol, as it would on a server created with TLS.

TLS_HANDSHAKE_TIMEOUT counts from the moment a connection is accepted, so
the wait for the first byte and the handshake together take at most that
long, as the handshake alone did before.

NOTE: cairn runs this protocol on asyncio's own event loop only (checked
with Python 3.11), and it was never tried on uvloop.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from typing import Any, ClassVar, Final

import structlog
from uvicorn.config import Config
from uvicorn.server import ServerState

from engine.api.protocol import (
    LINGER_MAX_BYTES,
    LINGER_SECONDS,
    CairnHttpProtocol,
    rejection_response,
)
from engine.config import MAX_PORT

log = structlog.get_logger(__name__)

# Seconds from accepting a connection until its TLS handshake is done, the
# default of asyncio's create_server and start_tls.
TLS_HANDSHAKE_TIMEOUT: Final = 60.0

# Bytes of a plain HTTP request's head read to find its Host header. The 400
# goes out once the head is complete or this many bytes have arrived.
MAX_PLAIN_HEAD_BYTES: Final = 8 * 1024

_HOST_HEADER: Final = re.compile(rb"^host:[ \t]*(.*?)[ \t]*\r?$", re.I | re.M)
# A host name or IPv4 address, or a bracketed IPv6 address, and an optional
# port, which https_url checks against MAX_PORT.
_AUTHORITY: Final = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>\d{1,5}))?"
)


class HttpsPortProtocol(asyncio.Protocol):
    """Protocol of a new connection to the HTTPS port.

    It starts TLS and hands the connection to ``http_protocol``, or sends a
    400 for a plain HTTP request and closes. uvicorn creates it with the
    arguments of its own HTTP protocols. Until the hand-over it is one of
    uvicorn's connections, so a graceful shutdown closes it.
    """

    # configured_https_protocol sets these.
    http_protocol: ClassVar[type[CairnHttpProtocol]] = CairnHttpProtocol
    tls_context: ClassVar[ssl.SSLContext | None] = None
    handshake_timeout: ClassVar[float] = TLS_HANDSHAKE_TIMEOUT

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._config = config
        self._server_state = server_state
        self._app_state = app_state
        self._transport: asyncio.Transport | None = None
        self._remote: str | None = None
        self._peek_socket: socket.socket | None = None
        self._deadline = 0.0
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._handshake: asyncio.Task[None] | None = None
        # The plain HTTP request's head so far, or None unless the client
        # sent plain HTTP.
        self._plain_head: bytearray | None = None
        self._responded = False
        self._lingered_bytes = 0
        self._finished = False

    # ---- asyncio protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # Nothing is read from the socket until the first byte decides
        # between TLS and plain HTTP.
        transport.pause_reading()
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) else None
        # uvicorn's shutdown calls shutdown() on each of its connections.
        self._server_state.connections.add(self)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.handshake_timeout
        self._deadline_timer = loop.call_at(self._deadline, self._deadline_passed)
        sock = transport.get_extra_info("socket")
        if sock is None:
            # Without a socket there is nothing to peek at.
            self._handshake = loop.create_task(self._start_tls())
            return
        # loop.add_reader rejects a descriptor that a transport owns, so the
        # peek watches a duplicate of it.
        self._peek_socket = socket.socket(fileno=os.dup(sock.fileno()))
        self._peek_socket.setblocking(False)
        loop.add_reader(self._peek_socket.fileno(), self._first_byte_ready)

    def data_received(self, data: bytes) -> None:
        # Only a plain HTTP client's bytes arrive here, because reading
        # stays paused until the first byte shows plain HTTP.
        if self._responded:
            self._lingered_bytes += len(data)
            if self._lingered_bytes > LINGER_MAX_BYTES:
                self._close()
            return
        head = self._plain_head
        if head is None:
            return
        head += data[: MAX_PLAIN_HEAD_BYTES - len(head)]
        if b"\r\n\r\n" in head or len(head) >= MAX_PLAIN_HEAD_BYTES:
            self._reject_plain_request(half_close=True)

    def eof_received(self) -> bool | None:
        if self._plain_head is not None and not self._responded:
            self._reject_plain_request(half_close=False)
        # The transport closes itself once the response is written.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def shutdown(self) -> None:
        """Close the connection: uvicorn calls this on a graceful shutdown."""
        self._close()

    # ---- the first byte -----------------------------------------------------

    def _first_byte_ready(self) -> None:
        loop = asyncio.get_running_loop()
        peek_socket = self._peek_socket
        assert peek_socket is not None
        loop.remove_reader(peek_socket.fileno())
        try:
            first = peek_socket.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            loop.add_reader(peek_socket.fileno(), self._first_byte_ready)
            return
        except OSError as error:
            log.debug("connection_failed", remote=self._remote, error=str(error))
            self._close()
            return
        self._close_peek_socket()
        if not first:
            # The client closed the connection without sending a byte.
            self._close()
        elif b"A" <= first <= b"Z":
            self._plain_head = bytearray()
            assert self._transport is not None
            self._transport.resume_reading()
        else:
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
                self._deadline_timer = None
            self._handshake = loop.create_task(self._start_tls())

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        if self._plain_head is not None and not self._responded:
            # A plain HTTP client that sends its head slowly still learns
            # that the port serves HTTPS.
            self._reject_plain_request(half_close=False)
            self._close()
        elif not self._responded:
            log.debug(
                "tls_handshake_timed_out",
                remote=self._remote,
                timeout_s=self.handshake_timeout,
            )
            self._close()

    # ---- TLS ----------------------------------------------------------------

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        transport = self._transport
        assert transport is not None and self.tls_context is not None
        early = _EarlyEvents()
        try:
            tls_transport = await loop.start_tls(
                transport,
                early,
                self.tls_context,
                server_side=True,
                # start_tls takes no deadline, so it gets what is left of
                # the connection's.
                ssl_handshake_timeout=max(self._deadline - loop.time(), 0.001),
            )
        except OSError as error:
            # The handshake failed or timed out, and start_tls has closed the
            # transport. Clients that do not trust the certificate end here.
            log.debug("tls_handshake_failed", remote=self._remote, error=str(error))
            self._finish()
            return
        except BaseException:
            # Cancelled by shutdown() or when the event loop closes.
            transport.close()
            self._finish()
            raise

        # NOTE: Python 3.11's start_tls returns None instead of a transport
        # when the connection closed without an error after the handshake
        # but before start_tls returned.
        if tls_transport is None or early.lost or tls_transport.is_closing():
            if tls_transport is not None:
                tls_transport.close()
            self._finish()
            return

        protocol = self.http_protocol(
            config=self._config,
            server_state=self._server_state,
            app_state=self._app_state,
            _loop=loop,
            tcp_transport=transport,
        )
        tls_transport.set_protocol(protocol)
        protocol.connection_made(tls_transport)
        self._finish()
        early.hand_over(protocol)

    # ---- plain HTTP ---------------------------------------------------------

    def _reject_plain_request(self, *, half_close: bool) -> None:
        """Send the 400 for a plain HTTP request, then close the connection.

        With ``half_close`` the server sends its FIN, then reads and discards
        what the client still sends, for at most LINGER_SECONDS and
        LINGER_MAX_BYTES. Closing with unread bytes would make the kernel
        reset the connection, and the client could lose the response.
        """
        transport = self._transport
        assert transport is not None and self._plain_head is not None
        self._responded = True
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        url = https_url(bytes(self._plain_head), transport.get_extra_info("sockname"))
        log.info("plain_http_request_rejected", remote=self._remote, url=url)
        message = f"this port serves HTTPS, not plain HTTP: use {url}"
        transport.write(
            rejection_response(
                400, message, {"url": url}, self._server_state.default_headers
            )
        )
        if not half_close or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._deadline_timer = asyncio.get_running_loop().call_later(
            LINGER_SECONDS, self._close
        )

    # ---- closing ------------------------------------------------------------

    def _close(self) -> None:
        if self._handshake is not None and not self._handshake.done():
            # The transport belongs to the TLS layer now. start_tls closes it
            # when cancelled.
            self._handshake.cancel()
            return
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self._finish()

    def _close_peek_socket(self) -> None:
        peek_socket = self._peek_socket
        if peek_socket is None:
            return
        self._peek_socket = None
        asyncio.get_running_loop().remove_reader(peek_socket.fileno())
        peek_socket.close()

    def _finish(self) -> None:
        """Release what this protocol holds; the hand-over or the close is done."""
        if self._finished:
            return
        self._finished = True
        self._close_peek_socket()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._server_state.connections.discard(self)


class _EarlyEvents(asyncio.Protocol):
    """The TLS transport's protocol until start_tls returns.

    Python 3.11's SSLProtocol passes decrypted bytes to this protocol as
    soon as the handshake completes, before start_tls returns. They are
    kept here and passed on, in order, by hand_over.
    """

    def __init__(self) -> None:
        self._data: list[bytes] = []
        self._eof = False
        self.lost = False
        self._target: asyncio.Protocol | None = None

    def data_received(self, data: bytes) -> None:
        if self._target is not None:
            self._target.data_received(data)
        else:
            self._data.append(data)

    def eof_received(self) -> bool | None:
        if self._target is not None:
            return self._target.eof_received()
        self._eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._target is not None:
            self._target.connection_lost(exc)
        self.lost = True

    def hand_over(self, target: asyncio.Protocol) -> None:
        """Pass the kept events to ``target``, and later ones as they come."""
        self._target = target
        if self._data:
            target.data_received(b"".join(self._data))
            self._data = []
        if self._eof:
            target.eof_received()


def https_url(head: bytes, sockname: object) -> str:
    """Return the https:// URL for a plain HTTP request's head.

    The host comes from the Host header when the head has one, with a valid
    host and port, and from the socket's local address otherwise. A host
    without a port gets the local port.
    """
    local_host, local_port = "localhost", 443
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        local_host, local_port = str(sockname[0]), int(sockname[1])
    # Skip the request line, which could end in "host:".
    headers = head.partition(b"\n")[2].partition(b"\r\n\r\n")[0]
    hosts = _HOST_HEADER.findall(headers)
    match = _AUTHORITY.fullmatch(hosts[0]) if len(hosts) == 1 else None
    port = match.group("port") if match is not None else None
    if match is not None and (port is None or int(port) <= MAX_PORT):
        authority = hosts[0].decode("ascii")
    elif ":" in local_host:
        authority = f"[{local_host}]"
    else:
        authority = local_host
    if not re.search(r"(?:^[^\[]*|\]):\d+$", authority):
        authority += f":{local_port}"
    return f"https://{authority}"


def configured_https_protocol(
    http_protocol: type[CairnHttpProtocol],
    tls_context: ssl.SSLContext,
    handshake_timeout: float = TLS_HANDSHAKE_TIMEOUT,
) -> type[HttpsPortProtocol]:
    """Return HttpsPortProtocol serving ``http_protocol`` over ``tls_context``.

    uvicorn creates the protocol itself, so the settings travel as class
    attributes.
    """
    protocol, context, timeout = http_protocol, tls_context, handshake_timeout

    class ConfiguredHttpsPortProtocol(HttpsPortProtocol):
        http_protocol = protocol
        tls_context = context
        handshake_timeout = timeout

    return ConfiguredHttpsPortProtocol
