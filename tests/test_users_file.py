"""`cairn users add`: the role it writes, and one users file run on by
several processes at once, through a symbolic link, and owned by another
account."""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine.api.auth import (
    DEFAULT_ROLE,
    AuthFileError,
    PasswordHash,
    Role,
    add_user,
    load_users,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT = 120.0


def users_add_argv(auth_file: Path, name: str, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "engine.cli",
        "users",
        "add",
        "--auth-file",
        str(auth_file),
        name,
        *options,
    ]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}


def start_users_add(auth_file: Path, name: str) -> subprocess.Popen[str]:
    """Start `cairn users add NAME --role push`; it reads the password from
    stdin."""
    return subprocess.Popen(
        users_add_argv(auth_file, name, "--role", "push"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=clean_env(),
    )


def wait_until_blocked_on_flock(process: subprocess.Popen[str]) -> None:
    """Wait until ``process`` waits for a flock, which /proc/locks lists as
    a line "N: -> FLOCK ADVISORY WRITE PID ..."."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if fields[1:3] == ["->", "FLOCK"] and fields[5] == str(process.pid):
                return
        assert process.poll() is None, "users add exited without waiting for the lock"
        time.sleep(0.05)
    raise AssertionError(f"users add did not wait for the lock within {WAIT} s")


def finish(process: subprocess.Popen[str], password: str | None = None) -> str:
    """Send ``password`` (if given), wait for the exit and return stderr."""
    _, stderr = process.communicate(
        None if password is None else f"{password}\n", timeout=WAIT
    )
    assert process.returncode == 0, stderr
    return stderr


def test_concurrent_adds_keep_every_user(tmp_path: Path) -> None:
    path = tmp_path / "users"
    names = [f"user{index}" for index in range(8)]
    # Every process waits for its password on stdin, so sending them all at
    # once makes the processes hash, read and rewrite the file together.
    processes = [start_users_add(path, name) for name in names]
    time.sleep(1.0)
    for name, process in zip(names, processes, strict=True):
        assert process.stdin is not None
        process.stdin.write(f"password of {name}\n")
        process.stdin.flush()
    for process in processes:
        finish(process)

    users = load_users(path)
    assert sorted(users) == names
    for name in names:
        assert users[name].role is Role.PUSH
        assert users[name].password.verify(f"password of {name}")
    assert [entry.name for entry in tmp_path.iterdir()] == ["users"]


def test_add_waits_for_lock_holder(tmp_path: Path) -> None:
    path = tmp_path / "users"
    add_user(path, "alice", Role.PULL, "alice's password")
    with path.open() as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        process = start_users_add(path, "bob")
        assert process.stdin is not None
        process.stdin.write("bob's password\n")
        process.stdin.flush()
        wait_until_blocked_on_flock(process)
        assert sorted(load_users(path)) == ["alice"]
    finish(process)

    assert sorted(load_users(path)) == ["alice", "bob"]


def test_add_relocks_a_replaced_file(tmp_path: Path) -> None:
    """A run that waited on a file renamed away updates the new file."""
    path = tmp_path / "users"
    add_user(path, "alice", Role.PULL, "alice's password")
    with path.open() as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        process = start_users_add(path, "bob")
        assert process.stdin is not None
        process.stdin.write("bob's password\n")
        process.stdin.flush()
        wait_until_blocked_on_flock(process)
        # What another run does while holding the lock: rename a new file,
        # here one that lists carol only, over the locked one.
        replacement = tmp_path / "replacement"
        replacement.write_text(
            "carol:push:" + PasswordHash.create("carol's password").format() + "\n"
        )
        os.replace(replacement, path)
    finish(process)

    assert sorted(load_users(path)) == ["bob", "carol"]


def test_add_to_missing_file_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "users"

    added = add_user(path, "alice", Role.PUSH, "alice's password")

    assert added.replaced is False
    assert added.role is Role.PUSH
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(load_users(path)) == ["alice"]
    assert [entry.name for entry in tmp_path.iterdir()] == ["users"]


def valid_line(name: str) -> str:
    return f"{name}:pull:" + PasswordHash.create(f"password of {name}").format()


INVALID_FILES = {
    "no-role": (["alice:scrypt$1$2$3"], 1, "expected name:role:scrypt$..."),
    "bad-role": (["{alice}", "bob:admin:{hash}"], 2, "unknown role 'admin'"),
    "listed-twice": (["{alice}", "# a comment", "{alice}"], 3, "listed twice"),
}


def write_invalid_file(path: Path, case: str) -> bytes:
    lines, _, _ = INVALID_FILES[case]
    alice = valid_line("alice")
    text = "\n".join(
        line.format(alice=alice, hash=alice.split(":", 2)[2]) for line in lines
    )
    path.write_text(text + "\n")
    return path.read_bytes()


@pytest.mark.parametrize("case", list(INVALID_FILES))
def test_cli_add_rejects_invalid_file(case: str, tmp_path: Path) -> None:
    path = tmp_path / "users"
    before = write_invalid_file(path, case)
    _, line, reason = INVALID_FILES[case]

    process = start_users_add(path, "carol")
    _, stderr = process.communicate("carol's password\n", timeout=WAIT)

    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert f"users file {path} line {line}: " in stderr
    assert reason in stderr
    assert "the file is unchanged" in stderr
    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == ["users"]


@pytest.mark.parametrize("case", list(INVALID_FILES))
def test_add_rejects_invalid_file(case: str, tmp_path: Path) -> None:
    path = tmp_path / "users"
    before = write_invalid_file(path, case)
    _, line, reason = INVALID_FILES[case]

    with pytest.raises(AuthFileError) as raised:
        add_user(path, "carol", Role.PUSH, "carol's password")

    assert str(raised.value).startswith(f"users file {path} line {line}: ")
    assert reason in str(raised.value)
    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == ["users"]


def test_add_rejects_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(b"\xff\xfe not text\n")

    with pytest.raises(AuthFileError) as raised:
        add_user(path, "carol", Role.PUSH, "carol's password")

    assert str(raised.value).startswith(f"cannot read users file {path}: ")
    assert path.read_bytes() == b"\xff\xfe not text\n"


def test_add_keeps_comments_and_users(tmp_path: Path) -> None:
    path = tmp_path / "users"
    alice = valid_line("alice")
    path.write_text(f"# team\n{alice}\n\n")

    add_user(path, "bob", Role.PUSH, "bob's password")

    assert path.read_text().startswith(f"# team\n{alice}\n\n")
    assert sorted(load_users(path)) == ["alice", "bob"]


def users_add(auth_file: Path, name: str, password: str, *options: str) -> str:
    """Run `cairn users add NAME` with ``password`` on stdin; return stdout."""
    result = subprocess.run(
        users_add_argv(auth_file, name, *options),
        input=f"{password}\n",
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=clean_env(),
        timeout=WAIT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_new_user_gets_pull(tmp_path: Path) -> None:
    path = tmp_path / "users"

    output = users_add(path, "alice", "alice's password")

    assert output == f"user alice added in {path} with role pull\n"
    assert load_users(path)["alice"].role is Role.PULL


def test_cli_password_change_keeps_role(tmp_path: Path) -> None:
    path = tmp_path / "users"
    users_add(path, "bob", "bob's first password", "--role", "push")

    output = users_add(path, "bob", "bob's second password")

    assert output == f"user bob replaced in {path} with role push\n"
    bob = load_users(path)["bob"]
    assert bob.role is Role.PUSH
    assert bob.password.verify("bob's second password")
    assert not bob.password.verify("bob's first password")


@pytest.mark.parametrize(("before", "after"), [("push", "pull"), ("pull", "push")])
def test_cli_role_option_changes_role(tmp_path: Path, before: str, after: str) -> None:
    path = tmp_path / "users"
    users_add(path, "carol", "carol's password", "--role", before)

    output = users_add(path, "carol", "carol's password", "--role", after)

    assert output == f"user carol replaced in {path} with role {after}\n"
    assert load_users(path)["carol"].role is Role(after)


def test_add_without_role_keeps_role(tmp_path: Path) -> None:
    path = tmp_path / "users"
    add_user(path, "alice", Role.PULL, "alice's password")
    add_user(path, "bob", Role.PUSH, "bob's password")

    bob_replaced = add_user(path, "bob", None, "bob's new password")
    dave_added = add_user(path, "dave", None, "dave's password")

    assert bob_replaced == (Role.PUSH, True)
    assert dave_added == (DEFAULT_ROLE, False)
    users = load_users(path)
    assert users["alice"].role is Role.PULL
    assert users["bob"].role is Role.PUSH
    assert users["bob"].password.verify("bob's new password")
    assert users["dave"].role is DEFAULT_ROLE


def test_add_without_role_creates_file(tmp_path: Path) -> None:
    path = tmp_path / "users"

    added = add_user(path, "alice", None, "alice's password")

    assert added == (DEFAULT_ROLE, False)
    assert load_users(path)["alice"].role is Role.PULL


# ---- a users file behind a symbolic link, or owned by another account ---------


def test_add_through_symlink_changes_target(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    target = secrets / "users"
    add_user(target, "alice", Role.PULL, "alice's password")
    (tmp_path / "first-link").symlink_to(target)
    # A relative link to the link, so that the chain is followed to its end.
    link = tmp_path / "users"
    link.symlink_to("first-link")

    added = add_user(link, "bob", Role.PUSH, "bob's password")

    assert added.replaced is False
    assert link.is_symlink()
    assert os.readlink(link) == "first-link"
    assert os.readlink(tmp_path / "first-link") == str(target)
    assert not target.is_symlink()
    assert sorted(load_users(target)) == ["alice", "bob"]
    assert [entry.name for entry in secrets.iterdir()] == ["users"]
    assert sorted(entry.name for entry in tmp_path.iterdir()) == [
        "first-link",
        "secrets",
        "users",
    ]


def test_cli_add_through_dangling_symlink(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    target = secrets / "users"
    link = tmp_path / "users"
    link.symlink_to(target)

    process = start_users_add(link, "alice")
    try:
        _, stderr = process.communicate("alice's password\n", timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("users add did not finish on a link to a missing file")

    assert process.returncode == 0, stderr
    assert link.is_symlink()
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(load_users(target)) == ["alice"]
    assert [entry.name for entry in secrets.iterdir()] == ["users"]


def test_cli_add_through_symlink_locks_target(tmp_path: Path) -> None:
    target = tmp_path / "users"
    add_user(target, "alice", Role.PULL, "alice's password")
    link = tmp_path / "users-link"
    link.symlink_to(target)
    with target.open() as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        process = start_users_add(link, "bob")
        assert process.stdin is not None
        process.stdin.write("bob's password\n")
        process.stdin.flush()
        wait_until_blocked_on_flock(process)
        assert sorted(load_users(target)) == ["alice"]
    finish(process)

    assert link.is_symlink()
    assert sorted(load_users(target)) == ["alice", "bob"]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [(0o640, 0o640), (0o400, 0o400), (0o644, 0o640), (0o666, 0o660)],
    ids=oct,
)
def test_add_keeps_mode(mode: int, expected: int, tmp_path: Path) -> None:
    # The mode stays, except that others lose every permission.
    path = tmp_path / "users"
    path.write_text(valid_line("alice") + "\n")
    path.chmod(mode)

    add_user(path, "bob", Role.PUSH, "bob's password")

    assert path.stat().st_mode & 0o7777 == expected
    assert sorted(load_users(path)) == ["alice", "bob"]


def _nobody() -> tuple[int, int]:
    account = pwd.getpwnam("nobody")
    return account.pw_uid, account.pw_gid


def test_add_keeps_owner_and_group(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give the users file to another account")
    uid, gid = _nobody()
    path = tmp_path / "users"
    path.write_text(valid_line("alice") + "\n")
    os.chown(path, uid, gid)
    path.chmod(0o640)

    add_user(path, "bob", Role.PUSH, "bob's password")

    status = path.stat()
    assert status.st_uid == uid
    assert status.st_gid == gid
    assert status.st_mode & 0o7777 == 0o640
    assert sorted(load_users(path)) == ["alice", "bob"]
    assert [entry.name for entry in tmp_path.iterdir()] == ["users"]


def test_cli_add_rejects_owner_it_cannot_keep() -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can set up a file that another account may write")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    uid, gid = _nobody()
    # pytest's own temporary directories are closed to other accounts.
    directory = Path(tempfile.mkdtemp(prefix="cairn-users-"))
    try:
        directory.chmod(0o777)
        path = directory / "users"
        path.write_text(valid_line("alice") + "\n")
        path.chmod(0o666)
        before = path.read_bytes()

        command = [sys.executable, "-m", "engine.cli", "users", "add"]
        completed = subprocess.run(
            [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={gid}",
                "--clear-groups",
                *command,
                "--auth-file",
                str(path),
                "bob",
            ],
            input="bob's password\n",
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=WAIT,
        )

        assert completed.returncode == 1, completed.stderr
        assert "Traceback" not in completed.stderr
        assert f"cannot keep the owner 0 and group 0 of users file {path}: " in (
            completed.stderr
        )
        assert "the file is unchanged" in completed.stderr
        assert path.read_bytes() == before
        assert path.stat().st_uid == 0
        assert [entry.name for entry in directory.iterdir()] == ["users"]
    finally:
        shutil.rmtree(directory)
