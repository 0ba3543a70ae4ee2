"""The agent's update cycle as a persisted state machine (the journal).

A Pi loses power mid-update; the only thing that survives is what was on disk.
So the update cycle is one small record, written atomically (temp file,
``fsync``, rename, ``fsync`` of the folder, see :mod:`edgeota.protocol.files`)
**before** the work of a state starts -- Mender's ``SaveState::OnEnter``. On
start the agent loads the record and asks :func:`recovery_action` what to do;
because the record was saved before the work, the saved state always names
the work that may have been interrupted::

    idle -> downloading -> verifying -> validating -> swapping -> probation
         -> committed | rolled_back | failed(reason)

Each state is one step of work (:data:`edgeota.agent.runner.STEPS`): download
the bundle, decrypt-verify-unpack it, run the validation gate, swap, watch
probation. DESIGN's ``checking`` and ``staged`` are not journal states: the
check only reads TUF metadata (which ngclient writes atomically itself) and
concerns every model at once, and nothing happens between a model passing
the gate and its swap, so saving either would be a durable write for no work.
A journal written by a version that had them names a state this one does not
know, and is handled like any unreadable journal (``failed(corrupt_journal)``,
the known-good model kept).

Three rules keep a device serving:

* **Never a half-written model.** After a restart the agent serves
  :func:`model_to_serve`: the new model only once it is ``committed`` (it
  passed probation), otherwise the previous one. A swap or probation cut by a
  crash is a failed probation and reverts.
* **Never delete the last known-good model.** The journal deletes nothing;
  whoever cleans model folders keeps every model in :func:`models_to_keep`.
* **Loops are capped.** Every save counts; past ``max_saves_per_update`` the
  update is forced to ``failed(state_loop)``, so a model that crashes the agent
  on every start cannot brick the device by crash-looping it.

The transition table and the recovery table are data: reading them is reading
the design, and the tests walk them row by row.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.files import (
    PRIVATE_FILE_MODE,
    FileTooLargeError,
    InsecureKeyFileError,
    atomic_write,
    read_private_file,
)
from edgeota.protocol.reasons import Reason

if TYPE_CHECKING:
    from edgeota.agent.uptane import InstallDecision

__all__ = [
    "FORMAT_VERSION",
    "HISTORY_LIMIT",
    "MAX_JOURNAL_BYTES",
    "REASON_CORRUPT_JOURNAL",
    "REASON_CRASH_IN_PROBATION",
    "REASON_CRASH_IN_SWAP",
    "REASON_STATE_LOOP",
    "RECOVERY",
    "RESUMABLE_STATES",
    "TERMINAL_STATES",
    "TRANSITIONS",
    "CorruptJournalError",
    "Event",
    "IllegalTransitionError",
    "Journal",
    "JournalRecord",
    "ModelRef",
    "RecoveryAction",
    "State",
    "StateLoopError",
    "model_to_serve",
    "models_to_keep",
    "record_is_terminal",
    "recovery_action",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# A record is a few hundred bytes; anything near this bound is not a journal
# this agent wrote, and the bound keeps a wrong path from being read whole.
MAX_JOURNAL_BYTES = 64 * 1024
# Enough to tell, in a support dump, how the last update went; bounded so a
# crash loop cannot grow the file.
HISTORY_LIMIT = 16
_MAX_TEXT = 512  # bytes of any one string field (paths, names, versions)
_REASON_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_UPDATE_ID_RE = re.compile(r"(?:[0-9a-f]{32})?")

REASON_STATE_LOOP = str(Reason.STATE_LOOP)
REASON_CRASH_IN_SWAP = str(Reason.CRASH_DURING_SWAP)
REASON_CRASH_IN_PROBATION = str(Reason.CRASH_DURING_PROBATION)
REASON_CORRUPT_JOURNAL = str(Reason.CORRUPT_JOURNAL)


class State(enum.StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    VALIDATING = "validating"
    SWAPPING = "swapping"
    PROBATION = "probation"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class Event(enum.StrEnum):
    """What happened; the closed set of inputs of the state machine."""

    UPDATE_FOUND = "update_found"
    DOWNLOAD_DONE = "download_done"
    VERIFIED = "verified"
    VALID = "valid"
    SWAPPED = "swapped"
    PROBATION_PASSED = "probation_passed"
    PROBATION_FAILED = "probation_failed"
    FAILURE = "failure"
    # The agent restarted in this state and is about to do its recovery action.
    RECOVERED = "recovered"
    # The outcome of a finished update was reported to the server.
    REPORTED = "reported"


class RecoveryAction(enum.StrEnum):
    NONE = "none"
    RESUME_DOWNLOAD = "resume_download"
    REVERIFY_DOWNLOAD = "reverify_download"
    REVERT_TO_PREVIOUS = "revert_to_previous"


_S = State
_E = Event

TRANSITIONS: Mapping[tuple[State, Event], State] = MappingProxyType({
    # A check found a target for this model: the update begins (new update id).
    (_S.IDLE, _E.UPDATE_FOUND): _S.DOWNLOADING,
    (_S.DOWNLOADING, _E.DOWNLOAD_DONE): _S.VERIFYING,
    (_S.DOWNLOADING, _E.FAILURE): _S.FAILED,
    # Self-loops on RECOVERED are real saves: each restart counts toward the
    # save cap, which is what turns a crash loop into failed(state_loop). The
    # download resumes from its partial file in the next cycle.
    (_S.DOWNLOADING, _E.RECOVERED): _S.DOWNLOADING,
    # The downloaded bundle is opened again (decrypted, authenticated, unpacked
    # into a fresh folder), never fetched again.
    (_S.VERIFYING, _E.VERIFIED): _S.VALIDATING,
    (_S.VERIFYING, _E.FAILURE): _S.FAILED,
    (_S.VERIFYING, _E.RECOVERED): _S.VERIFYING,
    # Valid: straight to the swap; nothing happens in between to save a state for.
    (_S.VALIDATING, _E.VALID): _S.SWAPPING,
    (_S.VALIDATING, _E.FAILURE): _S.FAILED,
    # Back to verifying, not validating: files unpacked before the crash are not
    # trusted (and the validated session died with the process), so they are
    # verified again from the downloaded bundle.
    (_S.VALIDATING, _E.RECOVERED): _S.VERIFYING,
    (_S.SWAPPING, _E.SWAPPED): _S.PROBATION,
    # From swapping on, the live model may already be the new one, so any
    # failure ends in a revert (rolled_back), never in a plain "failed".
    (_S.SWAPPING, _E.FAILURE): _S.ROLLED_BACK,
    (_S.SWAPPING, _E.RECOVERED): _S.ROLLED_BACK,
    (_S.PROBATION, _E.PROBATION_PASSED): _S.COMMITTED,
    (_S.PROBATION, _E.PROBATION_FAILED): _S.ROLLED_BACK,
    (_S.PROBATION, _E.FAILURE): _S.ROLLED_BACK,
    # A crash during probation is a failed probation: the new model may be
    # what crashed the agent.
    (_S.PROBATION, _E.RECOVERED): _S.ROLLED_BACK,
    # Terminal states stay on disk until the outcome is reported, so an outcome
    # reached just before a power cut is still reported after the reboot.
    (_S.COMMITTED, _E.REPORTED): _S.IDLE,
    (_S.ROLLED_BACK, _E.REPORTED): _S.IDLE,
    (_S.FAILED, _E.REPORTED): _S.IDLE,
})

RECOVERY: Mapping[State, RecoveryAction] = MappingProxyType({
    State.IDLE: RecoveryAction.NONE,
    State.DOWNLOADING: RecoveryAction.RESUME_DOWNLOAD,
    State.VERIFYING: RecoveryAction.REVERIFY_DOWNLOAD,
    State.VALIDATING: RecoveryAction.REVERIFY_DOWNLOAD,
    State.SWAPPING: RecoveryAction.REVERT_TO_PREVIOUS,
    State.PROBATION: RecoveryAction.REVERT_TO_PREVIOUS,
    State.COMMITTED: RecoveryAction.NONE,
    State.ROLLED_BACK: RecoveryAction.NONE,
    State.FAILED: RecoveryAction.NONE,
})

TERMINAL_STATES: frozenset[State] = frozenset({State.COMMITTED, State.ROLLED_BACK, State.FAILED})
#: States an update is under way in before the live model changes: a restart
#: goes on with it in the next cycle while the director still assigns its target.
RESUMABLE_STATES: frozenset[State] = frozenset({
    State.DOWNLOADING, State.VERIFYING, State.VALIDATING})
# States whose record must name the model being installed.
_NEEDS_TARGET = frozenset(State) - {State.IDLE, State.FAILED}
_NEEDS_REASON = frozenset({State.ROLLED_BACK, State.FAILED})
# Rows whose reason the journal knows without being told.
_DEFAULT_REASONS: Mapping[tuple[State, Event], str] = MappingProxyType({
    (State.SWAPPING, Event.RECOVERED): REASON_CRASH_IN_SWAP,
    (State.PROBATION, Event.RECOVERED): REASON_CRASH_IN_PROBATION,
})


class IllegalTransitionError(RuntimeError):
    """A (state, event) pair the table does not allow: a bug in the caller, never bad data."""


class CorruptJournalError(EdgeotaError):
    """The journal file exists but is not a record this agent wrote (or can read)."""


class StateLoopError(EdgeotaError):
    """The update hit its save cap and was forced to ``failed(state_loop)`` (already saved)."""

    def __init__(self, record: JournalRecord) -> None:
        super().__init__(
            f"update {record.update_id or '(check)'} saved its state {record.saves} times; "
            f"forced to failed({REASON_STATE_LOOP})"
        )
        self.record = record


def record_is_terminal(state: State) -> bool:
    """True for the outcomes of an update (committed, rolled_back, failed)."""
    return state in TERMINAL_STATES


@dataclass(frozen=True)
class ModelRef:
    """The journal's note of one model: enough to find, re-verify and report it.

    ``target_path`` is the path in both repositories; ``sha256`` the sealed
    bundle's digest from signed metadata; ``model_dir`` the local version folder
    once the bundle is unpacked (``None`` before).
    """

    target_path: str
    sha256: str
    name: str
    version: str
    release_counter: int
    model_dir: str | None = None

    def __post_init__(self) -> None:
        for key in ("target_path", "name", "version"):
            _check_text(key, getattr(self, key))
        if self.model_dir is not None:
            _check_text("model_dir", self.model_dir)
        if not isinstance(self.sha256, str) or not _SHA256_RE.fullmatch(self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if (
            not isinstance(self.release_counter, int)
            or isinstance(self.release_counter, bool)
            or self.release_counter < 0
        ):
            raise ValueError(f"release_counter must be an int >= 0, got {self.release_counter!r}")

    @classmethod
    def from_decision(cls, decision: InstallDecision, model_dir: Path | None = None) -> ModelRef:
        """The note for a target both repositories agreed this device may install."""
        return cls(
            target_path=decision.target_path,
            sha256=decision.sha256,
            name=decision.image.name,
            version=decision.image.version,
            release_counter=decision.image.release_counter,
            model_dir=None if model_dir is None else str(model_dir),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_path": self.target_path,
            "sha256": self.sha256,
            "name": self.name,
            "version": self.version,
            "release_counter": self.release_counter,
            "model_dir": self.model_dir,
        }

    @classmethod
    def from_dict(cls, data: object) -> ModelRef:
        """Strict parse: exactly the known keys; ``ValueError``/``TypeError`` otherwise."""
        if not isinstance(data, dict):
            raise TypeError("model reference is not an object")
        if set(data) != set(_MODEL_KEYS):
            raise ValueError(f"model reference keys {sorted(data)} != {sorted(_MODEL_KEYS)}")
        return cls(**data)


_MODEL_KEYS = tuple(ModelRef.__dataclass_fields__)


def _check_text(key: str, value: object) -> None:
    if not isinstance(value, str) or not value or len(value.encode()) > _MAX_TEXT:
        raise ValueError(f"{key} must be a non-empty string of at most {_MAX_TEXT} bytes")


@dataclass(frozen=True)
class JournalRecord:
    """One saved state of the update cycle; immutable, every field validated.

    ``previous`` is the model to revert to: the known-good model that was live
    when the update started (in ``idle`` it is simply the live model).
    ``saves`` counts the writes since the current check or update began.
    ``update_id`` is empty until an update (a target) is found.
    """

    state: State
    entered_at: str
    target: ModelRef | None = None
    previous: ModelRef | None = None
    reason: str | None = None
    update_id: str = ""
    saves: int = 0
    history: tuple[tuple[State, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.state, State):
            raise TypeError(f"state must be a State, got {self.state!r}")
        _check_timestamp(self.entered_at)
        for key in ("target", "previous"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, ModelRef):
                raise ValueError(f"{key} must be a ModelRef or None")
        if self.state in _NEEDS_TARGET and self.target is None:
            raise ValueError(f"state {self.state} needs a target")
        if self.state is State.IDLE and self.target is not None:
            raise ValueError(f"state {self.state} has no target")
        if self.state in _NEEDS_REASON:
            if not isinstance(self.reason, str) or not _REASON_RE.fullmatch(self.reason):
                raise ValueError(f"state {self.state} needs a reason code, got {self.reason!r}")
        elif self.reason is not None:
            raise ValueError(f"state {self.state} carries no reason")
        if not isinstance(self.update_id, str) or not _UPDATE_ID_RE.fullmatch(self.update_id):
            raise ValueError("update_id must be empty or 32 lowercase hex digits")
        if not isinstance(self.saves, int) or isinstance(self.saves, bool) or self.saves < 0:
            raise ValueError(f"saves must be an int >= 0, got {self.saves!r}")
        if len(self.history) > HISTORY_LIMIT:
            raise ValueError(f"history holds more than {HISTORY_LIMIT} entries")
        for entry in self.history:
            if len(entry) != 2 or not isinstance(entry[0], State):
                raise ValueError(f"bad history entry {entry!r}")
            _check_timestamp(entry[1])

    def to_json(self) -> bytes:
        """Canonical UTF-8 JSON (sorted keys), tagged with ``format``."""
        doc = {
            "format": FORMAT_VERSION,
            "state": str(self.state),
            "entered_at": self.entered_at,
            "target": None if self.target is None else self.target.to_dict(),
            "previous": None if self.previous is None else self.previous.to_dict(),
            "reason": self.reason,
            "update_id": self.update_id,
            "saves": self.saves,
            "history": [[str(s), at] for s, at in self.history],
        }
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        if len(data) > MAX_JOURNAL_BYTES:  # cannot happen with the field bounds; fail loud
            raise ValueError(f"journal record of {len(data)} bytes exceeds {MAX_JOURNAL_BYTES}")
        return data

    @classmethod
    def from_json(cls, data: bytes) -> JournalRecord:
        """Strict parse; any deviation raises :class:`CorruptJournalError`.

        Bounded (``MAX_JOURNAL_BYTES``), exact key set, known ``format`` only,
        duplicate keys and NaN refused, every field validated as on creation.
        """
        doc = _parse_object(data)
        version = doc.get("format")
        if type(version) is not int or version != FORMAT_VERSION:  # JSON true == 1 in Python
            raise CorruptJournalError(f"unknown journal format {doc.get('format')!r}")
        if set(doc) != _RECORD_KEYS:
            raise CorruptJournalError(f"journal keys {sorted(doc)} != {sorted(_RECORD_KEYS)}")
        try:
            history = doc["history"]
            if not isinstance(history, list):
                raise TypeError("history is not a list")
            return cls(
                state=State(doc["state"]),
                entered_at=doc["entered_at"],
                target=None if doc["target"] is None else ModelRef.from_dict(doc["target"]),
                previous=(
                    None if doc["previous"] is None else ModelRef.from_dict(doc["previous"])
                ),
                reason=doc["reason"],
                update_id=doc["update_id"],
                saves=doc["saves"],
                history=tuple(_history_entry(e) for e in history),
            )
        except (ValueError, TypeError) as e:
            raise CorruptJournalError(f"invalid journal record: {e}") from e


_RECORD_KEYS = frozenset({
    "format", "state", "entered_at", "target", "previous", "reason", "update_id", "saves",
    "history",
})


def _history_entry(entry: object) -> tuple[State, str]:
    if not isinstance(entry, list) or len(entry) != 2:
        raise ValueError(f"bad history entry {entry!r}")
    return State(entry[0]), entry[1]


def _check_timestamp(value: object) -> None:
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError(f"timestamp must be an ISO 8601 string, got {value!r}")
    if datetime.fromisoformat(value).tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no UTC offset")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _parse_object(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_JOURNAL_BYTES:
        raise CorruptJournalError(f"journal of {len(data)} bytes exceeds {MAX_JOURNAL_BYTES}")
    try:
        doc = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptJournalError(f"journal is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise CorruptJournalError("journal is not a JSON object")
    return doc


def recovery_action(record: JournalRecord) -> RecoveryAction:
    """What the agent must do on start, given the last saved record.

    The record was saved before the work of its state began, so its state
    names the work a crash may have cut short (table :data:`RECOVERY`):

    * ``idle`` -- nothing was in progress.
    * ``downloading`` -- resume the download from what is on disk (over MQTT
      from its last durable window) in the next cycle, if the director still
      assigns the target; the live model was not touched.
    * ``verifying`` / ``validating`` -- verify again from the downloaded bundle
      (decrypt, authenticate, unpack into a fresh folder; no fetch): anything
      unpacked before the crash is discarded, not trusted.
    * ``swapping`` / ``probation`` -- revert to the previous model. The new
      model never served a full probation, and it may be what crashed the
      agent, so a crash here counts as a failed probation.
    * ``committed`` / ``rolled_back`` / ``failed`` -- nothing: the outcome is
      final; report it and go idle.
    """
    return RECOVERY[record.state]


def model_to_serve(record: JournalRecord) -> ModelRef | None:
    """The model a freshly started agent serves: new only once committed.

    In every other state the previous known-good model is served, so a crash
    anywhere in an update can never leave the device on a half-installed or
    unproven model.
    """
    return record.target if record.state is State.COMMITTED else record.previous


def models_to_keep(record: JournalRecord) -> frozenset[ModelRef]:
    """Models no cleanup may delete: the known-good one and the one being installed."""
    return frozenset(m for m in (record.previous, record.target) if m is not None)


class Journal:
    """The persisted update state of one agent, at ``path``.

    Callers do the work of a state only after :meth:`transition` returned: the
    record is on disk by then (save-on-enter), so a crash during the work
    leaves a record that names it. The journal owns ``saves``, ``update_id``,
    ``entered_at`` and ``history``; callers pass only the target, the previous
    model and reason codes.

    The folder holding ``path`` is created on the first save if missing.

    ``on_saved``, when given, is called with every record once it is on disk,
    on the thread that saved it. It observes, it does not veto: whatever it
    raises propagates from the save with the record already durable, which is
    exactly a process dying right after entering a state (the simulator cuts
    the power this way, at the state a scenario names).
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], datetime],
        max_saves_per_update: int = 64,
        on_saved: Callable[[JournalRecord], None] | None = None,
    ) -> None:
        if max_saves_per_update < 1:
            raise ValueError(f"max_saves_per_update must be >= 1, got {max_saves_per_update}")
        self._path = Path(path)
        self._clock = clock
        self._max_saves = max_saves_per_update
        self._current: JournalRecord | None = None
        self._on_saved = on_saved

    @property
    def path(self) -> Path:
        return self._path

    @property
    def current(self) -> JournalRecord:
        """The last record loaded or saved; :meth:`load` comes first."""
        if self._current is None:
            raise RuntimeError("journal not loaded: call load() or load_or_reset() first")
        return self._current

    def load(self) -> JournalRecord:
        """Read the saved record; a missing file is a device that never updated (idle).

        Raises:
            CorruptJournalError: the file is unreadable as a journal: bad JSON,
                unknown format, invalid fields, larger than ``MAX_JOURNAL_BYTES``,
                or accessible to other users (a journal others can write could
                have been swapped, so it is not trusted either).
            OSError: the disk failed; not a journal problem, so not reset.
        """
        try:
            data = read_private_file(self._path, MAX_JOURNAL_BYTES)
        except FileNotFoundError:
            record = JournalRecord(State.IDLE, entered_at=self._now())
        except (FileTooLargeError, InsecureKeyFileError) as e:
            raise CorruptJournalError(f"{self._path}: {e}") from e
        else:
            record = JournalRecord.from_json(data)
        self._current = record
        return record

    def load_or_reset(self) -> JournalRecord:
        """:meth:`load`, replacing a corrupt journal by ``failed(corrupt_journal)``.

        Policy: a corrupt journal is treated like an update that failed. The
        new record keeps the ``previous`` model if that one entry of the old
        file still parses strictly (the known-good model stays the one served
        and is not garbage-collected); the half-known target is dropped, so the
        device serves the known-good model (or none, if nothing was salvaged)
        and the next check asks the director again. ``failed`` rather than
        ``idle``, so the agent reports the reset like any other outcome. The
        reset itself deletes no model file. Trade-off, chosen on purpose: a
        corrupt ``committed`` record falls back to the model before that update
        (a model that was known-good too) rather than trusting the damaged
        record's word that the new one passed probation; and the salvaged entry
        is a note, not proof, so the model host checks the files before serving.
        Atomic writes mean a power cut cannot produce a corrupt journal;
        corruption means the card or an intruder changed it, which the report
        brings to an operator's eyes.
        """
        try:
            return self.load()
        except CorruptJournalError as e:
            logger.warning("journal %s is corrupt (%s); resetting to failed", self._path, e)
            previous = self._salvage_previous()
        now = self._now()
        record = JournalRecord(
            State.FAILED,
            entered_at=now,
            previous=previous,
            reason=REASON_CORRUPT_JOURNAL,
            saves=1,
            history=((State.FAILED, now),),
        )
        self._save(record)
        return record

    def transition(
        self,
        event: Event,
        *,
        target: ModelRef | None = None,
        previous: ModelRef | None = None,
        reason: str | None = None,
    ) -> JournalRecord:
        """Apply ``event``, save the new record, and return it (save-on-enter).

        ``target`` replaces the saved one when given (e.g. the target with its
        ``model_dir`` once unpacked). ``previous`` -- the known-good model -- can
        only be declared on ``update_found`` (e.g. a factory-installed model);
        afterwards the journal alone moves it, so no caller can drop the model a
        revert needs. ``reason`` is required
        when entering ``failed`` or ``rolled_back`` (unless the row has a default
        reason) and refused otherwise.

        Raises:
            IllegalTransitionError: the table has no row for (state, event).
            StateLoopError: the save cap was hit; ``failed(state_loop)`` was
                saved instead of the requested state. Do not do its work.
            OSError: the write failed; the old record is intact on disk and
                stays :attr:`current`.
        """
        old = self.current
        try:
            new_state = TRANSITIONS[(old.state, event)]
        except KeyError:
            raise IllegalTransitionError(
                f"event {event} is not allowed in state {old.state}"
            ) from None
        if reason is None:
            reason = _DEFAULT_REASONS.get((old.state, event))
        if (reason is not None) != (new_state in _NEEDS_REASON):
            raise IllegalTransitionError(
                f"entering {new_state} {'needs' if new_state in _NEEDS_REASON else 'takes no'} "
                "reason code"
            )
        if event is Event.UPDATE_FOUND and target is None:
            raise IllegalTransitionError("update_found needs the target (use begin())")
        if target is not None and new_state is State.IDLE:
            raise IllegalTransitionError(f"{new_state} has no target")
        if previous is not None and event is not Event.UPDATE_FOUND:
            # Replacing the known-good model mid-update could lose the only model
            # a revert can go back to; it is declared only when an update begins.
            raise IllegalTransitionError("previous can only be set on update_found")

        now = self._now()
        new_target = target if target is not None else old.target
        new_previous = previous if previous is not None else old.previous
        update_id = old.update_id
        saves = old.saves + 1
        if event is Event.UPDATE_FOUND:
            saves, update_id = 1, secrets.token_hex(16)
        elif new_state is State.IDLE:
            # Leaving an outcome: a committed target becomes the known-good model.
            if old.state is State.COMMITTED:
                new_previous = old.target
            new_target, saves, update_id = None, 0, ""

        if saves > self._max_saves and new_state not in TERMINAL_STATES | {State.IDLE}:
            forced = self._record(old, State.FAILED, now, new_target, new_previous,
                                  REASON_STATE_LOOP, update_id, saves)
            self._save(forced)
            raise StateLoopError(forced)
        record = self._record(old, new_state, now, new_target, new_previous, reason,
                              update_id, saves)
        self._save(record)
        return record

    def begin(self, target: ModelRef, *, previous: ModelRef | None = None) -> JournalRecord:
        """Start an update of ``target`` (idle -> downloading): new update id, saves reset.

        ``previous`` declares the known-good model to revert to when the journal
        does not know it yet (a factory-installed model); by default the idle
        record's own ``previous`` (the live model) stays.
        """
        return self.transition(Event.UPDATE_FOUND, target=target, previous=previous)

    def recover(self) -> tuple[RecoveryAction, JournalRecord]:
        """On start: the recovery action for the saved state, with the restart saved.

        For any action but ``none`` the ``recovered`` event is applied first,
        so every restart counts toward the save cap (a crash loop ends in
        ``failed(state_loop)``, raised as :class:`StateLoopError`) and a crash
        in swapping or probation is saved as ``rolled_back`` before the agent
        reverts. The returned record is the one to continue from.
        """
        action = recovery_action(self.current)
        if action is RecoveryAction.NONE:
            return action, self.current
        return action, self.transition(Event.RECOVERED)

    def _record(
        self,
        old: JournalRecord,
        state: State,
        now: str,
        target: ModelRef | None,
        previous: ModelRef | None,
        reason: str | None,
        update_id: str,
        saves: int,
    ) -> JournalRecord:
        return JournalRecord(
            state=state,
            entered_at=now,
            target=target,
            previous=previous,
            reason=reason,
            update_id=update_id,
            saves=saves,
            history=(*old.history, (state, now))[-HISTORY_LIMIT:],
        )

    def _save(self, record: JournalRecord) -> None:
        data = record.to_json()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self._path, data, mode=PRIVATE_FILE_MODE)
        self._current = record  # only once it is on disk
        if self._on_saved is not None:
            self._on_saved(record)

    def _salvage_previous(self) -> ModelRef | None:
        """The ``previous`` entry of a corrupt journal, if it alone still parses strictly."""
        try:
            data = read_private_file(self._path, MAX_JOURNAL_BYTES)
            return ModelRef.from_dict(_parse_object(data).get("previous"))
        except (OSError, CorruptJournalError, FileTooLargeError, InsecureKeyFileError,
                ValueError, TypeError):
            return None

    def _now(self) -> str:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the journal clock must return timezone-aware datetimes")
        return now.isoformat()

