"""Manifest schema: strict parsing at the boundary, canonical bytes, built from real models."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from edgeota.protocol.errors import ManifestError
from edgeota.protocol.manifest import MAX_MANIFEST_SIZE, Manifest, Tensor, TensorSpec
from edgeota.runtime.model_signature import read_model_signature
from edgeota.samples import load_catalog, sample_path
from edgeota.server.manifest_builder import build_manifest


@pytest.fixture(scope="module")
def v2_manifest() -> Manifest:
    sample = load_catalog()["digits_v2"]
    return build_manifest(
        sample.path, name="digits", version="2.0.0", hardware=["rpi4", "rpi5"],
        vectors=sample.vectors_path, golden=sample_path("digits_golden.json"),
        min_accuracy=0.94, latency_budget_ms=25.0,
    )


def test_signature_is_read_from_the_model_itself() -> None:
    sample = load_catalog()["digits_v1"]
    signature = read_model_signature(sample.path)
    assert signature.opset == sample.opset == 17
    assert signature.inputs == (TensorSpec("input", "FP32", (None, 64)),)
    assert [o.name for o in signature.outputs] == ["label", "probabilities"]
    assert signature.outputs[1] == TensorSpec("probabilities", "FP32", (None, 10))


def test_json_round_trip_is_canonical(v2_manifest: Manifest) -> None:
    raw = v2_manifest.to_json()
    again = Manifest.from_json(raw)
    assert again == v2_manifest
    assert again.to_json() == raw
    assert v2_manifest.golden is not None and len(v2_manifest.golden.labels) == 100
    assert v2_manifest.validation is not None and v2_manifest.validation.atol > 0


def _mutated(manifest: Manifest, path: list[Any], value: Any) -> bytes:
    data = copy.deepcopy(manifest.to_dict())
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["format"], "edgeota.manifest/9", "is not edgeota.manifest/1"),
        (["name"], "Digits!", "does not match"),
        (["version"], "1.0", "does not match"),
        (["version"], KeyError, "lacks version"),
        (["hardware"], [], "at least one hardware id"),
        (["hardware"], ["RPI 4"], "does not match"),
        (["model", "sha256"], "abc", "does not match"),
        (["model", "path"], "../model.onnx", "does not match"),
        (["model", "size"], -1, "integer >= 0"),
        (["opset"], 0, "integer >= 1"),
        (["inputs", 0, "datatype"], "FLOAT", "not an OIP v2 type"),
        (["surprise"], 1, "unknown field"),
        (["validation", "atol"], float("nan"), "finite number"),
        (["validation", "inputs", 0, "data"], [1.0], "values, shape needs"),
        (["validation", "inputs", 0, "data", 0], "x", "not FP32"),
        (["validation", "inputs", 0, "data", 5], True, "holds True, not FP32"),
        (["golden", "inputs", 0, "data", 63], None, "holds None, not FP32"),
        (["validation", "outputs", 1, "data", 0], float("nan"), "must be finite"),
        (["golden", "labels"], [1, 2], "labels for 100 input rows"),
        (["golden", "min_accuracy"], 1.5, "at most 1.0"),
        (["latency_budget_ms"], -3, ">= 0"),
    ],
)
def test_invalid_manifests_are_refused_with_a_reason(
    v2_manifest: Manifest, path: list[Any], value: Any, message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(_mutated(v2_manifest, path, value))


def test_not_json_and_oversize() -> None:
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.from_json(b"{nope")
    with pytest.raises(ManifestError, match="limit"):
        Manifest.from_json(b" " * (MAX_MANIFEST_SIZE + 1))


def test_constructing_an_invalid_manifest_in_code_fails_too(v2_manifest: Manifest) -> None:
    with pytest.raises(ManifestError):
        Manifest(name="x", version="not-semver", model=v2_manifest.model, opset=17,
                 inputs=v2_manifest.inputs, outputs=v2_manifest.outputs, hardware=("hw",))


def test_golden_set_needs_an_accuracy_floor() -> None:
    sample = load_catalog()["digits_v1"]
    with pytest.raises(ManifestError, match="--min-accuracy"):
        build_manifest(sample.path, name="digits", version="1.0.0", hardware=["hw"],
                       golden=sample_path("digits_golden.json"))


def test_a_non_model_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"not an onnx graph")
    with pytest.raises(ManifestError, match="cannot load"):
        build_manifest(fake, name="x", version="1.0.0", hardware=["hw"])


@pytest.mark.parametrize(
    ("datatype", "data", "accepted"),
    [
        ("FP32", [1, 2.5, -0.0], True),
        ("FP32", [1.0, False], False),
        ("FP32", [1.0, float("nan")], False),
        ("FP64", [float("inf")], False),
        ("INT64", [1, 2], True),
        ("INT64", [1, 2.0], False),
        ("INT64", [True, 1], False),
        ("BOOL", [True, False], True),
        ("BOOL", [True, 1], False),
        ("BYTES", ["a", "b"], True),
        ("BYTES", ["a", b"b"], False),
    ],
)
def test_tensor_values_must_be_of_the_datatype(datatype: str, data: list[Any],
                                               accepted: bool) -> None:
    raw = {"name": "t", "datatype": datatype, "shape": [len(data)], "data": data}
    if accepted:
        assert Tensor.from_dict(raw, "t").data == tuple(data)
    else:
        with pytest.raises(ManifestError, match=f"not {datatype}|must be finite"):
            Tensor.from_dict(raw, "t")


def test_tensor_values_of_a_subclass_take_the_per_value_check() -> None:
    class Weight(float):
        pass

    class Flag(int):
        pass

    raw = {"name": "t", "datatype": "FP32", "shape": [2], "data": [Weight(0.5), 1.0]}
    assert Tensor.from_dict(raw, "t").data == (0.5, 1.0)
    with pytest.raises(ManifestError, match="not BOOL"):
        Tensor.from_dict({"name": "t", "datatype": "BOOL", "shape": [1], "data": [Flag(1)]}, "t")
