"""The NATS connection the consumers share: reconnects forever, logs quietly.

nats-py retries the first connection and every reconnection itself here
(``max_reconnect_attempts=-1``), so ``connect`` returns only once a server
accepts the connection. Connection errors are logged at most once per
``LOG_INTERVAL`` seconds, disconnects and reconnects every time.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Final

import nats
import nats.errors
import structlog
from nats.aio.client import Client

from engine.bus.connection import (
    MAX_OUTSTANDING_PINGS,
    PING_INTERVAL,
    describe_connection_error,
    redact_url,
)

log = structlog.get_logger(__name__)

LOG_INTERVAL: Final = 30.0
RECONNECT_WAIT: Final = 2.0

# Errors nats-py raises when the server cannot be reached or drops the link.
NATS_ERRORS: Final = (OSError, TimeoutError, nats.errors.Error)


async def connect(
    url: str,
    name: str,
    *,
    on_disconnected: Callable[[], Awaitable[None]] | None = None,
    on_reconnected: Callable[[], Awaitable[None]] | None = None,
    ping_interval: int = PING_INTERVAL,
    max_outstanding_pings: int = MAX_OUTSTANDING_PINGS,
) -> Client:
    """Connect to ``url``, retrying until a server accepts the connection.

    ``on_disconnected`` and ``on_reconnected`` run after the log line of
    each disconnect and reconnect. The client sends a ping every
    ``ping_interval`` seconds and reconnects once ``max_outstanding_pings``
    of them are unanswered.
    """
    safe_url = redact_url(url)
    last_logged = [float("-inf")]

    async def on_error(error: Exception) -> None:
        now = time.monotonic()
        if now - last_logged[0] >= LOG_INTERVAL:
            last_logged[0] = now
            log.warning(
                "nats_error",
                url=safe_url,
                connection=name,
                error=str(error) or type(error).__name__,
            )

    async def log_disconnected() -> None:
        log.warning("nats_disconnected", url=safe_url, connection=name)
        if on_disconnected is not None:
            await on_disconnected()

    async def log_reconnected() -> None:
        log.info("nats_reconnected", url=safe_url, connection=name)
        if on_reconnected is not None:
            await on_reconnected()

    client = await nats.connect(
        url,
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=RECONNECT_WAIT,
        connect_timeout=2,
        ping_interval=ping_interval,
        max_outstanding_pings=max_outstanding_pings,
        error_cb=on_error,
        disconnected_cb=log_disconnected,
        reconnected_cb=log_reconnected,
    )
    log.info("nats_connected", url=safe_url, connection=name)
    return client


async def connect_once(url: str, name: str, timeout: float = 5.0) -> Client:
    """Connect to ``url`` for a short command; raise instead of retrying.

    Raises ConnectionError naming the URL (without credentials) on failure.
    """

    async def on_error(error: Exception) -> None:
        pass  # the failure is raised below, with the URL

    try:
        return await nats.connect(
            url,
            name=name,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            connect_timeout=timeout,
            ping_interval=PING_INTERVAL,
            max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            error_cb=on_error,
        )
    except NATS_ERRORS as error:
        raise ConnectionError(
            f"cannot connect to NATS at {redact_url(url)}: "
            f"{describe_connection_error(error)}"
        ) from None
