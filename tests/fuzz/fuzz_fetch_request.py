"""Fuzz the server side of the MQTT fetch protocol: ``decode_request``, as the bridge calls it.

Any device may publish anything on its ``fetch`` topic. Invariant: any bytes
either decode into a ``FetchRequest`` or raise a ``FrameError`` subclass (the
bridge counts it and answers with an error frame when the request id is
known) -- never another exception, which would stop the bridge's handler for
the whole fleet. An accepted request round-trips through ``encode_request``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

import fuzz_support
from hypothesis import given

with fuzz_support.instrumented(__name__):
    from edgeota.protocol.fetch import (
        MAX_REQUEST_ID,
        FetchRequest,
        FrameError,
        decode_request,
        encode_request,
    )


def one_input(data: bytes) -> None:
    try:
        request = decode_request(data)
    except FrameError as e:
        assert e.request_id is None or 0 < len(e.request_id) <= MAX_REQUEST_ID
        return
    assert decode_request(encode_request(request)) == request, "request does not round-trip"


def seeds() -> Mapping[str, bytes]:
    return {
        "metadata": encode_request(FetchRequest("r1", "image/metadata/timestamp.json", 0, 1,
                                                16384)),
        "target": encode_request(FetchRequest(
            "r0-bundle", "image/targets/3f1c0e5d2b8a4f6e9c7d1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c"
            "4d5e6f7.digits-2.0.0.bundle", 65536 * 8, 8, 50_000_000)),
        "director": encode_request(FetchRequest("d_7", "director/pi-0042/metadata/targets.json")),
        "cancel": encode_request(FetchRequest("r0-bundle", "image/targets/x.bundle", 0, 0)),
    }


@given(data=fuzz_support.mutations("fetch_request", fuzz_support.json_structure))
def field_mutations(check: Callable[[bytes], None], data: bytes) -> None:
    """A real request with one field replaced by any JSON value decodes or is refused, typed."""
    check(data)


HARNESS = fuzz_support.Harness(
    name="fetch_request",
    one_input=one_input,
    seeds=seeds,
    max_len=4096,
    structure=fuzz_support.json_structure,
    properties=(field_mutations,),
)

if __name__ == "__main__":
    sys.exit(fuzz_support.main(HARNESS))
