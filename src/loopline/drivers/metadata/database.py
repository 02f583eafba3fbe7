"""One engine and its sessions, shared by every repository of the metadata store.

SQLite gets its transactions from SQLAlchemy instead of from the ``sqlite3`` module, which
starts a transaction only at the first write: a read-then-write there is not atomic, and
in WAL mode a transaction that read before another one committed fails "database is
locked" at its first write without waiting. Writing transactions therefore begin with
``BEGIN IMMEDIATE`` (they wait, up to the busy timeout, for the one writer at a time);
reads begin a plain deferred transaction and never wait.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from loopline.credentials import mask_url
from loopline.errors import StoreError

BUSY_TIMEOUT_S = 30
_WRITE = "loopline_write"


def safe_url(url: str) -> str:
    """``url`` with its password masked, for messages, even when it does not parse.

    SQLAlchemy's rendering hides only what it parsed as the password (of ``u:p@ss@host``
    just ``p``), so ``mask_url`` masks what is left, and alone masks a URL that does not parse.
    """
    try:
        return mask_url(make_url(url).render_as_string(hide_password=True))
    except ArgumentError:
        return mask_url(url)


class Database:
    """An engine with read and write session factories over one SQLAlchemy URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            sa_url = make_url(url)
        except ArgumentError:
            raise StoreError(
                f"invalid metadata store URL {safe_url(url)!r}: use e.g. "
                "sqlite:///path/loopline.db or postgresql+psycopg://user@host/db"
            ) from None
        if sa_url.drivername == "postgresql":
            sa_url = sa_url.set(drivername="postgresql+psycopg")
        kwargs: dict[str, Any] = {}
        if sa_url.drivername.startswith("sqlite"):
            if sa_url.database and sa_url.database != ":memory:":
                Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["connect_args"] = {"connect_timeout": 5}
        try:
            self.engine: Engine = create_engine(sa_url, **kwargs)
        except (NoSuchModuleError, ArgumentError, ImportError) as err:
            raise StoreError(f"unsupported metadata store URL {safe_url(url)}: {err}") from None
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_connect)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._writer = self.engine.execution_options(**{_WRITE: True})
        self._read_sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(self._writer, expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session in a read transaction (committed on exit)."""
        with self._read_sessions() as s, s.begin():
            yield s

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session in a write transaction: committed on exit, rolled back on error."""
        with self._write_sessions() as s, s.begin():
            yield s

    @contextmanager
    def write_connection(self) -> Iterator[Connection]:
        """A Core connection in a write transaction."""
        with self._writer.begin() as conn:
            yield conn

    def insert(self, table: Table | type) -> Any:
        """An INSERT of this dialect, with ``on_conflict_do_nothing/do_update`` where known."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            return pg_insert(table)
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            return sqlite_insert(table)
        raise StoreError(f"unsupported metadata store dialect {self.dialect!r}")

    def lock(self, s: Session, key: str) -> None:
        """Serialise the transactions that take ``key`` until this one ends.

        PostgreSQL takes a transaction-level advisory lock; SQLite's write transactions
        are already serialised by ``BEGIN IMMEDIATE``.
        """
        if self.dialect == "postgresql":
            from sqlalchemy import text

            s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # The sqlite3 module must not issue its own BEGIN; _sqlite_begin does (see above).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    write = conn.get_execution_options().get(_WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
