"""The ``custom`` fields edgeota puts into TUF target entries, in both repositories.

TUF signs ``custom`` together with the target's length and hashes, so these
fields are exactly as trustworthy as the role that signed them:

* in the **image repository** (signed by release managers, offline) they say
  what a bundle *is*: model name and version, the hardware it is built for, its
  release counter, the plaintext digest checked after decryption, and its I/O
  signature;
* in the **director repository** (signed online, per device) they say what one
  device should *do*: install this bundle, here is its content key wrapped to
  you. Nothing in the director's ``custom`` can widen what the image
  repository allows; the agent checks the two against each other.

Everything sits under one ``"edgeota"`` key so other tooling may add its own.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from edgeota.protocol.errors import ProtocolError
from edgeota.protocol.manifest import HARDWARE_PATTERN, NAME_PATTERN, SEMVER_PATTERN, TensorSpec

__all__ = [
    "CUSTOM_KEY",
    "DirectorTargetCustom",
    "ImageTargetCustom",
    "MalformedCustomError",
    "target_path_for",
]

CUSTOM_KEY = "edgeota"
_MAX_WRAPPED_KEY = 4096
_MAX_RELEASE_COUNTER = 2**53  # JSON-safe integers only


class MalformedCustomError(ProtocolError):
    """A target's ``custom`` does not hold well-formed edgeota fields."""


def target_path_for(name: str, version: str) -> str:
    """The TUF target path of a release: one immutable path per (model, version)."""
    return f"models/{name}/{version}.eotb"


_T = TypeVar("_T")


def _section(custom: Mapping[str, Any] | None, where: str) -> Mapping[str, Any]:
    section = custom.get(CUSTOM_KEY) if isinstance(custom, Mapping) else None
    if not isinstance(section, Mapping):
        raise MalformedCustomError(f"{where}: target has no custom.{CUSTOM_KEY} object")
    return section


def _get(data: Mapping[str, Any], key: str, kind: type[_T], where: str) -> _T:
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedCustomError(f"{where}: custom.{CUSTOM_KEY}.{key} must be {kind.__name__}")
    return value


def _counter(data: Mapping[str, Any], where: str) -> int:
    value = _get(data, "release_counter", int, where)
    if not 0 <= value < _MAX_RELEASE_COUNTER:
        raise MalformedCustomError(f"{where}: release_counter {value} out of range")
    return value


def _matches(pattern: re.Pattern[str], value: str, field: str, where: str) -> str:
    if not pattern.fullmatch(value):
        raise MalformedCustomError(f"{where}: {field} {value!r} does not match {pattern.pattern}")
    return value


@dataclass(frozen=True)
class ImageTargetCustom:
    """What a release *is*, as signed by the release managers."""

    name: str
    version: str
    hardware: tuple[str, ...]
    release_counter: int
    plaintext_sha256: str
    plaintext_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_custom(self) -> dict[str, Any]:
        return {
            CUSTOM_KEY: {
                "name": self.name,
                "version": self.version,
                "hardware": list(self.hardware),
                "release_counter": self.release_counter,
                "plaintext_sha256": self.plaintext_sha256,
                "plaintext_size": self.plaintext_size,
                "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs],
            }
        }

    @classmethod
    def from_custom(cls, custom: Mapping[str, Any] | None, where: str = "image target") -> (
        ImageTargetCustom
    ):
        data = _section(custom, where)
        hardware = _get(data, "hardware", list, where)
        if not hardware or not all(isinstance(h, str) for h in hardware):
            raise MalformedCustomError(f"{where}: hardware must be a non-empty list of strings")
        digest = _get(data, "plaintext_sha256", str, where)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise MalformedCustomError(f"{where}: plaintext_sha256 is not a sha256 hex digest")
        try:
            inputs = tuple(TensorSpec.from_dict(s, f"{where}.inputs") for s in
                           _get(data, "inputs", list, where))
            outputs = tuple(TensorSpec.from_dict(s, f"{where}.outputs") for s in
                            _get(data, "outputs", list, where))
        except ProtocolError as e:
            raise MalformedCustomError(f"{where}: {e}") from e
        size = _get(data, "plaintext_size", int, where)
        if size < 0:
            raise MalformedCustomError(f"{where}: plaintext_size must not be negative")
        return cls(
            name=_matches(NAME_PATTERN, _get(data, "name", str, where), "name", where),
            version=_matches(SEMVER_PATTERN, _get(data, "version", str, where), "version", where),
            hardware=tuple(_matches(HARDWARE_PATTERN, h, "hardware id", where) for h in hardware),
            release_counter=_counter(data, where),
            plaintext_sha256=digest,
            plaintext_size=size,
            inputs=inputs,
            outputs=outputs,
        )


@dataclass(frozen=True)
class DirectorTargetCustom:
    """What one device should install, as signed by the director (online key)."""

    device_id: str
    hardware_id: str
    release_counter: int
    wrapped_key: bytes

    def to_custom(self) -> dict[str, Any]:
        return {
            CUSTOM_KEY: {
                "device_id": self.device_id,
                "hardware_id": self.hardware_id,
                "release_counter": self.release_counter,
                "wrapped_key": base64.b64encode(self.wrapped_key).decode("ascii"),
            }
        }

    @classmethod
    def from_custom(cls, custom: Mapping[str, Any] | None, where: str = "director target") -> (
        DirectorTargetCustom
    ):
        data = _section(custom, where)
        encoded = _get(data, "wrapped_key", str, where)
        if len(encoded) > _MAX_WRAPPED_KEY * 2:
            raise MalformedCustomError(f"{where}: wrapped_key is too long")
        try:
            wrapped = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise MalformedCustomError(f"{where}: wrapped_key is not base64") from e
        return cls(
            device_id=_get(data, "device_id", str, where),
            hardware_id=_matches(HARDWARE_PATTERN, _get(data, "hardware_id", str, where),
                                 "hardware_id", where),
            release_counter=_counter(data, where),
            wrapped_key=wrapped,
        )
