"""An endpoint's durable JetStream consumer: its creation, its updates, and
its re-creation after it was deleted while the webhook ran.

An endpoint's ``start`` ("new" or "all") applies when a webhook process
finds no consumer at its first subscription. JetStream deletes a stream's
consumers with the stream, for example when an operator deletes the stream
before a republish and the relay of `cairn serve` creates it again. A worker
that loses its consumer that way re-creates it from the last position that
it handled, not from ``start``. "new" would miss the events that the relay
published before the worker noticed, and "all" would deliver a republished
stream a second time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy

from consumers.webhook.config import Endpoint
from engine.bus.messages import header_position
from engine.bus.stream import first_sequence_at

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ResumePoint:
    """The last position that an endpoint handled in this process, after which
    a re-created consumer resumes, or None when no position is known."""

    position: int | None


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
        # NOTE: a consumer deleted while no webhook runs is also created at
        # ``start`` here, because the position that its endpoint reached is
        # kept only in the memory of a running worker.
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
        note = (
            "the consumer was deleted while the webhook ran, for example with "
            "its stream, so it resumes after the last event this endpoint "
            "handled and skips any event at or before that position"
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
