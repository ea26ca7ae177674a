"""The maximum blob size, and the BlobTooLarge errors for blobs over it.

A limit of None allows blobs of any size. One check takes a size known
before the body arrives, from Content-Length, Content-Range or the bytes an
upload already contains. The other takes the bytes received so far, for a
body whose length was not declared.

Every SIZE_INVALID detail for a body over a limit contains integers only.
``limit`` is the maximum in bytes. ``size`` is the blob's size when it is
known before the body is read, and otherwise ``received`` is the number of
bytes received when the check failed. The manifest limit in
``engine.api.body`` uses the same keys.
"""

from __future__ import annotations

from engine.domain.errors import BlobTooLarge


def check_declared_size(size: int, limit: int | None, source: str) -> None:
    """Raise BlobTooLarge when ``size`` bytes, as ``source`` declares the
    blob's size, exceed ``limit``."""
    if limit is not None and size > limit:
        raise BlobTooLarge(
            f"blob of {size} bytes, according to {source}, exceeds the "
            f"maximum blob size of {limit} bytes",
            {"size": size, "limit": limit},
        )


def check_received_size(received: int, limit: int | None) -> None:
    """Raise BlobTooLarge once the ``received`` bytes of a blob, whose whole
    size is unknown, exceed ``limit``."""
    if limit is not None and received > limit:
        raise BlobTooLarge(
            f"blob is larger than the maximum blob size of {limit} bytes: "
            f"{received} bytes received",
            {"received": received, "limit": limit},
        )
