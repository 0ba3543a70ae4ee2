"""Sample ONNX models, validation vectors and test data shipped with edgeota.

The tests, the demo and the fleet simulator need real models to sign, push, validate and
hot-swap, and they need to know what each model *is* (version, accuracy, I/O signature) without
retraining it. This package carries those files as package data and describes them in
``samples.json``, written by ``python -m edgeota.samples.train``:

* ``digits_v1.onnx`` / ``digits_v2.onnx``: a baseline and a better upgrade;
* ``digits_bad.onnx``: a deliberately poor model that a validation gate must reject;
* ``<model>.vectors.json``, ``digits_golden.json``, ``digits_test.npz``: data to check a
  model on a device (see :mod:`edgeota.samples.train` for the formats).

Importing this package is cheap on purpose: it pulls in neither scikit-learn nor skl2onnx
(development-only, used by ``train``) nor numpy/onnxruntime (imported only by the functions
that need them), so the base install can still locate the files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import ArrayLike, NDArray

__all__ = [
    "CATALOG_FILE",
    "CATALOG_FORMAT",
    "GOLDEN_FORMAT",
    "SAMPLES_DIR",
    "VECTORS_FORMAT",
    "SampleModel",
    "TensorSpec",
    "accuracy",
    "available_files",
    "load_catalog",
    "load_test_split",
    "sample_path",
]

#: The folder holding the sample files. The package is installed as plain files (never from a
#: zip), and onnxruntime wants a real file path, so the module's own folder is the simplest
#: correct answer (``importlib.resources`` would hand back the same directory).
SAMPLES_DIR: Path = Path(__file__).resolve().parent

CATALOG_FILE = "samples.json"
CATALOG_FORMAT = "edgeota.samples/1"
VECTORS_FORMAT = "edgeota.vectors/1"
GOLDEN_FORMAT = "edgeota.golden/1"
TEST_SPLIT_FILE = "digits_test.npz"

_DATA_SUFFIXES = (".onnx", ".json", ".npz")


def available_files() -> list[str]:
    """The data files present in :data:`SAMPLES_DIR` (models, vectors, catalog), sorted."""
    return sorted(
        p.name for p in SAMPLES_DIR.iterdir() if p.is_file() and p.suffix in _DATA_SUFFIXES
    )


def sample_path(name: str) -> Path:
    """Path of the sample file ``name`` (e.g. ``"digits_v1.onnx"``).

    Only plain file names inside the package are accepted, so a caller cannot be steered to a
    file elsewhere. Raises :class:`FileNotFoundError` naming the files that do exist, because
    the usual cause is a typo or a package installed without its data.
    """
    path = SAMPLES_DIR / name
    if not name or Path(name).name != name or name in {".", ".."} or not path.is_file():
        listing = ", ".join(available_files()) or "none (was the package data installed?)"
        raise FileNotFoundError(f"no sample file {name!r} in {SAMPLES_DIR}; available: {listing}")
    return path


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, Open Inference Protocol datatype, shape.

    ``None`` in ``shape`` is a dimension of any size (the batch).
    """

    name: str
    datatype: str
    shape: tuple[int | None, ...]

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TensorSpec:
        return cls(
            name=str(doc["name"]),
            datatype=str(doc["datatype"]),
            shape=tuple(None if d is None else int(d) for d in doc["shape"]),
        )


@dataclass(frozen=True)
class SampleModel:
    """What ``samples.json`` says about one sample model.

    Accuracies were measured with onnxruntime on the exported file (not with scikit-learn), so
    a device running the same file should find the same numbers. ``recommended_min_accuracy``
    is a gate threshold for replacing *this* model; a gate should judge a candidate against the
    threshold of the model it would replace, not the candidate's own.
    """

    key: str
    file: str
    name: str
    version: str
    role: str
    estimator: str
    test_accuracy: float
    golden_accuracy: float
    recommended_min_accuracy: float
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    vectors: str
    sha256: str
    size: int

    @property
    def path(self) -> Path:
        """The ``.onnx`` file."""
        return sample_path(self.file)

    @property
    def vectors_path(self) -> Path:
        """The validation-vector file (``edgeota.vectors/1``)."""
        return sample_path(self.vectors)

    @classmethod
    def from_json(cls, key: str, doc: dict[str, Any]) -> SampleModel:
        return cls(
            key=key,
            file=str(doc["file"]),
            name=str(doc["name"]),
            version=str(doc["version"]),
            role=str(doc["role"]),
            estimator=str(doc["estimator"]),
            test_accuracy=float(doc["test_accuracy"]),
            golden_accuracy=float(doc["golden_accuracy"]),
            recommended_min_accuracy=float(doc["recommended_min_accuracy"]),
            opset=int(doc["opset"]),
            inputs=tuple(TensorSpec.from_json(t) for t in doc["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in doc["outputs"]),
            vectors=str(doc["vectors"]),
            sha256=str(doc["sha256"]),
            size=int(doc["size"]),
        )


def load_catalog() -> dict[str, SampleModel]:
    """The sample models described by ``samples.json``, keyed like ``"digits_v1"``.

    Read fresh on each call (it is a few KiB) so a re-run of ``train`` is seen at once.
    """
    doc = json.loads(sample_path(CATALOG_FILE).read_text())
    if doc.get("format") != CATALOG_FORMAT:
        raise ValueError(
            f"{CATALOG_FILE}: format {doc.get('format')!r}, expected {CATALOG_FORMAT!r}"
        )
    return {key: SampleModel.from_json(key, entry) for key, entry in doc["models"].items()}


def load_test_split() -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The digits test split, ``X`` float32 [450, 64] (raw 0..16 pixels) and ``y`` int64.

    Shipped as an ``.npz`` so devices and the demo can measure accuracy without scikit-learn.
    """
    import numpy as np  # numpy is an agent dependency, not a base one

    with np.load(sample_path(TEST_SPLIT_FILE), allow_pickle=False) as data:
        x = np.asarray(data["X"], dtype=np.float32)
        y = np.asarray(data["y"], dtype=np.int64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"{TEST_SPLIT_FILE}: bad shapes X{x.shape} y{y.shape}")
    return x, y


def accuracy(
    model_path: str | os.PathLike[str],
    x: ArrayLike,
    y: ArrayLike,
    *,
    label_output: str = "label",
) -> float:
    """Fraction of rows of ``x`` whose ``label_output`` equals ``y``, run in onnxruntime.

    Uses onnxruntime on the CPU, i.e. what a device runs, so the result is comparable with
    ``SampleModel.test_accuracy``. The model must have exactly one input.
    """
    import numpy as np  # agent dependencies, kept out of the package import
    import onnxruntime as ort

    xs = np.asarray(x, dtype=np.float32)
    ys = np.asarray(y).reshape(-1)
    if xs.ndim != 2 or xs.shape[0] != ys.shape[0] or ys.shape[0] == 0:
        raise ValueError(f"need X [N, features] and y [N] with N > 0, got {xs.shape}, {ys.shape}")
    session = ort.InferenceSession(os.fspath(model_path), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"{model_path}: expected one input, found {[i.name for i in inputs]}")
    (labels,) = session.run([label_output], {inputs[0].name: xs})
    return float(np.mean(np.asarray(labels).reshape(-1) == ys))
