"""Dashboard query latency over a large log.

    .venv/bin/python -m bench.queries [--database URL] [--repositories 10000]

Builds a log of image pushes straight through engine.log.append: 10,000
repositories with 20 tags each and 100 events each, so 1,000,000 events,
spread over the 365 days before now. Then it rebuilds the projections from
the log and times each query of engine.queries the way the dashboard API
runs it (a read snapshot, the log head, the query). Prints one JSON object
with the median and 90th percentile in milliseconds per query.

Each repository gets 25 pushes of 4 events each (config blob, layer blob,
manifest, tag). Pushes 1-20 create tags t0-t19, pushes 21-24 move t0-t3 to
new images, and push 25 adds a signature whose subject is the first image,
then deletes and re-creates t19. Users user0-user49 take turns as actors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from engine import log as event_log
from engine import queries
from engine.bus.options import parse_count
from engine.db import Database, sqlite_url
from engine.domain.events import Actor, EventType, NewEvent
from engine.logs import configure_logging
from engine.migrate import upgrade
from engine.projections.rebuild import rebuild_projections
from engine.tables import events, tags

PUSHES_PER_REPOSITORY = 25
NEW_TAGS = 20
# Pushes that share one append call, and so one event time.
PUSHES_PER_APPEND = 10
APPENDS_PER_TRANSACTION = 500
SPAN = timedelta(days=365)
USERS = 50

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
SIGNATURE = "application/vnd.example.signature"


def _digest(seed: str) -> str:
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def _manifest_event(
    repository: str, seed: str, blobs: list[tuple[str, str, int]], subject: str | None
) -> tuple[NewEvent, str]:
    digest = _digest(f"manifest/{seed}")
    references = [
        {"kind": kind, "media_type": media_type, "digest": blob, "size": size}
        for kind, blob, size, media_type in (
            (kind, blob, size, CONFIG if kind == "config" else LAYER)
            for kind, blob, size in blobs
        )
    ]
    size = 400 + len(seed)
    payload = {
        "digest": digest,
        "media_type": MANIFEST,
        "size": size,
        "artifact_type": SIGNATURE if subject else CONFIG,
        "subject": subject,
        "annotations": {"org.example.signed-by": "bench"} if subject else None,
        "references": references,
        "content_size": size + sum(size for _, _, size in blobs),
    }
    return NewEvent(EventType.MANIFEST_PUSHED, repository, payload), digest


def push_events(
    repository: str, number: int, state: dict[str, Any], rng: random.Random
) -> list[NewEvent]:
    """Return the four events of push ``number`` (0-based) to ``repository``."""
    seed = f"{repository}/{number}"
    tags: dict[str, str] = state.setdefault("tags", {})
    if number == PUSHES_PER_REPOSITORY - 1:
        signature_blob = _digest(f"signature/{seed}")
        manifest, digest = _manifest_event(
            repository, seed, [("layer", signature_blob, 256)], state["first"]
        )
        last_tag = f"t{NEW_TAGS - 1}"
        previous = tags[last_tag]
        return [
            NewEvent(
                EventType.BLOB_PUSHED,
                repository,
                {"digest": signature_blob, "size": 256},
            ),
            manifest,
            NewEvent(
                EventType.TAG_DELETED,
                repository,
                {"tag": last_tag, "previous": previous},
            ),
            NewEvent(
                EventType.TAG_SET,
                repository,
                {"tag": last_tag, "digest": previous, "previous": None},
            ),
        ]

    config = _digest(f"config/{seed}")
    layer = _digest(f"layer/{seed}")
    layer_size = rng.randint(1_000, 50_000_000)
    manifest, digest = _manifest_event(
        repository,
        seed,
        [("config", config, 1_500), ("layer", layer, layer_size)],
        None,
    )
    state.setdefault("first", digest)
    tag = f"t{number}" if number < NEW_TAGS else f"t{number - NEW_TAGS}"
    replaced = tags.get(tag)
    tags[tag] = digest
    return [
        NewEvent(EventType.BLOB_PUSHED, repository, {"digest": config, "size": 1_500}),
        NewEvent(
            EventType.BLOB_PUSHED, repository, {"digest": layer, "size": layer_size}
        ),
        manifest,
        NewEvent(
            EventType.TAG_SET,
            repository,
            {"tag": tag, "digest": digest, "previous": replaced},
        ),
    ]


def build(database: Database, repository_count: int, now: datetime) -> dict[str, Any]:
    """Append the whole log, then rebuild the projections from it."""
    rng = random.Random(7)
    schedule = sorted(
        (rng.random(), repository)
        for repository in range(repository_count)
        for _ in range(PUSHES_PER_REPOSITORY)
    )
    states: list[dict[str, Any]] = [{} for _ in range(repository_count)]
    counts = [0] * repository_count
    start = now - SPAN

    started = time.perf_counter()
    event_count = 0
    batches = [
        schedule[first : first + PUSHES_PER_APPEND]
        for first in range(0, len(schedule), PUSHES_PER_APPEND)
    ]
    for group in range(0, len(batches), APPENDS_PER_TRANSACTION):
        with database.write() as conn:
            for number, batch in enumerate(
                batches[group : group + APPENDS_PER_TRANSACTION], start=group
            ):
                new_events: list[NewEvent] = []
                for _, repository in batch:
                    name = f"team{repository % 100}/app{repository}"
                    new_events += push_events(
                        name, counts[repository], states[repository], rng
                    )
                    counts[repository] += 1
                event_log.append(
                    conn,
                    new_events,
                    actor=Actor(user=f"user{number % USERS}", address="127.0.0.1"),
                    now=start + SPAN * batch[0][0],
                )
                event_count += len(new_events)
    appended = time.perf_counter() - started

    started = time.perf_counter()
    position = rebuild_projections(database)
    rebuilt = time.perf_counter() - started
    return {
        "events": event_count,
        "position": position,
        "append_seconds": round(appended, 1),
        "rebuild_seconds": round(rebuilt, 1),
    }


def _timed(
    database: Database, query: Callable[[Connection], Any], iterations: int
) -> dict[str, float]:
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        with queries.snapshot(database) as conn:
            queries.log_head(conn)
            query(conn)
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {
        "median_ms": round(statistics.median(samples), 2),
        "p90_ms": round(samples[int(len(samples) * 0.9) - 1], 2),
    }


def workloads(
    repository_count: int, now: datetime, rng: random.Random
) -> dict[str, Callable[[Connection], Any]]:
    """Return each query under test; the random choices vary per call."""

    def name() -> str:
        number = rng.randrange(repository_count)
        return f"team{number % 100}/app{number}"

    def moment() -> datetime:
        return now - SPAN * rng.random()

    def deep_cursor(sort: str, descending: bool) -> Callable[[Connection], Any]:
        def query(conn: Connection) -> Any:
            page = queries.repository_page(
                conn, sort=sort, descending=descending, n=100
            )
            for _ in range(4):
                page = queries.repository_page(
                    conn,
                    sort=sort,
                    descending=descending,
                    n=100,
                    cursor=page.next_cursor,
                )
            return page

        return query

    def tags_at_time(conn: Connection) -> Any:
        position = queries.position_at(conn, moment())
        return queries.tags_at(conn, name(), position)

    def tag_at_time(conn: Connection) -> Any:
        position = queries.position_at(conn, moment())
        try:
            return queries.tag_at(conn, name(), "t0", position)
        except Exception:
            return None

    def catalog_at_time(conn: Connection) -> Any:
        return queries.catalog_at(conn, queries.position_at(conn, moment()), n=100)

    day = timedelta(days=1)
    return {
        "repositories_by_name": lambda conn: queries.repository_page(conn, n=100),
        "repositories_by_size_desc": lambda conn: queries.repository_page(
            conn, sort="size", descending=True, n=100
        ),
        "repositories_by_last_push_desc": lambda conn: queries.repository_page(
            conn, sort="last_push", descending=True, n=100
        ),
        "repositories_by_tags_page_5": deep_cursor("tags", False),
        "repositories_by_size_page_5": deep_cursor("size", True),
        "repositories_with_prefix": lambda conn: queries.repository_page(
            conn, prefix=f"team{rng.randrange(100)}/", sort="size", descending=True
        ),
        "repository": lambda conn: queries.repository(conn, name()),
        "tags": lambda conn: queries.tag_page(conn, name()),
        "tags_recent": lambda conn: queries.tag_page(conn, name(), sort="recent"),
        "manifests": lambda conn: queries.manifest_page(conn, name()),
        "referrers": lambda conn: queries.referrer_page(conn, name()),
        "tag_history": lambda conn: queries.tag_history(conn, name(), "t0"),
        "position_at_time": lambda conn: queries.position_at(conn, moment()),
        "tags_at_time": tags_at_time,
        "tag_at_time": tag_at_time,
        "catalog_at_time": catalog_at_time,
        "activity_24h_hourly": lambda conn: queries.activity(
            conn, since=now - day, until=now, bucket="hour"
        ),
        "activity_30d_daily": lambda conn: queries.activity(
            conn, since=now - 30 * day, until=now, bucket="day"
        ),
        "activity_365d_daily": lambda conn: queries.activity(
            conn, since=now - 365 * day, until=now, bucket="day"
        ),
        "activity_repository_30d_daily": lambda conn: queries.activity(
            conn, since=now - 30 * day, until=now, bucket="day", repository=name()
        ),
        "top_by_size": lambda conn: queries.top_repositories(conn, by="size"),
        "top_by_activity_7d": lambda conn: queries.top_repositories(
            conn, by="activity", since=now - 7 * day, until=now
        ),
        "top_by_activity_30d": lambda conn: queries.top_repositories(
            conn, by="activity", since=now - 30 * day, until=now
        ),
        "events": lambda conn: queries.event_page(conn),
        "events_repository": lambda conn: queries.event_page(conn, repository=name()),
        "events_type": lambda conn: queries.event_page(conn, types=["tag.deleted"]),
        "events_two_types": lambda conn: queries.event_page(
            conn, types=["tag.deleted", "manifest.pushed"]
        ),
        "events_actor": lambda conn: queries.event_page(
            conn, actor=f"user{rng.randrange(USERS)}"
        ),
        "events_time_range": lambda conn: queries.event_page(
            conn, since=moment() - day, until=moment()
        ),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.queries", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--database",
        help="an empty database URL (default: SQLite in a temporary directory)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="keep the SQLite database here; a dataset already there is reused",
    )
    parser.add_argument(
        "--repositories",
        type=parse_count,
        default=10_000,
        metavar="N",
        help="repositories in a new dataset, 1 or more (default 10000)",
    )
    parser.add_argument(
        "--iterations",
        type=parse_count,
        default=50,
        metavar="N",
        help="timed runs of each query, 1 or more (default 50)",
    )
    parser.add_argument(
        "--only",
        type=_query_names,
        help="comma-separated query names to time (default: all)",
    )
    return parser.parse_args(argv)


def _query_names(value: str) -> set[str]:
    """Parse --only, rejecting a name that no query has, which would
    otherwise time nothing after building the whole dataset."""
    known = workloads(1, datetime.now(UTC), random.Random(0)).keys()
    names = {name.strip() for name in value.split(",") if name.strip()}
    unknown = sorted(names - known)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown query names {', '.join(unknown) or repr(value)}; "
            f"known: {', '.join(sorted(known))}"
        )
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("warning", json=False)

    with tempfile.TemporaryDirectory(prefix="cairn-bench-queries-") as scratch:
        data_dir = args.data_dir or Path(scratch)
        data_dir.mkdir(parents=True, exist_ok=True)
        database = Database(args.database or sqlite_url(data_dir))
        upgrade(database)
        with queries.snapshot(database) as conn:
            last_time = conn.execute(sa.select(sa.func.max(events.c.time))).scalar()
        if last_time is None:
            now = datetime.now(UTC)
            dataset: dict[str, Any] = build(database, args.repositories, now)
        else:
            now = last_time
            dataset = {"reused": str(data_dir)}
        with queries.snapshot(database) as conn:
            dataset["events"] = queries.log_head(conn)
            dataset["repositories"] = queries.repository_page(conn, n=1).extra["total"]
            dataset["tags"] = conn.execute(
                sa.select(sa.func.count()).select_from(tags)
            ).scalar_one()

        rng = random.Random(11)
        selected = args.only
        results = {}
        for name, query in workloads(args.repositories, now, rng).items():
            if selected is None or name in selected:
                results[name] = _timed(database, query, args.iterations)
        database.dispose()

    report = {
        "backend": database.dialect,
        "dataset": dataset,
        "iterations": args.iterations,
        "queries": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
