"""Small fleet scenarios for the simulator tests: v1 (and v2) rolled out with the gates open."""

from __future__ import annotations

from typing import Any

from edgeota.simulator.scenario import Scenario, parse_scenario

__all__ = ["AGENT", "EASY_GATES", "small_scenario"]

# Quick probation and polling: these tests are about faults and processes, not about waiting.
AGENT = {"probation_seconds": 0.3, "probation_min_inferences": 3, "poll_seconds": 0.5}
# Every device may update: no gate, no failure ratio stops the rollout.
EASY_GATES = {"latency_factor": 0, "error_rate_factor": 0, "max_failure_ratio": 1.0,
              "timeout_seconds": 120}


def small_scenario(devices: int, faults: list[dict[str, Any]], *, v2: bool,
                   pad_mb: float = 0.0, hardware: tuple[str, ...] = ("rpi4",),
                   name: str = "test.toml", **extra: Any) -> Scenario:
    """digits 1.0.0 to every device, then (``v2``) 2.0.0, with ``faults``."""
    timeline: list[dict[str, Any]] = [
        {"action": "publish", "sample": "digits_v1", "release": "digits@1.0.0",
         "pad_mb": pad_mb},
        {"action": "deploy", "release": "digits@1.0.0", **EASY_GATES}]
    if v2:
        timeline += [
            {"action": "publish", "sample": "digits_v2", "release": "digits@2.0.0"},
            {"action": "deploy", "release": "digits@2.0.0", **EASY_GATES}]
    fleet = [{"hardware": h, "share": 1} for h in hardware]
    return parse_scenario({"devices": devices, "fleet": fleet, "agent": AGENT,
                           "faults": faults, "timeline": timeline, **extra}, name)
