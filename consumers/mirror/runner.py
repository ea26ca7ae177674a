"""The mirror's main loop: replay the feed, then follow NATS or poll.

The position is the last source event the mirror has dealt with: applied,
incomplete (see copier.py), or skipped because its repository is not
mirrored. It is checkpointed at most every CHECKPOINT_INTERVAL seconds
while events are applied, at the end of every feed page, when no NATS
event waits, and when the mirror stops, each time after the target's
flush. A restart after a crash repeats the events since the last
checkpoint, which is idempotent.

The checkpoint also records each incomplete event until a later event
about the same manifest or tag replaces or removes it. Every run retries
those first, so content that the source serves whole again reaches the
target without a replay of the log. A mirror that follows the source
retries them only when it starts.

A source that was reset or replaced reports another registry id, a feed
whose head is below the position, or an event at the position whose hash
is not the one the checkpoint recorded, as after a restore from an older
backup. The mirror then stops with SourceReplaced, because going on would
skip that source's events up to the position. It checks at every
catch-up, so it notices a source replaced while it follows within a poll
interval, or within RESYNC_INTERVAL while NATS delivers the events.

An event from NATS whose Cairn-Registry-Id header names another registry
than the source is skipped, because another registry publishes to the
same stream. Any other event from NATS is applied only when its
previous_hash is the hash of the event at the position, because a source
restored from a backup keeps its registry id but not its history. At
position 0, where every log's first event names the same predecessor, a
header that names the source is enough. Otherwise, and for any event
while the hash at the position is unknown, the mirror reads the feed
instead. A message without the header, from a cairn older than it, gets
only the hash check.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import structlog

from consumers.backoff import retry_delay
from consumers.globs import matches_any
from consumers.mirror.checkpoint import Checkpoint, content_key, not_copied_entry
from consumers.mirror.copier import Copier, Stats
from consumers.mirror.errors import MirrorError, SourceReplaced, TransientError
from consumers.mirror.feed import FeedClient, FeedPage
from consumers.mirror.live import LiveEvent, LiveEvents
from consumers.mirror.progress import Progress
from engine.bus.messages import is_stand_in
from engine.domain.events import EventType

log = structlog.get_logger(__name__)

T = TypeVar("T")

# With NATS following, the feed is still read this often, in case the
# source's relay is behind or messages were lost.
RESYNC_INTERVAL: Final = 30.0
# How often the checkpoint is saved while events are applied. Each save
# writes and fsyncs the checkpoint file, and an OCI layout target rewrites
# the index.json of each repository that changed.
CHECKPOINT_INTERVAL: Final = 1.0
RETRY_INITIAL: Final = 0.5
RETRY_MAX: Final = 30.0

_EVENT_TYPES: Final = frozenset(str(event_type) for event_type in EventType)


@dataclass(frozen=True, slots=True)
class MirrorSettings:
    repositories: tuple[str, ...] = ()
    once: bool = False
    poll_interval: float = 2.0
    retries: int = 8


class MirrorRunner:
    def __init__(
        self,
        settings: MirrorSettings,
        feed: FeedClient,
        copier: Copier,
        checkpoint: Checkpoint,
        progress: Progress,
        live: LiveEvents | None,
    ) -> None:
        self.settings = settings
        self.feed = feed
        self.copier = copier
        self.checkpoint = checkpoint
        self.progress = progress
        self.live = live
        self.stats: Stats = copier.stats
        self.position = checkpoint.position
        # The hash of the source's event at ``position``, None when unknown.
        self.position_hash = checkpoint.position_hash
        # Whether a NATS event that did not follow the position was logged.
        self._reported_foreign = False
        self._saved_at = time.monotonic()
        # Whether the last wait was for NATS, None before the first wait.
        # LiveEvents logs the first subscription as nats_following, so only
        # later switches to polling and back are logged here.
        self._following: bool | None = None

    def mirrored(self, repository: str) -> bool:
        return matches_any(repository, self.settings.repositories)

    async def run(self) -> None:
        """Catch up, then follow until cancelled (or return, with ``once``).

        However the run ends, the position reached is checkpointed before
        this returns or raises.
        """
        try:
            await self._run()
        except BaseException as stopped:
            try:
                # shield: a second stop signal must not cut the save short.
                await asyncio.shield(self._save_when_moved())
            except Exception as error:
                log.warning(
                    "checkpoint_not_saved",
                    position=self.position,
                    checkpoint=self.checkpoint.position,
                    error=str(error) or type(error).__name__,
                    stopped_by=type(stopped).__name__,
                    note="the next run repeats the events since the checkpoint",
                )
            raise
        await self._save_when_moved()

    async def _run(self) -> None:
        log.info(
            "mirror_started",
            source=self.checkpoint.source,
            target=self.checkpoint.target,
            source_registry_id=self.checkpoint.source_registry_id,
            position=self.position,
            repositories=list(self.settings.repositories) or None,
        )
        registry_id = await self._retrying(
            self.feed.registry_id, "read the registry id of the source"
        )
        self.checkpoint.check_source(registry_id)
        if self.live is not None:
            self.live.source_registry_id = registry_id
        first = await self._retrying(
            lambda: self.feed.page(self._first_after(), limit=1),
            "read the event feed",
        )
        await self._checked_events(first)
        self._replay_if_needed()
        self.progress.update(self.position, first.head)
        # Also records the source's registry id in a checkpoint without one.
        await self._save()
        if self.live is not None and not self.settings.once:
            self.live.start()
        await self.retry_not_copied()
        await self.catch_up()
        log.info(
            "mirror_caught_up",
            position=self.position,
            applied=self.stats.applied,
            skipped=self.stats.skipped,
            not_copied=self.stats.not_copied,
            bytes_copied=self.stats.bytes_copied,
            bytes_sent=self.stats.bytes_sent,
        )
        if self.settings.once:
            return
        while True:
            live_event = await self._next_live_event()
            if live_event is None:
                await self.catch_up()
                continue
            event = live_event.event
            position = event["position"]
            if self.live is not None:
                self.progress.update(self.position, self.live.highest_position)
            if not self._from_source(live_event):
                continue
            if position <= self.position:
                continue
            if position > self.position + 1 or is_stand_in(event):
                # Missed messages, or a stand-in that the relay sent without
                # the payload: the feed has them in full, and this one too.
                await self.catch_up()
                continue
            if not self._follows_position(live_event):
                await self.catch_up()
                continue
            await self.process(event)
            if self.live is not None and self.live.queue.empty():
                await self._save_when_moved()

    def _from_source(self, live_event: LiveEvent) -> bool:
        """Return False when the message of ``live_event`` names another
        registry id than the source's, and log the first such event.

        Returns True when the message or the source has no registry id,
        because then only the event's hash shows which log it belongs to.
        """
        source_id = self.checkpoint.source_registry_id
        registry_id = live_event.registry_id
        if registry_id is None or source_id is None or registry_id == source_id:
            return True
        self._report_foreign(
            live_event.event,
            registry_id=registry_id,
            source_registry_id=source_id,
            note="its Cairn-Registry-Id header names another registry than "
            "the source: another registry publishes to the same stream. Give "
            "each registry its own --stream or --subject-prefix. The mirror "
            "does not apply its events",
        )
        return False

    def _follows_position(self, live_event: LiveEvent) -> bool:
        """Return True when the event of ``live_event`` comes right after the
        event at the position, and log the first event that does not.

        With the hash at the position, the event must name it as its
        previous_hash. Without that hash this returns False, so that the
        mirror reads the feed, except at position 0: every log's first event
        names the same predecessor, so there a message whose header names
        the source's registry id is enough.
        """
        event = live_event.event
        if self.position_hash is None:
            source_id = self.checkpoint.source_registry_id
            return (
                self.position == 0
                and source_id is not None
                and live_event.registry_id == source_id
            )
        if event.get("previous_hash") == self.position_hash:
            return True
        source_id = self.checkpoint.source_registry_id
        if source_id is not None and live_event.registry_id == source_id:
            cause = "the source was restored from a backup or replaced"
        else:
            cause = (
                "another registry may publish to the same stream (give each "
                "registry its own --stream or --subject-prefix), or the source "
                "was restored or replaced"
            )
        self._report_foreign(
            event,
            registry_id=live_event.registry_id,
            note="its previous_hash is not the hash of the source's event at "
            f"the mirror's position: {cause}. The mirror reads the source's "
            "feed instead, which tells which",
        )
        return False

    def _report_foreign(self, event: dict[str, Any], **fields: Any) -> None:
        """Log ``nats_event_not_from_source`` at warning level the first
        time, and at debug level after that."""
        log_event = log.debug if self._reported_foreign else log.warning
        log_event(
            "nats_event_not_from_source",
            position=event.get("position"),
            event_id=event.get("id"),
            repository=event.get("repository"),
            **fields,
        )
        self._reported_foreign = True

    async def _next_live_event(self) -> LiveEvent | None:
        """Return the next event from NATS, or None when the feed is due.

        Without a NATS connection the feed is due every poll interval, and
        a lost or restored connection makes it due at once.
        """
        live = self.live
        if live is None:
            await asyncio.sleep(self.settings.poll_interval)
            return None
        if not live.following:
            # A connection lost before the first wait counts as a switch
            # when NATS was followed before it, during the catch-up.
            if self._following or (self._following is None and live.has_followed):
                log.warning(
                    "mirror_polling",
                    reason="the NATS connection was lost",
                    poll_interval=self.settings.poll_interval,
                )
                self._following = False
            await live.wait_changed(self.settings.poll_interval)
            return None
        if self._following is False:
            log.info("mirror_following_nats", reason="the NATS connection is back")
        self._following = True
        return await live.next_event(RESYNC_INTERVAL)

    async def retry_not_copied(self) -> None:
        """Retry the incomplete events that the checkpoint records, oldest
        first, and drop each one that is copied or gone from the source."""
        entries = [
            entry
            for entry in self.checkpoint.pending()
            if self.mirrored(entry.repository)
        ]
        if not entries:
            return
        log.info("not_copied_retrying", count=len(entries))
        for entry in entries:
            outcome = await self._retrying(
                functools.partial(self.copier.retry, entry),
                f"retry event {entry.position}",
            )
            if outcome == "incomplete":
                self.stats.not_copied += 1
                continue
            self.stats.applied += 1
            del self.checkpoint.not_copied[entry.key]
            await self._save()
            log.info(
                "not_copied_resolved",
                position=entry.position,
                type=entry.type,
                repository=entry.repository,
                digest=entry.digest,
                tag=entry.tag,
                outcome=outcome,
            )

    async def catch_up(self) -> None:
        """Apply feed pages until a page reaches the head it reports."""
        registry_id = await self._retrying(
            self.feed.registry_id, "read the registry id of the source"
        )
        self.checkpoint.check_source(registry_id)
        after = self._first_after()
        while True:
            page = await self._retrying(
                functools.partial(self.feed.page, after), "read the event feed"
            )
            events = await self._checked_events(page)
            # Before the events, so that the reports while a long page is
            # applied show the head and the lag.
            self.progress.update(self.position, page.head)
            for event in events:
                await self.process(event)
            await self._advance(page)
            self.progress.update(self.position, page.head)
            if not events or self.position >= page.head:
                return
            after = self.position

    def _replay_if_needed(self) -> None:
        """Go back to position 0 when the checkpoint's runs left out events
        that this run copies, after the position proved to be the source's."""
        reason = self.checkpoint.replay_reason
        if reason is None:
            return
        self.checkpoint.replay_reason = None
        log.warning(
            "mirror_replaying_from_start",
            position=self.position,
            reason=reason,
            repositories=self.checkpoint.repositories,
            propagate_deletes=self.checkpoint.propagate_deletes,
            note="the events that the earlier runs left out lie before the "
            "checkpoint's position, so the mirror replays the source from "
            "position 0; what the target already has is not copied again",
        )
        self.position = 0
        self.position_hash = None

    def _first_after(self) -> int:
        """Return the ``after`` of the first feed page to read: one before
        the position, so that the page starts with the event at the position
        and its hash can be checked."""
        return max(self.position - 1, 0)

    async def _checked_events(self, page: FeedPage) -> list[dict[str, Any]]:
        """Return _check_position(page). When that raises SourceReplaced,
        read the source's registry id again first: a source replaced since
        its id was read raises SourceReplaced for the id instead, which
        names the cause more precisely."""
        try:
            return self._check_position(page)
        except SourceReplaced:
            registry_id = await self._retrying(
                self.feed.registry_id, "read the registry id of the source"
            )
            self.checkpoint.check_source(registry_id)
            raise

    def _check_position(self, page: FeedPage) -> list[dict[str, Any]]:
        """Return the page's events after the position.

        Raises SourceReplaced when the feed ends before the position, or
        when its event at the position has another hash than the one the
        mirror dealt with. A mirror that did not know that hash takes it.
        """
        self._check_head(page)
        events = page.events
        if not events or int(events[0]["position"]) != self.position:
            return events
        found = events[0].get("hash")
        if self.position_hash is not None and found != self.position_hash:
            raise SourceReplaced(
                f"the event of the source {self.checkpoint.source} at position "
                f"{self.position} has hash {found}, but the mirror dealt with "
                f"an event whose hash is {self.position_hash}. The source was "
                "restored from an older backup or replaced, and its log took "
                "another course, so the mirror would skip its events up to "
                f"that position. {self.checkpoint.restart_hint()}"
            )
        self.position_hash = found if isinstance(found, str) else None
        return events[1:]

    def _check_head(self, page: FeedPage) -> None:
        """Raise SourceReplaced when the feed ends before the position."""
        if page.head >= self.position:
            return
        raise SourceReplaced(
            f"the event feed of the source {self.checkpoint.source} ends at "
            f"position {page.head}, before the mirror's position "
            f"{self.position}. The source was reset, replaced or restored from "
            "an older backup, so the mirror would skip its events up to that "
            f"position. {self.checkpoint.restart_hint()}"
        )

    async def _advance(self, page: FeedPage) -> None:
        if page.next_after > self.position:
            # Past the last event of the page, whose hash is then unknown.
            self.position = page.next_after
            self.position_hash = None
        await self._save_when_moved()

    async def _save(self) -> None:
        await self.copier.target.flush()
        await self.checkpoint.save(self.position, self.position_hash)
        self._saved_at = time.monotonic()

    async def _save_when_moved(self) -> None:
        if (
            self.checkpoint.position != self.position
            or self.checkpoint.position_hash != self.position_hash
        ):
            await self._save()

    async def process(self, event: dict[str, Any]) -> None:
        position = int(event["position"])
        if position <= self.position:
            return
        if event.get("type") not in _EVENT_TYPES:
            log.warning(
                "event_type_unknown",
                position=position,
                type=event.get("type"),
                note="written by a newer cairn; upgrade the mirror",
            )
            self.stats.skipped += 1
            self._move_to(event)
            return
        if not self.mirrored(event["repository"]):
            self.stats.skipped += 1
            self._move_to(event)
            return

        outcome = await self._retrying(
            lambda: self.copier.apply(event), f"apply event {position}"
        )
        if outcome == "incomplete":
            self.stats.not_copied += 1
            entry = not_copied_entry(event)
            self.checkpoint.not_copied[entry.key] = entry
        else:
            self.stats.applied += 1
            # A later event about the same manifest or tag settles an
            # earlier incomplete one, so its record is removed.
            key = content_key(event)
            if key is not None:
                self.checkpoint.not_copied.pop(key, None)
        self._move_to(event)
        if time.monotonic() - self._saved_at >= CHECKPOINT_INTERVAL:
            await self._save()
        self.progress.update(position)
        log.debug(
            "event_applied",
            position=position,
            type=event["type"],
            repository=event["repository"],
            outcome=outcome,
        )

    def _move_to(self, event: dict[str, Any]) -> None:
        self.position = int(event["position"])
        found = event.get("hash")
        self.position_hash = found if isinstance(found, str) else None

    async def _retrying(self, step: Callable[[], Awaitable[T]], what: str) -> T:
        return await retry_transient(step, what, self.settings.retries)


async def retry_transient(
    step: Callable[[], Awaitable[T]], what: str, retries: int
) -> T:
    """Run ``step`` up to ``retries`` times while it raises TransientError,
    with exponential backoff, then raise MirrorError."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await step()
        except TransientError as error:
            if attempt >= retries:
                raise MirrorError(
                    f"gave up after {attempt} attempts to {what}: {error}"
                ) from error
            delay = retry_delay(attempt, RETRY_INITIAL, RETRY_MAX)
            log.warning(
                "mirror_retrying",
                step=what,
                attempt=attempt,
                error=str(error),
                retry_in=round(delay, 2),
            )
            await asyncio.sleep(delay)
