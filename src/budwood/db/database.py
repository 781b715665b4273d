"""The database URL, engine and schema version, for the registry's and the service's tables alike.

SQLite (a file under BUDWOOD_HOME) by default; PostgreSQL (or any SQLAlchemy URL) through
BUDWOOD_DATABASE_URL or --database. The schema is brought to the newest Alembic revision on open,
under a lock, so that two processes opening a fresh database at once do not both create it.
"""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import DeclarativeBase, sessionmaker

from budwood.errors import BudwoodError, require_extra

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_LOCK = 0x6275_6477  # "budw": the advisory lock id held while migrating


class DatabaseError(BudwoodError):
    """The database URL is wrong or the database cannot be opened."""


class Base(DeclarativeBase):
    """The declarative base of every table (registry and service): one metadata, one migration chain."""


def default_url(home: Path) -> str:
    return f"sqlite:///{home / 'registry.db'}"


def _sqlite_setup(engine: Engine) -> None:
    """Foreign keys on, a 30 s wait for the write lock, WAL so readers never block, and write
    transactions (a connection with execution option `write=True`: `writer(engine)`) taking the write
    lock at BEGIN: a deferred transaction that reads and then writes can fail at once with 'database
    is locked' when another writer got there first."""

    @event.listens_for(engine, "connect")
    def connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # SQLAlchemy, not pysqlite, issues BEGIN
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")


def writer(engine: Engine) -> Engine:
    """The same engine, for transactions that write (on SQLite they take the write lock at BEGIN)."""
    return engine.execution_options(write=True)


def session_makers(engine: Engine) -> tuple[sessionmaker, sessionmaker]:
    """(reads, writes): session factories for reading and for transactions that write (`writer`); objects
    stay readable after commit, as callers hand them on."""
    return (sessionmaker(engine, expire_on_commit=False), sessionmaker(writer(engine), expire_on_commit=False))


def open_database(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"bad database URL {url!r}: expected sqlite:///PATH or postgresql://HOST/DB") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise DatabaseError(f"database URL {url!r}: budwood runs on SQLite or PostgreSQL, not "
                            f"{parsed.get_backend_name()}")
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername == "postgresql+psycopg":
        require_extra("postgres", f"database URL {parsed.render_as_string(hide_password=True)}", "psycopg")
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, pool_pre_ping=True)
    if parsed.get_backend_name() == "sqlite":
        _sqlite_setup(engine)
    try:
        migrate(engine)
    except OperationalError as e:
        engine.dispose()
        raise DatabaseError(f"cannot open the database {parsed.render_as_string(hide_password=True)}: "
                            f"{e.orig}") from None
    return engine


def migrate(engine: Engine) -> None:
    """Upgrade to the newest revision; when already there, one read and no lock."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    with engine.connect() as conn:
        if MigrationContext.configure(conn).get_current_revision() == head:
            return
    with writer(engine).begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
