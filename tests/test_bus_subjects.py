"""The subject encoding of repository names, and subject filters."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.bus.subjects import (
    decode_component,
    decode_repository,
    encode_repository,
    event_subject,
    filter_subject,
    parse_event_subject,
    pull_subject,
    stream_subjects,
    subject_within,
    subjects_overlap,
    unstored_subject_error,
    validate_prefix,
)
from engine.domain.events import EventType
from engine.domain.names import validate_repository_name

# ADR-6 "restricted-term": the characters NATS recommends for tokens.
RESTRICTED_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")

# Names of the OCI grammar: lowercase alphanumeric runs joined by '.', '_',
# '__' or dashes, in one or more '/'-separated components.
alphanumeric_runs = st.text(
    "abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=6
)
separators = st.sampled_from([".", "_", "__", "-", "--"])
name_components = st.builds(
    lambda first, rest: first + "".join(sep + run for sep, run in rest),
    alphanumeric_runs,
    st.lists(st.tuples(separators, alphanumeric_runs), max_size=3),
)
repository_names = st.lists(name_components, min_size=1, max_size=4).map("/".join)
components = st.text(min_size=1).filter(lambda text: "/" not in text)


@given(repository_names)
def test_repository_name_round_trip(name: str) -> None:
    assert validate_repository_name(name) == name
    assert decode_repository(encode_repository(name)) == name


@given(st.lists(components, min_size=1, max_size=6))
def test_any_text_round_trip(parts: list[str]) -> None:
    name = "/".join(parts)
    encoded = encode_repository(name)
    assert decode_repository(encoded) == name
    tokens = encoded.split(".")
    assert len(tokens) == len(parts)
    for token in tokens:
        assert RESTRICTED_TOKEN.match(token), token


@given(repository_names, repository_names)
def test_distinct_names_distinct_subjects(first: str, second: str) -> None:
    if first != second:
        assert encode_repository(first) != encode_repository(second)


@pytest.mark.parametrize(
    ("name", "encoded"),
    [
        ("library/alpine", "library.alpine"),
        ("alpine", "alpine"),
        ("my-org/web.app", "my-org.web_2Eapp"),
        ("a_b/c__d", "a_5Fb.c_5F_5Fd"),
        ("x---y", "x---y"),
        ("star*/gt>", "star_2A.gt_3E"),
        ("with space/$sys", "with_20space._24sys"),
        ("Upper/é", "_55pper._C3_A9"),
    ],
)
def test_encoding_examples(name: str, encoded: str) -> None:
    assert encode_repository(name) == encoded
    assert decode_repository(encoded) == name


@pytest.mark.parametrize("name", ["", "a//b", "/a", "a/"])
def test_empty_component_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        encode_repository(name)


@pytest.mark.parametrize(
    "token", ["", "a.b", "a_2", "a_2e", "a_ZZ", "A", "a*", "_61", "_C3"]
)
def test_invalid_token_rejected(token: str) -> None:
    with pytest.raises(ValueError):
        decode_component(token)


def test_event_subject() -> None:
    subject = event_subject("cairn", EventType.MANIFEST_PUSHED, "library/alpine")
    assert subject == "cairn.manifest.pushed.library.alpine"
    assert parse_event_subject("cairn", subject) == (
        EventType.MANIFEST_PUSHED,
        "library/alpine",
    )


@given(st.sampled_from(list(EventType)), repository_names)
def test_event_subject_round_trip(event_type: EventType, name: str) -> None:
    subject = event_subject("acme.cairn", event_type, name)
    assert parse_event_subject("acme.cairn", subject) == (event_type, name)


def test_pull_subject_outside_stream_subjects() -> None:
    assert pull_subject("cairn", "library/alpine") == "cairn.pull.library.alpine"
    assert stream_subjects("cairn") == [
        "cairn.blob.>",
        "cairn.manifest.>",
        "cairn.tag.>",
    ]


@pytest.mark.parametrize(
    ("event_type", "repository", "expected"),
    [
        (None, None, "cairn.>"),
        ("tag", None, "cairn.tag.*.>"),
        ("tag.set", None, "cairn.tag.set.>"),
        (None, "library/alpine", "cairn.*.*.library.alpine"),
        (None, "library/", "cairn.*.*.library.>"),
        ("manifest.pushed", "a.b/c", "cairn.manifest.pushed.a_2Eb.c"),
    ],
)
def test_filter_subject(
    event_type: str | None, repository: str | None, expected: str
) -> None:
    assert filter_subject("cairn", event_type, repository) == expected


@pytest.mark.parametrize(
    ("subject", "pattern", "expected"),
    [
        ("cairn.tag.set.library.alpine", "cairn.tag.>", True),
        ("cairn.tag.set.library.alpine", "cairn.*.*.library.>", True),
        ("cairn.tag.set.team.web", "cairn.*.*.library.>", False),
        ("cairn.tag.set.library", "cairn.*.*.library.>", False),
        ("cairn.tag.set", "cairn.tag.*", True),
        ("cairn.tag.set.x", "cairn.tag.*", False),
        ("cairn.tag", "cairn.tag.>", False),
        ("cairn.tag.*.>", "cairn.tag.>", True),
        ("cairn.*.*.>", "cairn.tag.>", False),
        ("cairn.tag.>", "cairn.*.*.>", False),
        ("cairn.tag.>", "cairn.>", True),
        ("cairn.tag.*", "cairn.tag.set", False),
        ("cairn.tag.set", "cairn.tag.set", True),
    ],
)
def test_subject_within(subject: str, pattern: str, expected: bool) -> None:
    assert subject_within(subject, pattern) is expected


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("cairn.>", "cairn.tag.set.library.alpine", True),
        ("cairn.*.*.library.>", "cairn.tag.>", True),
        ("cairn.tag.>", "cairn.tag.>", True),
        ("cairn.tag.*", "cairn.*.set", True),
        ("cairn.>", "cairn", False),
        ("other.>", "cairn.tag.>", False),
        ("cairn.tag.>", "cairn.blob.>", False),
        ("cairn.tag.*", "cairn.tag.set.x", False),
        ("cairn.*", "cairn.tag.set", False),
        (">", "cairn", True),
    ],
)
def test_subjects_overlap(first: str, second: str, expected: bool) -> None:
    assert subjects_overlap(first, second) is expected
    assert subjects_overlap(second, first) is expected


def test_unstored_subject_error() -> None:
    stored = stream_subjects("cairn")
    assert unstored_subject_error("CAIRN", stored, "cairn.>", "cairn") is None
    assert unstored_subject_error("CAIRN", stored, "cairn.tag.*.>", "cairn") is None
    assert unstored_subject_error("CAIRN", [], "other.>", "other") is None
    assert unstored_subject_error("CAIRN", stored, "other.>", "other", "PREFIX") == (
        "stream CAIRN stores no subject under the subject prefix 'other', only "
        "cairn.blob.>, cairn.manifest.>, cairn.tag.>; set PREFIX to the subject "
        "prefix of the cairn serve that publishes to it"
    )
    only_tags = ["cairn.tag.>"]
    assert unstored_subject_error("CAIRN", only_tags, "cairn.blob.*.>", "cairn") == (
        "stream CAIRN stores no subject that matches cairn.blob.*.>, only cairn.tag.>"
    )


def test_filter_subject_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown event type 'tags'"):
        filter_subject("cairn", "tags")


@pytest.mark.parametrize("repository", ["Bad/Name", "library//", "/", "a b"])
def test_filter_subject_invalid_repository(repository: str) -> None:
    with pytest.raises(ValueError, match=f"invalid repository '{repository}'"):
        filter_subject("cairn", None, repository)


@pytest.mark.parametrize("prefix", ["", "a..b", "a.*", "a.>", "a b", "."])
def test_invalid_prefix_rejected(prefix: str) -> None:
    with pytest.raises(ValueError, match="invalid subject prefix"):
        validate_prefix(prefix)
