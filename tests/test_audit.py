"""The hash-chained audit log against tampering done directly in the database."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from edgeota.server.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditIntegrityError,
    append,
    canonical_detail,
    entry_hash,
    head,
    verify,
)
from edgeota.server.db.session import make_session_factory

T0 = datetime(2025, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)


def append_three(session: Session) -> list[AuditEntry]:
    entries = [
        append(
            session,
            actor="alice",
            action="release.publish",
            subject="release:1",
            detail={"version": "1.0.0", "bin": "bin-3"},
            now=T0,
        ),
        append(
            session,
            actor="bob",
            action="deploy.create",
            subject="deployment:1",
            detail={"phases": [10, 100]},
            now=T0 + timedelta(seconds=1),
        ),
        append(
            session,
            actor="carol",
            action="rollout.pause",
            subject="deployment:1",
            now=T0 + timedelta(seconds=2),
        ),
    ]
    session.commit()
    return entries


def tamper(session: Session, sql: str, **params: object) -> None:
    """Change the table behind the application's back, as an attacker with SQL access would."""
    session.execute(text(sql), params)
    session.commit()


def test_empty_log_verifies(db_session: Session) -> None:
    result = verify(db_session)
    assert result.ok
    assert result.entries == 0
    assert result.last_id is None
    assert result.last_hash == GENESIS_HASH


def test_append_builds_a_chain_that_verifies(db_session: Session) -> None:
    entries = append_three(db_session)
    assert [e.id for e in entries] == [1, 2, 3]
    assert entries[0].prev_hash == GENESIS_HASH
    assert entries[1].prev_hash == entries[0].entry_hash
    assert entries[2].prev_hash == entries[1].entry_hash
    assert entries[0].recorded_at == "2025-06-01T12:00:00.123456Z"
    assert entries[0].detail == '{"bin":"bin-3","version":"1.0.0"}'
    assert entries[2].detail == "{}"

    db_session.expire_all()
    result = verify(db_session)
    assert result.ok, result.reason
    assert (result.entries, result.first_bad_id) == (3, None)
    assert (result.last_id, result.last_hash) == (3, entries[2].entry_hash)
    assert head(db_session) == (3, entries[2].entry_hash)
    result.raise_for_failure()  # no-op when intact


def test_hash_covers_every_field() -> None:
    fields = {
        "entry_id": 1,
        "recorded_at": "2025-06-01T12:00:00.000000Z",
        "actor": "a",
        "action": "b",
        "subject": "c",
        "detail": "{}",
        "prev_hash": GENESIS_HASH,
    }
    base = entry_hash(**fields)  # type: ignore[arg-type]
    for name, value in fields.items():
        changed = {**fields, name: value + 1 if isinstance(value, int) else value + "x"}
        assert entry_hash(**changed) != base, name  # type: ignore[arg-type]


def test_recorded_at_is_normalised_to_utc(db_session: Session) -> None:
    cest = timezone(timedelta(hours=2))
    entry = append(db_session, actor="a", action="b", subject="c", now=T0.astimezone(cest))
    assert entry.recorded_at == "2025-06-01T12:00:00.123456Z"
    with pytest.raises(ValueError, match="naive"):
        append(db_session, actor="a", action="b", subject="c", now=datetime(2025, 1, 1))


def test_detail_is_canonical_ascii_json() -> None:
    assert canonical_detail({"b": 1, "a": "é"}) == '{"a":"\\u00e9","b":1}'
    assert canonical_detail(None) == "{}"
    with pytest.raises(ValueError):
        canonical_detail({"x": float("nan")})
    with pytest.raises(TypeError):
        canonical_detail({"key": b"bytes are not JSON"})


@pytest.mark.parametrize(
    ("field", "value"),
    [("actor", ""), ("actor", "x" * 129), ("action", "x" * 65), ("subject", "nul\x00byte")],
)
def test_bad_fields_refused(db_session: Session, field: str, value: str) -> None:
    fields = {"actor": "a", "action": "b", "subject": "c", field: value}
    with pytest.raises(ValueError, match=field):
        append(db_session, **fields)


@pytest.mark.parametrize(
    "sql",
    [
        'UPDATE audit_log SET detail = \'{"version":"6.6.6"}\' WHERE id = 2',
        "UPDATE audit_log SET actor = 'mallory' WHERE id = 2",
        "UPDATE audit_log SET recorded_at = '2020-01-01T00:00:00.000000Z' WHERE id = 2",
    ],
    ids=["detail", "actor", "recorded_at"],
)
def test_edited_entry_is_named(db_session: Session, sql: str) -> None:
    append_three(db_session)
    tamper(db_session, sql)
    result = verify(db_session)
    assert not result.ok
    assert result.first_bad_id == 2
    assert "edited" in result.reason
    assert result.entries == 1
    assert result.last_id == 1
    with pytest.raises(AuditIntegrityError, match="entry 2"):
        result.raise_for_failure()


def test_edit_with_recomputed_hash_is_caught_by_the_next_entry(db_session: Session) -> None:
    entries = append_three(db_session)
    forged = entry_hash(
        entry_id=2,
        recorded_at=entries[1].recorded_at,
        actor="mallory",
        action=entries[1].action,
        subject=entries[1].subject,
        detail=entries[1].detail,
        prev_hash=entries[1].prev_hash,
    )
    tamper(
        db_session,
        "UPDATE audit_log SET actor = 'mallory', entry_hash = :h WHERE id = 2",
        h=forged,
    )
    result = verify(db_session)
    assert (result.ok, result.first_bad_id) == (False, 3)
    assert "prev_hash" in result.reason


def test_deleted_middle_entry_is_detected(db_session: Session) -> None:
    append_three(db_session)
    tamper(db_session, "DELETE FROM audit_log WHERE id = 2")
    result = verify(db_session)
    assert (result.ok, result.first_bad_id) == (False, 3)
    assert "deleted" in result.reason


def test_deleted_first_entry_is_detected(db_session: Session) -> None:
    append_three(db_session)
    tamper(db_session, "DELETE FROM audit_log WHERE id = 1")
    result = verify(db_session)
    assert (result.ok, result.first_bad_id) == (False, 2)


def test_deleted_and_renumbered_entry_is_detected(db_session: Session) -> None:
    append_three(db_session)
    tamper(db_session, "DELETE FROM audit_log WHERE id = 2")
    tamper(db_session, "UPDATE audit_log SET id = 2 WHERE id = 3")
    result = verify(db_session)
    assert (result.ok, result.first_bad_id) == (False, 2)


def test_swapped_entries_are_detected(db_session: Session) -> None:
    append_three(db_session)
    # Swap the whole contents of entries 1 and 2 (hashes included), keeping the ids.
    columns = ("recorded_at", "actor", "action", "subject", "detail", "prev_hash", "entry_hash")
    rows = {
        row.id: row
        for row in db_session.execute(
            select(AuditEntry.id, *(getattr(AuditEntry, c) for c in columns))
        )
    }
    assignments = ", ".join(f"{c} = :{c}" for c in columns)
    for target, source in ((1, 2), (2, 1)):
        values = {c: getattr(rows[source], c) for c in columns}
        db_session.execute(
            text(f"UPDATE audit_log SET {assignments} WHERE id = :id"), {**values, "id": target}
        )
    db_session.commit()
    result = verify(db_session)
    assert (result.ok, result.first_bad_id) == (False, 1)


def test_truncated_tail_needs_an_anchor(db_session: Session) -> None:
    """A hash chain alone cannot see a removed tail; the anchored head can."""
    append_three(db_session)
    anchor = verify(db_session)
    tamper(db_session, "DELETE FROM audit_log WHERE id = 3")
    later = verify(db_session)
    assert later.ok  # documented limitation
    assert (later.last_id, later.last_hash) != (anchor.last_id, anchor.last_hash)


def test_rolled_back_append_leaves_no_gap(db_session: Session) -> None:
    append(db_session, actor="a", action="x", subject="s")
    db_session.rollback()
    entry = append(db_session, actor="a", action="y", subject="s")
    db_session.commit()
    assert entry.id == 1
    assert verify(db_session).ok


def test_concurrent_appends_keep_one_chain(db_engine: Engine) -> None:
    factory = make_session_factory(db_engine)
    per_thread = 15
    start = threading.Barrier(2, timeout=10)

    def writer(name: str) -> None:
        start.wait()
        for i in range(per_thread):
            with factory() as session:
                append(session, actor=name, action="test.append", subject=f"n:{i}")
                session.commit()

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(writer, name) for name in ("replica-a", "replica-b")]
        for future in futures:
            future.result(timeout=60)

    with factory() as session:
        result = verify(session)
        assert result.ok, result.reason
        assert result.entries == 2 * per_thread
        actors = session.scalars(select(AuditEntry.actor)).all()
        assert sorted(set(actors)) == ["replica-a", "replica-b"]
