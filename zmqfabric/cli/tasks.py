"""``zmqfabric submit``: reliable tasks from the command line.

The CLI process is the producer: it holds the unsettled tasks (or its ``--journal`` does), so it
stays until every task it submitted is settled (done, or dead-lettered after its last attempt),
at most ``--timeout`` seconds after the last submission. ``--wait`` prints each result as it
arrives; without it, each task's id is printed when it is submitted.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import Any

import click

from ..core.records import EndpointKind
from ..errors import FabricError, FabricTimeoutError, TaskFailedError
from ..tasks import TaskConfig, TaskHandle
from .config import (
    WAIT_SLICE_S,
    Body,
    CliConfig,
    EndpointName,
    JsonBody,
    Seconds,
    common,
    pass_config,
)
from .messaging import bodies, explain_refused
from .output import BadInput, dumps, emit, plural


@click.command("submit")
@click.argument("task", metavar="TASKS", type=EndpointName("task"))
@click.argument("body", metavar="[JSON]", required=False, type=JsonBody())
@click.option("--wait", is_flag=True, help="Print each task's result (or failure) as it comes.")
@click.option("--key", help="Idempotency key handed to the handler (one task only).")
@click.option("--deadline", type=Seconds(),
              help="Seconds a worker may spend on one attempt before the task is redelivered.")
@click.option("--max-attempts", type=click.IntRange(min=1),
              help="Deliveries before the task is dead-lettered.")
@click.option("--journal", type=click.Path(dir_okay=False), metavar="PATH",
              help="Record tasks on disk before sending them; unsettled ones are resent by the "
                   "next `submit` (or node) with this journal.")
@click.option("--dead-letters", type=click.Path(dir_okay=False), metavar="PATH",
              help="Append dead letters to this JSON-lines file (default with --journal: "
                   "PATH.dead.jsonl).")
@common
@pass_config
def submit_cmd(cfg: CliConfig, task: str, body: Body | None, wait: bool, key: str | None,
               deadline: float | None, max_attempts: int | None, journal: str | None,
               dead_letters: str | None) -> None:
    """Submit the JSON body as reliable task TASKS (one task per stdin line without JSON).

    Each task goes to a worker with credit (any node with @node.task(TASKS)), is redelivered
    if its worker dies or overruns --deadline, retried with backoff if the handler raises, and
    dead-lettered after --max-attempts. This command is the producer: it stays until every
    task is settled, at most --timeout seconds after the last submission. Unsettled tasks are
    lost when it exits, unless --journal keeps them for the next run.

    Exit 3 if no worker appears within --timeout, 4 if tasks are not settled in time, 5 if a
    task was dead-lettered."""
    if key is not None and body is None:
        raise BadInput("--key names one task: give its JSON body as the argument, not on stdin")
    config = TaskConfig(journal=journal, dead_letter_file=dead_letters)
    if cfg.verbose == 0:
        # This command reports each dead letter itself (one line); the library also logs them.
        logging.getLogger("zmqfabric.tasks.deadletters").setLevel(logging.ERROR)
    with cfg.observer(tasks=config) as node:
        with explain_refused(node):
            node.wait_for_endpoint(EndpointKind.TASK, task, cfg.timeout)
        done: queue.Queue[TaskHandle] = queue.Queue()
        handles: list[TaskHandle] = []
        printed = 0
        for value in bodies(body):
            handle = node.submit(task, value, key=key, deadline=deadline,
                                 max_attempts=max_attempts, timeout=cfg.timeout)
            handles.append(handle)
            if wait:
                handle.add_done_callback(done.put)  # the dispatcher's thread: only hand over
            else:
                _submitted(cfg, handle)
            printed += _print_done(cfg, done)
        if not handles:
            raise BadInput("no task to submit: give a JSON body or JSON lines on stdin")
        settled = time.monotonic() + cfg.timeout
        if wait:
            _print_results(cfg, done, len(handles) - printed, settled)
        node.wait_tasks(max(0.0, settled - time.monotonic()))
        _finish(cfg, task, handles, journal)


def _submitted(cfg: CliConfig, handle: TaskHandle) -> None:
    if cfg.json:
        emit({"task": handle.name, "id": handle.id, "key": handle.key, "submitted": True})
    else:
        click.echo(f"submitted task {handle.id} of {handle.name!r}")


def _print_done(cfg: CliConfig, done: queue.Queue[TaskHandle]) -> int:
    """Print the results that have arrived; return how many."""
    count = 0
    while True:
        try:
            handle = done.get_nowait()
        except queue.Empty:
            return count
        _result(cfg, handle)
        count += 1


def _print_results(cfg: CliConfig, done: queue.Queue[TaskHandle], expected: int,
                   until: float) -> None:
    """Print ``expected`` more results as they arrive, until the monotonic time ``until``."""
    while expected > 0 and (left := until - time.monotonic()) > 0:
        try:
            handle = done.get(timeout=min(left, WAIT_SLICE_S))
        except queue.Empty:
            continue
        _result(cfg, handle)
        expected -= 1


def _error(handle: TaskHandle) -> FabricError | None:
    """The error of a settled task, or None if it succeeded. (``TaskHandle.exception`` raises
    TaskFailedError instead of returning it.)"""
    try:
        handle.result(0)
    except FabricError as exc:
        return exc
    return None


def _result(cfg: CliConfig, handle: TaskHandle) -> None:
    error = _error(handle)
    head: dict[str, Any] = {"task": handle.name, "id": handle.id, "key": handle.key}
    if error is None:
        value = handle.result(0)
        if cfg.json:
            emit({**head, "ok": True, "result": value})
        else:
            click.echo(f"{handle.id}  {dumps(value)}")
        return
    if cfg.json:
        emit({**head, "ok": False, "error": _error_json(error)})
    else:
        click.echo(f"{handle.id}  failed: {_error_text(error)}")


def _error_json(error: BaseException) -> dict[str, Any]:
    if isinstance(error, TaskFailedError):
        return {"type": error.error_type, "message": error.error, "attempts": error.attempts}
    return {"type": type(error).__name__, "message": str(error)}


def _error_text(error: BaseException) -> str:
    if isinstance(error, TaskFailedError):
        return f"{error.error_type}: {error.error} (after {plural(error.attempts, 'attempt')})"
    return str(error)


def _finish(cfg: CliConfig, task: str, handles: list[TaskHandle], journal: str | None) -> None:
    """Raise the error of the run: tasks not settled in time, or tasks that failed."""
    pending = [h for h in handles if not h.done()]
    if pending:
        kept = (f"they stay in the journal {journal} and are resent by the next `submit "
                f"--journal {journal}`" if journal else
                "they are abandoned (--journal PATH keeps unsettled tasks for the next run)")
        raise FabricTimeoutError(
            f"{len(pending)} of {plural(len(handles), 'task')} of {task!r} not settled within "
            f"{cfg.timeout:g} s; {kept}", timeout=cfg.timeout)
    failed = [(h, e) for h in handles if (e := _error(h)) is not None]
    if not failed:
        return
    first, error = failed[0]
    if len(handles) == 1 or not isinstance(error, TaskFailedError):
        raise error
    raise TaskFailedError(task, first.id, error.attempts, error.error_type,
                          f"{error.error} ({len(failed)} of {plural(len(handles), 'task')} "
                          f"failed{'; the first is shown' if len(failed) > 1 else ''})")
