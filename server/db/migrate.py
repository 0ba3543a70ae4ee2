"""Run the schema migrations programmatically: ``edgeota init`` and ``serve`` call these.

The schema changes only through Alembic revisions in
``edgeota.server.db.migrations.versions``. The migration scripts are located
next to this file inside the installed package (``Path(__file__).parent``), so
this works from a wheel as well as from a checkout, and the database URL is
always an argument: nothing is read from ``alembic.ini`` or the environment.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from edgeota.server.db.session import DatabaseError, make_engine, redact_url

__all__ = ["MIGRATIONS_DIR", "current_revision", "head_revision", "upgrade"]

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _config() -> Config:
    """An Alembic config built in code: no ini file, no logging set-up, no URL."""
    config = Config()
    # ConfigParser interpolates "%": escape it in case the install path has one.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    return config


def head_revision() -> str:
    """The newest revision this edgeota knows: what :func:`upgrade` brings a database to."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships 0001
        raise DatabaseError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision`` (default: the newest).

    Idempotent: a database already at the target is left as it is. On
    PostgreSQL all pending revisions apply in one transaction, so a failure
    leaves the schema where it was. SQLite's Python driver commits each DDL
    statement on its own, so there a failed migration can stop half-way:
    copy the database file before upgrading a server.

    Raises:
        DatabaseError: the database is unreachable, or its schema is at a
            revision this edgeota does not know (written by a newer version).
    """
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            config = _config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except CommandError as e:
        raise DatabaseError(f"cannot migrate the database at {redact_url(url)}: {e}") from e
    except DBAPIError as e:
        reason = str(e.orig).strip().splitlines()[0] if str(e.orig).strip() else ""
        raise DatabaseError(
            f"migration failed on the database at {redact_url(url)}: "
            f"{type(e.orig).__name__}: {reason}"
        ) from e
    finally:
        engine.dispose()


def current_revision(url: str | URL) -> str | None:
    """The revision the database at ``url`` is at, or ``None`` if it was never migrated.

    Raises:
        DatabaseError: the database is unreachable.
    """
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
