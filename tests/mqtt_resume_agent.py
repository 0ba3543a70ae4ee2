"""A real agent over MQTT in its own process, which can SIGKILL itself in the middle of a bundle.

Run as ``python tests/mqtt_resume_agent.py --config DEVICE/agent.toml [--kill-at-bytes N
--killed-file PATH]``: ``start()`` (journal recovery), one ``run_cycle()`` over the
MQTT transport, then one JSON line on stdout (cycle states, served model, the
download counters).

With ``--kill-at-bytes N`` the first resumable bundle download that reaches
``N`` bytes writes how far it had got (JSON, to ``--killed-file``) and then
SIGKILLs the process: no ``finally``, no cancel sent to the server, no clean
MQTT disconnect (the broker sends the device's last will), exactly what an
OOM kill or a crash leaves behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from edgeota.agent.config import AgentConfig
from edgeota.agent.model_host import UnknownModelError
from edgeota.agent.runner import Agent, AgentSettings

MODEL = "digits"
SETTINGS = AgentSettings(probation_seconds=0, probation_min_inferences=1, report_timeout=10.0)
READY_TIMEOUT = 20.0  # seconds for the MQTT connection


def kill_mid_download(agent: Agent, at: int, killed_file: Path) -> None:
    """Die once the agent's resumable bundle download reaches ``at`` bytes (its public hook)."""

    def progress(offset: int, length: int) -> None:
        if offset >= at:
            killed_file.write_text(json.dumps({"offset": offset, "length": length}))
            os.kill(os.getpid(), signal.SIGKILL)

    agent.updates.on_download_progress = progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--kill-at-bytes", type=int, default=None)
    parser.add_argument("--killed-file", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.kill_at_bytes is not None and args.killed_file is None:
        parser.error("--kill-at-bytes needs --killed-file")

    agent = Agent(AgentConfig.load(args.config), SETTINGS, transport="mqtt")
    if args.kill_at_bytes is not None:
        kill_mid_download(agent, args.kill_at_bytes, args.killed_file)
    try:
        agent.start()
        connection = agent.session
        if connection is None or not connection.wait_ready(READY_TIMEOUT):
            raise SystemExit("not connected to the broker in time")
        outcome = agent.run_cycle()
        try:
            serving: str | None = agent.host.current_version(MODEL)
        except UnknownModelError:
            serving = None
        stats = agent.updates.download_stats
        result = {"states": outcome.states, "reasons": outcome.reasons, "serving": serving,
                  "resumes": stats.resumes, "bytes_fetched": stats.bytes_fetched,
                  "completed": stats.completed}
    finally:
        agent.close()
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
