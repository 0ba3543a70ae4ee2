"""``agent.toml``: everything one device needs, written by ``edgeota device enroll --out``.

Paths are relative to the folder holding ``agent.toml`` so an enrolment
folder can be copied to the device as it is. The operator's enrolment
(:mod:`edgeota.server.enrollment`) writes the file and the agent reads it, so
its schema lives here, below both (the agent re-exports it as
``edgeota.agent.config``).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from edgeota.protocol.errors import EdgeotaError
from edgeota.protocol.files import atomic_write, read_private_file
from edgeota.protocol.identity import validate_device_id

__all__ = ["AGENT_CONFIG", "AgentConfig", "AgentConfigError"]

AGENT_CONFIG = "agent.toml"
_MAX_SIZE = 64 * 1024


class AgentConfigError(EdgeotaError):
    """An ``agent.toml`` that is missing, malformed or points at missing files."""


@dataclass(frozen=True)
class AgentConfig:
    """The device's identity, trust anchors and where its server is."""

    folder: Path
    device_id: str
    hardware: str
    repository_url: str  # e.g. http://host:8742/repo
    token_file: Path
    identity_dir: Path
    image_root: Path
    director_root: Path
    ca_cert: Path
    tls_cert: Path
    tls_key: Path
    state_dir: Path
    mqtt_url: str | None = None  # mqtts://host:port: fetch over MQTT; None: over HTTP

    def token(self) -> str:
        return read_private_file(self.token_file, 4096).decode("ascii").strip()

    @property
    def image_metadata_url(self) -> str:
        return f"{self.repository_url}/image/metadata/"

    @property
    def image_targets_url(self) -> str:
        return f"{self.repository_url}/image/targets/"

    @property
    def director_metadata_url(self) -> str:
        return f"{self.repository_url}/director/{self.device_id}/metadata/"

    def to_toml(self) -> dict[str, Any]:
        def rel(path: Path) -> str:
            try:
                return str(path.relative_to(self.folder))
            except ValueError:
                return str(path)

        return {
            "device": {"id": self.device_id, "hardware": self.hardware},
            "server": {"repository_url": self.repository_url, "token_file": rel(self.token_file)},
            "trust": {"image_root": rel(self.image_root), "director_root": rel(self.director_root),
                      "identity": rel(self.identity_dir)},
            "tls": {"ca": rel(self.ca_cert), "cert": rel(self.tls_cert), "key": rel(self.tls_key)},
            "state": {"dir": rel(self.state_dir)},
            **({"mqtt": {"url": self.mqtt_url}} if self.mqtt_url else {}),
        }

    def save(self) -> Path:
        path = self.folder / AGENT_CONFIG
        atomic_write(path, tomli_w.dumps(self.to_toml()).encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        if not path.is_file():
            raise AgentConfigError(f"{path} not found (write one with `edgeota device enroll`)")
        with path.open("rb") as source:  # at most one byte past the bound, whatever the size
            raw = source.read(_MAX_SIZE + 1)
        if len(raw) > _MAX_SIZE:
            raise AgentConfigError(f"{path} is larger than {_MAX_SIZE} bytes")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        # ValueError: bad UTF-8 or TOML (both subclass it) and integers past CPython's
        # 4300-digit limit; RecursionError: arrays or tables nested past the parser's stack.
        except (ValueError, RecursionError) as e:
            raise AgentConfigError(f"{path}: not valid TOML: {e}") from e
        folder = path.parent.resolve()

        def table(section: str) -> dict[str, Any]:
            value = data.get(section, {})
            if not isinstance(value, dict):
                raise AgentConfigError(f"{path}: [{section}] must be a table")
            return value

        def get(section: str, key: str) -> str:
            value = table(section).get(key)
            if not isinstance(value, str) or not value:
                raise AgentConfigError(f"{path}: missing {section}.{key}")
            return value

        def file(section: str, key: str) -> Path:
            value = get(section, key)
            if "\x00" in value:  # no file system call takes it: refuse it here, by name
                raise AgentConfigError(f"{path}: {section}.{key} holds a NUL character")
            candidate = Path(value)
            return candidate if candidate.is_absolute() else folder / candidate

        try:
            device_id = validate_device_id(get("device", "id"))
        except ValueError as e:
            raise AgentConfigError(f"{path}: {e}") from e
        mqtt_url = table("mqtt").get("url")
        if mqtt_url is not None and not isinstance(mqtt_url, str):
            raise AgentConfigError(f"{path}: mqtt.url must be a string")
        return cls(
            folder=folder,
            device_id=device_id,
            hardware=get("device", "hardware"),
            repository_url=get("server", "repository_url").rstrip("/"),
            token_file=file("server", "token_file"),
            identity_dir=file("trust", "identity"),
            image_root=file("trust", "image_root"),
            director_root=file("trust", "director_root"),
            ca_cert=file("tls", "ca"),
            tls_cert=file("tls", "cert"),
            tls_key=file("tls", "key"),
            state_dir=file("state", "dir"),
            mqtt_url=mqtt_url or None,
        )
