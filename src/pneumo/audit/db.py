"""Where the audit database lives, and opening it at the newest schema.

SQLite by default: ``MODEL/audit.sqlite`` beside the model, or any path given with ``--db``. A
``postgresql://`` URL selects PostgreSQL through psycopg 3 (the ``postgres`` extra). Opening runs the
Alembic migrations shipped in ``audit/migrations`` up to the newest revision, so a database written
by an older pneumo opens in a newer one.

SQLite runs in WAL mode with ``synchronous=NORMAL``: a commit is in the write-ahead log before the
answer it belongs to leaves the server, so a killed server (SIGKILL, a crash) loses no committed
reading. Only a power cut or an OS crash can lose the last commits since the latest checkpoint;
FULL (an fsync per reading) would prevent that but cost about 9 ms per reading on this machine's disk
(bench/results/audit_overhead.json records both). ``PNEUMO_AUDIT_SYNC=FULL`` selects it.
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from pneumo.errors import PneumoError
from pneumo.extras import require

MIGRATIONS = Path(__file__).parent / "migrations"
DEFAULT_NAME = "audit.sqlite"
BUSY_TIMEOUT_S = 30  # a second writer (predict while serve runs) waits instead of failing


def is_url(db: str | Path) -> bool:
    return "://" in str(db)


def database_url(db: str | Path | None, model_dir: str | Path | None = None) -> str:
    """The SQLAlchemy URL for ``--db`` (a path or a URL), else ``MODEL/audit.sqlite``."""
    if db is None:
        if model_dir is None:
            raise PneumoError("no audit database: give --db PATH (or a postgresql:// URL), or --no-audit")
        db = Path(model_dir) / DEFAULT_NAME
    text = str(db)
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    if is_url(text):
        return text
    return "sqlite:///" + str(Path(text).expanduser().resolve())


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for PostgreSQL or an in-memory database)."""
    parsed = make_url(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None


def sqlite_synchronous() -> str:
    """NORMAL (the default) or FULL from ``PNEUMO_AUDIT_SYNC``; anything else is an error naming it."""
    mode = os.environ.get("PNEUMO_AUDIT_SYNC", "NORMAL").strip().upper()
    if mode not in ("NORMAL", "FULL"):
        raise PneumoError(
            f"PNEUMO_AUDIT_SYNC={mode!r}: use NORMAL (survives a killed server) or FULL (also a power cut)"
        )
    return mode


def _sqlite_pragmas(dbapi_connection, synchronous: str) -> None:  # noqa: ANN001 - a DB-API connection
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_S * 1000}")
    cursor.close()


def create_audit_engine(url: str) -> Engine:
    """An engine for ``url`` with SQLite's durability settings; a clear error for a bad URL or driver."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise PneumoError(f"--db {url!r}: not a database path or URL ({exc})") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        require("postgres", "psycopg", what="an audit database in PostgreSQL")
    elif backend != "sqlite":
        raise PneumoError(f"--db {parsed.render_as_string()}: pneumo's audit trail uses SQLite or PostgreSQL")
    if backend == "sqlite":
        path = sqlite_file(url)
        if path is not None:
            if path.is_dir():
                raise PneumoError(f"--db {path}: is a folder; give the database file, e.g. {path / DEFAULT_NAME}")
            path.parent.mkdir(parents=True, exist_ok=True)
        synchronous = sqlite_synchronous()
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
        event.listen(
            engine, "connect", lambda dbapi_connection, _record: _sqlite_pragmas(dbapi_connection, synchronous)
        )
        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database to ``revision`` (the newest by default) with the shipped migrations."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def open_database(db: str | Path | None, model_dir: str | Path | None = None) -> Engine:
    """The engine of the audit database, created or migrated to the newest schema."""
    url = database_url(db, model_dir)
    engine = create_audit_engine(url)
    try:
        known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
        found = current_revision(engine)
        if found is not None and found not in known:
            raise PneumoError(
                f"audit database {engine.url.render_as_string()}: schema revision {found} is newer than "
                f"this pneumo knows ({head_revision()}); upgrade pneumo to open it"
            )
        upgrade(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise PneumoError(
            f"audit database {engine.url.render_as_string()}: cannot open ({type(exc).__name__}: {exc}); "
            "give another with --db PATH, or turn the audit trail off with --no-audit"
        ) from None
    return engine
