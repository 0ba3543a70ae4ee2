"""SHA-256 on other cores while the first decrypts and writes.

Opening a bundle hashes up to three streams (the sealed file for TUF, the
whole plaintext for signed metadata, each payload file for its manifest pin)
and sealing one hashes three too. ``hashlib`` releases the GIL for large
updates, so each stream handed to a ``DigestWorker`` is hashed on a thread of
its own, beside decryption and disk writes instead of after them; with one
thread per stream the operating system spreads the streams over the cores
(one thread for all of them made that thread the bottleneck of a two-stream
open on two cores).

Hand-overs are batched (a list of blocks per queue item, ~1 MiB) because each
one costs a lock round trip, and nothing is joined or copied on the way. A
block is kept as it is when nothing can change it: ``bytes``, or a read-only
``memoryview`` (read-only is taken as a promise that its buffer is not
written while the view lives); anything else is copied once, so a reused buffer cannot
change under the worker. Large blocks also matter on the worker's side:
every ``update`` gives up and takes back the GIL. Memory stays bounded:
each stream's queue holds at most ``max_pending`` batches, and a producer
that outruns its thread waits.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from types import TracebackType
from typing import Protocol

__all__ = ["Block", "Digest", "DigestWorker", "SyncDigest"]

Block = bytes | bytearray | memoryview


class Digest(Protocol):
    """The part of a hashlib object the bundle code uses."""

    def update(self, data: Block) -> None: ...

    def hexdigest(self) -> str: ...


class SyncDigest:
    """A plain sha256 on the caller's thread, for small inputs and tests."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, data: Block) -> None:
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _frozen(data: Block) -> bytes | memoryview:
    """``data`` itself if no one changes it before the worker reads it, else a copy.

    ``bytes`` cannot change; a read-only ``memoryview`` is taken at its word:
    whoever made it read-only (``StreamOpener.blocks``, say) promises that
    the buffer under it is not written while the view lives.
    """
    if isinstance(data, bytes):
        return data
    if isinstance(data, memoryview) and data.readonly:
        return data
    return bytes(data)


class _Stream:
    """One sha256 fed by its own thread through a bounded queue of block batches."""

    def __init__(self, name: str, max_pending: int) -> None:
        self.hash = hashlib.sha256()
        # None stops the thread.
        self.queue: queue.Queue[list[bytes | memoryview] | None] = queue.Queue(max_pending)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                for block in item:
                    self.hash.update(block)
            finally:
                self.queue.task_done()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()


class _QueuedDigest:
    def __init__(self, worker: DigestWorker, stream: _Stream, batch_size: int) -> None:
        self._worker = worker
        self._stream = stream
        self._batch: list[bytes | memoryview] = []
        self._batched = 0
        self._batch_size = batch_size

    def update(self, data: Block) -> None:
        if self._worker.closed:
            raise RuntimeError("digest worker is closed: take digests inside its with-block")
        self._batch.append(_frozen(data))
        self._batched += len(data)
        if self._batched >= self._batch_size:
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            if self._worker.closed:
                raise RuntimeError("digest worker is closed: take digests inside its with-block")
            self._stream.queue.put(self._batch)
            self._batch = []
            self._batched = 0

    def hexdigest(self) -> str:
        self._flush()
        self._stream.queue.join()
        return self._stream.hash.hexdigest()


class DigestWorker:
    """Background sha256s: each ``digest()`` is hashed on a thread of its own.

    Use as a context manager; a digest's ``update`` hands the block over and
    returns (waiting only when ``max_pending`` batches are already queued), and
    its ``hexdigest()`` waits for the blocks handed over so far. Leaving the
    block stops the threads; updates after that raise ``RuntimeError``.
    """

    def __init__(self, max_pending: int = 4, batch_size: int = 1024 * 1024) -> None:
        self._max_pending = max_pending
        self._batch_size = batch_size
        self._streams: list[_Stream] = []
        self.closed = False

    def digest(self) -> Digest:
        if self.closed:
            raise RuntimeError("digest worker is closed: take digests inside its with-block")
        stream = _Stream(f"edgeota-digest-{len(self._streams)}", self._max_pending)
        self._streams.append(stream)
        return _QueuedDigest(self, stream, self._batch_size)

    def wait_idle(self) -> None:
        """Block until every block handed over has been hashed."""
        for stream in self._streams:
            stream.queue.join()

    def close(self) -> None:
        self.closed = True
        for stream in self._streams:
            stream.stop()

    def __enter__(self) -> DigestWorker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
