"""Fabrics: nodes of different fabrics share a network but never see, list or reach each other,
and their names conflict only within a fabric. Real nodes and real zeroconf on loopback."""

from __future__ import annotations

import json
from typing import Callable

import pytest

import zmqfabric as zf
from tests.procs import ProcessGroup
from tests.test_cli import cli_run, finish

pytestmark = pytest.mark.slow

#: Bound for a node to see another one of its own fabric (milliseconds in practice).
SEE_S = 10.0


def fabric_pair(make_node: Callable[..., zf.Node], name: Callable[[str], str],
                prefix: str) -> tuple[zf.Node, zf.Node, str]:
    """Two nodes of a fresh fabric that have seen each other (so each has had the time to hear
    every record on the loopback fabric, its own fabric's and the others')."""
    fabric = name(prefix)[:32].rstrip("-_")
    a = make_node(f"{prefix}a", fabric=fabric)
    b = make_node(f"{prefix}b", fabric=fabric)
    a.wait_for_node(b.name, SEE_S)
    b.wait_for_node(a.name, SEE_S)
    return a, b, fabric


def test_nodes_of_other_fabrics_are_never_seen(make_node: Callable[..., zf.Node],
                                               name: Callable[[str], str]) -> None:
    blue_a, blue_b, _ = fabric_pair(make_node, name, "blue")
    red_a, red_b, _ = fabric_pair(make_node, name, "red")
    # Each side received the other fabric's records (counted) and kept none of them.
    for node, others in ((blue_a, (red_a, red_b)), (red_a, (blue_a, blue_b))):
        assert node.counters.snapshot().get("other_fabric_records", 0) > 0, node.name
        names = {r.name for r in node.nodes()}
        assert not names & {o.name for o in others}, names
    with pytest.raises(zf.NodeNotFoundError):
        blue_a.ping(red_a.name, timeout=0.5)


def test_a_service_of_another_fabric_is_not_called(make_node: Callable[..., zf.Node],
                                                   name: Callable[[str], str]) -> None:
    svc = name("svc")
    red = zf.Node(name("red"), fabric="red-" + name("f")[:20])

    @red.reply(svc)
    def answer(body: object) -> str:
        return "from red"

    red.serve_in_background()
    try:
        blue_a, _, _ = fabric_pair(make_node, name, "blue")
        assert blue_a.counters.snapshot().get("other_fabric_records", 0) > 0
        with pytest.raises(zf.NoProviderError):
            blue_a.request(svc, None, timeout=0.5)
    finally:
        red.close()


def test_names_conflict_only_within_a_fabric(name: Callable[[str], str]) -> None:
    shared = name("dup")
    blue, red = "blue-" + name("f")[:20], "red-" + name("f")[:20]
    with zf.Node(shared, fabric=blue) as first, zf.Node(shared, fabric=red) as other:
        assert (first.name, other.name) == (shared, shared)
        with pytest.raises(zf.NameConflictError):
            zf.Node(shared, fabric=blue).start()


def test_default_fabric_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZMQFABRIC_FABRIC", "from-env")
    assert zf.Node("envnode").config.fabric == "from-env"
    assert zf.Node("envnode", fabric="given").config.fabric == "given"
    monkeypatch.delenv("ZMQFABRIC_FABRIC")
    assert zf.Node("envnode").config.fabric == "default"
    with pytest.raises(zf.InvalidNameError):
        zf.Node("envnode", fabric="Not A Name")


def test_ls_lists_only_its_fabric_and_shows_it(procs: ProcessGroup,
                                               make_node: Callable[..., zf.Node],
                                               name: Callable[[str], str]) -> None:
    blue_a, blue_b, blue = fabric_pair(make_node, name, "blue")
    red_a, _, red = fabric_pair(make_node, name, "red")
    code, out, err = finish(procs.cli("--fabric", blue, "--json", "ls"))
    assert code == 0, err
    rows = [json.loads(line) for line in out]
    assert {blue_a.name, blue_b.name} <= {r["name"] for r in rows}, out
    assert all(r["fabric"] == blue for r in rows), rows
    code, text, err = cli_run("--fabric", red, "ls")
    assert code == 0, err
    assert text[0].startswith(f"fabric {red!r}"), text
    assert any(red_a.name in line for line in text), text
    assert not any(blue_a.name in line for line in text), text
