"""`cairn users add` run by several processes at once on one users file."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from engine.api.auth import PasswordHash, Role, add_user, load_users

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT = 120.0


def start_users_add(auth_file: Path, name: str) -> subprocess.Popen[str]:
    """Start `cairn users add NAME`; it reads the password from stdin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRN_")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "users",
            "add",
            "--auth-file",
            str(auth_file),
            name,
            "--role",
            "push",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )


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
        time.sleep(3.0)
        assert process.poll() is None, "users add did not wait for the lock"
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
        time.sleep(3.0)
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

    replaced = add_user(path, "alice", Role.PUSH, "alice's password")

    assert replaced is False
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(load_users(path)) == ["alice"]
    assert [entry.name for entry in tmp_path.iterdir()] == ["users"]
