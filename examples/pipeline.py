"""A journaled task pipeline: a producer hands "resize" tasks to workers; each task is
acknowledged when its handler returns, and redelivered if a worker dies. The producer's journal
keeps what is not done yet, so a producer that crashes loses nothing: the next one resends it.

    python3 examples/pipeline.py       # a producer crashes, workers start, a new one finishes

By hand, from this folder:

    zmqfabric run pipeline:worker --name resizer-1
    zmqfabric submit resize '{"path": "a.png"}' --wait --journal /tmp/resize.journal
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import zmqfabric as zf

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(name: str = "resizer") -> zf.Node:
    """A node working on "resize" tasks (`zmqfabric run pipeline:worker --name NAME`)."""
    node = zf.Node(name)

    @node.task("resize")
    def resize(job: dict) -> dict:
        task = zf.current_task()  # the id and attempt, e.g. to make the work idempotent
        return {"path": job["path"], "size": job["size"] // 2, "by": node.name,
                "attempt": task.attempt if task else 1}

    return node


def produce(journal: str, first: int, count: int) -> tuple[zf.Node, list[zf.TaskHandle]]:
    """A producer node with a journal; submits tasks ``first`` .. ``first + count - 1``."""
    node = zf.Node(f"producer-{os.getpid()}", tasks=zf.TaskConfig(journal=journal))
    node.start()
    handles = [node.submit("resize", {"path": f"{i}.png", "size": 1024})
               for i in range(first, first + count)]
    return node, handles


def crash_after_submitting(journal: str, count: int) -> None:
    """Submit ``count`` tasks (nobody works on them yet), say so once they are on disk, and
    wait to be killed."""
    _, handles = produce(journal, 0, count)
    handles[-1].wait_recorded(timeout=30.0)  # recorded in order: every one is on disk now
    print("submitted", flush=True)
    signal.pause()


def main(before: int = 10, after: int = 5) -> None:
    journal = os.path.join(tempfile.mkdtemp(prefix="zf-pipeline-"), "resize.journal")
    crashing = subprocess.Popen([sys.executable, __file__, "crash", journal, str(before)],
                                stdout=subprocess.PIPE, text=True)
    assert crashing.stdout is not None
    if crashing.stdout.readline().strip() != "submitted":
        raise SystemExit("the first producer did not start")
    crashing.kill()  # SIGKILL: no goodbye, no cleanup; its tasks are only in the journal
    crashing.wait(timeout=30)
    print(f"producer 1 submitted {before} tasks and was killed before any worker ran")
    workers = [subprocess.Popen([sys.executable, "-m", "zmqfabric", "run", "pipeline:worker",
                                 "--name", f"resizer-{i}"], cwd=HERE, stdout=subprocess.DEVNULL)
               for i in (1, 2)]
    try:
        node, _ = produce(journal, before, after)  # resends the journal's tasks, then new ones
        try:
            if not node.wait_tasks(timeout=60.0):
                raise SystemExit("the tasks were not done within 60 s")
            stats = node.task_stats()["submit"]["resize"]
            print(f"producer 2 resent the {before} from the journal and submitted {after} more: "
                  f"{stats['done']} done, {stats['dead']} dead-lettered")
        finally:
            node.close()
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        for proc in workers:
            proc.wait(timeout=30)


if __name__ == "__main__":
    if sys.argv[1:2] == ["crash"]:
        crash_after_submitting(sys.argv[2], int(sys.argv[3]))
    else:
        main()
