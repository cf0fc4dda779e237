"""Journals of the previous release (sqlite) met by this one (:mod:`zmqfabric.tasks.journal`,
:mod:`zmqfabric.tasks.journal_legacy`): converted once, kept aside, refused while an old producer
holds them or when sqlite's side files are links; a conversion cut short is done again."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
from pathlib import Path

import pytest

from tests.procs import Child, ProcessGroup
from tests.test_journal_log import quarantine, row
from zmqfabric.errors import JournalError
from zmqfabric.tasks.journal import Journal, JournalEntry
from zmqfabric.tasks.journal_log import FILE_HEADER

# --- the previous release's journal (sqlite) ----------------------------------------------------

#: A producer of the previous release, as its journal.py opened and wrote the file: holds it
#: (sqlite's exclusive lock) until killed; its last commits are only in the WAL then.
OLD_PRODUCER = """
import signal, sqlite3
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
db = sqlite3.connect(PATH, isolation_level=None)
for pragma in ("locking_mode=EXCLUSIVE", "page_size=1024", "journal_mode=WAL",
               "synchronous=NORMAL"):
    db.execute("PRAGMA " + pragma)
db.execute("BEGIN EXCLUSIVE")
db.execute("CREATE TABLE tasks (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, name TEXT NOT NULL, "
           "payload BLOB NOT NULL, key TEXT, deadline REAL NOT NULL, attempts INTEGER NOT NULL) "
           "WITHOUT ROWID")
db.execute("CREATE TABLE quarantine (id, seq, name, payload, key, deadline, attempts, "
           "reason TEXT, at REAL)")
db.execute("PRAGMA user_version=1")
db.execute("COMMIT")
for i in range(50):
    db.execute("INSERT INTO tasks VALUES (?, ?, 'resize', ?, ?, 2.5, 4)",
               (f"old-{i}", 100 - i, bytes([0x91, i]), f"k{i}" if i % 2 else None))
db.execute("INSERT INTO tasks VALUES ('bad', 1000, 'resize', x'c1', NULL, 2.5, 4)")
db.execute("DELETE FROM tasks WHERE id = 'old-7'")
print("READY", flush=True)
signal.sigtimedwait({signal.SIGTERM}, 60)  # held until the test kills it (at most 60 s)
"""


def old_journal(path: Path, procs: ProcessGroup) -> Child:
    return procs.python(OLD_PRODUCER.replace("PATH", repr(str(path))), timeout=120)


def test_a_sqlite_journal_in_use_by_an_old_producer_is_refused_and_left_alone(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    path = tmp_path / "j.db"
    old = old_journal(path, procs)
    before = path.read_bytes()
    with pytest.raises(JournalError, match="in use"):
        Journal(path).open()
    assert path.read_bytes() == before and not Path(str(path) + ".sqlite").exists()
    old.kill()


def test_a_sqlite_journal_is_converted_and_kept_aside(
    tmp_path: Path, procs: ProcessGroup, caplog
) -> None:
    path = tmp_path / "j.db"
    old = old_journal(path, procs)
    old.kill()  # its commits are in the WAL, not yet in the main file
    assert old.wait(30) == -signal.SIGKILL
    assert Path(str(path) + "-wal").stat().st_size > 0
    expected = [JournalEntry(f"old-{i}", "resize", bytes([0x91, i]), f"k{i}" if i % 2 else None,
                             2.5, 4) for i in reversed(range(50)) if i != 7]  # by seq
    caplog.set_level(logging.WARNING, "zmqfabric.tasks.journal")
    with Journal(path) as journal:
        assert journal.open() == expected
        assert journal.quarantined == 1  # the row 'bad': not carried over, reported
        journal.add_now([row(1)])
    assert "converted" in caplog.text and "j.db.sqlite" in caplog.text
    assert path.read_bytes().startswith(FILE_HEADER)
    aside = Path(str(path) + ".sqlite")
    with sqlite3.connect(f"file:{aside}?mode=ro", uri=True) as db:  # whole, WAL included
        assert db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 50
    assert not Path(str(path) + "-wal").exists()
    assert "payload" in quarantine(path)[0]["reason"]
    with Journal(path) as journal:  # converted once: now an ordinary journal
        assert journal.open() == [*expected, JournalEntry(*row(1))]
        assert journal.quarantined == 0


def test_a_sqlite_journal_whose_wal_is_a_link_is_refused(tmp_path: Path,
                                                         procs: ProcessGroup) -> None:
    path = tmp_path / "j.db"
    old = old_journal(path, procs)
    old.kill()
    old.wait(30)
    wal = Path(str(path) + "-wal")
    wal.rename(tmp_path / "elsewhere")
    wal.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(JournalError, match="cannot open"):
        Journal(path).open()
    assert path.read_bytes().startswith(b"SQLite format 3")


def test_a_conversion_cut_short_is_done_again(tmp_path: Path, procs: ProcessGroup) -> None:
    """Killed after keeping the old file aside but before the new one replaced it: the next open
    converts again and finds the old file already kept."""
    path = tmp_path / "j.db"
    old = old_journal(path, procs)
    old.kill()
    old.wait(30)
    os.link(path, str(path) + ".sqlite")
    Path(str(path) + ".compact").write_bytes(FILE_HEADER)  # its half-written new file
    with Journal(path) as journal:
        assert len(journal.open()) == 49
    assert not Path(str(path) + ".sqlite.1").exists()
    with Journal(path) as journal:
        assert len(journal.open()) == 49
