"""Small helpers the benchmark scripts share (each script runs as ``python bench/NAME.py``).

Loopback ports and ``/proc`` readings: what a benchmark needs to start its
own broker or server and to measure a process's memory, kept in one place.
"""

from __future__ import annotations

import socket

__all__ = ["HOST", "accepts", "free_port", "proc_status"]

HOST = "127.0.0.1"
_KIB = 1024


def free_port(host: str = HOST) -> int:
    """A TCP port free on ``host`` now (another process may take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def accepts(port: int, host: str = HOST) -> bool:
    """Whether something listens on ``host:port`` (one connection attempt, 0.2 s)."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM (bytes) and Threads of a process, from ``/proc/PID/status``."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * _KIB
            elif key == "Threads":
                found[key] = int(value)
    return found
