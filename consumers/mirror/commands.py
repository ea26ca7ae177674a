"""Entry point of `cairn mirror`: build the parts from options and run them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import structlog

from consumers.globs import matches_any
from consumers.mirror.checkpoint import Checkpoint, CheckpointError
from consumers.mirror.copier import Copier, Stats
from consumers.mirror.errors import MirrorError
from consumers.mirror.feed import FeedClient
from consumers.mirror.identity import (
    SameRegistry,
    check_registry_ids,
    check_urls,
    normalise_url,
)
from consumers.mirror.layout import LayoutTarget
from consumers.mirror.live import LiveEvents
from consumers.mirror.progress import Progress
from consumers.mirror.registry import RegistryClient
from consumers.mirror.runner import MirrorRunner, MirrorSettings, retry_transient
from consumers.mirror.target import RegistryTarget, Target
from engine.bus.connection import redact_url

log = structlog.get_logger(__name__)

USER_AGENT = "cairn-mirror"
# The exit status of --once when it caught up but some events of this run
# were incomplete, so the target lacks content that the source still lists.
STATUS_INCOMPLETE = 3


def main(args: argparse.Namespace) -> int:
    """Run `cairn mirror`; return the exit status."""
    problem = _check_args(args)
    if problem is not None:
        print(f"cairn mirror: {problem}", file=sys.stderr)
        return 2
    source = args.source.rstrip("/")
    target = _target_description(args.target)
    try:
        checkpoint = Checkpoint.load(args.checkpoint, source, target)
    except CheckpointError as error:
        print(f"cairn mirror: {error}", file=sys.stderr)
        return 2
    try:
        if not target.startswith("oci:"):
            asyncio.run(_check_registry_ids(args, source, target))
        return asyncio.run(_run(args, source, checkpoint))
    except SameRegistry as error:
        print(f"cairn mirror: {error}", file=sys.stderr)
        return 2
    except MirrorError as error:
        log.error("mirror_failed", position=checkpoint.position, error=str(error))
        return 1
    except KeyboardInterrupt:
        return 130


def _check_args(args: argparse.Namespace) -> str | None:
    for name in ("source", "target"):
        value: str = getattr(args, name)
        if name == "target" and value.startswith("oci:"):
            if not value.removeprefix("oci:"):
                return "invalid --target oci:DIR: DIR is empty"
            continue
        problem = _check_registry_url(value)
        if problem is not None:
            return f"invalid --{name} {value!r}: {problem}" + (
                " (or oci:DIR)" if name == "target" else ""
            )
    if not args.target.startswith("oci:"):
        try:
            check_urls(args.source, args.target)
        except SameRegistry as error:
            return str(error)
    if args.poll_interval <= 0 or args.timeout <= 0:
        return "--poll-interval and --timeout must be positive"
    if args.retries < 1:
        return "--retries must be at least 1"
    return None


def _check_registry_url(value: str) -> str | None:
    """Describe what makes ``value`` unusable as a registry's base URL."""
    expected = "expected a registry's base URL such as http://127.0.0.1:5000"
    try:
        parts = urlsplit(value)
        httpx.URL(value)
        normalise_url(value)
    except httpx.InvalidURL as error:
        return f"{error}; {expected}"
    except ValueError as error:
        return f"{error}; {expected}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return expected
    if parts.path.strip("/") or parts.query or parts.fragment:
        # The OCI API is always at /v2/ under the host, so a path here would
        # make the mirror push to /v2/<path>/v2/..., into the source itself
        # when the host is the source's.
        return f"{expected}, without a path, query or fragment"
    return None


async def _check_registry_ids(
    args: argparse.Namespace, source: str, target: str
) -> None:
    """Raise SameRegistry when source and target are one cairn registry."""
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(args.timeout),
        follow_redirects=True,
        headers={"User-Agent": USER_AGENT},
    ) as client:
        await retry_transient(
            lambda: check_registry_ids(client, source, target),
            "read the registry ids of source and target",
            args.retries,
        )


def _target_description(value: str) -> str:
    if value.startswith("oci:"):
        return "oci:" + str(Path(value.removeprefix("oci:")).resolve())
    return value.rstrip("/")


def _build_target(description: str, timeout: float) -> Target:
    if description.startswith("oci:"):
        return LayoutTarget(Path(description.removeprefix("oci:")))
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )
    return RegistryTarget(RegistryClient(description, client))


async def _run(args: argparse.Namespace, source: str, checkpoint: Checkpoint) -> int:
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(args.timeout),
        follow_redirects=True,
        headers={"User-Agent": USER_AGENT},
    )
    target = _build_target(checkpoint.target, args.timeout)
    settings = MirrorSettings(
        repositories=tuple(args.repositories),
        once=args.once,
        poll_interval=args.poll_interval,
        retries=args.retries,
    )
    stats = Stats()
    copier = Copier(
        RegistryClient(source, http),
        target,
        mirrored=lambda repository: matches_any(repository, settings.repositories),
        propagate_deletes=args.propagate_deletes,
        stats=stats,
    )
    live = (
        LiveEvents(args.nats_url, args.stream, args.subject_prefix)
        if args.nats_url
        else None
    )
    progress = Progress(stats, args.progress)
    runner = MirrorRunner(
        settings, FeedClient(source, http), copier, checkpoint, progress, live
    )

    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    ticker = asyncio.create_task(progress.tick(), name="cairn-mirror-progress")
    status = 0
    try:
        await runner.run()
    except asyncio.CancelledError:
        log.info("mirror_interrupted", position=runner.position)
    except MirrorError as error:
        log.error("mirror_failed", position=runner.position, error=str(error))
        status = 1
    else:
        if args.once and stats.not_copied:
            status = STATUS_INCOMPLETE
    finally:
        ticker.cancel()
        progress.finish()
        if live is not None:
            await live.close()
        with contextlib.suppress(httpx.HTTPError):
            await target.aclose()
            await http.aclose()
    log.info(
        "mirror_stopped",
        status=status,
        position=runner.position,
        applied=stats.applied,
        skipped=stats.skipped,
        not_copied=stats.not_copied,
        bytes_copied=stats.bytes_copied,
        nats_url=redact_url(args.nats_url) if args.nats_url else None,
    )
    return status
