"""The raw sockets that fire at the node under fire (``fuzz_victim.py``), for
``perf/fuzz_network.py``. Each ``fuzz_*`` function sends one endpoint its messages
from a :class:`~fuzz_frames.Generator`, classifies each with the reference decoders
(``fuzz_expect``) and returns what the node counted and answered. Every wait is bounded.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import fuzz_expect
import zmq
import zmq.utils.monitor
from fuzz_expect import Expect
from fuzz_frames import Spec, render
from fuzz_mutations import Generator
from fuzz_victim import Victim

import zmqfabric as zf
from zmqfabric.errors import RemoteProtocolError

WAIT = 30.0
#: Messages between two checks that a subscriber has read everything sent so far (a PUB drops
#: what a subscriber's queue cannot hold instead of blocking).
PUB_BATCH = 1000
#: Seconds without a change in the victim's counters after which it has read everything.
STILL_S = 3.0

@dataclass
class Outcome:
    """What one endpoint's storm sent, what the spec expects, and what the node did."""

    expect: Expect = field(default_factory=Expect)
    counted_refused: int = 0
    handled: int | None = None
    replies: int | None = None
    grants: int | None = None
    bad_answers: int = 0
    reply_ids: Counter[int] | None = None
    notes: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    def add(self, other: Outcome) -> None:
        self.expect.add(other.expect)
        self.counted_refused += other.counted_refused
        for key in ("handled", "replies", "grants"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if theirs is not None:
                setattr(self, key, (mine or 0) + theirs)
        self.bad_answers += other.bad_answers
        if other.reply_ids is not None:
            self.reply_ids = (self.reply_ids or Counter()) + other.reply_ids
        self.notes += other.notes
        for key, n in other.counters.items():
            self.counters[key] = self.counters.get(key, 0) + n

    def mismatches(self) -> list[str]:
        e, notes = self.expect, []
        if self.counted_refused != e.refused:
            notes.append(f"refused counted {self.counted_refused} != expected {e.refused}")
        if self.replies is not None and self.replies != e.replies:
            notes.append(f"replies {self.replies} != expected {e.replies}")
        if self.handled is not None and self.handled != e.valid:
            notes.append(f"handled {self.handled} != expected {e.valid}")
        if self.grants is not None and self.grants != e.grants:
            notes.append(f"grants {self.grants} != expected {e.grants}")
        if self.bad_answers:
            notes.append(f"{self.bad_answers} answers did not parse")
        if self.reply_ids is not None and self.reply_ids != e.reply_ids:
            missing = list((e.reply_ids - self.reply_ids).items())[:3]
            extra = list((self.reply_ids - e.reply_ids).items())[:3]
            notes.append(f"reply ids differ: missing {missing}, unexpected {extra}")
        return notes + self.notes


class Fire:
    """The raw sockets' side: the observer node reads the victim's counters."""

    def __init__(self, ctx: zmq.Context, observer: zf.Node, victim: Victim) -> None:
        self.ctx, self.observer, self.victim = ctx, observer, victim
        #: The routing id of the victim's producer at the raw worker, once it has connected.
        self.producer: bytes | None = None

    def counters(self) -> dict[str, int]:
        """The victim's counters, and ``fuzz_task_late``: results its producer dropped as late
        (from the ``tasks`` section of its stats)."""
        stats = self.observer.stats(self.victim.name, timeout=WAIT)
        submit = stats.get("tasks", {}).get("submit", {})
        late = submit.get(self.victim.produce, {}).get("late", 0)
        return {**stats["counters"], "fuzz_task_late": late}

    def wait_counters(self, done: Callable[[dict[str, int]], bool], what: str,
                      timeout: float = WAIT) -> dict[str, int]:
        """The victim's counters once ``done`` holds, or once its refusal and fuzz counters
        have not moved for STILL_S (the node has read everything: the difference is then a
        mismatch to report, not a wait to extend). Raises RuntimeError after ``timeout``."""
        deadline = time.monotonic() + timeout
        last, changed = self.counters(), time.monotonic()
        while True:
            now = self.counters()
            if done(now):
                return now
            t = time.monotonic()
            if _moving(last, now):
                last, changed = now, t
            elif t - changed > STILL_S:
                return now
            if t > deadline:
                raise RuntimeError(f"timed out waiting for {what}; counters: {now}")
            time.sleep(0.005)  # a poll interval, not a settle: the loop ends on the condition

    def socket(self, kind: int, port: int | None = None) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, int(WAIT * 1000))
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        if port is not None:
            sock.connect(f"tcp://127.0.0.1:{port}")
        return sock

    def _outcome(self, expect: Expect, before: dict[str, int], after: dict[str, int],
                 refused_key: str) -> Outcome:
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        return Outcome(expect, delta.get(refused_key, 0),
                       counters={k: v for k, v in delta.items() if v})

    def requests(self, port: int, gen: Generator, count: int, service: str,
                 control: bool) -> Outcome:
        """A DEALER sends ``count`` messages to a ROUTER endpoint and collects every reply."""
        dealer = self.socket(zmq.DEALER, port)
        expect, ids, bad = Expect(), Counter[int](), 0

        def read() -> None:
            nonlocal bad
            try:
                ids[fuzz_expect.reply_id(dealer.recv_multipart())] += 1
            except RemoteProtocolError:
                bad += 1

        try:
            before = self.counters()
            for _ in range(count):
                name, frames = gen.next()
                expect.note(name)
                fuzz_expect.request(expect, frames, service, control)
                dealer.send_multipart(frames)
                while dealer.poll(0):
                    read()
            deadline = time.monotonic() + WAIT
            while ids.total() + bad < expect.replies and dealer.poll(
                    max(1, int((deadline - time.monotonic()) * 1000))):
                read()
            after = self.wait_counters(lambda c: grew(before, c, "refused_request")
                                       >= expect.refused, "the refusals to be counted")
            while dealer.poll(200):  # anything beyond the expected replies is a defect
                read()
        finally:
            dealer.close(0)
        out = self._outcome(expect, before, after, "refused_request")
        out.replies, out.reply_ids, out.bad_answers = ids.total() + bad, ids, bad
        return out

    def pipeline(self, port: int, gen: Generator, count: int, good_key: str, hot: bool) -> Outcome:
        push = self.socket(zmq.PUSH, port)
        expect = Expect()
        classify = fuzz_expect.message_hot if hot else fuzz_expect.message_whole
        try:
            before = self.counters()
            for _ in range(count):
                name, frames = gen.next()
                expect.note(name)
                classify(expect, frames)
                push.send_multipart(frames)
            after = self.wait_counters(
                lambda c: grew(before, c, "refused_message") >= expect.refused
                and grew(before, c, good_key) >= expect.valid,
                "the puller to read every message", timeout=WAIT * 4)
            after = self.settled(after)
        finally:
            push.close(0)
        out = self._outcome(expect, before, after, "refused_message")
        out.handled = grew(before, after, good_key)
        return out

    def settled(self, after: dict[str, int], quiet_s: float = 0.3) -> dict[str, int]:
        """The counters once they have not moved for ``quiet_s`` (more than expected arriving
        late would be a defect to see, not to miss)."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            time.sleep(quiet_s)  # bounded: the loop ends when two reads agree
            now = self.counters()
            if _moving(after, now):
                after = now
                continue
            return now
        return after

    def stream(self, pub: zmq.Socket, gen: Generator, count: int, good_key: str,
               classify: Callable[[Expect, list[bytes]], None]) -> Outcome:
        """The raw PUB sends ``count`` events in batches of PUB_BATCH, each read before the
        next. A batch that comes up short is noted with the PUB's connection events of that
        time (a subscriber that reconnects misses what was published meanwhile: pub/sub is at
        most once), and later batches are waited for net of that shortfall."""
        expect, notes = Expect(), []
        monitor = pub.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        short_r = short_v = 0
        try:
            before = self.counters()
            after = before
            for start in range(0, count, PUB_BATCH):
                for _ in range(min(PUB_BATCH, count - start)):
                    name, frames = gen.next()
                    expect.note(name)
                    classify(expect, frames)
                    pub.send_multipart(frames)
                want_r, want_v = expect.refused - short_r, expect.valid - short_v

                def read_all(c: dict[str, int], r: int = want_r, v: int = want_v) -> bool:
                    return (grew(before, c, "refused_event") >= r
                            and grew(before, c, good_key) >= v)

                after = self.wait_counters(read_all, f"the subscriber to read {expect.sent}")
                events = _drain_events(monitor)
                if not read_all(after):
                    dr = want_r - grew(before, after, "refused_event")
                    dv = want_v - grew(before, after, good_key)
                    short_r, short_v = short_r + dr, short_v + dv
                    notes.append(f"events {start}-{expect.sent}: {dr} refusals and {dv} "
                                 f"deliveries short; PUB connection events {events or 'none'}")
                elif events:
                    notes.append(f"events {start}-{expect.sent}: PUB connection events {events}")
            after = self.settled(after)
        finally:
            pub.disable_monitor()
            monitor.close(0)
        out = self._outcome(expect, before, after, "refused_event")
        out.handled = grew(before, after, good_key)
        out.notes += notes
        return out

    def tasks(self, port: int, gen: Generator, count: int) -> Outcome:
        """A DEALER as a producer: grants and results must come back for exactly the valid
        credit requests and task items."""
        dealer = self.socket(zmq.DEALER, port)
        expect, grants, results, bad = Expect(), 0, 0, 0

        def read() -> None:
            nonlocal grants, results, bad
            try:
                g, r = fuzz_expect.worker_answer(dealer.recv_multipart())
            except RemoteProtocolError:
                bad += 1
                return
            grants, results = grants + g, results + r

        try:
            before = self.counters()
            for _ in range(count):
                name, frames = gen.next()
                expect.note(name)
                fuzz_expect.task(expect, frames)
                dealer.send_multipart(frames)
                while dealer.poll(0):
                    read()
            deadline = time.monotonic() + WAIT * 2
            while (grants < expect.grants or results < expect.valid) and dealer.poll(
                    max(1, int((deadline - time.monotonic()) * 1000))):
                read()
            after = self.wait_counters(lambda c: grew(before, c, "refused_task")
                                       >= expect.refused, "the task refusals to be counted")
            while dealer.poll(300):
                read()
            after = self.settled(after)
        finally:
            dealer.close(0)
        out = self._outcome(expect, before, after, "refused_task")
        out.replies, out.grants, out.bad_answers = None, grants, bad
        out.handled = results
        ran = grew(before, after, "fuzz_good_tasks")
        if ran != results:
            out.notes.append(f"handlers ran {ran} times for {results} results")
        return out

    def results(self, router: zmq.Socket, gen: Generator, count: int) -> Outcome:
        """A raw ROUTER as the worker the victim's producer gave a task to: results and grants
        in, refusals (``refused_task_results``) and late results counted exactly."""
        expect = Expect()
        if self.producer is None:  # its first credit request: the routing id
            if not router.poll(int(WAIT * 1000)):
                raise RuntimeError("the victim's producer never connected to the raw worker")
            self.producer = router.recv_multipart()[0]
        producer = self.producer
        before = self.counters()
        for _ in range(count):
            name, frames = gen.next()
            expect.note(name)
            fuzz_expect.result(expect, frames)
            router.send_multipart([producer, *frames])
            while router.poll(0):  # credit requests and the task: not answered
                router.recv_multipart()

        def counted(c: dict[str, int]) -> bool:
            return (grew(before, c, "refused_task_results") >= expect.refused
                    and grew(before, c, "fuzz_task_late") >= expect.valid)

        after = self.settled(self.wait_counters(counted, "the producer to read every result"))
        while router.poll(0):
            router.recv_multipart()
        out = self._outcome(expect, before, after, "refused_task_results")
        out.handled = grew(before, after, "fuzz_task_late")
        return out

    def one_frame_credit(self, port: int) -> bool:
        """PROTOCOL.md 7.4: task messages use the two-frame form; a one-frame credit request
        ``["", [2, 8, id, ts, {...}]]`` is refused: does it get a grant (it must not)?"""
        dealer = self.socket(zmq.DEALER, port)
        try:
            dealer.send_multipart(render(Spec(8, {"from": "fz-spec"}, 0, envelope=[b""])))
            if not dealer.poll(int(WAIT * 1000 / 10)):
                return False
            return fuzz_expect.worker_answer(dealer.recv_multipart())[0] == 1
        finally:
            dealer.close(0)


def grew(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


def _drain_events(monitor: zmq.Socket) -> list[str]:
    """The names of the socket events waiting on ``monitor``."""
    out = []
    while monitor.poll(0):
        event = zmq.utils.monitor.recv_monitor_message(monitor)
        out.append(str(zmq.Event(event["event"]).name))
    return out


def _moving(a: dict[str, int], b: dict[str, int]) -> bool:
    keys = {k for k in (*a, *b) if k.startswith(("refused_", "fuzz_"))}
    return any(a.get(k, 0) != b.get(k, 0) for k in keys)
