"""How a step of the mirror failed, which decides what happens next."""

from __future__ import annotations

import httpx

from consumers.httperrors import describe_http_error


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


def request_failed(what: str, error: httpx.TransportError) -> TransientError:
    """Return the TransientError for request ``what`` that failed with ``error``.

    The message names the phase and seconds of a timeout, which --timeout
    sets, because httpx's timeout exceptions can carry no text.
    """
    return TransientError(f"{what}: {describe_http_error(error, '--timeout')}")
