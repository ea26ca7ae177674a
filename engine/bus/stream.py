"""The JetStream stream of events: its configuration, its last message, and
the search for the message that carries a log position."""

from __future__ import annotations

from dataclasses import dataclass

import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from engine.bus.messages import EVENT_ID, REGISTRY_ID, header_position
from engine.bus.subjects import stream_subjects

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class StreamTail:
    """The stream's last sequence and, when its last message is a cairn event
    that is still stored, that event's position, id and registry id.

    ``registry_id`` is None for a message without the header, such as one
    that a cairn before the header published.
    """

    last_sequence: int
    position: int | None = None
    event_id: str | None = None
    registry_id: str | None = None


async def ensure_stream(
    js: JetStreamContext, name: str, prefix: str, duplicate_window: float
) -> StreamConfig:
    """Create the stream, or update the subjects and duplicate window of an
    existing one, and return its configuration.

    Other settings of an existing stream (replicas, limits, placement) are
    the operator's and stay as they are. The duplicate window only grows.
    """
    subjects = stream_subjects(prefix)
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        created = await js.add_stream(
            StreamConfig(
                name=name,
                subjects=subjects,
                storage=StorageType.FILE,
                duplicate_window=duplicate_window,
                description="cairn registry events, in log order",
            )
        )
        log.info("stream_created", stream=name, subjects=subjects)
        return created.config

    config = info.config
    window = max(config.duplicate_window or 0.0, duplicate_window)
    subjects_changed = sorted(config.subjects or []) != sorted(subjects)
    if subjects_changed or (config.duplicate_window or 0.0) < duplicate_window:
        previous_subjects = config.subjects
        updated = await js.update_stream(
            config.evolve(subjects=subjects, duplicate_window=window)
        )
        config = updated.config
        log.info(
            "stream_updated",
            stream=name,
            subjects=subjects,
            previous_subjects=previous_subjects,
            duplicate_window=window,
        )
        if subjects_changed and info.state.messages:
            # Changing the subject prefix of a stream that already stores
            # events splits it: the stored events keep their subjects.
            log.warning(
                "stream_subjects_changed",
                stream=name,
                subjects=subjects,
                previous_subjects=previous_subjects,
                stored_messages=info.state.messages,
                note="stored events keep their old subjects, and consumers "
                "that filter on the old subject prefix receive no new events",
            )
    if config.storage != StorageType.FILE:
        log.warning(
            "stream_not_on_file_storage",
            stream=name,
            storage=str(config.storage),
            note="events published to it are lost when the NATS server restarts",
        )
    return config


async def read_tail(js: JetStreamContext, name: str) -> StreamTail:
    """Read the stream's last sequence and the position its last message carries."""
    info = await js.stream_info(name)
    last_sequence = info.state.last_seq
    if last_sequence == 0:
        return StreamTail(0)
    try:
        message = await js.get_msg(name, last_sequence)
    except nats.js.errors.NotFoundError:
        # The last message was deleted or purged; the sequence stays.
        return StreamTail(last_sequence)
    headers = message.headers or {}
    return StreamTail(
        last_sequence,
        header_position(headers),
        headers.get(EVENT_ID),
        headers.get(REGISTRY_ID),
    )


async def earliest_position(
    js: JetStreamContext, stream: str, subject_prefix: str, first_sequence: int
) -> int | None:
    """Return the log position of the stream's first event, or None when the
    stream is empty or its first message carries no position."""
    try:
        message = await js.get_msg(
            stream, max(first_sequence, 1), subject=f"{subject_prefix}.>", next=True
        )
    except nats.js.errors.NotFoundError:
        return None
    return header_position(message.headers)


async def first_sequence_at(
    js: JetStreamContext,
    stream: str,
    subject: str,
    position: int,
    first_sequence: int,
    last_sequence: int,
) -> int:
    """Find the first stream sequence whose event is at or after ``position``.

    Returns ``last_sequence + 1`` (the next message to arrive) when no stored
    message qualifies. A message without a position header counts as before
    ``position``.
    """
    low, high = max(first_sequence, 1), last_sequence + 1
    while low < high:
        middle = (low + high) // 2
        try:
            message = await js.get_msg(stream, middle, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            high = middle  # nothing matches at or after middle
            continue
        found = header_position(message.headers)
        if found is not None and found >= position:
            high = middle
        else:
            low = (message.seq or middle) + 1
    return low
