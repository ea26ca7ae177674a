"""compose.yaml is a valid Compose file with the services it documents."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose missing"
)
def test_compose_config_is_valid() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(ROOT / "compose.yaml"), "config", "--services"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {
        "postgres",
        "nats",
        "migrate",
        "cairn-1",
        "cairn-2",
        "webhook",
        "mirror-target",
        "mirror",
    } <= services


def test_compose_webhook_config_loads() -> None:
    from consumers.webhook.config import load_config

    config = load_config(ROOT / "deploy" / "webhook.toml")
    assert [endpoint.name for endpoint in config.endpoints] == ["example"]
