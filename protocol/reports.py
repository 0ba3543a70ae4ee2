"""Signed device status reports: what the agent says about itself, and proof it said it.

A report travels as one MQTT message (or HTTP body)::

    {"v": 1, "report": "<base64 of the canonical report JSON>", "sig": "<base64 Ed25519>"}

The signature covers the exact report bytes (bound to the device id by
``DeviceIdentity.sign_report``), and the report carries a sequence number
that must grow, so a report can be neither forged, replayed, nor passed off
as another device's. The broker topic (and, behind it, the TLS certificate)
names the sender; the server checks that it matches the report's device id.

Everything in a report comes from outside, so parsing refuses, as
:class:`MalformedReportError` (audited by the server like any bad report),
what ``json`` would otherwise turn into another exception or a value no
database stores: nesting deeper than :data:`MAX_JSON_DEPTH`, an integer
longer than the interpreter converts (4 300 digits), ``NaN``, ``Infinity``
and numbers too large for a float.
"""

from __future__ import annotations

import base64
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from edgeota.protocol.errors import ProtocolError
from edgeota.protocol.identity import DeviceIdentity, validate_device_id

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_REPORT_SIZE",
    "MalformedReportError",
    "SignedReport",
    "StatusReport",
]

MAX_REPORT_SIZE = 16 * 1024  # bytes of the whole envelope
MAX_JSON_DEPTH = 8  # nested objects and arrays in a report (its "detail" included)
_FORMAT = 1
_MAX_TEXT = 512


class MalformedReportError(ProtocolError):
    """A report envelope or body that does not parse or breaks a bound."""


def _refuse_constant(name: str) -> None:
    raise MalformedReportError(f"report holds {name}, which is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedReportError(f"report holds a number too large for a float: {text[:40]}")
    return value


def _depth(value: object) -> int:
    """How deep objects and arrays nest in ``value`` (iterative: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def _load_json(raw: bytes, what: str) -> Any:
    """``json.loads`` with every way it can fail, or accept the unstorable, made a refusal."""
    try:
        data = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite)
    except RecursionError as e:  # nesting past the interpreter's stack
        raise MalformedReportError(f"{what} nests deeper than {MAX_JSON_DEPTH}") from e
    except ValueError as e:  # not JSON, not UTF-8, or an integer past 4 300 digits
        raise MalformedReportError(f"{what} is not JSON: {str(e)[:200]}") from e
    if _depth(data) > MAX_JSON_DEPTH:
        raise MalformedReportError(f"{what} nests deeper than {MAX_JSON_DEPTH}")
    return data


@dataclass(frozen=True)
class StatusReport:
    """One state report; ``seq`` strictly increases per device (persisted by the agent)."""

    device_id: str
    seq: int
    state: str
    release: str | None = None  # e.g. "digits@2.0.0"
    progress: float | None = None  # 0..1 while downloading
    error: str | None = None  # reason code for failed / rolled_back
    detail: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        body = {"device_id": self.device_id, "seq": self.seq, "state": self.state,
                "release": self.release, "progress": self.progress, "error": self.error,
                "detail": self.detail}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes) -> StatusReport:
        """Parse and bound-check a report body.

        Raises:
            MalformedReportError: not the documented JSON, or beyond a bound.
        """
        data = _load_json(raw, "report")
        if not isinstance(data, dict) or set(data) != {
            "device_id", "seq", "state", "release", "progress", "error", "detail"
        }:
            raise MalformedReportError("report fields are not the expected set")
        seq, state = data["seq"], data["state"]
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq < 2**63:
            raise MalformedReportError("report seq must be a positive integer")
        if not isinstance(state, str) or not 0 < len(state) <= 32:
            raise MalformedReportError("report state must be a short string")
        for name in ("release", "error"):
            value = data[name]
            if value is not None and (not isinstance(value, str) or len(value) > _MAX_TEXT):
                raise MalformedReportError(f"report {name} must be a short string")
        progress = data["progress"]
        if progress is not None and (not isinstance(progress, int | float)
                                     or not 0 <= progress <= 1):
            raise MalformedReportError("report progress must be between 0 and 1")
        if not isinstance(data["detail"], dict):
            raise MalformedReportError("report detail must be an object")
        try:
            device_id = validate_device_id(data["device_id"])
        except ValueError as e:
            raise MalformedReportError(str(e)) from e
        return cls(device_id, seq, state, data["release"], progress, data["error"],
                   data["detail"])


@dataclass(frozen=True)
class SignedReport:
    """The envelope: report bytes exactly as signed, and the signature."""

    report_bytes: bytes
    signature: bytes

    @functools.cached_property
    def report(self) -> StatusReport:
        """The report the bytes hold, parsed on first use (it is read several times)."""
        return StatusReport.from_bytes(self.report_bytes)

    @classmethod
    def sign(cls, report: StatusReport, identity: DeviceIdentity) -> SignedReport:
        if report.device_id != identity.device_id:
            raise ValueError("a device signs only its own reports")
        raw = report.to_bytes()
        return cls(raw, identity.sign_report(raw))

    def to_bytes(self) -> bytes:
        envelope = {"v": _FORMAT, "report": base64.b64encode(self.report_bytes).decode(),
                    "sig": base64.b64encode(self.signature).decode()}
        data = json.dumps(envelope, separators=(",", ":")).encode("ascii")
        if len(data) > MAX_REPORT_SIZE:
            raise MalformedReportError(f"report exceeds {MAX_REPORT_SIZE} bytes")
        return data

    @classmethod
    def from_bytes(cls, raw: bytes) -> SignedReport:
        """Split an envelope into the signed bytes and the signature (neither checked yet).

        Raises:
            MalformedReportError: too large, not the envelope JSON, or not base64.
        """
        if len(raw) > MAX_REPORT_SIZE:
            raise MalformedReportError(f"report exceeds {MAX_REPORT_SIZE} bytes")
        envelope = _load_json(raw, "report envelope")
        try:
            if not isinstance(envelope, dict) or envelope.get("v") != _FORMAT:
                raise MalformedReportError("unknown report envelope version")
            return cls(base64.b64decode(envelope["report"], validate=True),
                       base64.b64decode(envelope["sig"], validate=True))
        except (KeyError, TypeError, ValueError) as e:  # binascii.Error is a ValueError;
            # base64 of a str with non-ASCII characters raises a plain ValueError
            raise MalformedReportError(f"report envelope does not parse: {e}") from e
