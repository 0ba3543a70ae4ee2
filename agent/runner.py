"""The running agent: update cycles, journal, hot swap, probation, reports, local inference.

One ``Agent`` per device wires the pieces together in the order the journal
demands: each state is saved before its work starts (:data:`STEPS` names the
work of each)::

    idle -> downloading -> verifying -> validating -> swapping -> probation
         -> committed | rolled_back | failed(reason)

``run_cycle()`` performs one verified check and, per named model, an install
up to probation -- or goes on with one a restart interrupted, from the step
its journal names; ``check_probation()`` commits or reverts when the window is
over. Both are plain methods with injected clocks so tests, the simulator and
``edgeota-agent run`` drive exactly the same code.

The agent owns the device's one MQTT session (:class:`DeviceConnection`) when
``agent.toml``'s transport is MQTT: the update client fetches over it, and
reports, telemetry, presence and the server's notify go through it too. Over
HTTP there is no session; reports are POSTed.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

from tuf.api import exceptions as tuf_exceptions

from edgeota.agent.clock import ClockUntrustedError, TimeFloor
from edgeota.agent.config import AgentConfig, AgentConfigError
from edgeota.agent.failures import reason_for
from edgeota.agent.journal import (
    RESUMABLE_STATES,
    TERMINAL_STATES,
    Event,
    Journal,
    JournalRecord,
    ModelRef,
    RecoveryAction,
    State,
    StateLoopError,
    model_to_serve,
)
from edgeota.agent.model_host import (
    ModelHost,
    NoPreviousModelError,
    RunHook,
    UnknownModelError,
)
from edgeota.agent.mqtt_session import DeviceConnection, NetworkLoop
from edgeota.agent.update_cycle import TransferLimits, UpdateClient
from edgeota.agent.uptane import InstallDecision, UptaneRefusal
from edgeota.protocol.bundle import describe_payload
from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.files import atomic_write
from edgeota.protocol.identity import DeviceIdentity
from edgeota.protocol.manifest import Manifest
from edgeota.protocol.reasons import TRANSIENT_REASONS, Reason
from edgeota.protocol.reports import SignedReport, StatusReport
from edgeota.protocol.telemetry import ModelTelemetry, Telemetry
from edgeota.protocol.topics import DeviceTopic
from edgeota.runtime.validation import SessionSettings, ValidationError

__all__ = ["STEPS", "Agent", "AgentSettings", "CycleOutcome", "ModelIntegrityError",
           "run_forever"]


class ModelIntegrityError(EdgeotaError):
    """An installed model's files no longer match the digests its manifest pins."""

MAX_CRASHES_PER_TARGET = 3
#: Report sequence numbers reserved on disk per durable write (see ``Agent.next_report_seq``).
SEQ_BLOCK = 32
_CRASH_REASONS = {
    str(Reason.CRASH_DURING_SWAP): Reason.CRASH_DURING_SWAP_REPEATED,
    str(Reason.CRASH_DURING_PROBATION): Reason.CRASH_DURING_PROBATION_REPEATED,
}

#: The work of each journal state, in the order of an update. The agent saves
#: the state, calls :attr:`Agent.on_step`, then does the work; a crash during it
#: leaves the journal naming it, and :data:`~edgeota.agent.journal.RECOVERY` says
#: what a restart does. Tests walk this table.
STEPS: Mapping[State, str] = MappingProxyType({
    State.DOWNLOADING: "fetch the bundle, verified against the signed length and sha256 "
                       "(UpdateClient.download; over MQTT resumable from the last window)",
    State.VERIFYING: "unwrap the content key, decrypt, authenticate and unpack the "
                     "downloaded bundle into a new version folder (UpdateClient.open)",
    State.VALIDATING: "the validation gate on a session with the serving settings "
                      "(UpdateClient.validate)",
    State.SWAPPING: "the outgoing version's last telemetry, then the hot swap of the "
                    "validated session (ModelHost.swap)",
    State.PROBATION: "serve and watch error rate, NaN/Inf and p95 latency against the "
                     "previous version (Agent.check_probation)",
})

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentSettings:
    """Limits and windows of the agent; every wait is bounded."""

    probation_seconds: float = 30.0
    probation_min_inferences: int = 20
    max_error_rate: float = 0.05
    max_latency_factor: float = 3.0  # new p95 vs previous p95
    # A previous p95 below this counts as this: sub-millisecond figures are mostly
    # scheduler noise, and x3 of 0.1 ms would refuse a model for 0.2 ms of jitter.
    latency_floor_ms: float = 2.0
    session: SessionSettings = field(default_factory=SessionSettings)
    report_timeout: float = 10.0  # seconds


# After a cycle that failed for a reason that may pass (the repository unreachable, a
# transfer cut or too slow, a full disk), the next check comes sooner than the poll:
# RETRY_BASE_SECONDS, doubling with each such cycle in a row, at most RETRY_MAX_SECONDS.
RETRY_BASE_SECONDS = 5.0
RETRY_MAX_SECONDS = 300.0


@dataclass(frozen=True)
class CycleOutcome:
    """What one cycle did, per model name; ``transient``: it failed for a passing reason."""

    states: dict[str, str]
    reasons: dict[str, str]
    transient: bool = False


class Agent:
    """One device's agent. Not thread-safe by itself: one caller drives cycles."""

    def __init__(
        self,
        config: AgentConfig,
        settings: AgentSettings | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        update_client: UpdateClient | None = None,
        memory_available: Callable[[], int] | None = None,
        transport: str = "http",
        network: NetworkLoop | None = None,
        limits: TransferLimits | None = None,
        run_hook: RunHook | None = None,
    ) -> None:
        """``transport`` is ``http`` or ``mqtt``: over MQTT the agent opens the device's
        session (driven by ``network`` when many devices share a process) and
        closes it in :meth:`close`. An injected ``update_client`` brings its own
        transport (its session, if any, is then the agent's)."""
        if transport not in ("http", "mqtt"):
            raise AgentConfigError(f"transport must be http or mqtt, not {transport!r}")
        self.config = config
        self.settings = settings or AgentSettings()
        self._clock = clock or (lambda: datetime.now(UTC))
        self.identity = DeviceIdentity.load(config.identity_dir)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        if update_client is None:
            session = None
            if transport == "mqtt":
                session = DeviceConnection.for_device(config, network=network).start()
            update_client = UpdateClient(config, identity=self.identity, connection=session,
                                         limits=limits)
        self.updates = update_client
        #: The device's MQTT session (``None`` over HTTP): reports, telemetry and
        #: notify go through it, and the update client fetches over it.
        self.session: DeviceConnection | None = update_client.connection
        self.host = ModelHost(self.settings.session, memory_available=memory_available,
                              run_hook=run_hook)
        self.floor = TimeFloor(config.state_dir / "time-floor.json", clock=self._clock)
        self._journals: dict[str, Journal] = {}
        self._probation_started: dict[str, datetime] = {}
        self._report_lock = threading.Lock()
        self._seq_file = config.state_dir / "report-seq"
        self._seq_next, self._seq_reserved = 1, 0  # nothing reserved yet: read the file first
        self._release_floor_file = config.state_dir / "release-floor"
        self._refused_file = config.state_dir / "refused-targets.json"
        # Set when the server notifies a director change: the next cycle runs at once.
        self.wake = threading.Event()
        # Called with (model name, record) after every journal save; what it raises
        # propagates from the save (the simulator's power cuts use this).
        self.on_journal_saved: Callable[[str, JournalRecord], None] | None = None
        # Called with (model name, state) once the state is saved, right before its
        # work (STEPS) starts: tests check the order, crash tests kill inside a state.
        self.on_step: Callable[[str, State], None] | None = None
        self._transient_failures = 0  # cycles in a row that failed for a passing reason
        # Models whose new assignment a cycle left for later (their update was still in
        # probation): when the probation ends, wake sets, so the assignment (a rollback,
        # say) is taken at once instead of at the next poll; its notify is spent.
        self._deferred: set[str] = set()
        if self.session is not None:
            self.session.on_notify = self.wake.set

    def close(self) -> None:
        """Close the device's MQTT session, if it has one (idempotent)."""
        if self.session is not None:
            self.session.close()
            self.session = None

    # -- persistence helpers -------------------------------------------------

    def journal_records(self) -> dict[str, JournalRecord]:
        """The current record of every journal opened so far, by model name.

        Safe to call from another thread (a monitor, the simulator's recorder):
        it opens nothing, so it never races :meth:`journal` into a second
        ``Journal`` object for one file.
        """
        return {name: journal.current for name, journal in list(self._journals.items())}

    def journal(self, name: str) -> Journal:
        if name not in self._journals:
            journal = Journal(self.config.state_dir / f"journal-{name}.json", clock=self._clock,
                              on_saved=lambda record: self._journal_saved(name, record))
            journal.load_or_reset()
            self._journals[name] = journal
        return self._journals[name]

    def _journal_saved(self, name: str, record: JournalRecord) -> None:
        hook = self.on_journal_saved
        if hook is not None:
            hook(name, record)

    def release_floor(self) -> int:
        try:
            return int(self._release_floor_file.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def _raise_release_floor(self, counter: int) -> None:
        if counter > self.release_floor():
            atomic_write(self._release_floor_file, f"{counter}\n".encode())

    # -- start and recovery --------------------------------------------------

    def start(self) -> None:
        """Recover every model's journal and load what each should serve.

        Outcomes on disk are reported (a crash between an outcome and its
        report sends it now). An update interrupted before its swap stays in
        its (recovered) state and goes on in the next cycle; one interrupted
        in its swap or probation has been saved as rolled back, and the
        previous model is what is served.
        """
        self._remove_crash_leftovers()
        for path in sorted(self.config.state_dir.glob("journal-*.json")):
            name = path.name.removeprefix("journal-").removesuffix(".json")
            journal = self.journal(name)
            try:
                action, record = journal.recover()
            except StateLoopError as e:  # a crash loop: already saved as failed(state_loop)
                action, record = RecoveryAction.NONE, e.record
            if action is not RecoveryAction.NONE:
                logger.info("recovered %s: %s, now %s", name, action, record.state)
            target = record.target
            if record.state is State.COMMITTED and target is not None:
                # The floor is raised after the commit is saved: a crash in between
                # must not leave the device accepting what the commit excluded.
                self._raise_release_floor(target.release_counter)
            # A power cut is no verdict on the model, so it is retried; a model that
            # takes the agent down again and again is not retried forever.
            repeated = _CRASH_REASONS.get(record.reason or "")
            if (
                record.state is State.ROLLED_BACK
                and target is not None
                and repeated is not None
                and self._count_crash(target.sha256) >= MAX_CRASHES_PER_TARGET
            ):
                self._refuse(target.sha256, str(repeated))
            if record.state in TERMINAL_STATES:
                self._report(name, record.state, record.reason,
                             target.version if target else None)
                record = journal.transition(Event.REPORTED)
            serve = model_to_serve(record)
            if serve is not None and serve.model_dir is not None:
                self._serve(serve)

    def _remove_crash_leftovers(self) -> None:
        """Temp files of interrupted atomic writes and half-unpacked bundles (plaintext!)."""
        state = self.config.state_dir
        for leftover in [*state.glob(".*.tmp"), *state.glob("models/*/.*.partial")]:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    def _serve(self, ref: ModelRef) -> None:
        assert ref.model_dir is not None
        folder = Path(ref.model_dir)
        manifest = Manifest.from_json((folder / "manifest.json").read_bytes())
        model_path = folder / manifest.model.path
        # Files on an SD card can rot or be edited: re-verify before serving.
        for pinned in manifest.files:
            found = describe_payload(folder / pinned.path, pinned.path)
            if (found.sha256, found.size) != (pinned.sha256, pinned.size):
                raise ModelIntegrityError(
                    f"{folder / pinned.path} no longer matches its manifest pin; not serving it"
                )
        try:
            current = self.host.current_version(ref.name)
        except UnknownModelError:
            self.host.load(ref.name, ref.version, model_path, manifest)
            return
        if current != ref.version:
            self.host.swap(ref.name, ref.version, model_path, manifest)
            self.host.commit(ref.name)

    # -- the update cycle ------------------------------------------------------

    def retry_delay(self) -> float | None:
        """Seconds until the next check should come after the last cycle, if sooner than a poll.

        ``None`` after a cycle that did not fail for a passing reason: the poll
        (or the server's notify) decides. Otherwise an exponential backoff, so
        a fleet that lost its server does not hammer it when it comes back,
        yet a device that lost one transfer is not left waiting a whole poll
        interval (ten minutes in the field) to try again.
        """
        if self._transient_failures == 0:
            return None
        # The exponent is capped: past it the delay is RETRY_MAX_SECONDS anyway, and a
        # device offline for days must not overflow a float (2.0 ** 1024).
        doublings = min(self._transient_failures - 1, 32)
        return min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2.0 ** doublings)

    def run_cycle(self) -> CycleOutcome:
        """One verified check; install and swap what changed. Never raises for bad updates."""
        outcome = self._cycle()
        self._transient_failures = self._transient_failures + 1 if outcome.transient else 0
        return outcome

    def _cycle(self) -> CycleOutcome:
        states: dict[str, str] = {}
        reasons: dict[str, str] = {}
        try:
            self.floor.require_trusted()
        except ClockUntrustedError:
            self._report("*", "clock_untrusted", Reason.CLOCK_UNTRUSTED)
            return CycleOutcome({"*": "clock_untrusted"}, {"*": str(Reason.CLOCK_UNTRUSTED)})
        try:
            decisions = self.updates.check(release_floor=self.release_floor())
        except (UptaneRefusal, tuf_exceptions.RepositoryError) as e:
            # Refused by Uptane or bad metadata (expired, replayed, badly signed):
            # nothing changes.
            reason = reason_for(e)
            logger.warning("update refused (%s): %s", reason, e)
            self._report("*", "failed", reason)
            return CycleOutcome({"*": "failed"}, {"*": str(reason)})
        except tuf_exceptions.DownloadError as e:
            logger.warning("repository unreachable: %s", e)
            return CycleOutcome({"*": "unreachable"}, {"*": str(reason_for(e))},
                                transient=True)
        self._end_superseded({d.image.name: d for d in decisions})
        transient = False
        for decision in decisions:
            name = decision.image.name
            journal = self.journal(name)
            record = journal.current
            resuming = record.state in RESUMABLE_STATES
            if not resuming:
                try:
                    if self.host.current_version(name) == decision.image.version:
                        states[name] = "current"
                        continue
                except UnknownModelError:
                    pass
                if decision.sha256 in self._refused():
                    states[name] = "refused"  # failed here before: wait for another assignment
                    continue
                if record.state is not State.IDLE:
                    states[name] = str(record.state)  # probation or an unreported outcome
                    self._deferred.add(name)
                    continue
            self._deferred.discard(name)
            states[name], failure = self._update(journal, decision)
            if failure:
                reasons[name] = failure
                transient = transient or failure in TRANSIENT_REASONS
        self.floor.advance()
        return CycleOutcome(states, reasons, transient)

    def _end_superseded(self, assigned: dict[str, InstallDecision]) -> None:
        """Close updates a restart interrupted whose target the director no longer assigns.

        Their files are removed; the next cycle (this one, for a model with a
        new target) starts the assigned update afresh.
        """
        for name, journal in list(self._journals.items()):
            record = journal.current
            target = record.target
            if record.state not in RESUMABLE_STATES or target is None:
                continue
            decision = assigned.get(name)
            if decision is not None and decision.sha256 == target.sha256:
                continue
            journal.transition(Event.FAILURE, reason=Reason.SUPERSEDED)
            self.updates.discard(target.target_path, target.sha256)
            self._finish(journal, name)

    def _step(self, name: str, state: State) -> None:
        """The journal saved ``state``; its work (:data:`STEPS`) starts after this."""
        hook = self.on_step
        if hook is not None:
            hook(name, state)

    def _update(self, journal: Journal, decision: InstallDecision) -> tuple[str, str | None]:
        """Run ``decision``'s update from the step its journal names up to probation.

        Each step's state is saved before its work (``begin`` saves
        ``downloading``; each step's event saves the next). A step that fails
        ends the attempt as ``failed(reason)`` -- the live model never changed
        -- and is reported; a model the gate refused is not retried while the
        director keeps assigning it.
        """
        name = decision.image.name
        if journal.current.state is State.IDLE:
            journal.begin(ModelRef.from_decision(decision))
            self._report(name, State.DOWNLOADING, None, decision.image.version)
        try:
            bundle_path = None
            if journal.current.state is State.DOWNLOADING:
                self._step(name, State.DOWNLOADING)
                bundle_path = self.updates.download(decision)
                journal.transition(Event.DOWNLOAD_DONE)
            self._step(name, State.VERIFYING)
            opened = self.updates.open(decision, bundle_path)
            journal.transition(Event.VERIFIED,
                               target=ModelRef.from_decision(decision, opened.folder))
            self._step(name, State.VALIDATING)
            installed = self.updates.validate(decision, opened,
                                              session_settings=self.settings.session)
            journal.transition(Event.VALID)
        except StateLoopError:
            return self._finish(journal, name)  # saved as failed(state_loop) already
        except ValidationError as e:
            journal.transition(Event.FAILURE, reason=reason_for(e))
            self._refuse(decision.sha256, str(e.reason))
            self.updates.forget_download(decision)
            return self._finish(journal, name)
        except Exception as e:  # every failure of a step ends the attempt, reported
            reason = reason_for(e)
            if reason is Reason.INTERNAL_ERROR:
                logger.exception("update of %s failed unexpectedly", decision.target_path)
            else:
                logger.warning("update of %s failed (%s): %s", decision.target_path, reason, e)
            journal.transition(Event.FAILURE, reason=reason)
            return self._finish(journal, name)

        self._step(name, State.SWAPPING)
        # The outgoing version's last figures: the server's rollout gates compare
        # this device on the new release with itself on this one.
        if name in self.host.models():
            self.publish_telemetry()
        manifest = installed.bundle.manifest
        try:
            # The very session the gate validated goes live: no second load of the model.
            try:
                self.host.swap(name, decision.image.version, installed.model_path, manifest,
                               session=installed.session)
            except UnknownModelError:
                self.host.load(name, decision.image.version, installed.model_path, manifest,
                               session=installed.session)
        except EdgeotaError as e:  # the serving session was not replaced
            logger.warning("swap of %s failed: %s", decision.target_path, e)
            journal.transition(Event.FAILURE, reason=Reason.SWAP_FAILED)
            return self._finish(journal, name)
        journal.transition(Event.SWAPPED)
        self._step(name, State.PROBATION)
        self.updates.forget_download(decision)
        self._probation_started[name] = self._clock()
        self._report(name, State.PROBATION, None, decision.image.version)
        return str(State.PROBATION), None

    def _finish(self, journal: Journal, name: str) -> tuple[str, str | None]:
        """Report the outcome on disk, then go idle (a crash in between re-sends it)."""
        record = journal.current
        self._report(name, record.state, record.reason,
                     record.target.version if record.target else None)
        journal.transition(Event.REPORTED)
        return str(record.state), record.reason

    def check_probation(self, *, force: bool = False) -> dict[str, str]:
        """Commit or revert models whose probation window is over (or ``force``)."""
        results: dict[str, str] = {}
        for name, started in list(self._probation_started.items()):
            journal = self.journal(name)
            version = self.host.current_version(name)
            metrics = self.host.metrics(name, version)
            window_over = self._clock() - started >= timedelta(
                seconds=self.settings.probation_seconds)
            enough = metrics.inferences >= self.settings.probation_min_inferences
            reason = self._regression(name, version)
            if reason is None and not (force or (window_over and enough)):
                continue
            if reason is not None:
                try:
                    self.host.revert(name)
                except NoPreviousModelError:
                    # The device's first model (or one swapped in by unload-then-load):
                    # nothing to go back to, and serving it beats serving nothing. It is
                    # still a failed probation: reported, and not retried. The journal
                    # keeps no known-good model, so a restart serves none until the
                    # director assigns another release.
                    logger.warning("%s %s failed probation (%s) with nothing to revert to; "
                                   "it keeps serving", name, version, reason)
                record = journal.transition(Event.PROBATION_FAILED, reason=reason)
                if record.target is not None:
                    self._refuse(record.target.sha256, reason)
            else:
                self.host.commit(name)
                record = journal.transition(Event.PROBATION_PASSED)
                if record.target is not None:
                    self._raise_release_floor(record.target.release_counter)
            del self._probation_started[name]
            results[name] = self._finish(journal, name)[0]
            if name in self._deferred:
                self._deferred.discard(name)
                self.wake.set()
        return results

    def _regression(self, name: str, version: str) -> Reason | None:
        metrics = self.host.metrics(name, version)
        if metrics.non_finite:
            return Reason.NAN_OUTPUT
        # Runs, not successes: a model that fails every request has no successes.
        if metrics.inferences + metrics.errors and \
                metrics.error_rate > self.settings.max_error_rate:
            return Reason.ERROR_RATE
        previous = self.host.previous_version(name)
        if previous is None or metrics.latency_p95_ms is None:
            return None
        baseline = self.host.metrics(name, previous).latency_p95_ms
        if baseline is not None and not math.isnan(baseline):
            baseline = max(baseline, self.settings.latency_floor_ms)
        if baseline and not math.isnan(baseline) and \
                metrics.latency_p95_ms > baseline * self.settings.max_latency_factor and \
                metrics.inferences >= self.settings.probation_min_inferences:
            return Reason.LATENCY_REGRESSION
        return None

    def _refused(self) -> dict[str, str]:
        """Targets this device rejected (sha256 -> reason): not retried while still assigned."""
        try:
            data = json.loads(self._refused_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            logger.warning("ignoring unreadable %s", self._refused_file)
            return {}
        return data if isinstance(data, dict) else {}

    def _count_crash(self, sha256: str) -> int:
        path = self.config.state_dir / "crash-counts.json"
        try:
            counts = json.loads(path.read_text())
        except (OSError, ValueError):
            counts = {}
        counts = counts if isinstance(counts, dict) else {}
        count = int(counts.get(sha256, 0)) + 1
        counts[sha256] = count
        atomic_write(path, json.dumps(dict(list(counts.items())[-64:])).encode())
        return count

    def _refuse(self, sha256: str, reason: str) -> None:
        refused = self._refused()
        refused[sha256] = reason
        # Bounded: only the most recent refusals matter for what the director assigns.
        kept = dict(list(refused.items())[-64:])
        atomic_write(self._refused_file, json.dumps(kept, indent=1).encode())

    # -- reports -----------------------------------------------------------------

    def next_report_seq(self) -> int:
        """A report sequence number never used before by this device, restarts included.

        Numbers are reserved on disk a block at a time (the file holds the
        highest one reserved, written before any of the block is used) and
        handed out from memory: one durable write per :data:`SEQ_BLOCK`
        reports instead of one per report, three times in every update. A
        restart skips what was left of its block; the server only needs the
        numbers to grow.
        """
        if self._seq_next > self._seq_reserved:
            try:
                last = int(self._seq_file.read_text().strip() or 0)
            except FileNotFoundError:
                last = 0
            start = max(last, self._seq_reserved) + 1
            reserved = start + SEQ_BLOCK - 1
            atomic_write(self._seq_file, f"{reserved}\n".encode())
            self._seq_next, self._seq_reserved = start, reserved
        seq = self._seq_next
        self._seq_next += 1
        return seq

    def _report(self, name: str, state: object, error: str | None,
                version: str | None = None) -> bool:
        """Send a signed status report; a failure to send is logged, never fatal."""
        with self._report_lock:
            report = StatusReport(
                device_id=self.config.device_id, seq=self.next_report_seq(), state=str(state),
                release=f"{name}@{version}" if version else None, error=error,
            )
            body = SignedReport.sign(report, self.identity).to_bytes()
        connection = self.session
        if connection is not None:
            # Over MQTT: retained on the device's own status topic (the ACL names the sender).
            if connection.publish(DeviceTopic.STATUS, body, retain=True):
                return True
            logger.warning("status report not published: not connected; trying HTTP")
        request = urllib.request.Request(  # noqa: S310 - the URL comes from agent.toml
            self.config.repository_url.removesuffix("/repo")
            + f"/api/v1/devices/{self.config.device_id}/reports",
            data=body, method="POST",
            headers={"Authorization": f"Bearer {self.config.token()}",
                     "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.settings.report_timeout):  # noqa: S310
                return True
        except OSError as e:
            logger.warning("status report not delivered: %s", e)
            return False

    def telemetry(self) -> Telemetry:
        """Metrics of every served model since it went live (what the server's gates read)."""
        models = {}
        for name in self.host.models():
            version = self.host.current_version(name)
            metrics = self.host.metrics(name, version)
            models[name] = ModelTelemetry(
                version=version, inferences=metrics.inferences, errors=metrics.errors,
                p50_ms=metrics.latency_p50_ms, p95_ms=metrics.latency_p95_ms,
                p99_ms=metrics.latency_p99_ms)
        return Telemetry(models)

    def publish_telemetry(self) -> bool:
        """Send telemetry on the device's own topic (MQTT only); False when not sent."""
        connection = self.session
        return connection is not None and connection.publish(
            DeviceTopic.TELEMETRY, self.telemetry().to_bytes())

    def served_model_dirs(self) -> list[Path]:
        return [self.host.model(n).model_path.parent for n in self.host.models()]


def run_forever(
    agent: Agent,
    stop: threading.Event,
    *,
    poll_seconds: float = 60.0,
    jitter: float = 0.2,
    rng: Callable[[], float] | None = None,
    telemetry_seconds: float = 60.0,
) -> None:
    """Cycle until ``stop`` is set: check, install, judge probation, wait a jittered poll.

    Jitter spreads a fleet's checks so a thousand devices booted together do
    not hit the server in the same second. Errors of one cycle are logged
    and the next cycle tries again; nothing here waits without a bound.
    """
    import random

    draw = rng or random.random
    while not stop.is_set():
        try:
            agent.run_cycle()
        except Exception:
            logger.exception("update cycle failed")
        interval = poll_seconds * (1 - jitter + 2 * jitter * draw())
        retry = agent.retry_delay()
        if retry is not None:
            interval = min(interval, retry * (1 - jitter + 2 * jitter * draw()))
        step = min(interval, max(agent.settings.probation_seconds / 4, 1.0))
        waited = 0.0
        since_telemetry = 0.0
        agent.wake.clear()
        while waited < interval and not stop.wait(step):
            if agent.wake.is_set():
                break  # the server said the director changed: check now
            waited += step
            since_telemetry += step
            # Whatever one of these raises is logged, never the end of the agent: the
            # models keep serving and the next step tries again.
            try:
                agent.check_probation()
            except Exception:
                logger.exception("probation check failed")
            if since_telemetry >= telemetry_seconds:
                since_telemetry = 0.0
                try:
                    agent.publish_telemetry()
                except Exception:
                    logger.exception("telemetry not sent")
