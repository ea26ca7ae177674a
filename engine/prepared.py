"""Prebuilt statements run on the driver's own cursor.

``Connection.execute`` spends about 50 microseconds a statement in SQLAlchemy
on top of the driver's own time, and a manifest PUT runs over twenty
statements. The write path and the listings run their statements through
``Prepared`` instead.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.compiler import SQLCompiler


class Prepared:
    """A prebuilt statement run on the driver's own cursor.

    It is compiled once per dialect and set of parameter names. Each call
    applies the bind and result processors of the column types, as
    SQLAlchemy would, and runs the SQL on the connection's DBAPI cursor
    inside the caller's transaction. Driver errors are raised as
    SQLAlchemy's DBAPIError subclasses. Statements with expanding IN
    parameters are not supported: give each list length its own statement
    (see ``in_list``).
    """

    def __init__(self, statement: sa.ClauseElement) -> None:
        self.statement = statement
        self._plans: dict[tuple[str, tuple[str, ...]], _Plan] = {}

    def execute(self, conn: Connection, params: dict[str, Any] | None = None) -> Rows:
        """Run the statement once with ``params`` and return its rows."""
        values = params or {}
        plan = self._plan(conn, tuple(values))
        arguments = plan.arguments(values)
        cursor = conn.connection.cursor()
        try:
            try:
                cursor.execute(plan.sql, arguments)
            except conn.dialect.loaded_dbapi.Error as error:
                raise _wrap(conn, plan.sql, arguments, error) from error
            fetched = cursor.fetchall() if cursor.description else []
            return Rows(plan, fetched, cursor.rowcount)
        finally:
            cursor.close()

    def executemany(self, conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
        """Run the statement once for each of ``rows``, which share their keys."""
        if not rows:
            return
        plan = self._plan(conn, tuple(rows[0]))
        arguments = [plan.arguments(row) for row in rows]
        cursor = conn.connection.cursor()
        try:
            cursor.executemany(plan.sql, arguments)
        except conn.dialect.loaded_dbapi.Error as error:
            raise _wrap(conn, plan.sql, arguments, error) from error
        finally:
            cursor.close()

    def _plan(self, conn: Connection, names: tuple[str, ...]) -> _Plan:
        key = (conn.dialect.name, names)
        plan = self._plans.get(key)
        if plan is None:
            plan = _Plan(self.statement, conn.dialect, names)
            self._plans[key] = plan
        return plan


def execute_driver_sql(conn: Connection, sql: str) -> None:
    """Run one statement without parameters or results, such as SAVEPOINT,
    on the connection's DBAPI cursor."""
    cursor = conn.connection.cursor()
    try:
        cursor.execute(sql)
    except conn.dialect.loaded_dbapi.Error as error:
        raise _wrap(conn, sql, (), error) from error
    finally:
        cursor.close()


def in_list(column: sa.ColumnElement[Any], prefix: str, count: int) -> Any:
    """Return ``column IN (:prefix_0, ..., :prefix_N)`` with ``count`` plain
    bind parameters, the form of IN that Prepared can run."""
    return column.in_([sa.bindparam(f"{prefix}_{index}") for index in range(count)])


class _Plan:
    """One compiled form of a Prepared statement, with its type processors."""

    def __init__(
        self, statement: sa.ClauseElement, dialect: sa.Dialect, names: tuple[str, ...]
    ) -> None:
        compiled = cast(
            SQLCompiler, statement.compile(dialect=dialect, column_keys=list(names))
        )
        if compiled.escaped_bind_names or "POSTCOMPILE" in compiled.string:
            raise ValueError(
                "Prepared cannot run expanding or escaped bind parameters: "
                f"{compiled.string}"
            )
        self.sql = compiled.string

        # Each bind as (name, key in the caller's parameters, default,
        # required, processor). A literal value in the statement has no key
        # in the parameters, so its default is used.
        binds = []
        for bind, name in compiled.bind_names.items():
            key = bind.key if bind.key in names else name
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            binds.append((name, key, bind.effective_value, bind.required, processor))
        order = compiled.positiontup
        if order is not None:
            by_name = {bind[0]: bind for bind in binds}
            binds = [by_name[name] for name in order]
        self._binds = binds
        self._positional = order is not None

        self.fields: tuple[str, ...] = ()
        self.result_processors: list[Any] = []
        if isinstance(statement, sa.Select):
            columns = list(statement.selected_columns)
            self.fields = tuple(str(column.key) for column in columns)
            self.result_processors = [
                column.type.dialect_impl(dialect).result_processor(dialect, None)
                for column in columns
            ]
        self.row_type: Any = collections.namedtuple(  # type: ignore[misc]
            "Row", self.fields, rename=True
        )

    def arguments(self, params: dict[str, Any]) -> Any:
        values = []
        for name, key, default, required, processor in self._binds:
            if key in params:
                value = params[key]
            elif required:
                raise sa.exc.ArgumentError(f"missing value for bind parameter {key!r}")
            else:
                value = default
            values.append((name, value if processor is None else processor(value)))
        if self._positional:
            return [value for _name, value in values]
        return dict(values)


class Rows:
    """The rows a Prepared statement returned, with the accessors of a
    SQLAlchemy Result that cairn uses."""

    def __init__(self, plan: _Plan, fetched: Sequence[Any], rowcount: int) -> None:
        processors = plan.result_processors
        if any(processor is not None for processor in processors):
            fetched = [
                tuple(
                    value if processor is None else processor(value)
                    for processor, value in zip(processors, row, strict=True)
                )
                for row in fetched
            ]
        self._plan = plan
        self.tuples: Sequence[tuple[Any, ...]] = fetched
        self.rowcount = rowcount

    def all(self) -> list[Any]:
        make = self._plan.row_type._make
        return [make(row) for row in self.tuples]

    def first(self) -> Any:
        return self._plan.row_type._make(self.tuples[0]) if self.tuples else None

    def one(self) -> Any:
        """Return the only row, and raise unless there is exactly one."""
        self._check_at_most_one()
        if not self.tuples:
            raise sa.exc.NoResultFound("no row was found when one was required")
        return self._plan.row_type._make(self.tuples[0])

    def one_or_none(self) -> Any:
        """Return the only row or None, and raise if there are several."""
        self._check_at_most_one()
        return self.first()

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalar_one_or_none(self) -> Any:
        row = self.one_or_none()
        return None if row is None else row[0]

    def _check_at_most_one(self) -> None:
        if len(self.tuples) > 1:
            raise sa.exc.MultipleResultsFound(
                f"{len(self.tuples)} rows were found when one was required"
            )

    def mapping(self) -> dict[str, Any] | None:
        """Return the first row as a dict of column name to value, or None."""
        if not self.tuples:
            return None
        return dict(zip(self._plan.fields, self.tuples[0], strict=True))

    def scalar(self) -> Any:
        return self.tuples[0][0] if self.tuples else None

    def scalars(self) -> list[Any]:
        return [row[0] for row in self.tuples]


def _wrap(
    conn: Connection, sql: str, arguments: Any, error: Exception
) -> sa.exc.DBAPIError:
    dbapi_error = conn.dialect.loaded_dbapi.Error
    wrapped = sa.exc.DBAPIError.instance(sql, arguments, error, dbapi_error)
    return wrapped  # type: ignore[return-value]
