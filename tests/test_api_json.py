"""JSON bodies of API responses."""

from __future__ import annotations

import json

from engine.api.http import encode_json


def test_encode_json_is_compact_utf8() -> None:
    document = {"name": "library/app", "tags": ["v1", "v2"], "note": "café"}

    body = encode_json(document)

    assert body == '{"name":"library/app","tags":["v1","v2"],"note":"café"}'.encode()
    assert json.loads(body) == document


def test_encode_json_escapes_lone_surrogate() -> None:
    document = {"value": "\ud800"}

    body = encode_json(document)

    assert body == b'{"value":"\\ud800"}'
    assert json.loads(body) == document
