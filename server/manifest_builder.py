"""Build a release manifest from an ONNX file and the operator's vector files.

The I/O signature and opset are read from the model itself, never typed by a
person, so the manifest cannot disagree with the model it describes. Runs on
the operator's machine (``release publish``) and in the demo.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeota.protocol.bundle import describe_payload
from edgeota.protocol.errors import ManifestError
from edgeota.protocol.manifest import (
    MAX_MANIFEST_SIZE,
    ONNXRUNTIME_TYPES,
    GoldenSet,
    Manifest,
    TensorSpec,
    ValidationVectors,
)

__all__ = ["ModelSignature", "build_manifest", "datatype_for_onnx_type", "read_model_signature"]



class ModelLoadError(ManifestError):
    """The file is not an ONNX model onnxruntime can load."""


def datatype_for_onnx_type(ort_type: str) -> str:
    """Map an onnxruntime type string such as ``tensor(float)`` to ``FP32``."""
    try:
        return ONNXRUNTIME_TYPES[ort_type]
    except KeyError as e:
        raise ManifestError(
            f"unsupported tensor type {ort_type!r} (sequences and maps are not "
            "served; export with zipmap disabled)"
        ) from e


@dataclass(frozen=True)
class ModelSignature:
    """What a model declares: its inputs, outputs and default-domain opset."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int


def read_model_signature(model: Path) -> ModelSignature:
    """Load ``model`` in onnxruntime (as a device would) and read its signature."""
    import onnx
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as e:
        raise ModelLoadError(f"{model}: onnxruntime cannot load it: {e}") from e

    def spec(node: ort.NodeArg) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else None for d in node.shape)
        return TensorSpec(node.name, datatype_for_onnx_type(node.type), shape)

    opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not opsets:
        raise ModelLoadError(f"{model}: declares no default-domain opset")
    return ModelSignature(
        inputs=tuple(spec(n) for n in session.get_inputs()),
        outputs=tuple(spec(n) for n in session.get_outputs()),
        opset=opsets[0],
    )


def _load_json(path: Path, what: str) -> dict:
    size = path.stat().st_size
    if size > MAX_MANIFEST_SIZE:
        raise ManifestError(f"{what} file {path} is {size} bytes (limit {MAX_MANIFEST_SIZE})")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{what} file {path} is not valid JSON: {e}") from e


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
        opset=signature.opset,
        inputs=signature.inputs,
        outputs=signature.outputs,
        hardware=tuple(hardware),
        validation=validation,
        golden=golden_set,
        latency_budget_ms=latency_budget_ms,
        description=description,
    )
