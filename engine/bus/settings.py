"""Settings of the bus, from `cairn serve` options or built directly."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from engine.bus.options import DEFAULT_STREAM, DEFAULT_SUBJECT_PREFIX
from engine.bus.subjects import validate_prefix, validate_stream_name

# JetStream's own default duplicate window is also two minutes.
DEFAULT_DUPLICATE_WINDOW: Final = 120.0


@dataclass(frozen=True, slots=True)
class BusSettings:
    """Settings of the bus: the NATS server, stream, subjects and relay timing.

    Durations are in seconds.

    ``nats_url`` None with ``enabled`` means: start the embedded nats-server
    on 127.0.0.1 (``embedded_port``, 0 for a free one).
    """

    enabled: bool = True
    nats_url: str | None = None
    embedded_port: int = 0
    nats_server_binary: Path | None = None
    stream: str = DEFAULT_STREAM
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    publish_pulls: bool = False
    duplicate_window: float = DEFAULT_DUPLICATE_WINDOW
    # Events published before waiting for their acknowledgements.
    batch_size: int = 500
    # How often the relay looks for events appended by other processes.
    poll_interval: float = 1.0
    ack_timeout: float = 5.0
    # Minimum interval between two writes of the checkpoint row.
    checkpoint_interval: float = 0.1
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    # How often a standby process tries to take the relay's lock.
    leader_retry: float = 2.0
    # Minimum interval between two log lines about the same repeated failure.
    log_interval: float = 30.0

    def __post_init__(self) -> None:
        validate_prefix(self.subject_prefix)
        validate_stream_name(self.stream)
        if not 0 <= self.embedded_port <= 65535:
            raise ValueError(
                f"invalid NATS port {self.embedded_port}: expected 0-65535"
            )
        if self.checkpoint_interval < 0:
            raise ValueError(
                f"invalid checkpoint_interval {self.checkpoint_interval}: expected >= 0"
            )
        if self.batch_size < 1:
            raise ValueError(f"invalid batch size {self.batch_size}: expected >= 1")
        for name in ("poll_interval", "ack_timeout", "backoff_initial", "leader_retry"):
            if getattr(self, name) <= 0:
                raise ValueError(f"invalid {name} {getattr(self, name)}: expected > 0")

    @property
    def relay_name(self) -> str:
        """The name of the relay's checkpoint row and lock: one per stream."""
        return self.stream

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BusSettings:
        return cls(
            enabled=not args.no_nats,
            nats_url=args.nats_url or None,
            embedded_port=args.nats_port,
            stream=args.stream,
            subject_prefix=args.subject_prefix,
            publish_pulls=args.publish_pulls,
        )
