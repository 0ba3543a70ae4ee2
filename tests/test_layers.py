"""The layers, read from the source: which package may import which.

From the bottom: ``protocol`` (the wire contract: stdlib and cryptography
only), ``runtime`` (what both sides run), then ``server`` and ``agent`` (neither
imports the other), the ``simulator`` (drives both), and ``cli`` on top. Inside
the server, ``services`` never import the HTTP layer (``api``).

Every ``import`` statement counts, wherever it is: at module level, inside a
function (lazy imports) or under ``TYPE_CHECKING``. The graph is read with
``ast``, without importing anything, so a violation is found even in code no
test runs.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {
    "protocol": "edgeota.protocol",
    "runtime": "edgeota.runtime",
    "server": "edgeota.server",
    "agent": "edgeota.agent",
    "simulator": "edgeota.simulator",
    "cli": "edgeota.cli",
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing file, relative to the repository
    module: str  # the imported module, absolute
    line: int
    top_level: bool  # at module level (not inside a function or class)

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.module}"


def _module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    rest = path.relative_to(ROOT / folder).with_suffix("").parts
    if rest[-1] == "__init__":
        rest = rest[:-1]
    return ".".join((PACKAGES[folder], *rest))


def _imports_of(path: Path) -> Iterator[Import]:
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    yield from _parse(path.read_text(encoding="utf-8"), package, str(path.relative_to(ROOT)))


def _parse(text: str, package: str, source: str) -> Iterator[Import]:
    """The imports of one module's ``text``; ``package`` resolves relative imports."""
    tree = ast.parse(text, filename=source)
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(source, alias.name, node.lineno, id(node) in top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            yield Import(source, module, node.lineno, id(node) in top)


def imports(folder: str) -> list[Import]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    return [found for path in files for found in _imports_of(path)]


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _offending(folder: str, *forbidden: str) -> list[str]:
    return [str(i) for i in imports(folder) if _under(i.module, *forbidden)]


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("server", ("edgeota.simulator", "edgeota.cli", "edgeota.agent")),
        ("agent", ("edgeota.server", "edgeota.simulator", "edgeota.cli")),
        ("runtime", ("edgeota.agent", "edgeota.server", "edgeota.simulator", "edgeota.cli")),
        ("simulator", ("edgeota.cli",)),
    ],
)
def test_no_package_imports_a_layer_above_or_beside_it(
    folder: str, forbidden: tuple[str, ...]
) -> None:
    assert _offending(folder, *forbidden) == []


def test_services_do_not_import_the_http_layer() -> None:
    found = [str(i) for i in imports("server/services")
             if _under(i.module, "edgeota.server.api", "fastapi", "starlette")]
    assert found == []


def test_protocol_imports_only_stdlib_cryptography_and_itself() -> None:
    allowed = set(sys.stdlib_module_names) | {"cryptography"}
    found = [str(i) for i in imports("protocol")
             if not _under(i.module, "edgeota.protocol")
             and i.module.split(".")[0] not in allowed]
    assert found == []


def test_runtime_reads_onnx_only_when_asked() -> None:
    """``onnx`` is a server-extra dependency: the device install must import runtime without it."""
    found = [str(i) for i in imports("runtime")
             if _under(i.module, "onnx") and i.top_level]
    assert found == []


def test_the_scanner_sees_lazy_and_relative_imports() -> None:
    """The rules above are not vacuous: known edges, including lazy ones, are found."""
    cli = {i.module for i in imports("cli")}
    assert "edgeota.simulator.scenario" in cli  # inside a function in cli/sim.py
    assert "edgeota.server.publisher" in cli
    lazy = [i for i in imports("runtime") if i.module == "onnx"]
    assert lazy and not any(i.top_level for i in lazy)
    probe = "from . import a\nfrom ..api import schemas\ndef f():\n    import edgeota.cli\n"
    found = [(i.module, i.top_level) for i in _parse(probe, "edgeota.server.services", "x.py")]
    assert found == [("edgeota.server.services", True), ("edgeota.server.api", True),
                     ("edgeota.cli", False)]
