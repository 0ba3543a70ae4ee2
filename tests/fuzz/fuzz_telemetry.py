"""Fuzz the presence and telemetry parsers: ``parse_presence`` and ``Telemetry.from_bytes``.

Invariant: any bytes on a device's ``online`` or ``telemetry`` topic are either
accepted or refused with ``MalformedMessageError`` -- never another exception
-- and what is accepted is what the server stores: strict JSON (no NaN or
Infinity), re-encoded to the same telemetry by the agent's own writer.
Both parsers read every input (a telemetry message is a malformed presence
and the other way round).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import fuzz_support
from hypothesis import given

with fuzz_support.instrumented(__name__):
    from edgeota.protocol.telemetry import (
        MalformedMessageError,
        ModelTelemetry,
        Telemetry,
        parse_presence,
        presence_bytes,
    )


def one_input(data: bytes) -> None:
    with contextlib.suppress(MalformedMessageError):
        assert isinstance(parse_presence(data), bool)
    try:
        telemetry = Telemetry.from_bytes(data)
    except MalformedMessageError:
        return
    json.dumps(telemetry.to_json(datetime(2025, 3, 1, tzinfo=UTC)), allow_nan=False)
    assert Telemetry.from_bytes(telemetry.to_bytes()) == telemetry, "no round trip"


def seeds() -> Mapping[str, bytes]:
    two = Telemetry({
        "digits": ModelTelemetry("2.0.0", 1200, 3, 4.1, 9.8, 15.0),
        "anomaly": ModelTelemetry("1.4.0-rc.1", 0, 0, None, None, None),
    })
    return {"online": presence_bytes(True), "offline": presence_bytes(False),
            "telemetry": two.to_bytes()}


@given(data=fuzz_support.mutations("telemetry", fuzz_support.json_structure))
def field_mutations(check: Callable[[bytes], None], data: bytes) -> None:
    """A real presence or telemetry message with one field replaced: accepted or refused, typed."""
    check(data)


HARNESS = fuzz_support.Harness(
    name="telemetry",
    one_input=one_input,
    seeds=seeds,
    max_len=10 * 1024,
    structure=fuzz_support.json_structure,
    properties=(field_mutations,),
)

if __name__ == "__main__":
    sys.exit(fuzz_support.main(HARNESS))
