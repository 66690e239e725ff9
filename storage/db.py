"""Engine / session factory and programmatic Alembic migrations.

storage must not import workbench: callers pass the database URL
(``workbench.settings.get_settings().database_url``).
"""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Several processes (UI, worker, CLI) write to one SQLite file: wait for locks
# rather than failing immediately with "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Any fixed key: the UI, workers and CLI starting together on an empty PostgreSQL database
# take this advisory lock so one migrates and the others then find it at head.
PG_MIGRATION_LOCK = 0x5742_0001

_lock = threading.Lock()
_sessionmakers: dict[str, sessionmaker[Session]] = {}


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _is_postgresql(url: str) -> bool:
    return url.startswith("postgresql")


def _sqlite_file(url: str) -> Path | None:
    """Path of the SQLite file for a URL, or None for in-memory databases."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    rest = url[len(prefix):].split("?", 1)[0]
    if rest in ("", ":memory:"):
        return None
    return Path(rest)


def _finite(value: Any) -> Any:
    """``value`` with every NaN/Infinity float replaced by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _pg_json_dumps(value: Any) -> str:
    # PostgreSQL's json type refuses the NaN/Infinity tokens Python writes (they are not JSON);
    # an undefined metric is stored as null there instead of failing the whole write.
    return json.dumps(_finite(value), allow_nan=False)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an Engine with the options its dialect needs.

    SQLite: FKs, WAL and a busy timeout on every connection. PostgreSQL (or any server):
    pool_pre_ping, so a connection the server dropped (restart, idle timeout) is replaced
    instead of failing the next query.
    """
    if _is_sqlite(url):
        f = _sqlite_file(url)
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        # Streamlit runs callbacks on several threads.
        connect_args.setdefault("check_same_thread", False)
        engine = create_engine(url, connect_args=connect_args, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if f is not None:  # WAL is meaningless (and refused) for in-memory DBs
                cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    if _is_postgresql(url):
        kwargs.setdefault("json_serializer", _pg_json_dumps)
    return create_engine(url, **kwargs)


def alembic_config(url: str) -> Config:
    """Alembic config built in code, so no alembic.ini is needed at the repo root."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' must be escaped for ConfigParser interpolation.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


class MigrationError(RuntimeError):
    """A migration left the database inconsistent; it was rolled back."""


VERSION_TABLE = "workbench_alembic_version"  # storage/migrations/env.py says why not alembic_version


def _adopt_legacy_version_table(conn: Connection) -> None:
    """Databases made before the Auto search kept our revision in "alembic_version", which
    Optuna's study storage needs for its own: move ours to VERSION_TABLE (same transaction)."""
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" not in tables or VERSION_TABLE in tables:
        return
    versions = [r[0] for r in conn.exec_driver_sql("SELECT version_num FROM alembic_version")]
    if versions and all(v[:4].isdigit() and v[4:5] == "_" for v in versions):  # "0002_autoincrement_ids"
        conn.exec_driver_sql(f"ALTER TABLE alembic_version RENAME TO {VERSION_TABLE}")


def _run_alembic(engine: Engine, action: str, revision: str) -> None:
    cfg = alembic_config(str(engine.url.render_as_string(hide_password=False)))
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if sqlite:
            # Batch migrations rebuild a table (copy, drop the old one, rename). With foreign
            # keys on, that DROP would cascade into every child table and delete their rows:
            # SQLite's own procedure turns them off for the rebuild, then checks them.
            # The PRAGMA only takes effect outside a transaction, hence before begin().
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            conn.commit()
        try:
            with conn.begin():
                # env.py reuses this connection (keeps our PRAGMAs, works for in-memory DBs).
                cfg.attributes["connection"] = conn
                if engine.dialect.name == "postgresql":  # released at commit/rollback
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})")
                _adopt_legacy_version_table(conn)
                getattr(command, action)(cfg, revision)
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise MigrationError(f"migration {action} to {revision} broke foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def upgrade(url: str, revision: str = "head") -> None:
    engine = make_engine(url)
    try:
        _run_alembic(engine, "upgrade", revision)
    finally:
        engine.dispose()


def downgrade(url: str, revision: str) -> None:
    engine = make_engine(url)
    try:
        _run_alembic(engine, "downgrade", revision)
    finally:
        engine.dispose()


def init_db(url: str) -> sessionmaker[Session]:
    """Migrate the database to head and return a sessionmaker bound to it."""
    kwargs: dict[str, Any] = {}
    if _is_sqlite(url) and _sqlite_file(url) is None:
        from sqlalchemy.pool import StaticPool

        kwargs["poolclass"] = StaticPool  # one shared connection keeps the in-memory DB alive
    engine = make_engine(url, **kwargs)
    _run_alembic(engine, "upgrade", "head")
    return sessionmaker(bind=engine, expire_on_commit=False)


def get_sessionmaker(url: str) -> sessionmaker[Session]:
    """Process-wide sessionmaker per URL; migrates on first use."""
    with _lock:
        sm = _sessionmakers.get(url)
        if sm is None:
            sm = init_db(url)
            _sessionmakers[url] = sm
        return sm


def reset_sessionmakers() -> None:
    """Dispose cached engines (tests switch data dirs between cases)."""
    with _lock:
        for sm in _sessionmakers.values():
            bind = sm.kw.get("bind")
            if isinstance(bind, Engine):
                bind.dispose()
        _sessionmakers.clear()
