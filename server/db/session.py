"""Engines, sessions and the cross-replica lock, for SQLite and PostgreSQL alike.

Nothing here is global: the server builds one engine from its configured URL
at start-up and passes the session factory down (one session per request, as
in the FastAPI full-stack template). Tests build their own.

Two databases are supported:

* SQLite (the default, ``sqlite:///path/to/edgeota.db``): WAL journal so
  readers do not block the writer, foreign keys on (SQLite leaves them off),
  and a 30 s busy timeout so a second writer waits instead of failing at once.
* PostgreSQL (``postgresql://...``, rewritten to the psycopg 3 driver), for
  several server replicas sharing one database. Connections are pre-pinged so
  a database restart costs one retry, not a failed request.

:func:`lock` serialises work that must not interleave between replicas
(publishing to a repository, appending to the audit chain).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Engine, create_engine, event, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

from edgeota.protocol.errors import EdgeotaError
from edgeota.server.db.models import RepoLock

__all__ = [
    "SQLITE_BUSY_TIMEOUT_MS",
    "DatabaseError",
    "check_connection",
    "lock",
    "make_engine",
    "make_session_factory",
    "normalize_url",
    "redact_url",
]

SQLITE_BUSY_TIMEOUT_MS = 30_000  # a second writer waits this long for the write lock
_PG_CONNECT_TIMEOUT_S = 10  # libpq waits forever by default on a black-holed host
_LOCK_NAME_MAX = 64  # RepoLock.name column length
# Query parameters libpq (and so psycopg) reads secrets from.
_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})
_REDACTED = "***"


class DatabaseError(EdgeotaError):
    """The database cannot be used: unreachable, refused the login, or an unusable URL.

    The message names the database with its password hidden (see
    :func:`redact_url`) so it can go to a terminal or a log as is.
    """


def redact_url(url: str | URL) -> str:
    """Return ``url`` with any password (in the authority or the query) replaced by ``***``.

    Unparsable input is still scrubbed with a pattern rather than echoed, since
    it is most likely to be shown in an error message.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        return re.sub(r"(://[^:/@]*:)[^@]*@", rf"\g<1>{_REDACTED}@", str(url))
    secret_keys = [key for key in parsed.query if key.lower() in _SECRET_QUERY_KEYS]
    if secret_keys:
        parsed = parsed.update_query_dict(dict.fromkeys(secret_keys, _REDACTED))
    return parsed.render_as_string(hide_password=True)


def normalize_url(url: str | URL) -> URL:
    """Parse ``url`` and pick edgeota's driver: ``postgresql://`` becomes ``postgresql+psycopg://``.

    Raises:
        DatabaseError: the URL does not parse or names a database edgeota does not support.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as e:
        raise DatabaseError(f"not a database URL: {redact_url(url)}") from e
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        return parsed
    if backend == "sqlite":
        return parsed
    raise DatabaseError(
        f"unsupported database {backend!r} in {redact_url(parsed)}: use sqlite:/// or postgresql://"
    )


def _describe_failure(error: BaseException, url: URL) -> str:
    """First line of the driver's message, with the password removed in case a driver echoed it."""
    source = getattr(error, "orig", None) or error
    lines = str(source).strip().splitlines()
    message = lines[0] if lines else type(source).__name__
    if url.password:
        message = message.replace(str(url.password), _REDACTED)
    return message


def _configure_sqlite(dbapi_connection: Any, _connection_record: Any) -> None:
    """Per-connection SQLite settings: PRAGMAs do not persist, every connection needs them."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL persists in the file; asking again is cheap. In-memory databases answer "memory".
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


def check_connection(engine: Engine) -> None:
    """Open one connection and run ``SELECT 1``.

    Raises:
        DatabaseError: the database is unreachable or refused the connection.
    """
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except DBAPIError as e:
        raise DatabaseError(
            f"cannot connect to the database at {redact_url(engine.url)}: "
            f"{_describe_failure(e, engine.url)}"
        ) from e


def make_engine(url: str | URL) -> Engine:
    """Create an engine for ``url`` and check that the database answers.

    Connecting eagerly turns a wrong URL or a stopped database into one clear
    error at start-up instead of a failure on the first request.

    Raises:
        DatabaseError: unusable URL, missing driver, or unreachable database.
    """
    parsed = normalize_url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(
                parsed,
                # Sessions move between threads (FastAPI's thread pool); the
                # pool hands a connection to one session at a time.
                connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            )
            event.listen(engine, "connect", _configure_sqlite)
        else:
            connect_args: dict[str, Any] = {}
            if "connect_timeout" not in parsed.query:
                connect_args["connect_timeout"] = _PG_CONNECT_TIMEOUT_S
            engine = create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    except (NoSuchModuleError, ImportError) as e:
        raise DatabaseError(f"no driver for {redact_url(parsed)}: {e}") from e
    try:
        check_connection(engine)
    except DatabaseError:
        engine.dispose()
        raise
    return engine


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to ``engine``; callers own the transaction (commit or roll back).

    ``expire_on_commit=False`` so objects a service returns after committing
    (a new release, an issued token) can still be read without another query
    -- and without a surprise lazy load after the session is gone.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


def lock(session: Session, name: str) -> None:
    """Hold the lock ``name`` until the session's current transaction ends.

    Use it for work that must not interleave across server replicas, e.g.
    ``lock(session, "image")`` before bumping snapshot and timestamp. Call it
    first in the transaction, before reading the rows the decision depends on:
    reads made earlier may already be stale by the time the lock is granted.

    * PostgreSQL: the ``repo_locks`` row is created if missing (``INSERT ...
      ON CONFLICT DO NOTHING``) and locked with ``SELECT ... FOR UPDATE``; a
      second transaction blocks on it until the first commits or rolls back.
    * SQLite: a write to the row makes the transaction take the database's
      single write lock now -- what ``BEGIN IMMEDIATE`` would do. The Python
      driver opens the transaction at this first write, so earlier reads were
      not part of it and cannot make the upgrade to a writer fail; a second
      writer waits up to the busy timeout.

    Raises:
        ValueError: ``name`` is empty or longer than 64 characters.
    """
    if not name or len(name) > _LOCK_NAME_MAX:
        raise ValueError(f"lock name must be 1 to {_LOCK_NAME_MAX} characters")
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(
            pg_insert(RepoLock).values(name=name).on_conflict_do_nothing(index_elements=["name"])
        )
        session.execute(select(RepoLock.name).where(RepoLock.name == name).with_for_update())
    elif dialect == "sqlite":
        session.execute(
            sqlite_insert(RepoLock)
            .values(name=name)
            .on_conflict_do_nothing(index_elements=["name"])
        )
        # The insert wrote nothing if the row existed; this write always takes the lock.
        session.execute(
            update(RepoLock)
            .where(RepoLock.name == name)
            .values(name=name)
            .execution_options(synchronize_session=False)
        )
    else:
        raise DatabaseError(f"no lock implementation for database {dialect!r}")
