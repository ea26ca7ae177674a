"""The TOML configuration of `cairn webhook`.

```toml
[nats]
url = "nats://127.0.0.1:4222"      # overridden by --nats
stream = "CAIRN"
subject_prefix = "cairn"

[registry]
url = "https://registry.example.com" # public base URL: target.url, tag look-ups
# A user name and password in the URL, such as https://user:pass@host, are
# sent as HTTP Basic credentials by the look-ups only. Notifications carry
# the URL without them.

[dead_letters]
stream = "CAIRN_WEBHOOK_DEAD_LETTERS"
subject_prefix = "cairn-webhook-dead-letters"

[[endpoints]]
name = "ci"                          # names the durable JetStream consumer
url = "https://ci.example.com/hooks/registry"
format = "distribution"              # or "cloudevents"
timeout = "5s"                       # seconds as a number, or "500ms", "5s", "2m"
headers = { Authorization = "Bearer ..." }
secret_env = "CI_WEBHOOK_SECRET"     # or secret = "...", or secret_file = "..."
event_types = ["manifest.*", "tag.set"] # patterns, or families such as "tag"
repositories = ["library/*"]
ignore_media_types = ["application/vnd.oci.image.index.v1+json"]
max_attempts = 10
backoff_initial = "1s"
backoff_max = "5m"
ack_wait = "30s"                     # JetStream redelivers after this (a crash)
start = "new"                        # "new" or "all": where a consumer created
                                     # at start-up begins (see README, Webhooks)
```

Unknown keys are rejected, so that a misspelt option fails at start-up
instead of being ignored. So are a header name or value that HTTP does not
allow, such as a value with a newline or a non-ASCII character, and a header
that every delivery sets itself, such as Content-Type or Cairn-Signature.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from consumers.globs import check_repository_pattern, matches_any
from consumers.mirror.credentials import Credentials, split_userinfo
from engine.bus.subjects import (
    EVENT_FAMILIES,
    validate_prefix,
    validate_stream_name,
)
from engine.config import MAX_DURATION_SECONDS, parse_nats_url
from engine.domain.events import EventType

PayloadFormat = Literal["distribution", "cloudevents"]
StartPolicy = Literal["new", "all"]

FORMATS: Final = ("distribution", "cloudevents")
DEFAULT_STREAM: Final = "CAIRN"
DEFAULT_SUBJECT_PREFIX: Final = "cairn"
DEFAULT_DEAD_LETTER_STREAM: Final = "CAIRN_WEBHOOK_DEAD_LETTERS"
DEFAULT_DEAD_LETTER_PREFIX: Final = "cairn-webhook-dead-letters"
CONSUMER_PREFIX: Final = "cairn-webhook-"

# Headers that each delivery sets itself, and those that frame the HTTP
# message. A configured header of one of these names would go out twice or
# break the request, so the configuration rejects it. Lower case.
RESERVED_HEADERS: Final = frozenset(
    {
        "cairn-delivery-attempt",
        "cairn-event-id",
        "cairn-event-type",
        "cairn-repository",
        "cairn-signature",
        "connection",
        "content-length",
        "content-type",
        "host",
        "idempotency-key",
        "transfer-encoding",
    }
)
# HTTP field names are tokens. Values are visible ASCII with inner
# spaces or tabs, because httpx encodes header strings as ASCII and h11
# rejects control characters and leading or trailing whitespace.
_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE: Final = re.compile(r"([\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?)?")

# Endpoint names become JetStream consumer names and subject tokens.
_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DURATION: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)\s*")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_EVENT_TYPES: Final = tuple(str(event_type) for event_type in EventType)


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One receiver of events and how to deliver to it. Durations in seconds."""

    name: str
    # Out of repr, like the headers and the secret: either may carry credentials.
    url: str = field(repr=False)
    format: PayloadFormat = "distribution"
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    timeout: float = 5.0
    secret: str | None = field(default=None, repr=False)
    event_types: tuple[str, ...] = ()
    repositories: tuple[str, ...] = ()
    ignore_media_types: tuple[str, ...] = ()
    max_attempts: int = 10
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    ack_wait: float = 30.0
    start: StartPolicy = "new"

    @property
    def consumer_name(self) -> str:
        """The durable JetStream consumer that remembers this endpoint's place."""
        return CONSUMER_PREFIX + self.name

    @property
    def safe_url(self) -> str:
        """The URL without user info or query, which may carry credentials."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        return f"{parts.scheme}://{host}{parts.path}"

    def accepts(self, event_type: str, repository: str) -> bool:
        return matches_any(event_type, self.event_types) and matches_any(
            repository, self.repositories
        )

    def ignores_media_type(self, media_type: str | None) -> bool:
        if media_type is None or not self.ignore_media_types:
            return False
        return matches_any(media_type, self.ignore_media_types)


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    endpoints: tuple[Endpoint, ...]
    nats_url: str | None = None
    stream: str = DEFAULT_STREAM
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    registry_url: str | None = None
    # The user name and password of ``[registry] url``, for the look-ups.
    registry_credentials: Credentials | None = field(default=None, repr=False)
    dead_letter_stream: str = DEFAULT_DEAD_LETTER_STREAM
    dead_letter_prefix: str = DEFAULT_DEAD_LETTER_PREFIX

    def endpoint(self, name: str) -> Endpoint | None:
        return next((e for e in self.endpoints if e.name == name), None)


def parse_duration(value: Any, where: str) -> float:
    """Parse seconds given as a number or as text with a unit (ms, s, m, h)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        seconds = math.nan
    # TOML floats include nan and inf, and a long string of digits parses
    # to inf. NATS reads ack_wait as a Go time.Duration, int64 nanoseconds,
    # so every duration is also capped at MAX_DURATION_SECONDS.
    if not math.isfinite(seconds) or seconds > MAX_DURATION_SECONDS:
        raise ConfigError(
            f"{where}: invalid duration {value!r}; use seconds (5, 0.5) or text "
            f"with a unit (500ms, 5s, 2m, 1h), up to {MAX_DURATION_SECONDS} seconds"
        )
    if seconds <= 0:
        raise ConfigError(f"{where}: duration must be positive, got {value!r}")
    return seconds


def load_config(path: Path) -> WebhookConfig:
    """Read and validate the TOML file at ``path``."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    return parse_config(document, base_dir=path.parent)


def parse_config(document: dict[str, Any], base_dir: Path = Path()) -> WebhookConfig:
    """Validate a decoded configuration; ``secret_file`` is relative to ``base_dir``."""
    _check_keys(
        document, "configuration", {"nats", "registry", "dead_letters", "endpoints"}
    )
    nats = _table(document, "nats")
    _check_keys(nats, "[nats]", {"url", "stream", "subject_prefix"})
    registry = _table(document, "registry")
    _check_keys(registry, "[registry]", {"url"})
    dead_letters = _table(document, "dead_letters")
    _check_keys(dead_letters, "[dead_letters]", {"stream", "subject_prefix"})

    raw_endpoints = document.get("endpoints")
    if not isinstance(raw_endpoints, list) or not raw_endpoints:
        raise ConfigError(
            "no endpoints configured: add at least one [[endpoints]] table with a "
            "name and a url"
        )
    endpoints = tuple(
        _endpoint(item, index, base_dir) for index, item in enumerate(raw_endpoints)
    )
    names = [endpoint.name for endpoint in endpoints]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"endpoint names must be unique; repeated: {duplicates}")

    registry_url = _optional_str(registry, "url", "[registry]")
    registry_credentials = None
    if registry_url is not None:
        # Split first, so that neither notifications nor errors show them.
        registry_url, registry_credentials = split_userinfo(registry_url)
        registry_url = _http_url(registry_url, "[registry] url").rstrip("/")
    nats_url = _optional_str(nats, "url", "[nats]")
    if nats_url is not None:
        nats_url = _nats_url(nats_url, "[nats] url")
    return WebhookConfig(
        endpoints=endpoints,
        nats_url=nats_url,
        stream=_stream_name(nats.get("stream", DEFAULT_STREAM), "[nats] stream"),
        subject_prefix=_prefix(
            nats.get("subject_prefix", DEFAULT_SUBJECT_PREFIX), "[nats] subject_prefix"
        ),
        registry_url=registry_url,
        registry_credentials=registry_credentials,
        dead_letter_stream=_stream_name(
            dead_letters.get("stream", DEFAULT_DEAD_LETTER_STREAM),
            "[dead_letters] stream",
        ),
        dead_letter_prefix=_prefix(
            dead_letters.get("subject_prefix", DEFAULT_DEAD_LETTER_PREFIX),
            "[dead_letters] subject_prefix",
        ),
    )


_ENDPOINT_KEYS: Final = {
    "name",
    "url",
    "format",
    "headers",
    "timeout",
    "secret",
    "secret_env",
    "secret_file",
    "event_types",
    "repositories",
    "ignore_media_types",
    "max_attempts",
    "backoff_initial",
    "backoff_max",
    "ack_wait",
    "start",
}


def _endpoint(item: Any, index: int, base_dir: Path) -> Endpoint:
    where = f"endpoints[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a table")
    _check_keys(item, where, _ENDPOINT_KEYS)

    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{where}: invalid name {name!r}; use 1 to 64 letters, digits, '-' or '_'"
        )
    where = f"endpoint {name!r}"
    url = item.get("url")
    if not isinstance(url, str):
        raise ConfigError(f"{where}: url is missing")
    url = _http_url(url, f"{where} url")

    payload_format = item.get("format", "distribution")
    if payload_format not in FORMATS:
        raise ConfigError(
            f"{where}: invalid format {payload_format!r}; expected one of {FORMATS}"
        )
    start = item.get("start", "new")
    if start not in ("new", "all"):
        raise ConfigError(f"{where}: invalid start {start!r}; expected new or all")

    timeout = parse_duration(item.get("timeout", 5.0), f"{where} timeout")
    ack_wait = parse_duration(
        item.get("ack_wait", max(30.0, 2 * timeout)), f"{where} ack_wait"
    )
    if ack_wait <= timeout:
        raise ConfigError(
            f"{where}: ack_wait ({ack_wait:g} s) must be longer than timeout "
            f"({timeout:g} s), or JetStream redelivers while a request is in flight"
        )
    backoff_initial = parse_duration(
        item.get("backoff_initial", 1.0), f"{where} backoff_initial"
    )
    backoff_max = parse_duration(item.get("backoff_max", 300.0), f"{where} backoff_max")
    if backoff_max < backoff_initial:
        raise ConfigError(
            f"{where}: backoff_max ({backoff_max:g} s) must be at least "
            f"backoff_initial ({backoff_initial:g} s)"
        )
    max_attempts = item.get("max_attempts", 10)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
        raise ConfigError(
            f"{where}: max_attempts must be an integer, got {max_attempts!r}"
        )
    if max_attempts < 1:
        raise ConfigError(
            f"{where}: max_attempts must be at least 1, got {max_attempts}"
        )

    event_types = _event_type_patterns(item, where)
    return Endpoint(
        name=name,
        url=url,
        format=payload_format,
        headers=_headers(item.get("headers", {}), where),
        timeout=timeout,
        secret=_secret(item, where, base_dir),
        event_types=event_types,
        repositories=_repository_patterns(item, where),
        ignore_media_types=_string_list(item, "ignore_media_types", where),
        max_attempts=max_attempts,
        backoff_initial=backoff_initial,
        backoff_max=backoff_max,
        ack_wait=ack_wait,
        start=start,
    )


def _secret(item: dict[str, Any], where: str, base_dir: Path) -> str | None:
    given = [key for key in ("secret", "secret_env", "secret_file") if key in item]
    if len(given) > 1:
        raise ConfigError(f"{where}: set only one of {', '.join(given)}")
    if not given:
        return None
    key = given[0]
    value = item[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    if key == "secret":
        return value
    if key == "secret_env":
        secret = os.environ.get(value)
        if not secret:
            raise ConfigError(
                f"{where}: environment variable {value} (secret_env) is not set"
            )
        return secret
    path = base_dir / value
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise ConfigError(
            f"{where}: cannot read secret_file {path}: {error.strerror or error}"
        ) from None
    if not secret:
        raise ConfigError(f"{where}: secret_file {path} is empty")
    return secret


def _headers(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    """Accept ``{Name = "value"}`` and Distribution's ``{Name = ["v1", "v2"]}``."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: headers must be a table of name = value")
    headers: list[tuple[str, str]] = []
    for name, values in value.items():
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(
                f"{where}: header {name} must be a string or a list of strings"
            )
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}: invalid header name {name!r}; use letters, digits and "
                "!#$%&'*+.^_`|~- without spaces or colons"
            )
        if name.lower() in RESERVED_HEADERS:
            raise ConfigError(
                f"{where}: header {name} is set by cairn webhook on every request; "
                "remove it from headers"
            )
        for item in values:
            if not _HEADER_VALUE.fullmatch(item):
                # The value is left out, because headers may carry credentials.
                raise ConfigError(
                    f"{where}: invalid value of header {name}; use printable "
                    "ASCII without control characters or leading or trailing "
                    "whitespace"
                )
        headers.extend((name, item) for item in values)
    return tuple(headers)


def _table(document: dict[str, Any], key: str) -> dict[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return value


def _check_keys(table: dict[str, Any], where: str, known: set[str]) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown keys {unknown}; expected some of {sorted(known)}"
        )


def _optional_str(table: dict[str, Any], key: str, where: str) -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where} {key} must be a string")
    return value or None


def _string_list(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a list of strings")
    return tuple(value)


def _filter_patterns(item: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    """Read the filter list ``key``, rejecting an empty one: an endpoint gets
    everything when the key is absent, and an empty list reads as nothing."""
    patterns = _string_list(item, key, where)
    if key in item and not patterns:
        raise ConfigError(
            f"{where}: {key} is an empty list, which would match nothing; "
            f"remove {key} to turn its filter off"
        )
    return patterns


def _event_type_patterns(item: dict[str, Any], where: str) -> tuple[str, ...]:
    """Read event_types, with each family name, such as ``tag``, turned into
    the pattern of its types, ``tag.*``, as `cairn events tail --type` and
    the event feed's ``type`` parameter read it."""
    patterns = tuple(
        f"{pattern}.*" if pattern in EVENT_FAMILIES else pattern
        for pattern in _filter_patterns(item, "event_types", where)
    )
    for pattern in patterns:
        if not any(matches_any(t, [pattern]) for t in _EVENT_TYPES):
            raise ConfigError(
                f"{where}: event type pattern {pattern!r} matches no event type; "
                f"known families: {', '.join(EVENT_FAMILIES)}; "
                f"known types: {', '.join(_EVENT_TYPES)}"
            )
    return patterns


def _repository_patterns(item: dict[str, Any], where: str) -> tuple[str, ...]:
    patterns = _filter_patterns(item, "repositories", where)
    for pattern in patterns:
        try:
            check_repository_pattern(pattern)
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
    return patterns


def _nats_url(value: str, where: str) -> str:
    try:
        return parse_nats_url(value)
    except argparse.ArgumentTypeError as error:
        raise ConfigError(f"{where}: {error}") from None


def _http_url(value: str, where: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{where}: invalid URL {value!r}; expected http:// or https:// and a host"
        )
    return value


def _stream_name(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: invalid stream name {value!r}: expected a string")
    try:
        validate_stream_name(value)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None
    return value


def _prefix(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string")
    try:
        return validate_prefix(value)
    except ValueError as error:
        raise ConfigError(f"{where}: {error}") from None
