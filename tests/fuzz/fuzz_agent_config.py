"""Fuzz ``agent.toml`` loading: ``AgentConfig.load``.

Invariant: any file either loads into an ``AgentConfig`` whose fields have the
types the dataclass declares, or raises ``AgentConfigError`` naming the file --
never a ``KeyError``/``AttributeError`` from a table that is not one, a
``RecursionError`` from deep nesting, or a config holding a number where a
URL belongs. An accepted config saves and loads back equal.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import fuzz_support
from hypothesis import given

with fuzz_support.instrumented(__name__, "tomllib"):
    import tomllib  # noqa: F401 - imported here to be instrumented with the loader

    from edgeota.runtime.agent_config import AGENT_CONFIG, AgentConfig, AgentConfigError


def check_types(config: AgentConfig) -> None:
    for name in ("device_id", "hardware", "repository_url"):
        assert isinstance(getattr(config, name), str), f"{name} is not a string"
    for name in ("token_file", "identity_dir", "image_root", "director_root", "ca_cert",
                 "tls_cert", "tls_key", "state_dir"):
        value = getattr(config, name)
        assert isinstance(value, Path), f"{name} is not a path"
        # Usable by the file system calls the agent makes: an OSError (a name too
        # long) is the file system's answer; a ValueError (a NUL) would be a crash.
        with contextlib.suppress(OSError):
            value.exists()
    assert config.mqtt_url is None or isinstance(config.mqtt_url, str), "mqtt_url"


def one_input(data: bytes) -> None:
    folder = fuzz_support.scratch_dir()
    try:
        path = folder / AGENT_CONFIG
        path.write_bytes(data)
        try:
            config = AgentConfig.load(path)
        except AgentConfigError:
            return
        check_types(config)
        config.save()
        assert AgentConfig.load(path) == config, "a loaded agent.toml does not save back equal"
    finally:
        shutil.rmtree(folder)


def seeds() -> Mapping[str, bytes]:
    folder = fuzz_support.scratch_dir()
    try:
        out = {}
        for name, mqtt in (("http", None), ("mqtt", "mqtts://ota.example.net:8883")):
            config = AgentConfig(
                folder=folder, device_id="pi-0042", hardware="rpi4",
                repository_url="https://ota.example.net:8742/repo",
                token_file=folder / "device.token", identity_dir=folder / "identity",
                image_root=folder / "trust" / "image-root.json",
                director_root=folder / "trust" / "director-root.json",
                ca_cert=folder / "tls" / "ca.pem", tls_cert=folder / "tls" / "device.pem",
                tls_key=folder / "tls" / "device.key", state_dir=Path("/var/lib/edgeota"),
                mqtt_url=mqtt,
            )
            out[name] = config.save().read_bytes()
        return out
    finally:
        shutil.rmtree(folder)


@given(data=fuzz_support.mutations("agent_config", fuzz_support.toml_structure))
def field_mutations(check: Callable[[bytes], None], data: bytes) -> None:
    """A real agent.toml with one value replaced by any TOML value loads or is refused, typed."""
    check(data)


HARNESS = fuzz_support.Harness(
    name="agent_config",
    one_input=one_input,
    seeds=seeds,
    max_len=8192,
    structure=fuzz_support.toml_structure,
    properties=(field_mutations,),
)

if __name__ == "__main__":
    sys.exit(fuzz_support.main(HARNESS))
