"""Error messages for failed httpx requests.

httpx's timeout exceptions can carry no text (httpx 0.29 raises a
ReadTimeout whose str() is "" when a server accepts the connection and sends
nothing), so a message built with ``f"{error}"`` would end in nothing. An
exception is true even without text, so ``error or type(error).__name__``
gives the empty text too.
"""

from __future__ import annotations

from typing import Final

import httpx

# httpx's timeout exceptions and the key of each in a request's "timeout"
# extension, which contains the seconds that the client allowed.
_TIMEOUT_PHASES: Final = (
    (httpx.ConnectTimeout, "connect"),
    (httpx.ReadTimeout, "read"),
    (httpx.WriteTimeout, "write"),
    (httpx.PoolTimeout, "pool"),
)


def describe_http_error(error: httpx.HTTPError, setting: str | None = None) -> str:
    """Return what went wrong in a failed httpx request, never an empty string.

    A timeout reads "read timed out after 0.5 s (--timeout)": the phase that
    ran out, the seconds the request allowed and ``setting``, the option or
    configuration key that sets them. Any other exception gives its text, or
    its type name when it has none.
    """
    if isinstance(error, httpx.TimeoutException):
        return _describe_timeout(error, setting)
    return str(error) or type(error).__name__


def _describe_timeout(error: httpx.TimeoutException, setting: str | None) -> str:
    phase = next(
        (name for kind, name in _TIMEOUT_PHASES if isinstance(error, kind)), None
    )
    seconds = _allowed_seconds(error, phase)
    message = f"{phase} timed out" if phase is not None else "timed out"
    if seconds is not None:
        message += f" after {seconds:g} s"
    if setting is not None:
        message += f" ({setting})"
    return message


def _allowed_seconds(error: httpx.TimeoutException, phase: str | None) -> float | None:
    """Return the seconds that the request allowed for ``phase``, if known."""
    if phase is None:
        return None
    try:
        request = error.request
    except RuntimeError:
        # httpx raises this when the exception is not tied to a request.
        return None
    timeouts = request.extensions.get("timeout")
    if not isinstance(timeouts, dict):
        return None
    seconds = timeouts.get(phase)
    return float(seconds) if isinstance(seconds, int | float) else None
