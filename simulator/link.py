"""Link profiles on the wire: a shaping TCP proxy between simulated devices and the broker.

A scenario's ``[links.NAME]`` may give a link a bandwidth and a latency. A
device on such a link does not connect to the broker directly: it connects to
one port of a :class:`LinkEmulator`, which opens its own connection to the
broker and copies the bytes both ways, shaped:

* **latency** -- a delay line: every byte read at ``t`` is written on at
  ``t + latency_ms`` at the earliest (one way; a round trip pays it twice);
* **bandwidth** -- a token bucket per direction and per connection (each device
  has its own link): at most ``bandwidth_kbps`` kilobits per second after a
  small burst (:func:`burst_bytes`).

The proxy works on bytes, so TLS passes through untouched: the device still
checks the broker's certificate and the broker the device's. Buffers are
bounded (:func:`queue_bytes`): when a direction's delay line is full the
proxy stops reading that side, and TCP pushes back on the sender, as a
congested link would. When either side closes (or fails), the proxy closes
both.

Every connection of every profile runs on one asyncio loop in one thread
(never a thread per connection), so a fleet of hundreds of shaped devices
costs one thread here. Profiles without bandwidth or latency get no port:
their devices connect to the broker directly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from edgeota.protocol.errors import EdgeotaError

__all__ = [
    "MAX_QUEUE_BYTES",
    "MIN_QUEUE_BYTES",
    "LinkCounters",
    "LinkEmulator",
    "LinkEmulatorError",
    "LinkShape",
    "burst_bytes",
    "queue_bytes",
]

logger = logging.getLogger(__name__)

MIN_QUEUE_BYTES = 64 * 1024
# Per direction and connection: bounds the proxy's memory at 2 MiB a connection. A
# delay line must hold rate x latency to keep the link busy; past this, a fast link
# with a long latency is slower than configured.
MAX_QUEUE_BYTES = 1024 * 1024
_READ_BYTES = 16 * 1024
_BURST_SECONDS = 0.02  # the token bucket holds this much of the rate ...
_MIN_BURST = 1024  # ... but at least a small packet's worth
_MAX_BURST = 64 * 1024


class LinkEmulatorError(EdgeotaError):
    """The link emulator could not start (a port, the loop) or names no such profile."""


@dataclass(frozen=True)
class LinkShape:
    """How one link profile treats the bytes of each of its connections."""

    bandwidth_kbps: float | None = None  # per direction; None: as fast as the host
    latency_ms: float = 0.0  # one way, added to each direction

    def __post_init__(self) -> None:
        if self.bandwidth_kbps is not None and self.bandwidth_kbps <= 0:
            raise ValueError("bandwidth_kbps must be positive (or None: unlimited)")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must not be negative")

    @property
    def shaped(self) -> bool:
        return self.bandwidth_kbps is not None or self.latency_ms > 0

    @property
    def rate(self) -> float | None:
        """Bytes per second, or ``None`` for unlimited."""
        return None if self.bandwidth_kbps is None else self.bandwidth_kbps * 1000 / 8


def burst_bytes(shape: LinkShape) -> int:
    """What a token bucket lets through at once: 20 ms of the rate, within bounds."""
    rate = shape.rate
    if rate is None:
        return _MAX_BURST
    return int(min(_MAX_BURST, max(_MIN_BURST, rate * _BURST_SECONDS)))


def queue_bytes(shape: LinkShape) -> int:
    """The delay line's bound for one direction: twice rate x latency, within bounds."""
    rate = shape.rate
    if rate is None:
        return MAX_QUEUE_BYTES if shape.latency_ms > 0 else MIN_QUEUE_BYTES
    wanted = 2 * rate * shape.latency_ms / 1000
    return int(min(MAX_QUEUE_BYTES, max(MIN_QUEUE_BYTES, wanted)))


@dataclass(frozen=True)
class LinkCounters:
    """One profile's traffic so far (snapshot)."""

    connections: int = 0  # accepted since the start
    open: int = 0  # proxied now
    bytes_up: int = 0  # device -> broker
    bytes_down: int = 0  # broker -> device
    refused: int = 0  # device connections the broker did not accept


class _TokenBucket:
    """At most ``rate`` bytes a second on average, ``capacity`` at once."""

    def __init__(self, rate: float, capacity: int, loop: asyncio.AbstractEventLoop) -> None:
        self._rate = rate
        self._capacity = capacity
        self._loop = loop
        self._tokens = float(capacity)
        self._stamp = loop.time()

    async def take(self, count: int) -> None:
        assert count <= self._capacity
        while True:
            now = self._loop.time()
            self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            if self._tokens >= count:
                self._tokens -= count
                return
            await asyncio.sleep((count - self._tokens) / self._rate)


class _Direction:
    """One way of one proxied connection: a bounded delay line, then the token bucket."""

    def __init__(self, shape: LinkShape, loop: asyncio.AbstractEventLoop,
                 count: collections.Counter[str], key: str) -> None:
        self._latency = shape.latency_ms / 1000
        self._limit = queue_bytes(shape)
        self._burst = burst_bytes(shape)
        rate = shape.rate
        self._bucket = None if rate is None else _TokenBucket(rate, self._burst, loop)
        self._loop = loop
        self._queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self._queued = 0
        self._room = asyncio.Event()
        self._ready = asyncio.Event()
        self._count = count
        self._key = key

    async def read(self, reader: asyncio.StreamReader) -> None:
        """Read while the delay line has room; an end or an error is queued as EOF."""
        try:
            while True:
                while self._queued >= self._limit:
                    self._room.clear()
                    await self._room.wait()  # back-pressure: the sender's TCP window fills
                data = await reader.read(min(_READ_BYTES, self._limit - self._queued))
                if not data:
                    break
                self._put(data)
        except OSError:
            pass  # reset by the peer: an end like any other
        finally:
            self._put(None)  # whatever ended the reading, the writer must end too

    def _put(self, data: bytes | None) -> None:
        self._queue.append((self._loop.time() + self._latency, data))
        self._queued += len(data) if data else 0
        self._ready.set()

    async def write(self, writer: asyncio.StreamWriter) -> None:
        """Write each piece once its latency passed and the bucket allows; stop at EOF."""
        with contextlib.suppress(OSError):
            while True:
                while not self._queue:
                    self._ready.clear()
                    await self._ready.wait()
                due, data = self._queue[0]
                delay = due - self._loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._queue.popleft()
                if data is None:
                    return
                for start in range(0, len(data), self._burst):
                    piece = data[start:start + self._burst]
                    if self._bucket is not None:
                        await self._bucket.take(len(piece))
                    writer.write(piece)
                    await writer.drain()
                    self._count[self._key] += len(piece)
                self._queued -= len(data)
                self._room.set()


class LinkEmulator:
    """One proxy port per shaped link profile, in front of ``upstream`` (the broker).

    Use :meth:`start` (or ``with``), then give a profile's devices
    :meth:`address` as their broker; :meth:`stop` closes every connection.
    """

    def __init__(self, upstream: tuple[str, int], shapes: Mapping[str, LinkShape], *,
                 host: str = "127.0.0.1", connect_timeout: float = 10.0) -> None:
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be positive")
        self._upstream = upstream
        self._shapes = {name: shape for name, shape in shapes.items() if shape.shaped}
        self._host = host
        self._connect_timeout = connect_timeout
        self._ports: dict[str, int] = {}
        self._counts: dict[str, collections.Counter[str]] = {
            name: collections.Counter() for name in self._shapes}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def profiles(self) -> list[str]:
        """The shaped profiles (the others get no port)."""
        return sorted(self._shapes)

    def address(self, profile: str) -> tuple[str, int]:
        """Where a device on ``profile`` connects instead of the broker."""
        if profile not in self._ports:
            raise LinkEmulatorError(f"no shaped link profile {profile!r} (shaped: "
                                    f"{self.profiles}); is the emulator started?")
        return self._host, self._ports[profile]

    def counters(self, profile: str) -> LinkCounters:
        count = self._counts[profile]
        return LinkCounters(connections=count["connections"], open=count["open"],
                            bytes_up=count["up"], bytes_down=count["down"],
                            refused=count["refused"])

    def start(self, timeout: float = 10.0) -> LinkEmulator:
        if self._thread is not None:
            raise RuntimeError("link emulator already started")
        self._thread = threading.Thread(target=self._run, name="sim-links", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise LinkEmulatorError(f"link emulator did not start within {timeout}s")
        if self._error is not None:
            raise LinkEmulatorError(f"link emulator failed to start: {self._error}")
        for name, port in self._ports.items():
            shape = self._shapes[name]
            logger.info("link profile shaped", extra={
                "profile": name, "port": port, "bandwidth_kbps": shape.bandwidth_kbps,
                "latency_ms": shape.latency_ms, "queue_bytes": queue_bytes(shape)})
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the ports and every proxied connection; wait for the thread (bounded)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive() and not loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("link emulator thread still running after %ss", timeout)
        self._thread = None

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop's thread ---------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self._open())
            except Exception as e:  # noqa: BLE001 - handed to start(), which raises it
                self._error = e
                return
            finally:
                self._started.set()
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _open(self) -> None:
        for name, shape in self._shapes.items():
            server = await asyncio.start_server(
                functools.partial(self._accept, name, shape),
                self._host, 0)
            self._servers.append(server)
            self._ports[name] = server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)

    async def _accept(self, name: str, shape: LinkShape, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        count = self._counts[name]
        count["connections"] += 1
        count["open"] += 1
        try:
            await self._proxy(name, shape, reader, writer, count)
        except asyncio.CancelledError:
            pass  # stop(): the end of this connection, not an error to report
        finally:
            count["open"] -= 1
            self._tasks.discard(task)

    async def _proxy(self, name: str, shape: LinkShape, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, count: collections.Counter[str]) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self._upstream), self._connect_timeout)
        except (OSError, TimeoutError) as e:
            count["refused"] += 1
            logger.warning("upstream refused a proxied connection: %s", e,
                           extra={"profile": name})
            writer.close()
            return
        for stream in (writer, up_writer):
            _no_delay(stream)
        loop = asyncio.get_running_loop()
        up = _Direction(shape, loop, count, "up")
        down = _Direction(shape, loop, count, "down")
        tasks = [asyncio.ensure_future(c) for c in (
            up.read(reader), up.write(up_writer), down.read(up_reader), down.write(writer))]
        try:
            # Either side's end (its EOF delivered, or a failed write) ends the connection:
            # readers always end by queueing an EOF, so waiting on the writers suffices.
            await asyncio.wait([tasks[1], tasks[3]], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for stream in (writer, up_writer):
                stream.close()
            for stream in (writer, up_writer):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(stream.wait_closed(), 1)


def _no_delay(writer: asyncio.StreamWriter) -> None:
    """Small MQTT frames must not wait for Nagle: the link's own latency is the point."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
