"""Command-line options for the bus: `cairn serve`, `cairn events tail` and
`cairn events republish`."""

from __future__ import annotations

import argparse
from typing import Any

from engine.bus.subjects import validate_prefix, validate_stream_name
from engine.config import (
    MAX_INT64,
    EnvironmentFlag,
    add_storage_options,
    env_default,
    names_env_variable,
    parse_ascii_integer,
    parse_nats_url,
    parse_port,
)

DEFAULT_STREAM = "CAIRN"
DEFAULT_SUBJECT_PREFIX = "cairn"


@names_env_variable
def parse_stream_name(value: str) -> str:
    """Parse --stream: a JetStream stream name that cairn can use."""
    try:
        validate_stream_name(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


@names_env_variable
def parse_subject_prefix(value: str) -> str:
    """Parse --subject-prefix: one or more subject tokens without wildcards."""
    try:
        return validate_prefix(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_position(value: str) -> int:
    """Parse a log position, 1 or more."""
    return _parse_from_one(value, "position")


def parse_count(value: str) -> int:
    """Parse a number of events, 1 or more."""
    return _parse_from_one(value, "count")


def _parse_from_one(value: str, name: str) -> int:
    number = parse_ascii_integer(value)
    if number is None or number < 1:
        raise argparse.ArgumentTypeError(
            f"invalid {name} {value!r}: expected a whole number, 1 or more, "
            f"up to {MAX_INT64}"
        )
    return number


class _NatsUrl(argparse.Action):
    """Store --nats and turn the bus on, whatever CAIRN_NO_NATS contains.

    --nats and --no-nats exclude each other on the command line, and an
    option on the command line overrides a CAIRN_* variable, so --nats
    overrides CAIRN_NO_NATS as --no-nats overrides CAIRN_NATS_URL.
    """

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.no_nats = False


def add_bus_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that set where `cairn serve` publishes events."""
    group = parser.add_argument_group("event bus")
    choice = group.add_mutually_exclusive_group()
    choice.add_argument(
        "--nats",
        dest="nats_url",
        action=_NatsUrl,
        type=parse_nats_url,
        # An empty variable means unset, as for the yes-or-no variables.
        default=env_default("NATS_URL") or None,
        help="NATS server URL, e.g. nats://127.0.0.1:4222 (env CAIRN_NATS_URL); "
        "default: start an embedded nats-server on loopback",
    )
    choice.add_argument(
        "--no-nats",
        action=EnvironmentFlag,
        env="NO_NATS",
        help="do not publish events to NATS; they stay in the log "
        "(env CAIRN_NO_NATS=1)",
    )
    group.add_argument(
        "--nats-port",
        type=parse_port,
        default=env_default("NATS_PORT", "0") or "0",
        help="port for the embedded nats-server on 127.0.0.1; 0 picks a free one "
        "(env CAIRN_NATS_PORT)",
    )
    _add_stream_options(group)
    group.add_argument(
        "--publish-pulls",
        action=EnvironmentFlag,
        env="PUBLISH_PULLS",
        help="also publish manifest pulls as core NATS messages on "
        "<prefix>.pull.<repository> (env CAIRN_PUBLISH_PULLS=1)",
    )


def add_tail_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of `cairn events tail`."""
    parser.add_argument(
        "--nats",
        dest="nats_url",
        type=parse_nats_url,
        default=env_default("NATS_URL") or "nats://127.0.0.1:4222",
        help="NATS server URL (env CAIRN_NATS_URL; default nats://127.0.0.1:4222)",
    )
    parser.add_argument(
        "--from",
        dest="from_position",
        type=parse_position,
        default=None,
        metavar="POSITION",
        help="start at this log position, 1 or more; default: only events from "
        "now on. When the stream begins after it, standard error names the "
        "positions the stream lacks",
    )
    parser.add_argument(
        "--type",
        dest="event_type",
        help="only this event type, e.g. manifest.pushed, or family, e.g. tag",
    )
    parser.add_argument(
        "--repository",
        help="only events of this repository, e.g. library/alpine, or of every "
        "repository under a namespace ending in '/', e.g. library/",
    )
    parser.add_argument(
        "--count",
        type=parse_count,
        default=None,
        metavar="N",
        help="exit after printing this many events, 1 or more; default: run "
        "until interrupted",
    )
    _add_stream_options(parser)


REPUBLISH_DESCRIPTION = """\
Set the checkpoint of the relay in `cairn serve` so that it publishes the
log to NATS again from position POSITION, for example to fill a new, empty
NATS server with the whole history (--from 1). The events go out when
cairn serve starts. Stop every cairn serve that uses this database first:
while one of them runs the relay, the command exits with status 1 and
changes nothing.

What the stream and its subscribers then receive depends on the stream's
last message, which the relay checks before it publishes:

- An empty, new or purged stream receives every event from POSITION on,
  once each, in log order. JetStream drops a message as a duplicate if it
  stored one with the same Nats-Msg-Id (the event id) within the stream's
  duplicate window (2 minutes by default), even when the stream was purged
  since. So after a purge, wait for the window to pass, or delete the
  stream instead (the relay creates it again).
- A stream whose last message is an event of this log receives nothing
  again: the relay resumes right after that message, whatever the
  checkpoint, because the stream already contains the events up to it.
  Purge or delete the stream first to republish into it.
- A stream whose last message came from another publisher receives the
  events from POSITION on after that message. Subscribers see each event
  that the stream already contains a second time, with the same
  Cairn-Event-Id header, except those dropped as duplicates within the
  duplicate window.

A cairn webhook that runs while the stream is deleted creates its
consumers again after the last event that each endpoint handled, so its
endpoints do not receive the republished events a second time.
"""


def add_republish_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of `cairn events republish`."""
    add_storage_options(parser)
    parser.add_argument(
        "--from",
        dest="from_position",
        type=parse_position,
        required=True,
        metavar="POSITION",
        help="first log position to publish again; 1 republishes the whole log",
    )
    parser.add_argument(
        "--stream",
        type=parse_stream_name,
        default=env_default("NATS_STREAM", DEFAULT_STREAM),
        help="JetStream stream whose relay to reset (env CAIRN_NATS_STREAM; "
        f"default {DEFAULT_STREAM})",
    )


def _add_stream_options(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--stream",
        type=parse_stream_name,
        default=env_default("NATS_STREAM", DEFAULT_STREAM),
        help=f"JetStream stream name (env CAIRN_NATS_STREAM; default {DEFAULT_STREAM})",
    )
    parser.add_argument(
        "--subject-prefix",
        type=parse_subject_prefix,
        default=env_default("NATS_SUBJECT_PREFIX", DEFAULT_SUBJECT_PREFIX),
        help="first subject token of every event (env CAIRN_NATS_SUBJECT_PREFIX; "
        f"default {DEFAULT_SUBJECT_PREFIX})",
    )
