"""Entry point of `cairn mirror`: build the parts from options and run them."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import structlog

from consumers.globs import matches_any
from consumers.mirror.checkpoint import (
    Checkpoint,
    CheckpointError,
    resolve_checkpoint_path,
)
from consumers.mirror.copier import Copier, Stats
from consumers.mirror.credentials import (
    Credentials,
    CredentialsError,
    resolve_credentials,
    split_userinfo,
)
from consumers.mirror.errors import MirrorError, SourceReplaced
from consumers.mirror.feed import FeedClient
from consumers.mirror.identity import (
    SameRegistry,
    check_registry_ids,
    check_urls,
    fetch_registry_id,
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


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Source and target without user information in their URLs, and the
    credentials for each. ``target`` is a URL or oci:DIR, DIR absolute."""

    source: str
    target: str
    source_credentials: Credentials | None = None
    target_credentials: Credentials | None = None


def main(args: argparse.Namespace) -> int:
    """Run `cairn mirror`; return the exit status."""
    try:
        endpoints = _endpoints(args)
    except CredentialsError as error:
        print(f"cairn mirror: {error}", file=sys.stderr)
        return 2
    problem = _check_args(args, endpoints)
    if problem is not None:
        print(f"cairn mirror: {problem}", file=sys.stderr)
        return 2
    try:
        checkpoint_path = (
            None
            if args.checkpoint is None
            else resolve_checkpoint_path(args.checkpoint)
        )
        lock = _lock_checkpoint(args.checkpoint, checkpoint_path)
    except CheckpointError as error:
        print(f"cairn mirror: {error}", file=sys.stderr)
        return 2
    try:
        return _main_locked(args, endpoints, checkpoint_path)
    finally:
        if lock is not None:
            os.close(lock)


def _lock_checkpoint(path: Path | None, resolved: Path | None) -> int | None:
    """Take an exclusive lock for the checkpoint ``path`` and return its
    descriptor, None without a checkpoint; raise CheckpointError when
    another process holds it.

    The lock is on a file beside the checkpoint, ``.NAME.lock``, because
    each write replaces the checkpoint's file. Two mirrors with one
    checkpoint would each save their own position over the other's. It is
    beside ``resolved``, the file that ``path`` names after symbolic links,
    so that mirrors given the file by different links take the same lock.
    """
    if path is None or resolved is None:
        return None
    lock_path = resolved.with_name(f".{resolved.name}.lock")
    try:
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise CheckpointError(
            f"cannot write checkpoint {path}: {error.strerror or error}: {lock_path}"
        ) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise CheckpointError(
            f"checkpoint {path} is in use by another cairn mirror (it holds "
            f"the lock on {lock_path}); run one mirror per checkpoint"
        ) from None
    return descriptor


def _main_locked(
    args: argparse.Namespace, endpoints: Endpoints, checkpoint_path: Path | None
) -> int:
    try:
        checkpoint = Checkpoint.load(
            checkpoint_path,
            endpoints.source,
            endpoints.target,
            tuple(args.repositories),
            args.propagate_deletes,
        )
        checkpoint.write()
    except CheckpointError as error:
        print(f"cairn mirror: {error}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, endpoints, checkpoint))
    except (SameRegistry, SourceReplaced) as error:
        print(f"cairn mirror: {error}", file=sys.stderr)
        return 2
    except MirrorError as error:
        log.error("mirror_failed", position=checkpoint.position, error=str(error))
        return 1
    except KeyboardInterrupt:
        return 130


def _endpoints(args: argparse.Namespace) -> Endpoints:
    """Separate the credentials from the URLs; raise CredentialsError."""
    source, source_credentials = resolve_credentials(
        "source", args.source, args.source_creds, args.source_creds_file
    )
    if args.target.startswith("oci:"):
        if args.target_creds is not None or args.target_creds_file is not None:
            raise CredentialsError(
                "--target-creds and --target-creds-file (or their CAIRN_MIRROR_* "
                "variables) apply to a registry target, not to oci:DIR"
            )
        return Endpoints(
            source.rstrip("/"), _layout_description(args.target), source_credentials
        )
    target, target_credentials = resolve_credentials(
        "target", args.target, args.target_creds, args.target_creds_file
    )
    return Endpoints(
        source.rstrip("/"), target.rstrip("/"), source_credentials, target_credentials
    )


def _check_args(args: argparse.Namespace, endpoints: Endpoints) -> str | None:
    for name in ("source", "target"):
        value: str = getattr(args, name)
        if name == "target" and value.startswith("oci:"):
            if not value.removeprefix("oci:"):
                return "invalid --target oci:DIR: DIR is empty"
            continue
        # Messages show the URL without its user name and password.
        value = split_userinfo(value)[0]
        problem = _check_registry_url(value)
        if problem is not None:
            return f"invalid --{name} {value!r}: {problem}" + (
                " (or oci:DIR)" if name == "target" else ""
            )
    if not endpoints.target.startswith("oci:"):
        try:
            check_urls(split_userinfo(args.source)[0], split_userinfo(args.target)[0])
        except SameRegistry as error:
            return str(error)
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


def _client(
    args: argparse.Namespace, credentials: Credentials | None, follow_redirects: bool
) -> httpx.AsyncClient:
    # httpx sends the credentials to the URL's own host and drops them when
    # a redirect leads to another one.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(args.timeout),
        follow_redirects=follow_redirects,
        headers={"User-Agent": USER_AGENT},
        auth=credentials.auth() if credentials else None,
    )


async def _check_registries(
    args: argparse.Namespace, endpoints: Endpoints, checkpoint: Checkpoint
) -> None:
    """Read the registry ids of source and target, and compare them with each
    other and with the one that the checkpoint recorded.

    Raises SameRegistry when source and target are one cairn registry, and
    SourceReplaced when the source is not the one the checkpoint was
    written for.
    """
    async with _client(args, endpoints.source_credentials, True) as client:
        source_id = await retry_transient(
            FeedClient(endpoints.source, client).registry_id,
            "read the registry id of the source",
            args.retries,
        )
    if not endpoints.target.startswith("oci:"):
        async with _client(args, endpoints.target_credentials, True) as client:
            target_id = await retry_transient(
                lambda: fetch_registry_id(client, endpoints.target),
                "read the registry id of the target",
                args.retries,
            )
        check_registry_ids(endpoints.source, source_id, endpoints.target, target_id)
    checkpoint.check_source(source_id)


class StopSignals:
    """Cancel a task at SIGINT or SIGTERM, and keep the first signal received."""

    def __init__(self, task: asyncio.Task[int]) -> None:
        self.received: signal.Signals | None = None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig, task)

    def _stop(self, sig: signal.Signals, task: asyncio.Task[int]) -> None:
        if self.received is None:
            self.received = sig
        task.cancel()

    def interrupted(self, once: bool, position: int) -> int:
        """Log mirror_interrupted and return the exit status of a mirror that
        a signal stopped at ``position``.

        A --once run stopped before it caught up has not copied the source's
        head, so it gets 128 plus the signal's number: 130 after SIGINT and
        143 after SIGTERM, as a shell reports for a process that the signal
        killed. A mirror that follows the source runs until a signal stops
        it, so it gets 0.
        """
        status = 0
        if once and self.received is not None:
            status = 128 + self.received.value
        log.info(
            "mirror_interrupted",
            position=position,
            signal=self.received.name if self.received else None,
            status=status,
        )
        return status


def _layout_description(value: str) -> str:
    return "oci:" + str(Path(value.removeprefix("oci:")).resolve())


def _build_target(args: argparse.Namespace, endpoints: Endpoints) -> Target:
    if endpoints.target.startswith("oci:"):
        return LayoutTarget(Path(endpoints.target.removeprefix("oci:")))
    client = _client(args, endpoints.target_credentials, False)
    return RegistryTarget(RegistryClient(endpoints.target, client, "target"))


async def _run(
    args: argparse.Namespace, endpoints: Endpoints, checkpoint: Checkpoint
) -> int:
    task = asyncio.current_task()
    assert task is not None
    signals = StopSignals(task)
    try:
        await _check_registries(args, endpoints, checkpoint)
    except asyncio.CancelledError:
        return signals.interrupted(args.once, checkpoint.position)

    http = _client(args, endpoints.source_credentials, True)
    target = _build_target(args, endpoints)
    settings = MirrorSettings(
        repositories=tuple(args.repositories),
        once=args.once,
        poll_interval=args.poll_interval,
        retries=args.retries,
    )
    stats = Stats()
    copier = Copier(
        RegistryClient(endpoints.source, http, "source"),
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
        settings, FeedClient(endpoints.source, http), copier, checkpoint, progress, live
    )

    ticker = asyncio.create_task(progress.tick(), name="cairn-mirror-progress")
    status = 0
    try:
        await target.start()
        await runner.run()
    except asyncio.CancelledError:
        status = signals.interrupted(args.once, runner.position)
    except MirrorError as error:
        log.error("mirror_failed", position=runner.position, error=str(error))
        status = 1
    except SourceReplaced as error:
        log.error("mirror_source_replaced", position=runner.position, error=str(error))
        status = 2
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
        bytes_sent=stats.bytes_sent,
        nats_url=redact_url(args.nats_url) if args.nats_url else None,
    )
    return status
