"""TLS for `cairn serve`: the server's context and self-signed certificates.

Docker, podman and containerd send plain HTTP only to a registry on
loopback or to one that their configuration marks as insecure. A registry
that other machines use therefore needs TLS, from a reverse proxy in front
of it or from `cairn serve --tls-cert FILE --tls-key FILE`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_VALIDITY_DAYS = 365

# `cairn serve` warns at start-up when its certificate expires within this
# many days.
EXPIRY_WARNING_DAYS = 30

# One label of a DNS name (RFC 1123): letters, digits and inner hyphens.
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class TLSConfigError(Exception):
    """A certificate or key that cannot serve TLS, with the file it came from."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """Build the server's TLS context from PEM files: TLS 1.2 or later, with
    the ciphers and options of Python's defaults for a server.

    Raises TLSConfigError naming the file when one is missing or unreadable,
    or when the key does not match the certificate.
    """
    for path in (cert, key):
        if path.is_dir():
            raise TLSConfigError(f"TLS file {path} is a directory, not a PEM file")
        if not path.is_file():
            raise TLSConfigError(f"TLS file {path} not found")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    password_requested = False

    def no_password() -> bytes:
        # Without this callback OpenSSL prompts on the terminal for the pass
        # phrase of an encrypted key.
        nonlocal password_requested
        password_requested = True
        return b""

    try:
        context.load_cert_chain(cert, key, password=no_password)
    except OSError as error:
        # ssl.SSLError is an OSError too.
        if password_requested:
            raise TLSConfigError(
                f"key {key} is encrypted, and cairn serve needs an unencrypted "
                f"key: decrypt it, e.g. with `openssl pkey -in {key} -out "
                "PLAIN.pem`"
            ) from None
        if isinstance(error, ssl.SSLError):
            raise TLSConfigError(
                f"cannot use certificate {cert} with key {key}: "
                f"{error.reason or error}. Both must be PEM files, and the key "
                "must belong to the certificate"
            ) from None
        raise TLSConfigError(
            f"cannot read certificate {cert} or key {key}: {error.strerror or error}"
        ) from None
    return context


def validity_problem(
    cert: Path, now: datetime.datetime | None = None
) -> tuple[str, datetime.datetime] | None:
    """Check the validity period of the first certificate in ``cert``.

    Returns ``("expired", not_valid_after)``, ``("not_yet_valid",
    not_valid_before)`` or ``("expires_soon", not_valid_after)`` when the
    certificate expires within EXPIRY_WARNING_DAYS, and None when it is
    valid for longer. Clients reject a certificate outside its period, so
    the caller warns instead of waiting for their handshakes to fail.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    if leaf.not_valid_after_utc <= now:
        return "expired", leaf.not_valid_after_utc
    if leaf.not_valid_before_utc > now:
        return "not_yet_valid", leaf.not_valid_before_utc
    if leaf.not_valid_after_utc - now < datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        return "expires_soon", leaf.not_valid_after_utc
    return None


def parse_host(value: str) -> x509.GeneralName:
    """Parse a host name or IP address for a certificate's subjectAltName.

    A DNS name may start with a ``*.`` wildcard label, as in
    ``*.registry.example.com``.
    """
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    name = value.removesuffix(".").lower()
    labels = name.split(".")
    if labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    # A name whose last label is all digits, such as 300.1.1.1, is a
    # mistyped IP address: no top-level domain is numeric (RFC 3696).
    if (
        len(name) > 253
        or not all(_DNS_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ValueError(
            f"invalid host {value!r}: expected a DNS name such as "
            "registry.example.com, or an IP address"
        )
    return x509.DNSName(name)


def self_signed_certificate(
    hosts: Sequence[x509.GeneralName],
    days: int = DEFAULT_VALIDITY_DAYS,
    now: datetime.datetime | None = None,
) -> tuple[bytes, bytes]:
    """Create a self-signed certificate for ``hosts`` and its key, as PEM.

    The key is ECDSA on P-256. The certificate is its own CA (basic
    constraints CA:TRUE, path length 0), so clients that trust the file
    accept it as a root: Docker's and podman's certs.d/HOST:PORT/ca.crt,
    skopeo's --cert-dir and curl's --cacert.
    """
    if not hosts:
        raise ValueError("a certificate needs at least one host")
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    first = hosts[0].value
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first))])
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # An hour of slack for clients whose clocks run behind.
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(list(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a file that must not exist yet, with ``mode``.

    Raises FileExistsError when ``path`` exists, so that a key in use is
    never overwritten.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb", closefd=False) as stream:
            stream.write(data)
            stream.flush()
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
