"""pytest plugin: real databases for the tests, SQLite and PostgreSQL alike.

Loaded by ``tests/conftest.py`` (``pytest_plugins = ["dbsupport"]``). Every
test that asks for ``db_url`` (or a fixture built on it) runs twice:

* ``sqlite`` -- a fresh database file in the test's ``tmp_path``;
* ``postgresql`` -- a fresh database ``edgeota_t_<hex>`` created on the server
  named by ``EDGEOTA_TEST_PG_URL`` (default
  ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``, the server
  ``scripts/ensure-postgres.sh`` provides) and dropped afterwards.

When that server cannot be reached the PostgreSQL runs are skipped with the
reason -- except in CI (``CI=true``), where they fail: CI must exercise
PostgreSQL, and a silent skip there would hide that it did not.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from edgeota.server.db.migrate import upgrade
from edgeota.server.db.session import (
    DatabaseError,
    make_engine,
    make_session_factory,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_PG_ADMIN_URL",
    "PG_ADMIN_URL_ENV",
    "PgServer",
    "db_engine",
    "db_session",
    "db_url",
    "migrated_db_url",
    "pg_server",
]

PG_ADMIN_URL_ENV = "EDGEOTA_TEST_PG_URL"
DEFAULT_PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BACKENDS = ("sqlite", "postgresql")
_TEST_DB_PREFIX = "edgeota_t_"


@dataclass(frozen=True)
class PgServer:
    """The PostgreSQL server for this test session, or why there is none."""

    admin: Engine | None  # AUTOCOMMIT, connected to the maintenance database
    reason: str


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """Connect once per session to the PostgreSQL server that hosts the test databases."""
    url = os.environ.get(PG_ADMIN_URL_ENV, DEFAULT_PG_ADMIN_URL)
    try:
        engine = make_engine(url)
    except DatabaseError as e:
        yield PgServer(
            admin=None,
            reason=f"PostgreSQL not reachable ({e}); run scripts/ensure-postgres.sh "
            f"or set {PG_ADMIN_URL_ENV}",
        )
        return
    try:
        yield PgServer(admin=engine.execution_options(isolation_level="AUTOCOMMIT"), reason="")
    finally:
        engine.dispose()


def _postgresql_database(server: PgServer) -> Iterator[str]:
    if server.admin is None:
        if _in_ci():
            pytest.fail(f"CI=true requires the PostgreSQL tests: {server.reason}")
        pytest.skip(server.reason)
    name = _TEST_DB_PREFIX + secrets.token_hex(6)
    with server.admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = server.admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        # FORCE ends connections a failed test may have left open (PostgreSQL 13+).
        with server.admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty database; the test runs once per backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'edgeota.db'}"
        return
    server: PgServer = request.getfixturevalue("pg_server")
    yield from _postgresql_database(server)


@pytest.fixture
def migrated_db_url(db_url: str) -> str:
    """A fresh database with every migration applied."""
    upgrade(db_url)
    return db_url


@pytest.fixture
def db_engine(migrated_db_url: str) -> Iterator[Engine]:
    """An engine on a migrated database, disposed after the test."""
    engine = make_engine(migrated_db_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def db_session(db_engine: Engine) -> Iterator[Session]:
    """A session on a migrated database; closed (rolling back anything uncommitted) after."""
    session = make_session_factory(db_engine)()
    try:
        yield session
    finally:
        session.close()
