"""OCI Distribution API calls over httpx and over the raw bulk client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import httpx

from bench.payload import OCI_MANIFEST, sha256_digest
from bench.procmem import CpuMeter
from bench.rawhttp import Body, RawConnection, RawResponse, request_target
from bench.urls import next_link, resolve_location, with_digest

HTTP_TIMEOUT_S = 600.0
Item = TypeVar("Item")
Client = TypeVar("Client", httpx.Client, RawConnection)


class RegistryError(Exception):
    pass


def http_client(base_url: str) -> httpx.Client:
    # trust_env=False ignores proxy variables, so requests cannot leave loopback.
    return httpx.Client(
        base_url=base_url,
        trust_env=False,
        timeout=HTTP_TIMEOUT_S,
        follow_redirects=False,
    )


def _check(response: httpx.Response, expected: Sequence[int]) -> httpx.Response:
    if response.status_code not in expected:
        raise RegistryError(
            f"{response.request.method} {response.request.url} returned "
            f"{response.status_code}, expected {'/'.join(map(str, expected))}: "
            f"{response.text[:300]}"
        )
    return response


def _check_raw(
    response: RawResponse, method: str, url: str, expected: Sequence[int]
) -> RawResponse:
    if response.status not in expected:
        raise RegistryError(
            f"{method} {url} returned {response.status}, expected "
            f"{'/'.join(map(str, expected))}: {response.body[:300]!r}"
        )
    return response


def _location(base_url: str, response: httpx.Response | RawResponse) -> str:
    if isinstance(response, httpx.Response):
        location = response.headers.get("location")
    else:
        location = response.header("location")
    if not location:
        raise RegistryError("upload response has no Location header")
    return resolve_location(base_url, location)


def start_upload(client: httpx.Client, repo: str) -> str:
    response = _check(client.post(f"/v2/{repo}/blobs/uploads/"), (202,))
    return _location(str(client.base_url), response)


def push_blob(client: httpx.Client, repo: str, data: bytes, digest: str) -> None:
    """Push a blob with POST then a monolithic PUT ?digest=."""
    upload_url = start_upload(client, repo)
    headers = {"Content-Type": "application/octet-stream"}
    response = client.put(
        with_digest(upload_url, digest), content=data, headers=headers
    )
    _check(response, (201,))


def mount_or_push_blob(
    client: httpx.Client, repo: str, source_repo: str, data: bytes
) -> None:
    """Mount a blob from source_repo, or push it if the server does not mount."""
    digest = sha256_digest(data)
    response = client.post(
        f"/v2/{repo}/blobs/uploads/", params={"mount": digest, "from": source_repo}
    )
    if response.status_code == 201:
        return
    _check(response, (202,))
    upload_url = _location(str(client.base_url), response)
    headers = {"Content-Type": "application/octet-stream"}
    response = client.put(
        with_digest(upload_url, digest), content=data, headers=headers
    )
    _check(response, (201,))


def put_manifest(client: httpx.Client, repo: str, reference: str, body: bytes) -> None:
    headers = {"Content-Type": OCI_MANIFEST}
    response = client.put(
        f"/v2/{repo}/manifests/{reference}", content=body, headers=headers
    )
    _check(response, (201,))


def list_all_pages(
    connection: RawConnection, base_url: str, path: str, key: str
) -> tuple[list[str], int]:
    """GET path, follow rel="next" Link headers and return (items, request count)."""
    url: str | None = f"{base_url}{path}"
    items: list[str] = []
    requests = 0
    while url is not None:
        page, link = _get_page(connection, url, key)
        items.extend(page)
        requests += 1
        url = next_link(base_url, link)
    return items, requests


def get_page(
    connection: RawConnection, base_url: str, path: str, key: str
) -> list[str]:
    return _get_page(connection, f"{base_url}{path}", key)[0]


def _get_page(
    connection: RawConnection, url: str, key: str
) -> tuple[list[str], str | None]:
    """GET one listing page; return its items under ``key`` and its Link header."""
    response = connection.request("GET", request_target(url))
    _check_raw(response, "GET", url, (200,))
    return list(json.loads(response.body).get(key) or []), response.header("link")


# Bulk transfers over RawConnection.


def raw_start_upload(connection: RawConnection, base_url: str, repo: str) -> str:
    url = f"{base_url}/v2/{repo}/blobs/uploads/"
    response = connection.request("POST", request_target(url))
    return _location(base_url, _check_raw(response, "POST", url, (202,)))


def raw_put_blob(
    connection: RawConnection, base_url: str, repo: str, body: Body, digest: str
) -> None:
    """Push one blob with POST then a monolithic PUT whose body is `body`."""
    upload_url = with_digest(raw_start_upload(connection, base_url, repo), digest)
    headers = {"Content-Type": "application/octet-stream"}
    response = connection.request("PUT", request_target(upload_url), headers, body)
    _check_raw(response, "PUT", upload_url, (201,))


def raw_put_manifest(
    connection: RawConnection, base_url: str, repo: str, reference: str, body: bytes
) -> None:
    url = f"{base_url}/v2/{repo}/manifests/{reference}"
    headers = {"Content-Type": OCI_MANIFEST}
    response = connection.request("PUT", request_target(url), headers, body)
    _check_raw(response, "PUT", url, (201,))


def raw_connection(base_url: str) -> RawConnection:
    return RawConnection(base_url, HTTP_TIMEOUT_S)


def raw_open(connection: RawConnection) -> None:
    """Connect with GET /v2/, so that later requests find the socket open."""
    response = connection.request("GET", "/v2/")
    _check_raw(response, "GET", "/v2/", (200, 401))


def raw_patch(
    connection: RawConnection, base_url: str, upload_url: str, body: Body, start: int
) -> str:
    """Send one PATCH chunk at byte offset start and return the next upload URL."""
    length = len(body) if isinstance(body, bytes) else body.length
    headers = {
        "Content-Type": "application/octet-stream",
        "Content-Range": f"{start}-{start + length - 1}",
    }
    response = connection.request("PATCH", request_target(upload_url), headers, body)
    return _location(base_url, _check_raw(response, "PATCH", upload_url, (202,)))


def raw_finish_upload(connection: RawConnection, upload_url: str, digest: str) -> None:
    url = with_digest(upload_url, digest)
    response = connection.request("PUT", request_target(url), body=b"")
    _check_raw(response, "PUT", url, (201,))


def raw_pull_blob(
    connection: RawConnection, base_url: str, repo: str, digest: str
) -> int:
    """GET a blob, discard its body and return its length in bytes.

    Follows one redirect if it stays on the same loopback server.
    """
    url = f"{base_url}/v2/{repo}/blobs/{digest}"
    response = connection.request("GET", request_target(url), keep_body=False)
    if response.status in (301, 302, 303, 307, 308):
        url = _location(base_url, response)
        response = connection.request("GET", request_target(url), keep_body=False)
    _check_raw(response, "GET", url, (200,))
    return response.body_length


# Concurrent clients.


@dataclass
class ConcurrentResult:
    wall_s: float
    latencies_s: list[float]


def run_concurrent(
    clients: int,
    items: Sequence[Item],
    make_client: Callable[[], Client],
    operation: Callable[[Client, Item], None],
    meter: CpuMeter | None = None,
) -> ConcurrentResult:
    """Run operation once per item from `clients` threads, each with its own client.

    A client is an httpx.Client or a RawConnection. Each client opens its
    connection with GET /v2/ before a barrier, so the wall time, and the CPU
    time that ``meter`` measures, cover only the operations.
    """
    started: list[float] = []

    def start_clock() -> None:
        # Runs once every thread has arrived, before any is released.
        if meter is not None:
            meter.start()
        started.append(time.perf_counter())

    barrier = threading.Barrier(clients + 1, action=start_clock)
    shares = [items[index::clients] for index in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]

    def worker(index: int) -> None:
        client: Client | None = None
        try:
            client = make_client()
            if isinstance(client, httpx.Client):
                _check(client.get("/v2/"), (200, 401))
            else:
                raw_open(client)
        finally:
            # Reach the barrier even after an error, so the other threads and
            # the caller are not left waiting. The error surfaces in result().
            barrier.wait()
        try:
            for item in shares[index]:
                start = time.perf_counter()
                operation(client, item)
                latencies[index].append(time.perf_counter() - start)
        finally:
            client.close()

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(worker, index) for index in range(clients)]
        barrier.wait()
        for future in futures:
            future.result()
        wall = time.perf_counter() - started[0]
        if meter is not None:
            meter.stop()
    return ConcurrentResult(wall, [value for share in latencies for value in share])
