"""Shared fixtures: small sealed bundles built through the real writer."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgeota.protocol.bundle import BundleInfo, describe_payload, generate_content_key, seal_bundle
from edgeota.protocol.manifest import Manifest, TensorSpec
from edgeota.protocol.stream import DEFAULT_CHUNK_SIZE, AeadSuite
from edgeota.samples import SampleModel, load_catalog, load_test_split

# Real databases (SQLite and PostgreSQL) and a real server on loopback.
pytest_plugins = ["dbsupport", "server_support", "mosquitto_support"]


@pytest.fixture(scope="session")
def catalog() -> dict[str, SampleModel]:
    """What samples.json says about the sample models."""
    return load_catalog()


@pytest.fixture(scope="session")
def split() -> tuple[np.ndarray, np.ndarray]:
    """The digits test split (X float32 [450, 64], y int64)."""
    return load_test_split()


def mode_of(path: Path) -> int:
    """A file's permission bits, e.g. 0o600."""
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """umask 0 for the test: private files must be 0600 by construction, not by umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@dataclass(frozen=True)
class SealedFixture:
    """A bundle sealed from a random payload, with everything needed to open it."""

    info: BundleInfo
    content_key: bytes
    payload: bytes
    manifest: Manifest


def make_manifest(model: Path, **overrides: object) -> Manifest:
    fields: dict[str, object] = {
        "name": "digits",
        "version": "1.0.0",
        "model": describe_payload(model, "model.onnx"),
        "opset": 17,
        "inputs": (TensorSpec("input", "FP32", (None, 64)),),
        "outputs": (TensorSpec("label", "INT64", (None,)),),
        "hardware": ("rpi4",),
    }
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


@pytest.fixture
def seal_random(tmp_path: Path) -> Callable[..., SealedFixture]:
    """Seal a random model of ``size`` bytes; each call gets its own folder."""
    counter = iter(range(1_000_000))

    def build(
        size: int,
        suite: AeadSuite = AeadSuite.CHACHA20_POLY1305,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> SealedFixture:
        folder = tmp_path / f"sealed-{next(counter)}"
        folder.mkdir()
        payload = os.urandom(size)
        model = folder / "model.onnx"
        model.write_bytes(payload)
        manifest = make_manifest(model)
        key = generate_content_key()
        info = seal_bundle(
            manifest, {"model.onnx": model}, folder / "bundle.eotb", key,
            suite=suite, chunk_size=chunk_size,
        )
        return SealedFixture(info, key, payload, manifest)

    return build
