"""SQLite group commit: writers that share one transaction keep their
failures to themselves."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine.db import Database, sqlite_url

pytestmark = pytest.mark.timeout(60)


class Boom(Exception):
    pass


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database(sqlite_url(tmp_path))
    with db.transaction() as conn:
        conn.exec_driver_sql("CREATE TABLE items (name TEXT PRIMARY KEY)")
    yield db
    db.dispose()


def names(db: Database) -> set[str]:
    with db.read() as conn:
        return set(conn.execute(sa.text("SELECT name FROM items")).scalars())


def insert(conn: sa.Connection, name: str) -> None:
    conn.execute(sa.text("INSERT INTO items (name) VALUES (:name)"), {"name": name})


def wait_for_waiters(db: Database, count: int) -> None:
    deadline = time.monotonic() + 10
    while db._group._waiting < count:
        assert time.monotonic() < deadline, "writers never queued"
        time.sleep(0.001)


def run_members(db: Database, first: str, others: list[str], failing: set[str]):
    """Run a first member that keeps its turn until every other member waits,
    so that all of them join its transaction. Return each name's error."""
    errors: dict[str, BaseException | None] = {}

    def member(name: str, hold: bool) -> None:
        try:
            with db.transaction() as conn:
                insert(conn, name)
                if hold:
                    wait_for_waiters(db, len(others))
                if name in failing:
                    raise Boom(name)
            errors[name] = None
        except BaseException as exc:
            errors[name] = exc

    leader = threading.Thread(target=member, args=(first, True))
    leader.start()
    while db._group._open is None:
        time.sleep(0.001)
    threads = [threading.Thread(target=member, args=(n, False)) for n in others]
    for thread in threads:
        thread.start()
    for thread in [leader, *threads]:
        thread.join()
    return errors


def test_failed_first_member_leaves_nothing(database: Database) -> None:
    with pytest.raises(Boom), database.transaction() as conn:
        insert(conn, "lost")
        raise Boom()
    with database.transaction() as conn:
        insert(conn, "kept")
    assert names(database) == {"kept"}


def test_first_member_rollback_request(database: Database) -> None:
    with database.scratch() as conn:
        insert(conn, "scratch")
    assert names(database) == set()


def test_failed_later_member_rolls_back_alone(database: Database) -> None:
    errors = run_members(database, "a", ["b", "c", "d"], failing={"c"})
    assert isinstance(errors["c"], Boom)
    assert errors["a"] is None
    assert errors["b"] is None
    assert errors["d"] is None
    assert names(database) == {"a", "b", "d"}


def test_failed_first_member_spares_waiters(database: Database) -> None:
    errors = run_members(database, "a", ["b", "c"], failing={"a"})
    assert isinstance(errors["a"], Boom)
    assert errors["b"] is None
    assert errors["c"] is None
    assert names(database) == {"b", "c"}


def test_constraint_error_in_later_member(database: Database) -> None:
    with database.transaction() as conn:
        insert(conn, "taken")
    errors = run_members(database, "a", ["taken", "b"], failing=set())
    assert isinstance(errors["taken"], sa.exc.IntegrityError)
    assert errors["a"] is None
    assert errors["b"] is None
    assert names(database) == {"taken", "a", "b"}
