"""Tag listing of one repository with many tags, and catalog of many repositories."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from functools import partial

import httpx

from bench.payload import (
    OCI_CONFIG,
    OCI_LAYER_TAR,
    Descriptor,
    image_config,
    image_manifest,
    sha256_digest,
)
from bench.rawhttp import RawConnection
from bench.registry import (
    get_page,
    http_client,
    list_all_pages,
    mount_or_push_blob,
    push_blob,
    put_manifest,
    raw_connection,
    raw_open,
    run_concurrent,
)
from bench.targets import Target
from bench.workloads import Context, Figure, Sizes, Workload

TAGS_REPO = "bench/tags"
CATALOG_PREFIX = "bench-catalog/r"
PAGE_REPEATS = 5
SETUP_BATCH = 2000


@dataclass(frozen=True)
class ListingState:
    tags: int
    repos: int


class Listing(Workload):
    name = "listing"
    description = (
        "GET /v2/<repo>/tags/list and GET /v2/_catalog: the full listing with "
        "n=<page size>, following Link rel=next, and one page from the middle "
        "(last=), median of 5 requests"
    )

    def figures(self, sizes: Sizes) -> tuple[Figure, ...]:
        tags = f"{sizes.listing_tags} tags"
        repos = f"catalog of {sizes.listing_repos} repos"
        page = f"n={sizes.page_size}"
        return (
            Figure("tags-full", f"{tags}, full listing ({page})", "ms", False),
            Figure("tags-full-requests", f"{tags}, full listing", "requests", None),
            Figure("tags-page", f"{tags}, one page ({page})", "ms", False),
            Figure("tags-page-items", f"{tags}, one page ({page})", "items", None),
            Figure("catalog-full", f"{repos}, full listing ({page})", "ms", False),
            Figure("catalog-full-requests", f"{repos}, full listing", "requests", None),
            Figure("catalog-page", f"{repos}, one page ({page})", "ms", False),
            Figure("catalog-page-items", f"{repos}, one page ({page})", "items", None),
        )

    def setup(self, context: Context, target: Target) -> ListingState:
        """Create the tags and repositories once. Every round lists the same ones."""
        sizes = context.sizes
        layer_data = os.urandom(1024)
        layer = Descriptor(OCI_LAYER_TAR, sha256_digest(layer_data), len(layer_data))
        config_data = image_config([layer.digest])
        config = Descriptor(OCI_CONFIG, sha256_digest(config_data), len(config_data))
        manifest = image_manifest(config, [layer])
        with http_client(target.base_url) as client:
            push_blob(client, TAGS_REPO, layer_data, layer.digest)
            push_blob(client, TAGS_REPO, config_data, config.digest)

        started = time.perf_counter()

        def tag_manifest(client: httpx.Client, index: int) -> None:
            put_manifest(client, TAGS_REPO, f"t{index:05d}", manifest)

        def create_repo(client: httpx.Client, index: int) -> None:
            repo = f"{CATALOG_PREFIX}{index:05d}"
            mount_or_push_blob(client, repo, TAGS_REPO, layer_data)
            mount_or_push_blob(client, repo, TAGS_REPO, config_data)
            put_manifest(client, repo, "latest", manifest)

        for what, count, operation in (
            ("tags", sizes.listing_tags, tag_manifest),
            ("repositories", sizes.listing_repos, create_repo),
        ):
            # Batches only give progress lines, because the setup can take minutes.
            for first in range(0, count, SETUP_BATCH):
                run_concurrent(
                    sizes.clients,
                    range(first, min(first + SETUP_BATCH, count)),
                    partial(http_client, target.base_url),
                    operation,
                )
                done = min(first + SETUP_BATCH, count)
                context.log(f"  {target.name}: {done} of {count} {what} created")
        context.log(
            f"  {target.name}: listing setup took {time.perf_counter() - started:.0f} s"
        )
        return ListingState(sizes.listing_tags, sizes.listing_repos)

    def run_round(
        self, context: Context, target: Target, state: object, label: str
    ) -> dict[str, float]:
        assert isinstance(state, ListingState)
        page = context.sizes.page_size
        results: dict[str, float] = {}
        base_url = target.base_url
        with raw_connection(base_url) as connection:
            raw_open(connection)

            start = time.perf_counter()
            tags, requests = list_all_pages(
                connection, base_url, f"/v2/{TAGS_REPO}/tags/list?n={page}", "tags"
            )
            results["tags-full"] = (time.perf_counter() - start) * 1000
            results["tags-full-requests"] = requests
            if len(set(tags)) != state.tags:
                raise RuntimeError(
                    f"tag listing returned {len(set(tags))} distinct tags, "
                    f"expected {state.tags}"
                )
            middle_tag = f"t{state.tags // 2 - 1:05d}"
            path = f"/v2/{TAGS_REPO}/tags/list?n={page}&last={middle_tag}"
            results["tags-page"], results["tags-page-items"] = _time_page(
                connection, base_url, path, "tags"
            )

            start = time.perf_counter()
            names, requests = list_all_pages(
                connection, base_url, f"/v2/_catalog?n={page}", "repositories"
            )
            results["catalog-full"] = (time.perf_counter() - start) * 1000
            results["catalog-full-requests"] = requests
            listed = {name for name in names if name.startswith(CATALOG_PREFIX)}
            if len(listed) != state.repos:
                raise RuntimeError(
                    f"catalog listed {len(listed)} of the {state.repos} "
                    f"{CATALOG_PREFIX}* repositories"
                )
            middle_repo = f"{CATALOG_PREFIX}{state.repos // 2 - 1:05d}"
            path = f"/v2/_catalog?n={page}&last={middle_repo}"
            results["catalog-page"], results["catalog-page-items"] = _time_page(
                connection, base_url, path, "repositories"
            )
        return results


def _time_page(
    connection: RawConnection, base_url: str, path: str, key: str
) -> tuple[float, int]:
    """Return the median time in ms of PAGE_REPEATS GETs of path, and its item count."""
    times = []
    items = 0
    for _ in range(PAGE_REPEATS):
        start = time.perf_counter()
        items = len(get_page(connection, base_url, path, key))
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), items
