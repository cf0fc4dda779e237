"""The journal's log file (:mod:`zmqfabric.tasks.journal`, :mod:`zmqfabric.tasks.journal_log`)
against what can go wrong with it: a torn tail, a corrupt region, malformed records (quarantined),
growth (compaction, also under SIGKILL). The previous release's journals: test_journal_legacy.py."""

from __future__ import annotations

import base64
import json
import logging
import signal
from pathlib import Path

import msgpack
import pytest

from tests.procs import Child, ProcessGroup
from zmqfabric.constants import JOURNAL_COMPACT_MIN_BYTES
from zmqfabric.tasks.journal import Journal, JournalEntry
from zmqfabric.tasks.journal_log import FILE_HEADER, HEAD, frame


def row(i: int, payload: bytes = b"\x90") -> tuple[str, str, bytes, str | None, float, int]:
    return (f"t-{i}", "resize", payload, None, 1.5, 3)


def ids(entries: list[JournalEntry]) -> list[str]:
    return [e.task_id for e in entries]


def write(path: Path, count: int) -> list[int]:
    """A journal of ``count`` tasks; returns each record's offset."""
    with Journal(path) as journal:
        journal.open()
        offsets = []
        for i in range(count):
            offsets.append(path.stat().st_size)
            journal.add_now([row(i)])
    return offsets


def quarantine(path: Path) -> list[dict]:
    side = Path(str(path) + ".quarantine")
    return [json.loads(line) for line in side.read_text().splitlines()] if side.exists() else []


# --- damage --------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1, HEAD.size - 1, HEAD.size, HEAD.size + 3, -1])
def test_a_torn_tail_is_dropped_with_a_log_line(tmp_path: Path, keep: int, caplog) -> None:
    path = tmp_path / "j.db"
    write(path, 5)
    whole = path.stat().st_size
    record = frame(msgpack.packb([1, "t-torn", "resize", b"\x90", None, 1.5, 3]))
    with path.open("ab") as tail:  # a write the killed process did not finish
        tail.write(record[:keep])
    caplog.set_level(logging.WARNING, "zmqfabric.tasks.journal")
    with Journal(path) as journal:
        assert ids(journal.open()) == [f"t-{i}" for i in range(5)]
        assert journal.quarantined == 0
        assert path.stat().st_size == whole  # cut, so that what follows is readable
        journal.add_now([row(5)])
    assert "torn tail" in caplog.text
    with Journal(path) as journal:
        assert ids(journal.open()) == [f"t-{i}" for i in range(6)]


def test_a_whole_last_record_with_a_wrong_checksum_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    offsets = write(path, 3)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with Journal(path) as journal:
        assert ids(journal.open()) == ["t-0", "t-1"] and journal.quarantined == 0
    assert path.stat().st_size == offsets[2]


@pytest.mark.parametrize("where", ["body", "length", "marker"])
def test_a_corrupt_record_inside_the_file_is_quarantined_and_the_rest_load(
    tmp_path: Path, where: str
) -> None:
    path = tmp_path / "j.db"
    offsets = write(path, 10)
    data = bytearray(path.read_bytes())
    spot = {"body": offsets[4] + HEAD.size + 3, "length": offsets[4] + 4,
            "marker": offsets[4]}[where]
    data[spot] ^= 0x40
    damaged = bytes(data[offsets[4]:offsets[5]])
    path.write_bytes(bytes(data))
    with Journal(path) as journal:
        assert ids(journal.open()) == [f"t-{i}" for i in range(10) if i != 4]
        assert journal.quarantined == 1
    kept = quarantine(path)
    assert len(kept) == 1 and "corrupt" in kept[0]["reason"]
    assert base64.b64decode(kept[0]["record"]) == damaged and kept[0]["offset"] == offsets[4]
    with Journal(path) as journal:  # set aside for good: the file was rewritten without it
        assert len(journal.open()) == 9 and journal.quarantined == 0


def test_malformed_records_are_quarantined_counted_and_the_rest_load(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    write(path, 2)
    bad = {  # reason expected -> what a corrupted or hand-made file may hold
        "msgpack": b"\xc1",
        "non-empty array": msgpack.packb({"id": "x"}),
        "unknown record kind": msgpack.packb([9, "x"]),
        "name": msgpack.packb([1, "t-a", "no spaces allowed", b"\x90", None, 1.0, 3]),
        "deadline": msgpack.packb([1, "t-b", "resize", b"\x90", None, -1.0, 3]),
        "attempts": msgpack.packb([1, "t-c", "resize", b"\x90", None, 1.0, "three"]),
        "key": msgpack.packb([1, "t-d", "resize", b"\x90", "k" * 300, 1.0, 3]),
        "id must": msgpack.packb([1, "t" * 200, "resize", b"\x90", None, 1.0, 3]),
        "payload": msgpack.packb([1, "t-e", "resize", b"\xc1", None, 1.0, 3]),
        "strings": msgpack.packb([2, ["t-0", 7]]),
    }
    with path.open("ab") as tail:
        for body in bad.values():
            tail.write(frame(body))
        tail.write(frame(msgpack.packb([2, ["t-0"]])))  # a good one after them still counts
        tail.write(frame(msgpack.packb([1, "t-9", "resize", b"\x90", "k9", 2.0, 5])))
    with Journal(path) as journal:
        entries = journal.open()
        assert entries == [JournalEntry("t-1", "resize", b"\x90", None, 1.5, 3),
                           JournalEntry("t-9", "resize", b"\x90", "k9", 2.0, 5)]
        assert journal.quarantined == len(bad) and journal.count() == 2
    kept = quarantine(path)
    assert len(kept) == len(bad)
    for (reason, body), item in zip(bad.items(), kept, strict=True):
        assert reason in item["reason"], (reason, item)
        assert base64.b64decode(item["record"])[HEAD.size:] == body
    with Journal(path) as journal:
        assert len(journal.open()) == 2 and journal.quarantined == 0
    assert len(quarantine(path)) == len(bad)


#: Records tasks until the file size limit refuses a write (a full disk, as far as the journal
#: can tell): prints each id whose add_now returned, then the error and the file's size.
FILLING = """
import os, resource, signal
from zmqfabric.errors import JournalError
from zmqfabric.tasks.journal import Journal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
journal = Journal(PATH)
journal.open()
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(PATH) + 1000, resource.RLIM_INFINITY))
print("READY", flush=True)
for i in range(1000):
    try:
        journal.add_now([(f"t-{i}", "resize", b"\\xc4\\x20" + bytes(32), None, 1.0, 3)])
    except JournalError as exc:
        print("ERROR", exc, flush=True)
        break
    print("OK", f"t-{i}", flush=True)
print("SIZE", os.path.getsize(PATH), flush=True)
"""


def test_a_write_the_disk_refuses_fails_and_leaves_no_fragment(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    path = tmp_path / "j.db"
    child = procs.python(FILLING.replace("PATH", repr(str(path))), timeout=120)
    written: list[str] = []
    while True:
        kind, _, rest = child.readline(60).partition(" ")
        if kind != "OK":
            break
        written.append(rest)
    assert kind == "ERROR" and "cannot write" in rest, rest
    assert 10 < len(written) < 1000
    size = int(child.expect("SIZE", 60))
    assert child.wait(60) == 0
    with Journal(path) as journal:
        assert ids(journal.open()) == written and journal.quarantined == 0
    assert size == path.stat().st_size  # cut back to the last whole record: no torn tail


# --- growth --------------------------------------------------------------------------------------


def test_settled_tasks_are_compacted_away_and_the_file_stays_bounded(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    path = tmp_path / "j.db"
    payload = msgpack.packb("x" * 200)
    journal = Journal(path)
    journal.open()
    first = path.stat().st_ino
    kept: list[str] = []
    largest = 0
    for b in range(200):  # about 10 MB appended in all
        batch = [row(b * 100 + i, payload) for i in range(100)]
        for one in batch:
            journal.add_now([one])
        kept += [r[0] for r in batch[::40]]
        journal.remove([r[0] for r in batch if r[0] not in kept[-3:]])
        journal.commit()
        largest = max(largest, path.stat().st_size)
    assert path.stat().st_ino != first  # rewritten (a new file renamed over it)
    assert largest < JOURNAL_COMPACT_MIN_BYTES + 64 * 1024
    assert journal.count() == len(kept)
    # the lock moved with the file: another process is still refused
    other = procs.python(f"""
        from zmqfabric.tasks.journal import Journal
        try:
            Journal({str(path)!r}).open()
            print("READY opened", flush=True)
        except Exception as exc:
            print("READY", type(exc).__name__, exc, flush=True)
    """, ready=False)
    line = other.readline(120)
    assert "JournalError" in line and "in use" in line, line
    journal.close()
    with Journal(path) as again:
        assert ids(again.open()) == kept
    assert not Path(str(path) + ".compact").exists()


def test_compaction_leftovers_of_a_crash_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    write(path, 3)
    Path(str(path) + ".compact").write_bytes(FILE_HEADER + b"half a compaction")
    with Journal(path) as journal:
        assert ids(journal.open()) == ["t-0", "t-1", "t-2"]


#: Records tasks in a loop through a Recorder (ROUND-i), writing "A id" once record() returned,
#: and settles most of each hundred ("S id,id,...", written before forget(): from then on they
#: may be gone): the file is compacted about every 20,000 tasks.
RECORDING = """
import os
from zmqfabric.tasks.journal import Journal
from zmqfabric.tasks.recorder import Recorder
journal = Journal(PATH)
journal.open()
recorder = Recorder(journal)
print("READY", flush=True)
payload = b"\\xda\\x00\\xc8" + b"x" * 200
for i in range(10_000_000):
    task_id = f"{ROUND}-{i}"
    recorder.record([(task_id, "resize", payload, None, 1.0, 3)])
    os.write(1, f"A {task_id}\\n".encode())
    if i % 100 == 99:
        done = [f"{ROUND}-{j}" for j in range(i - 99, i + 1) if j % 37]
        os.write(1, ("S " + ",".join(done) + "\\n").encode())
        recorder.forget(done)
"""


def drain(child: Child, added: set[str], settled: set[str], until: int) -> None:
    """Read the child's lines until ``until`` tasks are added, or (until=0) to its end."""
    while not until or len(added) < until:
        try:
            line = child.readline(60)
        except EOFError:
            return
        kind, _, rest = line.partition(" ")
        if kind == "A":
            added.add(rest)
        elif kind == "S":
            settled.update(rest.split(","))


def test_sigkill_while_recording_and_compacting_loses_no_recorded_task(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    """Three producers in turn, each killed with SIGKILL mid-stream (after a compaction): every
    task whose record() returned and that was not settled is in the journal afterwards."""
    path = tmp_path / "j.db"
    added: set[str] = set()
    settled: set[str] = set()
    for round_, count in enumerate((30_000, 45_000, 25_000)):
        code = RECORDING.replace("PATH", repr(str(path))).replace("ROUND", repr(f"r{round_}"))
        child = procs.python(code, timeout=120)
        drain(child, added, settled, len(added) + count)
        child.kill()
        assert child.wait(30) == -signal.SIGKILL
        assert path.stat().st_size < count * 200  # less than it appended: compacted
        drain(child, added, settled, 0)
        with Journal(path) as journal:
            found = set(ids(journal.open()))
            assert journal.quarantined == 0
        lost = added - settled - found
        assert not lost, f"round {round_}: {len(lost)} recorded tasks lost, e.g. {sorted(lost)[:3]}"
        assert path.stat().st_size < 2 * JOURNAL_COMPACT_MIN_BYTES


#: A journaled producer node submitting in a loop to a task nobody serves; prints each id once
#: submit() returned.
SUBMITTING = """
import os
import zmqfabric as zf
with zf.Node(NAME, tasks=zf.TaskConfig(journal=PATH)) as node:
    print("READY", flush=True)
    for i in range(1_000_000):
        os.write(1, (node.submit(TASK, {"i": i}).id + "\\n").encode())
"""


def test_sigkill_of_a_submitting_producer_loses_no_task_whose_submit_returned(
    tmp_path: Path, procs: ProcessGroup, name
) -> None:
    path = tmp_path / "producer.db"
    code = (SUBMITTING.replace("PATH", repr(str(path))).replace("NAME", repr(name("producer")))
            .replace("TASK", repr(name("job"))))
    child = procs.python(code, timeout=120)
    returned = [child.readline(60) for _ in range(5000)]
    child.kill()
    assert child.wait(30) == -signal.SIGKILL
    while True:
        try:
            returned.append(child.readline(30))
        except EOFError:
            break
    with Journal(path) as journal:
        found = ids(journal.open())
    missing = set(returned) - set(found)
    assert not missing, f"{len(missing)} of {len(returned)} submitted tasks not in the journal"
    assert found[:len(returned)] == returned  # in submission order
