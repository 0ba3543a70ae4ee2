"""One network thread for many paho MQTT clients: a fleet of agents in a few processes.

Why this exists: paho's ``loop_start()`` gives every client a thread of its
own. Measured on the project's machine (2 cores, paho 2.2, Mosquitto 2.0.11),
1000 clients each with its own ``loop_start()`` thread in one process missed
CONNECT timeouts and delivery stalled; the same 1000 clients driven from one
thread with a ``selectors`` loop connected in 0.2 s and received 5 MiB each in
12.5 s. Part of it is a hard limit: paho's own loop waits with ``select()``,
which cannot watch a descriptor above 1023, and ``loop_start()`` costs three
descriptors per client (its socket and a wake-up socketpair), so past about
340 clients per process the rest cycle through failing reconnects without
reporting a failure. Below that limit, threads still cost: at 300 clients the
threaded mode needs 2-3 times the CPU to receive the same bytes.
``bench/mqtt_clients.py`` measures both. A fleet simulator runs hundreds to a
thousand real agents per process, so their connections share this loop (which
waits with epoll where there is one). A single agent keeps ``loop_start()``
(:class:`~edgeota.agent.mqtt_session.DeviceConnection` without a loop), which
behaves the same. It lives in the simulator, its only user: a device runs one client.

How: paho's external-event-loop interface, used as designed.

* A socket is registered for reading when its connection is open and
  unregistered in ``on_socket_close`` (called before paho closes it);
  ``on_socket_register_write`` / ``on_socket_unregister_write`` toggle
  ``EVENT_WRITE``. On readiness the loop calls ``loop_read()`` and then
  ``loop_write()`` while ``want_write()``; ``loop_misc()`` runs for every
  client about once a second (keepalive pings, CONNACK and PINGRESP timeouts).
* Other threads call ``publish()`` / ``subscribe()``; paho then calls
  ``on_socket_register_write`` on *their* thread. Only the loop thread ever
  touches the selector: other threads queue the client and wake the loop
  through a socketpair registered in the selector.
* ``reconnect()`` opens the TCP connection and completes the TLS handshake
  blocking (bounded by ``client.connect_timeout``). It runs on a small pool of
  connector threads, never on the loop thread, so one slow handshake cannot
  stall the traffic of every other client. While a connector holds a client
  the loop does not touch it.
* A connection that drops, or a connect that fails, is retried as
  ``loop_start()`` would, with exponential backoff (reset by a successful
  CONNACK) and jitter, so a fleet cut off together does not come back in
  lock-step. A client whose ``disconnect()`` the application called is left
  disconnected.
* An exception from one client (a callback raising with
  ``suppress_exceptions`` off, a bug) is logged with the client id; that
  client's socket is closed and it reconnects with backoff. The loop goes on.

Bounds: ``max_clients`` clients, ``connect_workers`` connector threads, every
wait in :meth:`SharedNetworkLoop.remove` and :meth:`SharedNetworkLoop.stop`
has a timeout, queues hold at most a few entries per client.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import heapq
import logging
import queue
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

__all__ = ["LoopCounters", "SharedNetworkLoop"]

logger = logging.getLogger(__name__)

ConnectFailed = Callable[[mqtt.Client, BaseException], None]
#: One client's paho reads and writes: ``step(entry, read=..., write=...)``.
DriveStep = Callable[..., None]

_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE
_MAX_SELECT = 1.0  # seconds: the loop never sleeps longer than this
_WAKE_DRAIN = 4096  # bytes read from the wake socket at a time
# paho has no public "the application asked to disconnect" accessor; loop_forever()
# tests its private state against these two, and so do we (by name, paho >= 2.1).


class _State(enum.Enum):
    IDLE = "idle"  # not connected and nothing scheduled (disconnected on purpose)
    WAITING = "waiting"  # a connect attempt is scheduled
    CONNECTING = "connecting"  # a connector thread is inside client.reconnect()
    OPEN = "open"  # the socket is registered: the loop drives the client


@dataclass(frozen=True)
class LoopCounters:
    """A snapshot of what the loop did (for reports, tests and the simulator)."""

    clients: int = 0
    open: int = 0  # clients whose socket is registered (connected or awaiting CONNACK)
    connect_attempts: int = 0
    connect_failures: int = 0
    client_errors: int = 0  # exceptions raised by a client inside the loop


@dataclass(eq=False)
class _Removal:
    deadline: float
    waiters: list[threading.Event] = field(default_factory=list)
    clean: bool = True


@dataclass(eq=False)
class _Entry:
    client: mqtt.Client
    name: str
    on_connect_failed: ConnectFailed | None
    min_delay: float
    max_delay: float
    saved: tuple[Any, Any, Any, Any, Any]  # the client's own callbacks, restored on removal
    # paho said the last disconnect was the application's own (a success code):
    # such a client is left disconnected, as loop_start() would leave it.
    asked_to_disconnect: bool = False
    state: _State = _State.IDLE
    gen: int = 0  # bumped by every scheduled attempt and by removal: stale results are dropped
    sock: Any = None  # the socket registered in the selector
    events: int = 0
    failures: int = 0  # consecutive connects without a CONNACK
    removing: _Removal | None = None


@dataclass(frozen=True)
class _Add:
    entry: _Entry


@dataclass(frozen=True)
class _Connect:
    entry: _Entry


@dataclass(frozen=True)
class _Connected:
    entry: _Entry
    gen: int
    error: BaseException | None
    skipped: bool = False  # the loop is stopping: reconnect() was not called


@dataclass(frozen=True)
class _Closed:
    entry: _Entry
    sock: Any


@dataclass(frozen=True)
class _Remove:
    entry: _Entry
    deadline: float
    done: threading.Event


@dataclass(frozen=True)
class _Stop:
    deadline: float


_Command = _Add | _Connect | _Connected | _Closed | _Remove | _Stop


class SharedNetworkLoop:
    """Drives any number of paho clients from one thread (see the module docstring).

    ``min_delay``/``max_delay`` bound the reconnect backoff (seconds, before a
    jitter factor of 0.5..1.5); :meth:`add` and :meth:`connect` may set them per
    client. ``misc_interval`` is how often ``loop_misc()`` runs for every client.
    ``wrap_drive``, an instrumentation seam, wraps the step that runs paho's
    reads and writes for one client (the fleet bench's profiler uses it).
    """

    def __init__(
        self,
        *,
        name: str = "edgeota-mqtt-loop",
        min_delay: float = 0.5,
        max_delay: float = 30.0,
        connect_workers: int = 4,
        misc_interval: float = 1.0,
        max_clients: int = 10_000,
        rng: random.Random | None = None,
        wrap_drive: Callable[[DriveStep], DriveStep] | None = None,
    ) -> None:
        if not 0 < min_delay <= max_delay:
            raise ValueError("need 0 < min_delay <= max_delay")
        if not 1 <= connect_workers <= 64:
            raise ValueError("connect_workers must be 1..64")
        if misc_interval <= 0 or max_clients < 1:
            raise ValueError("misc_interval and max_clients must be positive")
        self._name = name
        self._min_delay, self._max_delay = min_delay, max_delay
        self._workers_wanted = connect_workers
        self._misc_interval = misc_interval
        self._max_clients = max_clients
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not secrets)
        self._lock = threading.Lock()
        self._entries: dict[mqtt.Client, _Entry] = {}
        self._commands: collections.deque[_Command] = collections.deque()
        self._dirty: set[_Entry] = set()  # want a write: queued by any thread
        self._pending: set[_Entry] = set()  # TLS bytes decrypted but unread (select cannot see)
        self._timers: list[tuple[float, int, str, _Entry, int]] = []
        self._seq = 0
        self._connect_queue: queue.Queue[tuple[_Entry, int] | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._thread: threading.Thread | None = None
        self._ident: int | None = None
        self._driving: _Entry | None = None  # the client _drive() is running paho for
        self._drive_step: DriveStep = self._drive if wrap_drive is None else wrap_drive(
            self._drive)
        self._started = False
        self._stopping = False
        self._stop_deadline = 0.0
        self._counts = {"connect_attempts": 0, "connect_failures": 0, "client_errors": 0}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False
        self._selector.register(self._wake_r, _READ, None)

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> SharedNetworkLoop:
        """Start the loop thread and the connector threads; returns at once."""
        with self._lock:
            if self._started:
                raise RuntimeError("the network loop was already started")
            self._started = True
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._workers = [
                threading.Thread(target=self._connector, name=f"{self._name}-connect-{i}",
                                 daemon=True)
                for i in range(self._workers_wanted)
            ]
        for worker in self._workers:
            worker.start()
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Disconnect every client cleanly, then end all threads; at most ``timeout`` seconds.

        Clients still connected after half the timeout have their socket closed
        without a DISCONNECT (the broker then publishes their last will). Returns
        False if a thread is still alive at the deadline: a connector blocked in a
        TCP connect or TLS handshake ends by itself after ``client.connect_timeout``.
        """
        started = time.monotonic()
        deadline = started + timeout
        if self._on_loop_thread():  # from a callback: the loop ends after this round
            self._post(_Stop(deadline), wake=False)
            return False
        with self._lock:
            thread, self._started = self._thread, True  # never (re)started after stop()
        if thread is None:
            self._shutdown()
            return True
        if not thread.is_alive():
            self._stop_workers(deadline)
            return not any(w.is_alive() for w in self._workers)
        self._post(_Stop(started + timeout / 2), wake=True)
        thread.join(max(0.0, deadline - time.monotonic()))
        self._stop_workers(deadline)
        return not thread.is_alive() and not any(w.is_alive() for w in self._workers)

    def __enter__(self) -> SharedNetworkLoop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def counters(self) -> LoopCounters:
        with self._lock:
            entries = list(self._entries.values())
        return LoopCounters(clients=len(entries),
                            open=sum(1 for e in entries if e.state is _State.OPEN),
                            **self._counts)

    # -- clients ----------------------------------------------------------------

    def add(
        self,
        client: mqtt.Client,
        *,
        on_connect_failed: ConnectFailed | None = None,
        min_delay: float | None = None,
        max_delay: float | None = None,
        name: str | None = None,
    ) -> None:
        """Drive ``client`` from now on; connect it at once (``connect_async()`` was called).

        A client already connected with the blocking ``connect()`` is adopted as
        it is. ``on_connect_failed(client, error)`` is called on the loop thread
        after every failed connect attempt (keep it short), as is paho's own
        ``on_connect_fail``. Do not call ``loop_start()``/``loop_forever()`` on the
        client; the loop owns its socket callbacks until :meth:`remove`.

        Raises:
            ValueError: the client is already driven by this or another event loop.
            RuntimeError: the loop is stopping, or holds ``max_clients`` clients.
        """
        if client.on_socket_register_write is not None or \
                client.on_socket_unregister_write is not None:
            raise ValueError("the client is already driven by an external event loop")
        low = self._min_delay if min_delay is None else min_delay
        high = self._max_delay if max_delay is None else max_delay
        if not 0 < low <= high:
            raise ValueError("need 0 < min_delay <= max_delay")
        entry = _Entry(
            client, name or f"client-{id(client):x}", on_connect_failed, low, high,
            saved=(client.on_socket_open, client.on_socket_close,
                   client.on_socket_register_write, client.on_socket_unregister_write,
                   client.on_disconnect),
        )
        with self._lock:
            if self._stopping or (self._started and self._thread is not None
                                  and not self._thread.is_alive()):
                raise RuntimeError("the network loop is stopped")
            if client in self._entries:
                raise ValueError(f"client {entry.name} is already in the loop")
            if len(self._entries) >= self._max_clients:
                raise RuntimeError(f"the network loop holds {self._max_clients} clients")
            self._entries[client] = entry
        self._install_callbacks(entry)
        self._post(_Add(entry), wake=True)

    def connect(
        self,
        client: mqtt.Client,
        host: str,
        port: int = 1883,
        keepalive: int = 60,
        **options: Any,
    ) -> None:
        """``client.connect_async(host, port, keepalive)``, then :meth:`add` it (options alike).

        For a client already in the loop (e.g. after its ``disconnect()``), connect
        it again with the new address.
        """
        client.connect_async(host, port, keepalive)
        with self._lock:
            entry = self._entries.get(client)
        if entry is None:
            self.add(client, **options)
        else:
            self._post(_Connect(entry), wake=True)

    def remove(self, client: mqtt.Client, timeout: float = 5.0) -> bool:
        """Disconnect ``client`` cleanly and stop driving it; waits at most ``timeout`` s.

        Returns True when the client left cleanly (DISCONNECT sent, or it was not
        connected). At the timeout the loop closes its socket without a DISCONNECT
        and returns False. Unknown clients return True. The client's own socket
        callbacks are restored.
        """
        with self._lock:
            entry = self._entries.get(client)
            running = self._thread is not None and self._thread.is_alive()
            if entry is not None and not running:
                del self._entries[client]
        if entry is None:
            return True
        if not running:  # never started, or stopped: nothing is registered
            self._restore_callbacks(entry)
            return True
        done = threading.Event()
        command = _Remove(entry, time.monotonic() + timeout, done)
        if self._on_loop_thread():  # from a callback: start it, cannot wait for it
            self._begin_remove(command.entry, command.deadline, done)
            return done.is_set() and entry.removing is not None and entry.removing.clean
        self._post(command, wake=True)
        if not done.wait(timeout):
            return False
        return entry.removing is not None and entry.removing.clean

    # -- paho callbacks (any thread) ----------------------------------------------

    def _install_callbacks(self, entry: _Entry) -> None:
        own_open, own_close = entry.saved[0], entry.saved[1]

        def on_open(client: mqtt.Client, userdata: Any, sock: Any) -> None:
            if own_open is not None:
                own_open(client, userdata, sock)
            # A socket paho opened on the loop thread (a CONNACK answer makes paho
            # reconnect by itself): register it now. A connector's socket is
            # registered when its reconnect() has returned.
            if self._on_loop_thread() and entry.state is _State.OPEN:
                self._adopt(entry)

        def on_close(client: mqtt.Client, userdata: Any, sock: Any) -> None:
            try:
                if self._on_loop_thread():
                    if entry.sock is sock:
                        self._unregister(entry)
                else:
                    self._post(_Closed(entry, sock), wake=True)
            finally:
                if own_close is not None:
                    own_close(client, userdata, sock)

        def on_register_write(_client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
            if self._on_loop_thread():
                if entry is not self._driving:  # else _drive() writes and syncs anyway
                    with self._lock:
                        self._dirty.add(entry)
                return
            with self._lock:
                self._dirty.add(entry)
            self._wake()

        def on_unregister_write(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
            if self._on_loop_thread() and entry.sock is sock:
                self._set_events(entry, _READ)

        own_disconnect = entry.saved[4]

        def on_disconnect(client: mqtt.Client, userdata: Any, *args: Any) -> None:
            # paho reports a disconnect the application asked for with a success
            # code and a lost connection with a failure (callback API 1: an int).
            code = args[1] if len(args) >= 2 else args[0]
            failed = code.is_failure if hasattr(code, "is_failure") else code != 0
            entry.asked_to_disconnect = not failed
            if own_disconnect is not None:
                own_disconnect(client, userdata, *args)

        entry.client.on_socket_open = on_open
        entry.client.on_socket_close = on_close
        entry.client.on_disconnect = on_disconnect
        entry.client.on_socket_register_write = on_register_write
        entry.client.on_socket_unregister_write = on_unregister_write

    @staticmethod
    def _restore_callbacks(entry: _Entry) -> None:
        client = entry.client
        (client.on_socket_open, client.on_socket_close, client.on_socket_register_write,
         client.on_socket_unregister_write, client.on_disconnect) = entry.saved

    # -- cross-thread plumbing ------------------------------------------------------

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._ident

    def _post(self, command: _Command, *, wake: bool) -> None:
        self._commands.append(command)
        if wake:
            self._wake()

    def _wake(self) -> None:
        if self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(OSError):  # full (the loop is awake anyway) or closed
            self._wake_w.send(b"\0")

    def _connector(self) -> None:
        """A connector thread: the blocking TCP connect and TLS handshake of paho's reconnect()."""
        while True:
            item = self._connect_queue.get()
            if item is None:
                return
            entry, gen = item
            if entry.gen != gen:  # removed meanwhile: nobody waits for this attempt
                continue
            if self._stopping:
                self._post(_Connected(entry, gen, None, skipped=True), wake=True)
                continue
            error: BaseException | None = None
            try:
                entry.client.reconnect()
            except Exception as e:  # noqa: BLE001 - reported to the loop, which logs it
                error = e
            self._post(_Connected(entry, gen, error), wake=True)

    def _stop_workers(self, deadline: float) -> None:
        for _ in self._workers:
            self._connect_queue.put(None)
        for worker in self._workers:
            if worker.is_alive():
                worker.join(max(0.0, deadline - time.monotonic()))

    # -- the loop thread ---------------------------------------------------------------

    def _run(self) -> None:
        self._ident = threading.get_ident()
        next_misc = time.monotonic() + self._misc_interval
        try:
            while True:
                now = time.monotonic()
                if self._stopping and (not self._entries or now >= self._stop_deadline):
                    break
                timeout = self._select_timeout(now, next_misc)
                try:
                    events = self._selector.select(timeout)
                except OSError:
                    logger.exception("select failed in the MQTT network loop")
                    self._purge_closed()
                    events = []
                self._wake_pending = False
                for key, _mask in events:
                    if key.data is None:
                        with contextlib.suppress(OSError):
                            while self._wake_r.recv(_WAKE_DRAIN):
                                pass
                self._run_commands()
                for key, mask in events:
                    entry = key.data
                    if entry is not None and entry.sock is key.fileobj \
                            and entry.state is _State.OPEN:
                        self._drive_step(entry, read=bool(mask & _READ), write=bool(mask & _WRITE))
                self._run_dirty()
                for entry in list(self._pending):
                    self._pending.discard(entry)
                    if entry.state is _State.OPEN and entry.sock is not None:
                        self._drive_step(entry, read=True, write=False)
                now = time.monotonic()
                self._run_timers(now)
                if now >= next_misc:
                    next_misc = now + self._misc_interval
                    self._misc()
        except Exception:
            logger.exception("the MQTT network loop failed; its clients are disconnected")
        finally:
            self._shutdown()

    def _select_timeout(self, now: float, next_misc: float) -> float:
        if self._commands or self._dirty or self._pending:
            return 0.0
        until = next_misc
        if self._timers:
            until = min(until, self._timers[0][0])
        if self._stopping:
            until = min(until, self._stop_deadline)
        return min(_MAX_SELECT, max(0.0, until - now))

    def _run_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            try:
                self._command(command)
            except Exception:
                logger.exception("MQTT network loop: %s failed", type(command).__name__)

    def _command(self, command: _Command) -> None:
        if isinstance(command, _Stop):
            self._begin_stop(command.deadline)
            return
        entry = command.entry
        if self._entries.get(entry.client) is not entry:  # removed meanwhile
            if isinstance(command, _Connected) and command.error is None \
                    and not command.skipped:
                _discard_socket(entry.client)  # a connection nobody will drive
            if isinstance(command, _Remove):
                command.done.set()
            return
        if isinstance(command, _Add):
            if self._stopping:
                self._begin_remove(entry, self._stop_deadline, None)
            elif entry.client.socket() is not None:  # connected with the blocking connect()
                entry.state = _State.OPEN
                self._adopt(entry)
            else:
                self._schedule(entry, 0.0)
        elif isinstance(command, _Connect):
            entry.asked_to_disconnect = False
            if entry.removing is None and entry.state is not _State.CONNECTING:
                self._unregister(entry)
                self._schedule(entry, 0.0)
        elif isinstance(command, _Connected):
            self._connected(entry, command)
        elif isinstance(command, _Closed):
            if entry.sock is command.sock:
                self._unregister(entry)
                self._closed(entry)
        else:
            self._begin_remove(entry, command.deadline, command.done)

    def _run_dirty(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for entry in dirty:
            if entry.state is _State.OPEN and entry.sock is not None:
                self._drive_step(entry, read=False, write=True)

    def _run_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _due, _seq, kind, entry, gen = heapq.heappop(self._timers)
            if self._entries.get(entry.client) is not entry:
                continue
            if kind == "connect" and entry.state is _State.WAITING and entry.gen == gen:
                entry.state = _State.CONNECTING
                self._counts["connect_attempts"] += 1
                self._connect_queue.put((entry, gen))
            elif kind == "deadline" and entry.removing is not None \
                    and entry.removing.deadline <= now:
                logger.info("MQTT client %s did not disconnect in time; closing its socket",
                            entry.name)
                entry.removing.clean = False
                self._force_close(entry)
                self._finish(entry)

    def _misc(self) -> None:
        for entry in list(self._entries.values()):
            if entry.state is not _State.OPEN:
                continue
            try:
                entry.client.loop_misc()
            except Exception:  # noqa: BLE001 - logged with the client id
                self._client_error(entry, "loop_misc")
                continue
            self._after_io(entry)

    def _drive(self, entry: _Entry, *, read: bool, write: bool) -> None:
        """One round of I/O for a client: read once, then write while it wants to."""
        client, sock = entry.client, entry.sock
        self._driving = entry
        try:
            if read:
                client.loop_read()
            if sock is not None and client.socket() is sock and (write or client.want_write()):
                client.loop_write()
        except Exception:  # noqa: BLE001 - logged with the client id
            self._client_error(entry, "network I/O")
            return
        finally:
            self._driving = None
        self._after_io(entry)

    def _after_io(self, entry: _Entry) -> None:
        """Bring the selector in line with the client after paho ran on this thread."""
        client = entry.client
        if client.is_connected():
            entry.failures = 0  # a CONNACK: the next drop starts the backoff afresh
        sock = client.socket()
        if sock is None:  # closed: on_socket_close unregistered it already, unless replaced
            self._unregister(entry)
            if entry.state is _State.OPEN:
                self._closed(entry)
            return
        if sock is not entry.sock:  # paho reconnected by itself on this thread
            self._adopt(entry)
            return
        pending = getattr(sock, "pending", None)
        if pending is not None and pending() > 0:
            self._pending.add(entry)
        self._set_events(entry, _READ | (_WRITE if client.want_write() else 0))

    def _connected(self, entry: _Entry, result: _Connected) -> None:
        """A connector's reconnect() returned (or raised, or was skipped)."""
        error = result.error
        if result.gen != entry.gen or entry.state is not _State.CONNECTING:
            if error is None and not result.skipped:
                _discard_socket(entry.client)
            return
        if result.skipped:
            entry.state = _State.IDLE
            if entry.removing is not None:
                self._finish(entry)
            return
        if error is None and entry.client.socket() is None:
            error = ConnectionError("reconnect() returned without a socket")
        if error is not None:
            self._connect_failed(entry, error)
            return
        entry.state = _State.OPEN
        self._adopt(entry)
        if entry.removing is not None:
            self._begin_disconnect(entry)

    def _connect_failed(self, entry: _Entry, error: BaseException) -> None:
        self._counts["connect_failures"] += 1
        if isinstance(error, OSError):
            logger.info("MQTT client %s could not connect: %s", entry.name, error)
        else:
            logger.error("MQTT client %s failed to connect", entry.name, exc_info=error)
        _discard_socket(entry.client)
        entry.state = _State.IDLE
        for callback, args in ((entry.on_connect_failed, (entry.client, error)),
                               (entry.client.on_connect_fail,
                                (entry.client, entry.client.user_data_get()))):
            if callback is None:
                continue
            try:
                callback(*args)
            except Exception:
                logger.exception("connect-failure callback of MQTT client %s failed", entry.name)
        if entry.removing is not None:
            self._finish(entry)
        elif not self._stopping:
            self._schedule(entry, self._backoff(entry))

    def _closed(self, entry: _Entry) -> None:
        """The client's socket is gone: finish a removal, stay idle, or reconnect later."""
        self._pending.discard(entry)
        if entry.removing is not None:
            self._finish(entry)
            return
        if self._stopping or entry.asked_to_disconnect:
            entry.state = _State.IDLE  # the application disconnected it, as loop_start() ends
            return
        self._schedule(entry, self._backoff(entry))

    def _client_error(self, entry: _Entry, where: str) -> None:
        self._counts["client_errors"] += 1
        logger.exception("MQTT client %s raised in %s; closing its connection", entry.name, where)
        self._force_close(entry)
        if entry.removing is not None:
            self._finish(entry)
        elif self._stopping:
            entry.state = _State.IDLE
        else:
            self._schedule(entry, self._backoff(entry))

    def _backoff(self, entry: _Entry) -> float:
        base = min(entry.max_delay, entry.min_delay * 2.0 ** min(entry.failures, 32))
        entry.failures += 1
        return base * self._rng.uniform(0.5, 1.5)

    def _schedule(self, entry: _Entry, delay: float) -> None:
        entry.state = _State.WAITING
        entry.gen += 1
        self._push_timer(time.monotonic() + delay, "connect", entry)

    def _push_timer(self, due: float, kind: str, entry: _Entry) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (due, self._seq, kind, entry, entry.gen))

    # -- removal and stop ----------------------------------------------------------------

    def _begin_remove(self, entry: _Entry, deadline: float,
                      done: threading.Event | None) -> None:
        if entry.removing is None:
            entry.removing = _Removal(deadline)
        entry.removing.deadline = min(entry.removing.deadline, deadline)
        if done is not None:
            entry.removing.waiters.append(done)
        self._push_timer(entry.removing.deadline, "deadline", entry)
        if entry.state is _State.OPEN:
            self._begin_disconnect(entry)
        elif entry.state is not _State.CONNECTING:  # a connector's result is awaited
            self._finish(entry)

    def _begin_disconnect(self, entry: _Entry) -> None:
        try:
            entry.client.disconnect()
        except Exception:  # noqa: BLE001 - logged with the client id
            self._client_error(entry, "disconnect")
            return
        self._drive_step(entry, read=False, write=True)  # sends DISCONNECT now, paho then closes

    def _finish(self, entry: _Entry) -> None:
        """Stop driving the client; wake whoever waits in remove()."""
        self._unregister(entry)
        self._pending.discard(entry)
        with self._lock:
            if self._entries.get(entry.client) is entry:
                del self._entries[entry.client]
            self._dirty.discard(entry)
        entry.gen += 1
        entry.state = _State.IDLE
        self._restore_callbacks(entry)
        if entry.removing is not None:
            for waiter in entry.removing.waiters:
                waiter.set()

    def _begin_stop(self, deadline: float) -> None:
        with self._lock:
            self._stopping = True
            entries = list(self._entries.values())
        self._stop_deadline = deadline
        for entry in entries:
            self._begin_remove(entry, deadline, None)

    def _shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            entries = list(self._entries.values())
        for entry in entries:
            if entry.removing is None:
                entry.removing = _Removal(0.0)
            entry.removing.clean = False
            self._force_close(entry)
            self._finish(entry)
        for command in self._commands:
            if isinstance(command, _Remove):
                command.done.set()
        self._commands.clear()
        with contextlib.suppress(Exception):
            self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the selector (loop thread only) ----------------------------------------------------

    def _adopt(self, entry: _Entry) -> None:
        """Register the client's current socket (read, and write if it has bytes queued)."""
        sock = entry.client.socket()
        if sock is None or sock is entry.sock:
            return
        self._unregister(entry)
        events = _READ | (_WRITE if entry.client.want_write() else 0)
        try:
            self._selector.register(sock, events, entry)
        except KeyError:
            # The descriptor number of a socket closed on another thread was reused
            # before its unregistration reached this thread: drop the stale key.
            stale = self._selector.get_map().get(sock.fileno())
            if stale is None:
                raise
            self._selector.unregister(stale.fileobj)
            if stale.data is not None:
                stale.data.sock, stale.data.events = None, 0
            self._selector.register(sock, events, entry)
        entry.sock, entry.events = sock, events
        if events & _WRITE:
            with self._lock:
                self._dirty.add(entry)  # try the write at once: the socket is usually writable

    def _unregister(self, entry: _Entry) -> None:
        sock, entry.sock, entry.events = entry.sock, None, 0
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(sock)

    def _set_events(self, entry: _Entry, events: int) -> None:
        if entry.sock is None or events == entry.events:
            return
        try:
            self._selector.modify(entry.sock, events, entry)
        except (KeyError, ValueError, OSError):
            self._unregister(entry)
            return
        entry.events = events

    def _purge_closed(self) -> None:
        """Drop keys whose socket was closed behind the loop's back (select fails on them)."""
        for key in list(self._selector.get_map().values()):
            entry = key.data
            # Clients register socket objects; a bare descriptor (int) could not
            # say it was closed, and only the wake-up pipe (no entry) might be one.
            if entry is None or isinstance(key.fileobj, int) or key.fileobj.fileno() >= 0:
                continue
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(key.fileobj)
            if entry.sock is key.fileobj:
                entry.sock, entry.events = None, 0
                if entry.state is _State.OPEN:
                    self._closed(entry)

    def _force_close(self, entry: _Entry) -> None:
        self._unregister(entry)
        self._pending.discard(entry)
        _discard_socket(entry.client)


def _discard_socket(client: mqtt.Client) -> None:
    """Close a socket paho still holds (no DISCONNECT); its next reconnect() starts afresh."""
    sock = client.socket()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


