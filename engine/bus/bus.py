"""The Bus: what `cairn serve` starts beside its HTTP server.

It owns the embedded nats-server (when no URL is given) and the task that
restarts it, one NATS connection, the relay task, and the publisher of pull
notifications. Every public method is called from the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import sqlalchemy as sa
import structlog

from engine.bus.connection import CONNECTION_ERRORS, NatsLink, redact_url
from engine.bus.embedded import EmbeddedNatsServer
from engine.bus.leader import leadership_for
from engine.bus.messages import pull_message
from engine.bus.relay import BatchHook, Relay
from engine.bus.retry import Backoff, Throttle
from engine.bus.settings import BusSettings
from engine.db import Database
from engine.domain.events import Actor, StoredEvent

log = structlog.get_logger(__name__)

# Pull notifications waiting for the connection; more are dropped, not queued.
PULL_QUEUE_SIZE: Final = 10_000


class Bus:
    """The relay from the log to NATS JetStream, and pull notifications."""

    def __init__(
        self,
        settings: BusSettings,
        database: Database,
        data_dir: Path,
        *,
        on_batch_acked: BatchHook | None = None,
    ) -> None:
        self.settings = settings
        self.database = database
        self.data_dir = data_dir
        self._on_batch_acked = on_batch_acked
        self._server: EmbeddedNatsServer | None = None
        self._link: NatsLink | None = None
        self._relay: Relay | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pulls: asyncio.Queue[tuple[str, bytes]] | None = None
        self._pulls_dropped = 0
        self._pull_drop_log = Throttle(settings.log_interval)

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, database: Database, data_dir: Path
    ) -> Bus:
        return cls(BusSettings.from_args(args), database, data_dir)

    @property
    def nats_url(self) -> str | None:
        """The NATS URL in use: the configured one, or the embedded server's."""
        if not self.settings.enabled:
            return None
        if self.settings.nats_url is not None:
            return self.settings.nats_url
        return self._server.url if self._server is not None else None

    @property
    def embedded_server_pid(self) -> int | None:
        """The PID of the embedded nats-server while it runs."""
        return self._server.pid if self._server is not None else None

    async def start(self) -> None:
        """Start the embedded server if needed, the connection and the relay.

        Raises NatsServerNotFound or EmbeddedNatsError when the embedded
        server cannot start, but never because a NATS URL is unreachable:
        the connection and the relay retry in the background.
        """
        if not self.settings.enabled or self._tasks:
            return
        self._loop = asyncio.get_running_loop()
        url = self.settings.nats_url
        if url is None:
            self._server = EmbeddedNatsServer(
                self.data_dir / "nats",
                port=self.settings.embedded_port,
                binary=self.settings.nats_server_binary,
            )
            url = await self._server.start()

        settings = self.settings
        self._link = NatsLink(
            url,
            name=f"cairn {settings.stream}",
            backoff_initial=settings.backoff_initial,
            backoff_max=settings.backoff_max,
            log_interval=settings.log_interval,
        )
        self._relay = Relay(
            self.database,
            self._link,
            leadership_for(self.database, self.data_dir, settings.relay_name),
            settings,
            on_batch_acked=self._on_batch_acked,
        )
        self.database.append_listeners.append(self._on_append)
        self._tasks = [
            asyncio.create_task(self._link.run(), name="cairn-nats-link"),
            asyncio.create_task(self._relay.run(), name="cairn-relay"),
        ]
        if self._server is not None:
            restarts = Backoff(settings.backoff_initial, settings.backoff_max)
            self._tasks.append(
                asyncio.create_task(
                    self._server.supervise(restarts, self._link.retry_now),
                    name="cairn-nats-server",
                )
            )
        if settings.publish_pulls:
            self._pulls = asyncio.Queue(PULL_QUEUE_SIZE)
            self._tasks.append(
                asyncio.create_task(self._publish_pulls(), name="cairn-pulls")
            )
        log.info(
            "bus_started",
            nats_url=redact_url(url),
            embedded=self._server is not None,
            stream=settings.stream,
            subject_prefix=settings.subject_prefix,
            publish_pulls=settings.publish_pulls,
        )

    async def stop(self) -> None:
        """Stop the relay, close the connection, and stop the embedded server."""
        with contextlib.suppress(ValueError):
            self.database.append_listeners.remove(self._on_append)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await _cancel(task)
        if self._relay is not None:
            await asyncio.to_thread(self._finish_relay, self._relay)
        if self._link is not None:
            await self._link.close()
        if self._server is not None:
            await self._server.stop()
        if tasks:
            log.info("bus_stopped", stream=self.settings.stream)

    @staticmethod
    def _finish_relay(relay: Relay) -> None:
        # Save what JetStream acknowledged since the last checkpoint write,
        # then let another process lead.
        try:
            relay.save_checkpoint()
        except (sa.exc.SQLAlchemyError, OSError) as error:
            log.warning(
                "relay_checkpoint_not_saved",
                position=relay.checkpoint,
                error=str(error),
                note="the next relay finds its place from the stream",
            )
        relay.release_leadership()

    def health(self) -> dict[str, Any]:
        """Describe the bus as JSON: state, URL, leadership, checkpoint and lag.

        ``state`` is ``disabled`` (--no-nats), ``connecting`` (no NATS
        connection), ``failing`` (connected, but while events wait this
        process's relay failed its last publish, as with JetStream off, or
        could not take the relay lock in the database),
        ``connected``, or ``caught_up`` (connected, and every committed event
        is in the stream). Lag fields are None until the
        relay has read the log once. ``last_error`` is why the embedded
        server is down, else the relay's last failure, else the error of the
        last failed connection attempt.
        """
        url = self.nats_url
        document: dict[str, Any] = {
            "state": "disabled",
            "nats_url": redact_url(url) if url else None,
            "embedded": self._server is not None,
            "stream": self.settings.stream,
            "subject_prefix": self.settings.subject_prefix,
            "leader": False,
            "checkpoint": None,
            "log_head": None,
            "lag_events": None,
            "lag_seconds": None,
            "last_error": None,
            "publish_pulls": self.settings.publish_pulls,
            "pulls_dropped": self._pulls_dropped,
        }
        relay, link = self._relay, self._link
        if relay is None or link is None:
            return document
        lag = relay.lag_events
        lag_seconds = None
        if lag == 0:
            lag_seconds = 0.0
        elif lag is not None and relay.oldest_pending is not None:
            age = datetime.now(UTC) - relay.oldest_pending
            lag_seconds = round(max(0.0, age.total_seconds()), 3)
        state = "connecting"
        if link.is_connected:
            if lag == 0:
                state = "caught_up"
            elif relay.last_error is not None:
                state = "failing"
            else:
                state = "connected"
        document.update(
            state=state,
            leader=relay.leader,
            checkpoint=relay.checkpoint,
            log_head=relay.head,
            lag_events=lag,
            lag_seconds=lag_seconds,
            last_error=self._last_error(relay, link),
        )
        return document

    def _last_error(self, relay: Relay, link: NatsLink) -> str | None:
        if self._server is not None and self._server.last_error is not None:
            return self._server.last_error
        if relay.last_error is not None:
            return relay.last_error
        return link.last_error

    def notify_pull(
        self,
        repository: str,
        reference: str,
        digest: str,
        actor: Actor,
        request_id: str | None,
    ) -> None:
        """Queue a pull notification for ``<prefix>.pull.<repository>``.

        Does nothing unless pulls are published. Never blocks and never
        raises: a notification that cannot be queued is counted and dropped,
        because pulls are not events and nothing replays them.
        """
        if self._pulls is None:
            return
        try:
            message = pull_message(
                self.settings.subject_prefix,
                repository,
                reference,
                digest,
                actor,
                request_id,
            )
            self._pulls.put_nowait(message)
        except Exception as error:
            self._drop_pull(error, repository=repository, request_id=request_id)

    def _drop_pull(self, error: BaseException | str, **ids: str | None) -> None:
        self._pulls_dropped += 1
        suppressed = self._pull_drop_log.ready()
        if suppressed is not None:
            log.warning(
                "pull_notification_dropped",
                **ids,
                error=str(error) or type(error).__name__,
                dropped=self._pulls_dropped,
                suppressed=suppressed,
            )

    async def _publish_pulls(self) -> None:
        assert self._pulls is not None and self._link is not None
        while True:
            subject, body = await self._pulls.get()
            client = self._link.client
            if client is None or not client.is_connected:
                self._drop_pull("not connected to NATS", subject=subject)
                continue
            try:
                await client.publish(subject, body)
            except CONNECTION_ERRORS as error:
                self._drop_pull(error, subject=subject)

    def _on_append(self, events: list[StoredEvent]) -> None:
        # Runs in the committing thread, after its transaction committed: it
        # must not raise into the request that appended.
        loop = self._loop
        relay = self._relay
        if loop is None or relay is None:
            return
        # RuntimeError: the loop is closed because the bus is shutting down.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(relay.note_appended, events)


async def _cancel(task: asyncio.Task[None], attempts: int = 20) -> None:
    """Cancel ``task`` and wait for it to end.

    The cancellation is repeated, because nats-py swallows a cancellation
    that arrives at some points of its connect and close.
    """
    for _ in range(attempts):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            if not task.cancelled() and task.exception() is not None:
                log.error(
                    "bus_task_failed", task=task.get_name(), error=str(task.exception())
                )
            return
    log.warning("bus_task_not_stopped", task=task.get_name(), attempts=attempts)
