"""An endpoint's durable JetStream consumer: its creation, its updates, and
its re-creation after it was deleted.

JetStream deletes a stream's consumers with the stream, for example when an
operator deletes the stream before a republish and the relay of `cairn
serve` creates it again. A missing consumer is re-created after the last
position that the endpoint handled, not at its ``start``: "new" would miss
the events that the relay published since, and "all" would deliver a
republished stream a second time. A running worker keeps that position in
memory, and a webhook that starts reads it from
``consumers.webhook.positions``. ``start`` ("new" or "all") applies when no
position is known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

from consumers.webhook.config import Endpoint
from consumers.webhook.positions import StoredPosition
from engine.bus.messages import EVENT_ID, REGISTRY_ID, header_position
from engine.bus.stream import first_sequence_at

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """The last position that an endpoint handled, after which a re-created
    consumer resumes, or None when no position is known.

    ``stored`` is true for a position read from the position bucket, and
    false for one that a running worker kept in memory.
    """

    position: int | None
    stored: bool = False


async def ensure_consumer(
    js: JetStreamContext,
    stream: str,
    subject_prefix: str,
    endpoint: Endpoint,
    resume: ResumePoint | None = None,
) -> tuple[ConsumerInfo, bool]:
    """Create the endpoint's durable consumer, or update its ack wait.

    Returns the consumer's info and whether it was re-created from
    ``resume``. Without ``resume``, a missing consumer is created at the
    endpoint's ``start``. Where an existing consumer starts is JetStream's
    to keep.
    """
    name = endpoint.consumer_name
    try:
        info = await js.consumer_info(stream, name)
    except nats.js.errors.NotFoundError:
        if resume is not None:
            return await _recreate_consumer(
                js, stream, subject_prefix, endpoint, resume
            ), True
        policy = DeliverPolicy.ALL if endpoint.start == "all" else DeliverPolicy.NEW
        info = await js.add_consumer(stream, _consumer_config(endpoint, policy))
        log.info(
            "consumer_created",
            consumer=name,
            stream=stream,
            deliver_policy=str(policy.value),
        )
        return info, False
    current = info.config
    if (
        not math.isclose(current.ack_wait or 0.0, endpoint.ack_wait, rel_tol=1e-6)
        or current.max_ack_pending != 1
    ):
        current.ack_wait = endpoint.ack_wait
        current.max_ack_pending = 1
        info = await js.add_consumer(stream, current)
        log.info(
            "consumer_updated", consumer=name, stream=stream, ack_wait=endpoint.ack_wait
        )
    return info, False


async def acknowledged_position(
    js: JetStreamContext, stream: str, info: ConsumerInfo
) -> int | None:
    """Return the position of the consumer's last acknowledged message.

    Returns None when the consumer has acknowledged nothing, or when that
    message is no longer stored or carries no position.
    """
    sequence = info.ack_floor.stream_seq if info.ack_floor is not None else None
    if not sequence:
        return None
    try:
        message = await js.get_msg(stream, sequence)
    except nats.js.errors.NotFoundError:
        return None
    return header_position(message.headers)


async def stored_position_fits(
    js: JetStreamContext,
    stream: str,
    subject_prefix: str,
    endpoint: Endpoint,
    stored: StoredPosition,
) -> bool:
    """Return False, and log an error, when the stream's events belong to
    another registry's log than the stored position.

    The stream shows that by another event at the stored position, or, when
    it does not carry that position, by another registry id on its last
    message. A stream without either, such as one of a cairn that publishes
    no registry id, cannot tell, and the position is taken as it is.
    """
    found = await event_id_at(js, stream, subject_prefix, stored.position)
    if found is not None:
        if found == stored.event_id:
            return True
        evidence: dict[str, Any] = {
            "stored_event_id": stored.event_id,
            "stream_event_id": found,
        }
    else:
        last_registry = await last_registry_id(js, stream)
        if (
            stored.registry_id is None
            or last_registry is None
            or last_registry == stored.registry_id
        ):
            return True
        evidence = {
            "stored_registry_id": stored.registry_id,
            "stream_registry_id": last_registry,
        }
    log.error(
        "stored_position_from_other_log",
        endpoint=endpoint.name,
        consumer=endpoint.consumer_name,
        stream=stream,
        position=stored.position,
        **evidence,
        start=endpoint.start,
        note="the stream carries another registry's events, so another "
        "registry publishes to it now; the stored position is ignored and a "
        "missing consumer is created at the endpoint's start",
    )
    return False


async def last_registry_id(js: JetStreamContext, stream: str) -> str | None:
    """Return the registry id on the stream's last message, or None when the
    stream is empty or that message has no Cairn-Registry-Id."""
    state = (await js.stream_info(stream)).state
    if not state.last_seq:
        return None
    try:
        message = await js.get_msg(stream, state.last_seq)
    except nats.js.errors.NotFoundError:
        return None
    return (message.headers or {}).get(REGISTRY_ID)


async def event_id_at(
    js: JetStreamContext, stream: str, subject_prefix: str, position: int
) -> str | None:
    """Return the id of the event at ``position`` in the stream, or None
    when the stream does not carry that position."""
    subject = f"{subject_prefix}.>"
    state = (await js.stream_info(stream)).state
    if not state.last_seq:
        return None
    sequence = await first_sequence_at(
        js, stream, subject, position, state.first_seq, state.last_seq
    )
    if sequence > state.last_seq:
        return None
    try:
        message = await js.get_msg(stream, sequence, subject=subject, next=True)
    except nats.js.errors.NotFoundError:
        return None
    if header_position(message.headers) != position:
        return None
    return (message.headers or {}).get(EVENT_ID)


async def _recreate_consumer(
    js: JetStreamContext,
    stream: str,
    subject_prefix: str,
    endpoint: Endpoint,
    resume: ResumePoint,
) -> ConsumerInfo:
    """Create the consumer again at the first event after ``resume``.

    The relay publishes in log order, so positions rise with stream
    sequences and a binary search finds that event. Without a known
    position, the consumer delivers the stream from its first message.
    """
    if resume.position is None:
        config = _consumer_config(endpoint, DeliverPolicy.ALL)
        start_sequence = None
        note = (
            "the consumer was deleted, for example with its stream, before this "
            "endpoint handled an event, so it delivers the stream from its "
            "first message"
        )
    else:
        state = (await js.stream_info(stream)).state
        start_sequence = await first_sequence_at(
            js,
            stream,
            f"{subject_prefix}.>",
            resume.position + 1,
            state.first_seq,
            state.last_seq,
        )
        config = _consumer_config(endpoint, DeliverPolicy.BY_START_SEQUENCE)
        config.opt_start_seq = start_sequence
        deleted = (
            "while no webhook ran, so it resumes after the position stored in "
            "the position bucket"
            if resume.stored
            else "while the webhook ran, so it resumes after the last event "
            "this endpoint handled"
        )
        note = (
            f"the consumer was deleted, for example with its stream, {deleted}, "
            "and skips any event at or before that position"
        )
    info = await js.add_consumer(stream, config)
    log.warning(
        "consumer_recreated",
        endpoint=endpoint.name,
        consumer=endpoint.consumer_name,
        stream=stream,
        after_position=resume.position,
        start_sequence=start_sequence,
        note=note,
    )
    return info


def _consumer_config(endpoint: Endpoint, policy: DeliverPolicy) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=endpoint.consumer_name,
        description=f"cairn webhook endpoint {endpoint.name}",
        deliver_policy=policy,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=endpoint.ack_wait,
        max_ack_pending=1,
        max_deliver=-1,
    )
