"""URL helpers that keep every request on the loopback interface."""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class NonLoopbackURLError(ValueError):
    pass


def loopback_host_port(url: str) -> tuple[str, int]:
    """Return (host, port) of an http URL, raising unless the host is loopback."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
        raise NonLoopbackURLError(
            f"{url!r} is not an http URL on 127.0.0.1; the harness talks to "
            "loopback servers only"
        )
    return parts.hostname, parts.port or 80


def resolve_location(base_url: str, location: str) -> str:
    """Resolve a Location or Link target against the server's base URL.

    Raises NonLoopbackURLError if the result points to another host or port,
    so a misbehaving server cannot send the harness off the machine.
    """
    resolved = urljoin(base_url, location)
    if loopback_host_port(resolved) != loopback_host_port(base_url):
        raise NonLoopbackURLError(
            f"server at {base_url} returned {location!r}, which leaves that server"
        )
    return resolved


def with_digest(upload_url: str, digest: str) -> str:
    """Append digest= to an upload URL and keep its existing query.

    Distribution 2.8 puts a signed `_state` parameter in the upload Location;
    httpx's params= would replace that query, so the digest is appended as text.
    """
    separator = "&" if "?" in upload_url else "?"
    return f"{upload_url}{separator}digest={digest}"


def next_link(base_url: str, link_header: str | None) -> str | None:
    """Return the absolute URL of a `Link: <...>; rel="next"` header, if any."""
    if not link_header:
        return None
    for part in link_header.split(","):
        target, _, params = part.partition(";")
        target = target.strip()
        is_next = 'rel="next"' in params.replace(" ", "") or "rel=next" in params
        if is_next and target.startswith("<") and target.endswith(">"):
            return resolve_location(base_url, target[1:-1])
    return None
