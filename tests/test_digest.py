"""The background digest worker gives the same digests as hashlib, and fails loudly when misused."""

from __future__ import annotations

import hashlib
import os

import pytest

from edgeota.protocol.digest import DigestWorker


def test_worker_digests_match_hashlib() -> None:
    blocks = [os.urandom(n) for n in (0, 1, 65536, 300_000, 17, 2 * 1024 * 1024)]
    with DigestWorker(max_pending=2, batch_size=100_000) as worker:
        first, second = worker.digest(), worker.digest()
        for block in blocks:
            first.update(block)
            second.update(block[::-1])
        assert first.hexdigest() == hashlib.sha256(b"".join(blocks)).hexdigest()
        assert second.hexdigest() == hashlib.sha256(b"".join(b[::-1] for b in blocks)).hexdigest()


def test_updates_after_close_are_refused_instead_of_hanging() -> None:
    worker = DigestWorker(batch_size=1)
    digest = worker.digest()
    worker.close()
    with pytest.raises(RuntimeError, match="closed"):
        digest.update(b"late")


def test_a_buffer_reused_after_update_does_not_change_the_digest() -> None:
    buffer = bytearray(os.urandom(300_000))
    original = bytes(buffer)
    with DigestWorker(batch_size=1 << 20) as worker:
        digest = worker.digest()
        digest.update(buffer)  # still batched when the buffer changes
        digest.update(memoryview(original)[:10])  # a view of bytes is kept as it is
        buffer[:] = bytes(len(buffer))
        assert digest.hexdigest() == hashlib.sha256(original + original[:10]).hexdigest()


def test_each_digest_is_hashed_on_a_thread_of_its_own() -> None:
    import threading

    before = {t.name for t in threading.enumerate()}
    with DigestWorker() as worker:
        digests = [worker.digest(), worker.digest()]
        started = {t.name for t in threading.enumerate()} - before
        assert len([n for n in started if n.startswith("edgeota-digest")]) == len(digests)
    assert not any(t.name in started for t in threading.enumerate())
