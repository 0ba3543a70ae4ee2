"""Fuzz the signed status report parsers: ``SignedReport.from_bytes`` and ``StatusReport``.

What the server does with a report from the broker or HTTP, up to the
database: parse the envelope, parse the report, verify the signature with the
device's key. Invariant: any bytes are either a report or refused with a
``ProtocolError`` (``MalformedReportError``, ``ReportSignatureError``) -- which
the server audits -- never another exception, which the sink would log and
drop unaudited. An accepted report's detail is strict JSON (no NaN or
Infinity the database and API could not write back) and the report
round-trips through its canonical bytes.

The report key is a throwaway made from a fixed string, so seeds signed with
it verify on every run without a key file in the repository.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import sys
from collections.abc import Callable, Mapping

import fuzz_support
from hypothesis import given

with fuzz_support.instrumented(__name__):
    from edgeota.protocol.errors import ProtocolError
    from edgeota.protocol.identity import DeviceIdentity, verify_report
    from edgeota.protocol.keywrap import KemPrivateKey, KemSuite
    from edgeota.protocol.reports import SignedReport, StatusReport

DEVICE = "pi-0042"
IDENTITY = DeviceIdentity(DEVICE, KemPrivateKey.generate(KemSuite.X25519),
                          hashlib.sha256(b"edgeota fuzz: throwaway report key").digest())
PUBLIC = IDENTITY.public()


def one_input(data: bytes) -> None:
    try:
        signed = SignedReport.from_bytes(data)
        report = signed.report
    except ProtocolError:
        return
    json.dumps(report.detail, allow_nan=False)  # stored and served back as JSON
    with contextlib.suppress(ProtocolError):
        verify_report(PUBLIC, signed.report_bytes, signed.signature)
    assert StatusReport.from_bytes(report.to_bytes()) == report, "report does not round-trip"


def seeds() -> Mapping[str, bytes]:
    reports = {
        "downloading": StatusReport(DEVICE, 7, "downloading", "digits@2.0.0", progress=0.25),
        "committed": StatusReport(DEVICE, 12, "committed", "digits@2.0.0",
                                  detail={"latency_p95_ms": 9.8, "accuracy": 0.93}),
        "failed": StatusReport(DEVICE, 13, "failed", "digits@3.0.0", error="validation_failed",
                               detail={"stage": "golden", "accuracy": 0.41}),
        "idle": StatusReport(DEVICE, 1, "idle"),
    }
    return {name: SignedReport.sign(r, IDENTITY).to_bytes() for name, r in reports.items()}


def report_structure(data: bytes, rng: random.Random) -> bytes:
    """Half the time the envelope's JSON, half the report inside it, mutated and signed again
    (the signature of an edited report would otherwise stop nothing the parser does first)."""
    if rng.random() < 0.5:
        return fuzz_support.json_structure(data, rng)
    body = fuzz_support.json_structure(SignedReport.from_bytes(data).report_bytes, rng)
    return SignedReport(body, IDENTITY.sign_report(body)).to_bytes()


@given(data=fuzz_support.mutations("reports", report_structure))
def field_mutations(check: Callable[[bytes], None], data: bytes) -> None:
    """A real report (envelope or body) with one field replaced is parsed or refused, typed."""
    check(data)


HARNESS = fuzz_support.Harness(
    name="reports",
    one_input=one_input,
    seeds=seeds,
    max_len=20 * 1024,
    structure=report_structure,
    properties=(field_mutations,),
)

if __name__ == "__main__":
    sys.exit(fuzz_support.main(HARNESS))
