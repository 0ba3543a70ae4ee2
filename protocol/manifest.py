"""The bundle manifest: what a release claims about its model, checked on read.

The manifest travels inside the sealed bundle, so it is authentic once the
bundle opens; its digest chain (plaintext sha256 in signed TUF metadata, model
sha256 in the manifest) ties the model bytes to what release managers signed.
Parsing is strict: unknown fields, wrong types, impossible shapes and oversize
content are refused here, at the boundary, so nothing downstream meets a dict.

Tensors use the Open Inference Protocol v2 JSON form (``name``, ``datatype``,
``shape``, flat row-major ``data``), the same form the device's inference
endpoint speaks, so vectors can be replayed through it unchanged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeota.protocol.errors import ManifestError

__all__ = [
    "DATATYPES",
    "MANIFEST_FORMAT",
    "MAX_MANIFEST_SIZE",
    "ONNXRUNTIME_TYPES",
    "GoldenSet",
    "Manifest",
    "PayloadFile",
    "Tensor",
    "TensorSpec",
    "ValidationVectors",
]

MANIFEST_FORMAT = "edgeota.manifest/1"
VECTORS_FORMAT = "edgeota.vectors/1"
GOLDEN_FORMAT = "edgeota.golden/1"
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_TENSOR_ELEMENTS = 1_000_000
MAX_TENSORS = 64
MAX_HARDWARE_IDS = 64
MAX_EXTERNAL_FILES = 32

# Open Inference Protocol v2 datatypes and the Python values each accepts.
DATATYPES: dict[str, type] = {
    "BOOL": bool,
    "UINT8": int,
    "UINT16": int,
    "UINT32": int,
    "UINT64": int,
    "INT8": int,
    "INT16": int,
    "INT32": int,
    "INT64": int,
    "FP16": float,
    "FP32": float,
    "FP64": float,
    "BYTES": str,
}

# onnxruntime's type strings -> Open Inference Protocol v2 datatypes. Plain
# strings, so the server (manifest builder) and the agent (validation gate)
# share one table without either importing the other.
ONNXRUNTIME_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
HARDWARE_PATTERN = NAME_PATTERN
# Semantic Versioning 2.0.0, as published at semver.org.
SEMVER_PATTERN = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# Relative, forward-slash paths of plain names: the tar reader enforces the same.
PAYLOAD_PATH_PATTERN = re.compile(
    r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,127}){0,3}"
)
MANIFEST_PATH = "manifest.json"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ManifestError(message)


def _expect_keys(
    data: Mapping[str, Any], where: str, required: set[str], optional: set[str]
) -> None:
    _require(isinstance(data, Mapping), f"{where} must be an object")
    missing = required - data.keys()
    _require(not missing, f"{where} lacks {', '.join(sorted(missing))}")
    unknown = data.keys() - required - optional
    _require(not unknown, f"{where} has unknown field(s) {', '.join(sorted(unknown))}")


def _str(
    data: Mapping[str, Any], key: str, where: str, pattern: re.Pattern[str] | None = None
) -> str:
    value = data[key]
    if not isinstance(value, str):
        raise ManifestError(f"{where}.{key} must be a string")
    if pattern is not None:
        _require(
            pattern.fullmatch(value) is not None,
            f"{where}.{key} {value!r} does not match {pattern.pattern}",
        )
    return value


def _int(value: Any, where: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ManifestError(f"{where} must be an integer >= {minimum}")
    return value


def _finite(value: float) -> bool:
    """``math.isfinite`` that answers False, instead of raising, for an int beyond any float."""
    try:
        return math.isfinite(value)
    except OverflowError:  # JSON integers are unbounded: 1 followed by 400 zeros
        return False


def _float(value: Any, where: str, minimum: float = 0.0) -> float:
    _require(
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and _finite(value)
        and value >= minimum,
        f"{where} must be a finite number >= {minimum}",
    )
    return float(value)


def _list(value: Any, where: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise ManifestError(f"{where} must be a list")
    _require(len(value) <= limit, f"{where} has {len(value)} entries (limit {limit})")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, OIP datatype and shape (``None`` = any size)."""

    name: str
    datatype: str
    shape: tuple[int | None, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> TensorSpec:
        _expect_keys(data, where, {"name", "datatype", "shape"}, set())
        name = _str(data, "name", where)
        _require(0 < len(name) <= 256, f"{where}.name must be 1..256 characters")
        datatype = _str(data, "datatype", where)
        _require(datatype in DATATYPES, f"{where}.datatype {datatype!r} is not an OIP v2 type")
        dims = _list(data["shape"], f"{where}.shape", 16)
        shape = tuple(None if d is None else _int(d, f"{where}.shape[]") for d in dims)
        return cls(name, datatype, shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether a concrete tensor shape fits this spec."""
        return len(shape) == len(self.shape) and all(
            want is None or want == got for want, got in zip(self.shape, shape, strict=True)
        )


@dataclass(frozen=True)
class Tensor:
    """A concrete tensor in OIP v2 JSON form (flat, row-major ``data``)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: tuple[Any, ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> Tensor:
        _expect_keys(data, where, {"name", "datatype", "shape", "data"}, {"parameters"})
        spec = TensorSpec.from_dict({k: data[k] for k in ("name", "datatype", "shape")}, where)
        _require(None not in spec.shape, f"{where}.shape must be concrete")
        shape = tuple(d for d in spec.shape if d is not None)
        count = math.prod(shape)
        _require(
            count <= MAX_TENSOR_ELEMENTS,
            f"{where} has {count} elements (limit {MAX_TENSOR_ELEMENTS})",
        )
        values = _list(data["data"], f"{where}.data", MAX_TENSOR_ELEMENTS)
        _require(
            len(values) == count, f"{where}.data has {len(values)} values, shape needs {count}"
        )
        kind = DATATYPES[spec.datatype]
        # JSON yields exact types, so one C-level pass over the value types settles
        # almost every tensor; the per-value check runs only when some type is not
        # one of them (subclasses, or a wrong value to name). Golden sets hold tens
        # of thousands of values, parsed on every device update.
        if not set(map(type, values)) <= _EXACT_TYPES[kind]:
            for value in values:
                _require(_value_is(value, kind),
                         f"{where}.data holds {value!r}, not {spec.datatype}")
        # Python's json reads NaN and Infinity; no tolerance can compare them.
        if kind is float and not all(map(_finite, values)):
            bad = next(v for v in values if not _finite(v))
            _require(False, f"{where}.data holds {bad!r}: values must be finite")
        # JSON integers are unbounded; numpy cannot hold one outside the datatype's
        # range (the validation gate would fail with OverflowError, not a refusal).
        if kind is int and values:
            low, high = _INT_RANGES[spec.datatype]
            _require(low <= min(values) and max(values) <= high,
                     f"{where}.data holds a value outside {spec.datatype}'s range")
        return cls(spec.name, spec.datatype, shape, tuple(values))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "datatype": self.datatype,
            "shape": list(self.shape),
            "data": list(self.data),
        }


# The exact Python types JSON gives for each kind of tensor value (bool is an int
# subclass, so it never counts as a number here).
_INT_RANGES: dict[str, tuple[int, int]] = {
    f"{'U' if unsigned else ''}INT{bits}": ((0, 2**bits - 1) if unsigned
                                            else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    for bits in (8, 16, 32, 64) for unsigned in (False, True)
}
_EXACT_TYPES: dict[type, frozenset[type]] = {
    bool: frozenset({bool}),
    int: frozenset({int}),
    float: frozenset({int, float}),
    str: frozenset({str}),
}


def _value_is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _tensors(value: Any, where: str) -> tuple[Tensor, ...]:
    items = _list(value, where, MAX_TENSORS)
    tensors = tuple(Tensor.from_dict(item, f"{where}[{i}]") for i, item in enumerate(items))
    names = [t.name for t in tensors]
    _require(len(set(names)) == len(names), f"{where} names a tensor twice")
    return tensors


@dataclass(frozen=True)
class ValidationVectors:
    """Known inputs and the outputs the model must reproduce within tolerance."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    atol: float
    rtol: float

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "vectors") -> ValidationVectors:
        _expect_keys(data, where, {"inputs", "outputs", "atol", "rtol"}, {"format"})
        if "format" in data:
            _require(data["format"] == VECTORS_FORMAT, f"{where}.format must be {VECTORS_FORMAT}")
        inputs = _tensors(data["inputs"], f"{where}.inputs")
        outputs = _tensors(data["outputs"], f"{where}.outputs")
        _require(bool(inputs) and bool(outputs), f"{where} needs at least one input and one output")
        return cls(
            inputs,
            outputs,
            _float(data["atol"], f"{where}.atol"),
            _float(data["rtol"], f"{where}.rtol"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "atol": self.atol,
            "rtol": self.rtol,
        }


@dataclass(frozen=True)
class GoldenSet:
    """Labelled inputs and the accuracy floor a release must reach on them."""

    inputs: tuple[Tensor, ...]
    label_output: str
    labels: tuple[int, ...]
    min_accuracy: float

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "golden") -> GoldenSet:
        _expect_keys(data, where, {"inputs", "label_output", "labels", "min_accuracy"}, {"format"})
        if "format" in data:
            _require(data["format"] == GOLDEN_FORMAT, f"{where}.format must be {GOLDEN_FORMAT}")
        inputs = _tensors(data["inputs"], f"{where}.inputs")
        _require(bool(inputs), f"{where} needs inputs")
        labels = tuple(
            _int(v, f"{where}.labels[]")
            for v in _list(data["labels"], f"{where}.labels", MAX_TENSOR_ELEMENTS)
        )
        rows = inputs[0].shape[0] if inputs[0].shape else 1
        _require(len(labels) == rows, f"{where} has {len(labels)} labels for {rows} input rows")
        accuracy = _float(data["min_accuracy"], f"{where}.min_accuracy")
        _require(accuracy <= 1.0, f"{where}.min_accuracy must be at most 1.0")
        return cls(inputs, _str(data, "label_output", where), labels, accuracy)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "label_output": self.label_output,
            "labels": list(self.labels),
            "min_accuracy": self.min_accuracy,
        }


@dataclass(frozen=True)
class PayloadFile:
    """A file inside the bundle besides the manifest, pinned by digest and size."""

    path: str
    sha256: str
    size: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> PayloadFile:
        _expect_keys(data, where, {"path", "sha256", "size"}, set())
        path = _str(data, "path", where, PAYLOAD_PATH_PATTERN)
        _require(
            path != MANIFEST_PATH and ".." not in path.split("/"),
            f"{where}.path {path!r} is reserved or unsafe",
        )
        return cls(
            path, _str(data, "sha256", where, SHA256_PATTERN), _int(data["size"], f"{where}.size")
        )

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class Manifest:
    """What a release claims about its model: built by ``release publish``, checked on read."""

    name: str
    version: str
    model: PayloadFile
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    hardware: tuple[str, ...]
    external_data: tuple[PayloadFile, ...] = ()
    validation: ValidationVectors | None = None
    golden: GoldenSet | None = None
    latency_budget_ms: float | None = None
    description: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Constructed in code or parsed: the same invariants hold.
        self.from_dict(self.to_dict())

    @property
    def files(self) -> tuple[PayloadFile, ...]:
        """Every payload file, model first: exactly the tar members after the manifest."""
        return (self.model, *self.external_data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        where = "manifest"
        _expect_keys(
            data,
            where,
            {"format", "name", "version", "model", "opset", "inputs", "outputs", "hardware"},
            {"external_data", "validation", "golden", "latency_budget_ms", "description", "extra"},
        )
        _require(
            data["format"] == MANIFEST_FORMAT,
            f"manifest.format {data['format']!r} is not {MANIFEST_FORMAT}",
        )
        model = PayloadFile.from_dict(data["model"], f"{where}.model")
        external = tuple(
            PayloadFile.from_dict(item, f"{where}.external_data[{i}]")
            for i, item in enumerate(
                _list(data.get("external_data", []), f"{where}.external_data", MAX_EXTERNAL_FILES)
            )
        )
        paths = [f.path for f in (model, *external)]
        _require(len(set(paths)) == len(paths), "manifest names a payload file twice")
        inputs = tuple(
            TensorSpec.from_dict(d, f"{where}.inputs[{i}]")
            for i, d in enumerate(_list(data["inputs"], f"{where}.inputs", MAX_TENSORS))
        )
        outputs = tuple(
            TensorSpec.from_dict(d, f"{where}.outputs[{i}]")
            for i, d in enumerate(_list(data["outputs"], f"{where}.outputs", MAX_TENSORS))
        )
        _require(bool(inputs) and bool(outputs), "manifest needs at least one input and output")
        hardware_list = _list(data["hardware"], f"{where}.hardware", MAX_HARDWARE_IDS)
        _require(bool(hardware_list), "manifest.hardware must name at least one hardware id")
        hardware = tuple(
            _str({"hw": hw}, "hw", f"{where}.hardware[]", HARDWARE_PATTERN) for hw in hardware_list
        )
        validation = (
            ValidationVectors.from_dict(data["validation"], f"{where}.validation")
            if data.get("validation") is not None
            else None
        )
        golden = (
            GoldenSet.from_dict(data["golden"], f"{where}.golden")
            if data.get("golden") is not None
            else None
        )
        latency = data.get("latency_budget_ms")
        extra = data.get("extra", {})
        _require(
            isinstance(extra, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()),
            "manifest.extra must map strings to strings",
        )
        description = data.get("description", "")
        _require(
            isinstance(description, str) and len(description) <= 4096,
            "manifest.description must be a string of at most 4096 characters",
        )
        manifest = object.__new__(cls)  # skip __post_init__: the dict was just checked
        for name, value in {
            "name": _str(data, "name", where, NAME_PATTERN),
            "version": _str(data, "version", where, SEMVER_PATTERN),
            "model": model,
            "opset": _int(data["opset"], f"{where}.opset", 1),
            "inputs": inputs,
            "outputs": outputs,
            "hardware": hardware,
            "external_data": external,
            "validation": validation,
            "golden": golden,
            "latency_budget_ms": None
            if latency is None
            else _float(latency, f"{where}.latency_budget_ms"),
            "description": description,
            "extra": dict(extra),
        }.items():
            object.__setattr__(manifest, name, value)
        return manifest

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "version": self.version,
            "model": self.model.to_dict(),
            "opset": self.opset,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "hardware": list(self.hardware),
        }
        if self.external_data:
            data["external_data"] = [f.to_dict() for f in self.external_data]
        if self.validation is not None:
            data["validation"] = self.validation.to_dict()
        if self.golden is not None:
            data["golden"] = self.golden.to_dict()
        if self.latency_budget_ms is not None:
            data["latency_budget_ms"] = self.latency_budget_ms
        if self.description:
            data["description"] = self.description
        if self.extra:
            data["extra"] = dict(self.extra)
        return data

    def to_json(self) -> bytes:
        """Canonical bytes (sorted keys, no spaces): equal manifests serialise equally."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        _require(
            len(raw) <= MAX_MANIFEST_SIZE,
            f"manifest is {len(raw)} bytes (limit {MAX_MANIFEST_SIZE})",
        )
        try:
            data = json.loads(raw)
        # ValueError: bad UTF-8 or syntax, and integers past CPython's 4300-digit
        # limit; RecursionError: nesting deeper than the parser's stack.
        except (ValueError, RecursionError) as e:
            raise ManifestError(f"manifest is not valid JSON: {e}") from e
        return cls.from_dict(data)
