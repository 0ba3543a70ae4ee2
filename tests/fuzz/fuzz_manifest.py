"""Fuzz the bundle manifest parser: ``Manifest.from_json``.

Invariant: any bytes either parse into a ``Manifest`` or raise ``ManifestError``
(nothing else: no ``RecursionError`` from deep JSON, no ``OverflowError`` from a
huge number), an accepted manifest round-trips through its canonical bytes, and
its validation vectors and golden set convert to the numpy arrays the
validation gate runs (no value outside its datatype's range).
The manifest is read from inside an authenticated bundle, but the release side
builds it from operator files, and a bundle sealed with a leaked content key
is only as safe as this parser.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

import fuzz_support
from hypothesis import given

with fuzz_support.instrumented(__name__):
    from edgeota.protocol.errors import ManifestError
    from edgeota.protocol.manifest import Manifest
    from edgeota.runtime.validation import tensor_to_numpy


def one_input(data: bytes) -> None:
    try:
        manifest = Manifest.from_json(data)
    except ManifestError:
        return
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest, "an accepted manifest does not round-trip"
    # What the validation gate does with the vectors and the golden set next.
    tensors = []
    if manifest.validation is not None:
        tensors += [*manifest.validation.inputs, *manifest.validation.outputs]
    if manifest.golden is not None:
        tensors += manifest.golden.inputs
    for tensor in tensors:
        assert tensor_to_numpy(tensor).shape == tensor.shape


def seeds() -> Mapping[str, bytes]:
    with_vectors = fuzz_support.sample_manifest("digits_v1")
    plain = fuzz_support.sample_manifest("digits_v2", vectors=False)
    return {"digits_v1-vectors": with_vectors.to_json(), "digits_v2": plain.to_json()}


@given(data=fuzz_support.mutations("manifest", fuzz_support.json_structure))
def field_mutations(check: Callable[[bytes], None], data: bytes) -> None:
    """A real manifest with one field replaced by any JSON value is parsed or refused, typed."""
    check(data)


HARNESS = fuzz_support.Harness(
    name="manifest",
    one_input=one_input,
    seeds=seeds,
    max_len=32 * 1024,
    structure=fuzz_support.json_structure,
    properties=(field_mutations,),
)

if __name__ == "__main__":
    sys.exit(fuzz_support.main(HARNESS))
