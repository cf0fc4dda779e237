"""The examples run as written: each app in examples/ as a real process (its own fabric, so
nothing else on the loopback answers it), bounded; the README's server and client as files; and
the README's Python blocks are those files, character for character."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable

import pytest

from tests.procs import ROOT, Child, ProcessGroup

pytestmark = pytest.mark.slow

EXAMPLES = ROOT / "examples"
#: One example app, start to end (it starts and stops its own processes).
APP_S = 120.0


def fabric_env(name: Callable[[str], str]) -> dict[str, str]:
    return {"ZMQFABRIC_FABRIC": name("ex"), "PYTHONPATH": f"{EXAMPLES}{os.pathsep}{ROOT}"}


def run_app(procs: ProcessGroup, env: dict[str, str], *argv: str) -> list[str]:
    """Run ``python examples/<argv>`` to its end; its stdout lines (exit 0 asserted)."""
    child = Child([sys.executable, str(EXAMPLES / argv[0]), *argv[1:]], env)
    procs.children.append(child)
    code = child.wait(APP_S)
    assert code == 0, child.err_tail()
    lines = []
    while True:
        try:
            lines.append(child.readline(timeout=5.0))
        except EOFError:
            return lines


def test_a_service_with_workers(procs: ProcessGroup, name: Callable[[str], str]) -> None:
    (line,) = run_app(procs, fabric_env(name), "thumbnails.py")
    found = re.fullmatch(r"30 thumbnails made by 3 workers: thumbs-1 (\d+), thumbs-2 (\d+), "
                         r"thumbs-3 (\d+)", line)
    assert found, line
    counts = [int(n) for n in found.groups()]
    assert sum(counts) == 30 and min(counts) >= 1, counts


def test_a_price_feed_with_subscribers(procs: ProcessGroup, name: Callable[[str], str]) -> None:
    lines = run_app(procs, fabric_env(name), "prices.py")
    assert [line.split(",")[0] for line in lines] == ["subscriber EUR: 40 prices",
                                                      "subscriber GBP: 20 prices"], lines
    assert re.search(r"last EUR\w{3} [\d.]+/[\d.]+$", lines[0]), lines
    assert re.search(r"last GBPUSD [\d.]+/[\d.]+$", lines[1]), lines


def test_a_journaled_task_pipeline_survives_its_producer(
    procs: ProcessGroup, name: Callable[[str], str],
) -> None:
    lines = run_app(procs, fabric_env(name), "pipeline.py")
    assert lines == [
        "producer 1 submitted 10 tasks and was killed before any worker ran",
        "producer 2 resent the 10 from the journal and submitted 5 more: 15 done, "
        "0 dead-lettered",
    ], lines


@pytest.mark.parametrize("serve", [["-m", "zmqfabric", "run", "myapp:node", "--name",
                                    "thumbs-2"], ["examples/myapp.py"]],
                         ids=["zmqfabric-run", "python-myapp"])
def test_the_readme_server_and_client(procs: ProcessGroup, name: Callable[[str], str],
                                      serve: list[str]) -> None:
    env = fabric_env(name)
    server = Child([sys.executable, *serve], env)
    procs.children.append(server)
    if "run" in serve:
        assert server.expect("ready: node ", timeout=30.0).startswith("thumbs-2 ")
    lines = run_app(procs, env, "web.py")  # finds the server within its 2 s timeouts
    by = "thumbs-2" if "run" in serve else "thumbs"
    assert lines == [
        f"{{'path': 'a.png', 'size': 128, 'by': '{by}'}} {{'path': 'a.png', 'resized': True}}",
        "('EURUSD', {'bid': 1.1})",
        "{'frame': 1}",
    ], lines
    server.signal(signal.SIGTERM)
    assert server.wait(30.0) == 0, server.err_tail()


def python_blocks(markdown: str) -> dict[str, str]:
    """The ```python blocks that start with ``# examples/NAME.py``, by NAME; and the others
    under their position."""
    blocks = {}
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", markdown, re.S)):
        first = block.splitlines()[0] if block else ""
        marked = re.match(r"# (examples/[\w.]+\.py)\b", first)
        blocks[marked.group(1) if marked else f"unmarked block {i}"] = block
    return blocks


def check_blocks(path: Path, fragments: int) -> None:
    """Every python block of ``path`` is an example file (the whole file), except ``fragments``
    short ones that show one call (they say what they need in words)."""
    blocks = python_blocks(path.read_text())
    unmarked = [k for k in blocks if k.startswith("unmarked")]
    assert len(unmarked) <= fragments, (path, [blocks[k][:80] for k in unmarked])
    marked = {k: v for k, v in blocks.items() if not k.startswith("unmarked")}
    assert {"examples/myapp.py", "examples/web.py"} <= set(marked), path
    for file, text in marked.items():
        assert text == (ROOT / file).read_text(), f"{path}: the block of {file} differs"


def test_the_proposed_readme_section_shows_the_example_files() -> None:
    check_blocks(ROOT / "docs" / "README-python.md", fragments=0)


def test_the_readme_python_blocks_are_the_example_files() -> None:
    # Two fragments stay: the LAN keys lines and the devices lines.
    check_blocks(ROOT / "README.md", fragments=2)
