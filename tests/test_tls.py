"""HTTPS: `cairn certificate` and `cairn serve --tls-cert --tls-key`."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from engine.api.tls import parse_host, self_signed_certificate
from engine.domain.digest import Digest
from tests.images import make_image
from tests.nats import wait_until
from tests.server import ServeProcess, push_blob, push_image, start_serve
from tests.test_clients import build_oci_layout
from tests.test_mirror import REPO_ROOT, mirror_argv

SKOPEO = shutil.which("skopeo")


@dataclass
class Certificate:
    cert: Path
    key: Path

    def trusted(self) -> ssl.SSLContext:
        """Return a client context that trusts this certificate alone."""
        return ssl.create_default_context(cafile=self.cert)


def cairn(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
    )


def make_certificate(directory: Path, *hosts: str) -> Certificate:
    directory.mkdir(parents=True, exist_ok=True)
    pair = Certificate(directory / "cert.pem", directory / "key.pem")
    host_options = [option for host in hosts for option in ("--host", host)]
    result = cairn(
        "certificate", *host_options, "--cert", str(pair.cert), "--key", str(pair.key)
    )
    assert result.returncode == 0, result.stderr
    return pair


def start_https(
    data_dir: Path,
    database_url: str,
    tmp_path: Path,
    certificate: Certificate,
    *extra: str,
    embedded_nats: bool = False,
) -> ServeProcess:
    """Start `cairn serve` with ``certificate``, logging to tmp_path/serve.log."""
    return start_serve(
        data_dir,
        database_url,
        tmp_path / "serve.log",
        "--tls-cert",
        str(certificate.cert),
        "--tls-key",
        str(certificate.key),
        *extra,
        embedded_nats=embedded_nats,
    )


@pytest.fixture
def certificate(tmp_path: Path) -> Certificate:
    return make_certificate(tmp_path / "tls", "localhost", "127.0.0.1")


@pytest.fixture
def https_serve(
    data_dir: Path, database_url: str, tmp_path: Path, certificate: Certificate
) -> Iterator[ServeProcess]:
    process = start_https(data_dir, database_url, tmp_path, certificate)
    try:
        yield process
    finally:
        process.kill()


# ---- cairn certificate -------------------------------------------------------


def test_certificate_names_hosts(certificate: Certificate) -> None:
    parsed = x509.load_pem_x509_certificate(certificate.cert.read_bytes())
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["localhost"]
    addresses = [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)]
    assert addresses == ["127.0.0.1"]
    constraints = parsed.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca
    lifetime = parsed.not_valid_after_utc - parsed.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=365, hours=1)


def test_certificate_key_private(certificate: Certificate) -> None:
    assert stat.S_IMODE(certificate.key.stat().st_mode) == 0o600
    # The key belongs to the certificate.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert, certificate.key)


def test_certificate_keeps_existing_files(
    tmp_path: Path, certificate: Certificate
) -> None:
    cert_before = certificate.cert.read_bytes()
    other_key = tmp_path / "other-key.pem"

    result = cairn(
        "certificate",
        "--host",
        "localhost",
        "--cert",
        str(certificate.cert),
        "--key",
        str(other_key),
    )

    assert result.returncode == 1
    assert f"cannot write {certificate.cert}: File exists" in result.stderr
    assert certificate.cert.read_bytes() == cert_before
    # The key written before the certificate failed is removed again.
    assert not other_key.exists()


def test_certificate_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "missing"

    result = cairn(
        "certificate",
        "--host",
        "localhost",
        "--cert",
        str(missing / "cert.pem"),
        "--key",
        str(missing / "key.pem"),
    )

    assert result.returncode == 1
    message = f"cannot write {missing / 'key.pem'}: No such file or directory\n"
    assert result.stderr.endswith(message)
    assert not missing.exists()


@pytest.mark.parametrize(
    "host",
    ["bad_host", "-registry.example", "a..b", "", "x" * 64 + ".example", "300.1.1.1"],
)
def test_certificate_rejects_invalid_host(tmp_path: Path, host: str) -> None:
    result = cairn("certificate", f"--host={host}", cwd=tmp_path)

    assert result.returncode == 2
    assert f"invalid host {host!r}" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("days", ["0", "36501", "100000000"])
def test_certificate_rejects_days(tmp_path: Path, days: str) -> None:
    result = cairn("certificate", "--host", "localhost", "--days", days, cwd=tmp_path)

    assert result.returncode == 2
    assert f"invalid number of days '{days}'" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_certificate_rejects_one_file_for_both(tmp_path: Path) -> None:
    same = tmp_path / "same.pem"

    result = cairn(
        "certificate", "--host", "localhost", "--cert", str(same), "--key", str(same)
    )

    assert result.returncode == 2
    assert f"--cert and --key are both {same}" in result.stderr
    assert not same.exists()


def test_certificate_drops_repeated_host(tmp_path: Path) -> None:
    pair = make_certificate(tmp_path, "127.0.0.1", "localhost", "127.0.0.1")

    parsed = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    addresses = [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)]
    assert addresses == ["127.0.0.1"]
    assert names.value.get_values_for_type(x509.DNSName) == ["localhost"]


def test_certificate_accepts_wildcard(tmp_path: Path) -> None:
    pair = make_certificate(tmp_path, "*.registry.example", "::1")

    parsed = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.DNSName) == ["*.registry.example"]
    addresses = [str(ip) for ip in names.value.get_values_for_type(x509.IPAddress)]
    assert addresses == ["::1"]


# ---- cairn serve over HTTPS --------------------------------------------------


def test_serve_https_blob_round_trip(
    https_serve: ServeProcess, certificate: Certificate
) -> None:
    assert https_serve.url.startswith("https://127.0.0.1:")
    # Larger than one read of a file body, so the body takes several writes
    # through TLS, which cannot use sendfile.
    data = os.urandom(3 * 1024 * 1024 + 17)

    with httpx.Client(base_url=https_serve.url, verify=certificate.trusted()) as client:
        started = client.post("/v2/library/app/blobs/uploads/")
        assert started.status_code == 202, started.text
        assert started.headers["location"].startswith(f"{https_serve.url}/v2/")
        client.delete(started.headers["location"])

        digest = push_blob(client, "library/app", data)
        pulled = client.get(f"/v2/library/app/blobs/{digest}")

    assert pulled.status_code == 200
    assert pulled.content == data
    assert Digest.of(pulled.content) == digest


def test_serve_https_rejects_untrusted_client(https_serve: ServeProcess) -> None:
    # The default trust store does not contain the self-signed certificate.
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{https_serve.url}/v2/")


def test_serve_https_plain_http_request(
    https_serve: ServeProcess, certificate: Certificate
) -> None:
    plain_url = https_serve.url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain_url}/v2/", timeout=10)

    # The server still serves TLS clients afterwards.
    response = httpx.get(f"{https_serve.url}/v2/", verify=certificate.trusted())
    assert response.status_code == 200


def write_certificate(
    directory: Path, now: datetime.datetime, days: int
) -> Certificate:
    """Write a certificate for localhost issued at ``now``, valid ``days``."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = self_signed_certificate([parse_host("localhost")], days, now)
    pair = Certificate(directory / "cert.pem", directory / "key.pem")
    pair.cert.write_bytes(cert_pem)
    pair.key.write_bytes(key_pem)
    return pair


@pytest.mark.parametrize(
    ("issued_days_ago", "days", "event"),
    [
        (400, 365, "tls_certificate_expired"),
        (-2, 365, "tls_certificate_not_yet_valid"),
        (350, 365, "tls_certificate_expires_soon"),
        (0, 365, None),
    ],
)
def test_serve_https_warns_about_validity(
    data_dir: Path,
    database_url: str,
    tmp_path: Path,
    issued_days_ago: int,
    days: int,
    event: str | None,
) -> None:
    issued = datetime.datetime.now(datetime.UTC) - datetime.timedelta(
        days=issued_days_ago
    )
    pair = write_certificate(tmp_path / "tls", issued, days)

    served = start_https(data_dir, database_url, tmp_path, pair)
    try:
        assert served.stop() == 0
    finally:
        served.kill()

    events = [
        json.loads(line)["event"]
        for line in served.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    warnings = [name for name in events if name.startswith("tls_certificate_")]
    assert warnings == ([event] if event else [])


def test_serve_https_read_idle_timeout(
    data_dir: Path, database_url: str, tmp_path: Path, certificate: Certificate
) -> None:
    served = start_https(
        data_dir, database_url, tmp_path, certificate, "--read-idle-timeout", "1"
    )
    try:
        host, port = served.url.removeprefix("https://").split(":")
        raw = socket.create_connection((host, int(port)), timeout=30)
        with certificate.trusted().wrap_socket(raw, server_hostname=host) as tls:
            # Half a request head, then nothing.
            tls.sendall(b"GET /v2/ HTTP/1.1\r\nHost: localhost\r\n")
            started = time.monotonic()
            assert tls.recv(1024) == b""
            waited = time.monotonic() - started
        assert waited < 20
        assert served.stop() == 0
    finally:
        served.kill()
    log = served.log_path.read_text()
    assert "Traceback" not in log


def test_serve_https_publishes_to_embedded_nats(
    data_dir: Path, database_url: str, tmp_path: Path, certificate: Certificate
) -> None:
    served = start_https(
        data_dir, database_url, tmp_path, certificate, embedded_nats=True
    )
    try:
        with httpx.Client(base_url=served.url, verify=certificate.trusted()) as client:
            push_image(client, "library/app", make_image(), "v1")

            def caught_up() -> bool:
                health = client.get("/_cairn/health").json()
                return bool(health["bus"]["state"] == "caught_up")

            wait_until(caught_up)
        assert served.stop() == 0
    finally:
        served.kill()


def serve_until_exit(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return cairn(
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--listen",
        "127.0.0.1:0",
        "--no-nats",
        *argv,
    )


@pytest.mark.parametrize("option", ["--tls-cert", "--tls-key"])
def test_serve_tls_option_alone(
    tmp_path: Path, certificate: Certificate, option: str
) -> None:
    other = "--tls-key" if option == "--tls-cert" else "--tls-cert"

    result = serve_until_exit(tmp_path, option, str(certificate.cert))

    assert result.returncode == 2
    assert f"{option} needs {other}" in result.stderr
    assert not (tmp_path / "data").exists()


def test_serve_tls_missing_file(tmp_path: Path, certificate: Certificate) -> None:
    missing = tmp_path / "missing.pem"

    result = serve_until_exit(
        tmp_path, "--tls-cert", str(missing), "--tls-key", str(certificate.key)
    )

    assert result.returncode == 1
    assert f"TLS file {missing} not found" in result.stderr


def test_serve_tls_key_of_other_certificate(
    tmp_path: Path, certificate: Certificate
) -> None:
    other = make_certificate(tmp_path / "other", "localhost")

    result = serve_until_exit(
        tmp_path, "--tls-cert", str(certificate.cert), "--tls-key", str(other.key)
    )

    assert result.returncode == 1
    assert f"cannot use certificate {certificate.cert} with key {other.key}" in (
        result.stderr
    )


def test_serve_tls_key_encrypted(tmp_path: Path, certificate: Certificate) -> None:
    private_key = serialization.load_pem_private_key(
        certificate.key.read_bytes(), password=None
    )
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )

    result = serve_until_exit(
        tmp_path, "--tls-cert", str(certificate.cert), "--tls-key", str(encrypted)
    )

    assert result.returncode == 1
    assert f"key {encrypted} is encrypted" in result.stderr
    assert "pass phrase" not in result.stderr + result.stdout


def test_serve_tls_file_is_directory(tmp_path: Path, certificate: Certificate) -> None:
    result = serve_until_exit(
        tmp_path, "--tls-cert", str(tmp_path), "--tls-key", str(certificate.key)
    )

    assert result.returncode == 1
    assert f"TLS file {tmp_path} is a directory" in result.stderr


def test_serve_tls_key_not_pem(tmp_path: Path, certificate: Certificate) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key\n")

    result = serve_until_exit(
        tmp_path, "--tls-cert", str(certificate.cert), "--tls-key", str(garbage)
    )

    assert result.returncode == 1
    assert f"with key {garbage}" in result.stderr


# ---- skopeo verifies the certificate -----------------------------------------


@pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")
def test_skopeo_copy_over_https(
    https_serve: ServeProcess,
    certificate: Certificate,
    client_env: dict[str, str],
    tmp_path: Path,
) -> None:
    assert SKOPEO is not None
    source = tmp_path / "source"
    digest = build_oci_layout(source, "v1")
    cert_dir = tmp_path / "certs.d"
    cert_dir.mkdir()
    shutil.copy(certificate.cert, cert_dir / "ca.crt")
    host = https_serve.url.removeprefix("https://")
    skopeo = [SKOPEO, "--policy", client_env["POLICY"]]

    untrusted = subprocess.run(
        [*skopeo, "copy", f"oci:{source}:v1", f"docker://{host}/library/tls:v1"],
        env=client_env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert untrusted.returncode != 0
    assert "certificate" in untrusted.stderr

    for argv in (
        [
            "copy",
            "--preserve-digests",
            "--dest-cert-dir",
            str(cert_dir),
            f"oci:{source}:v1",
            f"docker://{host}/library/tls:v1",
        ],
        [
            "copy",
            "--preserve-digests",
            "--src-cert-dir",
            str(cert_dir),
            f"docker://{host}/library/tls:v1",
            f"oci:{tmp_path / 'copied-back'}:v1",
        ],
    ):
        result = subprocess.run(
            [*skopeo, *argv],
            env=client_env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, result.stderr

    with httpx.Client(base_url=https_serve.url, verify=certificate.trusted()) as client:
        response = client.head(f"/v2/library/tls/manifests/{digest}")
    assert response.status_code == 200


# ---- the mirror reads an HTTPS source ----------------------------------------


def test_mirror_from_https_source(
    https_serve: ServeProcess, certificate: Certificate, tmp_path: Path
) -> None:
    with httpx.Client(base_url=https_serve.url, verify=certificate.trusted()) as client:
        push_image(client, "library/app", make_image(), "v1")
    layout = tmp_path / "layout"
    argv = mirror_argv(https_serve.url, f"oci:{layout}", "--once", "--retries", "1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    env.pop("SSL_CERT_DIR", None)

    untrusted = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**env, "SSL_CERT_FILE": ""},
        timeout=300,
    )
    assert untrusted.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr

    trusted = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**env, "SSL_CERT_FILE": str(certificate.cert)},
        timeout=300,
    )
    assert trusted.returncode == 0, trusted.stderr[-4000:]
    index = json.loads((layout / "library" / "app" / "index.json").read_text())
    tags = [
        entry["annotations"]["org.opencontainers.image.ref.name"]
        for entry in index["manifests"]
    ]
    assert tags == ["v1"]
