"""Request bodies: bounded reads, and streams handed to a worker thread.

An upload body is received on the event loop, coalesced into buffers of
about ``BUFFER_SIZE`` and passed through a bounded queue to the synchronous
registry call that writes and hashes it in a worker thread. Receiving and
writing overlap, and an upload keeps at most ``QUEUE_DEPTH + 2`` buffers in
memory however large it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from engine.api.http import ClientDisconnected, Request
from engine.api.memory import TRIMMER
from engine.blobs.limits import check_received_size
from engine.domain.errors import ManifestTooLarge, SizeInvalid

T = TypeVar("T")

BUFFER_SIZE: Final = 1024 * 1024
# Each queued buffer costs every concurrent upload 1 MiB. On a machine whose
# disk wrote 418 MiB/s with fsync, 32 concurrent 64 MiB uploads peaked at
# 404 MiB RSS with 4 and at 279 to 302 MiB with 2. 256 MiB pushes ran at
# the same rate with either (bench/run, workloads big-blob and memory).
QUEUE_DEPTH: Final = 2

_END: Final = object()


async def read_limited(request: Request, limit: int) -> bytes:
    """Read the whole body, raising ManifestTooLarge past ``limit`` bytes.

    A declared Content-Length over the limit is rejected before any byte is
    read. A chunked body is read no further than one chunk past the limit.
    """
    declared = request.content_length()
    if declared is not None and declared > limit:
        raise ManifestTooLarge(
            f"manifest is larger than {limit} bytes",
            {"size": declared, "limit": limit},
        )
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ManifestTooLarge(
                f"manifest is larger than {limit} bytes: {size} bytes received",
                {"received": size, "limit": limit},
            )
        parts.append(chunk)
    return b"".join(parts)


class _ChunkPipe:
    """A bounded queue from the event loop (producer) to one worker thread."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self._space = asyncio.Event()
        self._error: BaseException | None = None
        self.consumer_done = False

    async def put(self, chunk: bytes) -> bool:
        """Queue ``chunk``; return False if the consumer stopped reading."""
        while not self.consumer_done:
            try:
                self._queue.put_nowait(chunk)
                return True
            except queue.Full:
                self._space.clear()
                if not self._queue.full():
                    continue
                await self._space.wait()
        return False

    def abort(self, error: BaseException) -> None:
        """Make the worker's next read raise ``error``."""
        self._error = error
        # When the queue is full the worker is busy, and it checks the error
        # before each chunk it takes.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(_END)

    def chunks(self) -> Iterator[bytes]:
        """Yield the queued chunks; runs in the worker thread."""
        while True:
            item = self._queue.get()
            self._loop.call_soon_threadsafe(self._space.set)
            if self._error is not None:
                raise self._error
            if item is _END:
                return
            yield item  # type: ignore[misc]

    def consumer_finished(self) -> None:
        """Called from the worker thread when the registry call returns."""

        def mark() -> None:
            self.consumer_done = True
            self._space.set()

        self._loop.call_soon_threadsafe(mark)


@dataclass(frozen=True, slots=True)
class BlobLimit:
    """The maximum blob size, and the blob offset at which a body starts."""

    max_blob_size: int | None
    offset: int = 0

    def check(self, received: int) -> None:
        """Raise BlobTooLarge once ``received`` body bytes take the blob past
        the maximum blob size."""
        check_received_size(self.offset + received, self.max_blob_size)


NO_LIMIT: Final = BlobLimit(None)


async def stream_to_thread(
    request: Request,
    consume: Callable[[Iterator[bytes]], T],
    *,
    expected_size: int | None = None,
    limit: BlobLimit = NO_LIMIT,
) -> T:
    """Run ``consume(chunks)`` in a worker thread, fed with the request body.

    ``expected_size`` is the body length a Content-Range header declared; a
    body of another length raises SizeInvalid inside ``consume``, before it
    can commit anything. A body that takes the blob past ``limit`` raises
    BlobTooLarge there as soon as its bytes are received, and a client that
    disconnects makes ``consume`` raise ClientDisconnected, in the same way.
    """
    declared = request.content_length()
    if declared is not None and declared <= BUFFER_SIZE:
        return await _consume_whole(request, consume, expected_size, limit)
    pipe = _ChunkPipe()

    def run() -> T:
        TRIMMER.upload_started()
        try:
            return consume(pipe.chunks())
        finally:
            pipe.consumer_finished()
            TRIMMER.upload_finished(request.bytes_in)

    worker = asyncio.ensure_future(request.state.upload_pool.run(run))
    pump = asyncio.ensure_future(_pump(request, pipe, expected_size, limit))
    try:
        await asyncio.wait({pump, worker}, return_when=asyncio.FIRST_COMPLETED)
        if pump.done():
            pump.result()
        else:
            # The worker stopped before the body ended, so it failed: its
            # error goes to the client now, not when more body bytes come.
            pump.cancel()
            await _wait_uncancellable(pump)
    except BaseException as error:
        pump.cancel()
        if isinstance(error, Exception):
            pipe.abort(error)
        else:
            pipe.abort(ClientDisconnected("request cancelled"))
        await _wait_uncancellable(worker)
        await _wait_uncancellable(pump)
        raise
    return await worker


async def _consume_whole(
    request: Request,
    consume: Callable[[Iterator[bytes]], T],
    expected_size: int | None,
    limit: BlobLimit,
) -> T:
    """Read a body of at most BUFFER_SIZE bytes, then consume it in one
    worker-thread call.

    A small blob gets one thread hop instead of the pipe's handshake for
    every chunk. The pipe path would also have joined such a body into a
    single buffer.
    """
    parts: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        limit.check(received)
        parts.append(chunk)
    body = b"".join(parts)
    if expected_size is not None and len(body) != expected_size:
        raise _size_mismatch(expected_size, len(body))

    def run() -> T:
        TRIMMER.upload_started()
        try:
            return consume(iter((body,) if body else ()))
        finally:
            TRIMMER.upload_finished(request.bytes_in)

    return await request.state.upload_pool.run(run)


async def _pump(
    request: Request, pipe: _ChunkPipe, expected_size: int | None, limit: BlobLimit
) -> None:
    parts: list[bytes] = []
    buffered = 0
    received = 0
    request.batch_body(_batch_size(buffered, received, expected_size, limit))
    async for chunk in request.stream():
        received += len(chunk)
        if expected_size is not None and received > expected_size:
            raise _size_mismatch(expected_size, received)
        limit.check(received)
        if pipe.consumer_done:
            return
        parts.append(chunk)
        buffered += len(chunk)
        if buffered >= BUFFER_SIZE:
            if not await pipe.put(b"".join(parts)):
                return
            parts.clear()
            buffered = 0
        if not pipe.consumer_done:
            request.batch_body(_batch_size(buffered, received, expected_size, limit))
    if parts and not await pipe.put(b"".join(parts)):
        return
    if expected_size is not None and received != expected_size:
        raise _size_mismatch(expected_size, received)
    await pipe.put(_END)  # type: ignore[arg-type]


def _batch_size(
    buffered: int, received: int, expected_size: int | None, limit: BlobLimit
) -> int:
    """Return how many more body bytes _pump needs before it can act.

    That is the rest of a buffer, or one byte past the declared length or the
    maximum blob size when fewer, so that a body over either is rejected as
    soon as it arrives."""
    size = BUFFER_SIZE - buffered
    if expected_size is not None:
        size = min(size, expected_size - received + 1)
    if limit.max_blob_size is not None:
        size = min(size, limit.max_blob_size - limit.offset - received + 1)
    return max(size, 1)


async def _wait_uncancellable(worker: asyncio.Future[Any]) -> None:
    """Wait until ``worker`` ends, even while this task is being cancelled.

    The worker thread holds the upload's lock and staging file, so no request
    may end while it still runs.
    """
    cancelled = False
    while not worker.done():
        try:
            await asyncio.wait({worker})
        except asyncio.CancelledError:
            cancelled = True
    if not worker.cancelled():
        worker.exception()  # Retrieved, so asyncio does not warn about it.
    if cancelled:
        raise asyncio.CancelledError


def _size_mismatch(expected: int, received: int) -> SizeInvalid:
    return SizeInvalid(
        "request body length does not match the Content-Range header",
        {"content_range_length": expected, "received": received},
    )
