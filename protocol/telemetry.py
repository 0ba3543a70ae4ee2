"""Device presence and telemetry messages: what the agent sends, what the server accepts.

Telemetry (model metrics, one message per interval)::

    {"v": 1, "models": {"digits": {"version": "2.0.0", "inferences": 1200,
                                   "errors": 3, "p50_ms": 4.1, "p95_ms": 9.8,
                                   "p99_ms": 15.0}}}

Exactly these keys; counters are non-negative integers, percentiles
non-negative finite milliseconds or ``null`` (no inference yet); at most
:data:`MAX_TELEMETRY_MODELS` models named like releases, the whole message at
most :data:`MAX_TELEMETRY_SIZE` bytes. Presence is ``{"v": 1, "online":
true|false}`` (the agent's last will says false). One module for both sides,
so the agent writes exactly what the server parses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

from edgeota.protocol.errors import ProtocolError
from edgeota.protocol.manifest import NAME_PATTERN

__all__ = [
    "MAX_PRESENCE_SIZE",
    "MAX_TELEMETRY_MODELS",
    "MAX_TELEMETRY_SIZE",
    "MalformedMessageError",
    "ModelTelemetry",
    "Telemetry",
    "parse_presence",
    "presence_bytes",
]

MAX_TELEMETRY_SIZE = 8 * 1024  # bytes of one telemetry message
MAX_TELEMETRY_MODELS = 16  # models one device reports on
MAX_VERSION_LENGTH = 64  # characters of a model version string
MAX_PRESENCE_SIZE = 64  # bytes; {"v":1,"online":false} is 23
_FORMAT = 1
_PRESENCE_KEYS = frozenset({"v", "online"})
_TELEMETRY_KEYS = frozenset({"v", "models"})
_MODEL_KEYS = frozenset({"version", "inferences", "errors", "p50_ms", "p95_ms", "p99_ms"})
_MAX_COUNT = 2**63 - 1


class MalformedMessageError(ProtocolError):
    """A presence or telemetry payload that is not the JSON this module accepts."""


def _json_object(raw: bytes, limit: int, what: str) -> dict[str, Any]:
    if len(raw) > limit:
        raise MalformedMessageError(f"{what} of {len(raw)} bytes exceeds {limit}")

    def refuse_constant(name: str) -> None:
        raise MalformedMessageError(f"{what} contains {name}")

    try:
        data = json.loads(raw, parse_constant=refuse_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise MalformedMessageError(f"{what} is not JSON") from e
    if not isinstance(data, dict):
        raise MalformedMessageError(f"{what} is not a JSON object")
    return data


def _check_version(data: Mapping[str, Any], keys: frozenset[str], what: str) -> None:
    if set(data) != keys:
        raise MalformedMessageError(f"{what} keys must be exactly {sorted(keys)}")
    if data["v"] != _FORMAT or isinstance(data["v"], bool):
        raise MalformedMessageError(f"{what} version {data['v']!r} is not {_FORMAT}")


def parse_presence(raw: bytes) -> bool:
    """Whether ``{"v": 1, "online": true|false}`` says the device is online.

    Raises:
        MalformedMessageError: anything else.
    """
    data = _json_object(raw, MAX_PRESENCE_SIZE, "presence")
    _check_version(data, _PRESENCE_KEYS, "presence")
    if not isinstance(data["online"], bool):
        raise MalformedMessageError("presence 'online' must be true or false")
    return data["online"]


def _count(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_COUNT:
        raise MalformedMessageError(f"telemetry {name} must be a non-negative integer")
    return value


def _millis(value: object, name: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise MalformedMessageError(f"telemetry {name} must be a non-negative number or null")
    try:
        millis = float(value)  # an integer beyond any float raises OverflowError
    except OverflowError:
        millis = math.inf
    if not math.isfinite(millis) or millis < 0:
        raise MalformedMessageError(f"telemetry {name} must be a non-negative number or null")
    return millis


@dataclass(frozen=True)
class ModelTelemetry:
    """One model's metrics as the device measured them (counters since the model went live)."""

    version: str
    inferences: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    @classmethod
    def from_json(cls, data: object) -> ModelTelemetry:
        if not isinstance(data, dict) or set(data) != _MODEL_KEYS:
            raise MalformedMessageError(f"model telemetry keys must be {sorted(_MODEL_KEYS)}")
        version = data["version"]
        if not isinstance(version, str) or not 0 < len(version) <= MAX_VERSION_LENGTH \
                or not version.isascii() or not version.isprintable():
            raise MalformedMessageError(
                f"model version must be 1..{MAX_VERSION_LENGTH} printable ASCII characters")
        return cls(version, _count(data["inferences"], "inferences"),
                   _count(data["errors"], "errors"), _millis(data["p50_ms"], "p50_ms"),
                   _millis(data["p95_ms"], "p95_ms"), _millis(data["p99_ms"], "p99_ms"))

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "inferences": self.inferences, "errors": self.errors,
                "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "p99_ms": self.p99_ms}


@dataclass(frozen=True)
class Telemetry:
    """A telemetry message: metrics per model name (see the module docstring for the JSON)."""

    models: Mapping[str, ModelTelemetry]

    @classmethod
    def from_bytes(cls, raw: bytes) -> Telemetry:
        """Parse and bound-check a telemetry message.

        Raises:
            MalformedMessageError: not the documented JSON, or beyond a bound.
        """
        data = _json_object(raw, MAX_TELEMETRY_SIZE, "telemetry")
        _check_version(data, _TELEMETRY_KEYS, "telemetry")
        models = data["models"]
        if not isinstance(models, dict) or len(models) > MAX_TELEMETRY_MODELS:
            raise MalformedMessageError(
                f"telemetry models must be an object of at most {MAX_TELEMETRY_MODELS} entries")
        parsed = {}
        for name, value in models.items():
            if NAME_PATTERN.fullmatch(name) is None:
                raise MalformedMessageError(f"telemetry names an invalid model {name[:80]!r}")
            parsed[name] = ModelTelemetry.from_json(value)
        return cls(MappingProxyType(parsed))

    def to_bytes(self) -> bytes:
        """The message the agent publishes (bounded like :meth:`from_bytes` checks)."""
        data = {"v": _FORMAT,
                "models": {name: m.to_json() for name, m in sorted(self.models.items())}}
        raw = json.dumps(data, separators=(",", ":")).encode()
        if len(raw) > MAX_TELEMETRY_SIZE:
            raise MalformedMessageError(f"telemetry exceeds {MAX_TELEMETRY_SIZE} bytes")
        return raw

    def to_json(self, received_at: datetime) -> dict[str, Any]:
        """What ``Device.reported_state["telemetry"]`` holds."""
        return {"v": _FORMAT, "received_at": received_at.isoformat(),
                "models": {name: m.to_json() for name, m in sorted(self.models.items())}}




def presence_bytes(online: bool) -> bytes:
    """The presence payload the agent publishes (and its last will)."""
    return json.dumps({"v": _FORMAT, "online": online}, separators=(",", ":")).encode()
