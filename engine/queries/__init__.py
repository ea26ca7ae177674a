"""Read-only queries over the projections and the log, for dashboards.

Every function takes an open connection, so a caller can read the log head
and several queries from one snapshot (see ``snapshot``). Results are
JSON-ready dicts: times are RFC 3339 strings in UTC, sizes are bytes.
Point-in-time queries take a log position; ``position_at`` maps a time to
the last position at or before it.
"""

from engine.queries.activity import activity, top_repositories
from engine.queries.events import event_page
from engine.queries.manifests import manifest_page, referrer_page
from engine.queries.pages import MAX_PAGE_SIZE, Page
from engine.queries.positions import (
    log_head,
    position_at,
    position_before,
    projection_position,
    snapshot,
)
from engine.queries.repositories import (
    catalog_at,
    repository,
    repository_page,
)
from engine.queries.tags import tag, tag_at, tag_history, tag_page, tags_at

__all__ = [
    "MAX_PAGE_SIZE",
    "Page",
    "activity",
    "catalog_at",
    "event_page",
    "log_head",
    "manifest_page",
    "position_at",
    "position_before",
    "projection_position",
    "referrer_page",
    "repository",
    "repository_page",
    "snapshot",
    "tag",
    "tag_at",
    "tag_history",
    "tag_page",
    "tags_at",
    "top_repositories",
]
