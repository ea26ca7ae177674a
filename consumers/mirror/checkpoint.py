"""The mirror's checkpoint: the last source position it has fully applied.

The file is JSON, ``{"source": URL, "target": URL, "position": N,
"updated_at": TIME}``, replaced atomically (write a temporary file, fsync,
rename, fsync the directory), so a crash leaves the old checkpoint or the
new one and never a torn file. It names its source and target so that a
checkpoint is never applied to another pair by mistake.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from engine.domain.events import format_time


class CheckpointError(ValueError):
    """The checkpoint file is unreadable or belongs to another mirror."""


@dataclass
class Checkpoint:
    path: Path | None
    source: str
    target: str
    position: int = 0

    @classmethod
    def load(cls, path: Path | None, source: str, target: str) -> Checkpoint:
        """Read the checkpoint at ``path``; position 0 when there is none yet."""
        checkpoint = cls(path, source, target)
        if path is None or not path.exists():
            return checkpoint
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            position = int(document["position"])
            saved_source = str(document["source"])
            saved_target = str(document["target"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"cannot read checkpoint {path}: {error}; fix or remove the file "
                "(the mirror then replays from position 0, which is safe)"
            ) from None
        if (saved_source, saved_target) != (source, target):
            raise CheckpointError(
                f"checkpoint {path} belongs to the mirror from {saved_source} to "
                f"{saved_target}, not from {source} to {target}; use another "
                "--checkpoint file"
            )
        checkpoint.position = position
        return checkpoint

    async def save(self, position: int) -> None:
        """Record ``position`` as applied; a no-op without a checkpoint file."""
        self.position = position
        if self.path is not None:
            await asyncio.to_thread(self._write, position)

    def _write(self, position: int) -> None:
        assert self.path is not None
        document = {
            "source": self.source,
            "target": self.target,
            "position": position,
            "updated_at": format_time(datetime.now(UTC)),
        }
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with temp.open("w", encoding="utf-8") as handle:
            json.dump(document, handle)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
