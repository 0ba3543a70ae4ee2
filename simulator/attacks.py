"""The attack suite: a malicious server and a man-in-the-middle on the broker against real agents.

Each :class:`Attack` plays one attacker of the TUF/Uptane threat list against
every device of an :class:`AttackLab` -- a running server, its MQTT transport
(broker and fetch bridge) and simulated devices that serve a committed
release -- and returns an :class:`AttackVerdict`: what each device's own
update cycle said (the outcome state and reason the agent reports) and
whether anything the device runs changed. Nothing on the device side is
faked: the devices are unmodified agents with their ngclient, MQTT fetcher
and journal; the attacker only does what it could do in the field.

The two attackers:

* **malicious server** (:data:`MALICIOUS_SERVER`): holds the server's storage
  and its *online* keys -- the director key, the image snapshot and timestamp
  keys -- but not the offline root and targets keys, nor the release managers'
  keys. It signs director metadata at will and rewrites stored files.
* **broker MITM** (:data:`BROKER_MITM`): sits on the broker (a compromised
  broker, or anyone between it and a device) and decides what arrives on a
  device's ``rx`` topic: it rewrites, replays, delays or inflates frames. It
  holds no key. It is implemented by interposing on the running fetch bridge
  (:class:`BrokerMitm`), so its frames travel through the real broker to the
  real :class:`~edgeota.agent.mqtt_fetcher.MqttFetcher`.

Some attacks need an update in flight (a man-in-the-middle can only tamper
with a download that happens): the honest server then assigns the lab's
``next`` release as a deployment would, and takes the assignment back when the
attack ends. Every attack restores the honest state when it ends -- director
assignments, stored files, the device clock -- so attacks are independent.
(Time the freeze attack lets pass passes for the honest server too: it re-signs
its timestamps for that moment, and they stay valid afterwards.)

The lab needs releases besides the one the fleet serves (:class:`LabReleases`):
an older one below the devices' release-counter floor, a newer one, and one
signed for other hardware. :meth:`AttackLab.session` publishes them through
the release managers' code path (honestly: the attacker never holds release
keys) when they are missing. While the suite runs the lab drives the devices'
update cycles itself; devices stepped by a
:class:`~edgeota.simulator.fleet.FleetRunner` are taken off it for the
duration (their ``step`` runs only the cycles the lab asks for, on the
runner's own thread).

The freeze attack moves the devices' clock forward (:func:`device_clock_ahead`),
the clock each agent's update client judges metadata expiry by: only the lab's
devices see the time pass.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from rich.table import Table
from sqlalchemy import select
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp

from edgeota.agent.journal import CorruptJournalError, JournalRecord, State, model_to_serve
from edgeota.agent.runner import CycleOutcome
from edgeota.agent.update_cycle import TransferLimits, UpdateClient
from edgeota.protocol.bundle import generate_content_key, seal_bundle
from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.fetch import MAX_PAYLOAD, ChunkFrame, ErrorCode, ErrorFrame, FetchRequest
from edgeota.protocol.identity import SERVER_IDENTITY
from edgeota.protocol.keywrap import (
    KemPrivateKey,
    KemPublicKey,
    unwrap_content_key,
    wrap_content_key,
)
from edgeota.protocol.targets_custom import DirectorTargetCustom
from edgeota.server.context import ServerContext, expiry_policy, load_key_signer
from edgeota.server.db.models import Device, Release, ReleaseStatus
from edgeota.server.mqtt_bridge import FetchBridge, FrameFilter
from edgeota.server.repo.image import next_version, sign
from edgeota.server.services.deployments import model_name_of
from edgeota.simulator.device import SimulatedDevice

__all__ = [
    "ATTACKS",
    "BROKER_MITM",
    "MALICIOUS_SERVER",
    "REFUSAL_STATES",
    "SIMULATION_LIMITS",
    "AnotherDevicesKey",
    "ArbitrarySoftware",
    "Attack",
    "AttackLab",
    "AttackVerdict",
    "BrokerMitm",
    "DeviceSnapshot",
    "DeviceVerdict",
    "EndlessData",
    "Freeze",
    "LabError",
    "LabReleases",
    "MixAndMatch",
    "PublishSpec",
    "ReleaseFacts",
    "ReplayedDirectorMetadata",
    "Rollback",
    "SlowRetrieval",
    "UnsignedModel",
    "WrongHardware",
    "default_attacks",
    "device_clock_ahead",
    "release_publisher",
    "run_suite",
    "verdict_table",
]

logger = logging.getLogger(__name__)

MALICIOUS_SERVER = "malicious server"
BROKER_MITM = "broker MITM"
# Outcome states of a cycle that refused what it was shown (the agent reported it).
REFUSAL_STATES = frozenset({"failed", "unreachable"})
# Short limits for simulated fleets: the slow-retrieval attack then takes seconds.
SIMULATION_LIMITS = TransferLimits(frame_timeout=3.0, min_rate=32 * 1024, grace=2.0,
                                   max_retries=2)
_ENDLESS = 2**40  # bytes an inflated file claims to have
_POLL = 0.05  # seconds between two looks at a condition being waited for


class LabError(EdgeotaError):
    """The lab cannot run the suite (missing release, busy device, wrong fleet state)."""


# -- releases ------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishSpec:
    """A release the release managers publish for the lab (their keys, their code path)."""

    name: str
    version: str
    sample: str  # a firmware sample model, e.g. digits_v2
    hardware: tuple[str, ...]
    release_counter: int


@dataclass(frozen=True)
class LabReleases:
    """The versions and samples of the releases the suite needs besides the served one.

    ``old`` is published with the served release's counter minus one (below
    the devices' floor), ``next`` with the same counter for the devices'
    hardware, ``foreign`` for ``foreign_hardware`` only.
    """

    old: str = "0.9.0-lab"
    next: str = "1.1.0-lab"
    foreign: str = "1.1.1-lab"
    foreign_hardware: str = "npu-lab"
    old_sample: str = "digits_v1"
    next_sample: str = "digits_v2"
    attacker_sample: str = "digits_bad"  # what the attacker would like devices to run


@dataclass(frozen=True)
class ReleaseFacts:
    """A published release as the server stores it."""

    name: str
    version: str
    target_path: str
    length: int
    sha256: str
    release_counter: int
    hardware: tuple[str, ...]
    wrapped_content_key: bytes  # to the server's key-wrap key

    @classmethod
    def of(cls, release: Release) -> ReleaseFacts:
        return cls(release.name, release.version, release.target_path, release.length,
                   release.sha256, release.release_counter,
                   tuple(release.manifest.get("hardware", ())), release.wrapped_content_key)

    @property
    def request_path(self) -> str:
        """The repository path a device fetches the bundle by (hash-prefixed)."""
        folder, _, name = self.target_path.rpartition("/")
        return f"image/targets/{folder}/{self.sha256}.{name}"


def release_publisher(operator: Any, client: Any) -> Callable[[PublishSpec], None]:
    """Publish lab releases as a release manager does (``edgeota release publish``)."""
    from edgeota.samples import load_catalog
    from edgeota.server.publisher import PublishRequest, publish_release

    def publish(spec: PublishSpec) -> None:
        sample = load_catalog()[spec.sample]
        answer = publish_release(operator, client, PublishRequest(
            model=sample.path, name=spec.name, version=spec.version, hardware=spec.hardware,
            vectors=sample.vectors_path, release_counter=spec.release_counter))
        if answer["status"] != ReleaseStatus.PUBLISHED:
            raise LabError(f"{spec.name} {spec.version} is {answer['status']}, not published "
                           "(more release signatures needed?)")

    return publish


# -- what a device runs --------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSnapshot:
    """What a device runs and has committed, read from its model host and state folder.

    ``journals`` holds per model the journal's state and its known-good model
    (what a restart would serve: :func:`~edgeota.agent.journal.model_to_serve`).
    ``refused`` is informational: a refusal may legitimately be remembered.
    """

    served: tuple[tuple[str, str], ...]  # (model, version)
    model_sha256: tuple[tuple[str, str], ...]  # (model, sha256 of the served model file)
    journals: tuple[tuple[str, str, str | None, str | None], ...]  # model, state, sha, version
    release_floor: int
    refused: tuple[str, ...] = ()

    @classmethod
    def of(cls, device: SimulatedDevice) -> DeviceSnapshot:
        agent = device.agent
        state_dir = agent.config.state_dir
        served, digests = [], []
        for name in sorted(agent.host.models()):
            model = agent.host.model(name)
            served.append((name, model.version))
            digests.append((name, _sha256(model.model_path)))
            del model  # holding it would keep its session alive
        journals: list[tuple[str, str, str | None, str | None]] = []
        for path in sorted(state_dir.glob("journal-*.json")):
            name = path.name.removeprefix("journal-").removesuffix(".json")
            try:
                record = JournalRecord.from_json(path.read_bytes())
            except (OSError, CorruptJournalError):
                journals.append((name, "unreadable", None, None))
                continue
            good = model_to_serve(record)
            journals.append((name, str(record.state), good.sha256 if good else None,
                             good.version if good else None))
        try:
            refused = json.loads((state_dir / "refused-targets.json").read_text())
        except (OSError, ValueError):
            refused = {}
        return cls(tuple(served), tuple(digests), tuple(journals), agent.release_floor(),
                   tuple(sorted(refused)) if isinstance(refused, dict) else ())

    def changes(self, later: DeviceSnapshot) -> list[str]:
        """What differs in ``later`` (empty: the device runs and has committed the same)."""
        found = []
        for what in ("served", "model_sha256", "journals", "release_floor"):
            if getattr(self, what) != getattr(later, what):
                found.append(f"{what}: {getattr(self, what)} -> {getattr(later, what)}")
        return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


# -- verdicts ------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceVerdict:
    """One device facing one attack.

    ``state`` and ``reason`` are what the agent's cycle returned (the outcome
    it also reports to the server); ``raised`` means the cycle ended with an
    exception (``reason`` names it) and ``stalled`` that it did not end in time.
    """

    device_id: str
    state: str
    reason: str | None
    refused: bool
    unchanged: bool
    changes: tuple[str, ...] = ()


@dataclass(frozen=True)
class AttackVerdict:
    """One attack against the whole lab: per-device verdicts and the proof nothing changed."""

    name: str
    attacker: str
    description: str
    expected_reason: str
    devices: tuple[DeviceVerdict, ...]
    unchanged: bool  # every device serves, and has committed, what it did before
    seconds: float
    error: str | None = None  # the attack could not be staged or undone

    @property
    def passed(self) -> bool:
        """Every device refused the attack and none changed what it runs."""
        return (self.error is None and bool(self.devices) and self.unchanged
                and all(d.refused for d in self.devices))

    @property
    def as_expected(self) -> bool:
        """Passed, and every device refused for the reason this attack must meet."""
        return self.passed and all(d.reason == self.expected_reason for d in self.devices)

    def summary(self) -> str:
        counts = Counter(f"{d.state}: {d.reason}" if d.reason else d.state
                         for d in self.devices)
        return ", ".join(f"{text} x{n}" if n > 1 else text for text, n in counts.items())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "attacker": self.attacker, "description": self.description,
            "expected_reason": self.expected_reason, "passed": self.passed,
            "as_expected": self.as_expected, "unchanged": self.unchanged,
            "seconds": round(self.seconds, 3), "error": self.error,
            "devices": [{"device": d.device_id, "state": d.state, "reason": d.reason,
                         "refused": d.refused, "unchanged": d.unchanged,
                         "changes": list(d.changes)} for d in self.devices],
        }


def verdict_table(verdicts: Sequence[AttackVerdict]) -> Table:
    """The suite's verdicts for a terminal (``edgeota sim run``)."""
    table = Table(title="attack suite")
    for column in ("attack", "attacker", "device verdicts", "unchanged", "result"):
        table.add_column(column)
    for verdict in verdicts:
        result = ("[green]refused[/]" if verdict.as_expected
                  else f"[yellow]refused, not by {verdict.expected_reason}[/]" if verdict.passed
                  else "[red]NOT REFUSED[/]")
        detail = verdict.summary() or "-"
        if verdict.error:
            detail += f" ({verdict.error})"
        table.add_row(verdict.name, verdict.attacker, detail,
                      "yes" if verdict.unchanged else "[red]no[/]", result)
    return table


# -- running the devices' cycles -------------------------------------------------------


class _Call:
    """One update cycle the lab asked for, run on some thread; waitable."""

    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device
        self.done = threading.Event()
        self.outcome: CycleOutcome | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # Looked up now: a restarted simulated device has a new agent.
            self.outcome = self.device.agent.run_cycle()
        except BaseException as e:  # noqa: BLE001 - reported as the device's verdict
            self.error = e
        finally:
            self.done.set()


class _Gate:
    """Takes a simulated device off its fleet runner while the lab drives it.

    The device's ``step`` is replaced (on the instance) by one that runs only
    the cycles the lab queued, on the runner's thread; the runner calls it
    only after any step it was in has returned, so once the gate has been
    entered the device is the lab's alone.
    """

    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device
        self.calls: queue.Queue[_Call] = queue.Queue()
        self.entered = threading.Event()

    def install(self) -> None:
        self.device.step = self._step  # type: ignore[method-assign]

    def remove(self) -> None:
        vars(self.device).pop("step", None)

    def _step(self) -> None:
        self.entered.set()
        with contextlib.suppress(queue.Empty):
            self.calls.get_nowait().run()


# -- the device clock ------------------------------------------------------------------

@contextlib.contextmanager
def device_clock_ahead(clients: Iterable[UpdateClient], delta: timedelta) -> Iterator[None]:
    """Move the clock these devices judge metadata expiry by forward by ``delta``.

    Through each agent's public :attr:`~edgeota.agent.update_cycle.UpdateClient.clock`
    (read whenever a check starts ngclient on a repository): a device whose
    clock moved on by ``delta`` sees exactly this. Each clock is put back on
    exit; a device restarted meanwhile has a new client with its own clock.
    """
    saved = [(client, client.clock) for client in clients]
    try:
        for client, clock in saved:
            client.clock = _moved(clock, delta)
        yield
    finally:
        for client, clock in saved:
            client.clock = clock


def _moved(clock: Callable[[], datetime] | None, delta: timedelta) -> Callable[[], datetime]:
    """``clock`` (``None``: the system clock, as ngclient's default) plus ``delta``."""
    base = clock or (lambda: datetime.now(UTC))
    return lambda: base() + delta


# -- the man-in-the-middle -------------------------------------------------------------


_Rule = Callable[[str, FetchRequest], None]  # (device id, request): answers one window


class BrokerMitm(FrameFilter):
    """Decides what devices receive for chosen repository paths; the rest passes honestly.

    A :class:`~edgeota.server.mqtt_bridge.FrameFilter` on the running
    :class:`~edgeota.server.mqtt_bridge.FetchBridge` (installed on entering,
    removed on exit): it answers the requests its rules name with its own
    frames, sent with the bridge's :meth:`~edgeota.server.mqtt_bridge.FetchBridge.send`,
    so they cross the real broker to the real device. Rules are set before entering.

    On exit the MITM stops its own frames and, while the lab still waits for a
    device's cycle (one the attack stalled), drops every request of the lab's
    devices until that cycle has ended: a stalled download must fail, not
    complete over the honest path after the attack.
    """

    def __init__(self, lab: AttackLab) -> None:
        self._lab = lab
        self._bridge = lab.bridge
        self._rules: dict[tuple[str | None, str], _Rule] = {}
        self._stop = threading.Event()
        self._silent = threading.Event()
        self._devices = frozenset(d.device_id for d in lab.devices)

    # -- rules ------------------------------------------------------------------

    def substitute(self, path: str, data: bytes, *, device_id: str | None = None) -> None:
        """Serve ``data`` in place of the file at ``path`` (replay, rewrite, mix)."""
        self._rules[(device_id, path)] = functools.partial(self._send_bytes, data=data)

    def inflate(self, path: str, *, device_id: str | None = None) -> None:
        """Answer ``path`` with a file that claims :data:`_ENDLESS` bytes and never ends."""
        self._rules[(device_id, path)] = self._send_endless

    def trickle(self, path: str, data: bytes, *, piece: int, interval: float,
                device_id: str | None = None) -> None:
        """Serve the honest ``data`` of ``path`` ``piece`` bytes every ``interval`` seconds."""
        self._rules[(device_id, path)] = functools.partial(
            self._send_bytes, data=data, piece=piece, interval=interval)

    # -- interposition ----------------------------------------------------------------

    def __enter__(self) -> BrokerMitm:
        self._bridge.add_filter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        try:
            if self._lab.cycles_pending():
                self._silent.set()
                self._lab.wait_for_cycles(self._lab.drain_timeout)
        finally:
            self._bridge.remove_filter(self)

    def on_request(self, device_id: str, request: FetchRequest) -> bool:
        """Answer (or drop) what a rule names; everything else the bridge serves honestly."""
        if self._silent.is_set() and device_id in self._devices:
            return True  # dropped: the device's fetch times out
        rule = self._rules.get((device_id, request.path)) or self._rules.get(
            (None, request.path))
        if rule is None or self._stop.is_set():
            return False
        rule(device_id, request)
        return True

    def _send(self, device_id: str, frame: ChunkFrame | ErrorFrame, path: str) -> bool:
        return bool(self._bridge.send(device_id, frame, path=path))

    def _send_bytes(self, device_id: str, request: FetchRequest, *, data: bytes,
                    piece: int = MAX_PAYLOAD, interval: float = 0.0) -> None:
        """One window of ``data`` as the bridge would send it (or slower)."""
        file_id, content_id = _file_id(request.path, data)
        offset = request.offset
        if offset > len(data):
            self._send(device_id, ErrorFrame(request.request_id, ErrorCode.BAD_RANGE,
                                             "offset beyond the file"), request.path)
            return
        for _ in range(request.window):
            if self._stop.is_set():
                return
            end = min(offset + piece, len(data))
            frame = ChunkFrame(request.request_id, file_id, offset, len(data),
                               data[offset:end], last=end == len(data), content_id=content_id)
            if not self._send(device_id, frame, request.path) or frame.last:
                return
            offset = end
            if interval and self._stop.wait(interval):
                return

    def _send_endless(self, device_id: str, request: FetchRequest) -> None:
        file_id, content_id = _file_id(request.path, b"")
        junk = b"\xa5" * MAX_PAYLOAD
        offset = request.offset
        for _ in range(request.window):
            if self._stop.is_set():
                return
            frame = ChunkFrame(request.request_id, file_id, offset, _ENDLESS, junk,
                               content_id=content_id)
            if not self._send(device_id, frame, request.path):
                return
            offset += len(junk)


def _file_id(path: str, data: bytes) -> tuple[bytes, bool]:
    """The identity an attacker claims: the signed content hash for targets (from the name)."""
    if path.startswith("image/targets/"):
        digest = path.rpartition("/")[2].partition(".")[0]
        with contextlib.suppress(ValueError):
            if len(digest) == 64:
                return bytes.fromhex(digest), True
    return hashlib.sha256(b"mitm\x00" + path.encode() + data).digest(), False


# -- the lab ---------------------------------------------------------------------------


class AttackLab:
    """A running server, its MQTT transport and devices that serve a committed release.

    ``publish`` publishes the lab's extra releases when they are missing (see
    :func:`release_publisher`); ``limits``, if given, replaces the devices'
    transfer limits while the suite runs; ``stepped_externally`` says a fleet
    runner steps the devices (the lab then takes them off it). Use
    :meth:`session` around attacks (``run_suite`` does).
    """

    def __init__(
        self,
        ctx: ServerContext,
        transport: Any,  # MqttTransport: its running ``bridge``
        devices: Sequence[SimulatedDevice],
        *,
        publish: Callable[[PublishSpec], None] | None = None,
        model: str = "digits",
        releases: LabReleases | None = None,
        limits: TransferLimits | None = None,
        stepped_externally: bool = False,
        cycle_timeout: float = 60.0,  # seconds a device's cycle may take under attack
        settle_timeout: float = 60.0,  # seconds to wait for the fleet to be idle
        drain_timeout: float = 60.0,  # seconds for cycles an attack stalled to end
    ) -> None:
        if not devices:
            raise LabError("the lab needs at least one device")
        self.ctx = ctx
        self.transport = transport
        self.devices = list(devices)
        self.publish = publish
        self.model = model
        self.releases = releases or LabReleases()
        self.limits = limits
        self.stepped_externally = stepped_externally
        self.cycle_timeout = cycle_timeout
        self.settle_timeout = settle_timeout
        self.drain_timeout = drain_timeout
        self.current: ReleaseFacts | None = None
        self.old: ReleaseFacts | None = None
        self.next: ReleaseFacts | None = None
        self.foreign: ReleaseFacts | None = None
        self.workdir: Path | None = None
        self._gates: dict[str, _Gate] = {}
        self._pending: list[_Call] = []
        self._attacker_bundle: tuple[Path, bytes] | None = None

    @classmethod
    def from_simulation(cls, sim: Any) -> AttackLab:
        """The lab of a running :class:`~edgeota.simulator.run.Simulation` (its fleet runner on)."""
        return cls(sim.server.ctx, sim.transport, sim.devices,
                   publish=release_publisher(sim.operator, sim.client),
                   limits=SIMULATION_LIMITS, stepped_externally=True)

    @property
    def bridge(self) -> FetchBridge:
        bridge: FetchBridge | None = self.transport.bridge
        if bridge is None:
            raise LabError("the MQTT transport is not running")
        return bridge

    # -- session ------------------------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[AttackLab]:
        """Publish what is missing, take the devices, tighten limits; undo it all on exit."""
        self.workdir = Path(tempfile.mkdtemp(prefix="edgeota-attacks-"))
        saved_limits: dict[str, TransferLimits] = {}
        try:
            self._wait_settled()
            self._prepare_releases()
            if self.stepped_externally:
                self._take_devices()
            problem = self._settled_problem()
            if problem:
                raise LabError(f"the fleet is not ready for the attack suite: {problem}")
            if self.limits is not None:
                for device in self.devices:
                    saved_limits[device.device_id] = device.agent.updates.limits
                    device.agent.updates.limits = self.limits
            yield self
        finally:
            for device in self.devices:
                if device.device_id in saved_limits:
                    device.agent.updates.limits = saved_limits[device.device_id]
            for gate in self._gates.values():
                gate.remove()
            self._gates.clear()
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _settled_problem(self) -> str | None:
        versions = set()
        for device in self.devices:
            agent = device.agent
            served = device.serving().get(self.model)
            record = agent.journal(self.model).current
            good = model_to_serve(record)
            if served is None:
                return f"{device.device_id} serves no {self.model}"
            if record.state is not State.IDLE or good is None or good.version != served:
                return (f"{device.device_id} has not committed {self.model} {served} "
                        f"(journal {record.state})")
            versions.add(served)
        if len(versions) != 1:
            return f"the devices serve different versions: {sorted(versions)}"
        return None

    def _wait_settled(self) -> None:
        deadline = time.monotonic() + self.settle_timeout
        while (problem := self._settled_problem()) is not None:
            if time.monotonic() > deadline:
                raise LabError(f"the fleet did not settle in {self.settle_timeout:g}s: {problem}")
            time.sleep(_POLL)  # the fleet runner finishes probation meanwhile

    def _take_devices(self) -> None:
        for device in self.devices:
            gate = _Gate(device)
            gate.install()
            self._gates[device.device_id] = gate
        deadline = time.monotonic() + self.settle_timeout
        for gate in self._gates.values():
            if not gate.entered.wait(max(0.0, deadline - time.monotonic())):
                raise LabError(f"{gate.device.device_id} was not stepped within "
                               f"{self.settle_timeout:g}s: is the fleet runner running?")

    def _prepare_releases(self) -> None:
        device = self.devices[0]
        served = device.serving()[self.model]
        self.current = self._release(served)
        if self.current is None:
            raise LabError(f"no published release {self.model} {served}")
        floor = min(d.agent.release_floor() for d in self.devices)
        if self.current.release_counter < 1 or floor < self.current.release_counter:
            raise LabError(
                f"{self.model} {served} has release counter {self.current.release_counter} "
                f"and the devices' floor is {floor}: the rollback attack needs a committed "
                "release with a counter of at least 1")
        hardware = tuple(sorted({d.agent.config.hardware for d in self.devices}))
        spec = self.releases
        if spec.foreign_hardware in hardware:
            raise LabError(f"a lab device has the foreign hardware {spec.foreign_hardware}")
        counter = self.current.release_counter
        wanted = {
            "old": PublishSpec(self.model, spec.old, spec.old_sample, hardware, counter - 1),
            "next": PublishSpec(self.model, spec.next, spec.next_sample, hardware, counter),
            "foreign": PublishSpec(self.model, spec.foreign, spec.next_sample,
                                   (spec.foreign_hardware,), counter),
        }
        for role, want in wanted.items():
            facts = self._release(want.version)
            if facts is None:
                if self.publish is None:
                    raise LabError(f"{want.name} {want.version} is missing and the lab "
                                   "has no publisher")
                logger.info("publishing %s %s for the attack lab", want.name, want.version)
                self.publish(want)
                facts = self._release(want.version)
                if facts is None:
                    raise LabError(f"{want.name} {want.version} was not published")
            if (facts.release_counter, tuple(sorted(facts.hardware))) != (
                    want.release_counter, tuple(sorted(want.hardware))):
                raise LabError(f"{want.name} {want.version} exists with counter "
                               f"{facts.release_counter} for {facts.hardware}: not usable as "
                               f"the lab's {role} release")
            setattr(self, role, facts)

    def _release(self, version: str) -> ReleaseFacts | None:
        with self.ctx.sessions() as session:
            release = session.scalars(select(Release).where(
                Release.name == self.model, Release.version == version,
                Release.status == ReleaseStatus.PUBLISHED)).first()
            return ReleaseFacts.of(release) if release is not None else None

    def release(self, role: str) -> ReleaseFacts:
        """The lab's ``current``, ``old``, ``next`` or ``foreign`` release (in a session)."""
        facts: ReleaseFacts | None = getattr(self, role)  # one of the four attributes above
        if facts is None:
            raise LabError("the lab's releases are known only inside session()")
        return facts

    # -- devices ------------------------------------------------------------------

    def snapshots(self) -> dict[str, DeviceSnapshot]:
        return {d.device_id: DeviceSnapshot.of(d) for d in self.devices}

    def run_cycles(self, timeout: float) -> dict[str, _Call]:
        """One update cycle on every device at once; wait at most ``timeout`` seconds."""
        if self._pending:
            raise LabError("cycles of an earlier attack are still running")
        calls = {d.device_id: _Call(d) for d in self.devices}
        for device in self.devices:
            call = calls[device.device_id]
            gate = self._gates.get(device.device_id)
            if gate is not None:
                gate.calls.put(call)
            else:
                threading.Thread(target=call.run, name=f"attack-{device.device_id}",
                                 daemon=True).start()
        deadline = time.monotonic() + timeout
        for call in calls.values():
            call.done.wait(max(0.0, deadline - time.monotonic()))
        self._pending = [c for c in calls.values() if not c.done.is_set()]
        return calls

    def cycles_pending(self) -> bool:
        self._pending = [c for c in self._pending if not c.done.is_set()]
        return bool(self._pending)

    def wait_for_cycles(self, timeout: float) -> bool:
        """Wait for cycles still running (an attack stalled them); False if some still run."""
        deadline = time.monotonic() + timeout
        for call in self._pending:
            call.done.wait(max(0.0, deadline - time.monotonic()))
        return not self.cycles_pending()

    def device_row(self, device_id: str) -> tuple[str, KemPublicKey]:
        """A device's hardware and key-wrap public key, as the server knows them."""
        with self.ctx.sessions() as session:
            device = session.get(Device, device_id)
            if device is None:
                raise LabError(f"device {device_id} is not enrolled")
            return device.hardware, KemPublicKey.from_dict(device.identity["kem"])

    # -- what the server's online keys and storage can do ---------------------------

    def content_key(self, release: ReleaseFacts) -> bytes:
        """A release's content key, unwrapped with the server's key-wrap key."""
        return unwrap_content_key(release.wrapped_content_key, self.ctx.keywrap_key,
                                  SERVER_IDENTITY)

    def director_target(self, device_id: str, path: str, length: int, sha256: str,
                        release_counter: int, content_key: bytes, *,
                        wrap_for: tuple[str, KemPublicKey] | None = None) -> TargetFile:
        """A director target for ``device_id`` with the key wrapped to ``wrap_for``
        (default: the device itself), as ``assign_release`` builds it."""
        hardware, kem = self.device_row(device_id)
        recipient, recipient_key = wrap_for or (device_id, kem)
        custom = DirectorTargetCustom(device_id=device_id, hardware_id=hardware,
                                      release_counter=release_counter,
                                      wrapped_key=wrap_content_key(content_key, recipient_key,
                                                                   recipient))
        return TargetFile(length=length, hashes={"sha256": sha256}, path=path,
                          unrecognized_fields={"custom": custom.to_custom()})

    def sign_director_target(self, device_id: str, target: TargetFile) -> None:
        """Make ``target`` the device's director target for its model (the online key signs)."""
        model = model_name_of(target.path)
        current = self.ctx.director.current_targets(device_id).signed.targets
        targets = {p: t for p, t in current.items() if model_name_of(p) != model}
        targets[target.path] = target
        self.ctx.director.assign(device_id, targets)

    def sign_director_targets_unchecked(self, device_id: str,
                                        targets: Mapping[str, TargetFile]) -> None:
        """Make ``targets`` the device's director targets, signed with the online key, unchecked.

        What a compromised server can sign: the director code would refuse
        these (a custom naming another device, say), so the lab writes the
        device's next targets, snapshot and timestamp itself, through the
        store, with the director's online key and expiry periods.
        """
        repo = f"director/{device_id}"
        store = self.ctx.store
        signer = load_key_signer(self.ctx.config.director_key)
        expiry = expiry_policy(self.ctx.config.expiry)
        now = self.ctx.clock()
        with store.lock(repo):
            versions = store.latest_versions(repo)
            current = Metadata[Targets].from_bytes(
                store.read_metadata(repo, "targets", versions["targets"]))
            forged = next_version(current, expires=now + expiry.director_targets)
            forged.signed.targets = dict(targets)
            snapshot = Metadata(Snapshot(
                version=versions["snapshot"] + 1, expires=now + expiry.director_snapshot,
                meta={"targets.json": MetaFile(forged.signed.version)}))
            sign(forged, signer)
            sign(snapshot, signer)
            snapshot_bytes = snapshot.to_bytes()
            timestamp = Metadata(Timestamp(
                version=versions["timestamp"] + 1, expires=now + expiry.director_timestamp,
                snapshot_meta=MetaFile.from_data(snapshot.signed.version, snapshot_bytes,
                                                 ["sha256"])))
            sign(timestamp, signer)
            store.write_metadata_set(repo, [
                ("targets", forged.signed.version, forged.to_bytes()),
                ("snapshot", snapshot.signed.version, snapshot_bytes),
                ("timestamp", timestamp.signed.version, timestamp.to_bytes()),
            ])

    def assign(self, device_id: str, release: ReleaseFacts, *,
               wrap_for: tuple[str, KemPublicKey] | None = None) -> None:
        """Assign a published release to a device, as the director does."""
        self.sign_director_target(device_id, self.director_target(
            device_id, release.target_path, release.length, release.sha256,
            release.release_counter, self.content_key(release), wrap_for=wrap_for))

    @contextlib.contextmanager
    def assigned_everywhere(self, release: ReleaseFacts) -> Iterator[None]:
        """Every device assigned ``release`` with the director key (the malicious server's
        move); their own director targets back on exit."""
        with self.honest_director():
            for device in self.devices:
                self.assign(device.device_id, release)
            yield

    @contextlib.contextmanager
    def honest_director(self) -> Iterator[None]:
        """On exit, give every device back the director targets it had on entry."""
        saved = {d.device_id: dict(self.ctx.director.current_targets(d.device_id).signed.targets)
                 for d in self.devices}
        try:
            yield
        finally:
            for device_id, targets in saved.items():
                self.ctx.director.assign(device_id, targets)

    def stored_target(self, release: ReleaseFacts) -> Path:
        """The file the store serves for a release's bundle."""
        return self.ctx.store.target_file_for_request(
            release.request_path.removeprefix("image/targets/"))

    def attacker_bundle(self) -> tuple[Path, bytes]:
        """The attacker's own sealed bundle (its model, its content key), built once."""
        if self._attacker_bundle is None:
            from edgeota.samples import load_catalog
            from edgeota.server.manifest_builder import build_manifest

            if self.workdir is None:
                raise LabError("the attacker's bundle is built inside session()")
            sample = load_catalog()[self.releases.attacker_sample]
            hardware = tuple(sorted({d.agent.config.hardware for d in self.devices}))
            manifest = build_manifest(sample.path, name=self.model, version="6.6.6",
                                      hardware=hardware)
            key = generate_content_key()
            info = seal_bundle(manifest, {"model.onnx": sample.path},
                               self.workdir / "attacker.eotb", key)
            self._attacker_bundle = (info.path, key)
        return self._attacker_bundle

    def mitm(self) -> BrokerMitm:
        return BrokerMitm(self)


def _overwrite(path: Path, data: bytes) -> None:
    """Rewrite a stored file in place (the attacker owns the storage)."""
    with path.open("r+b") as f:
        f.write(data)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())


# -- attacks ---------------------------------------------------------------------------


class Attack:
    """One attack: ``staged(lab)`` sets it up and undoes it; ``run(lab)`` judges the devices."""

    name: ClassVar[str]
    attacker: ClassVar[str]
    description: ClassVar[str]
    expected_reason: ClassVar[str]  # the reason every device must refuse with

    def staged(self, lab: AttackLab) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def cycle_timeout(self, lab: AttackLab) -> float:
        return lab.cycle_timeout

    def run(self, lab: AttackLab) -> AttackVerdict:
        started = time.monotonic()
        before = lab.snapshots()
        calls: dict[str, _Call] = {}
        error: str | None = None
        try:
            with self.staged(lab):
                calls = lab.run_cycles(self.cycle_timeout(lab))
        except Exception as e:
            logger.exception("attack %s could not be staged or undone", self.name)
            error = f"{type(e).__name__}: {e}"
        if not lab.wait_for_cycles(lab.drain_timeout):
            error = error or f"a device's cycle still runs {lab.drain_timeout:g}s after the attack"
        after = lab.snapshots()
        verdicts = []
        for device in lab.devices:
            device_id = device.device_id
            state, reason = _cycle_verdict(calls.get(device_id), lab.model)
            changes = tuple(before[device_id].changes(after[device_id]))
            verdicts.append(DeviceVerdict(device_id, state, reason,
                                          refused=state in REFUSAL_STATES,
                                          unchanged=not changes, changes=changes))
        return AttackVerdict(
            name=self.name, attacker=self.attacker, description=self.description,
            expected_reason=self.expected_reason, devices=tuple(verdicts),
            unchanged=all(v.unchanged for v in verdicts),
            seconds=time.monotonic() - started, error=error)


def _cycle_verdict(call: _Call | None, model: str) -> tuple[str, str | None]:
    if call is None:
        return "not_run", None
    if not call.done.is_set():
        return "stalled", None
    if call.error is not None:
        return "raised", type(call.error).__name__
    assert call.outcome is not None
    states, reasons = call.outcome.states, call.outcome.reasons
    key = model if model in states else "*" if "*" in states else None
    if key is None:
        return "no_update", None  # the device did not even see the attack
    return states[key], reasons.get(key)


class ArbitrarySoftware(Attack):
    name = "arbitrary software"
    attacker = MALICIOUS_SERVER
    description = ("replaces the stored bundle of a signed release with its own bytes of the "
                   "same length and assigns that release with the director key")
    expected_reason = "bundle_mismatch"

    @contextlib.contextmanager
    def staged(self, lab: AttackLab) -> Iterator[None]:
        target = lab.release("next")
        stored = lab.stored_target(target)
        original = stored.read_bytes()
        forged = lab.attacker_bundle()[0].read_bytes()
        forged = (forged * (len(original) // len(forged) + 1))[:len(original)]
        with lab.honest_director():
            _overwrite(stored, forged)
            try:
                for device in lab.devices:
                    lab.assign(device.device_id, target)
                yield
            finally:
                _overwrite(stored, original)


class Rollback(Attack):
    name = "rollback"
    attacker = MALICIOUS_SERVER
    description = ("assigns, with the director key, an older signed release whose release "
                   "counter is below the devices' floor")
    expected_reason = "below_floor"

    @contextlib.contextmanager
    def staged(self, lab: AttackLab) -> Iterator[None]:
        with lab.assigned_everywhere(lab.release("old")):
            yield


class Freeze(Attack):
    name = "freeze"
    attacker = BROKER_MITM
    description = ("keeps serving the timestamps it recorded while the devices' clocks move "
                   "past their expiry (the honest server re-signs meanwhile)")
    expected_reason = "expired_metadata"

    @contextlib.contextmanager
    def staged(self, lab: AttackLab) -> Iterator[None]:
        store = lab.ctx.store
        frozen = {"image/metadata/timestamp.json": store.read_metadata("image", "timestamp")}
        for device in lab.devices:
            frozen[f"director/{device.device_id}/metadata/timestamp.json"] = \
                store.read_metadata(f"director/{device.device_id}", "timestamp")
        expiry = lab.ctx.config.expiry
        ahead = timedelta(days=2 * max(expiry.timestamp_days, expiry.director_timestamp_days))
        # Time passes for everyone: the honest server keeps its metadata fresh.
        later = lab.ctx.clock() + ahead
        lab.ctx.image.refresh(now=later)
        lab.ctx.director.refresh_all(now=later)
        with lab.mitm() as mitm:
            for path, data in frozen.items():
                mitm.substitute(path, data)
            with device_clock_ahead([d.agent.updates for d in lab.devices], ahead):
                yield


class MixAndMatch(Attack):
    name = "mix-and-match"
    attacker = BROKER_MITM
    description = ("while the server assigns a new release, serves the new director timestamp "
                   "and snapshot with the director targets of the previous snapshot")
    expected_reason = "metadata_rollback"

    @contextlib.contextmanager
    def staged(self, lab: AttackLab) -> Iterator[None]:
        store = lab.ctx.store
        with lab.assigned_everywhere(lab.release("next")), lab.mitm() as mitm:
            for device in lab.devices:
                repo = f"director/{device.device_id}"
                new = store.latest_version(repo, "targets")
                if new is None or new < 2:
                    raise LabError(f"{repo} has no earlier targets to mix in")
                mitm.substitute(f"{repo}/metadata/{new}.targets.json",
                                store.read_metadata(repo, "targets", new - 1),
                                device_id=device.device_id)
            yield


class EndlessData(Attack):
    name = "endless data"
    attacker = BROKER_MITM
    description = ("while the server assigns a new release, answers the bundle download with "
                   f"a file that claims {_ENDLESS} bytes and never ends")
    expected_reason = "bundle_too_large"

    @contextlib.contextmanager
    def staged(self, lab: AttackLab) -> Iterator[None]:
        target = lab.release("next")
        with lab.assigned_everywhere(target), lab.mitm() as mitm:
            mitm.inflate(target.request_path)
            yield


class SlowRetrieval(Attack):
    name = "slow retrieval"
    attacker = BROKER_MITM
    description = ("while the server assigns a new release, delivers the honest bundle a few "
                   "bytes at a time, never slow enough to trip the per-frame timeout")
    expected_reason = "bundle_too_slow"

    @staticmethod
    def _limits(lab: AttackLab) -> TransferLimits:
        return max((d.agent.updates.limits for d in lab.devices),
                   key=lambda limits: limits.grace + limits.frame_timeout)

    def cycle_timeout(self, lab: AttackLab) -> float:
        limits = self._limits(lab)
        # The trickle runs at an eighth of the floor: the guard fires within
        # grace / (1 - 1/8) plus one frame interval; everything else is slack.
        return max(lab.cycle_timeout, 2 * (limits.grace + limits.frame_timeout) + 10)

    @contextlib.contextmanager
    def staged(self, lab: AttackLab) -> Iterator[None]:
        target = lab.release("next")
        data = lab.stored_target(target).read_bytes()
        limits = min((d.agent.updates.limits for d in lab.devices), key=lambda x: x.min_rate)
        interval = limits.frame_timeout / 4  # a frame well within every timeout
        piece = max(1, int(limits.min_rate * interval / 8))
        with lab.assigned_everywhere(target), lab.mitm() as mitm:
            mitm.trickle(target.request_path, data, piece=piece, interval=interval)
            yield


class WrongHardware(Attack):
    name = "wrong hardware"
    attacker = MALICIOUS_SERVER
    description = ("assigns, with the director key, a release signed for other hardware, its "
                   "director target claiming the device's own hardware")
    expected_reason = "hardware_not_in_release"

    @contextlib.contextmanager
    def staged(self, lab: AttackLab) -> Iterator[None]:
        with lab.assigned_everywhere(lab.release("foreign")):
            yield


class ReplayedDirectorMetadata(Attack):
    name = "replayed director metadata"
    attacker = BROKER_MITM
    description = ("replays each device's director metadata recorded at enrolment (timestamp "
                   "version 1, which assigned nothing)")
    expected_reason = "metadata_rollback"

    @contextlib.contextmanager
    def staged(self, lab: AttackLab) -> Iterator[None]:
        with lab.mitm() as mitm:
            for device in lab.devices:
                repo = f"director/{device.device_id}"
                mitm.substitute(f"{repo}/metadata/timestamp.json",
                                lab.ctx.store.read_metadata(repo, "timestamp", 1),
                                device_id=device.device_id)
            yield


class AnotherDevicesKey(Attack):
    name = "another device's key"
    attacker = MALICIOUS_SERVER
    description = ("assigns a signed release with its content key wrapped for another device "
                   "(the next one in the lab, or a stranger to a lone device)")
    expected_reason = "key_unwrap_failed"

    @contextlib.contextmanager
    def staged(self, lab: AttackLab) -> Iterator[None]:
        target = lab.release("next")
        ids = [d.device_id for d in lab.devices]
        with lab.honest_director():
            for index, device_id in enumerate(ids):
                if len(ids) > 1:
                    other = ids[(index + 1) % len(ids)]
                    wrap_for = (other, lab.device_row(other)[1])
                else:
                    wrap_for = ("stranger-device", KemPrivateKey.generate().public_key())
                lab.assign(device_id, target, wrap_for=wrap_for)
            yield


class UnsignedModel(Attack):
    name = "unsigned model (compromised director key)"
    attacker = MALICIOUS_SERVER
    description = ("stores its own sealed model and assigns it with the director key, key "
                   "wrapped to each device: a target the image repository never signed")
    expected_reason = "not_in_image_repository"

    @contextlib.contextmanager
    def staged(self, lab: AttackLab) -> Iterator[None]:
        bundle, key = lab.attacker_bundle()
        path = f"models/{lab.model}/6.6.6.eotb"
        stored = lab.ctx.store.put_target(path, bundle)
        counter = lab.release("current").release_counter  # at the floor: not a rollback
        try:
            with lab.honest_director():
                for device in lab.devices:
                    lab.sign_director_target(device.device_id, lab.director_target(
                        device.device_id, path, stored.length, stored.hashes["sha256"],
                        counter, key))
                yield
        finally:
            lab.ctx.store.check_target(stored).unlink(missing_ok=True)


ATTACKS: tuple[type[Attack], ...] = (
    ArbitrarySoftware, Rollback, Freeze, MixAndMatch, EndlessData, SlowRetrieval,
    WrongHardware, ReplayedDirectorMetadata, AnotherDevicesKey, UnsignedModel,
)


def default_attacks() -> list[Attack]:
    """One of each attack, in the suite's order."""
    return [attack() for attack in ATTACKS]


def run_suite(lab: AttackLab, attacks: Sequence[Attack] | None = None) -> list[AttackVerdict]:
    """Run every attack against the lab, one after the other; return their verdicts.

    An attack whose device cycles do not end stops the suite: the attacks
    after it are reported as not run (their verdicts carry the error).
    """
    chosen = list(attacks) if attacks is not None else default_attacks()
    verdicts: list[AttackVerdict] = []
    with lab.session():
        for attack in chosen:
            if lab.cycles_pending():
                verdicts.append(AttackVerdict(
                    attack.name, attack.attacker, attack.description, attack.expected_reason,
                    devices=(), unchanged=False, seconds=0.0,
                    error="not run: a device is still busy with an earlier attack"))
                continue
            logger.info("attack: %s", attack.name)
            verdict = attack.run(lab)
            logger.info("attack %s: %s", attack.name,
                        "refused" if verdict.passed else "NOT REFUSED")
            verdicts.append(verdict)
    return verdicts
