"""Drive many simulated devices with a few worker threads (never a thread per device).

Each worker owns a fixed share of the devices and steps them round-robin,
then waits at most ``tick_seconds`` (or until stopped). A device's MQTT
traffic is handled by its connection's network loop; a worker only runs the
agent's synchronous work (update cycles, inferences), so a fleet of hundreds
costs a handful of threads here.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from edgeota.protocol.errors import EdgeotaError
from edgeota.simulator.device import SimulatedDevice

__all__ = ["FleetRunner", "FleetStopError"]


class FleetStopError(EdgeotaError):
    """A worker did not stop within the timeout (a device step hung)."""


class FleetRunner:
    """Steps ``devices`` on ``workers`` threads until :meth:`stop`."""

    def __init__(self, devices: Sequence[SimulatedDevice], *, workers: int = 4,
                 tick_seconds: float = 0.05) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if tick_seconds <= 0:
            raise ValueError("tick_seconds must be positive")
        self.devices = list(devices)
        self._workers = min(workers, max(1, len(self.devices)))
        self._tick = tick_seconds
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> FleetRunner:
        if self._threads:
            raise RuntimeError("fleet already running")
        self._stop.clear()
        for index in range(self._workers):
            share = self.devices[index::self._workers]
            thread = threading.Thread(target=self._work, args=(share,),
                                      name=f"fleet-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _work(self, share: Sequence[SimulatedDevice]) -> None:
        while not self._stop.is_set():
            for device in share:
                if self._stop.is_set():
                    return
                device.step()
            self._stop.wait(self._tick)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop stepping; a step in progress (an update cycle) is allowed to finish."""
        self._stop.set()
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(timeout)
            if thread.is_alive():
                raise FleetStopError(f"{thread.name} still busy after {timeout}s")

    def __enter__(self) -> FleetRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
