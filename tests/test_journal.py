"""The producer's task journal (:mod:`zmqfabric.tasks.journal`): sqlite in WAL mode, one process
at a time, and committed tasks survive the process being killed with SIGKILL."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest

from tests.procs import ProcessGroup
from zmqfabric.errors import FabricError, JournalError
from zmqfabric.tasks.journal import Journal, JournalEntry


def row(i: int, name: str = "resize") -> tuple[str, str, bytes, str | None, float, int]:
    return (f"t-{i}", name, bytes([0x91, i % 128]), f"k{i}" if i % 2 else None, 1.5, 3)


def test_tasks_round_trip_in_submission_order(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with Journal(path) as journal:
        assert journal.open() == []
        journal.add([row(i) for i in range(5)])
        journal.commit()
        journal.add([row(i, "other") for i in range(5, 8)])
        journal.remove(["t-1", "t-6", "t-unknown"])
        journal.commit()
        assert journal.count() == 6
    with Journal(path) as journal:
        entries = journal.open()
    assert [e.task_id for e in entries] == ["t-0", "t-2", "t-3", "t-4", "t-5", "t-7"]
    assert entries[0] == JournalEntry("t-0", "resize", b"\x91\x00", None, 1.5, 3)
    assert entries[-1] == JournalEntry("t-7", "other", b"\x91\x07", "k7", 1.5, 3)
    # WAL mode, as promised
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_uncommitted_changes_are_not_durable_and_rollback_drops_them(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    journal = Journal(path)
    journal.open()
    journal.add([row(1)])
    journal.commit()
    journal.add([row(2)])
    assert journal.dirty
    journal.rollback()
    assert not journal.dirty and journal.count() == 1
    journal.close()
    journal.close()  # idempotent
    with Journal(path) as again:
        assert [e.task_id for e in again.open()] == ["t-1"]


def test_a_second_process_cannot_open_a_journal_in_use(tmp_path: Path, procs: ProcessGroup) -> None:
    path = tmp_path / "j.db"
    holder = procs.python(f"""
        import time
        from zmqfabric.tasks.journal import Journal
        journal = Journal({str(path)!r})
        journal.open()
        print("READY", flush=True)
        time.sleep(30)
    """)
    with pytest.raises(JournalError) as info:
        Journal(path).open()
    assert "in use" in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, FabricError) and isinstance(info.value, OSError)
    holder.kill()
    holder.wait()
    with Journal(path) as journal:  # the lock dies with its process
        assert journal.open() == []


def test_committed_tasks_survive_sigkill(tmp_path: Path, procs: ProcessGroup) -> None:
    path = tmp_path / "j.db"
    child = procs.python(f"""
        import time
        from zmqfabric.tasks.journal import Journal
        journal = Journal({str(path)!r})
        journal.open()
        journal.add([(f"t-{{i}}", "resize", b"\\xc0", None, 1.0, 3) for i in range(1000)])
        journal.commit()
        journal.remove([f"t-{{i}}" for i in range(500)])
        journal.commit()
        journal.add([("never", "resize", b"\\xc0", None, 1.0, 3)])  # not committed
        print("READY", flush=True)
        time.sleep(30)
    """)
    child.signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    with Journal(path) as journal:
        entries = journal.open()
    assert [e.task_id for e in entries] == [f"t-{i}" for i in range(500, 1000)]


def test_files_that_are_not_journals_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError):
        Journal(garbage).open()
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(JournalError, match="version 99"):
        Journal(newer).open()
    with pytest.raises(JournalError):
        Journal(tmp_path / "no" / "such" / "dir.db").open()
    with pytest.raises(JournalError, match="not open"):
        Journal(tmp_path / "x.db").add([row(1)])
