"""Build a release manifest from an ONNX file and the operator's vector files.

The I/O signature and opset are read from the model itself, never typed by a
person, so the manifest cannot disagree with the model it describes; the
reading is :func:`edgeota.runtime.model_signature.read_model_signature`, the
same one the validation gate compares sessions with. Runs on the operator's
machine (``release publish``) and in the demo.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgeota.protocol.bundle import describe_payload
from edgeota.protocol.errors import ManifestError
from edgeota.protocol.manifest import (
    MAX_MANIFEST_SIZE,
    GoldenSet,
    Manifest,
    ValidationVectors,
)
from edgeota.runtime.model_signature import ModelLoadError, read_model_signature

__all__ = ["build_manifest", "external_data_files"]


def external_data_files(model: Path) -> dict[str, Path]:
    """The external-data files ``model`` names, as bundle path -> local file.

    ONNX keeps a large initializer's bytes in a file beside the model (its
    ``location``, relative to the model's folder); a bundle must carry every
    such file under the same name, or the device could not load the model.
    Only plain relative names inside the model's folder are accepted: a
    location that climbs out of it (``..``, an absolute path) is refused,
    as the device would refuse to unpack it.
    """
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as e:
        raise ModelLoadError(f"{model}: onnx cannot load it: {e}") from e
    folder = model.parent.resolve()
    found: dict[str, Path] = {}
    for tensor in _initializers(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data
                         if entry.key == "location"), None)
        if not location:
            raise ModelLoadError(f"{model}: tensor {tensor.name!r} is external but names no file")
        source = (folder / location).resolve()
        if (location.startswith("/") or ".." in location.split("/")
                or not source.is_relative_to(folder)):
            raise ModelLoadError(f"{model}: external data {location!r} of tensor "
                                 f"{tensor.name!r} is outside the model's folder")
        if location == "model.onnx":
            raise ModelLoadError(f"{model}: external data may not be called model.onnx")
        if not source.is_file():
            raise ModelLoadError(f"{model}: external data file {location!r} is missing")
        found[location] = source
    return found


def _initializers(graph: Any) -> Iterator[Any]:
    """Every initializer, including those of subgraphs (If/Loop/Scan bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g.ByteSize():
                yield from _initializers(attribute.g)
            for subgraph in attribute.graphs:
                yield from _initializers(subgraph)


def _load_json(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``; its fields are checked by the caller's ``from_dict``."""
    size = path.stat().st_size
    if size > MAX_MANIFEST_SIZE:
        raise ManifestError(f"{what} file {path} is {size} bytes (limit {MAX_MANIFEST_SIZE})")
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{what} file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{what} file {path} is not a JSON object")
    return data


def build_manifest(
    model: Path,
    *,
    name: str,
    version: str,
    hardware: Sequence[str],
    vectors: Path | None = None,
    golden: Path | None = None,
    min_accuracy: float | None = None,
    latency_budget_ms: float | None = None,
    description: str = "",
) -> Manifest:
    """Describe ``model`` for a release; vector and golden files are parsed and bounded here."""
    external = external_data_files(model)  # before onnxruntime reads those files
    signature = read_model_signature(model)
    validation = ValidationVectors.from_dict(_load_json(vectors, "vectors")) if vectors else None
    golden_set = None
    if golden is not None:
        if min_accuracy is None:
            raise ManifestError("a golden set needs an accuracy floor (--min-accuracy)")
        data = _load_json(golden, "golden set")
        data["min_accuracy"] = min_accuracy
        golden_set = GoldenSet.from_dict(data)
    return Manifest(
        name=name,
        version=version,
        model=describe_payload(model, "model.onnx"),
        external_data=tuple(describe_payload(path, location)
                            for location, path in sorted(external.items())),
        opset=signature.opset,
        inputs=signature.inputs,
        outputs=signature.outputs,
        hardware=tuple(hardware),
        validation=validation,
        golden=golden_set,
        latency_budget_ms=latency_budget_ms,
        description=description,
    )
