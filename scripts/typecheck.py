"""Run ``mypy --strict`` on the shipped packages under their ``edgeota.*`` names.

The top-level folders (``protocol/``, ``server/``, ...) become ``edgeota.*``
only through ``[tool.setuptools] package-dir`` in ``pyproject.toml``, and the
editable install resolves them with an import hook that mypy cannot follow.
Checked by path, ``server/x.py`` would be a module ``server.x`` that imports
an ``edgeota.protocol`` mypy cannot find. So this script reads the
``package-dir`` table, builds a tree of symlinks
``build/typecheck/edgeota/<name> -> <folder>`` that mirrors the installed
layout (``mypy_path`` in ``[tool.mypy]`` points there) and checks every mapped package with
``-p``. A new ``package-dir`` entry is picked up without editing this file.

mypy names files by the path it found them at, so every error would point at
``build/typecheck/...``; the output is rewritten to the real folders so that
editors and people land on the file in git.

Usage: ``python scripts/typecheck.py [extra mypy arguments]``; the exit status
is mypy's. The mypy settings themselves live in ``[tool.mypy]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = Path("build") / "typecheck"


class LayoutError(Exception):
    """``package-dir`` holds a mapping this script cannot mirror with symlinks."""


@dataclass(frozen=True)
class Mapping:
    """One ``package-dir`` row: an import name and the folder that holds it."""

    package: str  # "edgeota.protocol"
    folder: Path  # relative to the project root: "protocol"

    @property
    def link(self) -> Path:
        """Where the package lives in the mirrored tree, relative to the root."""
        return TREE.joinpath(*self.package.split("."))


def read_mappings(pyproject: Path) -> list[Mapping]:
    """The ``package-dir`` rows, checked to be mirrorable."""
    with pyproject.open("rb") as f:
        table = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    mappings = sorted(
        (Mapping(package=name, folder=Path(folder)) for name, folder in table.items()),
        key=lambda m: m.package,
    )
    names = {m.package for m in mappings}
    for m in mappings:
        if not m.package:
            raise LayoutError("a root package-dir entry ('') cannot be mirrored")
        parts = m.package.split(".")
        # A link inside another link would be created inside a real folder.
        for i in range(1, len(parts)):
            if ".".join(parts[:i]) in names:
                raise LayoutError(f"{m.package} is nested in another mapped package")
        if not (ROOT / m.folder / "__init__.py").is_file():
            raise LayoutError(f"{m.package}: {m.folder}/__init__.py does not exist")
    return mappings


def build_tree(mappings: list[Mapping]) -> None:
    """Make ``build/typecheck`` hold exactly one symlink per mapping.

    Links are relative so the tree survives moving the checkout; stale links
    (a package renamed or dropped) are removed so mypy never sees a ghost.
    """
    tree = ROOT / TREE
    wanted = {ROOT / m.link: m for m in mappings}
    if tree.exists():
        for path in sorted(tree.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_symlink() and path not in wanted:
                path.unlink()
            elif path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()
    for link, m in wanted.items():
        target = os.path.relpath(ROOT / m.folder, link.parent)
        if link.is_symlink() and str(link.readlink()) == target:
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)


def real_path(line: str, mappings: list[Mapping]) -> str:
    """Replace the mirrored prefix of a mypy output line with the real folder."""
    for m in mappings:
        mirrored = f"{m.link.as_posix()}/"
        if mirrored in line:
            line = line.replace(mirrored, f"{m.folder.as_posix()}/")
    return line


def main(argv: list[str]) -> int:
    """Build the tree, run mypy on every mapped package, print real paths."""
    mappings = read_mappings(ROOT / "pyproject.toml")
    build_tree(mappings)
    command = [sys.executable, "-m", "mypy", "--config-file", "pyproject.toml"]
    for m in mappings:
        command += ["-p", m.package]
    # [tool.mypy] mypy_path names TREE, so an editor that runs mypy from the
    # root with `-p edgeota.<name>` sees the same tree once it is built.
    proc = subprocess.Popen([*command, *argv], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None  # stdout=PIPE
    for line in proc.stdout:
        sys.stdout.write(real_path(line, mappings))
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
