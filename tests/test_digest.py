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
