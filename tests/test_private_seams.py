"""No module of the simulator, the tests or the benches reaches into a private name it does not own.

Product code offers hooks for what the simulator and the tests need (the fetch
bridge's ``FrameFilter``, an update client's ``clock``, ``ServerContext.set_clock``,
...). Reaching past them -- reading or patching ``obj._attr``, overriding a
product or dependency class's ``_method``, importing ``_name`` from a product
module or anything from a dependency's ``_internal`` -- couples a test to code
that may change without notice, and a patch that stops applying fails silently.

The scan is of the syntax (``ast``), over ``simulator/``, ``tests/`` and
``bench/``. What it allows without asking:

* attributes of ``self`` and ``cls`` (a class's own privates);
* private names of the scanned folders' own modules (test support such as
  ``mosquitto_support._free_port``, a bench's helpers): they are not product code;
* ``super()._m(...)`` inside an override of ``_m`` (the override is reported);
* the documented names that happen to start with ``_`` (:data:`PUBLIC_UNDERSCORE_NAMES`,
  :data:`EXTENSION_POINTS`).

Anything else needs an entry in :data:`ALLOWED`, with a reason. An entry that no
longer matches anything fails the test too, so the list only shrinks.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("simulator", "tests", "bench")
_PRIVATE = re.compile(r"_[^_]")  # a single leading underscore (dunders are protocol, not private)

# Documented API that starts with an underscore: namedtuple's methods and fields.
PUBLIC_UNDERSCORE_NAMES = frozenset({"_replace", "_asdict", "_fields", "_make", "_field_defaults"})
# Private-looking methods a dependency documents as the ones to override.
EXTENSION_POINTS = frozenset({
    ("tuf.ngclient.fetcher.FetcherInterface", "_fetch"),  # python-tuf: "implement _fetch"
})

# (file, what, as the finding names it) -> why it may stay. "TODO(agent owner)":
# known, to be replaced by a public hook of the agent; remove the entry with the fix.
ALLOWED: dict[tuple[str, str], str] = {
    ("tests/test_dependency_pins.py", "vars(broker).get('_subscriptions')"):
        "the pin test checks the amqtt internal server/embedded_broker.py replaces",
    ("simulator/scenario.py", "from _typeshed import DataclassInstance"):
        "typeshed's stub-only module, imported for type checking only",
}


@dataclass(frozen=True)
class Finding:
    path: str  # relative to the repository, with /
    line: int
    what: str  # the code as ast.unparse writes it: the key in ALLOWED

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _local_modules() -> frozenset[str]:
    """Modules the scanned folders define themselves (imported by their bare names)."""
    return frozenset(p.stem for folder in ("tests", "bench") for p in (ROOT / folder).rglob("*.py"))


def _is_private(name: str) -> bool:
    return bool(_PRIVATE.match(name)) and name not in PUBLIC_UNDERSCORE_NAMES


class _Scanner(ast.NodeVisitor):
    """The findings of one file."""

    def __init__(self, path: str, tree: ast.Module, local: frozenset[str]) -> None:
        self.path = path
        self.local = local
        self.findings: list[Finding] = []
        self.functions: list[str] = []
        self.imported: dict[str, tuple[str, str | None]] = {}  # name -> (module, attribute)
        self.classes = {n.name: n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.imported[alias.asname or alias.name.partition(".")[0]] = (
                        alias.name if alias.asname else alias.name.partition(".")[0], None)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    self.imported[alias.asname or alias.name] = (node.module, alias.name)

    def report(self, node: ast.AST, what: str) -> None:
        self.findings.append(Finding(self.path, getattr(node, "lineno", 0), what))

    def _local(self, module: str) -> bool:
        return module.partition(".")[0] in self.local

    # -- imports --------------------------------------------------------------

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not self._local(alias.name) and any(map(_is_private, alias.name.split("."))):
                self.report(node, f"import {alias.name}")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level or self._local(module):
            return
        names = [a.name for a in node.names]
        if any(map(_is_private, module.split("."))):
            self.report(node, f"from {module} import {', '.join(names)}")
        elif private := [n for n in names if _is_private(n)]:
            self.report(node, f"from {module} import {', '.join(private)}")

    # -- attributes -----------------------------------------------------------

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)
        if not _is_private(node.attr):
            return
        base = node.value
        if isinstance(base, ast.Name) and (base.id in ("self", "cls") or (
                base.id in self.imported and self._local(self.imported[base.id][0])
                and self.imported[base.id][1] is None)):
            return  # a class's own, or a helper of the scanned folders' own modules
        if (isinstance(base, ast.Call) and isinstance(base.func, ast.Name)
                and base.func.id == "super" and self.functions
                and self.functions[-1] == node.attr):
            return  # an override calling up: the override itself is reported
        self.report(node, ast.unparse(node))

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        func = node.func
        named = (func.id if isinstance(func, ast.Name)
                 else func.attr if isinstance(func, ast.Attribute) else "")
        strings = [a.value for a in node.args
                   if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if named in ("getattr", "setattr", "delattr", "hasattr") and any(
                _is_private(s) or any(map(_is_private, s.split(".")[1:])) for s in strings):
            self.report(node, ast.unparse(node))  # also monkeypatch.setattr(obj, "_x", ...)
        elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Call)
              and isinstance(func.value.func, ast.Name) and func.value.func.id == "vars"
              and any(_is_private(s) for s in strings)):
            self.report(node, ast.unparse(node))  # vars(obj).pop("_x"), vars(obj).get("_x")

    # -- overrides ------------------------------------------------------------

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.generic_visit(node)
        bases = list(self._external_bases(node, set()))
        if not bases:
            return
        for item in node.body:
            names: list[str] = []
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [item.name]
            elif isinstance(item, ast.Assign):
                names = [t.id for t in item.targets if isinstance(t, ast.Name)]
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                names = [item.target.id]
            for name in names:
                if not _is_private(name):
                    continue
                for base in bases:
                    qualname = f"{base.__module__}.{base.__qualname__}"
                    if hasattr(base, name) and (qualname, name) not in EXTENSION_POINTS:
                        self.report(item, f"{node.name}.{name}")

    def _external_bases(self, node: ast.ClassDef, seen: set[str]) -> Iterator[type]:
        """The product and dependency classes ``node`` derives from, through this file's classes."""
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in self.classes:
                if base.id not in seen:
                    seen.add(base.id)
                    yield from self._external_bases(self.classes[base.id], seen)
                continue
            resolved = self._resolve(base)
            if isinstance(resolved, type) and resolved is not object:
                yield resolved

    def _resolve(self, expr: ast.expr) -> object:
        """The object an imported name (or ``module.Name``) in a base list is, if not local."""
        if isinstance(expr, ast.Subscript):  # Generic[T], Protocol[T]
            return self._resolve(expr.value)
        if isinstance(expr, ast.Name) and expr.id in self.imported:
            module, attribute = self.imported[expr.id]
            if self._local(module):
                return None
            loaded = importlib.import_module(module)
            return getattr(loaded, attribute) if attribute else loaded
        if isinstance(expr, ast.Attribute):
            owner = self._resolve(expr.value)
            return getattr(owner, expr.attr, None) if owner is not None else None
        return None


def scan() -> list[Finding]:
    local = _local_modules()
    findings: list[Finding] = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            scanner = _Scanner(path.relative_to(ROOT).as_posix(), tree, local)
            scanner.visit(tree)
            findings += scanner.findings
    return findings


def test_nothing_reaches_into_private_names_of_product_or_dependency_code() -> None:
    findings = scan()
    unexplained = [f for f in findings if (f.path, f.what) not in ALLOWED]
    assert not unexplained, (
        "private names of code these files do not own (use or add a public hook in the "
        "product, or explain it in ALLOWED):\n" + "\n".join(map(str, unexplained)))
    matched = {(f.path, f.what) for f in findings}
    stale = [f"{path}: {what}" for path, what in ALLOWED if (path, what) not in matched]
    assert not stale, "ALLOWED entries that no longer match anything (remove them):\n" + \
        "\n".join(stale)


def test_the_scan_sees_what_it_must_refuse(tmp_path: Path) -> None:
    """The checks themselves: each form of reaching in is a finding, each allowed form is not."""
    source = '''
import mosquitto_support
from edgeota.server.mqtt_bridge import FetchBridge, _BoundedSet
from tuf.ngclient._internal import trusted_metadata_set
from mosquitto_support import _free_port


class Quiet(FetchBridge):
    def _serve(self, device_id, request):
        super()._serve(device_id, request)

    def helper(self):
        return self._own, super()._publish, mosquitto_support._free_port


def poke(bridge, monkeypatch, row):
    bridge._send = None
    getattr(bridge, "_lock")
    monkeypatch.setattr(bridge, "_stopping", True)
    vars(bridge).pop("_serve", None)
    return row._replace(a=1)
'''
    tree = ast.parse(source)
    scanner = _Scanner("probe.py", tree, frozenset({"mosquitto_support"}))
    scanner.visit(tree)
    assert sorted(f.what for f in scanner.findings) == sorted([
        "from edgeota.server.mqtt_bridge import _BoundedSet",
        "from tuf.ngclient._internal import trusted_metadata_set",
        "Quiet._serve",
        "super()._publish",
        "bridge._send",
        "getattr(bridge, '_lock')",
        "monkeypatch.setattr(bridge, '_stopping', True)",
        "vars(bridge).pop('_serve', None)",
    ])
