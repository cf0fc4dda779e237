"""Copies of an accusation already taken are skipped before they are decoded
(zmqfabric.discovery.swim: ``decode_updates(..., taken=)`` and ``Local.took``): in a death storm
each update reaches a node many times over, and only the first one may cost anything. What is
skipped must be an exact repeat in what counts (kind, node, incarnation, origin); anything else
is decoded, validated and counted as before."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from zmqfabric import constants as C
from zmqfabric.config import NodeConfig
from zmqfabric.core.updates import Kind, Update
from zmqfabric.discovery.swim import Local, decode_updates

X = "00000000000000aa"
ORIGIN = "00000000000000bb"


def local() -> Local:
    return Local(SimpleNamespace(config=NodeConfig()))  # type: ignore[arg-type]


def wire(kind: Kind, inc: int, origin: str = "", name: str = "x") -> list[Any]:
    return Update(kind, X, inc, name, "tcp://127.0.0.1:7001", None, origin).encode()


def test_a_taken_accusation_is_skipped_and_anything_else_is_decoded() -> None:
    mine = local()
    dead = Update.decode(wire(Kind.DEAD, 3))
    assert decode_updates([wire(Kind.DEAD, 3)], taken=mine.taken) == ([dead], 0)
    mine.took(dead)
    # The same death again: skipped, even with other (unused) fields, even malformed ones.
    assert decode_updates([wire(Kind.DEAD, 3), wire(Kind.DEAD, 3, name="!!bad name")],
                          taken=mine.taken) == ([], 0)
    # Another incarnation, kind or origin is news: decoded (and refused if malformed).
    got, refused = decode_updates([wire(Kind.DEAD, 4), wire(Kind.SUSPECT, 3, ORIGIN),
                                   wire(Kind.LEFT, 3), wire(Kind.DEAD, 4, name="!!bad")],
                                  taken=mine.taken)
    assert [(u.kind, u.inc) for u in got] == [(Kind.DEAD, 4), (Kind.SUSPECT, 3),
                                              (Kind.LEFT, 3)] and refused == 1
    # Without the table nothing is skipped.
    assert decode_updates([wire(Kind.DEAD, 3)]) == ([dead], 0)


def test_alive_updates_are_never_skipped_and_the_table_is_bounded() -> None:
    mine = local()
    alive = Update.decode(wire(Kind.ALIVE, 5))
    mine.took(alive)  # each alive may be a hint to verify: never remembered
    assert decode_updates([wire(Kind.ALIVE, 5)], taken=mine.taken) == ([alive], 0)
    for i in range(C.MAX_TAKEN + 10):
        mine.took(Update(Kind.DEAD, f"{i:016x}", 0, "n", "", None, ""))
    assert 0 < len(mine.taken) <= C.MAX_TAKEN
