"""The OpenAPI 3.1 description of the dashboard API, served as openapi.json."""

from __future__ import annotations

import copy
import functools
from typing import Any, Final

from engine.domain.events import EventType
from engine.log.pages import MAX_PAGE_BYTES
from engine.queries.activity import BUCKETS, MAX_TOP, TOP_ORDERS
from engine.queries.pages import DEFAULT_PAGE_SIZE, MAX_INTEGER, MAX_PAGE_SIZE
from engine.queries.repositories import SORTS
from engine.queries.tags import TAG_SORTS

_INTEGER: Final = {"type": "integer", "minimum": 0, "maximum": MAX_INTEGER}
_TIME: Final = {"type": "string", "format": "date-time"}
_NULLABLE_STRING: Final = {"type": ["string", "null"]}
_NULLABLE_INTEGER: Final = {"type": ["integer", "null"], "minimum": 0}
_NULLABLE_TIME: Final = {"type": ["string", "null"], "format": "date-time"}
# The repository name grammar of the OCI distribution specification.
_NAME_PATTERN: Final = (
    r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$"
)
_TEXT: Final = {"type": "string", "minLength": 1, "maxLength": 255}
_CURSOR: Final = {
    "type": ["string", "null"],
    "description": "Pass as cursor to get the next page; null on the last page.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(properties),
        "properties": properties,
        **extra,
    }


def _list(item: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref(item)}


_SCHEMAS: Final[dict[str, Any]] = {
    "Error": _object(
        {
            "errors": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string"},
                        "message": {"type": "string"},
                        "detail": {},
                    },
                },
            }
        }
    ),
    "Actor": _object({"user": _NULLABLE_STRING, "address": _NULLABLE_STRING}),
    "Point": {
        "description": "The log position a point-in-time answer is for; a time "
        "maps to the last position at or before it.",
        **_object({"position": _INTEGER, "at": _NULLABLE_TIME}),
    },
    "Position": _object({"head": _INTEGER, "projections": _INTEGER}),
    "Repository": _object(
        {
            "name": {"type": "string"},
            "tag_count": _INTEGER,
            "manifest_count": _INTEGER,
            "stored_bytes": {
                **_INTEGER,
                "description": "Bytes of the blobs linked into the repository, "
                "each counted once.",
            },
            "pushed_bytes": {
                **_INTEGER,
                "description": "Bytes as pushed: each manifest with its config "
                "and layers, shared layers counted once per manifest.",
            },
            "created_at": _TIME,
            "created_position": _INTEGER,
            "updated_at": {
                **_TIME,
                "description": "Time of the repository's last event of any "
                "type: pushes, tag changes and deletes, gc's deletes included.",
            },
            "updated_position": _INTEGER,
            "last_actor": _NULLABLE_STRING,
        }
    ),
    "RepositoryPage": _object(
        {
            "total": _INTEGER,
            "repositories": _list("Repository"),
            "next_cursor": _CURSOR,
        }
    ),
    "CatalogEntry": _object(
        {"name": {"type": "string"}, "created_at": _TIME, "created_position": _INTEGER}
    ),
    "CatalogPage": _object(
        {
            "point": {"anyOf": [_ref("Point"), {"type": "null"}]},
            "repositories": _list("CatalogEntry"),
            "next_cursor": _CURSOR,
        }
    ),
    "Platform": {
        "type": "object",
        "required": ["digest"],
        "properties": {
            "digest": {"type": "string"},
            "os": {"type": "string"},
            "architecture": {"type": "string"},
            "variant": {"type": "string"},
        },
    },
    "Tag": _object(
        {
            "tag": {"type": "string"},
            "digest": {"type": "string"},
            "media_type": _NULLABLE_STRING,
            "artifact_type": _NULLABLE_STRING,
            "size": _NULLABLE_INTEGER,
            "content_size": {
                **_NULLABLE_INTEGER,
                "description": "The manifest with its config and layers; an "
                "index adds those of its children in the repository.",
            },
            "platforms": _list("Platform"),
            "position": _INTEGER,
            "pushed_at": _TIME,
            "pushed_by": _ref("Actor"),
        }
    ),
    "HistoryEntry": {
        "description": "A digest the tag pointed to over the positions "
        "[from_position, to_position); to_position is null while it still does. "
        "Read at a point in time, an entry shows only what had happened by "
        "then, so the entry in force there has a null to_position, to_time "
        "and ended_by even when a later event ended it.",
        **_object(
            {
                "tag": {"type": "string"},
                "digest": {"type": "string"},
                "media_type": {
                    **_NULLABLE_STRING,
                    "description": "The manifest's media type when the tag was "
                    "set, kept after the manifest is deleted; null if the "
                    "repository did not hold the manifest then.",
                },
                "size": {
                    **_NULLABLE_INTEGER,
                    "description": "The manifest's size in bytes when the tag "
                    "was set; null as media_type is.",
                },
                "from_position": _INTEGER,
                "from_time": _TIME,
                "to_position": _NULLABLE_INTEGER,
                "to_time": _NULLABLE_TIME,
                "actor": _ref("Actor"),
                "ended_by": {
                    "anyOf": [
                        _object(
                            {
                                "type": {"enum": ["tag.set", "tag.deleted"]},
                                "actor": _ref("Actor"),
                            }
                        ),
                        {"type": "null"},
                    ]
                },
            }
        ),
    },
    "TagPage": _object(
        {
            "repository": {"type": "string"},
            "point": {"anyOf": [_ref("Point"), {"type": "null"}]},
            "tags": {
                "type": "array",
                "items": {"anyOf": [_ref("Tag"), _ref("HistoryEntry")]},
            },
            "next_cursor": _CURSOR,
        }
    ),
    "TagDocument": _object(
        {
            "repository": {"type": "string"},
            "point": {"anyOf": [_ref("Point"), {"type": "null"}]},
            "tag": {"anyOf": [_ref("Tag"), _ref("HistoryEntry")]},
        }
    ),
    "TagHistory": _object(
        {
            "repository": {"type": "string"},
            "tag": {"type": "string"},
            "total": {
                **_INTEGER,
                "description": "The number of entries in the tag's whole "
                "history, every page together, read in the same snapshot as "
                "this page.",
            },
            "history": _list("HistoryEntry"),
            "next_cursor": _CURSOR,
        }
    ),
    "Manifest": _object(
        {
            "digest": {"type": "string"},
            "media_type": {"type": "string"},
            "artifact_type": _NULLABLE_STRING,
            "size": _INTEGER,
            "content_size": _INTEGER,
            "subject": _NULLABLE_STRING,
            "platforms": _list("Platform"),
            "tags": {"type": "array", "items": {"type": "string"}},
            "position": _INTEGER,
            "pushed_at": _TIME,
        }
    ),
    "ManifestPage": _object(
        {
            "repository": {"type": "string"},
            "manifests": _list("Manifest"),
            "next_cursor": _CURSOR,
        }
    ),
    "Referrer": {
        "description": "An edge of the referrers graph: digest names subject.",
        **_object(
            {
                "subject": {"type": "string"},
                "subject_media_type": _NULLABLE_STRING,
                "subject_present": {"type": "boolean"},
                "digest": {"type": "string"},
                "media_type": {"type": "string"},
                "artifact_type": _NULLABLE_STRING,
                "size": _INTEGER,
                "annotations": {
                    "type": ["object", "null"],
                    "additionalProperties": {"type": "string"},
                },
                "position": _INTEGER,
            }
        ),
    },
    "ReferrerPage": _object(
        {
            "repository": {"type": "string"},
            "referrers": _list("Referrer"),
            "next_cursor": _CURSOR,
        }
    ),
    "Counts": _object(
        {
            "events": _INTEGER,
            "pushes": {**_INTEGER, "description": "manifest.pushed events"},
            "deletes": {
                **_INTEGER,
                "description": "manifest.deleted, tag.deleted and blob.deleted events",
            },
            "bytes_pushed": {
                **_INTEGER,
                "description": "Sizes of the blobs and manifests pushed.",
            },
            "by_type": {"type": "object", "additionalProperties": _INTEGER},
        }
    ),
    "Bucket": {
        "allOf": [_ref("Counts"), _object({"start": _TIME})],
    },
    "Activity": _object(
        {
            "bucket": {"enum": list(BUCKETS)},
            "repository": _NULLABLE_STRING,
            "since": _TIME,
            "until": _TIME,
            "buckets": _list("Bucket"),
            "totals": _ref("Counts"),
        }
    ),
    "ActiveRepository": _object(
        {
            "name": {"type": "string"},
            "events": _INTEGER,
            "pushes": _INTEGER,
            "bytes_pushed": _INTEGER,
        }
    ),
    "Top": {
        "type": "object",
        "required": ["by", "repositories"],
        "properties": {
            "by": {"enum": list(TOP_ORDERS)},
            "since": _TIME,
            "until": _TIME,
            "repositories": {
                "type": "array",
                "items": {"anyOf": [_ref("Repository"), _ref("ActiveRepository")]},
            },
        },
    },
    "Event": _object(
        {
            "position": _INTEGER,
            "id": {"type": "string", "format": "uuid"},
            "repository": {"type": "string"},
            "version": _INTEGER,
            "type": {"enum": [str(event_type) for event_type in EventType]},
            "schema_version": _INTEGER,
            "time": _TIME,
            "actor": _ref("Actor"),
            "request_id": _NULLABLE_STRING,
            "payload": {"type": "object"},
            "previous_hash": {"type": "string"},
            "hash": {"type": "string"},
        }
    ),
    "EventPage": _object({"events": _list("Event"), "next_cursor": _CURSOR}),
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description}


_PARAMETERS: Final[dict[str, Any]] = {
    "name": {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "Repository name; its slashes may be sent as they are.",
        "schema": {"type": "string", "maxLength": 255, "pattern": _NAME_PATTERN},
    },
    "tag": {
        "name": "tag",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"},
    },
    "n": _query(
        "n",
        {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_PAGE_SIZE,
            "default": DEFAULT_PAGE_SIZE,
        },
        "Page size.",
    ),
    "cursor": _query(
        "cursor",
        {"type": "string", "minLength": 1},
        "The next_cursor of the previous page, sent with the same path and"
        " parameters other than n.",
    ),
    "min_position": _query(
        "min_position",
        _INTEGER,
        "Wait up to 5 s until the projections have applied this position. "
        "After that the response reflects the position reached, as its "
        "Cairn-Position header shows.",
    ),
    "at": _query(
        "at",
        _TIME,
        "Answer as of this time (RFC 3339): the last position at or before it.",
    ),
    "position": _query(
        "position",
        _INTEGER,
        "Answer as of this log position; not with at. A position past the "
        "log head gets 400.",
    ),
    "since": _query("since", _TIME, "Start of the time range, inclusive."),
    "until": _query("until", _TIME, "End of the time range, inclusive."),
    "repository": _query(
        "repository",
        {"type": "string", "maxLength": 255, "pattern": _NAME_PATTERN},
        "Repository name.",
    ),
}


def _param(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/parameters/{name}"}


_POSITION_HEADER: Final = {
    "Cairn-Position": {
        "description": "The log head in the snapshot that answered.",
        "schema": _INTEGER,
    }
}


def _operation(
    summary: str,
    schema: str,
    parameters: list[Any],
    *,
    not_found: bool = False,
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": {
            "description": summary,
            "headers": _POSITION_HEADER,
            "content": {"application/json": {"schema": _ref(schema)}},
        },
        "400": {
            "description": "A parameter is invalid, or the endpoint does not "
            "take it. The error names the parameter.",
            "content": {"application/json": {"schema": _ref("Error")}},
        },
    }
    if not_found:
        responses["404"] = {
            "description": "The repository or tag is unknown.",
            "headers": _POSITION_HEADER,
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    responses["503"] = {
        "description": "The database is busy or unreachable (code UNAVAILABLE). "
        "Send the request again after Retry-After seconds.",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before sending the request again.",
                "schema": _INTEGER,
            }
        },
        "content": {"application/json": {"schema": _ref("Error")}},
    }
    return {
        "get": {
            "summary": summary,
            "parameters": [*parameters, _param("min_position")],
            "responses": responses,
        }
    }


_PAGE = [_param("n"), _param("cursor")]
_POINT = [_param("at"), _param("position")]
_REPOSITORY = "/repositories/{name}/-"

_PATHS: Final[dict[str, Any]] = {
    "/position": _operation(
        "The log head and the projections' position", "Position", []
    ),
    "/repositories": _operation(
        "Repositories with counts and sizes, sorted and paged",
        "RepositoryPage",
        [
            _query(
                "sort",
                {"enum": list(SORTS), "default": "name"},
                "name; size (stored_bytes); pushed_size (pushed_bytes); tags "
                "(tag_count); last_push (updated_position, the repository's last "
                "event of any type, deletes included).",
            ),
            _query("order", {"enum": ["asc", "desc"], "default": "asc"}, "Direction."),
            _query(
                "prefix",
                {"type": "string", "pattern": "^[a-z0-9._/-]{1,255}$"},
                "Keep names that start with this.",
            ),
            *_PAGE,
        ],
    ),
    "/repositories/{name}": _operation(
        "One repository", "Repository", [_param("name")], not_found=True
    ),
    f"{_REPOSITORY}/tags": _operation(
        "The repository's tags now, or at a point in time",
        "TagPage",
        [
            _param("name"),
            *_POINT,
            _query(
                "sort",
                {"enum": list(TAG_SORTS), "default": "name"},
                "name, or recent for the most recently set first; only name "
                "with at or position.",
            ),
            *_PAGE,
        ],
        not_found=True,
    ),
    f"{_REPOSITORY}/tags/{{tag}}": _operation(
        "What a tag points to now, or at a point in time",
        "TagDocument",
        [_param("name"), _param("tag"), *_POINT],
        not_found=True,
    ),
    f"{_REPOSITORY}/tags/{{tag}}/history": _operation(
        "Every digest the tag pointed to, newest first",
        "TagHistory",
        [_param("name"), _param("tag"), *_PAGE],
        not_found=True,
    ),
    f"{_REPOSITORY}/manifests": _operation(
        "The repository's manifests, newest first",
        "ManifestPage",
        [_param("name"), *_PAGE],
        not_found=True,
    ),
    f"{_REPOSITORY}/referrers": _operation(
        "The referrers graph: manifests with a subject, newest first",
        "ReferrerPage",
        [_param("name"), *_PAGE],
        not_found=True,
    ),
    "/catalog": _operation(
        "Repository names now, or at a point in time", "CatalogPage", [*_POINT, *_PAGE]
    ),
    "/activity": _operation(
        "Events, pushes, deletes and bytes pushed per hour or day (UTC). Without "
        "since, the series covers the 24 hours (hour) or 30 days (day) before "
        "until and the bucket that contains until. until defaults to now, or to "
        "since when since is later, as from a client whose clock runs ahead.",
        "Activity",
        [
            _query("bucket", {"enum": list(BUCKETS), "default": "hour"}, "Bucket."),
            _param("repository"),
            _query(
                "since",
                _TIME,
                "Start of the range. The range widens to whole buckets, so the "
                "first bucket is the one that contains this time, as the "
                "response's since shows.",
            ),
            _query(
                "until",
                _TIME,
                "End of the range. The last bucket is the one that contains this "
                "time, and the response's until is that bucket's end, exclusive.",
            ),
        ],
        not_found=True,
    ),
    "/top": _operation(
        "The largest repositories now, or the most active in a time range. "
        "Without since, the range is the 7 days before until. until defaults "
        "to now, or to since when since is later. Activity is counted per UTC "
        "hour, so the range widens to whole hours, as the response's since and "
        "until (exclusive) show.",
        "Top",
        [
            _query("by", {"enum": list(TOP_ORDERS), "default": "size"}, "Order."),
            _query(
                "n",
                {"type": "integer", "minimum": 1, "maximum": MAX_TOP, "default": 10},
                "How many.",
            ),
            _query(
                "since",
                _TIME,
                "Start of the range for by=activity, widened to the start of its "
                "UTC hour. by=size rejects it.",
            ),
            _query(
                "until",
                _TIME,
                "End of the range for by=activity, widened to the end of its "
                "UTC hour. by=size rejects it.",
            ),
        ],
    ),
    "/events": _operation(
        "The event log, newest first, filtered. A page ends after at most n "
        f"events or once its events reach about {MAX_PAGE_BYTES // 2**20} MiB "
        "of JSON, so it can have fewer than n while next_cursor is set",
        "EventPage",
        [
            _param("repository"),
            {
                "name": "type",
                "in": "query",
                "description": "Event types or families (blob, manifest, tag), "
                "repeated or comma-separated.",
                "schema": {
                    "type": "array",
                    "items": {
                        "enum": [str(event_type) for event_type in EventType]
                        + sorted({str(t).split(".")[0] for t in EventType})
                    },
                },
                "style": "form",
                "explode": True,
            },
            _query("actor", _TEXT, "User."),
            _query(
                "address",
                _TEXT,
                "Client IP address, such as 127.0.0.1 or ::1. Events record "
                "addresses in their standard spelling (RFC 5952 for IPv6, and "
                "an IPv4-mapped IPv6 address as its IPv4 address), and the "
                "filter is compared in it, so 0:0::1 finds the events of ::1 "
                "and ::ffff:192.0.2.1 those of 192.0.2.1. An IPv4 address also "
                "finds events that older versions recorded under its "
                "IPv4-mapped IPv6 spellings. A value that is no IPv4 or IPv6 "
                "address gets 400 UNSUPPORTED.",
            ),
            _param("since"),
            _param("until"),
            *_PAGE,
        ],
    ),
}


@functools.cache
def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cairn dashboard API",
            "version": "1",
            "description": "Read-only queries over cairn's projections and event "
            "log. Every response that reads them has a Cairn-Position header "
            "with the log position it reflects: each 200 except this document, "
            "and each 404 for an unknown repository or tag. Errors use the OCI "
            "distribution error format.",
        },
        "servers": [{"url": "/_cairn/api/v1"}],
        "paths": {"/openapi.json": _openapi_path(), **_PATHS},
        "components": {"schemas": _SCHEMAS, "parameters": _PARAMETERS},
    }


def _openapi_path() -> dict[str, Any]:
    return {
        "get": {
            "summary": "This description",
            "responses": {
                "200": {
                    "description": "The OpenAPI document",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }


def query_parameters(path: str) -> frozenset[str]:
    """Return the names of the query parameters of GET ``path``, a key of the
    document's ``paths`` such as ``/repositories/{name}``."""
    described = _document()
    names: set[str] = set()
    for parameter in described["paths"][path]["get"].get("parameters", []):
        if "$ref" in parameter:
            component = parameter["$ref"].rsplit("/", 1)[-1]
            parameter = described["components"]["parameters"][component]
        if parameter["in"] == "query":
            names.add(parameter["name"])
    return frozenset(names)


def document() -> dict[str, Any]:
    """Return a copy of the OpenAPI document, safe for the caller to change."""
    return copy.deepcopy(_document())
