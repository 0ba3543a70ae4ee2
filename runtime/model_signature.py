"""A model's I/O signature as onnxruntime sees it: one reading for both sides.

The manifest builder writes a model's inputs and outputs into the release
manifest (on the operator's machine); the validation gate compares a loaded
session's inputs and outputs with that manifest (on the device and on the
server). Both go through :func:`tensor_spec`, so a model cannot pass one and
fail the other because of how a dimension or a type was read.

onnxruntime is part of the device install; ``onnx`` is not (it comes with the
server extra). Only :func:`read_model_signature`, which also reads the opset
from the model's protobuf, needs it, and imports it when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from edgeota.protocol.errors import ManifestError
from edgeota.protocol.manifest import ONNXRUNTIME_TYPES, TensorSpec

__all__ = [
    "ModelLoadError",
    "ModelSignature",
    "UnsupportedTensorError",
    "read_model_signature",
    "tensor_spec",
]


class ModelLoadError(ManifestError):
    """The file is not an ONNX model onnxruntime (or onnx) can load."""


class UnsupportedTensorError(ManifestError):
    """An input or output of a type that is not served (maps, sequences)."""


@dataclass(frozen=True)
class ModelSignature:
    """What a model declares: its inputs, outputs and default-domain opset."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int


def tensor_spec(node: ort.NodeArg) -> TensorSpec:
    """One session input or output as a :class:`TensorSpec`.

    Symbolic and unknown dimensions become ``None`` (any size).

    Raises:
        UnsupportedTensorError: the type has no Open Inference Protocol datatype.
    """
    datatype = ONNXRUNTIME_TYPES.get(node.type)
    if datatype is None:
        raise UnsupportedTensorError(
            f"{node.name!r} has type {node.type}, which is not served (maps, sequences; "
            "export classifiers with zipmap disabled)"
        )
    shape = node.shape if isinstance(node.shape, Sequence) else ()
    dims = tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)
    return TensorSpec(node.name, datatype, dims)


def read_model_signature(model: Path) -> ModelSignature:
    """Load ``model`` in onnxruntime (as a device would) and read its signature and opset.

    Raises:
        ModelLoadError: onnxruntime or onnx cannot load the file, or it declares no
            default-domain opset.
        UnsupportedTensorError: an input or output is not a tensor the device serves.
    """
    import onnx  # server extra only: never imported by the device

    try:
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as e:  # onnxruntime raises its own untyped family
        raise ModelLoadError(f"{model}: onnxruntime cannot load it: {e}") from e
    opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not opsets:
        raise ModelLoadError(f"{model}: declares no default-domain opset")
    return ModelSignature(
        inputs=tuple(tensor_spec(n) for n in session.get_inputs()),
        outputs=tuple(tensor_spec(n) for n in session.get_outputs()),
        opset=opsets[0],
    )
