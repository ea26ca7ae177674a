"""HTTP Basic credentials of the mirror's source and target registries.

Credentials come from ``--source-creds``/``--target-creds`` (or their
CAIRN_MIRROR_* variables), from a file named by ``--source-creds-file``/
``--target-creds-file``, or from the user name and password of a URL. The
URL is used without them from then on, so no log line, error message or
checkpoint contains the password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import unquote

import httpx

# The user information of a URL: everything after "scheme://" and up to
# the last "@" before the path, query or fragment starts. The scheme is
# optional, so that "user:password@host", which is no valid base URL, loses
# its password before an error message shows it.
_USERINFO: Final = re.compile(
    r"^(?P<scheme>(?:[A-Za-z][A-Za-z0-9+.-]*:)?//)?(?P<userinfo>[^/?#]*)@"
)


class CredentialsError(ValueError):
    """Credentials that are malformed, unreadable or given more than once."""


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def auth(self) -> httpx.BasicAuth:
        return httpx.BasicAuth(self.username, self.password)


def parse_credentials(value: str, origin: str) -> Credentials:
    """Parse USER:PASSWORD; the password may contain colons.

    ``origin`` names where the value came from, for the error message, which
    never repeats the value.
    """
    username, colon, password = value.partition(":")
    if not colon or not username:
        raise CredentialsError(
            f"invalid credentials in {origin}: expected USER:PASSWORD"
        )
    return Credentials(username, password)


def read_credentials_file(path: Path) -> Credentials:
    """Read USER:PASSWORD from the first line of ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CredentialsError(
            f"cannot read credentials file {path}: {error.strerror or error}"
        ) from None
    except UnicodeDecodeError:
        raise CredentialsError(
            f"cannot read credentials file {path}: it is not UTF-8 text"
        ) from None
    lines = text.splitlines()
    return parse_credentials(lines[0] if lines else "", f"credentials file {path}")


def split_userinfo(url: str) -> tuple[str, Credentials | None]:
    """Return ``url`` without its user name and password, and those as
    Credentials, or None when the URL has none.

    Works on any string, valid URL or not, so that even a message about an
    invalid URL can leave the password out.
    """
    match = _USERINFO.match(url)
    if match is None:
        return url, None
    bare = (match["scheme"] or "") + url[match.end() :]
    username, _, password = match["userinfo"].partition(":")
    return bare, Credentials(unquote(username), unquote(password))


def resolve_credentials(
    side: str, url: str, value: str | None, file: Path | None
) -> tuple[str, Credentials | None]:
    """Return the URL of ``side`` ("source" or "target") without user
    information, and its credentials from the URL, the ``--<side>-creds``
    value or the ``--<side>-creds-file`` file.

    Raises CredentialsError when more than one of the three is given.
    """
    bare, from_url = split_userinfo(url)
    sources = [
        name
        for name, present in (
            (f"the --{side} URL", from_url is not None),
            (f"--{side}-creds", value is not None),
            (f"--{side}-creds-file", file is not None),
        )
        if present
    ]
    if len(sources) > 1:
        variable = f"CAIRN_MIRROR_{side.upper()}_CREDS"
        raise CredentialsError(
            f"the {side} credentials are given more than once, by "
            f"{' and '.join(sources)}. Give them once. The options take their "
            f"defaults from {variable} and {variable}_FILE"
        )
    if value is not None:
        return bare, parse_credentials(value, f"--{side}-creds")
    if file is not None:
        return bare, read_credentials_file(file)
    return bare, from_url
