"""HTTP Basic authentication against a users file, and pull or push roles.

The users file (``cairn serve --auth-file``) has one user per line::

    name:role:scrypt$<n>$<r>$<p>$<salt base64>$<hash base64>

``role`` is ``pull`` (read only) or ``push`` (read and write); blank lines
and lines starting with ``#`` are ignored. The hash is hashlib.scrypt of the
UTF-8 password with the stored cost parameters and salt.

With a users file loaded, every request needs valid credentials except
GET and HEAD of /_cairn/health, which stays open for liveness probes.
That covers /v2/ (GET /v2/ included, where clients discover that
authentication is on), the /_cairn/ event feed, dashboard API and UI, and
/metrics: reading any of them needs the pull role. Writing, that is any
method other than GET and HEAD, needs the push role. A request without
valid credentials gets 401 UNAUTHORIZED and a pull user's write gets
403 DENIED.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Final, NamedTuple

import structlog

from engine.api.errors import ErrorCode, HTTPError
from engine.api.threads import ThreadPool
from engine.logs import ThrottledWarnings

if TYPE_CHECKING:
    from engine.api.http import Request

log = structlog.get_logger(__name__)

REALM: Final = "cairn"
CHALLENGE: Final = ("WWW-Authenticate", f'Basic realm="{REALM}"')

# Paths that need no credentials, for probes that cannot send any.
PUBLIC_PATHS: Final = frozenset({"/_cairn/health"})
READ_METHODS: Final = frozenset({"GET", "HEAD"})

# User names are stored as Actor.user (255 characters) and cannot contain
# ":", which ends the user name in Basic credentials (RFC 7617).
_USER_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

# Cost of new hashes: 128 * n * r bytes of memory, 32 MiB, per check.
SCRYPT_N: Final = 2**15
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
SALT_BYTES: Final = 16
HASH_BYTES: Final = 32
# A users file may not ask for more memory than this per check.
MAX_SCRYPT_MEMORY: Final = 256 * 2**20

# Concurrent scrypt checks; each takes 128 * n * r bytes while it runs.
MAX_HASH_THREADS: Final = 4
# A verified password is remembered this many seconds, so a push of many
# blobs pays for one scrypt check instead of one per request.
VERIFIED_TTL_S: Final = 300.0
MAX_VERIFIED: Final = 4096
# Seconds between two auth_failed log lines for one remote address.
FAILURE_LOG_INTERVAL_S: Final = 60.0


class Role(StrEnum):
    """The permission of a user: pull reads, push reads and writes."""

    PULL = "pull"
    PUSH = "push"


# The role of a user that `cairn users add` creates without --role.
DEFAULT_ROLE: Final = Role.PULL


class AuthFileError(ValueError):
    """A users file that cannot be read or contains an invalid line."""


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """An scrypt hash with its cost parameters and salt."""

    n: int
    r: int
    p: int
    salt: bytes
    hash: bytes

    @classmethod
    def create(cls, password: str) -> PasswordHash:
        """Hash ``password`` with a new random salt and the default cost."""
        salt = secrets.token_bytes(SALT_BYTES)
        digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, HASH_BYTES)
        return cls(SCRYPT_N, SCRYPT_R, SCRYPT_P, salt, digest)

    @classmethod
    def parse(cls, text: str) -> PasswordHash:
        """Parse ``scrypt$n$r$p$salt$hash``, raising ValueError when invalid."""
        parts = text.split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            raise ValueError("expected scrypt$<n>$<r>$<p>$<salt>$<hash>")
        try:
            n, r, p = (int(part) for part in parts[1:4])
            salt = base64.b64decode(parts[4], validate=True)
            digest = base64.b64decode(parts[5], validate=True)
        except (ValueError, binascii.Error) as error:
            raise ValueError(f"invalid scrypt parameters: {error}") from None
        if n < 2 or n & (n - 1) or r < 1 or p < 1:
            raise ValueError("scrypt n must be a power of 2 and r and p positive")
        if _memory(n, r, p) > MAX_SCRYPT_MEMORY:
            raise ValueError(
                f"scrypt n={n} r={r} needs more than {MAX_SCRYPT_MEMORY} bytes"
            )
        if not salt or len(digest) < 16:
            raise ValueError("the salt is empty or the hash shorter than 16 bytes")
        return cls(n, r, p, salt, digest)

    def format(self) -> str:
        salt = base64.b64encode(self.salt).decode()
        digest = base64.b64encode(self.hash).decode()
        return f"scrypt${self.n}${self.r}${self.p}${salt}${digest}"

    def verify(self, password: str) -> bool:
        """Check ``password`` against the hash, comparing in constant time.

        Blocks for one scrypt run, so async callers use a worker thread.
        """
        candidate = _scrypt(password, self.salt, self.n, self.r, self.p, len(self.hash))
        return hmac.compare_digest(candidate, self.hash)


@dataclass(frozen=True, slots=True)
class User:
    """One line of the users file."""

    name: str
    role: Role
    password: PasswordHash

    def format(self) -> str:
        return f"{self.name}:{self.role}:{self.password.format()}"


def _memory(n: int, r: int, p: int) -> int:
    # scrypt's working memory in bytes: n blocks of 128 * r bytes for its
    # table, and p + 2 more for the input and scratch blocks.
    return 128 * r * (n + p + 2)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=_memory(n, r, p) + 2**20,
        dklen=length,
    )


def validate_user_name(name: str) -> None:
    """Raise ValueError unless ``name`` can be a user name."""
    if not _USER_NAME.fullmatch(name):
        raise ValueError(
            f"invalid user name {name!r}: expected 1 to 64 letters, digits, "
            "'.', '_', '@' or '-', starting with a letter or digit"
        )


def parse_user(line: str) -> User:
    """Parse one ``name:role:hash`` line, raising ValueError when invalid."""
    name, sep, rest = line.partition(":")
    role_text, sep2, hash_text = rest.partition(":")
    if not sep or not sep2:
        raise ValueError("expected name:role:scrypt$...")
    validate_user_name(name)
    try:
        role = Role(role_text)
    except ValueError:
        raise ValueError(f"unknown role {role_text!r}: expected pull or push") from None
    return User(name, role, PasswordHash.parse(hash_text))


def load_users(path: Path) -> dict[str, User]:
    """Read the users file at ``path``, keyed by user name.

    Raises AuthFileError naming the file, and the line for a bad entry.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AuthFileError(f"cannot read users file {path}: {error}") from error
    return parse_users(text, path)


def parse_users(text: str, path: Path) -> dict[str, User]:
    """Parse ``text``, the contents of the users file at ``path``.

    Raises AuthFileError naming the file and the line of the first bad entry.
    """
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            user = parse_user(line)
        except ValueError as error:
            raise AuthFileError(f"users file {path} line {number}: {error}") from None
        if user.name in users:
            raise AuthFileError(
                f"users file {path} line {number}: user {user.name} is listed twice"
            )
        users[user.name] = user
    return users


class AddedUser(NamedTuple):
    """The outcome of add_user: the role written, and whether the user was
    in the file before."""

    role: Role
    replaced: bool


def add_user(path: Path, name: str, role: Role | None, password: str) -> AddedUser:
    """Add or replace the line of user ``name`` with ``password``.

    ``role`` None keeps the role of a user already in the file, so that
    changing a password leaves the permission as it was, and gives a new
    user DEFAULT_ROLE.

    A symbolic link at ``path`` is followed, so the file it names is
    changed and the link stays. Runs on one file are serialized: each takes
    an exclusive ``flock`` on the users file from its read until its rename,
    so concurrent runs lose no change. The file is rewritten through a
    temporary file in its own directory, fsynced, renamed over the old one,
    and the directory is fsynced, so a reader sees the old or the new file
    and never half of one. The new file keeps the old one's owner, group
    and mode, and a file created here gets mode 0600. Other lines are kept
    as they are.

    Raises AuthFileError, and leaves the file unchanged, when the existing
    file is not one that load_users, and so `cairn serve`, accepts, or when
    its owner and group cannot be kept.
    """
    validate_user_name(name)
    if not password:
        raise ValueError("the password is empty")
    # Hashed before the lock is taken, because scrypt is slow by design and
    # other runs would wait for it.
    password_hash = PasswordHash.create(password)

    while True:
        target = Path(os.path.realpath(path))
        try:
            descriptor = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            new_role = role or DEFAULT_ROLE
            new_line = User(name, new_role, password_hash).format()
            if _create_file(target, f"{new_line}\n"):
                return AddedUser(new_role, replaced=False)
            # Another run created the file first: lock and update that one.
            continue
        with os.fdopen(descriptor, encoding="utf-8") as locked:
            fcntl.flock(locked.fileno(), fcntl.LOCK_EX)
            # If the run that held the lock renamed a new file over this
            # one, or the link now names another file, these contents are
            # out of date: lock the file that ``path`` names now.
            if not _is_same_file(locked.fileno(), path):
                continue
            try:
                text = locked.read()
            except UnicodeDecodeError as error:
                raise AuthFileError(
                    f"cannot read users file {path}: {error}"
                ) from error
            existing = parse_users(text, path).get(name)
            new_role = role or (existing.role if existing else DEFAULT_ROLE)
            new_line = User(name, new_role, password_hash).format()
            lines, replaced = _replace_line(text.splitlines(), name, new_line)
            _replace_file(
                target,
                "".join(f"{line}\n" for line in lines),
                os.fstat(locked.fileno()),
            )
            # Closing ``locked`` releases the lock, after the rename.
            return AddedUser(new_role, replaced)


def _is_same_file(descriptor: int, path: Path) -> bool:
    opened = os.fstat(descriptor)
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    return (opened.st_dev, opened.st_ino) == (current.st_dev, current.st_ino)


def _write_temporary(
    path: Path, text: str, original: os.stat_result | None = None
) -> str:
    """Write ``text`` to a new fsynced file beside ``path``.

    The file gets the owner, group and mode of ``original`` without the
    permissions for others, because it contains password hashes, or mode
    0600 without one.
    """
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            if original is not None:
                _copy_owner(file.fileno(), path, original)
            # After the chown, which clears the set-user-ID and set-group-ID
            # bits.
            mode = 0o600
            if original is not None:
                mode = stat.S_IMODE(original.st_mode) & ~stat.S_IRWXO
            os.fchmod(file.fileno(), mode)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return temporary


def _copy_owner(descriptor: int, path: Path, original: os.stat_result) -> None:
    """Give the file open at ``descriptor`` the owner and group of ``original``.

    chown(2) lets only root change a file's owner, and the owner change its
    group only to one of the owner's groups. Other runs raise AuthFileError
    instead of changing who may read the users file.
    """
    created = os.fstat(descriptor)
    if (created.st_uid, created.st_gid) == (original.st_uid, original.st_gid):
        return
    try:
        os.fchown(descriptor, original.st_uid, original.st_gid)
    except PermissionError as error:
        raise AuthFileError(
            f"cannot keep the owner {original.st_uid} and group "
            f"{original.st_gid} of users file {path}: {error.strerror}. Run "
            "cairn users add as root or as the file's owner"
        ) from error


def _replace_file(path: Path, text: str, original: os.stat_result) -> None:
    temporary = _write_temporary(path, text, original)
    try:
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _create_file(path: Path, text: str) -> bool:
    """Create ``path`` with ``text`` and mode 0600; return False if it exists
    already.

    ``os.link`` fails when the name exists, so a file that another run
    created in the meantime is never overwritten, and no reader sees the
    file before its contents are complete.
    """
    temporary = _write_temporary(path, text)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        Path(temporary).unlink(missing_ok=True)
    _fsync_directory(path.parent)
    return True


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _replace_line(
    lines: Iterable[str], name: str, new_line: str
) -> tuple[list[str], bool]:
    result: list[str] = []
    replaced = False
    for line in lines:
        if line.strip().partition(":")[0] == name:
            if not replaced:
                result.append(new_line)
            replaced = True
        else:
            result.append(line)
    if not replaced:
        result.append(new_line)
    return result, replaced


class _FailureLog(ThrottledWarnings):
    """auth_failed lines, at most once per interval per remote address; the
    rest are counted in auth_failures_suppressed lines."""

    suppressed_event = "auth_failures_suppressed"
    key_field = "remote"
    count_field = "failures"

    def record(self, user: str | None, address: str | None, reason: str) -> None:
        self.warn(address, "auth_failed", user=user, remote=address, reason=reason)


class Authenticator:
    """The check of Basic credentials against the users of one users file."""

    def __init__(
        self,
        users: dict[str, User],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.users = users
        self._clock = clock
        self._hash_pool = ThreadPool(MAX_HASH_THREADS, "cairn-password")
        # Keyed by an HMAC of name and password under a key that lives only
        # in this process, so the passwords themselves are never stored.
        self._key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        self._failures = _FailureLog(FAILURE_LOG_INTERVAL_S, clock)
        # Checked for unknown users, so they take as long as known ones.
        self._decoy = PasswordHash.create(secrets.token_urlsafe(16))

    @classmethod
    def from_file(cls, path: Path) -> Authenticator:
        return cls(load_users(path))

    async def authenticate(self, request: Request) -> User:
        """Return the user whose credentials ``request`` carries.

        Raises HTTPError 401 UNAUTHORIZED when there are none or they are
        wrong. The password is never logged or put in the error.
        """
        self._failures.flush()
        header = request.header("authorization")
        if header is None:
            raise _unauthorized("authentication required", None)
        try:
            name, password = parse_basic(header)
        except ValueError as error:
            self._failures.record(None, request.actor.address, str(error))
            raise _unauthorized(
                f"invalid Authorization header: {error}", None
            ) from None
        if not name and not password:
            # Clients send empty credentials when they have none for this
            # registry, which is the same as sending none at all.
            raise _unauthorized("authentication required", None)

        user = self.users.get(name)
        key = hmac.digest(self._key, f"{name}\0{password}".encode(), "sha256")
        if user is not None and self._remembered(key):
            return user

        stored = user.password if user is not None else self._decoy
        matches = await self._hash_pool.run(stored.verify, password)
        if user is None or not matches:
            self._failures.record(name, request.actor.address, "invalid credentials")
            raise _unauthorized("invalid user name or password", name)
        self._remember(key)
        return user

    def _remembered(self, key: bytes) -> bool:
        expires = self._verified.get(key)
        if expires is None:
            return False
        if expires <= self._clock():
            del self._verified[key]
            return False
        return True

    def _remember(self, key: bytes) -> None:
        self._verified[key] = self._clock() + VERIFIED_TTL_S
        self._verified.move_to_end(key)
        while len(self._verified) > MAX_VERIFIED:
            self._verified.popitem(last=False)


def parse_basic(header: str) -> tuple[str, str]:
    """Return the user name and password of a Basic Authorization header.

    Raises ValueError for another scheme or malformed credentials.
    """
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise ValueError(f"unsupported scheme {scheme!r}: expected Basic")
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("the Basic credentials are not base64 of UTF-8") from None
    name, sep, password = decoded.partition(":")
    if not sep:
        raise ValueError("the Basic credentials contain no ':'")
    return name, password


def is_public(request: Request) -> bool:
    """Return True for a request that needs no credentials and no rate limit."""
    return request.path in PUBLIC_PATHS and request.method in READ_METHODS


def authorize(request: Request, user: User) -> None:
    """Raise HTTPError 403 DENIED when ``user`` may not make ``request``."""
    if request.method in READ_METHODS or user.role is Role.PUSH:
        return
    repository = request.path_params.get("name")
    raise HTTPError(
        ErrorCode.DENIED,
        403,
        f"user {user.name} has the pull role and cannot write to "
        f"repository {repository}",
        {
            "user": user.name,
            "role": str(user.role),
            "repository": repository,
            "method": request.method,
        },
    )


def _unauthorized(message: str, user: str | None) -> HTTPError:
    detail = {"realm": REALM} if user is None else {"realm": REALM, "user": user}
    return HTTPError(ErrorCode.UNAUTHORIZED, 401, message, detail, [CHALLENGE])
