"""A NATS connection that is re-established with exponential backoff.

nats-py's own reconnection is turned off: it retries at a fixed interval and
buffers publishes while disconnected, which hides the outage from the relay.
Here a lost connection is closed at once, so the relay's publishes fail at
once too. This loop then opens a new connection with growing delays and logs
its attempts at most once per ``log_interval``. ``retry_now()`` cuts a delay
short, for a caller that has just restarted the server.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client

from engine.bus.retry import Backoff, Throttle

log = structlog.get_logger(__name__)

# Errors nats-py raises when a server cannot be reached or drops the link.
CONNECTION_ERRORS = (OSError, TimeoutError, nats.errors.Error)

# A server that keeps the TCP connection open but stops responding counts as
# disconnected after MAX_OUTSTANDING_PINGS unanswered pings, one every
# PING_INTERVAL seconds: within about 40 s. With nats-py 2.16's defaults (a
# ping every 120 s, two outstanding) it took about 6 minutes.
PING_INTERVAL = 10
MAX_OUTSTANDING_PINGS = 3


def describe_connection_error(error: BaseException) -> str:
    """Return what went wrong in a failed NATS connection, never an empty string.

    nats-py raises a TimeoutError without text when the server accepts the
    TCP connection but sends no INFO line, and an exception is true even
    without text, so ``error or type(error).__name__`` gives "" too.
    """
    if isinstance(error, TimeoutError) and not str(error):
        return "timed out: the server sent no response"
    return str(error) or type(error).__name__


JETSTREAM_DISABLED = (
    "JetStream is not enabled on this NATS server: start nats-server with -js, "
    "or with a jetstream block in its configuration"
)


def describe_nats_error(error: BaseException, client: Client | None = None) -> str:
    """Return what went wrong in a NATS or JetStream request, never an empty
    string.

    A JetStream request to a server without JetStream gets no responder,
    which nats-py raises as a ServiceUnavailableError with no description.
    The server's INFO line has ``"jetstream": true`` only when JetStream is
    on, so with the ``client`` that made the request the cause is certain.
    """
    if isinstance(error, nats.js.errors.ServiceUnavailableError):
        # nats-py keeps the INFO line only in this private attribute.
        info = getattr(client, "_server_info", None)
        if isinstance(info, dict) and not info.get("jetstream"):
            return JETSTREAM_DISABLED
        if not error.description:
            return (
                "JetStream sent no response (503 ServiceUnavailableError). "
                "Check that JetStream is enabled on the NATS server (nats-server "
                "-js) and that its stream is available"
            )
    return describe_connection_error(error)


def redact_url(url: str) -> str:
    """Remove a user name, password or token from a URL before logging it."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, ""))


class NatsLink:
    """One NATS client connection, kept open by ``run()`` until cancelled."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        backoff_initial: float,
        backoff_max: float,
        log_interval: float,
        connect_timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.name = name
        self.client: Client | None = None
        # Resolved when the current connection closes; a new one per connection.
        self.closed: asyncio.Future[None] | None = None
        # The error of the last failed connection attempt, until one succeeds.
        self.last_error: str | None = None
        self._connected = asyncio.Event()
        self._retry = asyncio.Event()
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._throttle = Throttle(log_interval)
        self._connect_timeout = connect_timeout

    @property
    def is_connected(self) -> bool:
        return self.client is not None and self.client.is_connected

    async def wait_connected(self, timeout: float | None = None) -> Client | None:
        """Wait up to ``timeout`` seconds for a connection; None if there is none."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            return None
        return self.client

    def retry_now(self) -> None:
        """Make the next connection attempt now, with the backoff started over."""
        self._backoff.reset()
        self._retry.set()

    async def run(self) -> None:
        safe_url = redact_url(self.url)
        while True:
            client, closed = await self._connect(safe_url)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # nats-py can swallow a cancellation that arrives during
                # connect; honour it here rather than run on.
                await client.close()
                raise asyncio.CancelledError
            self.client, self.closed = client, closed
            self._connected.set()
            try:
                await closed
            finally:
                self._connected.clear()
                self.client = None
            log.warning(
                "nats_disconnected",
                url=safe_url,
                connection=self.name,
                error=str(client.last_error) if client.last_error else None,
            )

    async def _connect(self, safe_url: str) -> tuple[Client, asyncio.Future[None]]:
        loop = asyncio.get_running_loop()
        while True:
            closed: asyncio.Future[None] = loop.create_future()

            async def on_closed(closed: asyncio.Future[None] = closed) -> None:
                if not closed.done():
                    closed.set_result(None)

            async def on_error(error: Exception) -> None:
                log.debug("nats_error", url=safe_url, error=str(error))

            # A retry_now() from before this attempt is used up by it.
            self._retry.clear()
            try:
                # One quick retry inside nats-py (reconnect_time_wait=0), then
                # control comes back here for the backoff.
                client = await nats.connect(
                    self.url,
                    name=self.name,
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    connect_timeout=self._connect_timeout,
                    ping_interval=PING_INTERVAL,
                    max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                    error_cb=on_error,
                    disconnected_cb=on_closed,
                    closed_cb=on_closed,
                )
            except CONNECTION_ERRORS as error:
                self.last_error = str(error) or type(error).__name__
                delay = self._backoff.next_delay()
                suppressed = self._throttle.ready()
                if suppressed is not None:
                    log.warning(
                        "nats_connect_failed",
                        url=safe_url,
                        connection=self.name,
                        attempt=self._backoff.attempt,
                        error=self.last_error,
                        retry_in=round(delay, 2),
                        suppressed=suppressed,
                    )
                await self._wait_retry(delay)
                continue
            log.info(
                "nats_connected",
                url=safe_url,
                connection=self.name,
                attempts=self._backoff.attempt + 1,
            )
            self._backoff.reset()
            self._throttle.reset()
            self.last_error = None
            return client, closed

    async def _wait_retry(self, delay: float) -> None:
        # Sleep for ``delay`` seconds, or until retry_now() is called.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._retry.wait(), delay)

    async def close(self) -> None:
        """Close the current connection, flushing what it has buffered."""
        client = self.client
        if client is not None and not client.is_closed:
            try:
                await asyncio.wait_for(client.close(), 5.0)
            except CONNECTION_ERRORS as error:
                log.info(
                    "nats_close_failed", url=redact_url(self.url), error=str(error)
                )
