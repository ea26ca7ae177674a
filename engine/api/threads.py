"""Worker threads for the synchronous registry, so the event loop never blocks.

The handlers make every database call, disk read and hash in a worker thread:
short calls through ``run_sync``, upload bodies through engine.api.body. An
upload body occupies its thread for as long as the client sends, so uploads
get a pool of their own and cannot take the threads of the short calls.

A call costs one put on a C ``SimpleQueue`` and one ``call_soon_threadsafe``
back to the loop. anyio.to_thread, which cairn used before, also takes a
capacity limiter token, finds the loop's threads through run variables and
wakes a thread through a ``queue.Queue`` condition. In a py-spy profile of
small blob pushes, its run_sync took 13% of the samples that held the GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import queue
import threading
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

T = TypeVar("T")

# Threads of the pool for short calls, as many as anyio's default limiter.
MAX_SHORT_CALL_THREADS: Final = 40

# Concurrent upload bodies being written; more wait for a free thread.
MAX_UPLOAD_THREADS: Final = 64

# A thread with no call for this long exits, and the pool starts a new one
# when calls arrive again.
IDLE_THREAD_SECONDS: Final = 10.0


class _Call(Generic[T]):
    """One call on its way to a thread and its result on its way back."""

    __slots__ = ("after_cancel", "args", "context", "delivered", "func", "future")

    def __init__(
        self,
        func: Callable[..., T],
        args: tuple[Any, ...],
        future: asyncio.Future[T],
    ) -> None:
        self.func = func
        self.args = args
        self.future = future
        self.context = contextvars.copy_context()
        self.delivered = False
        # Set when the awaiting task was cancelled while the thread still ran.
        self.after_cancel: asyncio.Future[None] | None = None


class ThreadPool:
    """Up to ``size`` threads that run blocking calls for event loops.

    Calls beyond ``size`` wait in the queue for a free thread. A task
    cancelled while its call runs waits until the call returns, and only
    then raises CancelledError, so that no request ends while its thread
    still uses the request's files or locks.
    """

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self._name = name
        self._queue: queue.SimpleQueue[_Call[Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        # Threads waiting for a call that no caller has reserved yet.
        self._idle = 0
        # Calls queued while every thread was busy. A thread that finishes a
        # call takes one of these before it counts as idle.
        self._backlog = 0

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Run ``func(*args)`` in a thread of the pool and return its result.

        The call runs in a copy of the caller's context variables.
        """
        loop = asyncio.get_running_loop()
        call: _Call[T] = _Call(func, args, loop.create_future())
        self._reserve_thread()
        self._queue.put(call)
        try:
            return await call.future
        except asyncio.CancelledError:
            if not call.delivered:
                await _wait_for_thread(call, loop)
            raise

    def _reserve_thread(self) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                return
            if self._threads >= self.size:
                self._backlog += 1
                return
            self._threads += 1
        thread = threading.Thread(
            target=self._work, name=f"{self._name}-{self._threads}", daemon=True
        )
        thread.start()

    def _work(self) -> None:
        while True:
            try:
                call = self._queue.get(timeout=IDLE_THREAD_SECONDS)
            except queue.Empty:
                with self._lock:
                    # With no idle thread left to account for, a caller has
                    # reserved this one and is about to put its call.
                    if self._idle > 0:
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            _run_call(call)
            del call
            with self._lock:
                if self._backlog > 0:
                    self._backlog -= 1
                else:
                    self._idle += 1


def _run_call(call: _Call[Any]) -> None:
    loop = call.future.get_loop()
    try:
        result = call.context.run(call.func, *call.args)
    except BaseException as error:
        _deliver(loop, call, None, error)
    else:
        _deliver(loop, call, result, None)


def _deliver(
    loop: asyncio.AbstractEventLoop,
    call: _Call[Any],
    result: object,
    error: BaseException | None,
) -> None:
    # A closed loop raises RuntimeError, and then no task awaits the result.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, call, result, error)


def _settle(call: _Call[Any], result: object, error: BaseException | None) -> None:
    call.delivered = True
    if call.after_cancel is not None and not call.after_cancel.done():
        call.after_cancel.set_result(None)
    if call.future.done():
        return
    if error is not None:
        call.future.set_exception(error)
    else:
        call.future.set_result(result)


async def _wait_for_thread(call: _Call[Any], loop: asyncio.AbstractEventLoop) -> None:
    """Wait until ``call`` returns in its thread, through further cancellations."""
    call.after_cancel = loop.create_future()
    while not call.delivered:
        try:
            await asyncio.shield(call.after_cancel)
        except asyncio.CancelledError:
            continue


_short_calls = ThreadPool(MAX_SHORT_CALL_THREADS, "cairn-worker")


async def run_sync(func: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Run ``func(*args, **kwargs)`` in a worker thread and return its result."""
    if kwargs:
        return await _short_calls.run(functools.partial(func, *args, **kwargs))
    return await _short_calls.run(func, *args)


def upload_pool() -> ThreadPool:
    """Return a new pool for upload bodies, one per app."""
    return ThreadPool(MAX_UPLOAD_THREADS, "cairn-upload")
