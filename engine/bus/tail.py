"""`cairn events tail`: print events from the JetStream stream as they arrive.

The command reads through an ephemeral ordered consumer whose subject filter
comes from ``--type`` and ``--repository``. ``--from POSITION`` starts at a
log position. The relay publishes in log order, so positions in the stream
rise with its sequence numbers, and a binary search over the
``Cairn-Position`` header finds the first sequence at or after the position.
That works even when the two numbers differ, as in a stream created after
the log began or a purged one. Messages before the position are skipped as a
second check. When the stream's first event comes after the position, the
tail names the missing positions on standard error, so that a gap is not
silent. A filter that no subject of the stream overlaps, such as one under
another ``--subject-prefix``, would match no message, so the tail exits 1
and names the stream's subjects instead of waiting.

NATS servers before 2.10 accept a consumer filter only when it lies within
one of the stream's subjects or contains one. A repository filter without
an event type, such as ``cairn.*.*.library.>``, does neither, so on those
servers the consumer reads the whole stream and the tail drops the messages
whose subject the filter does not match.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, TextIO

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import ServerVersion
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamInfo

from engine.bus.connection import (
    CONNECTION_ERRORS,
    MAX_OUTSTANDING_PINGS,
    PING_INTERVAL,
    describe_connection_error,
    describe_nats_error,
    redact_url,
)
from engine.bus.messages import header_position, is_stand_in
from engine.bus.stream import earliest_position, first_sequence_at
from engine.bus.subjects import filter_subject, subject_within, unstored_subject_error

# The first NATS server version that accepts any consumer filter that
# overlaps the stream's subjects.
SPANNING_FILTERS_SINCE = (2, 10)


def tail(args: argparse.Namespace) -> int:
    """Run `cairn events tail`; return the exit status."""
    try:
        subject = filter_subject(args.subject_prefix, args.event_type, args.repository)
    except ValueError as error:
        print(f"cairn events tail: {error}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_tail(args, subject, sys.stdout))
    except KeyboardInterrupt:
        return 0


async def _tail(args: argparse.Namespace, subject: str, out: TextIO) -> int:
    url = redact_url(args.nats_url)
    closed = asyncio.get_running_loop().create_future()

    async def on_closed() -> None:
        if not closed.done():
            closed.set_result(None)

    async def on_error(error: Exception) -> None:
        pass  # connection failures surface below, with the URL

    try:
        client = await nats.connect(
            args.nats_url,
            name="cairn events tail",
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            ping_interval=PING_INTERVAL,
            max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            error_cb=on_error,
            disconnected_cb=on_closed,
            closed_cb=on_closed,
        )
    except CONNECTION_ERRORS as error:
        print(
            f"cairn events tail: cannot connect to NATS at {url}: "
            f"{describe_connection_error(error)}",
            file=sys.stderr,
        )
        return 1

    try:
        js = client.jetstream()
        try:
            info = await js.stream_info(args.stream)
            unstored = unstored_subject_error(
                args.stream, info.config.subjects or [], subject, args.subject_prefix
            )
            if unstored is not None:
                # Such a filter matches no message, so the tail would wait
                # forever without any output.
                print(f"cairn events tail: {unstored}", file=sys.stderr)
                return 1
            config = await _consumer_config(
                js, args.stream, info, args.from_position, subject
            )
            server_filter = _server_filter(
                subject, info.config.subjects or [], client.connected_server_version
            )
            subscription = await js.subscribe(
                server_filter, stream=args.stream, ordered_consumer=True, config=config
            )
            if args.from_position is not None:
                earliest = await earliest_position(
                    js, args.stream, args.subject_prefix, info.state.first_seq
                )
                if earliest is not None and earliest > args.from_position:
                    # Retention, a purge or a new NATS server dropped the
                    # older events, which the tail would otherwise skip silently.
                    print(
                        f"cairn events tail: stream {args.stream} begins at "
                        f"position {earliest}, so positions {args.from_position} "
                        f"to {earliest - 1} are not in it; read them from GET "
                        f"/_cairn/events?after={args.from_position - 1}",
                        file=sys.stderr,
                    )
            if (config.opt_start_seq or 0) > info.state.last_seq:
                # Without this, a position past the end looks like a hang.
                filtered = args.event_type is not None or args.repository is not None
                matching = " that matches the filter" if filtered else ""
                print(
                    f"cairn events tail: stream {args.stream} has no event{matching} "
                    f"at or after position {args.from_position} yet; waiting for "
                    "new events",
                    file=sys.stderr,
                )
        except nats.js.errors.NotFoundError:
            print(
                f"cairn events tail: stream {args.stream} not found at {url}; "
                "is cairn serve publishing to this NATS server?",
                file=sys.stderr,
            )
            return 1
        except nats.js.errors.APIError as error:
            print(
                f"cairn events tail: NATS at {url} rejected the subscription "
                f"to stream {args.stream}: "
                f"{error.description or describe_nats_error(error, client)}",
                file=sys.stderr,
            )
            return 1
        except nats.errors.TimeoutError:
            print(
                f"cairn events tail: NATS at {url} did not answer in time",
                file=sys.stderr,
            )
            return 1
        except nats.errors.ConnectionClosedError:
            return _report_closed(url)
        printed = 0
        readable = out.isatty()
        while args.count is None or printed < args.count:
            if closed.done():
                return _report_closed(url)
            try:
                message = await subscription.next_msg(timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            except nats.errors.ConnectionClosedError:
                # The server went away while next_msg waited, before the
                # closed callback could resolve ``closed``.
                return _report_closed(url)
            if server_filter != subject and not subject_within(
                message.subject, subject
            ):
                continue
            position = header_position(message.headers)
            if args.from_position is not None and (position or 0) < args.from_position:
                continue
            out.write(_format(message, readable) + "\n")
            out.flush()
            printed += 1
        return 0
    finally:
        if not client.is_closed:
            await client.close()


def _report_closed(url: str) -> int:
    print(f"cairn events tail: connection to {url} closed", file=sys.stderr)
    return 1


def _server_filter(
    subject: str, stream_subjects: list[str], version: ServerVersion
) -> str:
    """Return the consumer's filter subject: ``subject``, or "" for none.

    "" makes the consumer read the whole stream, for a server that would
    reject ``subject``.
    """
    if any(subject_within(subject, pattern) for pattern in stream_subjects):
        return subject
    if any(subject_within(pattern, subject) for pattern in stream_subjects):
        return subject
    try:
        if (version.major, version.minor) >= SPANNING_FILTERS_SINCE:
            return subject
    except ValueError:
        pass  # an unparsable version counts as older than 2.10
    return ""


async def _consumer_config(
    js: JetStreamContext,
    stream: str,
    info: StreamInfo,
    from_position: int | None,
    subject: str,
) -> ConsumerConfig:
    if from_position is None:
        return ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    start = await first_sequence_at(
        js, stream, subject, from_position, info.state.first_seq, info.state.last_seq
    )
    return ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
    )


def _format(message: Msg, readable: bool) -> str:
    if not readable:
        return message.data.decode()
    event = json.loads(message.data)
    summary = _summary(event.get("payload") or {})
    if is_stand_in(event):
        summary = "(payload omitted on NATS; GET /_cairn/events has it)"
    return "  ".join(
        [
            f"{event.get('position', '?'):>8}",
            str(event.get("time", "")),
            f"{event.get('type', '?'):<16}",
            str(event.get("repository", "")),
            summary,
        ]
    ).rstrip()


def _summary(payload: dict[str, Any]) -> str:
    fields = []
    for key in ("tag", "digest", "previous", "from", "size", "media_type"):
        value = payload.get(key)
        if value is None:
            continue
        text = str(value)
        if key in ("digest", "previous") and len(text) > 19:
            text = text[:19] + "…"
        fields.append(f"{key}={text}")
    return " ".join(fields)
