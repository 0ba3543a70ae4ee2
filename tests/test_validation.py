"""The validation gate against real models in onnxruntime.

The sample models (digits v1, v2 and the deliberately poor tree) run through
the very code a device runs before a hot swap; tiny hand-built graphs cover
what the samples cannot (NaN/Inf outputs, batch-1 models). Manifests come from
``build_manifest``, which reads the I/O signature from the model, so a test
variant differs from a real release only in the field it changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeota.agent.model_host import warmup_feeds
from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.manifest import (
    DATATYPES,
    GoldenSet,
    Manifest,
    Tensor,
    TensorSpec,
    ValidationVectors,
)
from edgeota.runtime.validation import (
    CHECK_NAMES,
    MEMORY_FACTOR,
    CheckResult,
    IncompatibleSignatureError,
    SessionLoadError,
    SessionSettings,
    ValidationError,
    ValidationReason,
    ValidationReport,
    check_compatible,
    create_session,
    load_validated,
    numpy_to_datatype,
    read_mem_available,
    tensor_to_numpy,
    validate_model,
)
from edgeota.samples import SampleModel, load_catalog, sample_path
from edgeota.server.manifest_builder import build_manifest

GOLDEN = sample_path("digits_golden.json")


@pytest.fixture(scope="module")
def catalog() -> dict[str, SampleModel]:
    return load_catalog()


def sample_manifest(
    sample: SampleModel,
    *,
    vectors: Path | None = None,
    min_accuracy: float | None = None,
    latency_budget_ms: float | None = None,
) -> Manifest:
    """A release manifest of a sample; a golden set when ``min_accuracy`` is given."""
    return build_manifest(
        sample.path,
        name=sample.name,
        version=sample.version,
        hardware=["rpi4"],
        vectors=vectors,
        golden=GOLDEN if min_accuracy is not None else None,
        min_accuracy=min_accuracy,
        latency_budget_ms=latency_budget_ms,
    )


def refuse(model: Path, manifest: Manifest, **kwargs: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        validate_model(model, manifest, **kwargs)  # type: ignore[arg-type]
    err = info.value
    assert isinstance(err, EdgeotaError)
    assert not err.report.ok
    assert err.report.failed is err.report.checks[-1]
    assert str(err) == err.report.failed.detail
    return err


def tiny_model(
    path: Path,
    op: str,
    *,
    input_shape: list[int | None],
    divisor: float | None = None,
) -> Path:
    """A one-node float graph X -> Y: ``Log``, ``Identity`` or ``Div`` by a constant."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, input_shape)
    initializers = []
    if op == "Div":
        const = np.array(divisor, dtype=np.float32)
        initializers.append(numpy_helper.from_array(const, "d"))
        node = helper.make_node("Div", ["x", "d"], ["y"])
    else:
        node = helper.make_node(op, ["x"], ["y"])
    graph = helper.make_graph([node], "tiny", [x], [y], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def tiny_manifest(model: Path) -> Manifest:
    return build_manifest(model, name="tiny", version="1.0.0", hardware=["rpi4"])


def f32(name: str, rows: list[list[float]]) -> Tensor:
    return Tensor(name, "FP32", (len(rows), len(rows[0])), tuple(v for r in rows for v in r))


# --------------------------------------------------------------------------- samples pass


@pytest.mark.parametrize("key", ["digits_v1", "digits_v2"])
def test_samples_pass_with_their_vectors_and_floor(
    catalog: dict[str, SampleModel], key: str
) -> None:
    sample = catalog[key]
    manifest = sample_manifest(
        sample,
        vectors=sample.vectors_path,
        min_accuracy=sample.recommended_min_accuracy,
        latency_budget_ms=1000.0,
    )
    report = validate_model(sample.path, manifest)
    assert report.ok
    assert report.failed is None
    assert tuple(c.name for c in report.checks) == CHECK_NAMES
    assert report.accuracy == pytest.approx(sample.golden_accuracy)
    assert report.latency_p95_ms is not None
    assert 0 < report.latency_p95_ms <= 1000.0
    details = {c.name: c.detail for c in report.checks}
    assert f"{sample.golden_accuracy:.4f}" in details["golden_accuracy"]
    assert "reproduce within atol=0.0001 rtol=0.001" in details["vectors"]


def test_checks_not_asked_for_pass_as_not_configured(catalog: dict[str, SampleModel]) -> None:
    sample = catalog["digits_v1"]
    report = validate_model(sample.path, sample_manifest(sample))
    assert report.ok
    details = {c.name: c.detail for c in report.checks}
    assert details["vectors"] == details["golden_accuracy"] == details["latency"]
    assert details["latency"] == "not configured"
    assert report.accuracy is None
    assert report.latency_p95_ms is None


def test_validates_a_session_the_caller_created(catalog: dict[str, SampleModel]) -> None:
    sample = catalog["digits_v2"]
    manifest = sample_manifest(sample, vectors=sample.vectors_path, min_accuracy=0.94)
    session = create_session(sample.path, SessionSettings())
    report = validate_model(sample.path, manifest, session=session, latency_runs=5)
    assert report.ok
    assert report.checks[1] == CheckResult("load", True, "session supplied by the caller")
    # The caller decides memory before loading: the gate does not measure it twice.
    assert "not measured" in report.checks[0].detail


def test_load_validated_hands_back_the_session_it_checked(
        catalog: dict[str, SampleModel]) -> None:
    sample = catalog["digits_v2"]
    manifest = sample_manifest(sample, vectors=sample.vectors_path, min_accuracy=0.94)
    validated = load_validated(sample.path, manifest, latency_runs=5)
    assert validated.report.ok
    assert validated.report.checks[1].detail.startswith(f"loaded {sample.path.name} with")
    outputs = validated.session.run(None, warmup_feeds(manifest))
    assert len(outputs) == len(manifest.outputs)


def test_load_validated_raises_like_validate_model(catalog: dict[str, SampleModel]) -> None:
    sample = catalog["digits_v1"]
    manifest = sample_manifest(sample, vectors=sample.vectors_path, min_accuracy=0.99)
    with pytest.raises(ValidationError) as refused:
        load_validated(sample.path, manifest, latency_runs=5)
    assert refused.value.reason is ValidationReason.ACCURACY_BELOW_FLOOR


def _resident_bytes(path: Path) -> int:
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                          capture_output=True, text=True, check=True, timeout=30)
    return int(done.stdout.split()[0])


def _page_cache_droppable(folder: Path) -> bool:
    if shutil.which("fincore") is None:
        return False
    done = subprocess.run(["stat", "-f", "-c", "%T", str(folder)], capture_output=True,
                          text=True, check=False, timeout=30)
    return done.returncode == 0 and done.stdout.strip() not in ("tmpfs", "ramfs")


def test_a_loaded_model_leaves_no_second_copy_in_the_page_cache(tmp_path: Path) -> None:
    """The session holds the weights; the file's cached pages would only double them."""
    if not _page_cache_droppable(tmp_path):
        pytest.skip("needs util-linux fincore and a disk-backed folder")
    weights = np.random.default_rng(3).standard_normal((1024, 1024), dtype=np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1024])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1024])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "dense",
                              [x], [y], initializer=[numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    with path.open("rb") as f:
        os.fsync(f.fileno())  # clean pages: the kernel drops those at once
        f.read()  # in the cache, as right after unpacking
    assert _resident_bytes(path) >= path.stat().st_size // 2

    session = create_session(path)
    assert _resident_bytes(path) < path.stat().st_size // 8
    out = session.run(None, {"x": np.ones((1, 1024), np.float32)})[0]
    np.testing.assert_allclose(out, np.ones((1, 1024), np.float32) @ weights, rtol=1e-4)


def test_empty_report_is_not_a_pass() -> None:
    assert not ValidationReport((), None, None).ok


# --------------------------------------------------------------------------- refusals


def test_bad_model_with_v2_vectors_is_refused(catalog: dict[str, SampleModel]) -> None:
    bad = catalog["digits_bad"]
    manifest = sample_manifest(bad, vectors=catalog["digits_v2"].vectors_path)
    err = refuse(bad.path, manifest)
    assert err.reason == ValidationReason.VECTORS_MISMATCH
    assert err.reason == "vectors_mismatch"
    assert [c.name for c in err.report.checks] == ["memory", "load", "io_signature", "vectors"]
    assert "'label':" in str(err) and "of 16 elements differ" in str(err)
    assert "'probabilities':" in str(err) and "atol=0.0001 rtol=0.001" in str(err)


def test_bad_model_below_golden_floor_is_refused(catalog: dict[str, SampleModel]) -> None:
    bad = catalog["digits_bad"]
    manifest = sample_manifest(bad, vectors=bad.vectors_path, min_accuracy=0.94)
    err = refuse(bad.path, manifest)
    assert err.reason == "accuracy_below_floor"
    assert err.report.accuracy == pytest.approx(bad.golden_accuracy)
    assert f"golden-set accuracy {err.report.accuracy:.4f} is below the floor 0.94" in str(err)
    assert "(100 rows)" in str(err)


def test_manifest_input_datatype_altered_is_io_mismatch(catalog: dict[str, SampleModel]) -> None:
    v1, v2 = catalog["digits_v1"], catalog["digits_v2"]
    manifest = sample_manifest(v2)
    altered = replace(manifest, inputs=(replace(manifest.inputs[0], datatype="INT64"),))
    err = refuse(v1.path, altered)
    assert err.reason == "io_mismatch"
    assert "input 'input': datatype INT64 in the manifest, FP32 in the model" in str(err)


def test_extra_or_missing_tensor_is_io_mismatch(catalog: dict[str, SampleModel]) -> None:
    v1 = catalog["digits_v1"]
    manifest = sample_manifest(v1)
    extra = replace(manifest, inputs=(*manifest.inputs, TensorSpec("mask", "BOOL", (None, 64))))
    assert "'mask' is in the manifest but not in the model" in str(refuse(v1.path, extra))
    missing = replace(manifest, outputs=manifest.outputs[:1])
    err = refuse(v1.path, missing)
    assert err.reason == "io_mismatch"
    assert "output 'probabilities' is in the model but not in the manifest" in str(err)


def test_vectors_for_another_input_name_are_refused(catalog: dict[str, SampleModel]) -> None:
    v1 = catalog["digits_v1"]
    manifest = sample_manifest(v1, vectors=v1.vectors_path)
    assert manifest.validation is not None
    renamed = replace(
        manifest.validation, inputs=(replace(manifest.validation.inputs[0], name="pixels"),)
    )
    err = refuse(v1.path, replace(manifest, validation=renamed))
    assert err.reason == "vectors_mismatch"
    assert "lack input 'input'" in str(err) and "'pixels'" in str(err)


def test_latency_over_budget(catalog: dict[str, SampleModel]) -> None:
    v1 = catalog["digits_v1"]
    err = refuse(v1.path, sample_manifest(v1, latency_budget_ms=1e-6), latency_runs=10)
    assert err.reason == "latency_over_budget"
    assert err.report.latency_p95_ms is not None and err.report.latency_p95_ms > 1e-6
    assert "exceeds the budget 1e-06 ms" in str(err)
    assert len(err.report.checks) == len(CHECK_NAMES)


def test_insufficient_memory_is_refused_before_loading(catalog: dict[str, SampleModel]) -> None:
    v1 = catalog["digits_v1"]
    err = refuse(v1.path, sample_manifest(v1), memory_available=lambda: 1024)
    assert err.reason == "memory_insufficient"
    assert [c.name for c in err.report.checks] == ["memory"]
    need_kib = v1.size * MEMORY_FACTOR / 1024
    assert f"needs {need_kib:.1f} KiB" in str(err) and "only 1.0 KiB" in str(err)


def test_default_memory_reader(catalog: dict[str, SampleModel]) -> None:
    available = read_mem_available()
    if not Path("/proc/meminfo").exists():
        assert available is None
        return
    assert available is not None and available > 0
    v1 = catalog["digits_v1"]
    report = validate_model(v1.path, sample_manifest(v1))
    assert "available" in report.checks[0].detail


def test_corrupt_model_fails_to_load(catalog: dict[str, SampleModel], tmp_path: Path) -> None:
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(os.urandom(4096))
    err = refuse(corrupt, sample_manifest(catalog["digits_v1"]))
    assert err.reason == "load_failed"
    assert isinstance(err.__cause__, SessionLoadError)
    assert [c.name for c in err.report.checks] == ["memory", "load"]
    with pytest.raises(SessionLoadError):
        create_session(tmp_path / "missing.onnx")


@pytest.mark.parametrize(
    ("op", "divisor", "counts"),
    [("Log", None, "1 NaN, 0 Inf of 2"), ("Div", 0.0, "0 NaN, 2 Inf of 2")],
    ids=["log-of-negative", "div-by-zero"],
)
def test_non_finite_vector_output_is_nan_output(
    tmp_path: Path, op: str, divisor: float | None, counts: str
) -> None:
    model = tiny_model(tmp_path / "m.onnx", op, input_shape=[None, 2], divisor=divisor)
    manifest = tiny_manifest(model)
    vectors = ValidationVectors(
        inputs=(f32("x", [[-1.0, 1.0]]),), outputs=(f32("y", [[0.0, 0.0]]),), atol=0.1, rtol=0.0
    )
    err = refuse(model, replace(manifest, validation=vectors))
    assert err.reason == "nan_output"
    assert err.report.failed is not None and err.report.failed.name == "vectors"
    assert f"output 'y' holds non-finite values ({counts}" in str(err)


def test_non_finite_golden_output_is_nan_output(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "m.onnx", "Log", input_shape=[None, 2])
    golden = GoldenSet(
        inputs=(f32("x", [[1.0, 2.0], [-1.0, 1.0]]),),
        label_output="y",
        labels=(1, 1),
        min_accuracy=0.5,
    )
    err = refuse(model, replace(tiny_manifest(model), golden=golden))
    assert err.reason == "nan_output"
    assert err.report.failed is not None and err.report.failed.name == "golden_accuracy"


def test_batch_one_model_runs_golden_rows_one_by_one(tmp_path: Path) -> None:
    """Many exported CNNs fix the batch at 1: the gate feeds such a model row by row."""
    model = tiny_model(tmp_path / "m.onnx", "Identity", input_shape=[1, 3])
    rows = [[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.2, 0.7], [0.3, 0.6, 0.1]]
    manifest = replace(
        tiny_manifest(model),
        golden=GoldenSet((f32("x", rows),), "y", (1, 0, 2, 0), 0.7),
        latency_budget_ms=1000.0,
    )
    report = validate_model(model, manifest, latency_runs=5)
    assert report.ok
    assert report.accuracy == pytest.approx(0.75)  # argmax of the scores, one row wrong


def test_golden_set_naming_a_missing_output_is_io_mismatch(
    catalog: dict[str, SampleModel],
) -> None:
    v1 = catalog["digits_v1"]
    manifest = sample_manifest(v1, min_accuracy=0.5)
    assert manifest.golden is not None
    broken = replace(manifest, golden=replace(manifest.golden, label_output="class"))
    err = refuse(v1.path, broken)
    assert err.reason == "io_mismatch"
    assert "label_output 'class' is not an output of the model" in str(err)


# --------------------------------------------------------------------------- compatibility


def test_v2_is_compatible_with_v1(catalog: dict[str, SampleModel]) -> None:
    check_compatible(sample_manifest(catalog["digits_v1"]), sample_manifest(catalog["digits_v2"]))


def test_incompatible_releases_are_refused(catalog: dict[str, SampleModel]) -> None:
    v1 = sample_manifest(catalog["digits_v1"])
    v2 = sample_manifest(catalog["digits_v2"])
    (inp,) = v2.inputs
    label, proba = v2.outputs
    cases = {
        "input 'input' was removed; input 'pixels' is new": replace(
            v2, inputs=(replace(inp, name="pixels"),)
        ),
        "input 'input' changes dim 1: [?, 64] -> [?, 32]": replace(
            v2, inputs=(replace(inp, shape=(None, 32)),)
        ),
        "input 'input' changes dim 0: [?, 64] -> [1, 64]": replace(
            v2, inputs=(replace(inp, shape=(1, 64)),)
        ),
        "input 'input' changes datatype: FP32 -> FP64": replace(
            v2, inputs=(replace(inp, datatype="FP64"),)
        ),
        "output 'probabilities' was removed": replace(v2, outputs=(label,)),
        "output 'probabilities' changes dim 1: [?, 10] -> [?, 11]": replace(
            v2, outputs=(label, replace(proba, shape=(None, 11)))
        ),
    }
    for difference, candidate in cases.items():
        with pytest.raises(IncompatibleSignatureError) as info:
            check_compatible(v1, candidate)
        assert difference in str(info.value), difference
        assert "digits 2.0.0 is not compatible with digits 1.0.0" in str(info.value)


def test_widening_inputs_and_adding_outputs_stay_compatible(
    catalog: dict[str, SampleModel],
) -> None:
    v1 = sample_manifest(catalog["digits_v1"])
    v2 = sample_manifest(catalog["digits_v2"])
    (inp,) = v2.inputs
    label, proba = v2.outputs
    check_compatible(
        v1,
        replace(
            v2,
            inputs=(replace(inp, shape=(None, None)),),  # accepts all it accepted before
            outputs=(replace(label, shape=(5,)), proba, TensorSpec("logits", "FP32", (None, 10))),
        ),
    )


# --------------------------------------------------------------------------- sessions, tensors


def test_session_settings_production_options() -> None:
    options = SessionSettings().to_session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    import onnxruntime as ort

    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    custom = SessionSettings(
        intra_op_threads=3, inter_op_threads=2, allow_spinning=True, graph_optimization="basic"
    ).to_session_options()
    assert (custom.intra_op_num_threads, custom.inter_op_num_threads) == (3, 2)
    assert custom.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert custom.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


@pytest.mark.parametrize(
    "kwargs",
    [{"intra_op_threads": -1}, {"inter_op_threads": True}, {"graph_optimization": "max"}],
)
def test_session_settings_refuse_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SessionSettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_datatypes_round_trip(datatype: str) -> None:
    values = {bool: (True, False), int: (1, 2), float: (0.5, 1.5), str: ("a", "bc")}
    tensor = Tensor("t", datatype, (2, 1), values[DATATYPES[datatype]])
    arr = tensor_to_numpy(tensor)
    assert arr.shape == (2, 1)
    assert numpy_to_datatype(arr) == datatype
    assert tuple(arr.ravel().tolist()) == tensor.data


def test_numpy_strings_are_bytes_and_unknown_dtypes_refused() -> None:
    assert numpy_to_datatype(np.array(["a", "b"])) == "BYTES"
    with pytest.raises(ValueError):
        numpy_to_datatype(np.array([1 + 2j]))


def test_gate_stays_in_the_device_install() -> None:
    """The agent extra has no onnx, scikit-learn or server code: importing must not need it.

    The gate is shared (``edgeota.runtime``), so it must not pull the device
    package either: the server runs it too.
    """
    code = (
        "import json, sys, edgeota.runtime.validation, edgeota.runtime.model_signature\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('onnx', 'sklearn', 'skl2onnx') or m.startswith(('edgeota.server', 'edgeota.agent')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(out.stdout) == []
