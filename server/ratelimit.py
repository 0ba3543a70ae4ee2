"""Per-client rate limits and bounded logging of repeats, for code that faces every device.

A device (or a flood in its name) must not be able to take a server-side
resource away from the others: the embedded broker paces each device's
PUBLISH packets with a :class:`TokenBucket`, the fetch bridge each device's
fetch requests with a :class:`RateLimiter`; and neither may be made to write
a log line per hostile message, so repeated warnings go through
:class:`RepeatLog`, which writes the first one and then at most one line per
interval saying how many were held back.

No global state: each user makes its own, with the clock passed in (tests
use a fake one).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["RateLimiter", "RepeatLog", "TokenBucket"]


@dataclass
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one per event.

    Not thread-safe on its own (its users hold a lock, or stay on one event loop).
    """

    rate: float  # tokens per second
    burst: float  # the most tokens saved up (and the first burst allowed)
    tokens: float = -1.0  # -1: full, set on first use
    stamp: float = 0.0  # when ``tokens`` was last brought up to date

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")

    def wait(self, now: float) -> float:
        """Take a token if there is one (returns 0), else the seconds until one (takes none)."""
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        elif now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    """One :class:`TokenBucket` per key (a device id), the least recently seen forgotten first.

    ``max_keys`` bounds the memory; a forgotten key starts again with a full
    bucket, which only matters for keys idle longer than every other one.
    Thread-safe.
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = 65536,
                 clock: Callable[[], float] = time.monotonic) -> None:
        TokenBucket(rate, burst)  # validates
        self._rate, self._burst, self._max_keys, self._clock = rate, burst, max_keys, clock
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: Hashable) -> bool:
        """Whether one more event of ``key`` is within its rate (and count it if so)."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(self._rate, self._burst)
                if len(self._buckets) > self._max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            return bucket.wait(now) == 0.0


class RepeatLog:
    """Write a warning the first time, then at most once per ``interval`` per key, with a count.

    ``log(key, message, *args)`` writes ``message`` at once if ``key`` has
    not been logged within ``interval`` seconds; otherwise it only counts,
    and the next line written for that key ends with "(N more like this in
    the last S s)". At most ``max_keys`` keys are remembered. Thread-safe.
    """

    def __init__(self, logger: logging.Logger, *, interval: float = 60.0,
                 level: int = logging.WARNING, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0 or max_keys < 1:
            raise ValueError("interval and max_keys must be positive")
        self._logger, self._interval, self._level = logger, interval, level
        self._max_keys, self._clock = max_keys, clock
        self._last: OrderedDict[Hashable, tuple[float, int]] = OrderedDict()  # key -> (when, held)
        self._lock = threading.Lock()

    def log(self, key: Hashable, message: str, *args: object) -> bool:
        """Log (or count) one occurrence; ``True`` if a line was written."""
        now = self._clock()
        with self._lock:
            when, held = self._last.get(key, (None, 0))
            if when is not None and now - when < self._interval:
                self._last[key] = (when, held + 1)
                return False
            self._last[key] = (now, 0)
            self._last.move_to_end(key)
            while len(self._last) > self._max_keys:
                self._last.popitem(last=False)
        if held:
            message += " (%d more like this in the last %.0f s)"
            args = (*args, held, now - when if when is not None else 0.0)
        self._logger.log(self._level, message, *args, stacklevel=2)
        return True
