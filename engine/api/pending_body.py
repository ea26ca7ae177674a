"""Request body bytes on their way from the HTTP parser to the app.

uvicorn's ``RequestResponseCycle`` appends every piece of body that the
parser delivers to a bytearray, and its ``receive`` hands the app a bytes
copy of that bytearray. That makes two copies of each uploaded byte on the
event loop, on top of the parser's own. PendingBody keeps the parser's bytes objects
instead and hands the app the only one, or their join when several arrived
since its last receive. An app that sets a batch (BODY_BATCH) is woken once
that many bytes wait, so an upload gets its 1 MiB buffers joined here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from uvicorn._types import ASGIReceiveCallable, ASGIReceiveEvent
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

# Bytes of body received before the server stops reading the socket until
# the app takes them. Upload bodies go to disk in 1 MiB buffers, and
# uvicorn's own limit is 64 KiB.
MAX_PENDING_BYTES: Final = 1024 * 1024
# Pieces of body received before the server stops reading likewise. A
# chunked body of tiny chunks would otherwise hold one bytes object, about
# 34 bytes with its header, and a list slot for each byte of body.
MAX_PENDING_PARTS: Final = 1024

# The scope extension through which an app requests to be woken only once
# this many body bytes wait, as {"bytes": N}. Without it, every piece of body
# that the parser delivers wakes the app, which then joins the pieces itself.
# An upload that gathers 1 MiB here is woken once per buffer, not once per
# piece, and most pieces were 256,000 bytes in a 256 MiB push over loopback.
# Its pieces are then joined once, here, where they could be joined twice.
BODY_BATCH: Final = "cairn.body_batch"


class PendingBody:
    """Body bytes that the parser delivered and the app has not received."""

    __slots__ = ("_parts", "size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def append(self, body: bytes) -> None:
        self._parts.append(body)
        self.size += len(body)

    @property
    def full(self) -> bool:
        """Whether the server should stop reading until the app takes the
        body: more than MAX_PENDING_BYTES or MAX_PENDING_PARTS wait."""
        return self.size > MAX_PENDING_BYTES or len(self._parts) > MAX_PENDING_PARTS

    def ready(self, scope: Mapping[str, Any]) -> bool:
        """Whether the app should take the body now: the batch that the
        request's BODY_BATCH extension requests has arrived, or the body is
        full and the server has stopped reading."""
        batch = (scope.get("extensions") or {}).get(BODY_BATCH) or {}
        return self.size >= batch.get("bytes", 0) or self.full

    def take(self) -> bytes:
        """Remove and return everything appended since the last take."""
        parts = self._parts
        self._parts = []
        self.size = 0
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)


def receive_from(cycle: RequestResponseCycle, body: PendingBody) -> ASGIReceiveCallable:
    """Return the ASGI receive callable of ``cycle``, reading ``body``.

    It does what ``RequestResponseCycle.receive`` of uvicorn 0.55 does, but
    takes the body from ``body``. It sends 100 Continue when the client
    waits for it, lets the socket be read again and waits for body bytes (as
    many as BODY_BATCH requests) or the end of the message. Once the client
    has gone or the response is complete, it returns ``http.disconnect``.
    """

    async def receive() -> ASGIReceiveEvent:
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        if not cycle.disconnected and not cycle.response_complete:
            cycle.flow.resume_reading()
            # The app may have lowered its batch since the bytes waiting
            # here arrived, and then no further piece need come to wake it.
            if not (body.size and body.ready(cycle.scope)):
                await cycle.message_event.wait()
            cycle.message_event.clear()
        if cycle.response_complete or (cycle.disconnected and not body.size):
            return {"type": "http.disconnect"}
        # Bytes that arrived before the client disconnected, fewer than the
        # batch, still reach the app, which counts them as received. Its next
        # receive returns http.disconnect.
        return {
            "type": "http.request",
            "body": body.take(),
            "more_body": cycle.more_body or cycle.disconnected,
        }

    return receive
