"""The client address of a request, as the rate limit and events record it.

Behind a proxy named in --trusted-proxies, uvicorn's proxy header handling
replaces the scope's ``client`` with the address in X-Forwarded-For. It
strips a port and the brackets of an IPv6 address, but passes on any other
value, such as ``unknown`` or ``garbage``, as the host. cairn takes only an
IP address from there. For any other value it takes the address of the
connection, which is the proxy's, and logs ``forwarded_address_invalid``.
The connection's address comes from the scope extension CONNECTION_PEER,
which engine.api.protocol sets before uvicorn replaces ``client``.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Final

from engine.logs import ThrottledWarnings

# cairn's ASGI extension that keeps the connection's peer. Its value is a
# dict whose "client" is the (host, port) of the connection, as uvicorn
# first sets the scope's ``client``.
CONNECTION_PEER: Final = "cairn.connection_peer"

# Seconds after a proxy's forwarded_address_invalid line during which its
# further invalid values are counted instead of logged one by one.
WARNING_INTERVAL: Final = 60.0


@functools.lru_cache(maxsize=1024)
def client_address(host: str) -> str:
    """Return an IP address in its one standard spelling (RFC 5952 for
    IPv6: 0:0::1 becomes ::1), so that the query API's address filter finds
    every event of a client. Raises ValueError for a host that is not an IP
    address.

    An IPv4-mapped IPv6 address (::ffff:192.0.2.1), which a dual-stack
    socket reports for an IPv4 client, becomes its IPv4 address. Python's
    own spelling of it changed in 3.13, from ::ffff:c000:201 (3.12.1) to
    ::ffff:192.0.2.1 (3.13.0).
    """
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def request_address(
    scope: MutableMapping[str, Any], request_id: str, warnings: InvalidForwardedLog
) -> str | None:
    """Return the client address of the request of ``scope``, or None when
    the server gave none, as for a Unix socket.

    A forwarded value that is not an IP address gives the connection's own
    address in its place, or None when the server did not report that
    address, and is logged through ``warnings``.
    """
    client = scope.get("client")
    if not client:
        return None
    host: str = client[0]
    try:
        return client_address(host)
    except ValueError:
        pass
    peer = ((scope.get("extensions") or {}).get(CONNECTION_PEER) or {}).get("client")
    proxy: str | None = peer[0] if peer else None
    warnings.record(proxy, host, request_id)
    if proxy is None:
        return None
    try:
        return client_address(proxy)
    except ValueError:
        return None


class InvalidForwardedLog(ThrottledWarnings):
    """forwarded_address_invalid lines, at most once per interval per proxy;
    the rest are counted in forwarded_addresses_invalid_suppressed lines."""

    suppressed_event = "forwarded_addresses_invalid_suppressed"
    key_field = "proxy"
    count_field = "values"

    def __init__(
        self,
        interval: float = WARNING_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(interval, clock)

    def record(self, proxy: str | None, value: str, request_id: str) -> None:
        self.warn(
            proxy,
            "forwarded_address_invalid",
            proxy=proxy,
            value=value,
            request_id=request_id,
            note="X-Forwarded-For names no IP address, so the address of the "
            "connection is used",
        )
