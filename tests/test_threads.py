"""engine.api.threads: the worker thread pools behind every blocking call."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from engine.api import threads
from engine.api.threads import ThreadPool, run_sync

REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request")


async def _both(pool: ThreadPool) -> tuple[int, str]:
    total = await pool.run(lambda a, b: a + b, 2, 3)
    thread = await pool.run(threading.current_thread)
    return total, thread.name


def test_pool_returns_result() -> None:
    pool = ThreadPool(2, "named")

    total, name = asyncio.run(_both(pool))

    assert total == 5
    # The call ran in one of the pool's own threads.
    assert name.startswith("named-")


def test_pool_raises_call_error() -> None:
    pool = ThreadPool(2, "test")

    def fail() -> None:
        raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        asyncio.run(pool.run(fail))


def test_pool_copies_context() -> None:
    pool = ThreadPool(2, "test")

    async def main() -> str:
        REQUEST.set("r-1")
        return await pool.run(REQUEST.get)

    assert asyncio.run(main()) == "r-1"


def test_run_sync_keyword_arguments() -> None:
    def describe(name: str, *, size: int) -> str:
        return f"{name}:{size}"

    assert asyncio.run(run_sync(describe, "blob", size=3)) == "blob:3"


def test_pool_limits_threads() -> None:
    pool = ThreadPool(2, "test")
    lock = threading.Lock()
    running = 0
    peak = 0

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    async def main() -> None:
        await asyncio.gather(*(pool.run(work) for _ in range(8)))

    asyncio.run(main())

    assert peak == 2


def test_cancelled_task_waits_for_call() -> None:
    pool = ThreadPool(1, "test")
    started = threading.Event()
    release = threading.Event()
    finished = threading.Event()

    def slow() -> None:
        started.set()
        release.wait(10)
        finished.set()

    async def main() -> bool:
        task = asyncio.create_task(pool.run(slow))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        task.cancel()
        await asyncio.sleep(0.1)
        # The task still waits for its call, through a second cancellation.
        still_waiting = not task.done()
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        return still_waiting

    assert asyncio.run(main())
    assert finished.is_set()


def test_idle_threads_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "IDLE_THREAD_SECONDS", 0.05)
    pool = ThreadPool(4, "idle-exit")

    async def main() -> None:
        await asyncio.gather(*(pool.run(time.sleep, 0.05) for _ in range(4)))

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while any(t.name.startswith("idle-exit-") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "idle threads still running"
        time.sleep(0.05)

    # The pool starts new threads for later calls.
    assert asyncio.run(pool.run(lambda: 7)) == 7


def test_calls_after_queued_calls_and_idle_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(threads, "IDLE_THREAD_SECONDS", 0.05)
    pool = ThreadPool(2, "backlog")

    async def run_batch() -> None:
        # Six of the eight calls wait in the queue for one of the two threads.
        calls = (pool.run(time.sleep, 0.01) for _ in range(8))
        await asyncio.wait_for(asyncio.gather(*calls), timeout=10)

    asyncio.run(run_batch())
    deadline = time.monotonic() + 10
    while any(t.name.startswith("backlog-") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "idle threads still running"
        time.sleep(0.05)

    # Every thread has exited, so the pool must start a new one for this
    # call. A call that no thread takes waits for ever, and a cancelled one
    # too, so it runs in a thread of its own that the test stops waiting for.
    results: list[int] = []
    caller = threading.Thread(
        target=lambda: results.append(asyncio.run(pool.run(lambda: 7))),
        daemon=True,
    )
    caller.start()
    caller.join(10)
    assert results == [7]
