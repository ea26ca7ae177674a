"""The `cairn` command line."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from engine.config import (
    StorageSettings,
    add_storage_options,
    env_default,
    parse_ascii_integer,
    parse_file_path,
)
from engine.logs import configure_logging

if TYPE_CHECKING:
    from engine.gc import GcReport
    from engine.registry import Registry

log = structlog.get_logger(__name__)


class StorageUnavailable(Exception):
    """A data directory or database that a command cannot use, with a
    one-line message for standard error."""


def report_storage_error(error: StorageUnavailable) -> int:
    """Print ``error`` as one line on standard error and return 1.

    The error is not logged as well, because the user fixes it from this
    line, and a second copy on standard error only repeats it.
    """
    print(f"cairn: {error}", file=sys.stderr)
    return 1


def database_label(settings: StorageSettings) -> str:
    """Return the database URL to show to an operator, its password hidden."""
    from engine.database_url import redacted_database_url
    from engine.db import sqlite_url

    return redacted_database_url(settings.database_url or sqlite_url(settings.data_dir))


@contextmanager
def storage_errors(settings: StorageSettings) -> Iterator[None]:
    """Raise StorageUnavailable when the data directory or the database fails."""
    import sqlalchemy as sa

    from engine.identity import MissingRegistryId
    from engine.migrate import ForeignTables, NoSchema, OutdatedSchema, UnknownRevision
    from engine.sqlite_read_only import SqliteChanged, SqliteUnreadable

    data_dir = settings.data_dir.absolute()
    try:
        yield
    except SqliteUnreadable as error:
        if error.directory.absolute() == data_dir:
            raise StorageUnavailable(
                f"cannot use data directory {data_dir}: not writable, and "
                f"{error.reason}"
            ) from error
        database = database_label(settings)
        raise StorageUnavailable(f"cannot use database {database}: {error}") from error
    except SqliteChanged as error:
        database = database_label(settings)
        raise StorageUnavailable(f"cannot use database {database}: {error}") from error
    except OutdatedSchema as error:
        database = database_label(settings)
        raise StorageUnavailable(
            f"cannot use database {database}: its schema is at revision "
            f"{error.revision}, older than this cairn's newest, {error.newest}, "
            "and a command that only reads does not upgrade it; run `cairn db "
            "upgrade` first, as a user who may write the database"
        ) from error
    except MissingRegistryId as error:
        database = database_label(settings)
        raise StorageUnavailable(
            f"cannot use database {database}: its registry id is missing, and a "
            "command that only reads does not create it; start cairn serve "
            "once, as a user who may write the database, which creates it"
        ) from error
    except OSError as error:
        reason = error.strerror or str(error)
        failed_path = error.filename
        if failed_path is not None and Path(failed_path).absolute() != data_dir:
            reason = f"{reason}: {failed_path}"
        raise StorageUnavailable(
            f"cannot use data directory {data_dir}: {reason}"
        ) from error
    except UnknownRevision as error:
        database = database_label(settings)
        raise StorageUnavailable(
            f"cannot use database {database}: its schema is at revision "
            f"{error.revision}, which this cairn does not know (its newest is "
            f"{error.newest}); run the cairn version that upgraded it, or "
            "restore the database from a backup made before that upgrade"
        ) from error
    except NoSchema as error:
        database = database_label(settings)
        raise StorageUnavailable(
            f"cannot use database {database}: it contains no cairn schema; "
            "check --database or CAIRN_DATABASE_URL, or create the schema "
            "with `cairn db upgrade`"
        ) from error
    except ForeignTables as error:
        database = database_label(settings)
        raise StorageUnavailable(
            f"cannot use database {database}: it contains no cairn schema but "
            f"has tables named {', '.join(error.names)}, which cairn would "
            "create; point --database or CAIRN_DATABASE_URL at an empty "
            "database or at a cairn database"
        ) from error
    except sa.exc.ProgrammingError as error:
        # PostgreSQL's insufficient_privilege. Other programming errors are
        # bugs and keep their traceback.
        if getattr(error.orig, "sqlstate", None) != INSUFFICIENT_PRIVILEGE:
            raise
        raise _denied(settings, _first_line(error.orig)) from error
    except sa.exc.DatabaseError as error:
        # OperationalError covers a database that cannot be reached or is
        # locked. A plain DatabaseError is SQLite's for a damaged file ("file
        # is not a database"). Other subclasses, such as IntegrityError,
        # are bugs and keep their traceback.
        if type(error) not in (sa.exc.OperationalError, sa.exc.DatabaseError):
            raise
        database = database_label(settings)
        raise StorageUnavailable(
            f"cannot use database {database}: {_first_line(error.orig)}"
        ) from error
    except Exception as error:
        # A driver error that no SQLAlchemy statement wrapped, such as one of
        # the statements that a rebuild runs on the driver's connection.
        if getattr(error, "sqlstate", None) != INSUFFICIENT_PRIVILEGE:
            raise
        raise _denied(settings, _first_line(error)) from error


# PostgreSQL's SQLSTATE for a missing privilege or ownership.
INSUFFICIENT_PRIVILEGE = "42501"


def _denied(settings: StorageSettings, reason: str) -> StorageUnavailable:
    """Return the error for a statement that PostgreSQL refused to the
    user, with what the commands need."""
    return StorageUnavailable(
        f"cannot use database {database_label(settings)}: {reason}; run the "
        "command as the database user that owns cairn's tables, such as the "
        "one that ran `cairn db upgrade` (verify and gc --dry-run need only "
        "to read them and to create temporary tables)"
    )


def _first_line(driver_error: BaseException | None) -> str:
    """Return the first line of the driver's message. psycopg adds hint
    lines after it."""
    lines = str(driver_error).strip().splitlines()
    return lines[0] if lines else type(driver_error).__name__


def check_database_url(settings: StorageSettings) -> None:
    """Raise StorageUnavailable unless the URL names SQLite or PostgreSQL.

    The --database option checks its value as it is parsed, so this only
    catches settings that did not come from it.
    """
    from engine.database_url import check_database_url as check_url

    if not settings.database_url:
        return
    try:
        check_url(settings.database_url)
    except ValueError as error:
        raise StorageUnavailable(str(error)) from error


def check_data_dir(settings: StorageSettings, *, create: bool) -> None:
    """Raise StorageUnavailable unless the data directory is usable.

    A missing directory passes when ``create`` is true. Otherwise the
    directory must contain what `cairn serve` and `cairn db upgrade` create
    in it: ``blobs/``, and ``cairn.db`` unless the database is PostgreSQL.
    """
    from engine.db import SQLITE_FILE

    data_dir = settings.data_dir.absolute()
    hint = "check --data-dir or CAIRN_DATA_DIR"
    try:
        mode = data_dir.stat().st_mode
    except FileNotFoundError:
        if create:
            return
        raise StorageUnavailable(
            f"data directory {data_dir} not found: {hint}"
        ) from None
    if not stat.S_ISDIR(mode):
        raise StorageUnavailable(
            f"cannot use data directory {data_dir}: Not a directory",
        )
    if create:
        return

    expected = ["blobs"] if settings.database_url else ["blobs", SQLITE_FILE]
    missing = [name for name in expected if not (data_dir / name).exists()]
    if missing:
        raise StorageUnavailable(
            f"data directory {data_dir} contains no cairn data "
            f"({' and '.join(missing)} not found): {hint}",
        )


def check_writable(registry: Registry, settings: StorageSettings) -> None:
    """Raise StorageUnavailable unless blobs and uploads can be written."""
    data_dir = settings.data_dir.absolute()
    paths = registry.blob_store.paths
    for directory in (paths.root, paths.root / "blobs", paths.staging_dir):
        if os.access(directory, os.W_OK | os.X_OK):
            continue
        reason = "not writable"
        if directory.absolute() != data_dir:
            reason = f"{directory} is not writable"
        raise StorageUnavailable(f"cannot use data directory {data_dir}: {reason}")


# The privileges without which no push can commit: appending to the log,
# and the row lock on its head that every append takes.
POSTGRES_WRITE_PRIVILEGES = (("events", "INSERT"), ("log_head", "UPDATE"))


def check_postgres_writable(registry: Registry, settings: StorageSettings) -> None:
    """Raise StorageUnavailable when the PostgreSQL user lacks one of
    POSTGRES_WRITE_PRIVILEGES.

    Without them, every push fails with a permission error. A role that
    may not update or delete events still passes, so an operator may take
    those privileges away to keep the log append-only.
    """
    import sqlalchemy as sa

    query = sa.text("SELECT current_user, has_table_privilege(:table, :privilege)")
    with registry.database.read() as conn:
        for table, privilege in POSTGRES_WRITE_PRIVILEGES:
            user, granted = conn.execute(
                query, {"table": table, "privilege": privilege}
            ).one()
            if not granted:
                raise StorageUnavailable(
                    f"cannot use database {database_label(settings)}: user "
                    f"{user} lacks the {privilege} privilege on table {table}, "
                    "which every change to the registry needs; grant INSERT, "
                    "UPDATE and DELETE on cairn's tables, or connect as the "
                    "user that ran `cairn db upgrade`"
                )


def check_sqlite_writable(settings: StorageSettings) -> None:
    """Raise StorageUnavailable when an existing SQLite database file, or the
    directory where SQLite creates its -wal and -shm files, is not writable.

    SQLite's own error for them, "attempt to write a readonly database",
    names neither the file nor the directory.
    """
    from engine.db import SQLITE_FILE

    if settings.database_url is None:
        sqlite_file: Path | None = settings.data_dir / SQLITE_FILE
    else:
        sqlite_file = _sqlite_file(settings.database_url)
    if sqlite_file is None or not sqlite_file.exists():
        return
    data_dir = settings.data_dir.absolute()
    directory = sqlite_file.parent.absolute()
    checks = ((directory, os.W_OK | os.X_OK), (sqlite_file.absolute(), os.W_OK))
    for path, access in checks:
        if os.access(path, access):
            continue
        if directory != data_dir:
            database = database_label(settings)
            raise StorageUnavailable(
                f"cannot use database {database}: {path} is not writable"
            )
        reason = "not writable" if path == directory else f"{path} is not writable"
        raise StorageUnavailable(f"cannot use data directory {data_dir}: {reason}")


def open_registry(
    settings: StorageSettings,
    *,
    create: bool,
    writable: bool = False,
    read_only: bool = False,
    upgrade_schema: bool = True,
    adopt_data_dir: bool = False,
    require_data_dir: bool = False,
) -> Registry:
    """Open the registry and bring its schema up to date.

    ``create`` allows a missing data directory, which is then created, and
    ``writable`` also checks that blobs and uploads can be written. With
    ``read_only`` nothing is written to the data directory or to a SQLite
    database, and a schema that is not up to date raises StorageUnavailable
    instead of being upgraded. With ``upgrade_schema`` false the caller
    runs the migrations. The data
    directory's registry-id file is checked against the database (see
    engine.identity.bind_data_dir): ``adopt_data_dir`` writes a missing
    one, and ``require_data_dir`` rejects a directory with blobs but no
    file. The default SQLite database lives in the data directory, so the
    two belong together: a writable open of it adopts the directory, and
    a read-only one requires no file. Raises StorageUnavailable with a
    one-line message when the data directory or the database cannot be
    used.
    """
    from engine.identity import DataDirMismatch, bind_data_dir
    from engine.migrate import check_schema, current_revision, upgrade
    from engine.registry import Registry

    if read_only and (create or writable):
        raise ValueError("a read-only open can neither create nor write")
    check_database_url(settings)
    with storage_errors(settings):
        if settings.database_url is None:
            _check_default_database(settings)
        check_data_dir(settings, create=create)
        if not read_only:
            check_sqlite_writable(settings)
        sqlite_file = _sqlite_file(settings.database_url)
        if sqlite_file is not None and not sqlite_file.exists():
            # Opening the file would create it, empty.
            if not create:
                raise StorageUnavailable(
                    f"cannot use database {database_label(settings)}: "
                    f"{sqlite_file} does not exist; check --database or "
                    "CAIRN_DATABASE_URL, or create the schema with "
                    "`cairn db upgrade`"
                )
            try:
                _check_unbound_data_dir(settings)
            except DataDirMismatch as error:
                raise StorageUnavailable(str(error)) from error
        try:
            registry = Registry.open(
                settings.data_dir, settings.database_url, read_only=read_only
            )
        except ImportError as error:
            database = database_label(settings)
            raise StorageUnavailable(
                f"cannot use database {database}: its driver is not installed "
                f"({error})",
            ) from error
    try:
        with storage_errors(settings):
            if writable:
                check_writable(registry, settings)
            if (
                create
                and settings.database_url is not None
                and current_revision(registry.database) is None
            ):
                _check_unbound_data_dir(settings)
            if upgrade_schema:
                if read_only:
                    check_schema(registry.database)
                else:
                    upgrade(registry.database, create=create)
                bind_data_dir(
                    settings.data_dir,
                    registry.registry_id(),
                    adopt=adopt_data_dir
                    or (writable and settings.database_url is None),
                    require=require_data_dir and settings.database_url is not None,
                    # The default database lives in the data directory, so
                    # only a --database can belong to another registry.
                    database=(
                        registry.database if settings.database_url is not None else None
                    ),
                )
            if writable and not registry.database.is_sqlite:
                check_postgres_writable(registry, settings)
    except DataDirMismatch as error:
        registry.database.dispose()
        raise StorageUnavailable(str(error)) from error
    except StorageUnavailable:
        registry.database.dispose()
        raise
    return registry


def _sqlite_file(database_url: str | None) -> Path | None:
    """Return the file that a --database SQLite URL names, else None."""
    import sqlalchemy as sa

    if database_url is None:
        return None
    url = sa.engine.make_url(database_url)
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    return Path(url.database)


def _check_default_database(settings: StorageSettings) -> None:
    """Raise StorageUnavailable before the default SQLite database is created
    in a data directory whose registry-id file names a registry: that
    registry's database is elsewhere, or was lost, and a new one would hold
    none of its events."""
    from engine.db import SQLITE_FILE
    from engine.identity import recorded_registry_id

    default_file = settings.data_dir / SQLITE_FILE
    if default_file.exists():
        return
    recorded = recorded_registry_id(settings.data_dir)
    if recorded is not None:
        raise StorageUnavailable(
            f"data directory {settings.data_dir.absolute()} contains the blobs "
            f"of registry {recorded}, but no database was given and "
            f"{default_file.absolute()} does not exist: name that registry's "
            "database with --database or CAIRN_DATABASE_URL, or restore "
            f"{SQLITE_FILE} from a backup"
        )


def _check_unbound_data_dir(settings: StorageSettings) -> None:
    """Raise DataDirMismatch before a --database without cairn's schema gets
    one, when the data directory's registry-id file names a registry: that
    registry's database has a schema, so this database is another one."""
    from engine.identity import DataDirMismatch, recorded_registry_id

    recorded = recorded_registry_id(settings.data_dir)
    if recorded is not None:
        raise DataDirMismatch(
            f"data directory {settings.data_dir.absolute()} contains the blobs "
            f"of registry {recorded}, but the database "
            f"{database_label(settings)} has no cairn schema, so it is not "
            "that registry's: point --data-dir and --database at the same "
            "registry"
        )


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from engine.migrate import upgrade

    settings = StorageSettings.from_args(args)
    registry = open_registry(settings, create=True, upgrade_schema=False)
    with storage_errors(settings):
        before, after = upgrade(registry.database)
    if before == after:
        print(f"schema is up to date at revision {after}")
    elif before is None:
        print(f"schema created at revision {after}")
    else:
        print(f"schema upgraded from revision {before} to {after}")
    return 0


def _backup_file(value: str) -> Path:
    """Return the backup's file name as a Path; reject an empty one."""
    if not value:
        raise argparse.ArgumentTypeError("an empty name names no file")
    return Path(value)


def _cmd_db_backup(args: argparse.Namespace) -> int:
    import sqlite3

    from engine.db import SQLITE_FILE
    from engine.sqlite_backup import BackupTargetExists, backup_sqlite

    settings = StorageSettings.from_args(args)
    registry = open_registry(settings, create=False, read_only=True)
    is_sqlite = registry.database.is_sqlite
    registry.database.dispose()
    if not is_sqlite:
        print(
            "cairn db backup: the database is PostgreSQL, whose own tool makes "
            "the backup: pg_dump -Fc -f FILE DATABASE",
            file=sys.stderr,
        )
        return 2
    source = _sqlite_file(settings.database_url) or settings.data_dir / SQLITE_FILE
    try:
        position = backup_sqlite(source, args.file)
    except (OSError, sqlite3.Error) as error:
        reason = getattr(error, "strerror", None) or str(error)
        failed = getattr(error, "filename", None)
        if failed is not None:
            reason = f"{reason}: {failed}"
        print(
            f"cairn db backup: cannot copy {source} to {args.file}: {reason}",
            file=sys.stderr,
        )
        return 1
    except BackupTargetExists:
        print(
            f"cairn db backup: {args.file} exists; name a new file, because a "
            "backup never replaces one",
            file=sys.stderr,
        )
        return 1
    data_dir = settings.data_dir
    print(
        f"database backed up to {args.file} up to log position {position}; "
        f"now copy {data_dir / 'blobs'} and {data_dir / 'registry-id'}"
    )
    return 0


def _cmd_rebuild(args: argparse.Namespace) -> int:
    from engine.projections.rebuild import rebuild_projections

    settings = StorageSettings.from_args(args)
    registry = open_registry(settings, create=False)
    with storage_errors(settings):
        position = rebuild_projections(registry.database)
    print(f"projections rebuilt up to position {position}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from engine.verify import (
        check_manifest_contents_present,
        check_stored_manifests,
        verify,
    )

    settings = StorageSettings.from_args(args)
    registry = open_registry(settings, create=False, read_only=True)
    try:
        with storage_errors(settings):
            problems = verify(registry)
            warnings = check_stored_manifests(registry)
            warnings += check_manifest_contents_present(registry)
            registry.database.check_unchanged()
    finally:
        registry.database.dispose()
    log.info("verify_finished", problems=len(problems), warnings=len(warnings))
    for warning in warnings:
        print(f"warning: {warning}")
    for problem in problems:
        print(f"problem: {problem}")
    counted = f", {len(warnings)} warning(s)" if warnings else ""
    if problems:
        print(f"{len(problems)} problem(s) found{counted}")
        return 1
    print(f"log, blobs and projections verified: no problems found{counted}")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from engine.gc import GarbageCollectionFailed, collect_garbage

    settings = StorageSettings.from_args(args)
    registry = open_registry(
        settings,
        create=False,
        writable=not args.dry_run,
        read_only=args.dry_run,
        require_data_dir=True,
    )
    try:
        with storage_errors(settings):
            try:
                report = collect_garbage(
                    registry,
                    grace_period=timedelta(minutes=args.grace_period),
                    upload_expiry=timedelta(hours=args.upload_expiry),
                    dry_run=args.dry_run,
                    unlink_unreferenced=args.unlink_unreferenced,
                )
                registry.database.check_unchanged()
            except GarbageCollectionFailed as failure:
                # What the run removed before the error, then the error,
                # which storage_errors turns into the one-line message.
                _print_failed_gc_report(failure.report, args.unlink_unreferenced)
                raise failure.error from None
    finally:
        registry.database.dispose()
    _print_gc_report(report, args.unlink_unreferenced, False)
    return 0


def _print_failed_gc_report(report: GcReport, unlink_unreferenced: bool) -> None:
    """Print the report of a gc run that an error stopped.

    A standard output whose reader has gone is discarded, because the
    error that stopped the run is what the exit status and message report.
    """
    from engine.stdout import discard_stdout

    try:
        _print_gc_report(report, unlink_unreferenced, True)
        sys.stdout.flush()
    except BrokenPipeError:
        discard_stdout()


def _print_gc_report(report: GcReport, unlink_unreferenced: bool, failed: bool) -> None:
    """Print what a gc run removed, or with a dry run would remove. With
    ``failed``, the last line adds that an error stopped the run."""
    counts = (
        f"{len(report.blobs)} blob file(s), "
        f"{len(report.staging_files)} staging file(s), "
        f"{len(report.upload_sessions)} expired upload session(s) and "
        f"{len(report.directories)} empty blob directory(ies)"
    )
    unlinked_repositories = len({link.repository for link in report.unlinked})
    unlinked = (
        f"{len(report.unlinked)} unreferenced blob link(s) in "
        f"{unlinked_repositories} repository(ies)"
    )
    stopped = " before an error stopped the run" if failed else ""
    if not report.dry_run:
        if unlink_unreferenced:
            print(f"deleted {unlinked}")
        print(f"removed {counts}, freed {report.bytes} bytes{stopped}")
        return
    for link in report.unlinked:
        print(f"would delete the link of {link.digest} in {link.repository}")
    if unlink_unreferenced:
        print(f"dry run: would delete {unlinked}")
    for blob in report.blobs:
        print(f"would remove blob {blob.digest} ({blob.size} bytes)")
    for staged in report.staging_files:
        print(f"would remove staging file {staged.path} ({staged.size} bytes)")
    for session in report.upload_sessions:
        print(f"would remove upload session {session}")
    for directory in report.directories:
        print(f"would remove empty directory {directory}")
    print(f"dry run: would remove {counts}, freeing {report.bytes} bytes{stopped}")


def add_gc_options(parser: argparse.ArgumentParser) -> None:
    from engine.api.options import add_upload_expiry_option, parse_minutes
    from engine.gc import DEFAULT_GRACE_PERIOD

    add_storage_options(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the files that would be removed and the bytes they take, "
        "and remove nothing",
    )
    default_minutes = DEFAULT_GRACE_PERIOD.total_seconds() / 60
    parser.add_argument(
        "--grace-period",
        type=parse_minutes,
        default=env_default("GC_GRACE_PERIOD", f"{default_minutes:g}"),
        metavar="MINUTES",
        help="minutes since its last write or reuse during which a blob file is "
        "kept even when nothing links it, so that a push in progress can link "
        f"it (env CAIRN_GC_GRACE_PERIOD; default {default_minutes:g})",
    )
    parser.add_argument(
        "--unlink-unreferenced",
        action="store_true",
        help="first delete each blob link that no manifest of its repository "
        "references and that is older than the grace period, appending a "
        "blob.deleted event for each, so that the layers of deleted images "
        "are removed too",
    )
    add_upload_expiry_option(parser)


def _cmd_serve(args: argparse.Namespace) -> int:
    from engine.api.server import serve

    return serve(args)


def _cmd_events_tail(args: argparse.Namespace) -> int:
    from engine.bus.tail import tail

    return tail(args)


def _cmd_events_republish(args: argparse.Namespace) -> int:
    from engine.bus.reset import RelayRunning, reset_checkpoint

    stream: str = args.stream
    settings = StorageSettings.from_args(args)
    registry = open_registry(settings, create=False)
    try:
        with storage_errors(settings):
            reset = reset_checkpoint(
                registry.database, settings.data_dir, stream, args.from_position
            )
    except (RelayRunning, ValueError) as error:
        print(f"cairn events republish: {error}", file=sys.stderr)
        return 1
    finally:
        registry.database.dispose()
    log.info(
        "relay_checkpoint_reset",
        stream=stream,
        previous=reset.previous,
        checkpoint=reset.checkpoint,
        generation=reset.generation,
        head=reset.head,
    )
    outcome = "the log has no event after it"
    if reset.checkpoint < reset.head:
        outcome = (
            f"cairn serve publishes positions {reset.checkpoint + 1} to "
            f"{reset.head} again when it starts"
        )
    print(
        f"relay checkpoint of stream {stream} set from {reset.previous} to "
        f"{reset.checkpoint}: {outcome}"
    )
    return 0


def _cmd_webhook(args: argparse.Namespace) -> int:
    from consumers.webhook.commands import main as webhook_main

    return webhook_main(args)


def _cmd_mirror(args: argparse.Namespace) -> int:
    from consumers.mirror.commands import main as mirror_main

    return mirror_main(args)


def _read_password(name: str) -> str:
    """Prompt twice on a terminal; otherwise read one line from stdin."""
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("repeat the password: ") != password:
            raise ValueError("the two passwords differ")
        return password
    return sys.stdin.readline().removesuffix("\n").removesuffix("\r")


def _cmd_users_add(args: argparse.Namespace) -> int:
    from engine.api.auth import AuthFileError, Role, add_user, parse_users

    path: Path = args.auth_file
    try:
        # add_user checks the file again under its lock. This check only
        # saves typing a password for a file that would be rejected.
        if path.is_file():
            parse_users(path.read_text(encoding="utf-8"), path)
        password = _read_password(args.name)
        role = Role(args.role) if args.role is not None else None
        added = add_user(path, args.name, role, password)
    except AuthFileError as error:
        print(
            f"cairn: cannot add user {args.name}: {error}; the file is unchanged",
            file=sys.stderr,
        )
        return 1
    except (ValueError, OSError) as error:
        # An OSError raised on an open descriptor names the descriptor, not
        # the file, so only its description is shown beside the path.
        reason = error.strerror if isinstance(error, OSError) else None
        reason = reason or str(error)
        message = f"cairn: cannot add user {args.name} to {path}: {reason}"
        print(message, file=sys.stderr)
        return 1
    action = "replaced" if added.replaced else "added"
    print(f"user {args.name} {action} in {path} with role {added.role}")
    return 0


# A hundred years; certificate times end at the year 9999.
MAX_CERTIFICATE_DAYS = 36500


def _positive_days(value: str) -> int:
    days = parse_ascii_integer(value)
    if days is None or not 1 <= days <= MAX_CERTIFICATE_DAYS:
        raise argparse.ArgumentTypeError(
            f"invalid number of days {value!r}: expected a whole number from 1 "
            f"to {MAX_CERTIFICATE_DAYS}"
        )
    return days


def _cmd_certificate(args: argparse.Namespace) -> int:
    from engine.api.tls import parse_host, self_signed_certificate, write_new_file

    try:
        # dict.fromkeys drops a host given twice and keeps the order.
        hosts = list(dict.fromkeys(parse_host(host) for host in args.host))
    except ValueError as error:
        print(f"cairn certificate: {error}", file=sys.stderr)
        return 2
    cert_path: Path = args.cert
    key_path: Path = args.key
    if cert_path.absolute() == key_path.absolute():
        print(
            f"cairn certificate: --cert and --key are both {cert_path}: "
            "give two different files",
            file=sys.stderr,
        )
        return 2
    cert_pem, key_pem = self_signed_certificate(hosts, args.days)
    written: list[Path] = []
    try:
        # The key first, so that a certificate never lies beside a missing key.
        write_new_file(key_path, key_pem, 0o600)
        written.append(key_path)
        write_new_file(cert_path, cert_pem, 0o644)
    except OSError as error:
        for path in written:
            path.unlink(missing_ok=True)
        name = error.filename or cert_path
        hint = ""
        if isinstance(error, FileExistsError):
            hint = (
                ". An existing file is never replaced: remove it or choose another path"
            )
        print(
            f"cairn certificate: cannot write {name}: {error.strerror or error}{hint}",
            file=sys.stderr,
        )
        return 1
    names = ", ".join(str(host.value) for host in hosts)
    print(
        f"wrote a certificate for {names}, valid for {args.days} days, to {cert_path}"
    )
    print(f"wrote its private key to {key_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cairn", description="A container registry whose storage is an event log."
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="lowest level of the log lines written to standard error, in any "
        "letter case (default info)",
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default="auto",
        help="log line format; auto means JSON unless standard error is a terminal",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the registry HTTP server")
    add_storage_options(serve)
    from engine.api.options import add_serve_options

    add_serve_options(serve)
    serve.set_defaults(handler=_cmd_serve)

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db_upgrade = db_commands.add_parser("upgrade", help="run the schema migrations")
    add_storage_options(db_upgrade)
    db_upgrade.set_defaults(handler=_cmd_db_upgrade)
    db_backup = db_commands.add_parser(
        "backup",
        help="copy a SQLite database, with the commits in its write-ahead log, "
        "to a new file while cairn serve runs",
    )
    db_backup.add_argument(
        "file",
        type=_backup_file,
        help="the new file; an existing one is never replaced",
    )
    add_storage_options(db_backup)
    db_backup.set_defaults(handler=_cmd_db_backup)

    projections = commands.add_parser("projections", help="projections of the log")
    projection_commands = projections.add_subparsers(
        dest="projection_command", required=True, metavar="COMMAND"
    )
    rebuild = projection_commands.add_parser(
        "rebuild", help="drop every projection and replay the log"
    )
    add_storage_options(rebuild)
    rebuild.set_defaults(handler=_cmd_rebuild)

    verify = commands.add_parser(
        "verify", help="check the hash chain, blob contents and projections"
    )
    add_storage_options(verify)
    verify.set_defaults(handler=_cmd_verify)

    gc = commands.add_parser(
        "gc",
        help="remove blob files that no repository links, the blob directories "
        "left empty, and expired upload sessions and staging files; safe while "
        "cairn serve runs",
    )
    add_gc_options(gc)
    gc.set_defaults(handler=_cmd_gc)

    events = commands.add_parser("events", help="the event stream")
    event_commands = events.add_subparsers(
        dest="events_command", required=True, metavar="COMMAND"
    )
    tail = event_commands.add_parser("tail", help="print events as they arrive on NATS")
    from engine.bus.options import add_tail_options

    add_tail_options(tail)
    tail.set_defaults(handler=_cmd_events_tail)
    from engine.bus.options import REPUBLISH_DESCRIPTION, add_republish_options

    republish = event_commands.add_parser(
        "republish",
        help="make the relay publish the log to NATS again from a position",
        description=REPUBLISH_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_republish_options(republish)
    republish.set_defaults(handler=_cmd_events_republish)

    webhook = commands.add_parser(
        "webhook", help="deliver events from NATS to HTTP endpoints"
    )
    from consumers.webhook.options import add_webhook_options

    add_webhook_options(webhook)
    webhook.set_defaults(handler=_cmd_webhook)

    mirror = commands.add_parser(
        "mirror", help="replay a cairn's history into another registry, then follow it"
    )
    from consumers.mirror.options import add_mirror_options

    add_mirror_options(mirror)
    mirror.set_defaults(handler=_cmd_mirror)

    certificate = commands.add_parser(
        "certificate",
        help="write a self-signed TLS certificate and key for "
        "`cairn serve --tls-cert --tls-key`",
        description="Write a self-signed TLS certificate and its private key. "
        "Clients trust the certificate as a CA: copy it to "
        "/etc/containers/certs.d/HOST:PORT/ca.crt for podman and skopeo, or "
        "/etc/docker/certs.d/HOST:PORT/ca.crt for Docker.",
    )
    certificate.add_argument(
        "--host",
        action="append",
        required=True,
        help="DNS name or IP address that clients use to reach the registry; "
        "repeat it for more names",
    )
    certificate.add_argument(
        "--cert",
        type=Path,
        default=Path("cairn-cert.pem"),
        metavar="FILE",
        help="where to write the certificate; it must not exist "
        "(default cairn-cert.pem)",
    )
    certificate.add_argument(
        "--key",
        type=Path,
        default=Path("cairn-key.pem"),
        metavar="FILE",
        help="where to write the private key, with mode 0600; it must not exist "
        "(default cairn-key.pem)",
    )
    certificate.add_argument(
        "--days",
        type=_positive_days,
        default=365,
        help="days the certificate is valid for (default 365)",
    )
    certificate.set_defaults(handler=_cmd_certificate)

    users = commands.add_parser("users", help="users of HTTP Basic authentication")
    user_commands = users.add_subparsers(
        dest="users_command", required=True, metavar="COMMAND"
    )
    users_add = user_commands.add_parser(
        "add",
        help="add a user to a users file, or replace its password, and its "
        "role when --role is given; the password is one line from stdin, or "
        "prompted for on a terminal",
    )
    auth_file = env_default("AUTH_FILE")
    users_add.add_argument(
        "--auth-file",
        type=parse_file_path,
        default=auth_file,
        required=auth_file is None,
        help="users file to change, or a symbolic link to it; an existing file "
        "keeps its owner, group and mode, without permissions for others, and "
        "a missing one is created with mode 0600 (env CAIRN_AUTH_FILE)",
    )
    users_add.add_argument("name", metavar="NAME", help="user name")
    users_add.add_argument(
        "--role",
        choices=["pull", "push"],
        help="pull reads; push also writes (default: a user already in the "
        "file keeps their role, and a new user gets pull)",
    )
    users_add.set_defaults(handler=_cmd_users_add)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command that ``argv`` names and return its exit status.

    A command whose standard output loses its reader, as in `cairn verify |
    head -1`, stops at the next write or flush and returns 141 without a
    traceback.
    """
    from engine.stdout import STDOUT_CLOSED_STATUS, discard_stdout, stdout_reader_gone

    try:
        try:
            status = _run_command(argv)
        finally:
            # Lines that wait in the buffer of a pipe fail only when flushed.
            # sys.stdout is None when the process started without descriptor 1.
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise
        discard_stdout()
        log.debug("stdout_closed", status=STDOUT_CLOSED_STATUS)
        return STDOUT_CLOSED_STATUS
    return status


def _run_command(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, unrecognized = parser.parse_known_args(argv)
    if unrecognized:
        # argparse would report them with the usage of cairn itself; the
        # command's own usage shows the options that it takes.
        _command_parser(parser, args).error(
            f"unrecognized arguments: {' '.join(unrecognized)}"
        )
    json_logs = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(args.log_level, json_logs)
    try:
        return int(args.handler(args))
    except StorageUnavailable as error:
        return report_storage_error(error)


def _command_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """Return the parser of the (sub)command that ``args`` selected."""
    current = parser
    while True:
        choices = [
            action
            for action in current._actions
            if isinstance(action, argparse._SubParsersAction)
        ]
        name = getattr(args, choices[0].dest, None) if choices else None
        if name is None:
            return current
        current = choices[0].choices[name]


if __name__ == "__main__":
    sys.exit(main())
