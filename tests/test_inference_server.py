"""The Open Inference Protocol v2 endpoint over real HTTP on loopback.

A standard client, ``tritonclient.http.InferenceServerClient``, is used
unmodified (binary tensors, as it sends by default, and JSON tensors), next to
plain httpx requests that pin the JSON shapes. The models are the real samples
in onnxruntime, so accuracies are the catalog's.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edgeota.agent.inference_server import (
    InferenceServer,
    InferenceServerError,
    decode_infer_request,
    encode_infer_response,
)
from edgeota.agent.model_host import ModelHost, Prediction
from edgeota.protocol.manifest import Manifest
from edgeota.runtime.validation import SessionSettings, create_session
from edgeota.samples import SampleModel
from edgeota.server.manifest_builder import build_manifest

try:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException
except ImportError:  # pragma: no cover - the dev environment installs it
    triton = None  # type: ignore[assignment]

needs_triton = pytest.mark.skipif(
    triton is None, reason="tritonclient[http] is not installed (pip install 'tritonclient[http]')"
)

SETTINGS = SessionSettings()
WAIT_S = 20.0
V1, V2 = "1.0.0", "2.0.0"


@pytest.fixture(scope="module")
def manifests(catalog: dict[str, SampleModel]) -> dict[str, Manifest]:
    return {
        catalog[key].version: build_manifest(
            catalog[key].path,
            name="digits",
            version=catalog[key].version,
            hardware=["rpi4"],
            vectors=catalog[key].vectors_path,
        )
        for key in ("digits_v1", "digits_v2")
    }


def args(
    catalog: dict[str, SampleModel], manifests: dict[str, Manifest], version: str
) -> tuple[str, str, Path, Manifest]:
    key = "digits_v1" if version == V1 else "digits_v2"
    return "digits", version, catalog[key].path, manifests[version]


class UpdateState:
    """What the agent's update cycle would report for a model; the test changes it."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"state": "committed", "version": V1}

    def __call__(self, name: str) -> Mapping[str, Any]:
        return {"model": name, **self.state}


@pytest.fixture
def update_state() -> UpdateState:
    return UpdateState()


@pytest.fixture
def host(catalog: dict[str, SampleModel], manifests: dict[str, Manifest]) -> ModelHost:
    host = ModelHost(SETTINGS)
    host.load(*args(catalog, manifests, V1))
    return host


@pytest.fixture
def server(host: ModelHost, update_state: UpdateState) -> Iterator[InferenceServer]:
    with InferenceServer(host, update_state=update_state) as server:
        yield server


@pytest.fixture
def client(server: InferenceServer) -> Iterator[Any]:
    if triton is None:
        pytest.skip("tritonclient[http] is not installed (pip install 'tritonclient[http]')")
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


def triton_accuracy(
    client: Any, x: np.ndarray, y: np.ndarray, *, binary: bool
) -> tuple[set, float]:
    """Accuracy over the split in batches of 64, and the versions that answered."""
    versions: set[str] = set()
    labels = []
    for start in range(0, len(x), 64):
        batch = x[start : start + 64]
        tensor = triton.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        outputs = None if binary else [triton.InferRequestedOutput("label", binary_data=False)]
        result = client.infer("digits", [tensor], outputs=outputs)
        versions.add(result.get_response()["model_version"])
        labels.append(result.as_numpy("label"))
    return versions, float(np.mean(np.concatenate(labels) == y))


# --------------------------------------------------------------------------- tritonclient


def test_binds_to_loopback_by_default(server: InferenceServer) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    assert server.port > 0
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}


@needs_triton
def test_health_and_metadata_through_tritonclient(
    client: Any,
    host: ModelHost,
    update_state: UpdateState,
    catalog: dict[str, SampleModel],
    manifests: dict[str, Manifest],
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", model_version=V1)
    assert not client.is_model_ready("digits", model_version=V2)
    assert not client.is_model_ready("nope")
    assert client.get_server_metadata()["name"] == "edgeota-agent"

    meta = client.get_model_metadata("digits")
    assert meta["name"] == "digits"
    assert meta["versions"] == [V1]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
    ]
    assert meta["parameters"]["update_state"] == {
        "model": "digits",
        "state": "committed",
        "version": V1,
    }

    host.swap(*args(catalog, manifests, V2))
    update_state.state = {"state": "probation", "version": V2, "previous": V1}
    meta = client.get_model_metadata("digits", model_version=V2)
    assert meta["versions"] == [V2]
    assert meta["parameters"]["update_state"]["state"] == "probation"
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("digits", model_version=V1)
    assert info.value.status() == "404"


@needs_triton
def test_accuracy_through_tritonclient_follows_the_swap(
    client: Any,
    host: ModelHost,
    catalog: dict[str, SampleModel],
    manifests: dict[str, Manifest],
    split: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = split
    for binary in (True, False):
        versions, acc = triton_accuracy(client, x, y, binary=binary)
        assert versions == {V1}
        assert acc == pytest.approx(catalog["digits_v1"].test_accuracy, abs=1e-3)

    host.swap(*args(catalog, manifests, V2))
    versions, acc = triton_accuracy(client, x, y, binary=True)
    assert versions == {V2}
    assert acc == pytest.approx(catalog["digits_v2"].test_accuracy, abs=1e-3)

    # Binary outputs carry the exact float32 values of the model.
    tensor = triton.InferInput("input", [5, 64], "FP32")
    tensor.set_data_from_numpy(x[:5])
    result = client.infer("digits", [tensor], request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    reference = create_session(catalog["digits_v2"].path, SETTINGS)
    (expected,) = reference.run(["probabilities"], {"input": x[:5]})
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)


@needs_triton
def test_errors_through_tritonclient(client: Any, split: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = split
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "404"
    assert "nope" in info.value.message()

    tensor = triton.InferInput("input", [2, 64], "FP64")
    tensor.set_data_from_numpy(x[:2].astype(np.float64))
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [tensor])
    assert info.value.status() == "400"
    assert "FP64" in info.value.message()

    tensor = triton.InferInput("input", [2, 32], "FP32")
    tensor.set_data_from_numpy(x[:2, :32])
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [tensor])
    assert info.value.status() == "400"

    tensor = triton.InferInput("input", [2, 64], "FP32")
    tensor.set_data_from_numpy(x[:2])
    with pytest.raises(InferenceServerException) as info:
        client.infer("nope", [tensor])
    assert info.value.status() == "404"


# --------------------------------------------------------------------------- plain JSON


def test_infer_json_shapes(server: InferenceServer, split: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = split
    body = {
        "id": "r1",
        "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": x[:2].tolist()}],
        "outputs": [{"name": "label"}],
    }
    response = httpx.post(f"{server.url}/v2/models/digits/infer", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert doc["model_name"] == "digits"
    assert doc["model_version"] == V1
    assert doc["id"] == "r1"
    assert len(doc["outputs"]) == 1
    (label,) = doc["outputs"]
    assert label["name"] == "label" and label["datatype"] == "INT64" and label["shape"] == [2]
    assert all(isinstance(v, int) for v in label["data"])

    flat = dict(body, inputs=[dict(body["inputs"][0], data=x[:2].reshape(-1).tolist())])
    del flat["outputs"], flat["id"]
    doc = httpx.post(f"{server.url}/v2/models/digits/versions/{V1}/infer", json=flat).json()
    assert "id" not in doc
    assert [o["name"] for o in doc["outputs"]] == ["label", "probabilities"]
    assert doc["outputs"][0]["data"] == label["data"]
    assert doc["outputs"][1]["shape"] == [2, 10]
    assert len(doc["outputs"][1]["data"]) == 20


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/digits/infer", b"{not json", 400, "not valid JSON"),
        ("/v2/models/digits/infer", b"[]", 400, "JSON object"),
        ("/v2/models/digits/infer", b'{"inputs": []}', 400, "non-empty list"),
        (
            "/v2/models/digits/infer",
            {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32"}]},
            400,
            "no data",
        ),
        (
            "/v2/models/digits/infer",
            {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0]}]},
            400,
            "needs 64",
        ),
        (
            "/v2/models/digits/infer",
            {"inputs": [{"name": "input", "shape": [1, 1], "datatype": "FP32", "data": ["1"]}]},
            400,
            "not FP32",
        ),
        (
            "/v2/models/digits/infer",
            {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]},
            400,
            "unknown input 'x'",
        ),
        (
            "/v2/models/digits/infer",
            {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP99", "data": []}]},
            400,
            "not an OIP v2 type",
        ),
        (
            "/v2/models/digits/infer",
            {
                "inputs": [
                    {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}
                ],
                "outputs": [{"name": "nope"}],
            },
            400,
            "no output",
        ),
        (
            f"/v2/models/digits/versions/{V2}/infer",
            {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]},
            404,
            "not served",
        ),
        (  # a zero-row batch: the caller's mistake, never the model's
            "/v2/models/digits/infer",
            {"inputs": [{"name": "input", "shape": [0, 64], "datatype": "FP32", "data": []}]},
            400,
            "is empty",
        ),
        (
            "/v2/models/digits/infer",
            {"inputs": [{"name": "input", "shape": [0, 2**62], "datatype": "FP32",
                         "data": []}]},
            400,
            "shape must be",
        ),
        (
            "/v2/models/digits/infer",
            {"inputs": [{"name": "input", "shape": [2**62, 2**62], "datatype": "FP32",
                         "data": []}]},
            400,
            "input 'input'",
        ),
        (
            "/v2/models/nope/infer",
            {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]},
            404,
            "nope",
        ),
    ],
)
def test_infer_errors_as_json(
    server: InferenceServer, path: str, body: Any, status: int, message: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}{path}", content=content)
    assert response.status_code == status
    assert message in response.json()["error"]


@pytest.mark.parametrize("body", [
    b"[" * 200_000 + b"]" * 200_000,  # deeper than the JSON parser's stack
    b'{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": '
    + b"[" * 50_000 + b"]" * 50_000 + b"}]}",
])
def test_deeply_nested_json_is_a_400(server: InferenceServer, body: bytes) -> None:
    response = httpx.post(f"{server.url}/v2/models/digits/infer", content=body)
    assert response.status_code == 400
    assert "nested" in response.json()["error"] or "regular" in response.json()["error"]
    # and the endpoint still serves
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_unknown_paths_methods_and_encodings(server: InferenceServer) -> None:
    response = httpx.get(f"{server.url}/v2/nothing/here")
    assert response.status_code == 404 and "error" in response.json()
    response = httpx.get(f"{server.url}/v2/models/digits/infer")
    assert response.status_code == 405 and "error" in response.json()
    response = httpx.post(
        f"{server.url}/v2/models/digits/infer",
        content=b"\x1f\x8b",
        headers={"content-encoding": "gzip"},
    )
    assert response.status_code == 415
    response = httpx.get(f"{server.url}/v2/models/nope")
    assert response.status_code == 404 and "nope" in response.json()["error"]
    doc = httpx.get(f"{server.url}/v2").json()
    assert doc["name"] == "edgeota-agent" and "binary_tensor_data" in doc["extensions"]


def test_request_body_is_bounded(host: ModelHost) -> None:
    with InferenceServer(host, max_body_bytes=4096) as server:
        small = {
            "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]
        }
        assert httpx.post(f"{server.url}/v2/models/digits/infer", json=small).status_code == 200
        big = {
            "inputs": [
                {"name": "input", "shape": [64, 64], "datatype": "FP32", "data": [0.5] * 4096}
            ]
        }
        response = httpx.post(f"{server.url}/v2/models/digits/infer", json=big)
        assert response.status_code == 413
        assert "exceeds 4096" in response.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
            yield json.dumps(big).encode()

        response = httpx.post(f"{server.url}/v2/models/digits/infer", content=chunks())
        assert response.status_code == 413


def test_port_in_use_is_a_clear_error(host: ModelHost, server: InferenceServer) -> None:
    other = InferenceServer(host, port=server.port)
    with pytest.raises(InferenceServerError, match="cannot listen"):
        other.start()


def test_binary_bytes_and_bool_tensors_round_trip() -> None:
    """Triton's binary layout: BYTES elements length-prefixed, BOOL one byte each."""
    words = ["a", "", "héllo"]
    raw_words = b"".join(len(w.encode()).to_bytes(4, "little") + w.encode() for w in words)
    flags = bytes([1, 0, 1, 1])
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "w",
                    "shape": [3],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw_words)},
                },
                {
                    "name": "f",
                    "shape": [2, 2],
                    "datatype": "BOOL",
                    "parameters": {"binary_data_size": 4},
                },
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    parsed = decode_infer_request(head + raw_words + flags, str(len(head)))
    assert parsed.inputs["w"].tolist() == words
    np.testing.assert_array_equal(parsed.inputs["f"], [[True, False], [True, True]])

    prediction = Prediction("m", "1.0.0", dict(parsed.inputs), 0.1)
    body, headers = encode_infer_response(parsed, prediction)
    size = int(headers["inference-header-content-length"])
    doc = json.loads(body[:size])
    assert [o["parameters"]["binary_data_size"] for o in doc["outputs"]] == [len(raw_words), 4]
    assert body[size:] == raw_words + flags

    with pytest.raises(Exception, match="belong to no input"):
        decode_infer_request(head + raw_words + flags + b"x", str(len(head)))


# --------------------------------------------------------------------------- availability


class GatedSession:
    """A real session whose ``run`` waits for ``opened`` once ``armed``."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.armed = False
        self.entered = threading.Event()
        self.opened = threading.Event()

    def get_inputs(self) -> Any:
        return self._inner.get_inputs()

    def get_outputs(self) -> Any:
        return self._inner.get_outputs()

    def run(self, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> Any:
        if self.armed:
            self.entered.set()
            if not self.opened.wait(WAIT_S):
                raise TimeoutError("the test never opened the gate")
        return self._inner.run(names, feeds)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def one_row(x: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": x[0].tolist()}]
    }


def test_slow_inference_does_not_block_the_event_loop_and_gap_is_503(
    catalog: dict[str, SampleModel],
    manifests: dict[str, Manifest],
    split: tuple[np.ndarray, np.ndarray],
) -> None:
    x, _ = split
    host = ModelHost(SETTINGS, memory_available=lambda: 16)  # forces unload-then-load
    name, version, path, manifest = args(catalog, manifests, V1)
    gated = GatedSession(create_session(path, SETTINGS))
    host.load(name, version, path, manifest, session=gated)
    with InferenceServer(host) as server, ThreadPoolExecutor(max_workers=2) as pool:
        gated.armed = True
        infer_url = f"{server.url}/v2/models/digits/infer"
        pending = pool.submit(httpx.post, infer_url, json=one_row(x), timeout=WAIT_S)
        assert gated.entered.wait(WAIT_S)
        # The request sits in session.run on a worker thread; the loop still answers.
        assert httpx.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200

        swapping = pool.submit(host.swap, *args(catalog, manifests, V2))
        wait_until(lambda: not host.is_ready("digits"), "the unload-then-load gap")
        ready = httpx.get(f"{server.url}/v2/health/ready", timeout=5)
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        assert httpx.get(f"{server.url}/v2/models/digits/ready", timeout=5).status_code == 503
        refused = httpx.post(infer_url, json=one_row(x), timeout=5)
        assert refused.status_code == 503
        assert "retry" in refused.json()["error"]

        gated.opened.set()
        first = pending.result(WAIT_S)
        assert first.status_code == 200 and first.json()["model_version"] == V1
        assert swapping.result(WAIT_S).mode == "unload_then_load"
        assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
        after = httpx.post(infer_url, json=one_row(x), timeout=5).json()
        assert after["model_version"] == V2
