"""Train and export the sample ONNX models shipped in ``edgeota.samples``.

Run ``python -m edgeota.samples.train [--out DIR]`` (or this file by path). It trains three
real scikit-learn classifiers on the digits dataset bundled with scikit-learn (no download),
exports them to ONNX with skl2onnx and, next to them, writes everything a device or a test needs
to check a model without scikit-learn:

* ``digits_v1.onnx`` (GaussianNB), ``digits_v2.onnx`` (StandardScaler + MLP) and
  ``digits_bad.onnx`` (a depth-4 decision tree, deliberately poor so a validation gate has
  something to reject);
* ``<model>.vectors.json``: 16 fixed test rows and the outputs *onnxruntime* produced for them,
  so a device can prove its runtime computes what the publisher's did;
* ``digits_golden.json``: 100 fixed test rows with their true labels, shared by all models,
  for an on-device accuracy gate;
* ``digits_test.npz``: the whole test split (X float32 [450, 64], y int64 [450]);
* ``samples.json``: the catalog (what each file is, its accuracy, signature and sha256).

Everything is deterministic (fixed split and ``random_state``; the random graph name skl2onnx
picks is replaced), so re-running on the same library versions rewrites identical files.
scikit-learn and skl2onnx are development dependencies: only this module imports them.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import skl2onnx
import sklearn
from numpy.typing import NDArray
from onnx import version_converter
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.base import BaseEstimator
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

DEFAULT_OUT = Path(__file__).resolve().parent

CATALOG_FORMAT = "edgeota.samples/1"
VECTORS_FORMAT = "edgeota.vectors/1"
GOLDEN_FORMAT = "edgeota.golden/1"

N_FEATURES = 64
N_CLASSES = 10
TEST_SIZE = 0.25
SPLIT_SEED = 42
MODEL_SEED = 0
# Fixed rows of the test split: the first 16 become validation vectors, the first 100 the
# golden set. The split is shuffled and stratified, so these are a fair sample of all digits.
VECTOR_ROWS = 16
GOLDEN_ROWS = 100
# The default (ai.onnx) opset every model declares, and the ceiling for ai.onnx.ml. skl2onnx
# only imports the lowest opset a graph needs, so lower ones are upgraded with the ONNX version
# converter: one declared opset for all samples keeps runtime compatibility checks simple.
OPSET = 17
TARGET_OPSET = {"": OPSET, "ai.onnx.ml": 3}
ATOL = 1e-4
RTOL = 1e-3

INPUT_NAME = "input"
LABEL_OUTPUT = "label"
PROBA_OUTPUT = "probabilities"
SIGNATURE: dict[str, list[dict[str, Any]]] = {
    "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [None, N_FEATURES]}],
    "outputs": [
        {"name": LABEL_OUTPUT, "datatype": "INT64", "shape": [None]},
        {"name": PROBA_OUTPUT, "datatype": "FP32", "shape": [None, N_CLASSES]},
    ],
}


@dataclass(frozen=True)
class ModelSpec:
    """One sample model: its catalog key, semantic version and how to build the estimator."""

    key: str
    version: str
    role: str
    description: str
    build: Callable[[], BaseEstimator]


def _gaussian_nb() -> BaseEstimator:
    return GaussianNB()


def _mlp() -> BaseEstimator:
    # One hidden layer of 64 keeps the file around 20 KiB; 500 iterations is well past
    # convergence (adam stops on its own tolerance long before).
    return Pipeline(
        [
            ("scaler", StandardScaler()),
            (
                "mlp",
                MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=MODEL_SEED),
            ),
        ]
    )


def _bad_tree() -> BaseEstimator:
    return DecisionTreeClassifier(max_depth=4, random_state=MODEL_SEED)


MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        "digits_v1", "1.0.0", "baseline", "Gaussian naive Bayes on raw 8x8 pixels", _gaussian_nb
    ),
    ModelSpec(
        "digits_v2", "2.0.0", "upgrade", "StandardScaler + MLP (one hidden layer of 64)", _mlp
    ),
    ModelSpec(
        "digits_bad",
        "3.0.0-bad",
        "bad",
        "Depth-4 decision tree: deliberately poor, a validation gate must reject it",
        _bad_tree,
    ),
)


def load_split() -> tuple[
    NDArray[np.float32], NDArray[np.float32], NDArray[np.int64], NDArray[np.int64]
]:
    """The digits data (raw 0..16 pixel values as float32) split 75/25, stratified."""
    digits = load_digits()
    x = np.ascontiguousarray(digits.data, dtype=np.float32)
    y = np.ascontiguousarray(digits.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y
    )
    return x_train, x_test, y_train, y_test


def _final_estimator(model: BaseEstimator) -> BaseEstimator:
    return model.steps[-1][1] if isinstance(model, Pipeline) else model


def _opsets(onx: onnx.ModelProto) -> dict[str, int]:
    opsets: dict[str, int] = {}
    for entry in onx.opset_import:
        opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    return opsets


def export_onnx(model: BaseEstimator, spec: ModelSpec) -> onnx.ModelProto:
    """Convert a fitted classifier to the sample contract and stamp name/version into it."""
    onx: onnx.ModelProto = convert_sklearn(  # skl2onnx is untyped; it returns a ModelProto
        model,
        initial_types=[(INPUT_NAME, FloatTensorType([None, N_FEATURES]))],
        options={id(_final_estimator(model)): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    outputs = [o.name for o in onx.graph.output]
    if outputs != [LABEL_OUTPUT, PROBA_OUTPUT]:
        raise RuntimeError(f"{spec.key}: unexpected ONNX outputs {outputs}")

    if _opsets(onx).get("", 0) < OPSET:
        onx = version_converter.convert_version(onx, OPSET)
    # skl2onnx may list a domain twice (seen for trees) and the version converter emits the
    # domains in no fixed order: keep one entry per domain, sorted, so the bytes are stable.
    opsets = _opsets(onx)
    del onx.opset_import[:]
    for domain in sorted(opsets):
        onx.opset_import.add(domain=domain, version=opsets[domain])

    name, _, _ = spec.key.partition("_")
    estimator = type(_final_estimator(model)).__name__
    # skl2onnx names the graph with a random uuid; a fixed name makes the bytes reproducible.
    onx.graph.name = spec.key
    onx.doc_string = (
        f"{name} {spec.version}: {spec.description}. edgeota sample trained on "
        "sklearn.datasets.load_digits (input: raw 0..16 pixels as float32 [N, 64])."
    )
    onx.model_version = int(spec.version.split(".")[0])
    del onx.metadata_props[:]
    for key, value in (
        ("name", name),
        ("version", spec.version),
        ("sample", spec.key),
        ("estimator", estimator),
        ("dataset", "sklearn.datasets.load_digits"),
    ):
        onx.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(onx, full_check=True)
    return onx


def _f32_list(values: NDArray[Any]) -> list[float]:
    # str() of a numpy float32 is the shortest text that reads back as the same float32,
    # which keeps the JSON small and exact.
    return [float(str(v)) for v in np.asarray(values, dtype=np.float32).ravel()]


def _tensor(name: str, array: NDArray[Any]) -> dict[str, Any]:
    if array.dtype == np.float32:
        datatype, data = "FP32", _f32_list(array)
    elif array.dtype == np.int64:
        datatype, data = "INT64", [int(v) for v in array.ravel()]
    else:
        raise TypeError(f"{name}: unsupported dtype {array.dtype}")
    return {"name": name, "datatype": datatype, "shape": list(array.shape), "data": data}


def _write_json(path: Path, doc: dict[str, Any], *, indent: int | None = None) -> None:
    separators = (",", ":") if indent is None else None
    path.write_text(json.dumps(doc, indent=indent, separators=separators) + "\n")


def _write_npz(path: Path, arrays: dict[str, NDArray[Any]]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps, so the bytes are stable."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def _predict(
    session: ort.InferenceSession, x: NDArray[np.float32]
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    label, proba = session.run([LABEL_OUTPUT, PROBA_OUTPUT], {INPUT_NAME: x})
    return np.asarray(label), np.asarray(proba)


def recommended_min_accuracy(test_accuracy: float) -> float:
    """Three points below the measured accuracy, rounded down to a whole percent."""
    return math.floor(round(test_accuracy * 100 - 3, 6)) / 100


def train_all(out: Path) -> dict[str, Any]:
    """Train, export and measure every sample model into ``out``; returns the catalog."""
    out.mkdir(parents=True, exist_ok=True)
    x_train, x_test, y_train, y_test = load_split()

    _write_npz(out / "digits_test.npz", {"X": x_test, "y": y_test})
    golden_x, golden_y = x_test[:GOLDEN_ROWS], y_test[:GOLDEN_ROWS]
    _write_json(
        out / "digits_golden.json",
        {
            "format": GOLDEN_FORMAT,
            "inputs": [_tensor(INPUT_NAME, golden_x)],
            "label_output": LABEL_OUTPUT,
            "labels": [int(v) for v in golden_y],
        },
    )

    models: dict[str, Any] = {}
    for spec in MODELS:
        model = spec.build().fit(x_train, y_train)
        onx = export_onnx(model, spec)
        onnx_file = out / f"{spec.key}.onnx"
        onnx_file.write_bytes(onx.SerializeToString())
        blob = onnx_file.read_bytes()

        # Every number recorded below comes from onnxruntime running the written file,
        # which is what a device will run, not from scikit-learn.
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        labels, _ = _predict(session, x_test)
        agreement = float(np.mean(labels == model.predict(x_test)))
        if agreement < 0.99:
            raise RuntimeError(f"{spec.key}: ONNX agrees with scikit-learn on {agreement:.2%}")
        test_accuracy = round(float(np.mean(labels == y_test)), 4)
        golden_accuracy = round(float(np.mean(_predict(session, golden_x)[0] == golden_y)), 4)

        vec_x = x_test[:VECTOR_ROWS]
        vec_label, vec_proba = _predict(session, vec_x)
        vectors_file = f"{spec.key}.vectors.json"
        _write_json(
            out / vectors_file,
            {
                "format": VECTORS_FORMAT,
                "inputs": [_tensor(INPUT_NAME, vec_x)],
                "outputs": [
                    _tensor(LABEL_OUTPUT, vec_label.astype(np.int64)),
                    _tensor(PROBA_OUTPUT, vec_proba.astype(np.float32)),
                ],
                "atol": ATOL,
                "rtol": RTOL,
            },
        )

        name = {p.key: p.value for p in onx.metadata_props}["name"]
        models[spec.key] = {
            "file": onnx_file.name,
            "name": name,
            "version": spec.version,
            "role": spec.role,
            "description": spec.description,
            "estimator": type(_final_estimator(model)).__name__,
            "test_accuracy": test_accuracy,
            "golden_accuracy": golden_accuracy,
            "recommended_min_accuracy": recommended_min_accuracy(test_accuracy),
            "opset": OPSET,
            "inputs": SIGNATURE["inputs"],
            "outputs": SIGNATURE["outputs"],
            "vectors": vectors_file,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "size": len(blob),
        }

    catalog = {
        "format": CATALOG_FORMAT,
        "dataset": {
            "source": "sklearn.datasets.load_digits",
            "features": N_FEATURES,
            "classes": N_CLASSES,
            "input": "raw 8x8 pixel intensities 0..16 as float32, no scaling outside the model",
            "split": {
                "function": "sklearn.model_selection.train_test_split",
                "test_size": TEST_SIZE,
                "random_state": SPLIT_SEED,
                "stratify": True,
            },
            "n_train": len(y_train),
            "n_test": len(y_test),
            "test_file": "digits_test.npz",
            "golden_file": "digits_golden.json",
            "golden_rows": [0, GOLDEN_ROWS],
            "vector_rows": [0, VECTOR_ROWS],
        },
        "trained_with": {
            "scikit-learn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "models": models,
    }
    _write_json(out / "samples.json", catalog, indent=2)
    return catalog


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgeota.samples.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output folder (default: the package folder, {DEFAULT_OUT})",
    )
    args = parser.parse_args(argv)
    catalog = train_all(args.out)
    for key, entry in catalog["models"].items():
        print(
            f"{key:<11} {entry['estimator']:<23} v{entry['version']:<10} "
            f"test={entry['test_accuracy']:.4f} golden={entry['golden_accuracy']:.2f} "
            f"min={entry['recommended_min_accuracy']:.2f} {entry['size']:>7} B"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
