"""A ``tuf.ngclient`` fetcher over the device's MQTT session (the fetch protocol).

:class:`MqttFetcher` implements ngclient's ``FetcherInterface`` on a
:class:`~edgeota.agent.mqtt_session.DeviceConnection`. The Updater
is configured with ``mqtt://`` base URLs whose path is the repository path,
the same paths as HTTP ``/repo/`` (:data:`MQTT_REPOSITORY_URL` +
``/image/metadata/``, ``/image/targets/``, ``/director/{id}/metadata/``); the
host part is only a label, the broker is the connection's. A bare repository
path (``image/metadata/timestamp.json``) is accepted too. The fetcher keeps
ngclient's error contract: error frames become ``DownloadHTTPError`` with
their code (403/404 mean "no such file" to ngclient), a server that stops
sending becomes ``SlowRetrievalError`` after ``timeout`` seconds, bytes beyond
what ngclient allows become ``DownloadLengthMismatchError``, and every frame
that is damaged, inconsistent, a duplicate, off the chunk grid or outside the
windows asked for ends the fetch with
:class:`~edgeota.agent.mqtt_session.FrameRejectedError` (a frame merely ahead
of its turn, inside what was asked, waits for its turn). All of them are
``DownloadError`` subclasses. Whenever a fetch ends early its request id is
unregistered (later frames are dropped) and a cancel is sent, so the server
stops too.

The *window* is the number of chunks a fetch keeps in flight. It is asked for
as :data:`~edgeota.protocol.fetch.PIPELINE_DEPTH` requests of a share of it
each (see :mod:`edgeota.protocol.fetch`): after the first chunk, the next
request goes out as soon as it fits in the window, so the round trip of a
request does not stall the transfer. Resumable bundle downloads on top of it
are :mod:`edgeota.agent.resumable`.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from collections.abc import Generator, Iterator
from typing import IO
from urllib.parse import unquote, urlsplit

from tuf.api import exceptions
from tuf.ngclient import FetcherInterface

from edgeota.agent.mqtt_session import (
    ConnectionLostError,
    DeviceConnection,
    Failure,
    FrameRejectedError,
)
from edgeota.protocol.fetch import (
    MAX_OFFSET,
    MAX_WINDOW,
    PIPELINE_DEPTH,
    ChunkFrame,
    ErrorFrame,
    FetchRequest,
    FrameError,
)

__all__ = [
    "DEFAULT_WINDOW",
    "MQTT_REPOSITORY_URL",
    "MqttFetcher",
    "repository_path",
]

MQTT_REPOSITORY_URL = "mqtt://edgeota"  # AgentConfig.repository_url for the MQTT transport
_URL_SCHEMES = ("mqtt", "mqtts")
DEFAULT_WINDOW = 32  # chunks in flight: PIPELINE_DEPTH (4) requests of 8


def repository_path(url: str) -> str:
    """The repository path of an ``mqtt://`` URL (or of a bare path).

    Raises:
        exceptions.DownloadError: another scheme, a query or fragment, or no path.
    """
    if "://" in url:
        parts = urlsplit(url)
        if parts.scheme not in _URL_SCHEMES or parts.query or parts.fragment:
            raise exceptions.DownloadError(f"not an mqtt:// repository URL: {url[:200]!r}")
        path = unquote(parts.path).lstrip("/")
    else:
        path = url
    if not path:
        raise exceptions.DownloadError(f"no repository path in {url[:200]!r}")
    return path



class MqttFetcher(FetcherInterface):
    """ngclient's network layer over a :class:`DeviceConnection`."""

    def __init__(
        self,
        connection: DeviceConnection,
        *,
        timeout: float = 30.0,  # seconds without a frame before SlowRetrievalError
        window: int = DEFAULT_WINDOW,  # chunks in flight, asked for in PIPELINE_DEPTH requests
        max_length: int = MAX_OFFSET,  # bound for plain fetch(); download_* pass their own
    ) -> None:
        if not 1 <= window <= PIPELINE_DEPTH * MAX_WINDOW:
            raise ValueError(f"window must be 1..{PIPELINE_DEPTH * MAX_WINDOW}")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._connection = connection
        self._timeout = timeout
        self._window = window
        # Chunks per request: the window's share (rounded up), so that a request
        # goes out while the one before it is still arriving.
        self._request_window = -(-window // PIPELINE_DEPTH)
        self._max_length = max_length

    @property
    def request_window(self) -> int:
        """Chunks asked for per request (what a server's ``max_window`` must allow)."""
        return self._request_window

    def stream(self, path: str, *, offset: int = 0,
               max_length: int = MAX_OFFSET) -> Generator[ChunkFrame, None, None]:
        """Yield the frames of ``path`` from ``offset`` on, checked and in order.

        Pipelined: once the first chunk has told the chunk size and the file's
        size, the next request goes out whenever it fits in the window, so at
        most ``window`` chunks are ever asked for and not yet yielded; frames
        that arrive ahead of their turn (requests served by different replicas)
        wait in a buffer bounded by what was asked for. Closing the generator
        early (the consumer stopped) cancels the request.

        Raises:
            exceptions.DownloadHTTPError: the server answered an error frame.
            exceptions.SlowRetrievalError: no frame for ``timeout`` seconds.
            exceptions.DownloadLengthMismatchError: the file exceeds ``max_length``.
            FrameRejectedError: a damaged, out-of-order or inconsistent frame.
            ConnectionLostError: the broker connection dropped.
        """
        rid = secrets.token_hex(8)
        step = self._request_window
        try:
            request = FetchRequest(rid, path, offset, step, max_length)
        except FrameError as e:
            raise exceptions.DownloadError(f"cannot request {path[:200]!r}: {e}") from e
        inbox = self._connection.open_stream(rid, capacity=self._window + 4)
        finished = False
        try:
            if not self._connection.wait_ready(self._timeout):
                raise ConnectionLostError(f"not connected within {self._timeout}s")
            self._connection.send(request)
            expected = offset  # the next byte to yield
            asked = -1  # end of the windows asked for, once the chunk size is known
            chunk = 0
            first: ChunkFrame | None = None
            ahead: dict[int, ChunkFrame] = {}  # frames that came before their turn
            while True:
                frame = ahead.pop(expected, None)
                if frame is None:
                    item = inbox.get(self._timeout)
                    if item is None:
                        raise exceptions.SlowRetrievalError(
                            f"no data for {path} within {self._timeout}s")
                    if isinstance(item, Failure):
                        raise item.error
                    if isinstance(item, ErrorFrame):
                        finished = True  # the server ended the request itself
                        raise exceptions.DownloadHTTPError(
                            f"{item.code} for {path}: {item.message}", item.code)
                    self._check(item, first, expected, max_length, path, chunk, asked)
                    if first is None:
                        first = item
                        if not item.last:
                            chunk = len(item.payload)
                            asked = offset + step * chunk
                    if item.offset != expected:
                        if item.offset in ahead:
                            raise FrameRejectedError(
                                f"chunk of {path} at offset {item.offset} received twice")
                        ahead[item.offset] = item
                        continue
                    frame = item
                expected += len(frame.payload)
                if frame.last:
                    finished = True
                    yield frame
                    return
                # Keep the pipeline full: ask for the next request as soon as it
                # fits in the window, never beyond the end of the file; before
                # handing the frame on, so that what the consumer does with it (a
                # write, waiting for a progress save) does not delay the ask.
                span, budget = step * chunk, self._window * chunk
                lost: ConnectionLostError | None = None
                try:
                    while asked < frame.total and asked + span - expected <= budget:
                        self._connection.send(FetchRequest(rid, path, asked, step, max_length))
                        asked += span
                except ConnectionLostError as e:
                    lost = e  # after the frame: a received byte is never fetched again
                yield frame
                if lost is not None:
                    raise lost
        finally:
            self._connection.close_stream(rid)
            if not finished:
                self._cancel(rid, path, max_length)

    @staticmethod
    def _check(frame: ChunkFrame, first: ChunkFrame | None, expected: int, max_length: int,
               path: str, chunk: int, asked: int) -> None:
        """Refuse a frame that is not a next piece of what was asked for.

        Before the chunk size is known (``chunk`` 0) the frame must be the very
        next one; after, it may be ahead of its turn, but it must sit on a chunk
        boundary inside the windows asked for, and only the file's last chunk
        may be shorter than the others.
        """
        if frame.total > max_length:
            raise exceptions.DownloadLengthMismatchError(
                f"{path} is {frame.total} bytes, more than the {max_length} allowed")
        if first is not None and (frame.total, frame.file_id) != (first.total, first.file_id):
            raise FrameRejectedError(f"{path} changed during the download")
        if frame.offset == expected and not chunk:
            return
        end = frame.offset + len(frame.payload)
        if (not chunk or frame.offset < expected or end > asked
                or (frame.offset - expected) % chunk
                or (len(frame.payload) != chunk and not frame.last)):
            raise FrameRejectedError(
                f"chunk of {path} at offset {frame.offset} ({len(frame.payload)} bytes), "
                f"expected {expected}")

    def _cancel(self, rid: str, path: str, max_length: int) -> None:
        """Best effort: tell the server to stop; it stops anyway after the current window."""
        with contextlib.suppress(ConnectionLostError):
            self._connection.send(FetchRequest(rid, path, 0, 0, max_length))

    def _fetch(self, url: str) -> Iterator[bytes]:
        # FetcherInterface.fetch promises bytes; a payload may be a view into its
        # frame, so it is copied here. The download paths ngclient uses
        # (download_file, and download_bytes through it) write the views directly.
        path = repository_path(url)
        return (bytes(frame.payload)
                for frame in self.stream(path, max_length=self._max_length))

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """ngclient's ``download_file``, passing ``max_length`` to the server as ``max``.

        The server then refuses an oversized file before sending a byte, and
        the stream stops at ``max_length`` whatever the server claims.
        """
        path = repository_path(url)
        with tempfile.TemporaryFile() as temp_file:
            for frame in self.stream(path, max_length=max_length):
                temp_file.write(frame.payload)
            temp_file.seek(0)
            yield temp_file


