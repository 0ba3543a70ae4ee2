"""Resource limits of the parsers, as attacks: each asserts its typed refusal and its bound.

* A bundle whose sizes claim 2**63 bytes (a tar member, the manifest's pin, the
  sealed header's chunk size) is refused with a typed error before anything
  that size is allocated or written, and its staging folder is removed.
* A tar of a million members, generated lazily as a stream (never built in
  memory or on disk), is refused quickly and in bounded memory: by the member
  cap (64) in the archive reader, and in the whole bundle reader (sealed on
  the fly into a pipe) by the manifest, which names every member it accepts.
* The journal, ``agent.toml``, ``server.toml`` and the manifest, huge (a sparse
  file of gigabytes) or nested far deeper than the parser's stack, are
  refused with their own error types, reading no more than their bound.

Memory is measured with tracemalloc (peak of Python allocations, numpy's
included), time with a monotonic clock; both bounds are far below what the
unbounded version of each attack costs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import make_manifest

from edgeota.agent.journal import CorruptJournalError, Journal, State
from edgeota.protocol.archive import ExtractLimits, iter_members_from_blocks
from edgeota.protocol.bundle import open_bundle
from edgeota.protocol.errors import (
    EdgeotaError,
    MalformedBundleError,
    ManifestError,
    UnsafeArchiveError,
)
from edgeota.protocol.manifest import MANIFEST_PATH, MAX_MANIFEST_SIZE, Manifest
from edgeota.protocol.stream import HEADER_SIZE, MIN_CHUNK_SIZE, StreamSealer
from edgeota.runtime.agent_config import AgentConfig, AgentConfigError
from edgeota.server.config import SERVER_CONFIG, ConfigError, load_server_config

CONTENT_KEY = hashlib.sha256(b"test_parser_limits: throwaway content key").digest()
HUGE = 2**63 - 1  # the largest size a tar header (base-256) or a u64 field can claim
# Bounds the attacks are held to: a refusal reads headers, not payloads.
MAX_SECONDS = 10.0
MAX_PEAK = 16 * 1024 * 1024  # bytes of Python allocations at the peak


@dataclass
class Cost:
    seconds: float = 0.0
    peak: int = 0


def measured(action: Callable[[], Any], expected: type[BaseException]) -> tuple[Cost,
                                                                                 BaseException]:
    """Run ``action``, which must raise ``expected``; return what it cost and the error."""
    cost = Cost()
    started = time.monotonic()
    tracemalloc.start()
    try:
        with pytest.raises(expected) as caught:
            action()
        cost.peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    cost.seconds = time.monotonic() - started
    assert cost.seconds < MAX_SECONDS, f"refusal took {cost.seconds:.1f} s"
    assert cost.peak < MAX_PEAK, f"refusal peaked at {cost.peak / 2**20:.1f} MiB"
    return cost, caught.value


def tar_header(name: str, size: int) -> bytes:
    """One member's header block; sizes past ustar's 8 GiB are written base-256 (GNU)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info.tobuf(format=tarfile.GNU_FORMAT)


def seal(plaintext: bytes, dst: Path) -> None:
    with dst.open("wb") as raw, StreamSealer(raw, CONTENT_KEY, chunk_size=MIN_CHUNK_SIZE) as s:
        s.write(plaintext)


def assert_nothing_left(folder: Path, *keep: str) -> None:
    """Only ``keep`` in ``folder``: no destination, no staging folder, no partial file."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep)


# --------------------------------------------------------------------------- 2**63 bytes


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(os.urandom(3000))
    return path


def _huge_manifest_member(model: Path) -> bytes:
    # The first member is the manifest: its header claims 2**63 - 1 bytes.
    return tar_header(MANIFEST_PATH, HUGE)


def _huge_model_member(model: Path) -> bytes:
    # A valid manifest pins a 2**63 - 1 byte model, and the member's header agrees.
    manifest = make_manifest(model)
    doc = manifest.to_dict()
    doc["model"]["size"] = HUGE
    raw = json.dumps(doc).encode()
    Manifest.from_json(raw)  # the manifest itself is well formed
    return (tar_header(MANIFEST_PATH, len(raw)) + raw + bytes(-len(raw) % 512)
            + tar_header("model.onnx", HUGE))


def _huge_pin_small_member(model: Path) -> bytes:
    # The manifest pins 2**63 - 1 bytes; the member that follows is the real, small model.
    doc = make_manifest(model).to_dict()
    doc["model"]["size"] = HUGE
    raw = json.dumps(doc).encode()
    body = model.read_bytes()
    return (tar_header(MANIFEST_PATH, len(raw)) + raw + bytes(-len(raw) % 512)
            + tar_header("model.onnx", len(body)) + body + bytes(-len(body) % 512)
            + bytes(1024))


@pytest.mark.parametrize(("build", "expected"), [
    (_huge_manifest_member, UnsafeArchiveError),
    (_huge_model_member, UnsafeArchiveError),
    (_huge_pin_small_member, UnsafeArchiveError),
], ids=["manifest-member", "model-member", "manifest-pin"])
def test_a_bundle_claiming_2_63_bytes_is_refused_before_writing(
    tmp_path: Path, model: Path, build: Callable[[Path], bytes], expected: type[Exception],
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    src = work / "claims-2-63.bundle"
    seal(build(model), src)
    written: list[int] = []

    _, error = measured(lambda: open_bundle(src, CONTENT_KEY, work / "opened",
                                            progress=written.append), expected)
    assert str(HUGE) in str(error) or "limit" in str(error), error
    assert sum(written) < 64 * 1024, "bytes of the huge member were written"
    assert_nothing_left(work, src.name)


def test_a_sealed_header_claiming_4_gib_chunks_is_refused_before_reading_the_body(
    tmp_path: Path,
) -> None:
    """The header's chunk size is a u32: 2**32 - 1 would be a 4 GiB buffer per chunk."""
    work = tmp_path / "work"
    work.mkdir()
    src = work / "big-chunks.bundle"
    seal(b"x" * 5000, src)
    raw = bytearray(src.read_bytes())
    raw[6:10] = (2**32 - 1).to_bytes(4, "big")  # magic 4, version 1, suite 1, chunk size 4
    assert len(raw) > HEADER_SIZE
    src.write_bytes(bytes(raw))

    _, error = measured(lambda: open_bundle(src, CONTENT_KEY, work / "opened"),
                        MalformedBundleError)
    assert "chunk size" in str(error)
    assert_nothing_left(work, src.name)


# --------------------------------------------------------------------------- a million members

MILLION = 1_000_000


class LazyTar:
    """A tar stream of ``count`` empty members, made one header at a time as it is read,
    after the members of ``prefix`` (a manifest and its model, for a bundle)."""

    def __init__(self, count: int, prefix: bytes = b"") -> None:
        self.count = count
        self.prefix = prefix
        self.made = 0

    def blocks(self) -> Iterator[bytes]:
        if self.prefix:
            yield self.prefix
        for i in range(self.count):
            self.made += 1
            yield tar_header(f"m{i:07d}.bin", 0)
        yield bytes(1024)


def test_a_tar_of_a_million_members_is_refused_by_the_member_cap(tmp_path: Path) -> None:
    limits = ExtractLimits()
    tar = LazyTar(MILLION)
    dest = tmp_path / "unpacked"
    dest.mkdir()

    _, error = measured(lambda: list(iter_members_from_blocks(tar.blocks(), dest, limits)),
                        UnsafeArchiveError)
    assert f"more than {limits.max_members} members" in str(error)
    assert tar.made == limits.max_members + 1, "the reader went on past the cap"
    assert len(list(dest.iterdir())) == limits.max_members


def test_a_bundle_of_a_million_members_is_refused_while_it_streams(tmp_path: Path) -> None:
    """Sealed on the fly into a pipe, as a download would stream, after a valid manifest and
    model: the manifest pins every member, which refuses the first one it does not name (the
    member cap, 64, is looser than the manifest's 1 + 32 files), and the writer finds the pipe
    closed with some hundreds of members made, not a million."""
    work = tmp_path / "work"
    work.mkdir()
    pipe = work / "bundle.fifo"
    os.mkfifo(pipe)
    empty = tmp_path / "model.onnx"
    empty.write_bytes(b"")
    manifest = make_manifest(empty).to_json()
    prefix = (tar_header(MANIFEST_PATH, len(manifest)) + manifest + bytes(-len(manifest) % 512)
              + tar_header("model.onnx", 0))
    tar = LazyTar(MILLION, prefix)
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            with pipe.open("wb") as raw, StreamSealer(raw, CONTENT_KEY) as sealer:
                for block in tar.blocks():
                    sealer.write(block)
            outcome.append(None)
        except BrokenPipeError as e:  # the reader refused and closed its end
            outcome.append(e)

    writer = threading.Thread(target=write, name="million-member-sealer", daemon=True)
    writer.start()
    try:
        _, error = measured(lambda: open_bundle(pipe, CONTENT_KEY, work / "opened"),
                            EdgeotaError)
    finally:
        # Should the reader have failed before opening the pipe, unblock the writer.
        with open(os.open(pipe, os.O_RDONLY | os.O_NONBLOCK), "rb"):
            pass
        writer.join(timeout=30)
    assert not writer.is_alive(), "the sealer is still writing into the pipe"
    assert isinstance(error, UnsafeArchiveError), error
    assert "'m0000000.bin' is not named by the manifest" in str(error), error
    assert outcome and isinstance(outcome[0], BrokenPipeError), outcome
    assert tar.made < 10_000, f"{tar.made} members were made before the refusal"
    assert_nothing_left(work, pipe.name)


# --------------------------------------------------------------------------- huge and deep files

DEEP = 50_000  # levels: far past any parser's stack (CPython's limit is 1000)
GIB = 1024**3


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def _journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "journal-digits.json",
                   clock=lambda: datetime(2025, 3, 1, tzinfo=UTC))


def _private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


JOURNAL_ATTACKS = {
    "deep-array": b'{"format":1,"previous":' + b"[" * DEEP + b"]" * DEEP + b"}",
    "deep-object": b'{"format":1,"previous":' + b'{"a":' * 10_000 + b"0" + b"}" * 10_000 + b"}",
    "huge-integer": b'{"format":1,"saves":' + b"9" * 60_000 + b"}",
}


@pytest.mark.parametrize("attack", sorted(JOURNAL_ATTACKS))
def test_a_deep_or_huge_journal_is_corrupt_and_resets(tmp_path: Path, attack: str) -> None:
    journal = _journal(tmp_path)
    _private(journal.path, JOURNAL_ATTACKS[attack])
    measured(journal.load, CorruptJournalError)
    record = journal.load_or_reset()
    assert record.state is State.FAILED and record.previous is None
    assert _journal(tmp_path).load() == record


def test_a_gigabyte_journal_is_refused_without_being_read(tmp_path: Path) -> None:
    journal = _journal(tmp_path)
    _sparse(journal.path, 2 * GIB).chmod(0o600)
    measured(journal.load, CorruptJournalError)
    assert journal.load_or_reset().state is State.FAILED


TOML_ATTACKS = {
    "deep-array": b"[device]\nid = " + b"[" * DEEP + b"]" * DEEP + b"\n",
    "deep-inline-table": b"device = " + b"{a = " * 5_000 + b"1" + b"}" * 5_000 + b"\n",
    "huge-integer": b"[device]\nid = " + b"9" * 60_000 + b"\n",
}


@pytest.mark.parametrize("attack", sorted(TOML_ATTACKS))
def test_a_deep_or_huge_agent_toml_is_refused(tmp_path: Path, attack: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(TOML_ATTACKS[attack])
    measured(lambda: AgentConfig.load(path), AgentConfigError)


@pytest.mark.parametrize("attack", sorted(TOML_ATTACKS))
def test_a_deep_or_huge_server_toml_is_refused(tmp_path: Path, attack: str) -> None:
    (tmp_path / SERVER_CONFIG).write_bytes(TOML_ATTACKS[attack].replace(b"device", b"server"))
    measured(lambda: load_server_config(tmp_path), ConfigError)


def test_a_gigabyte_agent_toml_is_refused_without_being_read(tmp_path: Path) -> None:
    path = _sparse(tmp_path / "agent.toml", 2 * GIB)
    _, error = measured(lambda: AgentConfig.load(path), AgentConfigError)
    assert "larger than" in str(error)


def test_a_gigabyte_server_toml_is_refused_without_being_read(tmp_path: Path) -> None:
    _sparse(tmp_path / SERVER_CONFIG, 2 * GIB)
    _, error = measured(lambda: load_server_config(tmp_path), ConfigError)
    assert "larger than" in str(error)


@pytest.mark.parametrize("raw", [
    b"[" * DEEP + b"]" * DEEP,
    b'{"format":"edgeota.manifest/1","extra":' + b'{"a":' * 10_000 + b"0" + b"}" * 10_001,
    b'{"opset":' + b"9" * 60_000 + b"}",
    b" " * (MAX_MANIFEST_SIZE + 1),
], ids=["deep-array", "deep-object", "huge-integer", "oversize"])
def test_a_deep_or_huge_manifest_is_refused(raw: bytes) -> None:
    measured(lambda: Manifest.from_json(raw), ManifestError)
