"""Fuzz the device's inference endpoint request decoding: ``decode_infer_request``.

Any local process can POST to the endpoint. Invariant: any body (and any
``Inference-Header-Content-Length``) either decodes into an ``InferRequest``
whose inputs are arrays of exactly the datatype and shape the request
declared, or raises ``RequestError`` with a 4xx status -- never another
exception, which the endpoint would answer with a 500 (and which once
counted against a model in probation).

An input is the header value, a newline, then the body: ``-`` for no header
(a JSON-only request), else the number as sent (the fuzzer may make it
anything). Seeds are requests as tritonclient, a standard OIP client, writes
them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

import fuzz_support
import numpy as np
from hypothesis import given

with fuzz_support.instrumented(__name__):
    from edgeota.agent.inference_server import RequestError, decode_infer_request
    from edgeota.runtime.validation import NUMPY_TYPES


def split(data: bytes) -> tuple[bytes, str | None]:
    head, _, body = data.partition(b"\n")
    return body, None if head == b"-" else head.decode("latin-1")


def one_input(data: bytes) -> None:
    body, header_length = split(data)
    try:
        request = decode_infer_request(body, header_length)
    except RequestError as e:
        assert 400 <= e.status < 500, f"a refusal with status {e.status}"
        return
    assert request.inputs, "a decoded request has inputs"
    for name, array in request.inputs.items():
        assert isinstance(name, str) and isinstance(array, np.ndarray)
        assert array.dtype == object or array.dtype in set(NUMPY_TYPES.values()), array.dtype


def seeds() -> Mapping[str, bytes]:
    import tritonclient.http as triton

    def request(name: str, *inputs: tuple[str, list[int], str, np.ndarray, bool],
                outputs: tuple[tuple[str, bool], ...] = ()) -> tuple[str, bytes]:
        infer_inputs = []
        for input_name, shape, datatype, value, binary in inputs:
            item = triton.InferInput(input_name, shape, datatype)
            item.set_data_from_numpy(value, binary_data=binary)
            infer_inputs.append(item)
        wanted = [triton.InferRequestedOutput(n, binary_data=b) for n, b in outputs] or None
        body, json_size = triton.InferenceServerClient.generate_request_body(
            infer_inputs, wanted, request_id=name)
        head = b"-" if json_size is None else str(json_size).encode()
        return name, head + b"\n" + body

    pixels = np.arange(128, dtype=np.float32).reshape(2, 64) % 17
    return dict([
        request("json-fp32", ("input", [2, 64], "FP32", pixels, False)),
        request("binary-fp32", ("input", [2, 64], "FP32", pixels, True),
                outputs=(("label", True), ("probabilities", False))),
        request("json-int64-bool", ("ids", [3], "INT64", np.array([1, -2, 3]), False),
                ("mask", [3], "BOOL", np.array([True, False, True]), False)),
        request("binary-bytes", ("text", [2], "BYTES", np.array([b"hi", b"\xc3\xa9t\xc3\xa9"],
                                                                 dtype=object), True)),
        request("binary-fp16", ("half", [1, 4], "FP16", np.ones((1, 4), np.float16), True)),
    ])


def _structure(data: bytes, rng: object) -> bytes:
    """The JSON header mutated structurally, the binary tail and header value kept."""
    body, header_length = split(data)
    size = len(body) if header_length is None else int(header_length)
    head = fuzz_support.json_structure(body[:size], rng)  # type: ignore[arg-type]
    value = b"-" if header_length is None else str(len(head)).encode()
    return value + b"\n" + head + body[size:]


@given(data=fuzz_support.mutations("infer_request", _structure))
def field_mutations(check: Callable[[bytes], None], data: bytes) -> None:
    """A real request with one JSON field replaced by any value decodes or is a 4xx."""
    check(data)


HARNESS = fuzz_support.Harness(
    name="infer_request",
    one_input=one_input,
    seeds=seeds,
    max_len=16 * 1024,
    rss_limit_mb=2048,
    structure=_structure,
    properties=(field_mutations,),
)

if __name__ == "__main__":
    sys.exit(fuzz_support.main(HARNESS))
