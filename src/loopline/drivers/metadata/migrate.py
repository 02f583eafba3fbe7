"""Create or upgrade a store's schema with Alembic, safely when several processes open it.

Opening an up-to-date store only reads ``alembic_version``; Alembic itself is imported
only when there is something to upgrade (it costs ~0.3 s per command). An upgrade runs
under a lock (PostgreSQL: an advisory lock; SQLite: the ``BEGIN IMMEDIATE`` write lock)
and re-reads the revision inside it, so the second of two first opens finds the schema
the first one created instead of failing "table already exists".
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, ProgrammingError

from loopline.drivers.metadata.database import Database, safe_url
from loopline.errors import StoreError

MIGRATIONS = Path(__file__).parent / "migrations"
# Any fixed 64-bit number; hashtext() of a name could collide with a user's own locks.
_PG_MIGRATION_LOCK = 0x6C6F6F706C696E65  # "loopline"


def head_revision() -> str:
    """The newest migration's revision id (files are named ``NNNN_description.py``)."""
    names = sorted(p.name for p in (MIGRATIONS / "versions").glob("[0-9]*_*.py"))
    return names[-1].split("_", 1)[0]


def migrate(db: Database) -> None:
    """Bring the schema of ``db`` to the newest migration.

    On SQLite, a brand-new file opened by several processes at once can answer "database
    is locked" without waiting (switching it to WAL, or WAL recovery, does not always call
    the busy handler): such an open is retried with backoff.
    """
    for attempt in range(_SQLITE_OPEN_TRIES):
        try:
            _migrate(db)
            return
        except _Locked:
            time.sleep(min(0.05 * 2**attempt, 1.0) * (0.5 + random.random()))
    _migrate(db, final=True)


class _Locked(Exception):
    """SQLite answered "database is locked" while a store was being opened."""


_SQLITE_OPEN_TRIES = 8


def _migrate(db: Database, *, final: bool = False) -> None:
    try:
        _migrate_once(db)
    except OperationalError as err:
        if not final and db.dialect == "sqlite" and "database is locked" in str(err.orig):
            raise _Locked() from err
        raise _store_error(db, err) from None


def _migrate_once(db: Database) -> None:
    head = head_revision()
    try:
        with db.engine.connect() as conn:
            if _current(conn, quick=True) == head:
                return
    except OperationalError as err:
        if _unreachable(err):
            raise
    with db.write_connection() as conn:
        if db.dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        if _current(conn) == head:
            return  # another process upgraded it while this one waited
        _upgrade(conn)


def _current(conn: Connection, *, quick: bool = False) -> str | None:
    """The stored revision, or None for a new store.

    ``quick`` reads the table and lets a missing one fail (one round trip on the common
    path); otherwise the table is looked up first, since a failed statement would abort a
    PostgreSQL transaction.
    """
    if quick:
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except ProgrammingError:
            return None  # PostgreSQL: no alembic_version table yet
    if not inspect(conn).has_table("alembic_version"):
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _upgrade(conn: Connection) -> None:
    from alembic import command
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, "head")


def _unreachable(err: OperationalError) -> bool:
    """True when the server cannot be reached, as opposed to a missing table (SQLite)."""
    return "no such table" not in str(err.orig)


def _store_error(db: Database, err: OperationalError) -> StoreError:
    reason = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
    return StoreError(f"cannot reach the metadata store at {safe_url(db.url)}: {reason}")
