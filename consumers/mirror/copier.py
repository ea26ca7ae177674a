"""Reproduce one source event on the target.

Every step first checks whether the target already has the result, so an
event applied twice changes nothing. A blob that the target already has
must have the size that the event or the manifest's descriptor gives, or
that the source serves. Otherwise the mirror stops, because the target
stores a damaged or different blob under the digest. Content is always copied in
dependency order: blobs, then child manifests, then the manifest by digest,
then the tag. That order is kept even when the events arrive in another
shape, because a manifest event copies any blob or child the target lacks,
and a tag event copies its manifest first.

When the source no longer has what an event is about (a later event
deleted it), the event is skipped: replaying the rest of the log brings the
target to the source's current state regardless. When the source still
serves a manifest but no longer has a blob or child manifest it requires,
the target cannot store that manifest or a tag on it. Such an event is
"incomplete": it is logged as a warning and counted in Stats.not_copied,
because the rest of the log may never bring that content back. The
checkpoint records it, and the next run retries it with ``retry``.

A target that cannot delete a tag alone, such as Distribution 2.8, keeps a
tag that the source deleted. Unless a later event removes or moves that
tag on the target, its tag.deleted event is incomplete as well.

Manifests are copied as the source stored them, including those that an
earlier cairn accepted and the source's current checks reject. Their
references are read with parse_stored_manifest, and the target decides
whether it accepts the bytes. A rejection stops the mirror, as any other
rejection by the target does.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import structlog

from consumers.mirror.checkpoint import NotCopied
from consumers.mirror.errors import MirrorError, SourceGone, TransientError
from consumers.mirror.registry import BlobStream, RegistryClient
from consumers.mirror.target import Target
from engine.domain.digest import Digest, DigestVerifier
from engine.domain.errors import DigestMismatch, RegistryError
from engine.domain.events import EventType, upcast
from engine.domain.manifests import (
    Manifest,
    Reference,
    parse_manifest,
    parse_stored_manifest,
)

log = structlog.get_logger(__name__)

# An index of indexes of ... deeper than this is refused rather than followed.
MAX_MANIFEST_DEPTH: Final = 8
# Digests whose target repository the copier remembers, for mounts.
LOCATION_CACHE_SIZE: Final = 100_000
# Incomplete manifests whose manifest_not_copied warning the copier
# remembers. Past this many, the least recently seen is logged again.
REPORTED_CACHE_SIZE: Final = 10_000


@dataclass
class Stats:
    """Counters for progress reports.

    ``skipped`` counts events left out on purpose: their repository is not
    mirrored, or their type is unknown. ``not_copied`` counts incomplete
    events, whose content the source serves only in part. ``bytes_sent``
    counts blob bytes as they go to the target, each attempt again, and the
    progress rates use it. ``bytes_copied`` counts the bytes of the blobs
    that the target stored.
    """

    applied: int = 0
    skipped: int = 0
    not_copied: int = 0
    bytes_sent: int = 0
    bytes_copied: int = 0
    blobs_copied: int = 0
    blobs_mounted: int = 0
    manifests_copied: int = 0


class Copier:
    def __init__(
        self,
        source: RegistryClient,
        target: Target,
        *,
        mirrored: Callable[[str], bool],
        propagate_deletes: bool,
        stats: Stats,
    ) -> None:
        self.source = source
        self.target = target
        self.mirrored = mirrored
        self.propagate_deletes = propagate_deletes
        self.stats = stats
        self._locations: OrderedDict[str, str] = OrderedDict()
        # (repository, digest) of each manifest reported incomplete, and the
        # content that was missing then.
        self._reported: OrderedDict[tuple[str, str], str] = OrderedDict()

    async def apply(self, event: dict[str, Any]) -> str:
        """Apply one event; return what happened, for the log ("copied", ...)."""
        event_type = EventType(event["type"])
        repository: str = event["repository"]
        payload = upcast(event_type, int(event["schema_version"]), event["payload"])

        match event_type:
            case EventType.BLOB_PUSHED | EventType.BLOB_MOUNTED:
                return await self.copy_blob(
                    repository,
                    payload["digest"],
                    payload.get("from"),
                    payload.get("size"),
                )
            case EventType.MANIFEST_PUSHED:
                return await self.copy_manifest(repository, payload["digest"])
            case EventType.TAG_SET:
                return await self.set_current_tag(
                    repository, payload["tag"], payload["digest"]
                )
        if not self.propagate_deletes:
            return "deletes_not_propagated"
        match event_type:
            case EventType.TAG_DELETED:
                return await self.delete_tag(
                    repository, payload["tag"], payload["previous"]
                )
            case EventType.MANIFEST_DELETED:
                await self.target.delete_manifest(repository, payload["digest"])
            case EventType.BLOB_DELETED:
                await self.target.delete_blob(repository, payload["digest"])
        return "deleted"

    async def retry(self, entry: NotCopied) -> str:
        """Copy a manifest or tag that an earlier run could not copy whole,
        as the source serves it now.

        Returns what ``apply`` would, and "gone" for a tag that the source
        has deleted or moved to another manifest since. Such a tag is left
        alone, because the later event that moved it is applied in order.
        A tag.deleted entry is dropped as "deletes_not_propagated" when
        this run does not propagate deletes.
        """
        if entry.type == EventType.TAG_DELETED:
            assert entry.tag is not None
            if not self.propagate_deletes:
                return "deletes_not_propagated"
            return await self.delete_tag(entry.repository, entry.tag, entry.digest)
        if entry.tag is None:
            return await self.copy_manifest(entry.repository, entry.digest)
        return await self.set_current_tag(entry.repository, entry.tag, entry.digest)

    async def set_current_tag(self, repository: str, tag: str, digest: str) -> str:
        """Point ``tag`` at manifest ``digest`` on the target, as a tag.set
        event did on the source, unless the source's tag has been deleted or
        moved to another manifest since.

        Such a tag returns "gone" and is left alone, because the later event
        that moved or deleted it is applied in order. So a replay does not
        create a tag on the target that the source deleted long ago.
        """
        current = await self.source.manifest_digest(repository, tag)
        if current != digest:
            log.info(
                "tag_skipped",
                repository=repository,
                tag=tag,
                digest=digest,
                reason="the source's tag no longer points at this manifest",
                source_digest=current,
            )
            return "gone"
        return await self.set_tag(repository, tag, digest)

    async def delete_tag(self, repository: str, tag: str, digest: str) -> str:
        """Delete a tag that pointed at manifest ``digest`` on the source.

        Returns "deleted" when the target deleted it. A target that cannot
        delete a tag alone, such as Distribution 2.8, keeps it. Then this
        returns "absent" when the target has no such tag. It returns
        "superseded" when a later source event settles the tag on the
        target: a tag.set that sets it again, or the manifest.deleted of
        the manifest that it points at, which removes the tag too.
        Otherwise it returns "incomplete".
        """
        if await self.target.delete_tag(repository, tag):
            return "deleted"
        kept = await self.target.tagged_digest(repository, tag)
        if kept is None:
            return "absent"
        if await self.source.manifest_digest(repository, tag) is not None:
            reason = "the source sets the tag again in a later event"
        elif await self.source.manifest_digest(repository, kept) is None:
            reason = (
                "the source deletes its manifest in a later event, which "
                "removes the tag from the target"
            )
        else:
            log.warning(
                "tag_delete_unsupported",
                repository=repository,
                tag=tag,
                digest=kept,
                target=self.target.description,
                reason="the target cannot delete a tag alone, and the source "
                "keeps the manifest that the target's tag points at",
                note="the tag stays on the target until its manifest is deleted",
            )
            return "incomplete"
        log.info(
            "tag_delete_superseded",
            repository=repository,
            tag=tag,
            digest=kept,
            target=self.target.description,
            reason=reason,
        )
        return "superseded"

    # ---- blobs -----------------------------------------------------------

    async def copy_blob(
        self,
        repository: str,
        digest: str,
        mount_from: str | None = None,
        size: int | None = None,
    ) -> str:
        """Copy a blob that the target lacks; return "present", "copied",
        "mounted" or "gone".

        Raises MirrorError when the target already has the blob with a size
        other than ``size``, the size in the source's event, and the source
        does not serve the target's size either.
        """
        outcome, target_size = await self._copy_blob(repository, digest, mount_from)
        if size is not None and target_size is not None and target_size != size:
            await self._check_target_blob_size(
                repository, digest, size, target_size, "the source's event"
            )
        return outcome

    async def _copy_blob(
        self, repository: str, digest: str, mount_from: str | None
    ) -> tuple[str, int | None]:
        """Copy a blob that the target lacks; return the outcome and, for a
        blob the target already had, the size that the target reports."""
        stored = await self.target.stored_blob(repository, digest)
        if stored is not None:
            self._remember(digest, repository)
            return "present", stored.size
        candidate = self._mount_candidate(repository, digest, mount_from)
        # The bytes that each upload attempt sent, in order.
        sent: list[int] = []
        try:
            copy = await self.target.put_blob(
                repository,
                digest,
                lambda: self._open_verified(repository, digest, sent),
                candidate,
            )
        except SourceGone:
            log.info(
                "blob_skipped",
                repository=repository,
                digest=digest,
                reason="no longer on the source",
            )
            return "gone", None
        self._remember(digest, repository)
        if copy.mounted:
            self.stats.blobs_mounted += 1
            log.debug(
                "blob_mounted", repository=repository, digest=digest, source=candidate
            )
            return "mounted", None
        self.stats.blobs_copied += 1
        self.stats.bytes_copied += sent[-1] if sent else copy.size
        log.debug("blob_copied", repository=repository, digest=digest, size=copy.size)
        return "copied", None

    async def _check_target_blob_size(
        self,
        repository: str,
        digest: str,
        expected: int,
        target_size: int,
        described_by: str,
    ) -> None:
        """Raise MirrorError for a blob that the target serves with
        ``target_size`` bytes where ``described_by`` gives ``expected``,
        unless the source serves ``target_size`` bytes as well.

        A target whose size differs from the source's stores another blob,
        or a damaged one, under the digest, and clients that pull it fail
        their size check. When the source serves the same size as the
        target, ``described_by`` is what is wrong, and this returns.
        """
        source = await self.source.head_blob(repository, digest)
        source_size = None if source is None else source.size
        if source_size == target_size:
            return
        log.error(
            "blob_size_mismatch",
            repository=repository,
            digest=digest,
            expected_size=expected,
            target_size=target_size,
            source_size=source_size,
            described_by=described_by,
            target=self.target.description,
        )
        if source is None:
            on_source = "the source no longer serves it"
        elif source_size is None:
            on_source = "the source does not send its size"
        else:
            on_source = f"the source serves {source_size} bytes"
        raise MirrorError(
            f"blob {digest} in {repository}: the target {self.target.description} "
            f"serves {target_size} bytes under that digest, but {described_by} "
            f"gives size {expected} and {on_source}. The target stores a damaged "
            "or different blob under the digest: repair or remove it on the "
            "target, then run the mirror again"
        )

    def _mount_candidate(
        self, repository: str, digest: str, mount_from: str | None
    ) -> str | None:
        if mount_from and mount_from != repository and self.mirrored(mount_from):
            return mount_from
        known = self._locations.get(digest)
        return known if known != repository else None

    def _remember(self, digest: str, repository: str) -> None:
        self._locations[digest] = repository
        self._locations.move_to_end(digest)
        if len(self._locations) > LOCATION_CACHE_SIZE:
            self._locations.popitem(last=False)

    @asynccontextmanager
    async def _open_verified(
        self, repository: str, digest: str, sent: list[int]
    ) -> AsyncIterator[BlobStream]:
        expected = Digest.parse(digest)
        async with self.source.open_blob(repository, digest) as blob:
            chunks = self._verified(blob.chunks, expected, blob.size, repository, sent)
            yield BlobStream(blob.size, chunks)

    async def _verified(
        self,
        chunks: AsyncIterator[bytes],
        expected: Digest,
        size: int | None,
        repository: str,
        sent: list[int],
    ) -> AsyncIterator[bytes]:
        """Pass chunks through, holding back the last one until the digest
        checks, so the target never receives a whole blob with wrong bytes.

        Appends a count to ``sent`` and adds each chunk's length to it once
        the target has taken the chunk."""
        verifier = DigestVerifier(expected.algorithm)
        held: bytes | None = None
        sent.append(0)
        async for chunk in chunks:
            if not chunk:
                continue
            await asyncio.to_thread(verifier.update, chunk)
            if held is not None:
                yield held
                self._count_sent(sent, len(held))
            held = chunk
        if size is not None and verifier.size != size:
            raise TransientError(
                f"blob {expected} in {repository}: read {verifier.size} bytes of "
                f"the {size} the source announced"
            )
        try:
            verifier.verify(expected)
        except DigestMismatch as error:
            raise TransientError(
                f"blob {expected} in {repository}: the bytes read from the source "
                f"hash to {error.detail.get('actual')}"
            ) from None
        if held is not None:
            yield held
            self._count_sent(sent, len(held))

    def _count_sent(self, sent: list[int], length: int) -> None:
        sent[-1] += length
        self.stats.bytes_sent += length

    # ---- manifests and tags -----------------------------------------------

    async def copy_manifest(self, repository: str, digest: str, depth: int = 0) -> str:
        """Copy a manifest and whatever it requires that the target lacks.

        Returns "present", "copied", "gone" (the source no longer has the
        manifest) or "incomplete" (the source has it, but not a blob or
        child manifest that it requires, at any depth).
        """
        if await self.target.has_manifest(repository, digest):
            self._reported.pop((repository, digest), None)
            return "present"
        if depth > MAX_MANIFEST_DEPTH:
            raise MirrorError(
                f"manifest {digest} in {repository} nests indexes deeper than "
                f"{MAX_MANIFEST_DEPTH} levels"
            )
        fetched = await self.source.get_manifest(repository, digest)
        if fetched is None:
            self._reported.pop((repository, digest), None)
            log.info(
                "manifest_skipped",
                repository=repository,
                digest=digest,
                reason="no longer on the source",
            )
            return "gone"
        media_type, raw = fetched
        expected = Digest.parse(digest)
        if Digest.of(raw, expected.algorithm) != expected:
            raise TransientError(
                f"manifest {digest} in {repository}: the bytes read from the "
                "source have another digest"
            )
        manifest, rejection = _parse_source_manifest(
            repository, digest, media_type, raw, expected.algorithm
        )

        # Blobs that the target already had with another size than their
        # descriptor gives, and the size that the target reports.
        resized: list[tuple[Reference, int]] = []
        for reference in manifest.references():
            if not reference.required:
                continue
            child = str(reference.descriptor.digest)
            if reference.kind == "manifest":
                outcome = await self.copy_manifest(repository, child, depth + 1)
            else:
                outcome, target_size = await self._copy_blob(repository, child, None)
                if target_size is not None and target_size != reference.descriptor.size:
                    resized.append((reference, target_size))
            if outcome in ("gone", "incomplete"):
                self._report_incomplete(
                    repository, digest, reference.kind, child, outcome
                )
                return "incomplete"

        # Compared only now, so that an incomplete manifest costs no requests.
        mismatches = await self._descriptor_mismatches(repository, manifest)
        for reference, target_size in resized:
            descriptor = reference.descriptor
            await self._check_target_blob_size(
                repository,
                str(descriptor.digest),
                descriptor.size,
                target_size,
                f"the {reference.kind} descriptor in manifest {digest}",
            )
            # The source serves the target's size, so the descriptor is wrong.
            mismatches.append(
                f"its {reference.kind} descriptor of {descriptor.digest} gives "
                f"size {descriptor.size}, but the source serves {target_size} "
                "bytes under that digest"
            )
        if mismatches:
            reason = "; ".join(mismatches)
            log.warning(
                "manifest_fails_current_checks",
                repository=repository,
                digest=digest,
                reason=reason,
                note="the mirror copies it unchanged, and the target decides "
                "whether to accept it",
            )
            rejection = reason if rejection is None else f"{rejection}; {reason}"
        try:
            await self.target.put_manifest(repository, digest, manifest.media_type, raw)
        except MirrorError as error:
            if rejection is None:
                raise
            raise MirrorError(
                f"{error}. An earlier cairn stored this manifest, and the "
                f"source's current checks reject it too: {rejection}. Delete it "
                "on the source, or leave its repository out with --repositories, "
                "to let the mirror continue"
            ) from None
        self._reported.pop((repository, digest), None)
        self.stats.manifests_copied += 1
        log.debug("manifest_copied", repository=repository, digest=digest)
        return "copied"

    def _report_incomplete(
        self, repository: str, digest: str, kind: str, child: str, outcome: str
    ) -> None:
        """Log manifest_not_copied for a manifest that lacks ``child``, once
        per manifest and missing content.

        The manifest.pushed and tag.set events of one push, and every later
        tag.set on the manifest, copy it again and find the same gap. The
        record is dropped when the manifest is copied, present on the
        target or gone from the source, so a later gap is logged again.
        """
        key = (repository, digest)
        reason = _missing_reason(kind, child, outcome)
        if self._reported.get(key) == child:
            self._reported.move_to_end(key)
            log.debug(
                "manifest_still_not_copied",
                repository=repository,
                digest=digest,
                missing=child,
                reason=reason,
            )
            return
        self._reported[key] = child
        if len(self._reported) > REPORTED_CACHE_SIZE:
            self._reported.popitem(last=False)
        log.warning(
            "manifest_not_copied",
            repository=repository,
            digest=digest,
            missing=child,
            missing_kind=kind,
            reason=reason,
        )

    async def _descriptor_mismatches(
        self, repository: str, manifest: Manifest
    ) -> list[str]:
        """Describe each child manifest or subject descriptor of ``manifest``
        whose size or media type differs from the manifest that the source
        serves under its digest, as cairn's checks on a push compare them.

        A subject that the source does not serve is left out, because a push
        accepts it. A child that it does not serve has made the copy
        incomplete before this runs.
        """
        reasons: list[str] = []
        for reference in manifest.references():
            if reference.kind not in ("manifest", "subject"):
                continue
            descriptor = reference.descriptor
            served = await self.source.manifest_metadata(
                repository, str(descriptor.digest)
            )
            if served is None:
                continue
            media_type, size = served
            if size is not None and size != descriptor.size:
                reasons.append(
                    f"its {reference.kind} descriptor of {descriptor.digest} gives "
                    f"size {descriptor.size}, but the source serves {size} bytes "
                    "under that digest"
                )
            if media_type != descriptor.media_type:
                reasons.append(
                    f"its {reference.kind} descriptor of {descriptor.digest} gives "
                    f"mediaType {descriptor.media_type}, but the source serves "
                    f"that manifest as {media_type}"
                )
        return reasons

    async def set_tag(self, repository: str, tag: str, digest: str) -> str:
        if await self.target.tagged_digest(repository, tag) == digest:
            return "present"
        outcome = await self.copy_manifest(repository, digest)
        if outcome == "gone":
            log.info(
                "tag_skipped",
                repository=repository,
                tag=tag,
                digest=digest,
                reason="its manifest is no longer on the source",
            )
            return "gone"
        if outcome == "incomplete":
            log.warning(
                "tag_not_copied",
                repository=repository,
                tag=tag,
                digest=digest,
                reason="the source serves its manifest, but not all the "
                "content that the manifest requires",
            )
            return "incomplete"
        await self.target.set_tag(repository, tag, digest)
        log.debug("tag_set", repository=repository, tag=tag, digest=digest)
        return "tagged"


def _missing_reason(kind: str, child: str, outcome: str) -> str:
    if outcome == "gone":
        return (
            f"the source serves it, but its {kind} {child} is no longer on the source"
        )
    return (
        f"the source serves it, but not all the content that its {kind} "
        f"{child} requires"
    )


def _parse_source_manifest(
    repository: str, digest: str, media_type: str, raw: bytes, algorithm: str
) -> tuple[Manifest, str | None]:
    """Parse a manifest read from the source.

    Returns the manifest and, when the checks on new pushes reject it, the
    message of the error they raise. Such a manifest is parsed again as
    stored content and logged as a warning. Raises MirrorError when even
    that parse fails.
    """
    try:
        return parse_manifest(raw, media_type, algorithm=algorithm), None
    except RegistryError as error:
        rejection = error
    try:
        manifest = parse_stored_manifest(raw, media_type, algorithm=algorithm)
    except RegistryError as error:
        raise MirrorError(
            f"manifest {digest} in {repository} does not parse: {error}"
        ) from None
    log.warning(
        "manifest_fails_current_checks",
        repository=repository,
        digest=digest,
        reason=str(rejection),
        note="the mirror copies it unchanged, and the target decides whether "
        "to accept it",
    )
    return manifest, str(rejection)
