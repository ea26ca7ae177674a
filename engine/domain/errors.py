"""Domain exceptions.

Each carries the offending value in ``detail`` so the HTTP layer can map the
exception class to an OCI error code in one table and still tell the client
what was wrong.
"""

from __future__ import annotations

from typing import Any


class RegistryError(Exception):
    """Base of every error that a client request can cause."""

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class NameInvalid(RegistryError):
    pass


class NameUnknown(RegistryError):
    pass


class TagInvalid(RegistryError):
    pass


class DigestInvalid(RegistryError):
    pass


class DigestMismatch(DigestInvalid):
    """Content whose digest differs from the one the client declared."""


class UnsupportedDigestAlgorithm(DigestInvalid):
    pass


class BlobUnknown(RegistryError):
    pass


class BlobUploadUnknown(RegistryError):
    pass


class BlobCollected(BlobUploadUnknown):
    """An upload whose blob file garbage collection removed after the upload
    stored it and before the repository linked it. Nothing was linked, and
    the client must push the blob again."""


class BlobUploadInvalid(RegistryError):
    pass


class RangeInvalid(BlobUploadInvalid):
    """A chunk that does not start at the upload's current offset."""

    def __init__(self, message: str, detail: Any = None, offset: int = 0) -> None:
        super().__init__(message, detail)
        self.offset = offset


class RangeNotSatisfiable(RegistryError):
    """A read range that lies outside the blob."""

    def __init__(self, message: str, detail: Any = None, size: int = 0) -> None:
        super().__init__(message, detail)
        self.size = size


class SizeInvalid(RegistryError):
    pass


class ManifestInvalid(RegistryError):
    pass


class ManifestTooLarge(SizeInvalid):
    pass


class BlobTooLarge(SizeInvalid):
    """A blob upload that declares or sends more bytes than the maximum blob
    size allows."""


class InsufficientStorage(RegistryError):
    """A write that failed because the disk or the quota of the data
    directory or of the database is full. The request itself was valid, and
    the same request can succeed once space is freed."""


class ManifestUnsupported(ManifestInvalid):
    """A manifest format cairn does not store, such as Docker schema 1."""


class ManifestUnknown(RegistryError):
    pass


class ManifestBlobUnknown(RegistryError):
    """A manifest that references a blob or manifest absent from the repository."""


class ReferrersFilterInvalid(RegistryError):
    pass


class Unsupported(RegistryError):
    pass


class ConcurrencyConflict(RegistryError):
    """An append whose expected repository version is no longer current."""


class PreconditionFailed(RegistryError):
    """A request whose If-Match or If-None-Match is false for the manifest
    that its reference names when the request runs."""
