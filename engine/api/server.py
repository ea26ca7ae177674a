"""`cairn serve`: run migrations, start the bus, serve HTTP with uvicorn.

uvicorn runs with httptools, on uvloop for plain HTTP and on asyncio's own
event loop for HTTPS (see _event_loop_factory), its access log off (the app logs
each request itself) and its logging left to cairn's structlog set-up.
Connections close after --read-idle-timeout seconds without a byte from a
client that the server waits on, and after --write-idle-timeout seconds in
which a client takes no byte of a response. SIGTERM and SIGINT stop
accepting connections, close idle ones, let in-flight requests finish
(up to --shutdown-timeout), stop the bus and exit with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from types import FrameType

import sqlalchemy as sa
import structlog
import uvicorn
import uvloop

from engine.api.app import create_app
from engine.api.auth import Authenticator, AuthFileError
from engine.api.https_port import configured_https_protocol
from engine.api.protocol import configured_protocol
from engine.api.ratelimit import RateLimiter
from engine.api.tls import TLSConfigError, server_context, validity_problem
from engine.bus import Bus, EmbeddedNatsError, NatsServerNotFound
from engine.cli import StorageUnavailable, open_registry, report_storage_error
from engine.config import StorageSettings
from engine.database_url import redacted_database_url
from engine.registry import Registry
from engine.stdout import discard_stdout

log = structlog.get_logger(__name__)

UPLOAD_PURGE_INTERVAL = 3600.0


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket; port 0 picks a free port."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        # Listening before the address is printed queues the connections
        # that arrive while the embedded NATS server starts, instead of
        # refusing them. The backlog is uvicorn's default.
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class _SkipCancelledRequests(logging.Filter):
    """Drop uvicorn's error record for a request task that was cancelled.

    When the shutdown timeout ends, uvicorn cancels the requests still
    running and logs "Exception in ASGI application" with the
    CancelledError's traceback for each. The app's request_finished line
    already reports such a request with ``cancelled``.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, asyncio.CancelledError)


def _display_url(host: str, port: int, scheme: str = "http") -> str:
    bracketed = f"[{host}]" if ":" in host else host
    return f"{scheme}://{bracketed}:{port}"


def _event_loop_factory(
    tls_context: ssl.SSLContext | None,
) -> Callable[[], asyncio.AbstractEventLoop]:
    """Return the event loop to serve on: uvloop, unless the server serves TLS.

    uvloop 0.23 encrypts in its own TLS layer, which sent a 256 MiB blob to
    curl at 308 to 364 MiB/s, against 560 to 709 MiB/s on asyncio's loop,
    which uses the ssl module's SSLObject (BENCHMARKS.md, "HTTPS, measured
    by hand"). Plain HTTP is faster on uvloop.
    """
    if tls_context is None:
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def _unpaired_tls_option(args: argparse.Namespace) -> str | None:
    """Return a usage error when only one of --tls-cert and --tls-key is set."""
    if args.tls_cert is not None and args.tls_key is None:
        return "--tls-cert needs --tls-key (env CAIRN_TLS_KEY) as well"
    if args.tls_key is not None and args.tls_cert is None:
        return "--tls-key needs --tls-cert (env CAIRN_TLS_CERT) as well"
    return None


def _warn_about_validity(cert: Path) -> None:
    """Log a warning when clients will reject the certificate now or soon."""
    problem = validity_problem(cert)
    if problem is None:
        return
    kind, moment = problem
    if kind == "not_yet_valid":
        log.warning(
            "tls_certificate_not_yet_valid",
            certificate=str(cert),
            not_valid_before=moment.isoformat(),
        )
    else:
        log.warning(
            f"tls_certificate_{kind}",
            certificate=str(cert),
            not_valid_after=moment.isoformat(),
        )


def serve(args: argparse.Namespace) -> int:
    """Run the registry until SIGTERM or SIGINT; return the exit status.

    An invalid users file, TLS file, storage or listen address stops the
    start with one `cairn: ...` line on standard error and no error log
    record, because the user fixes it from that line. The embedded NATS
    server failing after the start is logged as a service error.
    """
    usage_error = _unpaired_tls_option(args)
    if usage_error is not None:
        print(f"cairn serve: {usage_error}", file=sys.stderr)
        return 2
    logging.getLogger("uvicorn.error").addFilter(_SkipCancelledRequests())
    try:
        authenticator = _load_authenticator(args.auth_file)
    except AuthFileError as error:
        print(f"cairn: {error}", file=sys.stderr)
        return 1
    tls_context: ssl.SSLContext | None = None
    if args.tls_cert is not None:
        try:
            tls_context = server_context(args.tls_cert, args.tls_key)
        except TLSConfigError as error:
            print(f"cairn: {error}", file=sys.stderr)
            return 1
        _warn_about_validity(args.tls_cert)
    scheme = "http" if tls_context is None else "https"
    rate_limiter = None
    if args.rate_limit is not None:
        rate_limiter = RateLimiter(args.rate_limit)
        log.info("rate_limit_enabled", rate=rate_limiter.rate, burst=rate_limiter.burst)

    settings = StorageSettings.from_args(args)
    data_dir = Path(settings.data_dir).resolve()
    try:
        registry = open_registry(
            replace(settings, data_dir=data_dir),
            create=True,
            writable=True,
            adopt_data_dir=True,
        )
    except StorageUnavailable as error:
        return report_storage_error(error)
    registry.max_blob_size = args.max_blob_size
    if args.no_direct_io:
        registry.blob_store.direct_io = False
    log.info("blob_writes_configured", direct_io=registry.blob_store.direct_io)
    bus = Bus.from_args(args, registry.database, data_dir)

    host, port = args.listen
    try:
        sock = bind_socket(host, port)
    except OSError as error:
        print(f"cairn: cannot listen on {host}:{port}: {error}", file=sys.stderr)
        registry.database.dispose()
        return 1
    port = sock.getsockname()[1]

    app = create_app(
        registry,
        bus,
        relative_urls=args.relative_urls,
        authenticator=authenticator,
        rate_limiter=rate_limiter,
    )
    trusted_proxies: list[str] = args.trusted_proxies
    cairn_protocol = configured_protocol(
        read_idle_timeout=args.read_idle_timeout,
        write_idle_timeout=args.write_idle_timeout,
    )
    http_protocol: type[asyncio.Protocol] = cairn_protocol
    if tls_context is not None:
        # uvicorn would start TLS on every connection itself. This protocol
        # sends a 400 for a plain HTTP request instead (see https_port).
        http_protocol = configured_https_protocol(cairn_protocol, tls_context)
    config = uvicorn.Config(
        app,
        loop="none",
        http=http_protocol,
        ws="none",
        lifespan="off",
        access_log=False,
        log_config=None,
        server_header=False,
        # Without a trusted proxy, a client could choose its own address
        # for the rate limit and the log with X-Forwarded-For.
        proxy_headers=bool(trusted_proxies),
        forwarded_allow_ips=trusted_proxies or None,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    server = uvicorn.Server(config)

    # Hides a password in the query string too, which SQLAlchemy shows.
    database = redacted_database_url(registry.database.url)

    def announce() -> None:
        try:
            print(f"cairn listening on {_display_url(host, port, scheme)}", flush=True)
            print(f"data directory {data_dir}, database {database}", flush=True)
        except BrokenPipeError as error:
            # These two lines are all that serve writes to standard output,
            # and the log on standard error has the same facts, so a reader
            # that went away does not stop the server.
            discard_stdout()
            log.warning("stdout_closed", error=str(error))
        log.info(
            "server_started",
            url=_display_url(host, port, scheme),
            data_dir=str(data_dir),
            database=database,
            max_blob_size=registry.max_blob_size,
        )

    def stop(signum: int, _frame: FrameType | None) -> None:
        # uvicorn installs its own handlers while it serves and raises the
        # signal again once it has shut down. This handler catches that
        # repeat, and also a signal that arrives before uvicorn starts.
        server.should_exit = True

    exit_status = 0
    previous = {
        sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        with asyncio.Runner(loop_factory=_event_loop_factory(tls_context)) as runner:
            expiry = timedelta(hours=args.upload_expiry)
            runner.run(_run(server, sock, bus, registry, expiry, announce))
    except (NatsServerNotFound, EmbeddedNatsError) as error:
        log.error("bus_start_failed", error=str(error))
        print(f"cairn: cannot start the embedded NATS server: {error}", file=sys.stderr)
        exit_status = 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        registry.database.dispose()
    log.info("server_stopped", url=_display_url(host, port, scheme), status=exit_status)
    return exit_status


def _load_authenticator(auth_file: Path | None) -> Authenticator | None:
    """Load the users file, if one is set; raise AuthFileError when invalid."""
    if auth_file is None:
        return None
    authenticator = Authenticator.from_file(auth_file)
    if authenticator.users:
        log.info(
            "auth_enabled", auth_file=str(auth_file), users=len(authenticator.users)
        )
    else:
        log.warning("auth_enabled_without_users", auth_file=str(auth_file))
    return authenticator


async def _run(
    server: uvicorn.Server,
    sock: socket.socket,
    bus: Bus,
    registry: Registry,
    upload_expiry: timedelta,
    announce: Callable[[], None],
) -> None:
    """Start the bus, then call ``announce`` and serve until a signal stops it.

    A server whose embedded NATS server fails to start never announces that
    it listens, although its socket is already bound.
    """
    await bus.start()
    announce()
    purger = asyncio.create_task(_purge_uploads(registry, upload_expiry))
    try:
        if not server.should_exit:
            await server.serve(sockets=[sock])
    finally:
        purger.cancel()
        await bus.stop()


async def _purge_uploads(registry: Registry, expiry: timedelta) -> None:
    """Delete idle uploads at start and then every hour."""
    while True:
        try:
            await asyncio.to_thread(registry.purge_uploads, expiry)
        except (OSError, sa.exc.SQLAlchemyError) as error:
            log.error("uploads_purge_failed", error=str(error))
        await asyncio.sleep(UPLOAD_PURGE_INTERVAL)
