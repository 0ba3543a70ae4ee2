"""Fuzz ``server.toml`` (and ``operator.toml``) loading: ``edgeota.server.config``.

Invariant: any file either loads, or raises ``ConfigError`` naming the file and
the field -- never a ``ValueError``, ``KeyError`` or ``RecursionError`` from a
value the checks let through. A config that loads is one the server can start
with: its expiry periods convert to the ``timedelta`` objects the repositories
use (no infinity, NaN or overflow) and it saves and loads back equal. Both
loaders read the same bytes (their schemas differ; most inputs fail one).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import fuzz_support
from hypothesis import given

with fuzz_support.instrumented(__name__, "tomllib"):
    import tomllib  # noqa: F401 - imported here to be instrumented with the loaders

    from edgeota.server.config import (
        OPERATOR_CONFIG,
        SERVER_CONFIG,
        ConfigError,
        load_operator_config,
        load_server_config,
    )

# The folder the seeds were written in, replaced so they name no machine's /tmp.
_SEED_HOME = "/var/lib/edgeota/home"


def one_input(data: bytes) -> None:
    home = fuzz_support.scratch_dir()
    try:
        (home / SERVER_CONFIG).write_bytes(data)
        (home / OPERATOR_CONFIG).write_bytes(data)
        with contextlib.suppress(ConfigError):
            config = load_server_config(home)
            now = datetime(2025, 3, 1, tzinfo=UTC)
            for name, period in config.expiry.as_timedeltas().items():
                assert now + period > now, f"expiry {name} is not a future date"
            assert 0 < config.http_port < 65536 or config.http_port == 0
            config.save()
            assert load_server_config(home) == config, "server.toml does not save back equal"
        with contextlib.suppress(ConfigError):
            operator = load_operator_config(home)
            operator.save()
            assert load_operator_config(home) == operator, "operator.toml does not save back"
    finally:
        shutil.rmtree(home)


def seeds() -> Mapping[str, bytes]:
    """The two files ``edgeota init`` writes (its keys stay in the scratch folder, removed)."""
    from edgeota.server.home import init_home

    folder = fuzz_support.scratch_dir()
    try:
        home = folder / "home"
        init_home(home)
        return {name: (home / name).read_bytes().replace(str(home).encode(), _SEED_HOME.encode())
                for name in (SERVER_CONFIG, OPERATOR_CONFIG)}
    finally:
        shutil.rmtree(folder)


@given(data=fuzz_support.mutations("server_config", fuzz_support.toml_structure))
def field_mutations(check: Callable[[bytes], None], data: bytes) -> None:
    """A real server.toml/operator.toml with one value replaced loads or is refused, typed."""
    check(data)


HARNESS = fuzz_support.Harness(
    name="server_config",
    one_input=one_input,
    seeds=seeds,
    max_len=8192,
    structure=fuzz_support.toml_structure,
    properties=(field_mutations,),
)

if __name__ == "__main__":
    sys.exit(fuzz_support.main(HARNESS))
