"""Reject a mirror whose target is its own source.

Mirroring a registry into itself appends events to the source: tag.set
events move tags back through older digests, and deleted tags and blob
links come back. Two checks run before anything is written:

* The URLs are compared after normalisation: scheme and host in lower
  case, the default port made explicit, trailing slashes removed, and
  localhost, 127.0.0.1 and ::1 taken as one host.
* When both sides are cairn, their registry ids from /_cairn/registry are
  compared, which also catches two URLs or two servers of one registry.
  A target that does not serve that endpoint (another registry, or an
  older cairn) passes this check.

The source's registry id also goes into the checkpoint, which thereby
distinguishes a source that was reset or replaced from the one it was
written for.
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Final
from urllib.parse import urlsplit

import httpx

from consumers.mirror.errors import request_failed
from consumers.mirror.registry import MIRROR_CREDENTIALS, check

IDENTITY_PATH: Final = "/_cairn/registry"
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# localhost resolves to 127.0.0.1 or ::1, and servers often listen on both,
# so the three are taken as one host. Other 127.0.0.0/8 addresses stay
# distinct, because a server bound to 127.0.0.1 accepts no connection to them.
LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})


class SameRegistry(Exception):
    """The target is the source registry."""


def normalise_url(url: str) -> tuple[str, str, int, str]:
    """Return (scheme, host, port, path) of an http(s) URL, for comparison.

    Raises ValueError for a URL with an invalid port.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    # An IP address is written in its shortest form, so "::0:1" is "::1".
    with contextlib.suppress(ValueError):
        host = ipaddress.ip_address(host).compressed
    if host in LOOPBACK_HOSTS:
        host = "localhost"
    port = parts.port or DEFAULT_PORTS.get(scheme, 0)
    return scheme, host, port, parts.path.rstrip("/")


def check_urls(source: str, target: str) -> None:
    """Raise SameRegistry when both URLs name the same server and path."""
    if normalise_url(source) == normalise_url(target):
        raise SameRegistry(
            f"--target {target} is the source registry {source}. Mirroring "
            "a registry into itself appends events that move its tags back "
            "to older manifests and restore deleted tags and blobs. Pass "
            "another registry as --target"
        )


def check_registry_ids(
    source: str, source_id: str | None, target: str, target_id: str | None
) -> None:
    """Raise SameRegistry when source and target report one registry id."""
    if target_id is not None and source_id == target_id:
        raise SameRegistry(
            f"--target {target} and --source {source} reach the same "
            f"registry (registry id {target_id}). Mirroring a registry into "
            "itself appends events that move its tags back to older manifests "
            "and restore deleted tags and blobs. Pass another registry as "
            "--target"
        )


async def fetch_registry_id(
    client: httpx.AsyncClient,
    base_url: str,
    *,
    denied_is_unknown: bool = True,
    credentials: str = MIRROR_CREDENTIALS,
) -> str | None:
    """Return the registry id that a cairn at ``base_url`` reports.

    Returns None for a registry that does not report one: a 4xx response
    (404 from another registry or an older cairn, 401 or 403 when it
    requires other credentials, unless ``denied_is_unknown`` is false) or
    a body without a string ``registry_id``. ``credentials`` is the hint on
    where to set credentials, added to a 401 error.

    Raises TransientError when the request fails in a way worth retrying,
    and MirrorError (from registry.check) for any other response that is
    neither 2xx nor a 4xx taken as unknown.
    """
    url = base_url.rstrip("/") + IDENTITY_PATH
    description = f"GET {url}"
    try:
        response = await client.get(url)
    except httpx.TransportError as error:
        raise request_failed(description, error) from error
    status = response.status_code
    unknown = 400 <= status < 500 and status not in (408, 425, 429)
    if unknown and (denied_is_unknown or status not in (401, 403)):
        return None
    check(response, description, credentials)
    try:
        document = response.json()
    except ValueError:
        return None
    registry_id = document.get("registry_id") if isinstance(document, dict) else None
    return registry_id if isinstance(registry_id, str) and registry_id else None
