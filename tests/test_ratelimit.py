"""The rate limits and repeat-bounded logging the MQTT side uses against flooding devices.

Pure: a fake clock, no sockets, no sleeps.
"""

from __future__ import annotations

import logging

import pytest

from edgeota.server.ratelimit import RateLimiter, RepeatLog, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=3)
    assert [bucket.wait(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.wait(0.0) == pytest.approx(0.1)  # the next token in 1/rate s
    assert bucket.wait(0.05) == pytest.approx(0.05)  # half a token saved up: no token taken
    assert bucket.wait(0.1) == 0.0
    assert bucket.wait(100.0) == 0.0  # saved up to the burst, not beyond
    assert [bucket.wait(100.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(0.1)]


def test_a_token_bucket_refuses_settings_that_disable_it() -> None:
    for rate, burst in ((0.0, 1), (-1.0, 1), (1.0, 0)):
        with pytest.raises(ValueError):
            TokenBucket(rate, burst)


def test_a_rate_limiter_keeps_one_budget_per_key_and_forgets_the_least_recent() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1.0, 2, max_keys=2, clock=clock)
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    assert limiter.allow("b") and limiter.allow("b")  # b's own budget
    clock.now += 1.0
    assert limiter.allow("a") and not limiter.allow("a")  # one token a second
    limiter.allow("c")  # a third key: b, the least recently seen, is forgotten
    assert limiter.allow("b") and limiter.allow("b")  # a fresh budget


def test_repeat_log_writes_once_per_interval_with_the_count_held(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RepeatLog(logging.getLogger("test.repeats"), interval=60.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="test.repeats")
    written = [log.log("frame", "outgoing frame not queued (%s)", "full") for _ in range(12_000)]
    assert written.count(True) == 1
    log.log("other", "another kind")  # a key of its own
    clock.now += 61.0
    assert log.log("frame", "outgoing frame not queued (%s)", "full")
    assert [r.getMessage() for r in caplog.records] == [
        "outgoing frame not queued (full)",
        "another kind",
        "outgoing frame not queued (full) (11999 more like this in the last 61 s)",
    ]
