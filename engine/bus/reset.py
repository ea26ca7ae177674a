"""`cairn events republish`: move the relay's checkpoint back.

The relay reads its checkpoint row when it becomes the leader and then
keeps its position in memory, writing it back as JetStream acknowledges.
The reset is made only while this process has the relay's leader lock (see
``engine.bus.leader``), and while a `cairn serve` has it, the reset is
rejected: that relay would go on publishing from its own position until
its next checkpoint write. The reset also starts a new generation of the
checkpoint row, so a relay whose lock session died without it noticing has
that next write rejected and reads the reset checkpoint when it is elected
again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine import log as event_log
from engine.bus import checkpoint as store
from engine.bus.leader import FileLeadership, Leadership, leadership_for
from engine.db import Database


class RelayRunning(Exception):
    """Another process holds the relay's leader lock."""


@dataclass(frozen=True, slots=True)
class CheckpointReset:
    """The relay's checkpoint before and after a reset, the generation the
    reset started, and the log head."""

    previous: int
    checkpoint: int
    generation: int
    head: int


def reset_checkpoint(
    database: Database, data_dir: Path, name: str, first_position: int
) -> CheckpointReset:
    """Set relay ``name``'s checkpoint so it publishes from ``first_position``.

    Raises RelayRunning while another process leads the relay. Raises
    ValueError unless ``first_position`` is between 1 and the position after
    the current checkpoint, because moving the checkpoint forward would
    leave events out of the stream for good.
    """
    if first_position < 1:
        raise ValueError(f"invalid position {first_position}: expected 1 or more")
    leadership = leadership_for(database, data_dir, name)
    try:
        if not leadership.try_acquire():
            raise RelayRunning(_running_message(leadership, name))
        with database.transaction() as conn:
            previous = store.read_checkpoint(conn, name)
            head, _ = event_log.head(conn)
            if first_position > previous + 1:
                raise ValueError(
                    f"position {first_position} is after the relay's next position "
                    f"{previous + 1}: the relay of stream {name} has published "
                    f"only up to position {previous}, and a reset only moves "
                    "its checkpoint back"
                )
            generation = store.set_checkpoint(conn, name, first_position - 1)
    finally:
        leadership.release()
    return CheckpointReset(previous, first_position - 1, generation, head)


def _running_message(leadership: Leadership, name: str) -> str:
    advice = (
        "stop every cairn serve that uses this database, then run the command again"
    )
    if isinstance(leadership, FileLeadership):
        try:
            pid = leadership.path.read_text().strip()
        except OSError:
            pid = ""
        holder = f"process {pid}" if pid.isdigit() else "another process"
        return (
            f"the relay of stream {name} is running in {holder}, which holds "
            f"the lock file {leadership.path}: {advice}"
        )
    return (
        f"the relay of stream {name} is running in another process, which "
        f"holds its PostgreSQL advisory lock: {advice}"
    )
