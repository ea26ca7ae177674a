"""engine.queries over SQLite and PostgreSQL: listings, sorting, pages, point
in time, activity and the event feed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command

from engine import log as event_log
from engine import queries
from engine.domain.digest import Digest
from engine.domain.errors import ManifestUnknown, NameUnknown, Unsupported
from engine.domain.events import Actor, EventType, NewEvent
from engine.migrate import _config, upgrade
from engine.projections import ALL_PROJECTIONS, apply_events
from engine.projections.rebuild import rebuild_projections, snapshot_projections
from engine.queries.events import address_spellings
from engine.registry import Registry
from tests.images import Image, make_artifact, make_image, make_index

T0 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
HOUR = timedelta(hours=1)


def push(registry: Registry, repository: str, image: Image, tag: str | None) -> int:
    """Push an image through the registry API; return the log position after."""
    repo = registry.repository(repository, actor=Actor("alice", "127.0.0.1"))
    for blob in image.blobs:
        repo.blobs.push(Digest.of(blob), [blob])
    repo.manifests.put(image.manifest, image.media_type, tag=tag)
    return head(registry)


def head(registry: Registry) -> int:
    with registry.database.read() as conn:
        return queries.log_head(conn)


def read(registry: Registry, function: Any, *args: Any, **kwargs: Any) -> Any:
    with queries.snapshot(registry.database) as conn:
        return function(conn, *args, **kwargs)


def append_at(
    registry: Registry, moment: datetime, new_events: list[NewEvent], user: str
) -> int:
    """Append events with a chosen time, as a push at ``moment`` would."""
    with registry.database.write() as conn:
        stored = event_log.append(
            conn, new_events, actor=Actor(user, "127.0.0.1"), now=moment
        )
        return apply_events(conn, ALL_PROJECTIONS, stored)


def blob_event(repository: str, seed: str, size: int) -> NewEvent:
    digest = str(Digest.of(seed.encode()))
    return NewEvent(EventType.BLOB_PUSHED, repository, {"digest": digest, "size": size})


def tag_event(repository: str, tag: str, digest: str, previous: str | None) -> NewEvent:
    return NewEvent(
        EventType.TAG_SET,
        repository,
        {"tag": tag, "digest": digest, "previous": previous},
    )


def all_items(fetch: Any, key: str = "name", **kwargs: Any) -> list[Any]:
    """Follow next_cursor through every page and collect ``key`` of each item."""
    collected: list[Any] = []
    cursor = None
    while True:
        page = fetch(cursor=cursor, **kwargs)
        collected += [item[key] for item in page.items]
        cursor = page.next_cursor
        if cursor is None:
            return collected


# ---- repositories -------------------------------------------------------------


@pytest.fixture
def three_repositories(registry: Registry) -> Registry:
    push(registry, "team/small", make_image(layer_size=100), "v1")
    push(registry, "team/large", make_image(layer_size=9000), "v1")
    push(registry, "team/large", make_image(layer_size=10), "v2")
    push(registry, "other/medium", make_image(layer_size=4000), "latest")
    return registry


def test_repository_listing_sorts(three_repositories: Registry) -> None:
    registry = three_repositories

    by_name = read(registry, queries.repository_page)
    by_size = read(registry, queries.repository_page, sort="size", descending=True)
    by_tags = read(registry, queries.repository_page, sort="tags", descending=True)
    recent = read(registry, queries.repository_page, sort="last_push", descending=True)

    names = ["other/medium", "team/large", "team/small"]
    assert [r["name"] for r in by_name.items] == names
    assert by_name.extra["total"] == 3
    assert [r["name"] for r in by_size.items] == [
        "team/large",
        "other/medium",
        "team/small",
    ]
    assert by_tags.items[0]["name"] == "team/large"
    assert by_tags.items[0]["tag_count"] == 2
    assert [r["name"] for r in recent.items] == [
        "other/medium",
        "team/large",
        "team/small",
    ]
    large = by_size.items[0]
    assert large["manifest_count"] == 2
    assert large["stored_bytes"] >= 9010
    assert large["pushed_bytes"] > large["stored_bytes"] - 1
    assert large["last_actor"] == "alice"


@pytest.mark.parametrize(
    ("sort", "descending"),
    [
        ("name", False),
        ("name", True),
        ("size", True),
        ("pushed_size", False),
        ("tags", True),
        ("last_push", False),
    ],
)
def test_repository_pages_cover_listing(
    three_repositories: Registry, sort: str, descending: bool
) -> None:
    registry = three_repositories
    whole = read(registry, queries.repository_page, sort=sort, descending=descending)

    def fetch(cursor: str | None) -> queries.Page:
        return read(
            registry,
            queries.repository_page,
            sort=sort,
            descending=descending,
            n=1,
            cursor=cursor,
        )

    assert all_items(fetch) == [r["name"] for r in whole.items]


def test_repository_prefix_filter(three_repositories: Registry) -> None:
    page = read(three_repositories, queries.repository_page, prefix="team/")

    assert [r["name"] for r in page.items] == ["team/large", "team/small"]
    assert page.extra["total"] == 2


def test_prefix_wildcards_are_literal(registry: Registry) -> None:
    push(registry, "a_b", make_image(), None)
    push(registry, "axb", make_image(), None)

    page = read(registry, queries.repository_page, prefix="a_")

    assert [r["name"] for r in page.items] == ["a_b"]


def test_repository_listing_rejects_bad_input(three_repositories: Registry) -> None:
    registry = three_repositories
    size_cursor = read(registry, queries.repository_page, sort="size", n=1).next_cursor

    with pytest.raises(Unsupported, match="unknown sort"):
        read(registry, queries.repository_page, sort="colour")
    with pytest.raises(Unsupported, match="another listing") as other_sort:
        read(registry, queries.repository_page, sort="name", cursor=size_cursor)
    assert "same path, sort, order and prefix" in str(other_sort.value)
    assert other_sort.value.detail == {"parameter": "cursor", "value": size_cursor}
    with pytest.raises(Unsupported, match="invalid cursor"):
        read(registry, queries.repository_page, cursor="bm90IGEgY3Vyc29y")
    with pytest.raises(Unsupported, match="n must be"):
        read(registry, queries.repository_page, n=0)


def test_repository_unknown(registry: Registry) -> None:
    with pytest.raises(NameUnknown):
        read(registry, queries.repository, "nobody/here")


# ---- tags, manifests, referrers ----------------------------------------------


def test_tags_describe_manifests(registry: Registry) -> None:
    first = make_image(layer_size=1000)
    second = make_image(layer_size=2000)
    push(registry, "app", first, "v1")
    push(registry, "app", second, "v2")
    index = make_index(
        [first, second],
        [
            {"architecture": "amd64", "os": "linux"},
            {"architecture": "arm64", "os": "linux", "variant": "v8"},
        ],
    )
    repo = registry.repository("app")
    repo.manifests.put(index, "application/vnd.oci.image.index.v1+json", tag="multi")

    page = read(registry, queries.tag_page, "app")
    tags = {item["tag"]: item for item in page.items}

    assert list(tags) == ["multi", "v1", "v2"]
    v1 = tags["v1"]
    assert v1["digest"] == str(first.digest)
    assert v1["media_type"] == first.media_type
    assert v1["size"] == len(first.manifest)
    assert v1["content_size"] == len(first.manifest) + sum(map(len, first.blobs))
    assert v1["pushed_by"] == {"user": "alice", "address": "127.0.0.1"}
    assert v1["platforms"] == []
    multi = tags["multi"]
    assert [(p["os"], p["architecture"]) for p in multi["platforms"]] == [
        ("linux", "amd64"),
        ("linux", "arm64"),
    ]
    assert multi["platforms"][1]["variant"] == "v8"
    assert multi["platforms"][0]["digest"] == str(first.digest)
    assert (
        multi["content_size"]
        == len(index) + v1["content_size"] + tags["v2"]["content_size"]
    )


def test_tag_pages_by_name_and_recent(registry: Registry) -> None:
    image = make_image()
    push(registry, "app", image, "b")
    for name in ("c", "a"):
        registry.repository("app").tags.tag(name, image.digest)

    def fetch(cursor: str | None, sort: str) -> queries.Page:
        return read(registry, queries.tag_page, "app", sort=sort, n=1, cursor=cursor)

    assert all_items(fetch, "tag", sort="name") == ["a", "b", "c"]
    assert all_items(fetch, "tag", sort="recent") == ["a", "c", "b"]


def test_tag_pages_by_name_in_byte_order(
    en_us_postgres_url: str, data_dir: Path
) -> None:
    registry = Registry.open(data_dir, en_us_postgres_url)
    try:
        image = make_image()
        push(registry, "app", image, "a")
        # en-US collation would sort "_x" first and "B" after "ab".
        for name in ("B", "Z9", "_x", "a-b", "a_b", "ab"):
            registry.repository("app").tags.tag(name, image.digest)

        def fetch(cursor: str | None) -> queries.Page:
            return read(
                registry, queries.tag_page, "app", sort="name", n=2, cursor=cursor
            )

        names = all_items(fetch, "tag")
    finally:
        registry.database.dispose()
    assert names == ["B", "Z9", "_x", "a", "a-b", "a_b", "ab"]


# Repository names in byte order. en-US collation would put "ab" before
# "a_b" and "a/c".
BYTE_ORDER_NAMES = ["9", "a-b", "a.b", "a/c", "a_b", "ab", "b"]


def test_repository_pages_by_name_in_byte_order(
    en_us_postgres_url: str, data_dir: Path
) -> None:
    registry = Registry.open(data_dir, en_us_postgres_url)
    names = BYTE_ORDER_NAMES
    try:
        for name in reversed(names):
            push(registry, name, make_image(), "1")

        def fetch(cursor: str | None, descending: bool) -> queries.Page:
            return read(
                registry,
                queries.repository_page,
                sort="name",
                descending=descending,
                n=2,
                cursor=cursor,
            )

        ascending = all_items(fetch, descending=False)
        descending = all_items(fetch, descending=True)
    finally:
        registry.database.dispose()
    assert ascending == names
    assert descending == names[::-1]


def test_repository_ties_broken_in_byte_order(
    en_us_postgres_url: str, data_dir: Path
) -> None:
    registry = Registry.open(data_dir, en_us_postgres_url)
    try:
        # Images of the same sizes, one tag each, so every sort but
        # last_push ties on every repository.
        for name in reversed(BYTE_ORDER_NAMES):
            push(registry, name, make_image(), "1")

        def fetch(
            cursor: str | None, sort: str, descending: bool, n: int
        ) -> queries.Page:
            return read(
                registry,
                queries.repository_page,
                sort=sort,
                descending=descending,
                n=n,
                cursor=cursor,
            )

        walks = {
            (sort, descending, n): all_items(
                fetch, sort=sort, descending=descending, n=n
            )
            for sort in ("size", "pushed_size", "tags")
            for descending in (False, True)
            for n in (1, 2, 3, 100)
        }
        top_by_size = read(registry, queries.top_repositories, by="size", n=3)
        top_by_activity = read(registry, queries.top_repositories, by="activity", n=3)
    finally:
        registry.database.dispose()
    for (sort, descending, n), names in walks.items():
        expected = BYTE_ORDER_NAMES[::-1] if descending else BYTE_ORDER_NAMES
        assert names == expected, f"sort={sort} descending={descending} n={n}"
    # The largest come first, and ties go to the last name, as in the
    # repository listing by size in descending order.
    assert [r["name"] for r in top_by_size["repositories"]] == ["b", "ab", "a_b"]
    assert [r["name"] for r in top_by_activity["repositories"]] == ["9", "a-b", "a.b"]


# Tags in byte order. en-US collation would sort "_x" first, "B" after "ab"
# and "a-b" after "a_b".
BYTE_ORDER_TAGS = ["B", "Z9", "_x", "a", "a-b", "a_b", "ab"]


def test_tags_at_pages_in_byte_order(en_us_postgres_url: str, data_dir: Path) -> None:
    registry = Registry.open(data_dir, en_us_postgres_url)
    try:
        image = make_image()
        push(registry, "app", image, "a")
        for name in reversed(BYTE_ORDER_TAGS):
            registry.repository("app").tags.tag(name, image.digest)
        position = head(registry)
        # Tags set after the position must not show in its listing.
        for name in ("A", "b"):
            registry.repository("app").tags.tag(name, image.digest)

        def fetch(cursor: str | None, n: int) -> queries.Page:
            return read(registry, queries.tags_at, "app", position, n=n, cursor=cursor)

        walks = {n: all_items(fetch, "tag", n=n) for n in (1, 2, 3, 100)}
    finally:
        registry.database.dispose()
    for n, names in walks.items():
        assert names == BYTE_ORDER_TAGS, f"pages of {n}"


def test_catalog_at_pages_in_byte_order(
    en_us_postgres_url: str, data_dir: Path
) -> None:
    registry = Registry.open(data_dir, en_us_postgres_url)
    names = BYTE_ORDER_NAMES
    try:
        for name in reversed(names):
            push(registry, name, make_image(), "1")
        position = head(registry)
        push(registry, "a", make_image(), "1")

        def fetch(cursor: str | None, n: int) -> queries.Page:
            return read(registry, queries.catalog_at, position, n=n, cursor=cursor)

        walks = {n: all_items(fetch, n=n) for n in (1, 2, 3, 100)}
    finally:
        registry.database.dispose()
    for n, found in walks.items():
        assert found == names, f"pages of {n}"


def test_tag_page_unknown_repository(registry: Registry) -> None:
    with pytest.raises(NameUnknown):
        read(registry, queries.tag_page, "missing")


def test_tag_current_and_unknown(registry: Registry) -> None:
    image = make_image()
    push(registry, "app", image, "v1")

    current = read(registry, queries.tag, "app", "v1")

    assert current["digest"] == str(image.digest)
    with pytest.raises(ManifestUnknown):
        read(registry, queries.tag, "app", "v9")
    with pytest.raises(NameUnknown):
        read(registry, queries.tag, "missing", "v1")


def test_manifests_list_tags_on_each(registry: Registry) -> None:
    first = make_image()
    second = make_image()
    push(registry, "app", first, "v1")
    push(registry, "app", second, None)
    registry.repository("app").tags.tag("stable", first.digest)

    page = read(registry, queries.manifest_page, "app")

    assert [m["digest"] for m in page.items] == [
        str(second.digest),
        str(first.digest),
    ]
    assert page.items[0]["tags"] == []
    assert page.items[1]["tags"] == ["stable", "v1"]


def test_manifest_tags_in_byte_order(en_us_postgres_url: str, data_dir: Path) -> None:
    registry = Registry.open(data_dir, en_us_postgres_url)
    try:
        image = make_image()
        push(registry, "app", image, None)
        for name in reversed(BYTE_ORDER_TAGS):
            registry.repository("app").tags.tag(name, image.digest)

        [item] = read(registry, queries.manifest_page, "app").items
    finally:
        registry.database.dispose()
    assert item["tags"] == BYTE_ORDER_TAGS


def test_referrers_graph(registry: Registry) -> None:
    image = make_image()
    push(registry, "app", image, "v1")
    signature = make_artifact(image, "application/vnd.example.sig", b"signature")
    orphan = make_artifact(make_image(), "application/vnd.example.sbom", b"sbom")
    push(registry, "app", signature, None)
    push(registry, "app", orphan, None)

    page = read(registry, queries.referrer_page, "app")
    edges = {edge["artifact_type"]: edge for edge in page.items}

    assert edges["application/vnd.example.sig"]["subject"] == str(image.digest)
    assert edges["application/vnd.example.sig"]["digest"] == str(signature.digest)
    assert edges["application/vnd.example.sig"]["subject_present"] is True
    assert edges["application/vnd.example.sbom"]["subject_present"] is False
    assert edges["application/vnd.example.sig"]["annotations"] == {
        "org.opencontainers.image.created": "2026-01-01T00:00:00Z"
    }


# ---- history and point in time -------------------------------------------------


@pytest.fixture
def moving_tag(registry: Registry) -> dict[str, Any]:
    """v1 -> first, v1 -> second, untag v1, v1 -> first again."""
    first = make_image()
    second = make_image()
    positions = {"first_at": push(registry, "app", first, "v1")}
    positions["second_at"] = push(registry, "app", second, "v1")
    registry.repository("app", actor=Actor("bob", "127.0.0.1")).tags.untag("v1")
    positions["untagged_at"] = head(registry)
    registry.repository("app").tags.tag("v1", first.digest)
    positions["again_at"] = head(registry)
    return {"first": str(first.digest), "second": str(second.digest), **positions}


def test_tag_history_lists_every_change(
    registry: Registry, moving_tag: dict[str, Any]
) -> None:
    page = read(registry, queries.tag_history, "app", "v1")
    history = page.items

    assert [entry["digest"] for entry in history] == [
        moving_tag["first"],
        moving_tag["second"],
        moving_tag["first"],
    ]
    assert history[0]["from_position"] == moving_tag["again_at"]
    assert history[0]["to_position"] is None
    assert history[0]["ended_by"] is None
    assert history[1]["from_position"] == moving_tag["second_at"]
    assert history[1]["to_position"] == moving_tag["untagged_at"]
    assert history[1]["ended_by"] == {
        "type": "tag.deleted",
        "actor": {"user": "bob", "address": "127.0.0.1"},
    }
    assert history[2]["to_position"] == moving_tag["second_at"]
    assert history[2]["ended_by"]["type"] == "tag.set"
    assert history[2]["actor"]["user"] == "alice"


def test_tag_history_pages(registry: Registry, moving_tag: dict[str, Any]) -> None:
    def fetch(cursor: str | None) -> queries.Page:
        return read(registry, queries.tag_history, "app", "v1", n=1, cursor=cursor)

    assert all_items(fetch, "from_position") == [
        moving_tag["again_at"],
        moving_tag["second_at"],
        moving_tag["first_at"],
    ]


def test_tag_history_total_counts_all_pages(
    registry: Registry, moving_tag: dict[str, Any]
) -> None:
    push(registry, "app", make_image(), "v2")
    first = read(registry, queries.tag_history, "app", "v1", n=1)
    second = read(
        registry, queries.tag_history, "app", "v1", n=1, cursor=first.next_cursor
    )
    other = read(registry, queries.tag_history, "app", "v2")

    assert len(first.items) == 1
    assert first.extra == {"total": 3}
    assert second.extra == {"total": 3}
    assert other.extra == {"total": 1}


def test_tag_history_unknown_tag(
    registry: Registry, moving_tag: dict[str, Any]
) -> None:
    with pytest.raises(ManifestUnknown):
        read(registry, queries.tag_history, "app", "never")


def test_tag_at_positions(registry: Registry, moving_tag: dict[str, Any]) -> None:
    def digest_at(position: int) -> str:
        return read(registry, queries.tag_at, "app", "v1", position)["digest"]

    assert digest_at(moving_tag["first_at"]) == moving_tag["first"]
    assert digest_at(moving_tag["second_at"] - 1) == moving_tag["first"]
    assert digest_at(moving_tag["second_at"]) == moving_tag["second"]
    assert digest_at(moving_tag["again_at"]) == moving_tag["first"]
    with pytest.raises(ManifestUnknown):
        read(registry, queries.tag_at, "app", "v1", moving_tag["untagged_at"])
    with pytest.raises(ManifestUnknown):
        read(registry, queries.tag_at, "app", "v1", 1)


def test_tags_at_position(registry: Registry, moving_tag: dict[str, Any]) -> None:
    image = make_image()
    push(registry, "app", image, "v2")

    def tags_at(position: int) -> dict[str, str]:
        page = read(registry, queries.tags_at, "app", position)
        return {entry["tag"]: entry["digest"] for entry in page.items}

    assert tags_at(moving_tag["second_at"]) == {"v1": moving_tag["second"]}
    assert tags_at(moving_tag["untagged_at"]) == {}
    assert tags_at(head(registry)) == {
        "v1": moving_tag["first"],
        "v2": str(image.digest),
    }


def test_past_tag_hides_later_end(
    registry: Registry, moving_tag: dict[str, Any]
) -> None:
    # first_at's entry ends by tag.set at second_at and second_at's by
    # tag.deleted at untagged_at, both after the position read.
    for position in (moving_tag["first_at"], moving_tag["second_at"]):
        entry = read(registry, queries.tag_at, "app", "v1", position)
        [listed] = read(registry, queries.tags_at, "app", position).items

        assert entry["from_position"] == position
        assert entry["to_position"] is None
        assert entry["to_time"] is None
        assert entry["ended_by"] is None
        assert listed == entry


def test_tag_history_keeps_ends(registry: Registry, moving_tag: dict[str, Any]) -> None:
    history = read(registry, queries.tag_history, "app", "v1").items
    by_start = {entry["from_position"]: entry for entry in history}
    first = by_start[moving_tag["first_at"]]
    second = by_start[moving_tag["second_at"]]

    assert first["to_position"] == moving_tag["second_at"]
    assert first["to_time"] is not None
    assert second["to_position"] == moving_tag["untagged_at"]
    assert second["ended_by"]["type"] == "tag.deleted"


@pytest.fixture
def deleted_manifests(registry: Registry) -> dict[str, Any]:
    """Tag a -> an OCI image, then a Docker one, then delete both manifests."""
    oci = make_image()
    docker = make_image(docker=True)
    positions = {"oci_at": push(registry, "app", oci, "a")}
    positions["docker_at"] = push(registry, "app", docker, "a")
    repository = registry.repository("app")
    repository.manifests.delete(docker.digest)
    repository.manifests.delete(oci.digest)
    return {"oci": oci, "docker": docker, **positions}


def manifest_facts(entry: dict[str, Any]) -> tuple[str, str | None, int | None]:
    return entry["digest"], entry["media_type"], entry["size"]


def image_facts(image: Image) -> tuple[str, str, int]:
    return str(image.digest), image.media_type, len(image.manifest)


def test_past_tags_keep_deleted_manifests(
    registry: Registry, deleted_manifests: dict[str, Any]
) -> None:
    oci = image_facts(deleted_manifests["oci"])
    docker = image_facts(deleted_manifests["docker"])
    oci_at = deleted_manifests["oci_at"]
    docker_at = deleted_manifests["docker_at"]

    history = read(registry, queries.tag_history, "app", "a").items
    assert [manifest_facts(entry) for entry in history] == [docker, oci]

    [entry] = read(registry, queries.tags_at, "app", oci_at).items
    assert manifest_facts(entry) == oci
    [entry] = read(registry, queries.tags_at, "app", docker_at).items
    assert manifest_facts(entry) == docker
    assert manifest_facts(read(registry, queries.tag_at, "app", "a", oci_at)) == oci


def test_past_tag_facts_survive_rebuild(
    registry: Registry, deleted_manifests: dict[str, Any]
) -> None:
    before = read(registry, queries.tag_history, "app", "a").items
    assert before[0]["media_type"] is not None

    rebuild_projections(registry.database)

    assert read(registry, queries.tag_history, "app", "a").items == before


def test_migration_fills_past_tag_facts(
    registry: Registry, deleted_manifests: dict[str, Any]
) -> None:
    with registry.database.read() as conn:
        live = snapshot_projections(conn)
    assert [row[-2:] for row in live["tag_history"]] == [
        image_facts(deleted_manifests["oci"])[1:],
        image_facts(deleted_manifests["docker"])[1:],
    ]

    config = _config()
    with registry.database.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0005")
    upgrade(registry.database)

    with registry.database.read() as conn:
        assert snapshot_projections(conn) == live


def test_tags_at_cursor_rejected_elsewhere(
    registry: Registry, moving_tag: dict[str, Any]
) -> None:
    push(registry, "app", make_image(), "v2")
    position = head(registry)
    cursor = read(registry, queries.tags_at, "app", position, n=1).next_cursor
    assert cursor is not None

    page = read(registry, queries.tags_at, "app", position, n=1, cursor=cursor)
    assert [entry["tag"] for entry in page.items] == ["v2"]
    with pytest.raises(Unsupported, match="another listing") as earlier:
        read(registry, queries.tags_at, "app", position - 1, cursor=cursor)
    assert "same path, repository, sort, at and position" in str(earlier.value)
    assert earlier.value.detail == {"parameter": "cursor", "value": cursor}
    with pytest.raises(Unsupported, match="another listing") as present:
        read(registry, queries.tag_page, "app", cursor=cursor)
    assert present.value.detail == {"parameter": "cursor", "value": cursor}


def test_catalog_at_cursor_rejected_elsewhere(registry: Registry) -> None:
    push(registry, "a", make_image(), "v1")
    push(registry, "b", make_image(), "v1")
    position = head(registry)
    cursor = read(registry, queries.catalog_at, position, n=1).next_cursor
    assert cursor is not None

    page = read(registry, queries.catalog_at, position, n=1, cursor=cursor)
    assert [entry["name"] for entry in page.items] == ["b"]
    with pytest.raises(Unsupported, match="another listing") as later:
        read(registry, queries.catalog_at, position + 1, cursor=cursor)
    assert "same path, at and position" in str(later.value)
    assert later.value.detail == {"parameter": "cursor", "value": cursor}
    at_time = {"at": T0, "position": None}
    with pytest.raises(Unsupported, match="another listing"):
        read(registry, queries.catalog_at, position, cursor=cursor, point=at_time)


def test_catalog_at_position(registry: Registry) -> None:
    first = push(registry, "b/first", make_image(), "v1")
    push(registry, "a/second", make_image(), "v1")

    early = read(registry, queries.catalog_at, first)
    late = read(registry, queries.catalog_at, head(registry))

    assert [entry["name"] for entry in early.items] == ["b/first"]
    assert [entry["name"] for entry in late.items] == ["a/second", "b/first"]
    assert read(registry, queries.catalog_at, 0).items == []


def test_position_at_time(registry: Registry) -> None:
    first = append_at(registry, T0, [blob_event("app", "a", 10)], "alice")
    second = append_at(
        registry,
        T0 + HOUR,
        [blob_event("app", "b", 10), blob_event("app", "c", 10)],
        "alice",
    )

    def at(moment: datetime) -> int:
        return read(registry, queries.position_at, moment)

    assert at(T0 - HOUR) == 0
    assert at(T0) == first
    assert at(T0 + HOUR / 2) == first
    assert at(T0 + HOUR) == second
    assert at(T0 + 10 * HOUR) == second
    assert read(registry, queries.position_before, T0 + HOUR) == first


# ---- activity ------------------------------------------------------------------


@pytest.fixture
def timed_activity(registry: Registry) -> Registry:
    """Three hours of events in two repositories, at known times."""
    append_at(
        registry,
        T0,
        [blob_event("app", "a", 100), blob_event("app", "b", 50)],
        "alice",
    )
    manifest = {
        "digest": str(Digest.of(b"m")),
        "media_type": "application/vnd.oci.image.manifest.v1+json",
        "size": 7,
        "artifact_type": None,
        "subject": None,
        "annotations": None,
        "references": [],
        "content_size": 7,
    }
    append_at(
        registry,
        T0 + HOUR,
        [
            NewEvent(EventType.MANIFEST_PUSHED, "app", manifest),
            tag_event("app", "v1", manifest["digest"], None),
        ],
        "alice",
    )
    append_at(registry, T0 + 2 * HOUR, [blob_event("tools", "c", 1000)], "bob")
    append_at(
        registry,
        T0 + 2 * HOUR,
        [NewEvent(EventType.TAG_DELETED, "app", {"tag": "v1", "previous": "x"})],
        "bob",
    )
    return registry


def test_activity_per_hour(timed_activity: Registry) -> None:
    series = read(
        timed_activity,
        queries.activity,
        since=T0,
        until=T0 + 3 * HOUR,
        bucket="hour",
    )

    assert series["since"] == "2026-03-01T09:00:00.000000Z"
    assert series["until"] == "2026-03-01T13:00:00.000000Z"
    buckets = series["buckets"]
    assert [b["start"][11:16] for b in buckets] == ["09:00", "10:00", "11:00", "12:00"]
    assert [b["events"] for b in buckets] == [2, 2, 2, 0]
    assert [b["pushes"] for b in buckets] == [0, 1, 0, 0]
    assert [b["deletes"] for b in buckets] == [0, 0, 1, 0]
    assert [b["bytes_pushed"] for b in buckets] == [150, 7, 1000, 0]
    assert buckets[1]["by_type"] == {"manifest.pushed": 1, "tag.set": 1}
    assert series["totals"]["events"] == 6


def test_activity_per_day_and_repository(timed_activity: Registry) -> None:
    series = read(
        timed_activity,
        queries.activity,
        since=T0,
        until=T0 + 3 * HOUR,
        bucket="day",
        repository="app",
    )

    assert series["repository"] == "app"
    assert [b["start"] for b in series["buckets"]] == ["2026-03-01T00:00:00.000000Z"]
    assert series["totals"]["events"] == 5
    assert series["totals"]["bytes_pushed"] == 157


def test_activity_rejects_bad_ranges(timed_activity: Registry) -> None:
    with pytest.raises(Unsupported, match="before since"):
        read(timed_activity, queries.activity, since=T0, until=T0 - HOUR)
    with pytest.raises(Unsupported, match="buckets"):
        read(
            timed_activity,
            queries.activity,
            since=T0,
            until=T0 + timedelta(days=365),
            bucket="hour",
        )
    with pytest.raises(Unsupported, match="unknown bucket"):
        read(timed_activity, queries.activity, since=T0, until=T0, bucket="week")
    with pytest.raises(NameUnknown):
        read(timed_activity, queries.activity, since=T0, until=T0, repository="nope")


def test_top_repositories(timed_activity: Registry) -> None:
    by_size = read(timed_activity, queries.top_repositories, by="size", n=1)
    by_activity = read(
        timed_activity,
        queries.top_repositories,
        by="activity",
        since=T0,
        until=T0 + 3 * HOUR,
    )
    later = read(
        timed_activity,
        queries.top_repositories,
        by="activity",
        since=T0 + 2 * HOUR,
        until=T0 + 3 * HOUR,
    )

    assert [r["name"] for r in by_size["repositories"]] == ["tools"]
    assert [(r["name"], r["events"]) for r in by_activity["repositories"]] == [
        ("app", 5),
        ("tools", 1),
    ]
    assert by_activity["repositories"][0]["pushes"] == 1
    assert by_activity["repositories"][0]["bytes_pushed"] == 157
    assert [(r["name"], r["events"]) for r in later["repositories"]] == [
        ("app", 1),
        ("tools", 1),
    ]


def test_activity_survives_rebuild(timed_activity: Registry) -> None:
    with timed_activity.database.read() as conn:
        live = snapshot_projections(conn)

    rebuild_projections(timed_activity.database)

    with timed_activity.database.read() as conn:
        assert snapshot_projections(conn) == live


def test_migration_fills_activity(registry: Registry) -> None:
    push(registry, "app", make_image(), "v1")
    push(registry, "tools", make_image(), "v1")
    with registry.database.read() as conn:
        live = snapshot_projections(conn)

    config = _config()
    with registry.database.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")
    upgrade(registry.database)

    with registry.database.read() as conn:
        assert snapshot_projections(conn) == live
        assert queries.projection_position(conn) == queries.log_head(conn)


# ---- event feed ----------------------------------------------------------------


def test_event_filters(timed_activity: Registry) -> None:
    def positions(**filters: Any) -> list[int]:
        page = read(timed_activity, queries.event_page, **filters)
        return [event["position"] for event in page.items]

    assert positions() == [6, 5, 4, 3, 2, 1]
    assert positions(repository="tools") == [5]
    assert positions(types=["tag.set"]) == [4]
    assert positions(types=["tag.set", "tag.deleted"]) == [6, 4]
    assert positions(actor="bob") == [6, 5]
    assert positions(address="127.0.0.1") == [6, 5, 4, 3, 2, 1]
    assert positions(since=T0 + HOUR) == [6, 5, 4, 3]
    assert positions(until=T0 + HOUR) == [4, 3, 2, 1]
    assert positions(since=T0 + HOUR, until=T0 + HOUR) == [4, 3]
    assert positions(repository="app", actor="bob", types=["tag.deleted"]) == [6]


def test_event_address_finds_older_spellings(registry: Registry) -> None:
    # Before cairn recorded an IPv4-mapped client address as its IPv4
    # address, it recorded Python's spelling, which changed in Python 3.13.
    addresses = ["::ffff:c000:207", "192.0.2.7", "::ffff:192.0.2.7", "192.0.2.8"]
    positions = []
    for index, address in enumerate(addresses):
        repo = registry.repository("app", actor=Actor(None, address))
        repo.blobs.push(Digest.of(f"blob {index}".encode()), [f"blob {index}".encode()])
        positions.append(head(registry))

    def fetch(cursor: str | None, **filters: Any) -> queries.Page:
        return read(registry, queries.event_page, n=1, cursor=cursor, **filters)

    client = positions[2::-1]
    assert all_items(fetch, "position", address="192.0.2.7") == client
    assert (
        all_items(
            fetch, "position", address="192.0.2.7", types=["blob.pushed", "tag.set"]
        )
        == client
    )
    assert all_items(fetch, "position", address="192.0.2.8") == [positions[3]]
    assert address_spellings("2001:db8::1") == ["2001:db8::1"]


def test_event_pages(timed_activity: Registry) -> None:
    def fetch(cursor: str | None) -> queries.Page:
        return read(timed_activity, queries.event_page, n=4, cursor=cursor)

    assert all_items(fetch, "position") == [6, 5, 4, 3, 2, 1]
    first = read(timed_activity, queries.event_page, n=1).items[0]
    assert first["type"] == "tag.deleted"
    assert first["actor"] == {"user": "bob", "address": "127.0.0.1"}
    assert first["time"] == "2026-03-01T11:30:00.000000Z"


def test_event_unknown_type(timed_activity: Registry) -> None:
    with pytest.raises(Unsupported, match="unknown event type"):
        read(timed_activity, queries.event_page, types=["blob.eaten"])


# ---- positions ------------------------------------------------------------------


def test_projection_position_follows_head(registry: Registry) -> None:
    assert read(registry, queries.projection_position) == 0

    position = push(registry, "app", make_image(), "v1")

    assert read(registry, queries.projection_position) == position


def test_cursor_values_are_checked() -> None:
    from engine.queries.pages import decode_cursor, encode_cursor

    assert decode_cursor(encode_cursor("size", 5, "a"), (str, int, str)) == [
        "size",
        5,
        "a",
    ]
    for values in (["size", -1, "a"], ["size", 2**63, "a"], ["size", True, "a"]):
        with pytest.raises(Unsupported):
            decode_cursor(encode_cursor(*values), (str, int, str))
    with pytest.raises(Unsupported):
        decode_cursor(encode_cursor("a\x00b"), (str,))
    with pytest.raises(Unsupported):
        decode_cursor(json.dumps(["x"]), (str,))
