"""The producer's task journal (:mod:`zmqfabric.tasks.journal`): an append-only log, one process
at a time, committed tasks survive the process being killed with SIGKILL, the file is private
and never opened through a link; and the group commit over it (:mod:`zmqfabric.tasks.recorder`).
Damage, quarantine, compaction: test_journal_log.py; sqlite journals: test_journal_legacy.py."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import threading
import time
from pathlib import Path

import msgpack
import pytest

from tests.helpers import wait_until
from tests.procs import ProcessGroup
from zmqfabric.errors import FabricError, JournalError
from zmqfabric.tasks.journal import Journal, JournalEntry
from zmqfabric.tasks.journal_log import FILE_HEADER, frame
from zmqfabric.tasks.recorder import Recorder


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
    assert path.read_bytes().startswith(FILE_HEADER)  # the log format, not sqlite


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
        import signal
        from zmqfabric.tasks.journal import Journal
        journal = Journal({str(path)!r})
        journal.open()
        print("READY", flush=True)
        signal.sigtimedwait([signal.SIGTERM], 30)  # held until the test kills it
    """)
    with pytest.raises(JournalError) as info:
        Journal(path).open()
    assert "in use" in str(info.value) and info.value.path == str(path)
    assert isinstance(info.value, FabricError) and isinstance(info.value, OSError)
    holder.kill()
    holder.wait()
    with Journal(path) as journal:  # the lock dies with its process
        assert journal.open() == []


def test_a_process_forked_from_the_producer_does_not_keep_the_lock(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    """The lock belongs to the open file, which a fork shares: the forked child closes its copy,
    so the journal is free once the producer closed it (or died), whatever the child does."""
    path = tmp_path / "j.db"
    producer = procs.python(f"""
        import os, signal
        from zmqfabric.tasks.journal import Journal
        journal = Journal({str(path)!r})
        journal.open()
        started, running = os.pipe()
        pid = os.fork()
        if pid == 0:  # the fork hooks have run by now
            os.write(running, b"x")
            signal.sigtimedwait([signal.SIGTERM], 60)  # held until the test kills it
            os._exit(0)
        os.read(started, 1)
        journal.close()
        print("READY", pid, flush=True)
        signal.sigtimedwait([signal.SIGTERM], 60)  # held until the test kills it
    """, ready=False)
    forked = int(producer.expect("READY", 120))
    try:
        with Journal(path) as journal:
            assert journal.open() == []
    finally:
        os.kill(forked, signal.SIGKILL)
        producer.kill()


def test_committed_tasks_survive_sigkill(tmp_path: Path, procs: ProcessGroup) -> None:
    path = tmp_path / "j.db"
    child = procs.python(f"""
        import signal
        from zmqfabric.tasks.journal import Journal
        journal = Journal({str(path)!r})
        journal.open()
        journal.add([(f"t-{{i}}", "resize", b"\\xc0", None, 1.0, 3) for i in range(1000)])
        journal.commit()
        journal.remove([f"t-{{i}}" for i in range(500)])
        journal.commit()
        journal.add([("never", "resize", b"\\xc0", None, 1.0, 3)])  # not committed
        print("READY", flush=True)
        signal.sigtimedwait([signal.SIGTERM], 30)  # held until the test kills it
    """)
    child.signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL
    with Journal(path) as journal:
        entries = journal.open()
    assert [e.task_id for e in entries] == [f"t-{i}" for i in range(500, 1000)]


def test_files_that_are_not_journals_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a journal" * 100)
    with pytest.raises(JournalError, match="not a journal"):
        Journal(garbage).open()
    assert garbage.read_bytes() == b"this is not a journal" * 100  # left as it was
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version=99")
    with pytest.raises(JournalError, match="version 99"):
        Journal(newer).open()
    assert not (tmp_path / "newer.db.sqlite").exists()
    with pytest.raises(JournalError):
        Journal(tmp_path / "no" / "such" / "dir.db").open()
    with pytest.raises(JournalError, match="not open"):
        Journal(tmp_path / "x.db").add([row(1)])
    with Journal(tmp_path / "twice.db") as journal:
        journal.open()
        with pytest.raises(JournalError, match="already open"):
            journal.open()


def test_a_new_file_killed_before_its_header_was_whole_opens_empty(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    path.write_bytes(FILE_HEADER[:7])
    with Journal(path) as journal:
        assert journal.open() == []
        journal.add_now([row(1)])
    with Journal(path) as journal:
        assert [e.task_id for e in journal.open()] == ["t-1"]


# --- the file: private, never through a link -----------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_the_journal_and_its_side_files_are_0600_whatever_the_umask(tmp_path: Path,
                                                                     umask: int) -> None:
    path = tmp_path / "j.db"
    old = os.umask(umask)
    try:
        with Journal(path) as journal:
            journal.open()
            journal.add([row(1)])
            journal.commit()
        with path.open("ab") as tail:  # a malformed record: set aside in the quarantine file
            tail.write(frame(msgpack.packb([9, "what"])))
        with Journal(path) as journal:
            assert [e.task_id for e in journal.open()] == ["t-1"]  # and compacted: a new file
        for made in (path, Path(str(path) + ".quarantine")):
            assert stat.S_IMODE(made.stat().st_mode) == 0o600, made
    finally:
        os.umask(old)
    path.chmod(0o644)  # widened by someone: narrowed again on open
    with Journal(path) as journal:
        assert [e.task_id for e in journal.open()] == ["t-1"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_journal_path_that_is_a_link_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o644)
    (tmp_path / "j.db").symlink_to(victim)
    with pytest.raises(JournalError, match="cannot open"):
        Journal(tmp_path / "j.db").open()
    # links where the journal writes its side files: the quarantine file is refused (the
    # record stays in the journal), compaction's new file replaces the link, not its target
    with Journal(tmp_path / "k.db") as journal:
        journal.open()
        journal.add_now([row(1)])
    with open(tmp_path / "k.db", "ab") as tail:
        tail.write(frame(msgpack.packb([9, "what"])))
    for suffix in (".quarantine", ".compact"):
        (tmp_path / f"k.db{suffix}").symlink_to(victim)
    with Journal(tmp_path / "k.db") as journal:
        assert [e.task_id for e in journal.open()] == ["t-1"] and journal.quarantined == 1
    with Journal(tmp_path / "k.db") as journal:  # still there, so quarantined again
        assert [e.task_id for e in journal.open()] == ["t-1"] and journal.quarantined == 1
    (tmp_path / "k.db.quarantine").unlink()
    with Journal(tmp_path / "k.db") as journal:  # set aside now, and the file compacted
        assert [e.task_id for e in journal.open()] == ["t-1"] and journal.quarantined == 1
    with Journal(tmp_path / "k.db") as journal:
        assert [e.task_id for e in journal.open()] == ["t-1"] and journal.quarantined == 0
    assert not (tmp_path / "k.db.compact").exists()
    assert victim.read_bytes() == b"precious" and stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_a_fifo_or_a_directory_at_the_journal_path_is_refused_without_blocking(
    tmp_path: Path,
) -> None:
    os.mkfifo(tmp_path / "fifo.db")
    (tmp_path / "dir.db").mkdir()
    start = time.monotonic()
    for name in ("fifo.db", "dir.db"):
        with pytest.raises(JournalError):
            Journal(tmp_path / name).open()
    assert time.monotonic() - start < 2.0


# --- group commit ------------------------------------------------------------------------------


def test_concurrent_submitters_share_commits_and_every_row_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    journal = Journal(path)
    journal.open()
    recorder = Recorder(journal)
    threads, each = 8, 200
    barrier = threading.Barrier(threads)

    done: list[int] = []

    def submit(t: int) -> None:
        barrier.wait()
        for i in range(each):
            recorder.record([(f"t-{t}-{i}", "resize", b"\x90", None, 1.0, 3)])
        done.append(t)

    runners = [threading.Thread(target=submit, args=(t,)) for t in range(threads)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join(60)
    assert sorted(done) == list(range(threads))
    assert recorder.commits < threads * each  # some commits carried several submitters' rows
    recorder.forget([f"t-0-{i}" for i in range(each)])
    recorder.close()
    with Journal(path) as again:
        assert len(again.open()) == (threads - 1) * each


def test_a_row_the_journal_refuses_fails_its_submitter_only(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.db")
    journal.open()
    recorder = Recorder(journal)
    errors: dict[str, BaseException | None] = {}

    def submit(task_id: str, name: object) -> None:
        try:
            recorder.record([(task_id, name, b"\x90", None, 1.0, 3)])  # type: ignore[list-item]
            errors[task_id] = None
        except JournalError as exc:
            errors[task_id] = exc

    with recorder._commit_lock:  # noqa: SLF001 - both rows wait for the same commit
        runners = [threading.Thread(target=submit, args=("good", "resize")),
                   threading.Thread(target=submit, args=("bad", object()))]  # not packable
        for runner in runners:
            runner.start()
        wait_until(lambda: recorder._queued == 2, 10, "both rows queued")  # noqa: SLF001
    for runner in runners:
        runner.join(10)
    assert errors["good"] is None and isinstance(errors["bad"], JournalError)
    assert journal.count() == 1
    recorder.close()
    with pytest.raises(JournalError, match="not open"):
        recorder.record([("t-2", "resize", b"\x90", None, 1.0, 3)])
