"""Signed device status reports: what the agent says about itself, and proof it said it.

A report travels as one MQTT message (or HTTP body)::

    {"v": 1, "report": "<base64 of the canonical report JSON>", "sig": "<base64 Ed25519>"}

The signature covers the exact report bytes (bound to the device id by
``DeviceIdentity.sign_report``), and the report carries a sequence number
that must grow, so a report can be neither forged, replayed, nor passed off
as another device's. The broker topic (and, behind it, the TLS certificate)
names the sender; the server checks that it matches the report's device id.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from dataclasses import dataclass, field
from typing import Any

from edgeota.protocol.errors import ProtocolError
from edgeota.protocol.identity import DeviceIdentity, validate_device_id

__all__ = ["MAX_REPORT_SIZE", "MalformedReportError", "SignedReport", "StatusReport"]

MAX_REPORT_SIZE = 16 * 1024  # bytes of the whole envelope
_FORMAT = 1
_MAX_TEXT = 512


class MalformedReportError(ProtocolError):
    """A report envelope or body that does not parse or breaks a bound."""


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
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MalformedReportError(f"report is not JSON: {e}") from e
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
        if len(raw) > MAX_REPORT_SIZE:
            raise MalformedReportError(f"report exceeds {MAX_REPORT_SIZE} bytes")
        try:
            envelope = json.loads(raw)
            if not isinstance(envelope, dict) or envelope.get("v") != _FORMAT:
                raise MalformedReportError("unknown report envelope version")
            return cls(base64.b64decode(envelope["report"], validate=True),
                       base64.b64decode(envelope["sig"], validate=True))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                binascii.Error) as e:
            raise MalformedReportError(f"report envelope does not parse: {e}") from e
