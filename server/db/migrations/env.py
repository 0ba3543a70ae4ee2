"""Alembic environment for edgeota's database.

Two ways in, and neither reads a URL from ``alembic.ini`` nor touches logging
configuration (no ``fileConfig``: running migrations from the server must not
reset the server's log handlers):

* programmatically, from :mod:`edgeota.server.db.migrate`, which passes an open
  connection in ``config.attributes["connection"]``;
* by a developer with the ``alembic`` command and ``-x url=...`` (see the
  comment in ``alembic.ini``), e.g. to draft a migration with
  ``revision --autogenerate`` and then review it by hand.

On PostgreSQL the whole upgrade runs in one transaction under an advisory
lock, taken before Alembic reads the current revision: replicas that start
together run the migrations once, and the others then find the schema at head.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from edgeota.server.db.models import Base
from edgeota.server.db.session import make_engine, normalize_url

# Any fixed 64-bit value; it only has to differ from other advisory locks in the database.
_MIGRATION_LOCK_KEY = 0x6564_6765_6F74_6131  # "edgeota1"


def _run_online(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things; batch mode recreates the table there
        # and is a plain ALTER on PostgreSQL, so one migration serves both.
        render_as_batch=True,
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        context.run_migrations()


def _url_from_command_line() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("edgeota migrations: pass the database URL with -x url=...")
    return url


def _main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run_online(connection)
        return
    url = _url_from_command_line()
    if context.is_offline_mode():
        context.configure(url=normalize_url(url), target_metadata=Base.metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            _run_online(connection)
    finally:
        engine.dispose()


_main()
