"""NATS subjects for events and pulls, with a reversible repository encoding.

An event of type ``manifest.pushed`` in repository ``library/alpine`` is
published on ``<prefix>.manifest.pushed.library.alpine``: the prefix (default
``cairn``), the two tokens of the event type, then one token per repository
path component. Subscribers filter by type (``cairn.tag.>``) or by namespace
(``cairn.*.*.library.>``). Pulls go to ``<prefix>.pull.<repository tokens>``.

Repository encoding
-------------------

Each path component (the text between two ``/``) becomes one subject token.
Inside a component, the ASCII bytes ``a``-``z``, ``0``-``9`` and ``-`` stay as
they are. Every other byte of the component's UTF-8 encoding becomes ``_``
followed by two uppercase hexadecimal digits, so that

- ``.`` becomes ``_2E``, ``_`` becomes ``_5F`` and ``__`` becomes ``_5F_5F``;
- ``*`` (``_2A``), ``>`` (``_3E``), ``$`` (``_24``), whitespace and any
  uppercase or non-ASCII character are escaped the same way.

``library/alpine`` encodes to ``library.alpine`` and ``my.org/web_app`` to
``my_2Eorg.web_5Fapp``. Encoded tokens contain only ``A``-``Z``, ``a``-``z``,
``0``-``9``, ``-`` and ``_``, the "restricted-term" characters of the NATS
naming conventions (NATS architecture decision record ADR-6). So a token
never contains a separator or wildcard, and never starts with the ``$`` that
NATS reserves for system subjects. Decoding reverses the mapping exactly and
accepts only the canonical form. A name with an empty path component cannot
be encoded, because NATS tokens are never empty; valid repository names have
none.

The module also checks the subject prefix and the stream name that an
operator chooses.
"""

from __future__ import annotations

import re
from typing import Final

from engine.domain.errors import NameInvalid
from engine.domain.events import EventType
from engine.domain.names import validate_repository_name

PULL_TOKEN: Final = "pull"

# The first token of every event type ("blob", "manifest", "tag"). The stream
# captures ``<prefix>.<family>.>`` for each, and not ``<prefix>.>``, so that
# core NATS pull notifications on ``<prefix>.pull.>`` are never stored in it.
EVENT_FAMILIES: Final = tuple(sorted({str(t).split(".")[0] for t in EventType}))

_KEPT: Final = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-")
_ESCAPE: Final = ord("_")
_HEX: Final = "0123456789ABCDEF"
_TOKEN: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_PREFIX_TOKEN: Final = re.compile(r"^[^\s.*>]+$")

# NATS naming conventions for streams: no whitespace, '.', '*', '>', or path
# separators, and short enough to be a directory name on any file system.
_STREAM_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def encode_component(component: str) -> str:
    """Encode one repository path component as a subject token."""
    if not component:
        raise ValueError("cannot encode an empty repository path component")
    if "/" in component:
        raise ValueError(f"path component {component!r} contains '/'")
    token = []
    for byte in component.encode("utf-8"):
        if byte in _KEPT:
            token.append(chr(byte))
        else:
            token.append("_" + _HEX[byte >> 4] + _HEX[byte & 0x0F])
    return "".join(token)


def decode_component(token: str) -> str:
    """Decode one subject token back into a repository path component."""
    if not _TOKEN.match(token):
        raise ValueError(f"invalid repository token {token!r}")
    raw = token.encode("ascii")
    decoded = bytearray()
    index = 0
    while index < len(raw):
        byte = raw[index]
        if byte in _KEPT:
            decoded.append(byte)
            index += 1
            continue
        escape = raw[index + 1 : index + 3].decode("ascii")
        if byte != _ESCAPE or len(escape) != 2 or not set(escape) <= set(_HEX):
            raise ValueError(
                f"invalid escape at offset {index} in repository token {token!r}"
            )
        value = int(escape, 16)
        # An escaped byte that encoding keeps as itself would give a second
        # subject for the same name, so only the canonical form decodes.
        if value in _KEPT:
            raise ValueError(
                f"non-canonical escape _{escape} in repository token {token!r}"
            )
        decoded.append(value)
        index += 3
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"repository token {token!r} does not decode to UTF-8"
        ) from error


def encode_repository(repository: str) -> str:
    """Encode a repository name as dot-separated subject tokens."""
    return ".".join(encode_component(part) for part in repository.split("/"))


def decode_repository(tokens: str) -> str:
    """Decode the repository tokens of a subject into the repository name."""
    return "/".join(decode_component(token) for token in tokens.split("."))


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` unchanged if it can start a subject, else raise."""
    tokens = prefix.split(".")
    if not prefix or not all(_PREFIX_TOKEN.match(token) for token in tokens):
        raise ValueError(
            f"invalid subject prefix {prefix!r}: expected one or more tokens "
            "separated by '.', without whitespace, '*' or '>', e.g. cairn"
        )
    return prefix


def validate_stream_name(name: str) -> None:
    """Raise ValueError unless ``name`` can name cairn's JetStream stream."""
    if not _STREAM_NAME.match(name):
        raise ValueError(
            f"invalid stream name {name!r}: use 1 to 32 letters, digits, '-' or '_'"
        )


def event_subject(prefix: str, event_type: str, repository: str) -> str:
    """Return the subject an event of ``event_type`` in ``repository`` goes to."""
    return f"{prefix}.{EventType(event_type)}.{encode_repository(repository)}"


def pull_subject(prefix: str, repository: str) -> str:
    return f"{prefix}.{PULL_TOKEN}.{encode_repository(repository)}"


def parse_event_subject(prefix: str, subject: str) -> tuple[EventType, str]:
    """Split an event subject into its event type and repository name."""
    head = prefix + "."
    if not subject.startswith(head):
        raise ValueError(f"subject {subject!r} does not start with {head!r}")
    family, action, *repository = subject.removeprefix(head).split(".")
    if not repository:
        raise ValueError(f"subject {subject!r} has no repository tokens")
    return EventType(f"{family}.{action}"), decode_repository(".".join(repository))


def stream_subjects(prefix: str) -> list[str]:
    """List the subjects the event stream captures: one per event family."""
    return [f"{prefix}.{family}.>" for family in EVENT_FAMILIES]


def subject_within(subject: str, pattern: str) -> bool:
    """Tell whether every subject that ``subject`` matches also matches ``pattern``.

    Both may contain the wildcards ``*`` (one token) and ``>`` (one or more
    trailing tokens). A subject without wildcards is within ``pattern``
    exactly when ``pattern`` matches it.
    """
    tokens = subject.split(".")
    pattern_tokens = pattern.split(".")
    for index, pattern_token in enumerate(pattern_tokens):
        if pattern_token == ">":
            return len(tokens) > index
        if index >= len(tokens):
            return False
        token = tokens[index]
        if token == ">":
            return False
        if pattern_token != "*" and token != pattern_token:
            return False
    return len(tokens) == len(pattern_tokens)


def subjects_overlap(first: str, second: str) -> bool:
    """Tell whether some subject without wildcards matches both patterns.

    Both may contain the wildcards ``*`` (one token) and ``>`` (one or more
    trailing tokens).
    """
    first_tokens = first.split(".")
    second_tokens = second.split(".")
    for first_token, second_token in zip(first_tokens, second_tokens, strict=False):
        if ">" in (first_token, second_token):
            return True
        if first_token != second_token and "*" not in (first_token, second_token):
            return False
    return len(first_tokens) == len(second_tokens)


def unstored_subject_error(
    stream: str,
    stream_subjects: list[str],
    subject: str,
    prefix: str,
    prefix_option: str = "--subject-prefix",
) -> str | None:
    """Describe why stream ``stream`` stores no message that ``subject`` matches.

    Returns None when one of ``stream_subjects`` overlaps ``subject``, and
    also for a stream without subjects, such as a mirror of another stream,
    whose messages may have any subject. The message names ``prefix`` when
    no subject under it is stored, and then ends with a hint to set
    ``prefix_option``, the option or setting that chose it. Else it names
    the whole filter.
    """
    if not stream_subjects:
        return None
    if any(subjects_overlap(subject, pattern) for pattern in stream_subjects):
        return None
    stored = ", ".join(stream_subjects)
    if not any(subjects_overlap(f"{prefix}.>", p) for p in stream_subjects):
        return (
            f"stream {stream} stores no subject under the subject prefix "
            f"{prefix!r}, only {stored}; set {prefix_option} to the subject "
            "prefix of the cairn serve that publishes to it"
        )
    return f"stream {stream} stores no subject that matches {subject}, only {stored}"


def filter_subject(
    prefix: str, event_type: str | None = None, repository: str | None = None
) -> str:
    """Build a subject filter for events of a type and of a repository.

    ``event_type`` is a full type (``tag.set``) or a family (``tag``).
    ``repository`` is a name (``library/alpine``), or a namespace ending in
    ``/`` (``library/``) that matches every repository below it.

    With neither, the filter is ``<prefix>.>``, which also matches the pull
    subjects that the stream does not store. NATS 2.9 accepts it as a
    consumer filter because it contains the stream's subjects, and rejects
    ``<prefix>.*.*.>`` (error 10093), which neither contains one of them nor
    lies within one.
    """
    if event_type is None and repository is None:
        return f"{prefix}.>"
    if event_type is None:
        type_tokens = "*.*"
    elif event_type in EVENT_FAMILIES:
        type_tokens = f"{event_type}.*"
    else:
        try:
            type_tokens = str(EventType(event_type))
        except ValueError:
            known = ", ".join([*EVENT_FAMILIES, *(str(t) for t in EventType)])
            raise ValueError(
                f"unknown event type {event_type!r}: expected one of {known}"
            ) from None
    if repository is None:
        repository_tokens = ">"
    elif repository.endswith("/"):
        namespace = _valid_repository(repository.removesuffix("/"), repository)
        repository_tokens = encode_repository(namespace) + ".>"
    else:
        repository_tokens = encode_repository(_valid_repository(repository))
    return f"{prefix}.{type_tokens}.{repository_tokens}"


def _valid_repository(name: str, argument: str | None = None) -> str:
    """Return ``name`` if it is a valid repository name.

    Raise ValueError otherwise, quoting ``argument``, the filter as the user
    typed it. Such a filter would match no event.
    """
    try:
        return validate_repository_name(name)
    except NameInvalid as error:
        raise ValueError(
            f"invalid repository {argument or name!r}: {error.message}"
        ) from None
