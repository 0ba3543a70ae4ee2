"""Scenario files: the fleet, its links, the timeline, faults and model behaviour, in TOML.

A scenario says what a simulated run does; :mod:`edgeota.simulator.run` does it.
Example (``simulator/scenarios/staged.toml`` ships with more comments)::

    name = "staged rollout"
    devices = 20

    [[fleet]]                      # hardware classes, shares of the devices
    hardware = "rpi4"
    share = 1
    tags = { site = "lab" }
    link = "lan"

    [links.lan]
    disconnects_per_minute = 0.0   # per device: the connection drops, the agent resumes
    bandwidth_kbps = 2000          # per device and direction (absent: unlimited)
    latency_ms = 40                # one way, each direction (a round trip pays it twice)

    [agent]
    probation_seconds = 1.0
    probation_min_inferences = 10

    [[timeline]]
    action = "publish"             # a sample model as NAME@VERSION
    sample = "digits_v1"
    release = "digits@1.0.0"

    [[timeline]]
    action = "deploy"
    release = "digits@1.0.0"
    phases = [10, 50, 100]
    wait = "updated"               # or "completed", "paused", "none"

    [[behaviour]]                  # a release slow or failing on one hardware class
    release = "digits@2.0.0"
    hardware = "rpi5"
    extra_latency_ms = 40

    [[faults]]
    kind = "disconnect"            # the link drops (crash: the agent dies and restarts)
    devices = 2                    # how many (chosen by a seeded draw)
    when = "downloading"           # the state it happens in (crash: probation or any)

Links. A profile with ``bandwidth_kbps`` (16 .. 10,000,000 kilobits per
second) or ``latency_ms`` (0 .. 10,000) puts its devices behind a shaping
proxy (:mod:`edgeota.simulator.link`): every connection gets its own token
bucket per direction and a one-way delay; TLS passes through. Without them
the devices connect to the broker directly. Below about 16 kbps the agent's
minimum transfer rate would cut every download, hence the floor.

Faults (``[[faults]]``; each draws ``devices`` devices, 0 .. :data:`MAX_DEVICES`,
from the scenario's seeded generator; :mod:`edgeota.simulator.faults` injects
them). The keys a kind does not take are refused:

* ``disconnect`` -- ``when`` = ``downloading``, ``probation`` or ``any``: the
  link drops once in that state (besides a profile's ``disconnects_per_minute``).
* ``crash`` -- a crash or power cut: the agent process dies and a new one boots
  from the device's folder. ``when`` = a state of the update (``checking``,
  ``downloading``, ``verifying``, ``validating``, ``staged``, ``swapping``,
  ``probation``), or ``random`` (alias ``any``: a state drawn per device). It
  happens right after the journal saved that state; ``downloading`` cuts
  half-way through the bundle, so the download resumes after the reboot.
  Once per device.
* ``disk_full`` -- the agent sees no free space in its state folder for
  ``duration`` seconds (0 .. 86,400; 0 or absent: the whole run): its
  updates fail as ``disk_full`` before downloading, it keeps serving its
  model, and it updates once the space is back. ``when`` = ``start`` (the
  default: from the run's start) or ``serving`` (from the moment the device
  serves a committed model, so the fault meets its next update).
* ``corrupt_chunks`` -- ``ratio`` (0 < ratio <= 1) of the bundle chunk frames
  sent to these devices get a byte flipped on the way (a man-in-the-middle on
  the broker side); the agent refuses each damaged frame and fetches it again.
* ``clock_skew`` -- the device clock is off by ``seconds`` (non-zero, within
  +-20 years; negative: behind) for ``duration`` seconds (0 or absent: the whole
  run), from its first verified update cycle on (a device without a time
  floor trusts any clock); ``when`` as for ``disk_full``. Far behind its floor the agent reports
  ``clock_untrusted``; ahead beyond the metadata expiry, the check fails as
  expired metadata. Either way it keeps its model until the clock is right.

Every value is checked when the file is read, with the file, the entry and
the reason in the error; unknown keys are refused (a typo must not silently
do nothing). Sizes are bounded: at most :data:`MAX_DEVICES` devices and
:data:`MAX_STEPS` timeline steps.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from edgeota.protocol.errors import EdgeotaError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance  # any dataclass type (has __dataclass_fields__)

__all__ = [
    "CRASH_STATES",
    "FAULT_KINDS",
    "MAX_DEVICES",
    "MAX_STEPS",
    "AgentTiming",
    "Behaviour",
    "Fault",
    "HardwareClass",
    "LinkProfile",
    "Scenario",
    "ScenarioError",
    "Step",
    "builtin_scenarios",
    "load_scenario",
]

MAX_DEVICES = 5000
MAX_STEPS = 100
MAX_WAIT_SECONDS = 3600.0
SCENARIO_DIR = Path(__file__).parent / "scenarios"
ACTIONS = frozenset({"publish", "deploy", "attacks", "wait"})
WAITS = frozenset({"updated", "completed", "paused", "none"})
# The journal states an update passes through: where a crash (power cut) can land.
CRASH_STATES = ("downloading", "verifying", "validating", "swapping", "probation")
DISCONNECT_STATES = frozenset({"downloading", "probation", "any"})
TIMED_STARTS = frozenset({"start", "serving"})  # disk_full, clock_skew: when they begin
# Per kind, the keys it takes besides ``kind`` and ``devices``.
FAULT_KEYS: dict[str, frozenset[str]] = {
    "crash": frozenset({"when"}),
    "disconnect": frozenset({"when"}),
    "disk_full": frozenset({"duration", "when"}),
    "corrupt_chunks": frozenset({"ratio"}),
    "clock_skew": frozenset({"seconds", "duration", "when"}),
}
FAULT_KINDS = frozenset(FAULT_KEYS)
MAX_FAULT_SECONDS = 86_400.0  # a fault's duration
MAX_CLOCK_SKEW = 20 * 366 * 86_400.0  # seconds either way
MIN_BANDWIDTH_KBPS = 16.0
MAX_BANDWIDTH_KBPS = 10_000_000.0
MAX_LATENCY_MS = 10_000.0


class ScenarioError(EdgeotaError):
    """A scenario file that does not parse or breaks a rule (the message says which)."""


@dataclass(frozen=True)
class LinkProfile:
    disconnects_per_minute: float = 0.0  # per device, while connected
    bandwidth_kbps: float | None = None  # per device and direction; None: unlimited
    latency_ms: float = 0.0  # one way, each direction

    @property
    def shaped(self) -> bool:
        """Whether its devices go through the link emulator (bandwidth or latency)."""
        return self.bandwidth_kbps is not None or self.latency_ms > 0


@dataclass(frozen=True)
class HardwareClass:
    hardware: str
    share: float = 1.0
    tags: dict[str, str] = field(default_factory=dict)
    link: str = "lan"


@dataclass(frozen=True)
class AgentTiming:
    probation_seconds: float = 1.0
    probation_min_inferences: int = 10
    poll_seconds: float = 60.0
    telemetry_seconds: float = 1.0
    inferences_per_step: int = 2
    max_latency_factor: float = 3.0
    # Many agents share this machine's cores: a p95 over a short probation sees
    # scheduler stalls of several ms that a device of its own would not.
    latency_floor_ms: float = 25.0


@dataclass(frozen=True)
class Step:
    action: str
    release: str | None = None  # NAME@VERSION
    sample: str | None = None  # a firmware sample model (publish)
    phases: tuple[int, ...] = (100,)
    soak_seconds: float = 0.0
    min_success_ratio: float = 0.95
    max_failure_ratio: float = 0.05
    latency_factor: float | None = 2.0
    error_rate_factor: float | None = 2.0
    auto_rollback: bool = False
    wait: str = "updated"
    timeout_seconds: float = 300.0
    label: str = ""
    pad_mb: float = 0.0  # publish: unused weights added, so the bundle weighs this much more


@dataclass(frozen=True)
class Behaviour:
    release: str
    hardware: str | None = None  # None: every class
    extra_latency_ms: float = 0.0
    fail: bool = False


@dataclass(frozen=True)
class Fault:
    kind: str
    devices: int = 1
    when: str = "any"  # crash, disconnect: the state; disk_full, clock_skew: start or serving
    seconds: float = 0.0  # clock_skew: the offset (negative: behind)
    duration: float = 0.0  # disk_full, clock_skew: how long; 0: the whole run
    ratio: float = 0.0  # corrupt_chunks: the share of bundle chunk frames damaged


@dataclass(frozen=True)
class Scenario:
    name: str
    devices: int
    fleet: tuple[HardwareClass, ...]
    links: dict[str, LinkProfile]
    agent: AgentTiming
    timeline: tuple[Step, ...]
    behaviour: tuple[Behaviour, ...] = ()
    faults: tuple[Fault, ...] = ()
    seed: int = 1
    source: str = "<built-in>"

    def with_devices(self, count: int) -> Scenario:
        _check(1 <= count <= MAX_DEVICES, self.source, "devices",
               f"must be between 1 and {MAX_DEVICES}")
        return Scenario(**{**self.__dict__, "devices": count})

    def hardware_of(self) -> list[HardwareClass]:
        """One class per device, by the classes' shares (largest remainders, stable)."""
        total = sum(c.share for c in self.fleet)
        exact = [c.share / total * self.devices for c in self.fleet]
        counts = [int(e) for e in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
        for i in by_remainder[:self.devices - sum(counts)]:
            counts[i] += 1
        result: list[HardwareClass] = []
        # Interleaved, so any prefix of the fleet mixes the classes.
        while len(result) < self.devices:
            for i, cls in enumerate(self.fleet):
                if counts[i] > 0:
                    result.append(cls)
                    counts[i] -= 1
        return result


def _fail(source: str, where: str, why: str) -> NoReturn:
    raise ScenarioError(f"{source}: {where} {why}")


def _check(ok: bool, source: str, where: str, why: str) -> None:
    if not ok:
        _fail(source, where, why)


def _only(table: dict[str, Any], allowed: set[str], source: str, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    _check(not unknown, source, where, f"has unknown key(s) {unknown} (allowed: "
           f"{sorted(allowed)})")


def _number(value: Any, source: str, where: str, low: float, high: float) -> float:
    _check(isinstance(value, int | float) and not isinstance(value, bool)
           and low <= value <= high, source, where, f"must be a number in [{low}, {high}]")
    return float(value)


def _release(value: Any, source: str, where: str) -> str:
    # An if, not _check: the isinstance must narrow `value` for the return.
    if not (isinstance(value, str) and value.count("@") == 1 and all(value.split("@"))):
        _fail(source, where, "must be NAME@VERSION, e.g. digits@2.0.0")
    return value


def _dataclass_from(
    cls: type[DataclassInstance], table: Any, source: str, where: str
) -> dict[str, Any]:
    if not isinstance(table, dict):
        _fail(source, where, "must be a table")
    fields = set(cls.__dataclass_fields__)
    _only(table, fields, source, where)
    return table


def parse_scenario(data: dict[str, Any], source: str) -> Scenario:
    """Check and build a scenario from parsed TOML (see the module docstring)."""
    _only(data, {"name", "devices", "fleet", "links", "agent", "timeline", "behaviour",
                 "faults", "seed"}, source, "the file")
    devices = int(_number(data.get("devices", 20), source, "devices", 1, MAX_DEVICES))
    links = {"lan": LinkProfile()}
    raw_links = data.get("links", {})
    _check(isinstance(raw_links, dict), source, "[links]", "must be a table of tables")
    for name, table in raw_links.items():
        table = _dataclass_from(LinkProfile, table, source, f"[links.{name}]")
        bandwidth = table.get("bandwidth_kbps")
        links[name] = LinkProfile(
            disconnects_per_minute=_number(table.get("disconnects_per_minute", 0.0), source,
                                           f"links.{name}.disconnects_per_minute", 0, 60),
            bandwidth_kbps=None if bandwidth is None else _number(
                bandwidth, source, f"links.{name}.bandwidth_kbps", MIN_BANDWIDTH_KBPS,
                MAX_BANDWIDTH_KBPS),
            latency_ms=_number(table.get("latency_ms", 0.0), source,
                               f"links.{name}.latency_ms", 0, MAX_LATENCY_MS))
    fleet = []
    raw_fleet = data.get("fleet", [{"hardware": "rpi4"}, {"hardware": "rpi5"}])
    _check(isinstance(raw_fleet, list) and 1 <= len(raw_fleet) <= 16, source, "[[fleet]]",
           "must be 1 to 16 hardware classes")
    for index, table in enumerate(raw_fleet):
        where = f"fleet[{index}]"
        table = _dataclass_from(HardwareClass, table, source, where)
        hardware = table.get("hardware")
        if not (isinstance(hardware, str) and hardware.isascii() and 0 < len(hardware) <= 64):
            _fail(source, f"{where}.hardware", "must be a hardware id like rpi4")
        tags = table.get("tags", {})
        _check(isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values()),
               source, f"{where}.tags", "must be a table of strings")
        link = table.get("link", "lan")
        _check(link in links, source, f"{where}.link", f"names no [links.{link}] table")
        fleet.append(HardwareClass(hardware=hardware, share=_number(
            table.get("share", 1.0), source, f"{where}.share", 0.001, 1e6),
            tags=dict(tags), link=link))
    agent_table = _dataclass_from(AgentTiming, data.get("agent", {}), source, "[agent]")
    agent = AgentTiming(
        probation_seconds=_number(agent_table.get("probation_seconds", 1.0), source,
                                  "agent.probation_seconds", 0, 3600),
        probation_min_inferences=int(_number(agent_table.get("probation_min_inferences", 10),
                                             source, "agent.probation_min_inferences", 0,
                                             1e6)),
        poll_seconds=_number(agent_table.get("poll_seconds", 60.0), source,
                             "agent.poll_seconds", 0.1, 86400),
        telemetry_seconds=_number(agent_table.get("telemetry_seconds", 1.0), source,
                                  "agent.telemetry_seconds", 0.05, 3600),
        inferences_per_step=int(_number(agent_table.get("inferences_per_step", 2), source,
                                        "agent.inferences_per_step", 0, 1000)),
        max_latency_factor=_number(agent_table.get("max_latency_factor", 3.0), source,
                                   "agent.max_latency_factor", 1.0, 1e6),
        latency_floor_ms=_number(agent_table.get("latency_floor_ms", 25.0), source,
                                 "agent.latency_floor_ms", 0, 60_000),
    )
    raw_steps = data.get("timeline", [])
    _check(isinstance(raw_steps, list) and 1 <= len(raw_steps) <= MAX_STEPS, source,
           "[[timeline]]", f"must have 1 to {MAX_STEPS} steps")
    timeline = [_step(table, source, f"timeline[{i}]") for i, table in enumerate(raw_steps)]
    behaviour = []
    for index, table in enumerate(data.get("behaviour", [])):
        where = f"behaviour[{index}]"
        table = _dataclass_from(Behaviour, table, source, where)
        behaviour.append(Behaviour(
            release=_release(table.get("release"), source, f"{where}.release"),
            hardware=table.get("hardware"),
            extra_latency_ms=_number(table.get("extra_latency_ms", 0.0), source,
                                     f"{where}.extra_latency_ms", 0, 60_000),
            fail=bool(table.get("fail", False))))
    raw_faults = data.get("faults", [])
    _check(isinstance(raw_faults, list) and len(raw_faults) <= MAX_STEPS, source,
           "[[faults]]", f"must be a list of at most {MAX_STEPS} tables")
    faults = [_fault(table, source, f"faults[{i}]") for i, table in enumerate(raw_faults)]
    name = data.get("name", Path(source).stem)
    _check(isinstance(name, str) and len(name) <= 200, source, "name", "must be a string")
    return Scenario(name=name, devices=devices, fleet=tuple(fleet), links=links, agent=agent,
                    timeline=tuple(timeline), behaviour=tuple(behaviour), faults=tuple(faults),
                    seed=int(_number(data.get("seed", 1), source, "seed", 0, 2**31)),
                    source=source)


def _fault(table: Any, source: str, where: str) -> Fault:
    table = _dataclass_from(Fault, table, source, where)
    kind = table.get("kind")
    _check(kind in FAULT_KINDS, source, f"{where}.kind", f"must be one of "
           f"{sorted(FAULT_KINDS)}")
    takes = FAULT_KEYS[kind]
    extra = sorted(set(table) - takes - {"kind", "devices"})
    _check(not extra, source, where, f"has key(s) {extra} that kind {kind} does not take "
           f"(it takes: {sorted(takes | {'devices'})})")
    devices = int(_number(table.get("devices", 1), source, f"{where}.devices", 0, MAX_DEVICES))
    when = table.get("when", "any")
    if kind == "crash":
        allowed = {*CRASH_STATES, "random", "any"}
        _check(when in allowed, source, f"{where}.when", f"must be one of {sorted(allowed)}")
    elif kind == "disconnect":
        _check(when in DISCONNECT_STATES, source, f"{where}.when",
               f"must be one of {sorted(DISCONNECT_STATES)}")
    elif kind in ("disk_full", "clock_skew"):
        when = table.get("when", "start")
        _check(when in TIMED_STARTS, source, f"{where}.when",
               f"must be one of {sorted(TIMED_STARTS)}")
    duration = _number(table.get("duration", 0.0), source, f"{where}.duration", 0,
                       MAX_FAULT_SECONDS)
    ratio = 0.0
    if kind == "corrupt_chunks":
        _check("ratio" in table, source, f"{where}.ratio", "is required (0 < ratio <= 1)")
        ratio = _number(table["ratio"], source, f"{where}.ratio", 0, 1)
        _check(ratio > 0, source, f"{where}.ratio", "must be above 0")
    seconds = 0.0
    if kind == "clock_skew":
        _check("seconds" in table, source, f"{where}.seconds",
               "is required: the clock's offset (negative: behind)")
        seconds = _number(table["seconds"], source, f"{where}.seconds", -MAX_CLOCK_SKEW,
                          MAX_CLOCK_SKEW)
        _check(seconds != 0, source, f"{where}.seconds", "must not be 0 (no skew)")
    return Fault(kind=kind, devices=devices, when=when, seconds=seconds, duration=duration,
                 ratio=ratio)


def _step(table: Any, source: str, where: str) -> Step:
    table = _dataclass_from(Step, table, source, where)
    action = table.get("action")
    _check(action in ACTIONS, source, f"{where}.action", f"must be one of {sorted(ACTIONS)}")
    release = table.get("release")
    if action in ("publish", "deploy"):
        release = _release(release, source, f"{where}.release")
    if action == "publish":
        _check(isinstance(table.get("sample"), str), source, f"{where}.sample",
               "must name a sample model, e.g. digits_v2")
    phases = table.get("phases", [100])
    _check(isinstance(phases, list) and bool(phases) and all(
        isinstance(p, int) and not isinstance(p, bool) for p in phases),
        source, f"{where}.phases", "must be a list of percentages ending at 100")
    wait = table.get("wait", "updated" if action == "deploy" else "none")
    _check(wait in WAITS, source, f"{where}.wait", f"must be one of {sorted(WAITS)}")

    def factor(key: str) -> float | None:
        value = table.get(key, 2.0)
        return None if value == 0 else _number(value, source, f"{where}.{key}", 1.0001, 1e6)

    return Step(
        action=action, release=release, sample=table.get("sample"), phases=tuple(phases),
        soak_seconds=_number(table.get("soak_seconds", 0.0), source, f"{where}.soak_seconds",
                             0, MAX_WAIT_SECONDS),
        min_success_ratio=_number(table.get("min_success_ratio", 0.95), source,
                                  f"{where}.min_success_ratio", 0, 1),
        max_failure_ratio=_number(table.get("max_failure_ratio", 0.05), source,
                                  f"{where}.max_failure_ratio", 0, 1),
        latency_factor=factor("latency_factor"), error_rate_factor=factor("error_rate_factor"),
        auto_rollback=bool(table.get("auto_rollback", False)), wait=wait,
        timeout_seconds=_number(table.get("timeout_seconds", 300.0), source,
                                f"{where}.timeout_seconds", 1, MAX_WAIT_SECONDS),
        label=str(table.get("label", "")),
        pad_mb=_number(table.get("pad_mb", 0.0), source, f"{where}.pad_mb", 0, 512),
    )


def load_scenario(path: Path) -> Scenario:
    """Read and check a scenario file (a built-in name like ``staged`` works too)."""
    if not path.exists() and (SCENARIO_DIR / f"{path}.toml").exists():
        path = SCENARIO_DIR / f"{path}.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = ", ".join(builtin_scenarios())
        raise ScenarioError(f"{path}: no such scenario file (built-in: {known})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{path}: not valid TOML: {e}") from e
    return parse_scenario(data, str(path))


def builtin_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))
