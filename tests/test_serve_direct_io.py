"""`cairn serve` and O_DIRECT blob writes, with and without --no-direct-io."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from engine.blobs.store import accepts_direct_io
from tests.server import log_records, push_blob, start_serve

BLOB_SIZE = 3 * 1024 * 1024 + 123


@pytest.mark.parametrize(
    ("extra", "direct_io"), [((), True), (("--no-direct-io",), False)]
)
def test_serve_direct_io_option(
    tmp_path: Path, extra: tuple[str, ...], direct_io: bool
) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "uploads").mkdir(parents=True)
    if direct_io and not accepts_direct_io(data_dir / "uploads"):
        pytest.skip("the file system does not take O_DIRECT")
    log_path = tmp_path / "serve.log"
    serve = start_serve(
        data_dir, f"sqlite:///{tmp_path / 'cairn.db'}", log_path, *extra
    )
    data = os.urandom(BLOB_SIZE)
    try:
        with httpx.Client(base_url=serve.url, timeout=60) as api:
            digest = push_blob(api, "demo/app", data)
            pulled = api.get(f"/v2/demo/app/blobs/{digest}")
    finally:
        assert serve.stop() == 0

    assert pulled.status_code == 200
    assert pulled.content == data
    records = log_records(log_path, "blob_writes_configured")
    assert [record["direct_io"] for record in records] == [direct_io]
