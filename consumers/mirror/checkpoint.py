"""The mirror's checkpoint: the last source position it has dealt with, and
the events before it that it could not copy whole.

The file is JSON, ``{"source": URL, "target": URL, "source_registry_id":
ID, "position": N, "position_hash": HASH, "repositories": [...],
"propagate_deletes": BOOL, "not_copied": [...], "updated_at": TIME}``,
replaced
atomically (write a temporary file, fsync, rename, fsync the directory),
so a crash leaves the old checkpoint or the new one and never a torn file.
It names its source and target, without user name or password, so that a
checkpoint is never applied to another pair by mistake.

Positions count in the event log of one registry, which GET
/_cairn/registry identifies. The checkpoint records that registry id, so a
source that was reset or replaced behind the same URL is detected instead
of having its first events skipped. It also records the hash of the event
at its position, so a source restored from an older backup, whose log
took another course after that point, is detected even once its head has
passed the position again.

``repositories`` lists the --repositories patterns that the position was
reached with ([] for every repository), and ``propagate_deletes`` whether
deletes were copied. A run with other patterns, or one that copies
deletes where the earlier runs did not, starts again from position 0,
because the events that the earlier runs left out lie before the
position. So does a file without these two fields, as older mirrors wrote
it, since what they left out is unknown. A file without ``not_copied``,
``source_registry_id`` or ``position_hash`` has no entries and records
the missing fields at its next save.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from consumers.mirror.credentials import split_userinfo
from consumers.mirror.errors import MirrorError, SourceReplaced
from engine.config import MAX_INT64
from engine.domain.events import EventType, format_time, upcast

log = structlog.get_logger(__name__)

# The content of a NotCopied entry: ("manifest", repository, digest) or
# ("tag", repository, tag).
ContentKey = tuple[str, str, str]


class CheckpointError(ValueError):
    """The checkpoint file is unreadable or belongs to another mirror."""


def resolve_checkpoint_path(path: Path) -> Path:
    """Return the file that the --checkpoint ``path`` names, with symbolic
    links resolved, so that the lock and every write go beside that file.

    Raises CheckpointError, before anything is created, when the path
    exists but is not a regular file, such as a FIFO, a device or a
    directory, because reading a FIFO blocks and a save would replace the
    others.
    """
    try:
        # Python 3.11 raises RuntimeError for a loop of symbolic links.
        resolved = path.resolve()
    except RuntimeError:
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is a loop of symbolic links"
        ) from None
    try:
        mode = resolved.stat().st_mode
    except FileNotFoundError:
        return resolved
    except OSError as error:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {error.strerror or error}"
        ) from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(_not_regular_message(path, mode))
    return resolved


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular_message(path: Path, mode: int) -> str:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    return (
        f"checkpoint {path} is {kind}, not a regular file. Pass the path of a "
        "checkpoint file, or of one to create, as --checkpoint"
    )


# The hash of an event is the SHA-256 of its canonical encoding, as
# engine.domain.events.event_hash writes it.
_EVENT_HASH = re.compile(r"[0-9a-f]{64}")

_NOT_COPIED_TYPES = frozenset(
    {EventType.MANIFEST_PUSHED, EventType.TAG_SET, EventType.TAG_DELETED}
)


@dataclass(frozen=True, slots=True)
class NotCopied:
    """An event that the mirror could not apply whole: a manifest.pushed or
    tag.set event whose manifest lacks content on the source, or a
    tag.deleted event that the target cannot apply. The next run retries it.

    ``digest`` is the manifest of the event, for tag.deleted the one that
    the tag pointed at.
    """

    position: int
    type: str
    repository: str
    digest: str
    tag: str | None = None

    @property
    def key(self) -> ContentKey:
        if self.tag is not None:
            return ("tag", self.repository, self.tag)
        return ("manifest", self.repository, self.digest)

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "type": self.type,
            "repository": self.repository,
            "digest": self.digest,
            "tag": self.tag,
        }

    @classmethod
    def from_json(cls, document: object, index: int) -> NotCopied:
        """Read entry ``index`` of ``not_copied``. Raises ValueError for an
        invalid one, with the entry's index in the message."""
        name = f"not_copied[{index}]"
        if not isinstance(document, dict):
            raise ValueError(f"invalid {name} {document!r}: expected a JSON object")
        missing = [
            key
            for key in ("position", "type", "repository", "digest")
            if key not in document
        ]
        if missing:
            raise ValueError(f"the key {missing[0]!r} is missing from {name}")
        position = _integer(document["position"], f"{name}.position", minimum=1)
        event_type = str(document["type"])
        if event_type not in _NOT_COPIED_TYPES:
            raise ValueError(
                f"{name} has an event of type {event_type!r}, expected "
                f"{EventType.MANIFEST_PUSHED}, {EventType.TAG_SET} or "
                f"{EventType.TAG_DELETED}"
            )
        tag = None
        if event_type in (EventType.TAG_SET, EventType.TAG_DELETED):
            tag = document.get("tag")
            if not isinstance(tag, str):
                raise ValueError(
                    f"{name} is a {event_type} entry without a tag: expected "
                    "a string in its key 'tag'"
                )
        return cls(
            position=position,
            type=event_type,
            repository=_string(document["repository"], f"{name}.repository"),
            digest=_string(document["digest"], f"{name}.digest"),
            tag=tag,
        )


def content_key(event: dict[str, Any]) -> ContentKey | None:
    """Return the manifest or tag that ``event`` is about, or None for a blob
    event."""
    event_type = EventType(event["type"])
    payload = upcast(event_type, int(event["schema_version"]), event["payload"])
    repository = str(event["repository"])
    match event_type:
        case EventType.MANIFEST_PUSHED | EventType.MANIFEST_DELETED:
            return ("manifest", repository, str(payload["digest"]))
        case EventType.TAG_SET | EventType.TAG_DELETED:
            return ("tag", repository, str(payload["tag"]))
    return None


def not_copied_entry(event: dict[str, Any]) -> NotCopied:
    """Return the NotCopied entry of a manifest.pushed, tag.set or
    tag.deleted event."""
    event_type = EventType(event["type"])
    payload = upcast(event_type, int(event["schema_version"]), event["payload"])
    if event_type == EventType.TAG_DELETED:
        digest, tag = str(payload["previous"]), str(payload["tag"])
    elif event_type == EventType.TAG_SET:
        digest, tag = str(payload["digest"]), str(payload["tag"])
    else:
        digest, tag = str(payload["digest"]), None
    return NotCopied(
        position=int(event["position"]),
        type=str(event_type),
        repository=str(event["repository"]),
        digest=digest,
        tag=tag,
    )


@dataclass
class Checkpoint:
    path: Path | None
    source: str
    target: str
    position: int = 0
    # At most one entry per manifest and per tag, because a later event about
    # the same content replaces or removes the earlier one.
    not_copied: dict[ContentKey, NotCopied] = field(default_factory=dict)
    # The registry id of the source whose log ``position`` counts in; None
    # until a source that reports one is checked.
    source_registry_id: str | None = None
    # The hash of the source's event at ``position``; None when unknown.
    position_hash: str | None = None
    # The --repositories patterns, sorted and without repeats.
    repositories: list[str] = field(default_factory=list)
    # Whether the runs that reached ``position`` copied deletes.
    propagate_deletes: bool = False
    # Why this run must replay the source from position 0, once the mirror
    # has checked that the position still counts in the source's log.
    replay_reason: str | None = None

    @classmethod
    def load(
        cls,
        path: Path | None,
        source: str,
        target: str,
        repositories: tuple[str, ...] = (),
        propagate_deletes: bool = False,
    ) -> Checkpoint:
        """Read the checkpoint at ``path``; position 0 when there is none yet.

        When the runs that wrote it left out events that this run copies,
        because of other ``repositories`` patterns or deletes not
        propagated, or when its file does not record them, ``replay_reason``
        gives the reason.
        """
        checkpoint = cls(
            path,
            source,
            target,
            repositories=sorted(set(repositories)),
            propagate_deletes=propagate_deletes,
        )
        if path is None or not path.exists():
            return checkpoint
        try:
            document = json.loads(_read_regular_file(path))
            if not isinstance(document, dict):
                raise ValueError("it is not a JSON object")
            position = _integer(document["position"], "position", minimum=0)
            # A mirror before --source-creds stored the URLs with any user
            # name and password in them. They are compared, shown and
            # written again without.
            saved_source = split_userinfo(_string(document["source"], "source"))[0]
            saved_target = split_userinfo(_string(document["target"], "target"))[0]
            saved_entries = document.get("not_copied", [])
            if not isinstance(saved_entries, list):
                raise ValueError(
                    f"invalid not_copied {saved_entries!r}: expected a list"
                )
            entries = [
                NotCopied.from_json(entry, index)
                for index, entry in enumerate(saved_entries)
            ]
            registry_id = _optional_string(document, "source_registry_id")
            position_hash = _optional_string(document, "position_hash")
            if position_hash is not None and not _EVENT_HASH.fullmatch(position_hash):
                raise ValueError(
                    f"invalid position_hash {position_hash!r}: expected the "
                    "SHA-256 hash of an event, 64 lowercase hexadecimal digits"
                )
            saved_patterns = document.get("repositories")
            if saved_patterns is not None and not (
                isinstance(saved_patterns, list)
                and all(isinstance(pattern, str) for pattern in saved_patterns)
            ):
                raise ValueError(
                    f"invalid repositories {saved_patterns!r}: expected a list of "
                    "strings"
                )
            saved_deletes = document.get("propagate_deletes")
            if saved_deletes is not None and not isinstance(saved_deletes, bool):
                raise ValueError(
                    f"invalid propagate_deletes {saved_deletes!r}: expected true "
                    "or false"
                )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            # A KeyError's text is only the key, which reads as no reason.
            reason = (
                f"the key {error.args[0]!r} is missing"
                if isinstance(error, KeyError)
                else str(error)
            )
            raise CheckpointError(
                f"cannot read checkpoint {path}: {reason}. Fix or remove the file "
                "(the mirror then replays from position 0, which is safe), or "
                "pass another --checkpoint file if this one is not a checkpoint"
            ) from None
        if (saved_source, saved_target) != (source, target):
            raise CheckpointError(
                f"checkpoint {path} belongs to the mirror from {saved_source} to "
                f"{saved_target}, not from {source} to {target}; use another "
                "--checkpoint file"
            )
        checkpoint.not_copied = {entry.key: entry for entry in entries}
        checkpoint.source_registry_id = registry_id
        if position > 0:
            checkpoint.replay_reason = _replay_reason(
                checkpoint, saved_patterns, saved_deletes
            )
        checkpoint.position = position
        checkpoint.position_hash = position_hash
        return checkpoint

    def check_source(self, registry_id: str | None) -> None:
        """Take ``registry_id`` as the source's id, to record at the next save.

        Raises SourceReplaced when the checkpoint was written for a source
        with another id, or with an id while the source now reports none.
        """
        saved = self.source_registry_id
        if saved is not None and registry_id != saved:
            reported = f"registry id {registry_id}" if registry_id else "no registry id"
            origin = (
                f"the mirror started on registry id {saved}"
                if self.path is None
                else f"checkpoint {self.path} was written for registry id {saved}"
            )
            raise SourceReplaced(
                f"the source {self.source} reports {reported}, but {origin}. The "
                "source was reset or replaced, so the mirror's position "
                f"{self.position} does not count in its event log. "
                f"{self.restart_hint()}"
            )
        self.source_registry_id = registry_id

    def restart_hint(self) -> str:
        """Tell the user how to mirror a reset source from its beginning."""
        if self.path is None:
            return "Start the mirror again to replay the source from position 0."
        return (
            f"To copy the new source, start from a new checkpoint: remove "
            f"{self.path} or pass another --checkpoint file, and the mirror "
            "replays the source from position 0."
        )

    def pending(self) -> list[NotCopied]:
        """Return the events not copied whole, oldest first."""
        return sorted(self.not_copied.values(), key=lambda entry: entry.position)

    def write(self) -> None:
        """Write the checkpoint as it is; a no-op without a checkpoint file.

        The mirror calls this before it copies anything, to find an
        unwritable path early and to replace URLs with a user name and
        password that an older mirror stored. Raises CheckpointError.
        """
        if self.path is None:
            return
        try:
            self._write(self.position, self.pending())
        except OSError as error:
            raise CheckpointError(self._write_failure(error)) from None

    async def save(self, position: int, position_hash: str | None) -> None:
        """Record ``position`` as dealt with, the hash of its event (None when
        unknown) and the events not copied whole.

        Does nothing without a checkpoint file, and raises MirrorError when
        the file cannot be written.
        """
        self.position = position
        self.position_hash = position_hash
        if self.path is None:
            return
        try:
            await asyncio.to_thread(self._write, position, self.pending())
        except OSError as error:
            raise MirrorError(self._write_failure(error)) from None

    def _write_failure(self, error: OSError) -> str:
        return (
            f"cannot write checkpoint {self.path}: {error.strerror or error}. "
            "Pass a --checkpoint file in a directory that exists and that the "
            "mirror may write to"
        )

    def _write(self, position: int, pending: list[NotCopied]) -> None:
        assert self.path is not None
        document = {
            "source": self.source,
            "target": self.target,
            "source_registry_id": self.source_registry_id,
            "position": position,
            "position_hash": self.position_hash,
            "repositories": self.repositories,
            "propagate_deletes": self.propagate_deletes,
            "not_copied": [entry.to_json() for entry in pending],
            "updated_at": format_time(datetime.now(UTC)),
        }
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temp.unlink(missing_ok=True)
        # Mode 0600, because the file names the registries and repositories
        # that the mirror copies, which other users of the host need not read.
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with open(descriptor, "w", encoding="utf-8") as handle:
                json.dump(document, handle)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, self.path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _read_regular_file(path: Path) -> str:
    """Return the text of ``path``, opened with O_NONBLOCK so that a FIFO
    does not block the open. Raises ValueError when it is not a regular
    file."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(descriptor, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError("it is not a regular file")
        return handle.read().decode("utf-8")


def _replay_reason(
    checkpoint: Checkpoint,
    saved_patterns: list[str] | None,
    saved_deletes: bool | None,
) -> str | None:
    """Return why the runs that wrote a checkpoint may have left out events
    that ``checkpoint``'s run copies, or None when they did not."""
    if saved_patterns is None or saved_deletes is None:
        return (
            "the checkpoint does not record the --repositories patterns and "
            "--propagate-deletes of the runs that wrote it"
        )
    previous = sorted(set(saved_patterns))
    if previous != checkpoint.repositories:
        return (
            f"the --repositories patterns changed from {previous} to "
            f"{checkpoint.repositories}"
        )
    if checkpoint.propagate_deletes and not saved_deletes:
        return "--propagate-deletes is on, and the earlier runs did not copy deletes"
    return None


def _integer(value: object, name: str, minimum: int) -> int:
    """Return ``value`` if it is an integer from ``minimum`` to MAX_INT64, else
    raise ValueError. Positions are signed 64-bit integers in cairn's event
    log, and its feed rejects a larger ``after``. JSON true and false are no
    integers, although Python's bool is an int."""
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not minimum <= value <= MAX_INT64
    ):
        raise ValueError(
            f"invalid {name} {value!r}: expected an integer from {minimum} to "
            f"{MAX_INT64}"
        )
    return value


def _string(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"invalid {name} {value!r}: expected a string")
    return value


def _optional_string(document: dict[str, Any], key: str) -> str | None:
    value = document.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"invalid {key} {value!r}: expected a string")
    return value
