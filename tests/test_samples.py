"""The committed sample models and data are what samples.json says they are.

Everything here runs the committed files in onnxruntime, as a device would; the last test
re-runs the training script (needs scikit-learn) and checks it reproduces the same models.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeota import samples
from edgeota.samples import SampleModel, TensorSpec

MODEL_KEYS = ("digits_v1", "digits_v2", "digits_bad")
ORT_TYPES = {"FP32": "tensor(float)", "INT64": "tensor(int64)"}
NP_TYPES = {"FP32": np.float32, "INT64": np.int64}
# The contract every sample model follows, stated here independently of samples.json.
EXPECTED_INPUTS = (TensorSpec("input", "FP32", (None, 64)),)
EXPECTED_OUTPUTS = (
    TensorSpec("label", "INT64", (None,)),
    TensorSpec("probabilities", "FP32", (None, 10)),
)
EXPECTED_VERSIONS = {"digits_v1": "1.0.0", "digits_v2": "2.0.0", "digits_bad": "3.0.0-bad"}
HAVE_TRAINING_DEPS = all(importlib.util.find_spec(m) for m in ("sklearn", "skl2onnx"))


@pytest.fixture(scope="module")
def catalog() -> dict[str, SampleModel]:
    return samples.load_catalog()


@pytest.fixture(scope="module")
def catalog_doc() -> dict[str, Any]:
    return json.loads(samples.sample_path("samples.json").read_text())


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    return samples.load_test_split()


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_signature(path: Path) -> dict[str, list[tuple[str, str, tuple[int | None, ...]]]]:
    """Names, element types and shapes as onnxruntime sees them; symbolic dims become None."""

    def norm(args: list[Any]) -> list[tuple[str, str, tuple[int | None, ...]]]:
        return [
            (a.name, a.type, tuple(d if isinstance(d, int) else None for d in a.shape))
            for a in args
        ]

    sess = _session(path)
    return {"inputs": norm(sess.get_inputs()), "outputs": norm(sess.get_outputs())}


def _expected_signature(specs: tuple[TensorSpec, ...]) -> list[tuple[str, str, tuple]]:
    return [(t.name, ORT_TYPES[t.datatype], t.shape) for t in specs]


def _opsets(path: Path) -> dict[str, int]:
    return {o.domain: o.version for o in onnx.load(str(path)).opset_import}


def _tensor(doc: dict[str, Any]) -> np.ndarray:
    array = np.asarray(doc["data"], dtype=NP_TYPES[doc["datatype"]])
    assert array.size == int(np.prod(doc["shape"])), doc["name"]
    return array.reshape(doc["shape"])


# --- catalog and files -------------------------------------------------------------------


def test_catalog_lists_the_three_models(catalog: dict[str, SampleModel]) -> None:
    assert set(catalog) == set(MODEL_KEYS)
    for key, model in catalog.items():
        assert model.file == f"{key}.onnx"
        assert model.vectors == f"{key}.vectors.json"
        assert model.name == "digits"
        assert model.version == EXPECTED_VERSIONS[key]
        assert model.opset == 17
        assert model.inputs == EXPECTED_INPUTS
        assert model.outputs == EXPECTED_OUTPUTS


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_file_matches_sha256_and_size(catalog: dict[str, SampleModel], key: str) -> None:
    model = catalog[key]
    blob = model.path.read_bytes()
    assert len(blob) == model.size
    assert hashlib.sha256(blob).hexdigest() == model.sha256
    assert model.size < 1024 * 1024


def test_folder_stays_small() -> None:
    total = sum(samples.sample_path(n).stat().st_size for n in samples.available_files())
    assert total < 1.5 * 1024 * 1024


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_io_signature_in_onnxruntime(catalog: dict[str, SampleModel], key: str) -> None:
    model = catalog[key]
    signature = _ort_signature(model.path)
    assert signature["inputs"] == _expected_signature(model.inputs)
    assert signature["outputs"] == _expected_signature(model.outputs)


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_opset_and_metadata(catalog: dict[str, SampleModel], key: str) -> None:
    model = catalog[key]
    proto = onnx.load(str(model.path))
    onnx.checker.check_model(proto)
    default_opsets = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    assert default_opsets == [model.opset]
    assert _opsets(model.path).get("ai.onnx.ml", 1) <= 3
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["name"] == model.name
    assert meta["version"] == model.version
    assert meta["estimator"] == model.estimator
    # The same metadata is what an agent reads through onnxruntime.
    assert _session(model.path).get_modelmeta().custom_metadata_map["version"] == model.version


# --- accuracy ----------------------------------------------------------------------------


def test_test_split_shape_and_balance(catalog_doc: dict[str, Any], test_split) -> None:
    x, y = test_split
    assert x.dtype == np.float32
    assert y.dtype == np.int64
    assert x.shape == (catalog_doc["dataset"]["n_test"], 64) == (450, 64)
    assert y.shape == (450,)
    assert x.min() == 0.0
    assert x.max() == 16.0  # raw pixels, not scaled
    counts = np.bincount(y, minlength=10)
    assert counts.min() >= 43
    assert counts.max() <= 46  # stratified


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_accuracy_matches_catalog(catalog: dict[str, SampleModel], test_split, key: str) -> None:
    model = catalog[key]
    x, y = test_split
    assert samples.accuracy(model.path, x, y) == pytest.approx(model.test_accuracy, abs=1e-4)


def test_accuracy_ranges(catalog: dict[str, SampleModel]) -> None:
    v1, v2, bad = (catalog[k].test_accuracy for k in MODEL_KEYS)
    assert 0.80 <= v1 <= 0.90
    assert v2 >= 0.95
    assert bad <= 0.65
    # The bad model must fail the gate of either model it could replace.
    assert bad < catalog["digits_v1"].recommended_min_accuracy
    assert bad < catalog["digits_v2"].recommended_min_accuracy
    assert v2 >= catalog["digits_v1"].recommended_min_accuracy


def test_accuracy_counts_wrong_labels(catalog: dict[str, SampleModel], test_split) -> None:
    x, y = test_split
    path = catalog["digits_v2"].path
    assert samples.accuracy(path, x, (y + 1) % 10) < 0.05
    with pytest.raises(ValueError, match="N > 0"):
        samples.accuracy(path, x, y[:-1])


# --- vectors and golden set --------------------------------------------------------------


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_vectors_format_and_reproduction(
    catalog: dict[str, SampleModel], catalog_doc: dict[str, Any], test_split, key: str
) -> None:
    model = catalog[key]
    doc = json.loads(model.vectors_path.read_text())
    assert list(doc) == ["format", "inputs", "outputs", "atol", "rtol"]
    assert doc["format"] == samples.VECTORS_FORMAT == "edgeota.vectors/1"
    assert (doc["atol"], doc["rtol"]) == (1e-4, 1e-3)
    for tensor in (*doc["inputs"], *doc["outputs"]):
        assert list(tensor) == ["name", "datatype", "shape", "data"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in doc["inputs"]] == [
        ("input", "FP32", [16, 64])
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in doc["outputs"]] == [
        ("label", "INT64", [16]),
        ("probabilities", "FP32", [16, 10]),
    ]

    x = _tensor(doc["inputs"][0])
    start, stop = catalog_doc["dataset"]["vector_rows"]
    np.testing.assert_array_equal(x, test_split[0][start:stop])

    expected = {t["name"]: _tensor(t) for t in doc["outputs"]}
    label, proba = _session(model.path).run(["label", "probabilities"], {"input": x})
    np.testing.assert_array_equal(label, expected["label"])
    np.testing.assert_allclose(proba, expected["probabilities"], atol=doc["atol"], rtol=doc["rtol"])
    np.testing.assert_allclose(expected["probabilities"].sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(expected["probabilities"].argmax(axis=1), expected["label"])


def test_golden_set_matches_test_split(catalog_doc: dict[str, Any], test_split) -> None:
    dataset = catalog_doc["dataset"]
    doc = json.loads(samples.sample_path(dataset["golden_file"]).read_text())
    assert list(doc) == ["format", "inputs", "label_output", "labels"]
    assert doc["format"] == samples.GOLDEN_FORMAT == "edgeota.golden/1"
    assert doc["label_output"] == "label"
    (tensor,) = doc["inputs"]
    assert (tensor["name"], tensor["datatype"], tensor["shape"]) == ("input", "FP32", [100, 64])

    start, stop = dataset["golden_rows"]
    assert stop - start == 100
    x, y = test_split
    np.testing.assert_array_equal(_tensor(tensor), x[start:stop])
    assert doc["labels"] == y[start:stop].tolist()
    assert set(doc["labels"]) == set(range(10))


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_golden_accuracy_matches_catalog(
    catalog: dict[str, SampleModel], catalog_doc: dict[str, Any], key: str
) -> None:
    doc = json.loads(samples.sample_path(catalog_doc["dataset"]["golden_file"]).read_text())
    x = _tensor(doc["inputs"][0])
    measured = samples.accuracy(catalog[key].path, x, doc["labels"])
    assert measured == pytest.approx(catalog[key].golden_accuracy, abs=1e-4)


# --- package API -------------------------------------------------------------------------


def test_sample_path_errors_list_available_files() -> None:
    assert samples.sample_path("digits_v1.onnx") == samples.SAMPLES_DIR / "digits_v1.onnx"
    with pytest.raises(FileNotFoundError, match=r"digits_v1\.onnx") as info:
        samples.sample_path("digits_v9.onnx")
    assert "digits_v9.onnx" in str(info.value)
    for escape in ("../pyproject.toml", "..", "", "sub/digits_v1.onnx"):
        with pytest.raises(FileNotFoundError):
            samples.sample_path(escape)


def test_import_does_not_pull_heavy_dependencies() -> None:
    code = (
        "import sys, edgeota.samples as s; s.load_catalog(); "
        "print(sorted(m for m in ('sklearn', 'skl2onnx', 'onnx', 'onnxruntime', 'numpy') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


# --- the script reproduces the committed models -----------------------------------------


@pytest.mark.skipif(not HAVE_TRAINING_DEPS, reason="needs scikit-learn and skl2onnx (dev extra)")
def test_train_script_reproduces_committed_models(
    tmp_path: Path, catalog: dict[str, SampleModel], test_split
) -> None:
    subprocess.run(
        [sys.executable, "-m", "edgeota.samples.train", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    fresh = json.loads((tmp_path / "samples.json").read_text())
    assert set(fresh["models"]) == set(catalog)
    x, y = test_split
    for key, model in catalog.items():
        entry = fresh["models"][key]
        path = tmp_path / entry["file"]
        assert entry["test_accuracy"] == pytest.approx(model.test_accuracy, abs=1e-4)
        assert entry["golden_accuracy"] == pytest.approx(model.golden_accuracy, abs=1e-4)
        assert entry["estimator"] == model.estimator
        assert entry["version"] == model.version
        assert samples.accuracy(path, x, y) == pytest.approx(model.test_accuracy, abs=1e-4)
        assert _ort_signature(path) == _ort_signature(model.path)
        assert _opsets(path) == _opsets(model.path)
    # The data files depend only on the split, so they must come out identical.
    for name in ("digits_golden.json", "digits_test.npz"):
        assert (tmp_path / name).read_bytes() == samples.sample_path(name).read_bytes(), name
