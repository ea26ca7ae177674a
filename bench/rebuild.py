"""Projection rebuild rate: append N events straight to the log, then time
`rebuild_projections` over them.

    .venv/bin/python -m bench.rebuild --events 1000000 [--database URL]

The events imitate image pushes: for each image three blob.pushed, one
manifest.pushed and one tag.set, spread over 10,000 repositories, with a
retag every tenth image. Prints one JSON object, with the seconds of each
phase of the median round (see PHASES in engine/projections/rebuild.py),
the CPU seconds of each round (all threads of the process), and the
process's peak resident set size, which includes the fill when there is one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa

from engine import log as event_log
from engine.bus.options import parse_count
from engine.db import Database, sqlite_url
from engine.domain.events import Actor, EventType, NewEvent
from engine.logs import configure_logging
from engine.migrate import upgrade
from engine.projections.rebuild import rebuild_projections

APPEND_BATCH = 5_000


def _digest(seed: str) -> str:
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def generate(count: int, repositories: int = 10_000) -> list[NewEvent]:
    events: list[NewEvent] = []
    image = 0
    while len(events) < count:
        repository = f"bench/repo{image % repositories}"
        layers = [_digest(f"{image}-{i}") for i in range(3)]
        for layer in layers:
            events.append(
                NewEvent(
                    EventType.BLOB_PUSHED, repository, {"digest": layer, "size": 1000}
                )
            )
        manifest = _digest(f"manifest-{image}")
        events.append(
            NewEvent(
                EventType.MANIFEST_PUSHED,
                repository,
                {
                    "digest": manifest,
                    "media_type": "application/vnd.oci.image.manifest.v1+json",
                    "size": 500,
                    "artifact_type": "application/vnd.oci.image.config.v1+json",
                    "subject": None,
                    "annotations": None,
                    "references": [
                        {
                            "kind": "layer",
                            "media_type": "a/b",
                            "digest": d,
                            "size": 1000,
                        }
                        for d in layers
                    ],
                    "content_size": 500 + 1000 * len(layers),
                },
            )
        )
        tag = "latest" if image % 10 == 0 else f"v{image}"
        events.append(
            NewEvent(
                EventType.TAG_SET,
                repository,
                {"tag": tag, "digest": manifest, "previous": None},
            )
        )
        image += 1
    return events[:count]


def fill(database: Database, count: int) -> float:
    started = time.perf_counter()
    events = generate(count)
    actor = Actor("bench", "127.0.0.1")
    for start in range(0, len(events), APPEND_BATCH):
        with database.write() as conn:
            event_log.append(
                conn,
                events[start : start + APPEND_BATCH],
                actor=actor,
                request_id=str(uuid.uuid4()),
            )
    return time.perf_counter() - started


def _log_length(database: Database) -> int:
    with database.read() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM events")).scalar_one())


def _empty_log(database: Database) -> None:
    with database.write() as conn:
        conn.execute(sa.text("DELETE FROM events"))
        conn.execute(
            sa.text("UPDATE log_head SET position = 0, hash = :h"), {"h": "0" * 64}
        )
        conn.execute(sa.text("DELETE FROM streams"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rebuild", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--events",
        type=parse_count,
        default=100_000,
        metavar="N",
        help="events in the log, 1 or more (default 100000)",
    )
    parser.add_argument(
        "--database", help="PostgreSQL URL; default SQLite in a temp dir"
    )
    parser.add_argument(
        "--rounds",
        type=parse_count,
        default=3,
        metavar="N",
        help="timed rebuilds, 1 or more, whose median is reported (default 3)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="directory for the SQLite database, kept after the run; "
        "default a temp dir that is removed",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="skip the fill when the log already contains exactly --events events",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging("warning")

    with tempfile.TemporaryDirectory(prefix="cairn-rebuild-") as tmp:
        data_dir = args.data_dir or Path(tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        database = Database(args.database or sqlite_url(data_dir))
        upgrade(database)
        fill_seconds = None
        if not (args.reuse and _log_length(database) == args.events):
            _empty_log(database)
            fill_seconds = round(fill(database, args.events), 2)
        rounds: list[tuple[float, float, dict[str, float]]] = []
        for _ in range(args.rounds):
            phases: dict[str, float] = {}
            started = time.perf_counter()
            cpu_started = time.process_time()
            rebuild_projections(database, phases=phases)
            cpu = time.process_time() - cpu_started
            rounds.append((time.perf_counter() - started, cpu, phases))
        database.dispose()

    rounds.sort(key=lambda result: result[0])
    timings = [seconds for seconds, _cpu, _phases in rounds]
    median, _median_cpu, median_phases = rounds[len(rounds) // 2]
    print(
        json.dumps(
            {
                "workload": "projection_rebuild",
                "backend": database.dialect,
                "events": args.events,
                "fill_seconds": fill_seconds,
                "rebuild_seconds": [round(t, 3) for t in timings],
                "rebuild_cpu_seconds": [round(cpu, 3) for _s, cpu, _p in rounds],
                "peak_rss_mib": round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                ),
                "events_per_second_median": round(args.events / median),
                "events_per_second_min": round(args.events / timings[-1]),
                "events_per_second_max": round(args.events / timings[0]),
                "median_round_phases": {
                    name: round(seconds, 3) for name, seconds in median_phases.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
