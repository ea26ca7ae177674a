"""Manifest media types: parsing, validation and the references they carry.

One class per media type. Every class keeps the bytes exactly as the client
sent them, because the manifest's digest is the digest of those bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from engine.domain.digest import Digest
from engine.domain.errors import (
    DigestInvalid,
    ManifestInvalid,
    ManifestTooLarge,
    ManifestUnsupported,
)

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST: Final = (
    "application/vnd.docker.distribution.manifest.list.v2+json"
)
DOCKER_SCHEMA1: Final = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
OCI_EMPTY: Final = "application/vnd.oci.empty.v1+json"

# Layers that clients fetch from their `urls`, never from the registry, so a
# manifest may reference them without the registry holding the bytes.
FOREIGN_LAYER_TYPES: Final = frozenset(
    {
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    }
)

MANIFEST_MEDIA_TYPES: Final = frozenset(
    {OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST}
)

# Sizes must fit a signed 64-bit integer, the widest column SQL offers.
MAX_SIZE: Final = 2**63 - 1

# JSON nested deeper than this is rejected, counting the body as level 1.
# Real manifests nest about 4 levels.
MAX_NESTING: Final = 64

# Top-level fields that only an image manifest has, and those that only an
# index has. A document with both could be read as either kind, so that one
# digest has two meanings (CVE-2021-41190). Each kind therefore rejects the
# other's fields. Distribution v2.8.0 does so for the two OCI types, and
# cairn applies the same rule to the Docker manifest and manifest list.
IMAGE_MANIFEST_FIELDS: Final = ("config", "layers")
INDEX_FIELDS: Final = ("manifests",)

# A PUT may also name no particular type, leaving it to the body's mediaType.
_ACCEPTED_CONTENT_TYPES: Final = (
    MANIFEST_MEDIA_TYPES
    | DOCKER_SCHEMA1
    | {
        "application/json",
        "application/octet-stream",
    }
)

# Manifests larger than this are rejected; Distribution and most registries
# use the same 4 MiB limit.
MAX_MANIFEST_SIZE: Final = 4 * 1024 * 1024

# RFC 6838 section 4.2, as the OCI image spec's descriptor definition cites it.
_MEDIA_TYPE: Final = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A reference to content by media type, digest and size."""

    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] | None = None
    artifact_type: str | None = None
    platform: Mapping[str, Any] | None = None
    urls: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Return the descriptor in its OCI JSON form."""
        body: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.artifact_type is not None:
            body["artifactType"] = self.artifact_type
        if self.annotations:
            body["annotations"] = dict(self.annotations)
        if self.platform is not None:
            body["platform"] = dict(self.platform)
        if self.urls:
            body["urls"] = list(self.urls)
        return body


@dataclass(frozen=True, slots=True)
class Reference:
    """One thing a manifest points at. ``kind`` is config, layer, manifest or
    subject, and ``required`` is whether the repository must contain it."""

    kind: str
    descriptor: Descriptor
    required: bool = True


class Manifest(ABC):
    """A parsed, validated manifest of one media type."""

    media_type: ClassVar[str]
    # Top-level fields of the other kind, which this media type rejects.
    foreign_fields: ClassVar[tuple[str, ...]]
    foreign_kind: ClassVar[str]

    def __init__(self, raw: bytes, body: dict[str, Any], digest: Digest) -> None:
        self.raw = raw
        self.body = body
        self.digest = digest
        self.subject = _optional_descriptor(body, "subject")
        self.annotations = _annotations(body.get("annotations"), "annotations")

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    @abstractmethod
    def artifact_type(self) -> str | None:
        """Return the artifact type the referrers API lists for this manifest."""

    @abstractmethod
    def references(self) -> list[Reference]:
        """List every descriptor this manifest points at, subject included."""

    def descriptor(self) -> Descriptor:
        """Return the descriptor a referrers listing shows for this manifest."""
        return Descriptor(
            media_type=self.media_type,
            digest=self.digest,
            size=self.size,
            annotations=self.annotations,
            artifact_type=self.artifact_type,
        )

    def _subject_references(self) -> list[Reference]:
        if self.subject is None:
            return []
        return [Reference("subject", self.subject, required=False)]

    @classmethod
    def reject_foreign_fields(cls, body: Mapping[str, Any]) -> None:
        """Raise ManifestInvalid if ``body`` has a top-level field of the
        other kind."""
        # The field is rejected whatever its value, because a reader that
        # checks for the key treats the document as an index even when the
        # list is empty or null.
        for name in cls.foreign_fields:
            if name in body:
                raise ManifestInvalid(
                    f"{name} is a field of an {cls.foreign_kind} and is not "
                    f"allowed in a manifest of type {cls.media_type}",
                    {"field": name, "mediaType": cls.media_type},
                )


class ImageManifest(Manifest):
    """OCI image manifest; also artifacts, which set artifactType or use the
    empty config."""

    media_type = OCI_MANIFEST
    foreign_fields = INDEX_FIELDS
    foreign_kind = "index"

    def __init__(self, raw: bytes, body: dict[str, Any], digest: Digest) -> None:
        super().__init__(raw, body, digest)
        _require_schema_version(body)
        self.config = _descriptor(_require(body, "config"), "config")
        self.layers = _descriptor_list(body, "layers")
        self._artifact_type = _optional_media_type(body, "artifactType")
        if self.config.media_type == OCI_EMPTY and self._artifact_type is None:
            raise ManifestInvalid(
                "artifactType is required when the config is the empty descriptor",
                {"config.mediaType": self.config.media_type},
            )

    @property
    def artifact_type(self) -> str | None:
        return self._artifact_type or self.config.media_type

    def references(self) -> list[Reference]:
        refs = [Reference("config", self.config)]
        for layer in self.layers:
            foreign = layer.media_type in FOREIGN_LAYER_TYPES and bool(layer.urls)
            refs.append(Reference("layer", layer, required=not foreign))
        return refs + self._subject_references()


class DockerManifest(ImageManifest):
    """Docker image manifest, schema 2."""

    media_type = DOCKER_MANIFEST


class ImageIndex(Manifest):
    """OCI image index: a list of manifests, possibly of other indexes."""

    media_type = OCI_INDEX
    foreign_fields = IMAGE_MANIFEST_FIELDS
    foreign_kind = "image manifest"

    def __init__(self, raw: bytes, body: dict[str, Any], digest: Digest) -> None:
        super().__init__(raw, body, digest)
        _require_schema_version(body)
        self.manifests = _descriptor_list(body, "manifests")
        self._artifact_type = _optional_media_type(body, "artifactType")

    @property
    def artifact_type(self) -> str | None:
        return self._artifact_type

    def references(self) -> list[Reference]:
        refs = [Reference("manifest", child) for child in self.manifests]
        return refs + self._subject_references()


class DockerManifestList(ImageIndex):
    """Docker manifest list, the schema 2 multi-platform form."""

    media_type = DOCKER_MANIFEST_LIST


_CLASSES: Final[dict[str, type[Manifest]]] = {
    cls.media_type: cls
    for cls in (ImageManifest, DockerManifest, ImageIndex, DockerManifestList)
}


def parse_manifest(
    raw: bytes, content_type: str | None = None, algorithm: str = "sha256"
) -> Manifest:
    """Parse and validate manifest bytes.

    The media type comes from the body's ``mediaType``, when the body has
    none from ``content_type``, and without either from the body's fields.
    A ``mediaType`` and a manifest ``content_type`` must agree. The media
    type settles whether the document is an image manifest or an index. A
    body that also carries a top-level field of the other kind, or any
    object with a repeated key, is rejected. Raises ManifestInvalid
    (or ManifestUnsupported for Docker schema 1) naming the offending field,
    and ManifestTooLarge above MAX_MANIFEST_SIZE.
    """
    return _parse(raw, content_type, algorithm, strict=True)


def parse_stored_manifest(
    raw: bytes, media_type: str | None, algorithm: str = "sha256"
) -> Manifest:
    """Parse manifest bytes that a registry already stored as ``media_type``,
    to read the references they carry.

    Earlier cairn versions stored manifests that parse_manifest now rejects
    because clients could read them in two ways. This parse skips those
    checks, so it reads such a manifest the way those versions did when
    they stored it. A repeated key keeps its last value, as json.loads
    keeps it. A key that differs from a field name only in letter case is
    an unknown key. NaN and Infinity are floats. Top-level fields of the
    other kind are ignored, so the media type alone decides the kind. A
    Docker body without ``mediaType`` takes ``media_type``, and nesting is
    limited only by the parser. Every other check of parse_manifest
    applies and raises the same errors.

    Use it only for bytes that are already stored, never for a push.
    """
    return _parse(raw, media_type, algorithm, strict=False)


def _parse(
    raw: bytes, content_type: str | None, algorithm: str, *, strict: bool
) -> Manifest:
    """Parse ``raw``. With ``strict`` false, skip the checks that
    parse_stored_manifest lists."""
    if len(raw) > MAX_MANIFEST_SIZE:
        raise ManifestTooLarge(
            f"manifest is larger than {MAX_MANIFEST_SIZE} bytes",
            {"size": len(raw), "limit": MAX_MANIFEST_SIZE},
        )
    body = _decode_json(raw, strict=strict)
    media_type = _resolve_media_type(
        body, _bare_media_type(content_type), strict=strict
    )
    cls = _CLASSES[media_type]
    if strict:
        cls.reject_foreign_fields(body)
    manifest = cls(raw, body, Digest.of(raw, algorithm))
    if strict:
        _check_urls(manifest)
    return manifest


# An absolute URI of RFC 3986: a scheme, ":" and URI characters only, with
# no space or control character.
_ABSOLUTE_URI: Final = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*"
)


# An http or https URL with a host, in any letter case of the scheme, as
# RFC 3986 makes schemes case-insensitive.
_HTTP_URL: Final = re.compile(r"(?i:https?)://[^/?#]+")


def _check_urls(manifest: Manifest) -> None:
    """Reject a descriptor URL that is not an absolute http or https URL.

    The OCI image specification requires each entry of urls to conform to
    RFC 3986, and recommends (SHOULD) the http and https schemes.
    A foreign layer with urls is stored without its blob, so an entry such
    as "" or "/layer" would let a manifest reference a layer that no client
    can fetch. An entry such as "file:///etc/passwd" would send clients
    that follow it to their own files or to other protocols.
    """
    named: list[tuple[str, Descriptor]] = []
    if isinstance(manifest, ImageManifest):
        named.append(("config", manifest.config))
        named.extend((f"layers[{i}]", layer) for i, layer in enumerate(manifest.layers))
    if isinstance(manifest, ImageIndex):
        named.extend(
            (f"manifests[{i}]", child) for i, child in enumerate(manifest.manifests)
        )
    if manifest.subject is not None:
        named.append(("subject", manifest.subject))
    for where, descriptor in named:
        for i, url in enumerate(descriptor.urls):
            if _ABSOLUTE_URI.fullmatch(url) is None:
                raise ManifestInvalid(
                    f"{where}.urls[{i}] is not an absolute URI",
                    {"field": f"{where}.urls[{i}]", "url": url},
                )
            if _HTTP_URL.match(url) is None:
                raise ManifestInvalid(
                    f"{where}.urls[{i}] is not an http or https URL with a host",
                    {"field": f"{where}.urls[{i}]", "url": url},
                )


def _decode_json(raw: bytes, *, strict: bool) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestInvalid("manifest is not UTF-8", {"offset": exc.start}) from None
    # Leading brackets are counted before parsing, so that a long run of
    # them costs no parser work.
    if len(text) - len(text.lstrip("[{")) > MAX_NESTING:
        raise _too_deep()
    try:
        body = json.loads(
            text,
            object_pairs_hook=_unique_keys if strict else None,
            parse_float=_finite_float if strict else _bounded_float,
            parse_int=_bounded_int,
            parse_constant=_reject_constant if strict else None,
        )
    except _NotJson as exc:
        raise ManifestInvalid(
            "manifest is not valid JSON",
            {"error": f"{exc.args[0]} is not a JSON value"},
        ) from None
    except json.JSONDecodeError as exc:
        raise ManifestInvalid(
            "manifest is not valid JSON",
            {"error": exc.msg, "line": exc.lineno, "column": exc.colno},
        ) from None
    except RecursionError:
        # The parser raises this near Python's recursion limit, which is far
        # deeper than MAX_NESTING.
        raise _too_deep() from None
    except _DuplicateKey as exc:
        raise ManifestInvalid(
            f"manifest repeats the key {exc.args[0]!r} in one object, which JSON "
            "parsers read differently",
            {"key": exc.args[0]},
        ) from None
    except _NumberOutOfRange as exc:
        raise ManifestInvalid(
            "manifest contains a number outside the signed 64-bit range",
            {"number": exc.args[0]},
        ) from None
    except _FloatOverflow as exc:
        raise ManifestInvalid(
            "manifest contains a number too large for a 64-bit float, which "
            "JSON parsers read as infinity or reject",
            {"number": exc.args[0]},
        ) from None
    if not isinstance(body, dict):
        raise ManifestInvalid(
            "manifest must be a JSON object", {"type": type(body).__name__}
        )
    _check_values(body, MAX_NESTING if strict else None)
    if strict:
        _check_field_spelling(body)
    return body


def _too_deep() -> ManifestInvalid:
    return ManifestInvalid(
        f"manifest nests deeper than {MAX_NESTING} levels", {"limit": MAX_NESTING}
    )


class _NumberOutOfRange(ValueError):
    pass


class _NotJson(ValueError):
    pass


class _FloatOverflow(ValueError):
    pass


def _reject_constant(literal: str) -> Any:
    # Python's parser accepts NaN, Infinity and -Infinity, which RFC 8259
    # JSON does not have, so Go's and most other clients fail on them.
    raise _NotJson(literal)


# Every field name of the OCI image manifest, image index and descriptor and
# of their Docker schema 2 counterparts.
_FIELD_NAMES: Final = frozenset(
    {
        "schemaVersion",
        "mediaType",
        "artifactType",
        "config",
        "layers",
        "manifests",
        "subject",
        "annotations",
        "digest",
        "size",
        "urls",
        "data",
        "platform",
        "architecture",
        "os",
        "os.version",
        "os.features",
        "variant",
        "features",
    }
)
_FIELDS_BY_FOLDED_NAME: Final = {name.casefold(): name for name in _FIELD_NAMES}


def _check_field_spelling(body: dict[str, Any]) -> None:
    """Reject a key that differs from a field name only in letter case.

    Go's encoding/json, which docker, containerd, podman and skopeo use,
    matches keys to struct fields without regard to case, so such a key is
    read as the field there while cairn's checks ignore it. Keys of
    ``annotations`` are kept as written by every parser and are not checked.
    """
    pending: list[Any] = [body]
    while pending:
        value = pending.pop()
        if isinstance(value, list):
            pending.extend(value)
            continue
        if not isinstance(value, dict):
            continue
        for key, item in value.items():
            field = _FIELDS_BY_FOLDED_NAME.get(key.casefold())
            if field is not None and key != field:
                raise ManifestInvalid(
                    f"manifest key {key[:100]!r} differs from the field {field!r} "
                    "only in letter case, which Go clients read as that field",
                    {"key": key[:100], "field": field},
                )
            if key != "annotations":
                pending.append(item)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of duplicate keys, but RFC 8259 leaves the
    # outcome to each parser, so a document with them can mean two things.
    body = dict(pairs)
    if len(body) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key[:100])
            seen.add(key)
    return body


def _bounded_int(literal: str) -> int:
    # Checked on the literal, before int() meets a number too long to convert.
    digits = literal.lstrip("-")
    if len(digits) > 19 or int(literal) > MAX_SIZE or int(literal) < -MAX_SIZE - 1:
        raise _NumberOutOfRange(literal[:40])
    return int(literal)


def _bounded_float(literal: str) -> float:
    # Floats are legal JSON but no manifest field is fractional; they are
    # kept as floats so that type checks reject them where an int belongs.
    if len(literal) > 40:
        raise _NumberOutOfRange(literal[:40])
    return float(literal)


def _finite_float(literal: str) -> float:
    # A literal such as 1e999 overflows a double. Python reads it as
    # infinity, which an event payload would carry as the non-JSON literal
    # Infinity, and Go's strconv.ParseFloat returns a range error for it.
    value = _bounded_float(literal)
    if math.isinf(value):
        raise _FloatOverflow(literal)
    return value


def _check_values(body: dict[str, Any], max_nesting: int | None) -> None:
    """Reject nesting deeper than ``max_nesting`` (None for no limit) and
    strings that cannot be stored: lone UTF-16 surrogates, which have no
    UTF-8 encoding, and NUL, which PostgreSQL's JSON cannot hold."""
    level: list[Any] = [body]
    depth = 1
    while level:
        too_deep = max_nesting is not None and depth > max_nesting
        deeper: list[Any] = []
        for value in level:
            if isinstance(value, dict):
                if too_deep:
                    raise _too_deep()
                for key in value:
                    _check_string(key)
                deeper.extend(value.values())
            elif isinstance(value, list):
                if too_deep:
                    raise _too_deep()
                deeper.extend(value)
            elif isinstance(value, str):
                _check_string(value)
        level = deeper
        depth += 1


def _check_string(value: str) -> None:
    if "\x00" in value:
        raise ManifestInvalid(
            "manifest contains a NUL character", {"string": value[:100]}
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ManifestInvalid(
            "manifest contains a lone UTF-16 surrogate, which is not a character",
            {"escape": f"\\u{ord(value[exc.start]):04x}"},
        ) from None


def _bare_media_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    # Media types are case-insensitive (RFC 6838 section 4.2), and Go's
    # mime.ParseMediaType, which Distribution uses, lowercases them too.
    bare = content_type.split(";", 1)[0].strip().lower()
    return bare or None


def _resolve_media_type(
    body: dict[str, Any], content_type: str | None, *, strict: bool
) -> str:
    declared = body.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid("mediaType must be a string", {"mediaType": declared})
    version = body.get("schemaVersion")
    schema1 = type(version) is int and version == 1
    if schema1 or (declared or content_type) in DOCKER_SCHEMA1:
        detail = (
            {"schemaVersion": version}
            if schema1
            else {"mediaType": declared or content_type}
        )
        raise ManifestUnsupported(
            "Docker schema 1 manifests are not supported; push the image as "
            "Docker schema 2 or OCI",
            detail,
        )
    if content_type is not None and content_type not in _ACCEPTED_CONTENT_TYPES:
        raise ManifestInvalid(
            "Content-Type is not a manifest media type",
            {"contentType": content_type, "supported": sorted(MANIFEST_MEDIA_TYPES)},
        )
    if declared is not None:
        if declared not in MANIFEST_MEDIA_TYPES:
            raise ManifestInvalid(
                "unsupported manifest media type",
                {"mediaType": declared, "supported": sorted(MANIFEST_MEDIA_TYPES)},
            )
        # A generic JSON Content-Type leaves the type to the body, but one
        # that names a manifest type, Docker schema 1 included, must agree.
        named_type = content_type in MANIFEST_MEDIA_TYPES | DOCKER_SCHEMA1
        if named_type and content_type != declared:
            raise ManifestInvalid(
                "manifest mediaType does not match the Content-Type header",
                {"mediaType": declared, "contentType": content_type},
            )
        return declared
    if strict and content_type in (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST):
        # Docker's and Distribution's parsers reject a schema 2 manifest or
        # list whose body does not name its mediaType; only OCI makes the
        # field optional.
        raise ManifestInvalid(
            "a Docker manifest must name its mediaType in the body",
            {"field": "mediaType", "contentType": content_type},
        )
    if content_type in MANIFEST_MEDIA_TYPES:
        return content_type
    # The OCI image spec lets mediaType be omitted; fall back to its shape.
    # A body with the fields of both kinds resolves to an image manifest,
    # which then rejects the index's fields.
    if any(name in body for name in IMAGE_MANIFEST_FIELDS):
        return OCI_MANIFEST
    if any(name in body for name in INDEX_FIELDS):
        return OCI_INDEX
    raise ManifestInvalid(
        "cannot tell the manifest type: set mediaType in the body or the "
        "Content-Type header",
        {"contentType": content_type},
    )


def _require(body: Mapping[str, Any], key: str) -> Any:
    if key not in body:
        raise ManifestInvalid(f"manifest field {key} is missing", {"field": key})
    return body[key]


def _require_schema_version(body: Mapping[str, Any]) -> None:
    version = body.get("schemaVersion")
    # type() rather than isinstance: True and 2.0 compare equal to ints.
    if type(version) is not int or version != 2:
        raise ManifestInvalid("schemaVersion must be 2", {"schemaVersion": version})


def is_media_type(value: str) -> bool:
    """Return whether ``value`` has the form that a manifest's mediaType,
    artifactType and descriptor media types must have."""
    return _MEDIA_TYPE.fullmatch(value) is not None


def _optional_media_type(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not _MEDIA_TYPE.fullmatch(value):
        raise ManifestInvalid(f"{key} is not a valid media type", {key: value})
    return value


def _optional_descriptor(body: Mapping[str, Any], key: str) -> Descriptor | None:
    value = body.get(key)
    return None if value is None else _descriptor(value, key)


def _descriptor_list(body: Mapping[str, Any], key: str) -> tuple[Descriptor, ...]:
    value = _require(body, key)
    if not isinstance(value, list):
        raise ManifestInvalid(f"{key} must be an array", {"field": key})
    return tuple(_descriptor(item, f"{key}[{i}]") for i, item in enumerate(value))


def _annotations(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ManifestInvalid(f"{where} must map strings to strings", {"field": where})
    return value


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise ManifestInvalid(f"{where} must be a descriptor object", {"field": where})

    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not _MEDIA_TYPE.fullmatch(media_type):
        raise ManifestInvalid(
            f"{where}.mediaType is missing or not a valid media type",
            {"field": f"{where}.mediaType", "mediaType": media_type},
        )

    try:
        digest = Digest.parse(value.get("digest"))  # type: ignore[arg-type]
    except DigestInvalid:
        raise ManifestInvalid(
            f"{where}.digest is missing or invalid",
            {"field": f"{where}.digest", "digest": value.get("digest")},
        ) from None

    size = value.get("size")
    if type(size) is not int or not 0 <= size <= MAX_SIZE:
        raise ManifestInvalid(
            f"{where}.size must be an integer from 0 to {MAX_SIZE}",
            {"field": f"{where}.size", "size": size},
        )

    _check_embedded_data(value, where, digest, size)

    urls = value.get("urls", [])
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ManifestInvalid(
            f"{where}.urls must be an array of strings", {"field": f"{where}.urls"}
        )

    platform = value.get("platform")
    if platform is not None and not (
        isinstance(platform, dict)
        and isinstance(platform.get("architecture"), str)
        and isinstance(platform.get("os"), str)
    ):
        raise ManifestInvalid(
            f"{where}.platform needs architecture and os strings",
            {"field": f"{where}.platform", "platform": platform},
        )

    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        annotations=_annotations(value.get("annotations"), f"{where}.annotations"),
        artifact_type=_optional_media_type(value, "artifactType"),
        platform=platform,
        urls=tuple(urls),
    )


def _check_embedded_data(
    value: Mapping[str, Any], where: str, digest: Digest, size: int
) -> None:
    data = value.get("data")
    if data is None:
        return
    try:
        decoded = (
            base64.b64decode(data, validate=True) if isinstance(data, str) else None
        )
    except (binascii.Error, ValueError):
        decoded = None
    if decoded is None:
        raise ManifestInvalid(f"{where}.data is not base64", {"field": f"{where}.data"})
    if len(decoded) != size or Digest.of(decoded, digest.algorithm) != digest:
        raise ManifestInvalid(
            f"{where}.data does not match the descriptor's size and digest",
            {"field": f"{where}.data", "digest": str(digest), "size": size},
        )
