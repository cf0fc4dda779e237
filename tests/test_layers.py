"""The architecture as a table, checked against the source.

The layers of DESIGN.md ("Architecture (layers point one way)"), bottom to top, are the table
below: each layer, the modules in it, and the layers it may import besides its own modules. An
AST pass over every ``.py`` of ``zmqfabric/`` and ``devices/`` (installed as
``zmqfabric.devices``) records every import edge, tagged ``module`` (runs at import time, class
bodies included), ``function`` (inside a def) or ``TYPE_CHECKING`` (under ``if TYPE_CHECKING:``).
Every kind counts: a type-only import is still a dependency a reader has to follow. Then:

- every module lies in exactly one layer, and every import of the fabric names a module;
- every edge goes down the table or stays inside its layer; only the two node shells import
  ``nodebase``;
- the pure core (and ``constants``, ``errors``, which the core imports) uses no IO, threads,
  event loop or clock: the standard library minus those, and msgpack; ``stats`` and ``config``
  import no zmq or zeroconf;
- no import cycles (Tarjan's strongly connected components over all edges);
- no private reaches across modules: ``from x import _name``, and ``expr._name`` on anything but
  bare ``self``/``cls``, apart from a short commented allow-list of other libraries' names.

The check is static, so it sees imports inside functions and under ``TYPE_CHECKING`` too; in the
pure layers ``importlib`` and ``__import__`` are refused so that it cannot be side-stepped. The
checkers themselves are tested on small sources at the end.
"""

from __future__ import annotations

import ast
import fnmatch
import sys
from collections import defaultdict, deque
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

# --- the architecture ---------------------------------------------------------------------------

#: Layer -> its modules (dotted names; ``*`` matches any tail). Bottom to top.
LAYERS: dict[str, tuple[str, ...]] = {
    # foundation: every layer may import these
    "constants": ("zmqfabric.constants",),
    "errors": ("zmqfabric.errors",),
    # pure: wire, records, task table; no IO, the clock is passed in
    "core": ("zmqfabric.core", "zmqfabric.core.*"),
    # foundations with no zmq: counters and rate-limited logs; NodeConfig, Scope, peers
    "stats": ("zmqfabric.stats",),
    "config": ("zmqfabric.config",),
    # the only place that creates sockets, sets their options and maps ZMQError
    "transport": ("zmqfabric.transport", "zmqfabric.transport.*"),
    # keys, ZAP; mDNS hints -> verified peers (directory, membership, liveness)
    "security": ("zmqfabric.security", "zmqfabric.security.*"),
    "discovery": ("zmqfabric.discovery", "zmqfabric.discovery.*"),
    # Prometheus metrics of a node: hooks and a collector over what the runtime holds
    "metrics": ("zmqfabric.metrics", "zmqfabric.metrics.*"),
    # the narrow NodeRuntime that patterns, tasks, control and devices are given
    "runtime": ("zmqfabric.runtime",),
    # endpoints and reliable tasks, written once for both shells; tasks and control are
    # endpoints too (a task worker is a bound handle, dead letters a publisher, control a
    # reply service), so they sit on the patterns
    "patterns": ("zmqfabric.patterns", "zmqfabric.patterns.*"),
    "tasks": ("zmqfabric.tasks", "zmqfabric.tasks.*"),
    "control": ("zmqfabric.control", "zmqfabric.calls"),
    # a node's reply services: registered before start, opened at start (as tasks.registry)
    "services": ("zmqfabric.services",),
    # the composition root: the only modules that know every part (the node base, and its
    # background parts with the order they open and close in)
    "nodebase": ("zmqfabric.nodebase", "zmqfabric.nodeparts"),
    # the sync and asyncio shells, and the public surface
    "shells": ("zmqfabric", "zmqfabric.node", "zmqfabric.aio"),
    # entry points: thin, no protocol logic; the CLI runs devices (its ``device`` command), and
    # ``python -m zmqfabric`` is the CLI
    "devices": ("zmqfabric.devices", "zmqfabric.devices.*"),
    "cli": ("zmqfabric.__main__", "zmqfabric.cli", "zmqfabric.cli.*"),
}

#: Layer -> the layers it may import besides itself (any edge kind). Bottom to top.
MAY_IMPORT: dict[str, frozenset[str]] = {
    name: frozenset(allowed)
    for name, allowed in {
        "constants": [],
        "errors": ["constants"],
        "core": ["constants", "errors"],
        "stats": ["constants", "errors", "core"],
        "config": ["constants", "errors", "core"],
        "transport": ["constants", "errors", "core", "stats", "config"],
        "security": ["constants", "errors", "core", "stats", "config", "transport"],
        "discovery": ["constants", "errors", "core", "stats", "config", "transport"],
        "metrics": ["constants", "errors", "core", "stats"],
        "runtime": ["constants", "errors", "core", "stats", "config", "transport",
                    "security", "discovery", "metrics"],
        "patterns": ["constants", "errors", "core", "stats", "config", "transport",
                     "security", "discovery", "metrics", "runtime"],
        "tasks": ["constants", "errors", "core", "stats", "config", "transport",
                  "security", "discovery", "metrics", "runtime", "patterns"],
        "control": ["constants", "errors", "core", "stats", "config", "transport",
                    "security", "discovery", "metrics", "runtime", "patterns"],
        "services": ["constants", "errors", "core", "stats", "config", "transport",
                     "security", "discovery", "metrics", "runtime", "patterns"],
        "nodebase": ["constants", "errors", "core", "stats", "config", "transport",
                     "security", "discovery", "metrics", "runtime", "patterns", "tasks", "control",
                     "services"],
        "shells": ["constants", "errors", "core", "stats", "config", "transport",
                   "security", "discovery", "metrics", "runtime", "patterns", "tasks", "control",
                   "services", "nodebase"],
        # Neither entry point sees the node base.
        "devices": ["constants", "errors", "core", "stats", "config", "transport",
                    "security", "discovery", "metrics", "runtime", "patterns", "tasks", "control",
                    "services", "shells"],
        "cli": ["constants", "errors", "core", "stats", "config", "transport",
                "security", "discovery", "metrics", "runtime", "patterns", "tasks", "control",
                "services", "shells", "devices"],
    }.items()
}

#: The only modules that may import ``nodebase`` (the shells layer also holds ``__init__``).
NODEBASE_IMPORTERS = frozenset({"zmqfabric.node", "zmqfabric.aio"})
#: Modules only the named ones may import, whatever the table allows their layers.
ONLY_IMPORTED_BY: dict[str, frozenset[str]] = {
    "zmqfabric.nodebase": NODEBASE_IMPORTERS,
    # the node's background parts are the node base's business
    "zmqfabric.nodeparts": frozenset({"zmqfabric.nodebase"}),
}

#: Layers held to the core's purity: IO, threads, event loops, the clock and dynamic imports are
#: refused; of the rest, only the standard library and msgpack.
PURE_LAYERS = frozenset({"constants", "errors", "core"})
PURE_FORBIDDEN = frozenset(
    {
        "zmq",
        "zeroconf",
        "ifaddr",
        "asyncio",
        "threading",
        "_thread",
        "multiprocessing",
        "concurrent",
        "socket",
        "socketserver",
        "selectors",
        "select",
        "ssl",
        "subprocess",
        "signal",
        "time",
        "importlib",
    }
)
PURE_THIRD_PARTY = frozenset({"msgpack"})
#: Other layers' forbidden imports (any edge kind).
FORBIDDEN_IMPORTS: dict[str, frozenset[str]] = {
    "stats": frozenset({"zmq", "zeroconf"}),
    "config": frozenset({"zmq", "zeroconf"}),
}

#: Private names of other libraries that are theirs to give: (base expression or "*", name).
#: Nothing of the fabric belongs here.
ALLOWED_PRIVATE: dict[tuple[str, str], str] = {
    # Python's documented way out of a process without cleanup (used by the CLI).
    ("os", "_exit"): "stdlib API with a leading underscore",
    ("sys", "_getframe"): "stdlib API with a leading underscore",
    # An override calling its parent's hook: super() is self, seen through the parent class.
    ("super()", "*"): "the object itself",
    # The sync socket behind a zmq.asyncio socket (transport/sockets.sync_view); pyzmq offers
    # no public accessor that does not build a new socket object per call.
    ("*", "_shadow_sock"): "pyzmq internal, read in one place",
}

# --- the source ---------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
#: Source folder -> the dotted name it is installed as (setup.cfg: package_dir).
SOURCES = {ROOT / "zmqfabric": "zmqfabric", ROOT / "devices": "zmqfabric.devices"}

MODULE, FUNCTION, TYPE_CHECKING = "module", "function", "TYPE_CHECKING"


@dataclass(frozen=True)
class Source:
    name: str  # dotted module name
    path: Path
    is_package: bool

    @property
    def where(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


@dataclass(frozen=True)
class Import:
    """One name an import statement brings in: ``target`` is the dotted name it refers to
    (``from a import b`` gives ``a.b``, a module or a name of ``a``)."""

    line: int
    target: str
    kind: str  # MODULE, FUNCTION or TYPE_CHECKING


@dataclass(frozen=True)
class Edge:
    source: Source
    line: int
    target: str  # a module of the fabric
    kind: str
    exact: bool  # False: the import named no module of the fabric (target is its nearest one)

    def __str__(self) -> str:
        return f"{self.source.where}:{self.line}: {self.source.name} -> {self.target} ({self.kind})"


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


@cache
def sources() -> dict[str, Source]:
    found: dict[str, Source] = {}
    for root, package in SOURCES.items():
        for path in sorted(root.rglob("*.py")):
            name = module_name(path, root, package)
            found[name] = Source(name, path, path.name == "__init__.py")
    return found


class ImportCollector(ast.NodeVisitor):
    """Every import of one module, resolved to absolute names and tagged with its kind."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.imports: list[Import] = []
        self.dynamic: list[int] = []  # lines calling __import__
        self._functions = 0
        self._type_checking = 0

    @property
    def kind(self) -> str:
        if self._type_checking:
            return TYPE_CHECKING
        return FUNCTION if self._functions else MODULE

    def _function(self, node: ast.AST) -> None:
        self._functions += 1
        self.generic_visit(node)
        self._functions -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            self._type_checking += 1
            for statement in node.body:
                self.visit(statement)
            self._type_checking -= 1
            for statement in node.orelse:
                self.visit(statement)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.imports.append(Import(node.lineno, alias.name, self.kind))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        for alias in node.names:
            self.imports.append(Import(node.lineno, f"{prefix}.{alias.name}", self.kind))

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id == "__import__":
            self.dynamic.append(node.lineno)
        self.generic_visit(node)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def collect(source: str, module: str, is_package: bool = False) -> ImportCollector:
    collector = ImportCollector(module, is_package)
    collector.visit(ast.parse(source))
    return collector


@cache
def collected(name: str) -> ImportCollector:
    src = sources()[name]
    return collect(src.path.read_text(encoding="utf-8"), name, src.is_package)


def resolve(target: str, known: set[str] | dict[str, Source]) -> tuple[str, bool]:
    """The module of the fabric an imported name refers to, and whether it is exact: ``a.b``
    itself if it is a module, else ``a`` if ``b`` is a name in module ``a``; for a name that
    matches neither, its nearest existing package and False."""
    if target in known:
        return target, True
    parent = target.rpartition(".")[0]
    if parent in known:
        return parent, True
    while parent and parent not in known:
        parent = parent.rpartition(".")[0]
    return parent, False


def is_fabric(target: str) -> bool:
    return target == "zmqfabric" or target.startswith("zmqfabric.")


@cache
def edges() -> tuple[Edge, ...]:
    """Every import edge between modules of the fabric (one per statement and target)."""
    known = sources()
    found: dict[Edge, None] = {}
    for name, src in known.items():
        for imp in collected(name).imports:
            if is_fabric(imp.target):
                target, exact = resolve(imp.target, known)
                found[Edge(src, imp.line, target, imp.kind, exact)] = None
    return tuple(found)


def layer_of(module: str) -> str | None:
    for layer, patterns in LAYERS.items():
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return layer
    return None


def listing(problems: list[str]) -> str:
    """One problem a line, by file and line number (each starts "path:line: ")."""

    def key(problem: str) -> tuple[str, int, str]:
        path, line, rest = problem.split(":", 2)
        return path, int(line) if line.isdigit() else 0, rest

    return "\n".join(sorted(set(problems), key=key))


# --- checks -------------------------------------------------------------------------------------


def test_the_source_is_found() -> None:
    names = set(sources())
    assert {"zmqfabric", "zmqfabric.nodebase", "zmqfabric.core.wire",
            "zmqfabric.devices", "zmqfabric.devices.base"} <= names


def test_the_table_points_one_way() -> None:
    """Each layer may import only layers listed before it: the table is a ladder, not a web."""
    order = list(LAYERS)
    assert list(MAY_IMPORT) == order
    bad = [f"{layer} may import {other}, which is not below it"
           for layer, allowed in MAY_IMPORT.items() for other in allowed
           if other not in order or order.index(other) >= order.index(layer)]
    assert not bad, listing(bad)


def test_every_module_lies_in_one_layer() -> None:
    bad = []
    for name, src in sources().items():
        layers = [layer for layer, patterns in LAYERS.items()
                  if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
        if len(layers) != 1:
            bad.append(f"{src.where}: {name} is in {layers or 'no layer'}: add it to LAYERS")
    assert not bad, listing(bad)


def test_every_import_of_the_fabric_names_a_module() -> None:
    bad = [f"{edge}: no module or name {edge.target!r} has" for edge in edges() if not edge.exact]
    assert not bad, listing(bad)


def test_imports_follow_the_layers() -> None:
    bad = []
    for edge in edges():
        here, there = layer_of(edge.source.name), layer_of(edge.target)
        if here is None or there is None or here == there:
            continue  # unplaced modules fail test_every_module_lies_in_one_layer
        if there not in MAY_IMPORT[here]:
            bad.append(f"{edge}: {here} -> {there} (the table allows {here} -> "
                       f"{', '.join(sorted(MAY_IMPORT[here])) or 'nothing'})")
    assert not bad, listing(bad)


def test_only_the_shells_import_nodebase() -> None:
    """And only the node base imports its parts (ONLY_IMPORTED_BY)."""
    bad = [f"{edge}: only {', '.join(sorted(ONLY_IMPORTED_BY[edge.target]))} may import "
           f"{edge.target}"
           for edge in edges()
           if edge.source.name not in ONLY_IMPORTED_BY.get(edge.target, {edge.source.name})]
    assert not bad, listing(bad)


def impurities(collector: ImportCollector, module: str, where: str) -> list[str]:
    """What a module of a pure layer imports that is not pure (the fabric's edges are the
    table's business)."""
    bad = [f"{where}:{line}: {module} calls __import__ (forbidden in the pure layers)"
           for line in collector.dynamic]
    for imp in collector.imports:
        top = imp.target.split(".")[0]
        if top in PURE_FORBIDDEN:
            bad.append(f"{where}:{imp.line}: {module} -> {imp.target} ({imp.kind}): "
                       "IO, threads, event loops, the clock and dynamic imports stay out")
        elif top not in sys.stdlib_module_names | PURE_THIRD_PARTY | {"__future__", "zmqfabric"}:
            bad.append(f"{where}:{imp.line}: {module} -> {imp.target} ({imp.kind}): only the "
                       f"standard library and {', '.join(sorted(PURE_THIRD_PARTY))}")
    return bad


def test_the_pure_layers_stay_pure() -> None:
    assert any(layer_of(name) == "core" for name in sources()), "no core modules found"
    bad = []
    for name, src in sources().items():
        if layer_of(name) in PURE_LAYERS:
            bad += impurities(collected(name), name, src.where)
    assert not bad, listing(bad)


def test_foundations_import_no_sockets() -> None:
    bad = []
    for name, src in sources().items():
        forbidden = FORBIDDEN_IMPORTS.get(layer_of(name) or "", frozenset())
        for imp in collected(name).imports:
            if imp.target.split(".")[0] in forbidden:
                bad.append(f"{src.where}:{imp.line}: {name} -> {imp.target} ({imp.kind}): "
                           f"{layer_of(name)} imports none of {', '.join(sorted(forbidden))}")
    assert not bad, listing(bad)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the strongly connected components of ``graph`` with more than one
    node or a self-loop (each one holds a cycle), members sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def shortest_cycle(graph: dict[str, set[str]], start: str, within: set[str]) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``within`` (breadth first)."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph.get(node, ())):
            if succ == start:
                path = [node]
                while (up := parent[path[-1]]) is not None:
                    path.append(up)
                return [*reversed(path), start]
            if succ in within and succ not in parent:
                parent[succ] = node
                queue.append(succ)
    return []


def cycles_report(all_edges: tuple[Edge, ...] | list[Edge]) -> list[str]:
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in all_edges:
        graph[edge.source.name].add(edge.target)
    reports = []
    for component in strongly_connected(graph):
        members = set(component)
        inside = listing([str(edge) for edge in all_edges
                          if edge.source.name in members and edge.target in members])
        cycle = " -> ".join(shortest_cycle(graph, component[0], members))
        reports.append(f"a cycle through {len(component)} modules ({', '.join(component)}), "
                       f"e.g. {cycle}; the edges among them:\n    "
                       + inside.replace("\n", "\n    "))
    return reports


@pytest.mark.parametrize(
    "kinds",
    [(MODULE,), (MODULE, FUNCTION), (MODULE, FUNCTION, TYPE_CHECKING)],
    ids=["module-level", "with-function-level", "all-edges"],
)
def test_no_import_cycles(kinds: tuple[str, ...]) -> None:
    """No cycle over all edges (the rule); the narrower edge sets say which cycles are real at
    import time (module level) or when a function runs, and which exist only for the reader."""
    reports = cycles_report([edge for edge in edges() if edge.kind in kinds])
    assert not reports, "\n".join(reports)


def private_reaches(source: str, where: str) -> list[str]:
    """``from x import _name`` / ``import x._name``, ``expr._name`` and
    ``getattr(expr, "_name")`` on anything but bare ``self``/``cls`` (dunders are not private),
    minus ALLOWED_PRIVATE."""

    def allowed(base: str, name: str) -> bool:
        return any(key in ALLOWED_PRIVATE for key in ((base, name), (base, "*"), ("*", name)))

    tree = ast.parse(source)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            for alias in node.names:
                if _is_private(alias.name) and not allowed(module, alias.name):
                    bad.append(f"{where}:{node.lineno}: from {module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if any(_is_private(part) for part in alias.name.split(".")[1:]):
                    bad.append(f"{where}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.Attribute):
            reach = _reach(node.value, node.attr)
            if reach and not allowed(*reach):
                bad.append(f"{where}:{node.lineno}: {reach[0]}.{reach[1]}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str)):
            reach = _reach(node.args[0], node.args[1].value)
            if reach and not allowed(*reach):
                bad.append(f"{where}:{node.lineno}: {node.func.id}({reach[0]}, {reach[1]!r})")
    return bad


def _reach(base: ast.expr, name: str) -> tuple[str, str] | None:
    """(base expression, name) if ``base.name`` reaches into another object's privates."""
    if not _is_private(name):
        return None
    if isinstance(base, ast.Name) and base.id in ("self", "cls"):
        return None
    return ast.unparse(base), name


def test_no_private_reaches_across_modules() -> None:
    bad = []
    for src in sources().values():
        bad += private_reaches(src.path.read_text(encoding="utf-8"), src.where)
    assert not bad, listing(bad)


# --- the checkers themselves --------------------------------------------------------------------


def _imports(source: str, module: str = "zmqfabric.core.example",
             is_package: bool = False) -> list[tuple[str, str]]:
    return [(imp.target, imp.kind) for imp in collect(source, module, is_package).imports]


@pytest.mark.parametrize(
    ("source", "module", "is_package", "expected"),
    [
        ("from ..node import Node", "zmqfabric.core.wire", False, "zmqfabric.node.Node"),
        ("from .. import constants", "zmqfabric.core.wire", False, "zmqfabric.constants"),
        ("from . import wire", "zmqfabric.core", True, "zmqfabric.core.wire"),
        ("from .base import Device", "zmqfabric.devices.queue", False,
         "zmqfabric.devices.base.Device"),
        ("from ...config import Scope", "zmqfabric.cli.demo.run", False,
         "zmqfabric.config.Scope"),
        ("import zmqfabric.aio", "zmqfabric.cli", True, "zmqfabric.aio"),
    ],
)
def test_imports_are_resolved(source: str, module: str, is_package: bool, expected: str) -> None:
    assert _imports(source, module, is_package) == [(expected, MODULE)]


def test_resolve_finds_the_module_of_a_name() -> None:
    known = {"zmqfabric", "zmqfabric.core", "zmqfabric.core.wire", "zmqfabric.node"}
    assert resolve("zmqfabric.core.wire", known) == ("zmqfabric.core.wire", True)
    assert resolve("zmqfabric.core.wire.Kind", known) == ("zmqfabric.core.wire", True)
    assert resolve("zmqfabric.__version__", known) == ("zmqfabric", True)
    assert resolve("zmqfabric.gone.thing", known) == ("zmqfabric", False)


def test_edge_kinds() -> None:
    source = """
from typing import TYPE_CHECKING
import a
if TYPE_CHECKING:
    import b
    def f():
        import c
else:
    import d
class K:
    import e
    def m(self):
        import f
async def g():
    import h
if typing.TYPE_CHECKING:
    import i
try:
    import j
except ImportError:
    pass
"""
    kinds = dict(_imports(source))
    assert kinds == {"typing.TYPE_CHECKING": MODULE, "a": MODULE, "b": TYPE_CHECKING,
                     "c": TYPE_CHECKING, "d": MODULE, "e": MODULE, "f": FUNCTION,
                     "h": FUNCTION, "i": TYPE_CHECKING, "j": MODULE}


@pytest.mark.parametrize(
    "source",
    [
        "import zmq",
        "import zmq.asyncio",
        "from zeroconf import Zeroconf",
        "import asyncio",
        "import threading",
        "from socket import socket",
        "import selectors",
        "import subprocess",
        "import time",
        "from time import monotonic",
        "def f():\n    import time\n    return time.time()",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import zmq",
        "import importlib\nimportlib.import_module('zmq')",
        "__import__('zmq')",
        "import numpy",
    ],
)
def test_purity_checker_catches(source: str) -> None:
    assert impurities(collect(source, "zmqfabric.core.example"), "zmqfabric.core.example", "x")


@pytest.mark.parametrize(
    "source",
    [
        "from __future__ import annotations",
        "import enum, struct, re, ipaddress, dataclasses, typing",
        "import msgpack",
        "from ..constants import MAX_HEADER_SIZE",
        "from .. import constants, errors",
        "from . import wire",
        "import zmqfabric.core.wire",
    ],
)
def test_purity_checker_allows(source: str) -> None:
    assert impurities(collect(source, "zmqfabric.core.example"), "zmqfabric.core.example",
                      "x") == []


@pytest.mark.parametrize(
    ("source", "module", "allowed"),
    [
        ("from ..node import Node", "zmqfabric.core.example", False),
        ("from .. import transport", "zmqfabric.core.example", False),
        ("from ..patterns.base import Handle", "zmqfabric.core.example", False),
        ("import zmqfabric.discovery", "zmqfabric.core.example", False),
        ("from .security.keys import KeySet", "zmqfabric.config", False),
        ("from ..nodebase import NodeBase", "zmqfabric.patterns.base", False),
        ("from ..tasks.registry import NodeTasks", "zmqfabric.patterns.base", False),
        ("from .nodebase import NodeBase", "zmqfabric.control", False),
        ("from zmqfabric.nodebase import NodeBase", "zmqfabric.devices.base", False),
        ("from ..devices import KINDS", "zmqfabric.cli.operate", True),
        ("from ..constants import X", "zmqfabric.core.example", True),
        ("from .errors import LocalProtocolError", "zmqfabric.config", True),
        ("from ..patterns.base import Bound", "zmqfabric.tasks.worker", True),
        ("from ..runtime import NodeRuntime", "zmqfabric.patterns.base", True),
        ("from .nodebase import NodeBase", "zmqfabric.node", True),
        ("from .nodeparts import NodeParts", "zmqfabric.node", False),
        ("from .nodeparts import NodeParts", "zmqfabric.nodebase", True),
        ("from .services import NodeServices", "zmqfabric.nodebase", True),
        ("from .services import NodeServices", "zmqfabric.control", False),
    ],
)
def test_the_table_decides(source: str, module: str, allowed: bool) -> None:
    known = set(sources()) | {"zmqfabric.core.example", "zmqfabric.runtime"}
    (imp,) = collect(source, module, False).imports
    target, _ = resolve(imp.target, known)
    here, there = layer_of(module), layer_of(target)
    assert here is not None and there is not None
    ok = (here == there or there in MAY_IMPORT[here]) and (
        module in ONLY_IMPORTED_BY.get(target, {module}))
    assert ok is allowed, f"{module} ({here}) -> {target} ({there})"


@pytest.mark.parametrize(
    "source",
    [
        "from .registry import _DONE",
        "from .frames import _ms_left, send_frames",
        "import zmq._future",
        "node._sockets",
        "self._node._track(x)",
        "self.node._stats_sources[k] = v",
        "other._x == 1",
        "type(self)._cache",
        "obj.__mangled",
        "getattr(node, '_state')",
        "setattr(node, '_state', 1)",
    ],
)
def test_private_reach_checker_catches(source: str) -> None:
    assert private_reaches(source, "x")


@pytest.mark.parametrize(
    "source",
    [
        "self._sockets",
        "cls._instance",
        "self._x.y",
        "super()._on_close()",
        "os._exit(3)",
        "node.__class__",
        "from x import __version__",
        "from zmq.backend import Socket",
        "getattr(sock, '_shadow_sock', sock)",
        "getattr(node, 'name')",
    ],
)
def test_private_reach_checker_allows(source: str) -> None:
    assert private_reaches(source, "x") == []


def test_cycles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"], ["e"]]
    assert shortest_cycle(graph, "a", {"a", "b", "c"}) == ["a", "b", "c", "a"]
    assert shortest_cycle(graph, "e", {"e"}) == ["e", "e"]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []
