"""Database layer on real SQLite and PostgreSQL: migrations, schema, constraints, types, lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import CheckConstraint, Engine, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session

from edgeota.protocol.identity import InvalidDeviceIdError
from edgeota.server.db.migrate import current_revision, head_revision, upgrade
from edgeota.server.db.models import (
    Assignment,
    AssignmentState,
    Base,
    Deployment,
    Device,
    Release,
    ReleaseStatus,
)
from edgeota.server.db.session import (
    DatabaseError,
    lock,
    make_engine,
    make_session_factory,
    normalize_url,
    redact_url,
)

WAIT = 10.0  # seconds; upper bound for every cross-thread wait


def make_device(device_id: str = "pi-1", **overrides: object) -> Device:
    fields: dict[str, object] = {
        "id": device_id,
        "hardware": "rpi4",
        "tags": {"site": "lab"},
        "identity": {"format": "test", "device_id": device_id},
    }
    fields.update(overrides)
    return Device(**fields)


def make_release(name: str = "digits", version: str = "1.0.0", **overrides: object) -> Release:
    fields: dict[str, object] = {
        "name": name,
        "version": version,
        "release_counter": 1,
        "target_path": f"{name}/{version}.bundle",
        "length": 5 * 1024**3,  # above 2**31: the BigInteger columns must hold it
        "sha256": "a" * 64,
        "plaintext_sha256": "b" * 64,
        "plaintext_size": 1234,
        "manifest": {"name": name, "version": version},
        "wrapped_content_key": b"\x00wrapped\xff",
        "bin_role": "bin-0",
        "bin_version": 1,
        "created_by": "alice",
    }
    fields.update(overrides)
    return Release(**fields)


# --- migrations and schema -------------------------------------------------------------------


def test_upgrade_creates_schema_and_is_idempotent(db_url: str) -> None:
    assert current_revision(db_url) is None

    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    engine = make_engine(db_url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
    finally:
        engine.dispose()

    upgrade(db_url)  # a second run finds the schema at head and does nothing
    assert current_revision(db_url) == head_revision()


def test_models_match_migrated_schema(db_engine: Engine) -> None:
    with db_engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        # compare_metadata does not look at CHECK constraints; compare their names.
        inspector = inspect(connection)
        for table in Base.metadata.sorted_tables:
            reflected = {c["name"] for c in inspector.get_check_constraints(table.name)}
            declared = {c.name for c in table.constraints if isinstance(c, CheckConstraint)}
            assert reflected == declared, table.name


def test_upgrade_refuses_database_from_a_newer_edgeota(migrated_db_url: str) -> None:
    engine = make_engine(migrated_db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    finally:
        engine.dispose()
    with pytest.raises(DatabaseError, match="f00d"):
        upgrade(migrated_db_url)


# --- constraints -----------------------------------------------------------------------------


def test_duplicate_release_name_and_version_refused(db_session: Session) -> None:
    db_session.add(make_release(target_path="a.bundle"))
    db_session.commit()
    db_session.add(make_release(target_path="b.bundle"))
    with pytest.raises(IntegrityError):
        db_session.commit()


def test_duplicate_target_path_refused(db_session: Session) -> None:
    db_session.add(make_release(version="1.0.0", target_path="same.bundle"))
    db_session.commit()
    db_session.add(make_release(version="2.0.0", target_path="same.bundle"))
    with pytest.raises(IntegrityError):
        db_session.commit()


def test_one_assignment_per_deployment_and_device(db_session: Session) -> None:
    release = make_release()
    db_session.add_all([make_device("pi-1"), release])
    db_session.flush()
    deployment = Deployment(
        release_id=release.id,
        model_name="digits",
        selector={"devices": ["pi-1"]},
        phases=[10, 100],
        created_by="alice",
    )
    db_session.add(deployment)
    db_session.flush()

    def assignment() -> Assignment:
        return Assignment(
            deployment_id=deployment.id,
            device_id="pi-1",
            release_id=release.id,
            model_name="digits",
            phase=0,
        )

    db_session.add(assignment())
    db_session.commit()
    db_session.add(assignment())
    with pytest.raises(IntegrityError):
        db_session.commit()


def test_foreign_keys_enforced(db_session: Session) -> None:
    # SQLite leaves foreign keys off unless the connection turns them on.
    release = make_release()
    db_session.add(release)
    db_session.flush()
    db_session.add(
        Assignment(
            deployment_id=999, device_id="ghost", release_id=release.id, model_name="x", phase=0
        )
    )
    with pytest.raises(IntegrityError):
        db_session.commit()


def test_status_check_constraint_refuses_unknown_values(db_session: Session) -> None:
    db_session.add(make_release())
    db_session.commit()
    with pytest.raises(IntegrityError):
        db_session.execute(text("UPDATE releases SET status = 'bogus'"))
    db_session.rollback()
    # The ORM refuses it before it reaches the database.
    release = db_session.scalars(select(Release)).one()
    release.status = "bogus"  # type: ignore[assignment]
    with pytest.raises(StatementError):
        db_session.flush()


def test_invalid_device_id_refused_by_the_model() -> None:
    with pytest.raises(InvalidDeviceIdError):
        make_device("Pi/1")


# --- types -----------------------------------------------------------------------------------


def test_json_bytes_and_utc_datetimes_round_trip(db_engine: Engine) -> None:
    factory = make_session_factory(db_engine)
    cest = timezone(timedelta(hours=2))
    enrolled = datetime(2025, 3, 30, 3, 15, 7, 123456, tzinfo=cest)
    identity = {"format": "x", "kem": {"suite": "x25519", "public": "AAAA"}, "n": [1, 2.5, None]}
    with factory() as session:
        session.add(make_device("pi-1", enrolled_at=enrolled, identity=identity, tags={"é": "ü"}))
        session.add(make_release())
        session.commit()

    with factory() as session:  # a fresh session: values come from the database
        device = session.get(Device, "pi-1")
        assert device is not None
        assert device.enrolled_at == enrolled
        assert device.enrolled_at.tzinfo is UTC
        assert device.enrolled_at.hour == 1  # stored as UTC wall time
        assert device.enrolled_at.microsecond == 123456
        assert device.identity == identity
        assert device.tags == {"é": "ü"}
        assert device.reported_state is None
        assert device.online is False
        assert device.report_seq == 0
        release = session.scalars(select(Release)).one()
        assert release.length == 5 * 1024**3
        assert release.wrapped_content_key == b"\x00wrapped\xff"
        assert release.status is ReleaseStatus.PENDING
        assert release.created_at.tzinfo is UTC
        assert abs(release.created_at - datetime.now(UTC)) < timedelta(minutes=5)

    with db_engine.connect() as connection:  # a Python None is SQL NULL, not JSON 'null'
        raw = connection.execute(text("SELECT reported_state IS NULL FROM devices")).scalar_one()
        assert raw in (True, 1)


def test_naive_datetime_refused(db_session: Session) -> None:
    db_session.add(make_device(enrolled_at=datetime(2025, 1, 1, 12, 0)))  # naive on purpose
    with pytest.raises(StatementError, match="naive datetime"):
        db_session.flush()


def test_enum_columns_return_enum_members(db_session: Session) -> None:
    release = make_release()
    db_session.add_all([make_device(), release])
    db_session.flush()
    deployment = Deployment(
        release_id=release.id, model_name="digits", selector={}, phases=[100], created_by="a"
    )
    db_session.add(deployment)
    db_session.flush()
    db_session.add(
        Assignment(
            deployment_id=deployment.id,
            device_id="pi-1",
            release_id=release.id,
            model_name="digits",
            phase=0,
            state=AssignmentState.ROLLED_BACK,
        )
    )
    db_session.commit()
    db_session.expire_all()
    assert db_session.scalars(select(Assignment.state)).one() is AssignmentState.ROLLED_BACK
    raw = db_session.execute(text("SELECT state FROM assignments")).scalar_one()
    assert raw == "rolled_back"  # the value is stored, not the member name


# --- the lock --------------------------------------------------------------------------------


def _wait_until_blocked(engine: Engine, is_locked: threading.Event) -> None:
    """Return once the second transaction is observably waiting for the lock."""
    if engine.dialect.name != "postgresql":
        # SQLite has no lock view; the waiter sits in the busy handler.
        assert not is_locked.wait(0.5), "second transaction was not blocked"
        return
    deadline = time.monotonic() + WAIT
    query = text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    with engine.connect() as connection:
        while connection.execute(query).scalar_one() == 0:
            connection.rollback()  # a new snapshot of pg_stat_activity on the next read
            assert time.monotonic() < deadline, "second transaction never waited for the lock"
            time.sleep(0.02)  # polling interval, not synchronisation
    assert not is_locked.is_set()


def test_lock_serialises_two_transactions(db_engine: Engine) -> None:
    factory = make_session_factory(db_engine)
    first_locked = threading.Event()
    release_first = threading.Event()
    second_trying = threading.Event()
    second_locked = threading.Event()
    order: list[str] = []

    def first() -> None:
        with factory() as session:
            lock(session, "image")
            first_locked.set()
            assert release_first.wait(WAIT)
            order.append("first commits")
            session.commit()

    def second() -> None:
        assert first_locked.wait(WAIT)
        with factory() as session:
            second_trying.set()
            lock(session, "image")
            order.append("second holds the lock")
            second_locked.set()
            session.commit()

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(first), pool.submit(second)]
        try:
            assert second_trying.wait(WAIT)
            _wait_until_blocked(db_engine, second_locked)
        finally:
            release_first.set()
        for future in futures:
            future.result(timeout=WAIT)

    assert order == ["first commits", "second holds the lock"]


def test_locks_with_different_names_do_not_block_each_other(db_engine: Engine) -> None:
    if db_engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one write lock per database: every lock() serialises")
    factory = make_session_factory(db_engine)
    with factory() as first, factory() as second:
        lock(first, "image")
        second.execute(text("SET LOCAL lock_timeout = '2s'"))
        lock(second, "director")  # would raise LockNotAvailable if it blocked
        second.commit()
        first.commit()


def test_lock_name_checked(db_session: Session) -> None:
    with pytest.raises(ValueError, match="lock name"):
        lock(db_session, "")
    with pytest.raises(ValueError, match="lock name"):
        lock(db_session, "x" * 65)


# --- engines and URLs ------------------------------------------------------------------------


def test_unreachable_postgresql_gives_a_clear_password_free_error() -> None:
    url = "postgresql://edgeota:s3cret-pw@127.0.0.1:1/edgeota"
    with pytest.raises(DatabaseError) as caught:
        make_engine(url)
    message = str(caught.value)
    assert "s3cret-pw" not in message
    assert "cannot connect to the database at" in message
    assert "postgresql+psycopg://edgeota:***@127.0.0.1:1/edgeota" in message
    assert "\n" not in message


def test_missing_sqlite_folder_gives_a_database_error(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="cannot connect"):
        make_engine(f"sqlite:///{tmp_path}/missing/folder/edgeota.db")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        ("postgresql+psycopg://u:p%40ss@h:5/db", "postgresql+psycopg://u:***@h:5/db"),
        ("postgresql://u@h/db?password=pw&sslmode=require", "sslmode=require"),
        ("sqlite:////var/lib/edgeota/edgeota.db", "sqlite:////var/lib/edgeota/edgeota.db"),
        ("not a url u:pw@host", "not a url u:pw@host"),  # no scheme: nothing parsable to hide
        ("weird://u:pw@h:notaport/x", "weird://u:***@h:notaport/x"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    redacted = redact_url(url)
    assert expected in redacted
    if "://" in url:
        assert "pw" not in redacted.replace("pwd", "")
        assert "p%40ss" not in redacted


def test_normalize_url_picks_psycopg_and_refuses_other_databases() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
    with pytest.raises(DatabaseError, match="unsupported database"):
        normalize_url("mysql://u:pw@h/db")
    with pytest.raises(DatabaseError, match="not a database URL"):
        normalize_url("::nonsense::")


def test_sqlite_connections_are_configured(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/edgeota.db")
    try:
        with engine.connect() as connection:

            def pragma(name: str) -> object:
                return connection.exec_driver_sql(f"PRAGMA {name}").scalar_one()

            assert pragma("journal_mode") == "wal"
            assert pragma("foreign_keys") == 1
            assert pragma("busy_timeout") == 30_000
    finally:
        engine.dispose()


def test_sessions_keep_objects_readable_after_commit(db_engine: Engine) -> None:
    factory: Callable[[], Session] = make_session_factory(db_engine)
    with factory() as session:
        device = make_device()
        session.add(device)
        session.commit()
    assert device.hardware == "rpi4"  # no DetachedInstanceError after the session closed
