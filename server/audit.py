"""Append-only, hash-chained audit log (DESIGN "Server": verifiable by a command).

Every entry commits to the one before it::

    entry_hash = SHA-256( canonical JSON of
        ["edgeota-audit-v1", id, recorded_at, actor, action, subject, detail, prev_hash] )

where ``detail`` is the stored canonical JSON text and the first entry's
``prev_hash`` is 64 zeros. Editing, deleting or reordering any entry therefore
breaks the chain at that entry, and :func:`verify` names it.

How ids are assigned (the id is hashed, so it must be known before hashing):
:func:`append` takes the ``"audit"`` lock, reads ``max(id)`` and inserts
``max + 1`` explicitly. The alternative, flush to get a database sequence
value and then update the hash, was rejected because sequences are not
transactional: a rolled-back append would leave a gap, and a gap is exactly
what a deleted entry looks like. Under the lock, ids are gapless and the chain
never forks, even with several server replicas appending at once.

What the chain cannot show: a truncated tail. Deleting the newest entries
leaves a shorter chain that is still internally consistent. Detect that by
anchoring the head outside the database: :func:`verify` returns the last id and
hash, which an operator can print, store elsewhere (a ticket, a signed note)
and compare with a later run -- the later chain must still contain that id
with that hash.

Never put secrets in ``detail``: pass ids (token id, key id, release id), not
keys, tokens or passwords. The log is meant to be read and exported.

Callers own the transaction: :func:`append` adds to the session and flushes;
the entry becomes durable when the caller commits, together with the change it
records (so an action and its audit entry succeed or fail together).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota.protocol.errors import EdgeotaError
from edgeota.server.db.models import AuditEntry
from edgeota.server.db.session import lock

__all__ = [
    "AUDIT_LOCK",
    "GENESIS_HASH",
    "AuditEntry",
    "AuditIntegrityError",
    "AuditVerification",
    "append",
    "canonical_detail",
    "entry_hash",
    "head",
    "verify",
]

GENESIS_HASH = "0" * 64
AUDIT_LOCK = "audit"
_DOMAIN = "edgeota-audit-v1"  # versioned so a future encoding cannot collide with this one
# Column widths (see AuditEntry); checked here so SQLite, which ignores VARCHAR
# lengths, refuses the same values PostgreSQL would.
_FIELD_LIMITS: Mapping[str, int] = MappingProxyType({"actor": 128, "action": 64, "subject": 255})
_VERIFY_BATCH = 500  # rows fetched per round trip while walking the chain
_HASHED_COLUMNS = (
    AuditEntry.id,
    AuditEntry.recorded_at,
    AuditEntry.actor,
    AuditEntry.action,
    AuditEntry.subject,
    AuditEntry.detail,
    AuditEntry.prev_hash,
)


class AuditIntegrityError(EdgeotaError):
    """The audit chain does not verify; raised by callers that require an intact log."""


@dataclass(frozen=True)
class AuditVerification:
    """Outcome of :func:`verify`.

    ``entries`` counts the entries that verified before the first bad one (all
    of them when ``ok``); ``last_id`` / ``last_hash`` are the newest of those
    (``None`` / :data:`GENESIS_HASH` for an empty log) -- the head to anchor.
    """

    ok: bool
    entries: int
    first_bad_id: int | None
    reason: str
    last_id: int | None
    last_hash: str

    def raise_for_failure(self) -> None:
        """Raise :class:`AuditIntegrityError` with the reason if the chain did not verify."""
        if not self.ok:
            raise AuditIntegrityError(
                f"audit log broken at entry {self.first_bad_id}: {self.reason}"
            )


def canonical_detail(detail: Mapping[str, Any] | None) -> str:
    """Canonical JSON text of ``detail``: sorted keys, no spaces, ASCII only, no NaN.

    ASCII-only text is stored and returned byte for byte by every database,
    so the hashed string survives a round trip.

    Raises:
        TypeError, ValueError: ``detail`` is not plain JSON data.
    """
    return json.dumps(
        dict(detail or {}),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        allow_nan=False,
    )


def entry_hash(
    *,
    entry_id: int,
    recorded_at: str,
    actor: str,
    action: str,
    subject: str,
    detail: str,
    prev_hash: str,
) -> str:
    """SHA-256 (hex) of an entry's canonical encoding; ``detail`` is the stored JSON text."""
    encoded = json.dumps(
        [_DOMAIN, entry_id, recorded_at, actor, action, subject, detail, prev_hash],
        separators=(",", ":"),
        ensure_ascii=True,
    ).encode("ascii")
    return hashlib.sha256(encoded).hexdigest()


def _format_instant(now: datetime) -> str:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("naive datetime refused: pass a tz-aware value (UTC)")
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_field(name: str, value: str) -> None:
    limit = _FIELD_LIMITS[name]
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ValueError(f"audit {name} must be a non-empty string of at most {limit} characters")
    if "\x00" in value:
        raise ValueError(f"audit {name} must not contain NUL characters")


class _HashedFields(Protocol):
    """What the chain hash covers: an :class:`AuditEntry`, or a plain row of its columns."""

    @property
    def id(self) -> int: ...
    @property
    def recorded_at(self) -> str: ...
    @property
    def actor(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def subject(self) -> str: ...
    @property
    def detail(self) -> str: ...
    @property
    def prev_hash(self) -> str: ...


def _hash_of(entry: _HashedFields) -> str:
    return entry_hash(
        entry_id=entry.id,
        recorded_at=entry.recorded_at,
        actor=entry.actor,
        action=entry.action,
        subject=entry.subject,
        detail=entry.detail,
        prev_hash=entry.prev_hash,
    )


def append(
    session: Session,
    *,
    actor: str,
    action: str,
    subject: str,
    detail: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> AuditEntry:
    """Append one entry to the chain in the session's transaction and return it.

    ``actor`` is who did it (a token name, ``"server"``), ``action`` what
    (``"release.publish"``), ``subject`` on what (``"release:7"``), and
    ``detail`` plain JSON data with ids, never secrets.

    The ``"audit"`` lock is held until the caller commits, so appenders queue
    behind each other; keep the transaction short after appending.

    Raises:
        ValueError: an empty or over-long field, a naive ``now``, or ``detail``
            that is not JSON data.
    """
    _check_field("actor", actor)
    _check_field("action", action)
    _check_field("subject", subject)
    detail_text = canonical_detail(detail)
    recorded_at = _format_instant(now if now is not None else datetime.now(UTC))

    lock(session, AUDIT_LOCK)
    # Read the head only under the lock: it cannot move until we commit.
    newest = head(session)
    entry_id, prev_hash = (newest[0] + 1, newest[1]) if newest is not None else (1, GENESIS_HASH)
    entry = AuditEntry(
        id=entry_id,
        recorded_at=recorded_at,
        actor=actor,
        action=action,
        subject=subject,
        detail=detail_text,
        prev_hash=prev_hash,
    )
    entry.entry_hash = _hash_of(entry)
    session.add(entry)
    session.flush()
    return entry


def verify(session: Session) -> AuditVerification:
    """Walk the whole chain in id order and report the first entry that does not verify.

    Detected: an edited entry (its hash no longer matches its contents), a
    deleted entry (a gap in the ids, or a ``prev_hash`` that is not the
    previous entry's hash), reordered or swapped entries (the id is hashed,
    and each entry names its predecessor's hash).

    Not detected: a truncated tail -- deleting the newest entries leaves a
    valid, shorter chain. Compare the returned ``last_id``/``last_hash`` with a
    head recorded earlier outside the database to catch that.

    Reads in batches, so memory stays flat however long the log is. It only
    reads; a concurrent append is either seen completely or not at all.
    """
    expected_id = 1
    prev_hash = GENESIS_HASH
    last_id: int | None = None
    entries = 0

    def failure(bad_id: int, reason: str) -> AuditVerification:
        return AuditVerification(
            ok=False,
            entries=entries,
            first_bad_id=bad_id,
            reason=reason,
            last_id=last_id,
            last_hash=prev_hash,
        )

    # Plain rows, not ORM objects: the identity map could hand back objects
    # already loaded in this session instead of what the database holds now.
    rows = session.execute(
        select(*_HASHED_COLUMNS, AuditEntry.entry_hash)
        .order_by(AuditEntry.id)
        .execution_options(yield_per=_VERIFY_BATCH)
    )
    try:
        for entry in rows:
            if entry.id != expected_id:
                return failure(
                    entry.id,
                    f"expected entry {expected_id} next, found {entry.id}: "
                    "entries were deleted or renumbered",
                )
            if entry.prev_hash != prev_hash:
                return failure(
                    entry.id,
                    "prev_hash does not match the previous entry's hash: "
                    "an entry before it was deleted, replaced or reordered",
                )
            if _hash_of(entry) != entry.entry_hash:
                return failure(entry.id, "entry_hash does not match the entry's contents: edited")
            entries += 1
            last_id = entry.id
            prev_hash = entry.entry_hash
            expected_id += 1
    finally:
        rows.close()
    return AuditVerification(
        ok=True,
        entries=entries,
        first_bad_id=None,
        reason="chain intact" if entries else "audit log is empty",
        last_id=last_id,
        last_hash=prev_hash,
    )


def head(session: Session) -> tuple[int, str] | None:
    """The newest entry's id and hash without verifying: cheap, for display and anchoring."""
    row = session.execute(
        select(AuditEntry.id, AuditEntry.entry_hash).order_by(AuditEntry.id.desc()).limit(1)
    ).first()
    return (row.id, row.entry_hash) if row is not None else None
