"""Content digests as the OCI image specification defines them.

A digest is ``algorithm ":" encoded``. cairn accepts the two registered
algorithms, sha256 (64 lowercase hex characters) and sha512 (128).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from engine.domain.errors import (
    DigestInvalid,
    DigestMismatch,
    UnsupportedDigestAlgorithm,
)

# The general grammar from the OCI image spec, checked before the
# algorithm-specific rules so that a malformed value gets a precise message.
_DIGEST_GRAMMAR: Final = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_ENCODED_LENGTH: Final = {"sha256": 64, "sha512": 128}
_HEX: Final = re.compile(r"[a-f0-9]+")


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    """A validated digest; ``str(digest)`` is its canonical form."""

    algorithm: str
    encoded: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"

    @classmethod
    def parse(cls, value: str) -> Digest:
        """Parse and validate ``value``, raising DigestInvalid naming it."""
        if not isinstance(value, str) or not _DIGEST_GRAMMAR.fullmatch(value):
            raise DigestInvalid("invalid digest", {"digest": value})
        algorithm, encoded = value.split(":", 1)
        expected_length = _ENCODED_LENGTH.get(algorithm)
        if expected_length is None:
            raise UnsupportedDigestAlgorithm(
                "unsupported digest algorithm",
                {"digest": value, "supported": sorted(_ENCODED_LENGTH)},
            )
        if len(encoded) != expected_length or not _HEX.fullmatch(encoded):
            raise DigestInvalid(
                f"invalid {algorithm} digest: expected {expected_length} "
                "lowercase hex characters",
                {"digest": value},
            )
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """Compute the digest of ``data``."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def supported_algorithms() -> tuple[str, ...]:
    return tuple(_ENCODED_LENGTH)


class DigestVerifier:
    """Hash a stream incrementally and compare it with an expected digest."""

    def __init__(self, algorithm: str = "sha256") -> None:
        if algorithm not in _ENCODED_LENGTH:
            raise UnsupportedDigestAlgorithm(
                "unsupported digest algorithm", {"algorithm": algorithm}
            )
        self.algorithm = algorithm
        self._hash = hashlib.new(algorithm)
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)
        self.size += len(data)

    def digest(self) -> Digest:
        return Digest(self.algorithm, self._hash.hexdigest())

    def verify(self, expected: Digest) -> None:
        """Raise DigestMismatch unless the bytes so far hash to ``expected``."""
        actual = self.digest()
        if actual != expected:
            raise DigestMismatch(
                "content does not match digest",
                {"expected": str(expected), "actual": str(actual)},
            )
