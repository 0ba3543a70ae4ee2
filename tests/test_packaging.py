"""The distribution's shape: extras, pins, entry points and import boundaries."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SERVER_ONLY = ("fastapi", "sqlalchemy", "alembic", "amqtt", "psycopg", "httpx")


def _names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_agent_extra_pulls_nothing_server_side() -> None:
    agent = _names(PYPROJECT["project"]["optional-dependencies"]["agent"])
    base = _names(PYPROJECT["project"]["dependencies"])
    assert {"paho-mqtt", "tuf", "onnxruntime", "numpy"} <= agent
    assert not (agent | base) & set(SERVER_ONLY)


def test_onnxruntime_1_21_is_excluded() -> None:
    (pin,) = [r for r in PYPROJECT["project"]["optional-dependencies"]["agent"]
              if r.startswith("onnxruntime")]
    assert "!=1.21.*" in pin


def test_top_level_folders_map_into_one_namespace() -> None:
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert mapping == {
        "edgeota.protocol": "protocol",
        "edgeota.runtime": "runtime",
        "edgeota.server": "server",
        "edgeota.agent": "agent",
        "edgeota.simulator": "simulator",
        "edgeota.cli": "cli",
        "edgeota.samples": "firmware_samples",
    }
    for folder in ("server", "agent", "keys", "firmware_samples", "tests", "simulator",
                   "protocol", "runtime", "cli", "bench", "docs"):
        assert (ROOT / folder).is_dir(), folder


@pytest.mark.parametrize("script", ["edgeota", "edgeota-agent"])
def test_console_scripts_load(script: str) -> None:
    (entry,) = [e for e in entry_points(group="console_scripts") if e.name == script]
    assert callable(entry.load())
    done = subprocess.run([sys.executable, "-c", f"import sys; from {entry.module} import main;"
                           " sys.exit(main(['--help']))"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout


def test_agent_side_imports_stay_small() -> None:
    code = (
        "import sys, edgeota.protocol.bundle, edgeota.protocol.identity, edgeota.agent.cli,"
        " edgeota.agent.update_cycle, edgeota.agent.model_host, edgeota.agent.inference_server,"
        " edgeota.agent.journal, edgeota.agent.clock;"
        f"bad = [m for m in {SERVER_ONLY!r} if m in sys.modules];"
        "print(','.join(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == ""


def test_agent_run_without_a_config_fails_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgeota.agent.cli import main

    assert main(["run", "--config", str(tmp_path / "agent.toml")]) == 1
    assert "device enroll" in capsys.readouterr().err


def test_private_key_files_are_ignored_by_git() -> None:
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    for pattern in ("keys/*", "*.pem", "*.key.json", ".venv/"):
        assert pattern in ignored
