"""The core is pure: parse every module under zmqfabric/core and fail on an import of IO, threads,
an event loop or the clock, or of anything outside the standard library, msgpack and the fabric's
own constants and errors. The clock is passed in; sockets live in the layers above.

The check is static (ast), so it also sees imports inside functions and under ``TYPE_CHECKING``;
``importlib``/``__import__`` are refused so that it cannot be side-stepped.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = "zmqfabric"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
CORE = ROOT / "core"

#: IO, concurrency, event loops, the clock and dynamic imports: never in the core.
FORBIDDEN = frozenset(
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
#: Third-party packages the core may use.
THIRD_PARTY = frozenset({"msgpack"})
#: The fabric's own modules the core may import (besides the core itself).
OWN = frozenset({f"{PACKAGE}.constants", f"{PACKAGE}.errors"})


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, relative ones resolved."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from X import y" may import a module X.y or a name of X: judge X.y either way.
            found.extend((node.lineno, f"{prefix}.{alias.name}") for alias in node.names)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id == "__import__":
                found.append((node.lineno, "__import__"))
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    bad = []
    for line, name in imports_of(source, module, is_package):
        top = name.split(".")[0]
        if name == "__import__" or top in FORBIDDEN:
            bad.append(f"{module}:{line}: imports {name} (forbidden in the pure core)")
        elif top == PACKAGE:
            if not any(
                name == own or name.startswith(own + ".") for own in OWN | {f"{PACKAGE}.core"}
            ):
                bad.append(
                    f"{module}:{line}: imports {name} (the core may use only "
                    f"{', '.join(sorted(OWN))} and itself)"
                )
        elif top not in sys.stdlib_module_names and top not in THIRD_PARTY and top != "__future__":
            bad.append(f"{module}:{line}: imports {name} (not stdlib, msgpack or the fabric's own)")
    return bad


CORE_FILES = sorted(CORE.rglob("*.py"))


def test_the_core_has_modules() -> None:
    names = {p.name for p in CORE_FILES}
    assert {"wire.py", "records.py"} <= names


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_is_pure(path: Path) -> None:
    bad = violations(
        path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py"
    )
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", sorted(OWN))
def test_what_the_core_imports_of_the_fabric_is_pure_too(name: str) -> None:
    """Importing the core pulls in constants and errors: they must import nothing impure either
    (and nothing of the fabric's, so the core stays free of the layers above)."""
    path = ROOT / (name.split(".", 1)[1].replace(".", "/") + ".py")
    bad = violations(path.read_text(encoding="utf-8"), name)
    assert not bad, "\n".join(bad)


# --- the checker itself ----------------------------------------------------------------------


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
        "from ..node import Node",
        "from .. import sockets",
        "from ..patterns.base import Handle",
        "import zmqfabric.discovery",
        "from zmqfabric import node",
        "from zmqfabric.constants_extra import X",
    ],
)
def test_checker_catches(source: str) -> None:
    assert violations(source, f"{PACKAGE}.core.example")


@pytest.mark.parametrize(
    "source",
    [
        "from __future__ import annotations",
        "import enum, struct, re, ipaddress, dataclasses, typing",
        "import msgpack",
        "from ..constants import MAX_HEADER_SIZE",
        "from ..errors import RemoteProtocolError",
        "from .. import constants, errors",
        "from . import wire",
        "from .records import EndpointKind",
        "import zmqfabric.core.wire",
        "from zmqfabric import errors",
        "from zmqfabric.core.wire import Kind",
    ],
)
def test_checker_allows(source: str) -> None:
    assert violations(source, f"{PACKAGE}.core.example") == []
