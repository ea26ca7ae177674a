"""OCI error codes and the one table that maps domain exceptions to them.

Every error response has the body the OCI distribution specification
defines: ``{"errors": [{"code": ..., "message": ..., "detail": ...}]}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Final

from engine.domain.errors import (
    BlobTooLarge,
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    ConcurrencyConflict,
    DigestInvalid,
    InsufficientStorage,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestTooLarge,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    PreconditionFailed,
    RangeInvalid,
    RangeNotSatisfiable,
    ReferrersFilterInvalid,
    RegistryError,
    SizeInvalid,
    TagInvalid,
    Unsupported,
)


class ErrorCode(StrEnum):
    """The error codes of the OCI distribution specification v1.1."""

    BLOB_UNKNOWN = "BLOB_UNKNOWN"
    BLOB_UPLOAD_INVALID = "BLOB_UPLOAD_INVALID"
    BLOB_UPLOAD_UNKNOWN = "BLOB_UPLOAD_UNKNOWN"
    DIGEST_INVALID = "DIGEST_INVALID"
    MANIFEST_BLOB_UNKNOWN = "MANIFEST_BLOB_UNKNOWN"
    MANIFEST_INVALID = "MANIFEST_INVALID"
    MANIFEST_UNKNOWN = "MANIFEST_UNKNOWN"
    NAME_INVALID = "NAME_INVALID"
    NAME_UNKNOWN = "NAME_UNKNOWN"
    SIZE_INVALID = "SIZE_INVALID"
    # UNAUTHORIZED and DENIED come from engine.api.auth (--auth-file) and
    # TOOMANYREQUESTS from engine.api.ratelimit (--rate-limit).
    UNAUTHORIZED = "UNAUTHORIZED"
    DENIED = "DENIED"
    UNSUPPORTED = "UNSUPPORTED"
    TOOMANYREQUESTS = "TOOMANYREQUESTS"
    # Not an OCI code: the body of a 500 or 507, which never carries
    # internals, and of a 408 for a request that stopped arriving.
    UNKNOWN = "UNKNOWN"
    # Not an OCI code either, which leaves 5xx codes open: CNCF
    # Distribution's code for 503 Service Unavailable (its errcode package),
    # for a condition that ends by itself.
    UNAVAILABLE = "UNAVAILABLE"


# The Retry-After of a 503 UNAVAILABLE, in seconds. cairn cannot know when a
# busy database frees its lock or when a stopping server is back, so this is
# an estimate: long enough that clients do not retry in a tight loop, and
# short enough for a restart.
UNAVAILABLE_RETRY_AFTER: Final = 5


# Domain exception -> OCI code and HTTP status. A subclass without an entry
# of its own uses its nearest listed base class, so DigestMismatch maps like
# DigestInvalid and ManifestUnsupported as ManifestInvalid.
ERROR_TABLE: Final[dict[type[RegistryError], tuple[ErrorCode, int]]] = {
    NameInvalid: (ErrorCode.NAME_INVALID, 400),
    NameUnknown: (ErrorCode.NAME_UNKNOWN, 404),
    # The specification has no code for a malformed tag; the tag is part of
    # the manifest reference, so it is reported as an invalid manifest.
    TagInvalid: (ErrorCode.MANIFEST_INVALID, 400),
    DigestInvalid: (ErrorCode.DIGEST_INVALID, 400),
    BlobUnknown: (ErrorCode.BLOB_UNKNOWN, 404),
    BlobUploadUnknown: (ErrorCode.BLOB_UPLOAD_UNKNOWN, 404),
    BlobUploadInvalid: (ErrorCode.BLOB_UPLOAD_INVALID, 400),
    RangeInvalid: (ErrorCode.BLOB_UPLOAD_INVALID, 416),
    RangeNotSatisfiable: (ErrorCode.UNSUPPORTED, 416),
    SizeInvalid: (ErrorCode.SIZE_INVALID, 400),
    ManifestTooLarge: (ErrorCode.SIZE_INVALID, 413),
    BlobTooLarge: (ErrorCode.SIZE_INVALID, 413),
    # A full disk is no fault of the request, so it gets a 5xx. RFC 4918
    # section 11.5 defines 507 Insufficient Storage for a server that cannot
    # store what a request sends, a temporary condition that a client should
    # not retry on its own. A 500 would suggest a bug in cairn instead.
    InsufficientStorage: (ErrorCode.UNKNOWN, 507),
    ManifestInvalid: (ErrorCode.MANIFEST_INVALID, 400),
    ManifestUnknown: (ErrorCode.MANIFEST_UNKNOWN, 404),
    ManifestBlobUnknown: (ErrorCode.MANIFEST_BLOB_UNKNOWN, 400),
    ReferrersFilterInvalid: (ErrorCode.UNSUPPORTED, 400),
    Unsupported: (ErrorCode.UNSUPPORTED, 400),
    ConcurrencyConflict: (ErrorCode.UNSUPPORTED, 409),
    # RFC 9110 section 15.5.13; the OCI specification defines no code for it.
    PreconditionFailed: (ErrorCode.UNSUPPORTED, 412),
    RegistryError: (ErrorCode.UNSUPPORTED, 400),
}


class HTTPError(Exception):
    """An error response: OCI code, HTTP status, message, detail, headers."""

    def __init__(
        self,
        code: ErrorCode,
        status: int,
        message: str,
        detail: Any = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.detail = detail
        self.headers = list(headers)

    @classmethod
    def from_registry_error(
        cls, error: RegistryError, headers: Sequence[tuple[str, str]] = ()
    ) -> HTTPError:
        code, status = lookup(type(error))
        return cls(code, status, error.message, error.detail, headers)

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.detail)


def lookup(error_type: type[RegistryError]) -> tuple[ErrorCode, int]:
    """Return the code and status for ``error_type`` or its nearest base."""
    for cls in error_type.__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[RegistryError]


def error_body(code: ErrorCode, message: str, detail: Any = None) -> bytes:
    document = {"errors": [{"code": str(code), "message": message, "detail": detail}]}
    return json.dumps(document, default=str).encode()


def unavailable(message: str, **detail: Any) -> HTTPError:
    """Build the 503 UNAVAILABLE error for a condition that ends by itself,
    with a Retry-After header."""
    return HTTPError(
        ErrorCode.UNAVAILABLE,
        503,
        message,
        detail,
        [("Retry-After", str(UNAVAILABLE_RETRY_AFTER))],
    )


def unsupported(message: str, **detail: Any) -> HTTPError:
    """Build the 400 UNSUPPORTED error for an invalid query parameter."""
    return HTTPError(ErrorCode.UNSUPPORTED, 400, message, detail)


def repeated_parameter(name: str, values: list[str]) -> HTTPError:
    """Build the 400 UNSUPPORTED error for a query parameter that takes one
    value but is given several, naming every value in order."""
    quoted = ", ".join(repr(value) for value in values)
    return unsupported(
        f"{name} may be given once, but the request gives it {len(values)} "
        f"times: {quoted}",
        parameter=name,
        values=values,
    )
