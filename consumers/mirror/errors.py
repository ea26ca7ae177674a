"""How a step of the mirror failed, which decides what happens next."""

from __future__ import annotations


class MirrorError(Exception):
    """A failure that retrying will not fix; the mirror stops with status 1."""


class TransientError(Exception):
    """A failure worth retrying: a 5xx, a 429, a timeout, a dropped connection."""


class SourceGone(Exception):
    """The source no longer has the content an event is about, so the event
    is skipped: a later event deleted it."""


class SourceReplaced(Exception):
    """The source's event log is not the one that the checkpoint's position
    counts in. The source was reset or replaced, and the mirror stops with
    status 2."""
