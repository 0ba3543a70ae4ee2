"""SHA-256 on a second core while the first decrypts.

Opening a bundle hashes the same bytes up to three times (the sealed file for
TUF, the whole plaintext for signed metadata, each payload file for its
manifest pin). ``hashlib`` releases the GIL for large updates, so handing the
blocks to one worker thread lets hashing run beside decryption and disk
writes instead of after them. Memory stays bounded: the queue holds at most
``max_pending`` blocks, and a producer that outruns the worker simply waits.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from types import TracebackType
from typing import Protocol

__all__ = ["Digest", "DigestWorker", "SyncDigest"]

_STOP = object()


class Digest(Protocol):
    """The part of a hashlib object the bundle code uses."""

    def update(self, data: bytes) -> None: ...

    def hexdigest(self) -> str: ...


class SyncDigest:
    """A plain sha256, for callers without a worker (small inputs, tests)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _QueuedDigest:
    def __init__(self, worker: DigestWorker, batch_size: int) -> None:
        self._worker = worker
        self._hash = hashlib.sha256()
        self._batch: list[bytes] = []
        self._batched = 0
        self._batch_size = batch_size

    def update(self, data: bytes) -> None:
        # Only immutable bytes may cross threads: a reused buffer would be
        # overwritten before the worker reads it.
        self._batch.append(bytes(data) if not isinstance(data, bytes) else data)
        self._batched += len(data)
        # Hand over in large batches: every hand-over costs a GIL round trip,
        # which at 64 KiB granularity eats the gain of hashing in parallel.
        if self._batched >= self._batch_size:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            block = self._batch[0] if len(self._batch) == 1 else b"".join(self._batch)
            self._worker._submit(self._hash, block)
            self._batch.clear()
            self._batched = 0

    def hexdigest(self) -> str:
        self._flush()
        self._worker.wait_idle()
        return self._hash.hexdigest()


class DigestWorker:
    """One background thread that feeds blocks to the sha256 objects it handed out.

    Use as a context manager; ``digest()`` returns a new sha256 whose updates
    run on the worker and whose ``hexdigest()`` waits for them.
    """

    def __init__(self, max_pending: int = 8, batch_size: int = 256 * 1024) -> None:
        self._batch_size = batch_size
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max_pending)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="edgeota-digest", daemon=True)
        self._thread.start()

    def digest(self) -> Digest:
        return _QueuedDigest(self, self._batch_size)

    def _submit(self, target: hashlib._Hash, data: bytes) -> None:
        if self._closed:
            raise RuntimeError("digest worker is closed: take digests inside its with-block")
        self._queue.put((target, data))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                target, data = item  # type: ignore[misc]
                target.update(data)
            finally:
                self._queue.task_done()

    def wait_idle(self) -> None:
        """Block until every submitted block has been hashed."""
        self._queue.join()

    def close(self) -> None:
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def __enter__(self) -> DigestWorker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
