"""The ASGI application: request ids, routing, error mapping, request logs."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final, Protocol

import structlog

from engine.api import blobs, dashboard, feed, health, listing, manifests, ui, uploads
from engine.api.auth import Authenticator, User, authorize, is_public
from engine.api.dashboard.consistency import PositionWaiter
from engine.api.errors import ErrorCode, HTTPError, unavailable
from engine.api.forwarded import InvalidForwardedLog
from engine.api.http import (
    ClientDisconnected,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    json_response,
)
from engine.api.metrics import Metrics
from engine.api.ratelimit import RateLimiter, too_many_requests
from engine.api.routing import Handler, Router
from engine.api.threads import ThreadPool, run_sync, upload_pool
from engine.db import is_database_unavailable, unavailable_reason
from engine.domain.errors import RegistryError
from engine.domain.events import Actor
from engine.registry import Registry

log = structlog.get_logger("engine.api")

API_VERSION_HEADER: Final = ("Docker-Distribution-API-Version", "registry/2.0")

# The ASGI extension that sends a file's bytes from the kernel, without
# reading them into Python (asgiref's extensions.rst, "Zero Copy Send").
ZEROCOPY_SEND: Final = "http.response.zerocopysend"

# cairn's own ASGI extension for engine.api.protocol's idle timeouts. Its
# value is a dict per request, in which the app stores its request id under
# "request_id" for the server's log line. The server sets "timed_out" to
# "read" or "write" when it closes the request's connection because the
# client sent, or took, nothing for too long.
IDLE_TIMEOUT: Final = "cairn.idle_timeout"

# Bytes read per worker-thread call when a file body is streamed.
READ_SIZE: Final = 1024 * 1024

# An incoming X-Request-Id is kept when it looks like an id. The log column
# for it stores 64 characters.
_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+=/-]{0,63}$")

_NAME: Final = r"(?P<name>.+)"
_SEGMENT: Final = r"[^/]+"


class PullListener(Protocol):
    """The part of the event bus that the API uses."""

    def health(self) -> dict[str, Any]: ...

    def notify_pull(
        self,
        repository: str,
        reference: str,
        digest: str,
        actor: Actor,
        request_id: str | None,
    ) -> None: ...


@dataclass
class AppState:
    """Shared handler state: the registry, the bus and URL settings."""

    registry: Registry
    bus: PullListener | None = None
    relative_urls: bool = False
    upload_pool: ThreadPool = field(default_factory=upload_pool)
    metrics: Metrics | None = None
    position_waiter: PositionWaiter | None = None
    # None leaves the registry open to everyone, without a rate limit.
    authenticator: Authenticator | None = None
    rate_limiter: RateLimiter | None = None
    forwarded_warnings: InvalidForwardedLog = field(default_factory=InvalidForwardedLog)


def build_router() -> Router:
    router = Router()
    router.add(r"/v2/?", GET=base, HEAD=base)
    router.add(r"/v2/_catalog", GET=listing.catalog)
    router.add(rf"/v2/{_NAME}/tags/list", GET=listing.tags)
    router.add(
        rf"/v2/{_NAME}/manifests/(?P<reference>{_SEGMENT})",
        GET=manifests.get_manifest,
        HEAD=manifests.get_manifest,
        PUT=manifests.put_manifest,
        DELETE=manifests.delete_manifest,
    )
    router.add(rf"/v2/{_NAME}/blobs/uploads/?", POST=uploads.start_upload)
    router.add(
        rf"/v2/{_NAME}/blobs/uploads/(?P<upload>{_SEGMENT})",
        GET=uploads.upload_status,
        PATCH=uploads.patch_upload,
        PUT=uploads.finish_upload,
        DELETE=uploads.cancel_upload,
    )
    router.add(
        rf"/v2/{_NAME}/blobs/(?P<digest>{_SEGMENT})",
        GET=blobs.get_blob,
        HEAD=blobs.get_blob,
        DELETE=blobs.delete_blob,
    )
    router.add(rf"/v2/{_NAME}/referrers/(?P<digest>{_SEGMENT})", GET=listing.referrers)
    router.add(r"/_cairn/health", GET=health.health)
    router.add(r"/_cairn/events", GET=feed.events)
    router.add(r"/_cairn/registry", GET=registry_identity)
    dashboard.add_routes(router)
    router.add(r"/_cairn/ui", GET=ui.redirect_to_index)
    router.add(r"/_cairn/ui/", GET=ui.page)
    router.add(r"/_cairn/ui/(?P<file>[^/]+)", GET=ui.page, HEAD=ui.page)
    router.add(r"/metrics", GET=metrics)
    return router


async def base(request: Request) -> Response:
    return json_response({})


async def registry_identity(request: Request) -> Response:
    registry_id = await run_sync(request.state.registry.registry_id)
    return json_response({"registry_id": registry_id})


async def metrics(request: Request) -> Response:
    collected = request.state.metrics
    if collected is None:
        raise HTTPError(ErrorCode.UNSUPPORTED, 404, "metrics are not enabled")
    return await collected.handle(request)


def route_label(handler: Handler | None) -> str:
    """Return the metrics label of a route: its handler's module and name."""
    if handler is None:
        return "unmatched"
    module = getattr(handler, "__module__", "").removeprefix("engine.api.")
    return f"{module}.{getattr(handler, '__name__', 'handler')}"


class RegistryApp:
    """The ASGI callable that serves the OCI distribution API and /_cairn/."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.router = build_router()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        await self._handle(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request = Request(scope, receive, self.state, _request_id(scope))
        structlog.contextvars.bind_contextvars(request_id=request.request_id)
        idle_timeout = (scope.get("extensions") or {}).get(IDLE_TIMEOUT)
        if idle_timeout is not None:
            idle_timeout["request_id"] = request.request_id
        status = 500
        route = "unmatched"
        cancelled = False
        try:
            response, route = await self._dispatch(request)
            status = response.status
            await self._send(request, response, send)
        except asyncio.CancelledError:
            # A shutdown whose timeout ended while this request ran. A
            # response that has not started becomes a 503, sent before the
            # cancellation goes on, because uvicorn would send a plain-text
            # 500 without cairn's headers. The log keeps the status sent.
            cancelled = True
            if not request.response_started:
                status = 503
                await self._send_shutting_down(request, send)
            raise
        except ClientDisconnected:
            # nginx's code for a client that closed the connection first, and
            # here also for one that stopped reading until the write idle
            # timeout closed it. The log shows it in place of the status that
            # was cut short.
            status = 499
        except Exception:
            # The response had started, so no error body can follow; the
            # server closes the connection and the client sees a short body.
            log.exception(
                "response_failed",
                method=request.method,
                path=request.path,
                request_id=request.request_id,
            )
        finally:
            if idle_timeout is not None and idle_timeout.get("timed_out") == "read":
                # The server closed the connection because the body stalled,
                # and it logged request_body_timed_out.
                status = 408
            elapsed = time.perf_counter() - started
            log.info(
                "request_finished",
                method=request.method,
                path=request.path,
                status=status,
                bytes_in=request.bytes_in,
                bytes_out=request.bytes_out,
                duration_ms=round(elapsed * 1000, 3),
                request_id=request.request_id,
                remote=request.actor.address,
                **({"cancelled": True} if cancelled else {}),
            )
            if self.state.metrics is not None:
                self.state.metrics.observe(
                    route,
                    request.method,
                    status,
                    request.bytes_in,
                    request.bytes_out,
                    elapsed,
                )
            structlog.contextvars.unbind_contextvars("request_id")

    async def _dispatch(self, request: Request) -> tuple[Response, str]:
        """Run the request's handler; return its response and route label."""
        handler: Handler | None = None
        try:
            # Before authentication and the rate limit, as Distribution 2.8.2
            # does. The errors depend on the headers alone, so they reveal
            # nothing about the registry to an unauthenticated client.
            request.check_transfer_coding()
            request.check_host()
            user = await self._admit(request)
            handler = self.router.resolve(request)
            if user is not None:
                authorize(request, user)
            return await handler(request), route_label(handler)
        except HTTPError as error:
            return _error_response(error), route_label(handler)
        except RegistryError as error:
            response = _error_response(HTTPError.from_registry_error(error))
            return response, route_label(handler)
        except ClientDisconnected:
            raise
        except Exception as error:
            if is_database_unavailable(error):
                response = _error_response(_database_unavailable(request, error))
                return response, route_label(handler)
            log.exception(
                "request_failed",
                method=request.method,
                path=request.path,
                request_id=request.request_id,
            )
            response = _error_response(
                HTTPError(
                    ErrorCode.UNKNOWN,
                    500,
                    "internal server error; the server log has the details",
                    {"request_id": request.request_id},
                )
            )
            return response, route_label(handler)

    async def _admit(self, request: Request) -> User | None:
        """Apply the rate limit, then authenticate; return the user, if any.

        Raises HTTPError 429 or 401. The health check skips both, so probes
        always reach it.
        """
        if is_public(request):
            return None
        limiter = self.state.rate_limiter
        if limiter is not None:
            retry_after = limiter.acquire(request.address)
            if retry_after is not None:
                raise too_many_requests(request.address, retry_after)
        if self.state.authenticator is None:
            return None
        user = await self.state.authenticator.authenticate(request)
        request.user = user.name
        return user

    async def _send_shutting_down(self, request: Request, send: Send) -> None:
        """Send the 503 of a request that a shutdown cancelled."""
        error = unavailable(
            "the server is shutting down; send the request again",
            request_id=request.request_id,
        )
        try:
            await self._send(request, _error_response(error), send)
        except Exception as send_error:
            # The cancellation goes on whatever happened to the response.
            log.warning(
                "shutdown_response_failed",
                method=request.method,
                path=request.path,
                request_id=request.request_id,
                error=str(send_error),
            )

    async def _send(self, request: Request, response: Response, send: Send) -> None:
        """Send ``response``, counting its body bytes in ``request.bytes_out``."""
        headers = [API_VERSION_HEADER, ("X-Request-Id", request.request_id)]
        headers += response.headers
        # RFC 9110 forbids Content-Length on a 204, and a 304 has no body.
        if response.status not in (204, 304):
            length = response.content_length
            if length is None and response.stream is None and response.file is None:
                length = len(response.body)
            if length is not None:
                headers.append(("Content-Length", str(length)))
        if not request.body_finished:
            # The rest of the body was never read, and closing the connection
            # is cheaper than draining it.
            headers.append(("Connection", "close"))
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (name.lower().encode("latin-1"), value.encode("latin-1", "replace"))
                    for name, value in headers
                ],
            }
        )
        request.response_started = True
        if response.file is not None:
            await _send_file(request, response, response.file, send)
        elif request.method == "HEAD" or response.stream is None:
            body = b"" if request.method == "HEAD" else response.body
            await send({"type": "http.response.body", "body": body})
            request.bytes_out += len(body)
        else:
            await _send_stream(request, response.stream, send)


async def _send_file(
    request: Request, response: Response, file: BinaryIO, send: Send
) -> None:
    """Send a file response's range and close the file.

    The bytes go by zero-copy send when the server offers it (cairn serve
    does, see engine.api.protocol), and are read in a worker thread and
    streamed otherwise.
    """
    length = response.content_length or 0
    try:
        if request.method == "HEAD" or length == 0:
            await send({"type": "http.response.body", "body": b""})
            return
        if ZEROCOPY_SEND not in (request.scope.get("extensions") or {}):
            chunks = _read_file(file, response.file_offset, length)
            await _send_stream(request, chunks, send)
            return
        message = {
            "type": ZEROCOPY_SEND,
            "file": file,
            "offset": response.file_offset,
            "count": length,
        }
        try:
            await send(message)
        except asyncio.CancelledError as error:
            # engine.api.protocol sets bytes_sent on the CancelledError of a
            # send that a shutdown ended.
            request.bytes_out += getattr(error, "bytes_sent", 0)
            raise
        except OSError as error:
            # engine.api.protocol's errors carry the bytes of the range that
            # went out before the failure.
            request.bytes_out += getattr(error, "bytes_sent", 0)
            if isinstance(error, ConnectionError):
                reason = "client disconnected during the response"
                raise ClientDisconnected(reason) from error
            raise
        request.bytes_out += length
    finally:
        file.close()


async def _read_file(file: BinaryIO, offset: int, length: int) -> AsyncIterator[bytes]:
    await run_sync(file.seek, offset)
    remaining = length
    while remaining > 0:
        chunk = await run_sync(file.read, min(READ_SIZE, remaining))
        if not chunk:
            raise OSError(f"file ended {remaining} bytes early")
        remaining -= len(chunk)
        yield chunk


async def _send_stream(
    request: Request, stream: AsyncIterator[bytes], send: Send
) -> None:
    """Send a streamed body, stopping early when the client goes away.

    Each chunk counts in ``request.bytes_out`` once the server has taken it,
    which may be before the client has received it.
    """
    disconnected = asyncio.Event()
    watcher: asyncio.Task[None] | None = None
    if request.body_finished:
        watcher = asyncio.ensure_future(_watch_disconnect(request, disconnected))
    try:
        async for chunk in stream:
            if disconnected.is_set():
                raise ClientDisconnected("client disconnected during the response")
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            request.bytes_out += len(chunk)
        await send({"type": "http.response.body", "body": b""})
    finally:
        if watcher is not None:
            watcher.cancel()
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def _watch_disconnect(request: Request, disconnected: asyncio.Event) -> None:
    await request.wait_for_disconnect()
    disconnected.set()


def _database_unavailable(request: Request, error: Exception) -> HTTPError:
    """Log a request that failed because the database was busy or
    unreachable, and build its 503. Its transaction was rolled back, so it
    appended no event, and the client may send it again.

    Only the log has the driver's message, which can name the database
    server's host, port and user. The client gets the name of the condition.
    """
    log.warning(
        "database_unavailable",
        method=request.method,
        path=request.path,
        request_id=request.request_id,
        error=_first_line(error),
    )
    return unavailable(
        "the registry's database is busy or unreachable; send the request again later",
        reason=unavailable_reason(error),
        request_id=request.request_id,
    )


def _first_line(error: Exception) -> str:
    """Return the first line of the driver's message, without the SQL and
    the hints that SQLAlchemy and psycopg add after it."""
    driver_error = getattr(error, "orig", None) or error
    lines = str(driver_error).strip().splitlines()
    return lines[0] if lines else type(driver_error).__name__


def _error_response(error: HTTPError) -> Response:
    return Response(
        error.status,
        [("Content-Type", "application/json"), *error.headers],
        error.body(),
    )


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def create_app(
    registry: Registry,
    bus: PullListener | None = None,
    *,
    relative_urls: bool = False,
    authenticator: Authenticator | None = None,
    rate_limiter: RateLimiter | None = None,
) -> RegistryApp:
    """Build the ASGI app on ``registry``; ``bus`` gets pull notifications.

    ``authenticator`` turns on Basic authentication and ``rate_limiter`` a
    per-address request limit; without them the registry is open.
    """
    state = AppState(
        registry,
        bus,
        relative_urls,
        metrics=Metrics(registry, bus),
        position_waiter=PositionWaiter(registry.database),
        authenticator=authenticator,
        rate_limiter=rate_limiter,
    )
    return RegistryApp(state)
