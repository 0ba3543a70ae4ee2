"""The device's local inference endpoint: Open Inference Protocol v2 over REST.

Applications on the device reach the hosted models through the REST API that
Triton, KServe and MLServer share, so their standard clients (e.g. an
unmodified ``tritonclient.http.InferenceServerClient``) work unchanged:

* ``GET /v2/health/live``, ``GET /v2/health/ready`` (200 once every hosted
  model is serving, 503 during an unload-then-load gap), ``GET /v2``;
* ``GET /v2/models/{name}[/versions/{v}]``: metadata with the served version,
  platform ``onnxruntime_onnx``, tensor metadata (``-1`` for a dynamic dim) and
  ``parameters.update_state`` from the injected callable, so an application
  (or an operator on the device) sees where the model's update stands;
* ``GET /v2/models/{name}[/versions/{v}]/ready``;
* ``POST /v2/models/{name}[/versions/{v}]/infer``: JSON tensors, and Triton's
  binary tensor data extension (``Inference-Header-Content-Length``, inputs with
  ``parameters.binary_data_size``, outputs asked for with ``binary_data`` or
  ``binary_data_output``), which is what tritonclient sends by default.

Errors are ``{"error": "..."}`` with 400 (bad request), 404 (no such model or
version), 413 (body over the limit), 415 (compressed body), 503 (model not
serving right now) or 500 (onnxruntime failed).

Built on Starlette alone (no FastAPI: the agent install stays free of server
frameworks) and served by uvicorn on its own thread, bound to loopback by
default: the endpoint is for the device's own applications. Parsing, inference
and encoding run on worker threads bounded by a capacity limiter, never on the
event loop, so a slow model cannot stall health checks.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgeota.agent.model_host import (
    InvalidInputError,
    LoadedModel,
    ModelHost,
    ModelHostError,
    ModelUnavailableError,
    Prediction,
    UnknownModelError,
)
from edgeota.protocol.errors import EdgeotaError
from edgeota.runtime.validation import NUMPY_TYPES, numpy_to_datatype

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_WORKERS",
    "PLATFORM",
    "InferRequest",
    "InferenceServer",
    "InferenceServerError",
    "RequestError",
    "build_app",
    "decode_infer_request",
    "encode_infer_response",
]

#: Largest request body accepted (JSON plus binary tensors): a 16 MiB image batch
#: is plenty on a device, and the bound keeps one client from exhausting memory.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

#: Requests computed at once. Sessions use one intra-op thread each, so a few
#: workers keep a small device's cores busy without queueing inside onnxruntime.
DEFAULT_WORKERS = 4

#: The platform name Triton uses for ONNX models run by onnxruntime.
PLATFORM = "onnxruntime_onnx"

_SERVER_NAME = "edgeota-agent"
_EXTENSIONS = ("binary_tensor_data",)
_MAX_RANK = 16
# A dimension numpy can index without overflow on any platform, and far above any
# tensor a request body of DEFAULT_MAX_BODY_BYTES can carry.
_MAX_DIM = 2**31 - 1
_BYTES_LENGTH_PREFIX = 4

# OIP v2 datatypes -> numpy dtypes, and the numpy kinds JSON data of each may hold.
_DTYPES: dict[str, np.dtype] = NUMPY_TYPES
_JSON_KINDS = {name: "iu" for name in _DTYPES if name.startswith(("INT", "UINT"))} | {
    "BOOL": "b",
    "FP16": "iuf",
    "FP32": "iuf",
    "FP64": "iuf",
}


class InferenceServerError(EdgeotaError):
    """The endpoint could not start or stop (port taken, uvicorn failed, timeout)."""


class RequestError(Exception):
    """A request refused with an HTTP status; the message becomes ``{"error": ...}``.

    The only exception :func:`decode_infer_request` raises on any body (the
    fuzz harness holds it to that): a client's mistake, never the model's.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


_HOST_ERROR_STATUS: tuple[tuple[type[ModelHostError], int], ...] = (
    (InvalidInputError, 400),
    (UnknownModelError, 404),
    (ModelUnavailableError, 503),
)


def _status_of(error: ModelHostError) -> int:
    for kind, status in _HOST_ERROR_STATUS:
        if isinstance(error, kind):
            return status
    return 500  # InferenceError and anything unforeseen: the server's fault


# --------------------------------------------------------------------------- tensors in


def _tensor_meta(item: Any, where: str) -> tuple[str, str, tuple[int, ...], Mapping[str, Any]]:
    if not isinstance(item, Mapping):
        raise RequestError(400, f"{where} must be an object")
    name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
    if not isinstance(name, str) or not name:
        raise RequestError(400, f"{where}.name must be a non-empty string")
    if not isinstance(datatype, str) or datatype not in _DTYPES:  # a list is not hashable
        shown = repr(datatype[:32]) if isinstance(datatype, str) else type(datatype).__name__
        raise RequestError(400, f"input {name!r}: datatype {shown} is not an OIP v2 type")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _MAX_DIM
                   for d in shape)
    ):
        raise RequestError(
            400, f"input {name!r}: shape must be a list of at most {_MAX_RANK} integers "
            f"from 0 to {_MAX_DIM}"
        )
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise RequestError(400, f"input {name!r}: parameters must be an object")
    return name, datatype, tuple(shape), parameters


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """A JSON tensor (flat or nested row-major ``data``) as an array of its datatype."""
    if not isinstance(data, list):
        raise RequestError(400, f"input {name!r} has no data list (nor binary_data_size)")
    count = math.prod(shape)
    try:
        if datatype == "BYTES":
            arr = np.array(data, dtype=object)
            if not all(isinstance(v, str) for v in arr.flat):
                raise RequestError(400, f"input {name!r}: BYTES data must be strings")
        else:
            arr = np.asarray(data)
    except ValueError as e:  # ragged nesting
        raise RequestError(400, f"input {name!r}: data is not a regular array: {e}") from e
    except RecursionError as e:
        raise RequestError(400, f"input {name!r}: data is nested too deeply") from e
    if arr.size != count:
        raise RequestError(
            400, f"input {name!r}: data has {arr.size} values, shape {list(shape)} needs {count}"
        )
    if datatype != "BYTES" and arr.size:
        if arr.dtype.kind not in _JSON_KINDS[datatype]:
            raise RequestError(400, f"input {name!r}: data holds values that are not {datatype}")
        target = _DTYPES[datatype]
        if target.kind in "iu":
            info = np.iinfo(target)
            if arr.min() < info.min or arr.max() > info.max:
                raise RequestError(400, f"input {name!r}: a value is out of range for {datatype}")
    return arr.astype(_DTYPES[datatype]).reshape(shape)


def _from_binary(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    """A tensor of Triton's binary extension: little-endian, row-major; BYTES length-prefixed."""
    count = math.prod(shape)
    if datatype == "BYTES":
        values: list[str] = []
        offset = 0
        while offset < len(raw):
            if offset + _BYTES_LENGTH_PREFIX > len(raw):
                raise RequestError(400, f"input {name!r}: truncated BYTES element")
            length = int.from_bytes(raw[offset : offset + _BYTES_LENGTH_PREFIX], "little")
            offset += _BYTES_LENGTH_PREFIX
            if offset + length > len(raw):
                raise RequestError(400, f"input {name!r}: truncated BYTES element")
            try:
                values.append(raw[offset : offset + length].decode("utf-8"))
            except UnicodeDecodeError as e:
                raise RequestError(400, f"input {name!r}: BYTES element is not UTF-8") from e
            offset += length
        if len(values) != count:
            raise RequestError(
                400, f"input {name!r}: {len(values)} BYTES elements, shape needs {count}"
            )
        return np.array(values, dtype=object).reshape(shape)
    dtype = _DTYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise RequestError(
            400,
            f"input {name!r}: {len(raw)} bytes of binary data, shape {list(shape)} of "
            f"{datatype} needs {count * dtype.itemsize}",
        )
    if datatype == "BOOL":
        return np.frombuffer(raw, dtype=np.uint8).astype(bool).reshape(shape)  # nonzero: True
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


@dataclass(frozen=True)
class InferRequest:
    """A parsed OIP infer request."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...] | None
    binary_flags: Mapping[str, bool]  # per requested output; it wins over the default
    binary_default: bool  # the request's ``binary_data_output``

    def binary(self, output: str) -> bool:
        return self.binary_flags.get(output, self.binary_default)


def decode_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    if header_length is None:
        head, binary = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError as e:
            raise RequestError(400, "Inference-Header-Content-Length is not an integer") from e
        if not 0 <= size <= len(body):
            raise RequestError(400, f"Inference-Header-Content-Length {size} exceeds the body")
        head, binary = body[:size], body[size:]
    try:
        doc = json.loads(head)
    # ValueError: bad UTF-8 or syntax (both subclass it) and integers past CPython's
    # 4300-digit limit, which json raises as a plain ValueError.
    except ValueError as e:
        raise RequestError(400, f"the request is not valid JSON: {str(e)[:200]}") from e
    except RecursionError as e:  # nesting deeper than the parser's stack
        raise RequestError(400, "the request's JSON is nested too deeply") from e
    if not isinstance(doc, dict):
        raise RequestError(400, "the request must be a JSON object")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, "id must be a string")
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise RequestError(400, "parameters must be an object")

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise RequestError(400, "inputs must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, item in enumerate(raw_inputs):
        name, datatype, shape, params = _tensor_meta(item, f"inputs[{i}]")
        if name in inputs:
            raise RequestError(400, f"input {name!r} is given twice")
        data_size = params.get("binary_data_size")
        if data_size is None:
            inputs[name] = _from_json(name, datatype, shape, item.get("data"))
            continue
        if not isinstance(data_size, int) or isinstance(data_size, bool) or data_size < 0:
            raise RequestError(400, f"input {name!r}: binary_data_size must be an integer >= 0")
        if offset + data_size > len(binary):
            raise RequestError(400, f"input {name!r}: binary data ends early")
        inputs[name] = _from_binary(name, datatype, shape, binary[offset : offset + data_size])
        offset += data_size
    if offset != len(binary):
        raise RequestError(400, f"{len(binary) - offset} bytes of binary data belong to no input")

    outputs: tuple[str, ...] | None = None
    binary_flags: dict[str, bool] = {}
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise RequestError(400, "outputs must be a list")
        names: list[str] = []
        for i, item in enumerate(raw_outputs):
            output = item.get("name") if isinstance(item, Mapping) else None
            if not isinstance(output, str):
                raise RequestError(400, f"outputs[{i}].name must be a string")
            names.append(output)
            output_parameters = item.get("parameters") or {}
            if not isinstance(output_parameters, Mapping):
                raise RequestError(400, f"outputs[{i}].parameters must be an object")
            if "binary_data" in output_parameters:
                binary_flags[output] = bool(output_parameters["binary_data"])
        outputs = tuple(names)
    return InferRequest(
        request_id,
        inputs,
        outputs,
        binary_flags,
        bool(parameters.get("binary_data_output", False)),
    )


# --------------------------------------------------------------------------- tensors out


def _to_binary(datatype: str, arr: np.ndarray) -> bytes:
    if datatype == "BYTES":
        parts = []
        for value in arr.flat:
            raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts += [len(raw).to_bytes(_BYTES_LENGTH_PREFIX, "little"), raw]
        return b"".join(parts)
    if datatype == "BOOL":
        return arr.astype(np.uint8).tobytes()
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _to_json(datatype: str, arr: np.ndarray) -> list[Any]:
    flat = arr.reshape(-1)
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()


def encode_infer_response(request: InferRequest,
                          prediction: Prediction) -> tuple[bytes, dict[str, str]]:
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, value in prediction.outputs.items():
        arr = np.asarray(value)
        datatype = numpy_to_datatype(arr)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if request.binary(name):
            blob = _to_binary(datatype, arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(datatype, arr)
        entries.append(entry)
    response: dict[str, Any] = {
        "model_name": prediction.name,
        "model_version": prediction.version,
    }
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = entries
    # NaN/Inf (which probation counts) go out as the NaN/Infinity tokens Python's
    # json and rapidjson read, rather than failing the request.
    head = json.dumps(response, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(head)),
    }


# --------------------------------------------------------------------------- the app


def _tensor_metadata(specs: Sequence[Any]) -> list[dict[str, Any]]:
    return [
        {
            "name": s.name,
            "datatype": s.datatype,
            "shape": [-1 if d is None else d for d in s.shape],
        }
        for s in specs
    ]


def _server_version() -> str:
    try:
        return metadata.version("edgeota")
    except metadata.PackageNotFoundError:
        return "unknown"


class _Endpoints:
    """The request handlers, bound to one host; blocking work goes through ``_offload``."""

    def __init__(
        self,
        host: ModelHost,
        update_state: Callable[[str], Mapping[str, Any]] | None,
        workers: int,
        max_body_bytes: int,
        on_started: Callable[[], None],
    ) -> None:
        self.host = host
        self.update_state = update_state
        self.workers = workers
        self.max_body_bytes = max_body_bytes
        self.on_started = on_started
        self.limiter: anyio.CapacityLimiter | None = None
        self.version = _server_version()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # Created here because a limiter belongs to the running event loop.
        self.limiter = anyio.CapacityLimiter(self.workers)
        self.on_started()
        yield

    async def _offload(self, func: Callable[[], Any]) -> Any:
        return await anyio.to_thread.run_sync(func, limiter=self.limiter)

    # ----------------------------------------------------------------- health

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = True
        for name in self.host.models():
            with contextlib.suppress(UnknownModelError):  # a first load that just failed
                ready = ready and self.host.is_ready(name)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(
            {"name": _SERVER_NAME, "version": self.version, "extensions": list(_EXTENSIONS)}
        )

    # ----------------------------------------------------------------- models

    def _served(self, request: Request) -> LoadedModel:
        """The model a ``/v2/models/{name}[/versions/{v}]`` path names, or a host error."""
        name = request.path_params["name"]
        model = self.host.model(name)
        version = request.path_params.get("version")
        if version is not None and version != model.version:
            raise UnknownModelError(
                f"model {name!r} version {version!r} is not served (serving {model.version})"
            )
        return model

    async def model_metadata(self, request: Request) -> Response:
        try:
            model = self._served(request)
        except ModelHostError as e:
            return _error(_status_of(e), str(e))
        body: dict[str, Any] = {
            "name": model.name,
            "versions": [model.version],
            "platform": PLATFORM,
            "inputs": _tensor_metadata(model.inputs),
            "outputs": _tensor_metadata(model.outputs),
        }
        del model  # do not pin the session while the update state is read
        if self.update_state is not None:
            state = await self._offload(partial(self.update_state, body["name"]))
            body["parameters"] = {"update_state": dict(state)}
        return JSONResponse(body)

    async def model_ready(self, request: Request) -> Response:
        try:
            self._served(request)
        except ModelHostError as e:
            return _error(_status_of(e), str(e))
        return JSONResponse({"name": request.path_params["name"], "ready": True})

    # ----------------------------------------------------------------- inference

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise RequestError(
                413, f"request body of {declared} bytes exceeds {self.max_body_bytes}"
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise RequestError(413, f"request body exceeds {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _infer_sync(
        self, name: str, version: str | None, body: bytes, header_length: str | None
    ) -> tuple[bytes, dict[str, str]]:
        """Parse, run and encode on a worker thread: all of it is CPU work."""
        parsed = decode_infer_request(body, header_length)
        prediction = self.host.predict(name, parsed.inputs, outputs=parsed.outputs, version=version)
        return encode_infer_response(parsed, prediction)

    async def infer(self, request: Request) -> Response:
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        try:
            if encoding not in ("", "identity"):
                raise RequestError(415, f"Content-Encoding {encoding!r} is not supported")
            body = await self._read_body(request)
            payload, headers = await self._offload(
                partial(
                    self._infer_sync,
                    request.path_params["name"],
                    request.path_params.get("version"),
                    body,
                    request.headers.get("inference-header-content-length"),
                )
            )
        except RequestError as e:
            return _error(e.status, str(e))
        except ModelHostError as e:
            return _error(_status_of(e), str(e))
        return Response(payload, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods answer in the protocol's error shape too."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    detail = exc.detail if isinstance(exc, HTTPException) else "internal error"
    return _error(status, f"{request.method} {request.url.path}: {detail}")


def build_app(
    host: ModelHost,
    *,
    update_state: Callable[[str], Mapping[str, Any]] | None = None,
    workers: int = DEFAULT_WORKERS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    on_started: Callable[[], None] = lambda: None,
) -> Starlette:
    """The Starlette app of the endpoint (for embedding; :class:`InferenceServer` serves it)."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be positive, not {max_body_bytes}")
    ep = _Endpoints(host, update_state, workers, max_body_bytes, on_started)
    routes = [
        Route("/v2/health/live", ep.live, methods=["GET"]),
        Route("/v2/health/ready", ep.ready, methods=["GET"]),
        Route("/v2", ep.server_metadata, methods=["GET"]),
    ]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            Route(prefix, ep.model_metadata, methods=["GET"]),
            Route(f"{prefix}/ready", ep.model_ready, methods=["GET"]),
            Route(f"{prefix}/infer", ep.infer, methods=["POST"]),
        ]
    return Starlette(
        routes=routes, lifespan=ep.lifespan, exception_handlers={HTTPException: _http_error}
    )


# --------------------------------------------------------------------------- the server


class InferenceServer:
    """Serves :func:`build_app` with uvicorn on its own thread.

    The socket is bound in :meth:`start` before uvicorn runs, so the port is known
    (``port=0`` picks a free one) and an early client queues in the backlog
    instead of being refused. ``start`` and ``stop`` wait at most their timeouts.
    """

    def __init__(
        self,
        host: ModelHost,
        *,
        bind: str = "127.0.0.1",
        port: int = 0,
        update_state: Callable[[str], Mapping[str, Any]] | None = None,
        workers: int = DEFAULT_WORKERS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self._bind = bind
        self._requested_port = port
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._started = threading.Event()
        self._app = build_app(
            host,
            update_state=update_state,
            workers=workers,
            max_body_bytes=max_body_bytes,
            on_started=self._started.set,
        )
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the inference server is not started")
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the running endpoint."""
        host = f"[{self._bind}]" if ":" in self._bind else self._bind
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the inference server is already started")
        family = socket.AF_INET6 if ":" in self._bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._bind, self._requested_port))
            sock.listen(128)
        except OSError as e:
            sock.close()
            raise InferenceServerError(
                f"cannot listen on {self._bind}:{self._requested_port}: {e}"
            ) from e
        config = uvicorn.Config(
            self._app,
            log_config=None,  # leave the agent's logging configuration alone
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=max(1, int(self._stop_timeout_s / 2)),
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run,
            kwargs={"sockets": [sock]},
            name=f"edgeota-inference-{sock.getsockname()[1]}",
            daemon=True,
        )
        self._socket, self._server, self._thread = sock, server, thread
        thread.start()
        if not self._started.wait(self._start_timeout_s) or not thread.is_alive():
            self.stop()
            raise InferenceServerError(
                f"the inference server did not start within {self._start_timeout_s:g} s"
            )

    def stop(self) -> None:
        """Finish the requests in progress (bounded), stop uvicorn, close the socket."""
        server, thread, sock = self._server, self._thread, self._socket
        if server is not None and thread is not None:
            server.should_exit = True
            thread.join(self._stop_timeout_s / 2)
            if thread.is_alive():
                server.force_exit = True
                thread.join(self._stop_timeout_s / 2)
            alive = thread.is_alive()
        else:
            alive = False
        if sock is not None:
            sock.close()
        self._server = self._thread = self._socket = None
        self._started.clear()
        if alive:
            raise InferenceServerError(
                f"the inference server did not stop within {self._stop_timeout_s:g} s"
            )

    def __enter__(self) -> InferenceServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
