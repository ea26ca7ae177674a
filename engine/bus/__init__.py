"""The relay from the SQL log to NATS JetStream, and pull notifications.

`cairn serve` builds a ``Bus`` with ``Bus.from_args`` and starts it beside
the HTTP server; tests and benchmarks build one from ``BusSettings``.
"""

from engine.bus.bus import Bus
from engine.bus.embedded import EmbeddedNatsError, NatsServerNotFound
from engine.bus.settings import BusSettings
from engine.bus.subjects import (
    decode_repository,
    encode_repository,
    event_subject,
    filter_subject,
    parse_event_subject,
    pull_subject,
)

__all__ = [
    "Bus",
    "BusSettings",
    "EmbeddedNatsError",
    "NatsServerNotFound",
    "decode_repository",
    "encode_repository",
    "event_subject",
    "filter_subject",
    "parse_event_subject",
    "pull_subject",
]
