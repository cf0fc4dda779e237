"""Security end to end, with real processes on loopback: CURVE keys and allow-lists, untrusted
discovery records, and what an eavesdropper on ``lo`` sees.

- Key directories (``zmqfabric.keys``): the secret is private, a readable secret is refused, the
  allow-list takes Z85 keys or certificate files and nothing else, a node trusts its own key.
- Nodes whose keys allow each other talk through request/reply, pub/sub and push/pull across
  processes; a node whose key is not allowed gets AuthorizationError (fast, naming the service
  and the server) while the server counts the refusal and keeps serving allowed clients.
- Forged discovery records (python-zeroconf pinned to 127.0.0.1, like every node): a record with
  an unknown key, pointing at a raw ROUTER this test binds, is never connected to; a record whose
  address lies outside the scope (192.0.2.1, a documentation address that only ever appears
  inside the advertised record) is refused. Secured and plain nodes ignore each other.
- A capture of the loopback traffic with tcpdump: a marker sent through each pattern between
  secured nodes never appears in the packets, while the same run with plain nodes shows it.

The server (and, where a node must be inspected from outside, the node under test) is a child
process running SERVER below; it answers a few inspection ops on its reply service so the test
can read its refused peers, directory, counters and discovery warnings.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import zmq
from zeroconf import ServiceInfo
from zmq.utils.monitor import recv_monitor_message

import zmqfabric as zf
from tests.helpers import (
    SERVICE_TYPE,
    RawSockets,
    forged_service_info,
    loopback_zeroconf,
    port_of,
    unique,
    wait_for_event,
    wait_until,
)
from tests.procs import Child, ProcessGroup
from zmqfabric.constants import LIVENESS_CONNECT_TIMEOUT_S
from zmqfabric.errors import AuthorizationError, LocalProtocolError
from zmqfabric.security import keys

#: Bound for every wait that involves discovery, a handshake or another process.
WAIT = 10.0
#: Poll interval for conditions that have no event to wait on (a child's state, a file).
STEP = 0.05
#: A documentation address (RFC 5737): advertised inside a forged record, never contacted.
OUTSIDE_ADDRESS = "192.0.2.1"
#: The hard upper bound of any tcpdump this file starts (coreutils timeout kills it after that).
CAPTURE_LIMIT_S = 45

# --- the child node ---------------------------------------------------------------------------

#: A node serving SVC (echo, plus inspection ops), publishing STREAM and pulling PIPE; prints
#: "READY" then "INFO {json}", and "PULLED {repr}" for each pipeline message.
SERVER = r"""
import collections, json, logging, os, threading, time
import zmqfabric as zf

node = zf.Node(NAME, keys=KEYS)
warnings = collections.deque(maxlen=500)

class Keep(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())

logging.getLogger("zmqfabric.discovery").addHandler(Keep(logging.WARNING))
stop = threading.Event()
pulling = threading.Event()
publisher = None

@node.reply(SVC)
def handle(body):
    op = body.get("op") if isinstance(body, dict) else None
    if op == "publish":
        publisher.send("t", body["body"])
        return "published"
    if op == "refused":
        return [[record.name, reason] for record, reason in node.refused_peers()]
    if op == "nodes":
        return [record.name for record in node.nodes()]
    if op == "counters":
        return node.counters.snapshot()
    if op == "warnings":
        return list(warnings)
    if op == "request":
        start = time.monotonic()
        try:
            reply = node.request(body["service"], body.get("body"), timeout=body["timeout"])
            return {"reply": reply, "elapsed": time.monotonic() - start}
        except zf.FabricError as exc:
            return {"error": type(exc).__name__, "message": str(exc),
                    "elapsed": time.monotonic() - start}
    return {"echo": body}

def pull():
    with node.puller(PIPE) as puller:
        pulling.set()
        while not stop.is_set():
            message = puller.recv_message(timeout=0.1)
            if message is not None:
                print("PULLED " + repr(message.body), flush=True)

with node:
    publisher = node.publisher(STREAM)
    worker = threading.Thread(target=pull, name="test-child-puller")
    worker.start()
    try:
        assert pulling.wait(10), "puller did not start"
        record = node.record
        print("READY", flush=True)
        print("INFO " + json.dumps({
            "name": node.name, "key": node.config.keys.public if node.config.keys else None,
            "ports": sorted({ep.port for ep in record.endpoints}),
        }), flush=True)
        node.run()
    finally:
        stop.set()
        worker.join(10)
"""


@dataclass
class Server:
    child: Child
    name: str
    key: str | None
    ports: list[int]
    svc: str
    stream: str
    pipe: str


def start_server(procs: ProcessGroup, keys_dir: Path | None, prefix: str = "srv") -> Server:
    name, svc, stream, pipe = unique(prefix), unique("svc"), unique("ticks"), unique("jobs")
    head = (f"NAME = {name!r}\nKEYS = {str(keys_dir) if keys_dir else None!r}\nSVC = {svc!r}\n"
            f"STREAM = {stream!r}\nPIPE = {pipe!r}\n")
    child = procs.python(head + SERVER, timeout=WAIT)
    info = json.loads(child.expect("INFO", WAIT))
    return Server(child, name, info["key"], info["ports"], svc, stream, pipe)


def ask(node: zf.Node, server: Server, op: str, **extra: Any) -> Any:
    """An inspection op answered by the child's reply service."""
    return node.request(server.svc, {"op": op, **extra}, timeout=WAIT)


def exercise(node: zf.Node, server: Server, body: Any) -> None:
    """``body`` goes through all three patterns between ``node`` and the child; each arrives."""
    assert node.request(server.svc, body, timeout=WAIT) == {"echo": body}

    with node.pusher(server.pipe) as pusher:
        assert pusher.wait_ready(WAIT)
        pusher.send(body, timeout=WAIT)
        assert ast.literal_eval(server.child.expect("PULLED", WAIT)) == body

    with node.subscribe(server.stream) as sub:
        assert sub.wait_ready(WAIT)
        deadline = time.monotonic() + WAIT
        while True:  # a subscription travels after the handshake: publish until one arrives
            assert node.request(server.svc, {"op": "publish", "body": body}, timeout=WAIT)
            message = sub.recv_message(timeout=0.2)
            if message is not None:
                break
            assert time.monotonic() < deadline, "no event reached the subscriber"
        assert message.topic == "t" and message.body == body


# --- key directories --------------------------------------------------------------------------


@dataclass
class KeyDir:
    path: Path
    public: str


@pytest.fixture
def keydir(tmp_path: Path) -> Callable[[str], KeyDir]:
    """``keydir(label)``: a fresh key directory with a generated keypair."""

    def make(label: str) -> KeyDir:
        path = tmp_path / label
        return KeyDir(path, keys.generate(path))

    return make


def trust(a: KeyDir, b: KeyDir) -> None:
    """a and b allow each other."""
    keys.allow(a.path, b.public, "peer-" + b.path.name)
    keys.allow(b.path, a.public, "peer-" + a.path.name)


def test_generate_writes_a_private_secret_and_a_shareable_public_key(keydir) -> None:
    kd = keydir("a")
    secret, public = kd.path / "node.key_secret", kd.path / "node.key"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert keys.is_public_key(kd.public) and keys.show(kd.path) == kd.public
    loaded = keys.load(kd.path)
    assert loaded.public == kd.public and loaded.allowed == frozenset()
    assert loaded.secret not in public.read_text()  # the shareable file holds no secret
    assert loaded.secret not in repr(loaded)
    with pytest.raises(LocalProtocolError, match="exists"):
        keys.generate(kd.path)
    assert keys.generate(kd.path, force=True) != kd.public
    assert secret.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=oct)
def test_load_refuses_a_secret_readable_by_others(keydir, name, mode: int) -> None:
    kd = keydir("a")
    secret = kd.path / "node.key_secret"
    secret.chmod(mode)
    with pytest.raises(LocalProtocolError) as err:
        keys.load(kd.path)
    text = str(err.value)
    assert str(secret) in text and "readable by others" in text and "chmod 600" in text
    with pytest.raises(LocalProtocolError, match="readable by others"):
        zf.Node(name("n"), keys=kd.path)  # the node refuses it before opening anything


def test_load_without_keys_says_how_to_make_them(tmp_path: Path, name) -> None:
    with pytest.raises(LocalProtocolError, match="zmqfabric keys generate"):
        keys.load(tmp_path / "nothing-here")
    with pytest.raises(LocalProtocolError, match="zmqfabric keys generate"):
        keys.show(tmp_path / "nothing-here")


@pytest.mark.parametrize("damage", ["malformed secret", "secret of another keypair"])
def test_load_refuses_a_keypair_that_does_not_match(keydir, damage: str) -> None:
    kd, other = keydir("a"), keydir("b")
    secret_file = kd.path / "node.key_secret"
    text = secret_file.read_text()
    if damage == "malformed secret":
        bad_secret = "too-short"
    else:
        bad_secret = keys.load(other.path).secret
    lines = [f'    secret-key = "{bad_secret}"' if line.strip().startswith("secret-key") else line
             for line in text.splitlines()]
    secret_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(LocalProtocolError, match=str(secret_file)):
        keys.load(kd.path)


def test_allow_accepts_a_z85_key_or_a_certificate_file(keydir) -> None:
    kd, b, c = keydir("a"), keydir("b"), keydir("c")
    assert keys.allow(kd.path, b.public, "b") == b.public
    assert keys.allow(kd.path, f"  {c.public}\n", "c-text") == c.public  # pasted with spaces
    # A certificate file: the public one, or even the secret one (only the public key is taken).
    assert keys.allow(kd.path, str(b.path / "node.key"), "b-file") == b.public
    assert keys.allow(kd.path, str(c.path / "node.key_secret"), "c-file") == c.public
    c_secret = keys.load(c.path).secret
    for entry in (kd.path / "allowed").iterdir():
        assert c_secret not in entry.read_text()
    assert keys.load(kd.path).allowed == {b.public, c.public}


def test_allow_rejects_junk_with_a_clear_error(keydir, tmp_path: Path) -> None:
    kd = keydir("a")
    no_key = tmp_path / "no-key.txt"
    no_key.write_text("hello\n")
    for junk in ["not-a-key", "", kd.public[:-1], kd.public + "x", "é" * 40,
                 str(tmp_path / "missing.key"), str(no_key), str(tmp_path)]:
        with pytest.raises(LocalProtocolError, match="neither a Z85 public key nor a certificate"):
            keys.allow(kd.path, junk, "junk")
    for label in ["", "../escape", "a/b", ".hidden", "x" * 65, "sp ace"]:
        with pytest.raises(LocalProtocolError, match="label"):
            keys.allow(kd.path, kd.public, label)
    assert not list((kd.path / "allowed").iterdir())
    assert not (kd.path / "escape.key").exists() and keys.load(kd.path).allowed == frozenset()


@pytest.mark.parametrize("key_line", [b'public-key = "junk"',
                                      b'public-key = "\xff' + b"a" * 39 + b'"'])
def test_allow_rejects_a_certificate_file_holding_a_bad_key(keydir, tmp_path: Path,
                                                            key_line: bytes) -> None:
    kd = keydir("a")
    cert = tmp_path / "bad.key"
    cert.write_bytes(b"metadata\ncurve\n    " + key_line + b"\n")
    with pytest.raises(LocalProtocolError):
        keys.allow(kd.path, str(cert), "bad")
    assert keys.load(kd.path).allowed == frozenset()


def test_a_node_allows_its_own_key(keydir, procs: ProcessGroup, make_node) -> None:
    """Two processes sharing one key directory, with an empty allow-list, trust each other."""
    kd = keydir("shared")
    assert keys.load(kd.path).allows(kd.public)
    server = start_server(procs, kd.path)
    client = make_node("own", keys=kd.path)
    assert server.key == kd.public
    assert client.request(server.svc, "hello", timeout=WAIT) == {"echo": "hello"}


# --- talking, and being refused --------------------------------------------------------------


def test_allowed_keys_talk_through_every_pattern(keydir, procs: ProcessGroup, make_node) -> None:
    a, b = keydir("a"), keydir("b")
    trust(a, b)
    server = start_server(procs, a.path)
    client = make_node("client", keys=b.path)
    exercise(client, server, {"text": "über", "n": [1, 2.5, None], "raw": b"\x00\xff"})
    counters = client.stats(server.name, timeout=WAIT)["counters"]
    assert counters.get("refused_handshakes", 0) == 0  # nothing of ours was refused
    assert any(r.name == server.name and r.curve_key == a.public for r in client.nodes())


@dataclass
class Refusing:
    """A server child that allows ``friend`` but not ``stranger`` (who trusts the server)."""

    server: Server
    friend: Path
    stranger: Path


@pytest.fixture
def refusing(keydir, procs: ProcessGroup) -> Refusing:
    a, b, c = keydir("a"), keydir("b"), keydir("c")
    trust(a, b)
    keys.allow(c.path, a.public, "a")  # c trusts the server; the server does not know c
    return Refusing(start_server(procs, a.path), b.path, c.path)


def assert_refused(exc: BaseException, server: Server) -> None:
    assert isinstance(exc, AuthorizationError) and isinstance(exc, PermissionError), repr(exc)
    assert exc.kind == "service" and exc.name == server.svc and exc.servers == [server.name]
    message = str(exc)
    assert server.svc in message and server.name in message and "allow-list" in message


def wait_refused(node: Any, server: Server) -> str:
    """The reason ``node`` gives for refusing ``server`` (waited for)."""
    return wait_until(lambda: {r.name: why for r, why in node.refused_peers()}.get(server.name),
                      WAIT, f"{node.name} to refuse {server.name}")


def test_a_key_not_allowed_is_refused_and_the_server_carries_on(refusing: Refusing,
                                                                 make_node) -> None:
    """A server that refuses our key cannot confirm its record to us: it is never listed (a
    record whose advertiser cannot complete a CURVE call is only a hint), it is listed as
    refused with the reason, and the server goes on serving the keys it allows."""
    server = refusing.server
    friend = make_node("friend", keys=refusing.friend)
    stranger = make_node("stranger", keys=refusing.stranger)
    assert "refused our key" in wait_refused(stranger, server)
    assert server.name not in {r.name for r in stranger.nodes()}
    with pytest.raises(zf.NoProviderError):
        stranger.request(server.svc, {"x": 1}, timeout=0.3)

    assert friend.request(server.svc, {"x": 2}, timeout=WAIT) == {"echo": {"x": 2}}
    counters = friend.stats(server.name, timeout=WAIT)["counters"]
    assert counters.get("refused_handshakes", 0) > 0
    assert friend.request(server.svc, {"x": 3}, timeout=WAIT) == {"echo": {"x": 3}}


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_server_that_refuses_our_key_is_never_a_provider(refusing: Refusing, name,
                                                          flavour: str) -> None:
    """Sync and asyncio: no request is ever sent to a server that refuses our key."""
    server, outcomes = refusing.server, []
    if flavour == "sync":
        with zf.Node(name("stranger"), keys=refusing.stranger) as stranger:
            wait_refused(stranger, server)
            for _ in range(2):
                with pytest.raises(zf.NoProviderError):
                    stranger.request(server.svc, "x", timeout=0.3)
                outcomes.append(stranger.counters.get("hints_refused"))
    else:
        import zmqfabric.aio

        async def main() -> None:
            async with zmqfabric.aio.Node(name("stranger"), keys=refusing.stranger) as stranger:
                wait_refused(stranger, server)
                for _ in range(2):
                    with pytest.raises(zf.NoProviderError):
                        await stranger.request(server.svc, "x", timeout=0.3)
                    outcomes.append(stranger.counters.get("hints_refused"))

        asyncio.run(main())
    assert len(outcomes) == 2


def test_a_server_that_refuses_our_key_stays_refused(refusing: Refusing, make_node) -> None:
    """Past the liveness window the refusing server is still listed as refused, never as a
    node (nothing of its record was used, so nothing needs undoing)."""
    server = refusing.server
    stranger = make_node("stranger", keys=refusing.stranger)
    wait_refused(stranger, server)
    until = time.monotonic() + LIVENESS_CONNECT_TIMEOUT_S + 1.0
    while time.monotonic() < until:
        assert server.name not in {r.name for r in stranger.nodes()}
        assert server.name in {r.name for r, _ in stranger.refused_peers()}
        time.sleep(STEP)


def test_authorization_error_is_public() -> None:
    assert zf.AuthorizationError is AuthorizationError
    assert "AuthorizationError" in zf.__all__


def test_secured_and_plain_nodes_ignore_each_other(keydir, procs: ProcessGroup,
                                                    make_node) -> None:
    kd = keydir("s")
    plain = start_server(procs, None, prefix="plain")
    secured = make_node("secured", keys=kd.path)
    observer = make_node("observer")  # a plain node in this process, to question the child

    assert plain.key is None
    refused_here = wait_until(
        lambda: {r.name: why for r, why in secured.refused_peers()}.get(plain.name),
        WAIT, f"{secured.name} to refuse {plain.name}",
    )
    assert "not secured" in refused_here
    refused_there = wait_until(
        lambda: dict(map(tuple, ask(observer, plain, "refused"))).get(secured.name),
        WAIT, f"{plain.name} to refuse {secured.name}",
    )
    assert "secured" in refused_there and "no keys" in refused_there

    assert plain.name not in {r.name for r in secured.nodes()}
    assert secured.name not in ask(observer, plain, "nodes")
    assert ask(observer, plain, "counters").get("refused_peers", 0) > 0
    assert secured.counters.get("refused_peers") > 0
    with pytest.raises(zf.NoProviderError):
        secured.request(plain.svc, "hi", timeout=0.3)  # never a provider for a secured node


# --- forged discovery records -----------------------------------------------------------------


@contextlib.contextmanager
def forger() -> Iterator[Callable[..., str]]:
    """``forge(txt, port, address)``: advertise a record with python-zeroconf pinned to
    127.0.0.1; returns the instance name. Everything is unregistered and closed afterwards."""
    zc = loopback_zeroconf()
    infos: list[ServiceInfo] = []

    def forge(name: str, node_id: str, txt: dict[str, str], port: int, address: str) -> str:
        instance = f"{name}@{node_id}.{SERVICE_TYPE}"
        info = forged_service_info(instance, node_id, txt, port, address)
        zc.register_service(info, cooperating_responders=True)
        infos.append(info)
        return instance

    try:
        yield forge
    finally:
        for info in infos:
            zc.unregister_service(info)
        zc.close()


def forged_txt(node_id: str, key: str, port: int, svc: str) -> dict[str, str]:
    """Valid fields in the format of zmqfabric.core.records (see encode_txt)."""
    return {"v": "1", "id": node_id, "host": "forger", "pid": str(os.getpid()), "seq": "1",
            "ck": key, "e0": f"ctl:control:{port};rep:{svc}:{port}"}


def test_a_forged_record_with_an_unknown_key_is_never_connected_to(
    keydir, procs: ProcessGroup, make_node, raw: RawSockets
) -> None:
    kd = keydir("victim")
    victim = start_server(procs, kd.path, prefix="victim")
    observer = make_node("observer", keys=kd.path)  # shares the victim's keys: allowed
    assert observer.request(victim.svc, "warm-up", timeout=WAIT) == {"echo": "warm-up"}

    router = raw(zmq.ROUTER)
    monitor = raw.monitor(router)  # before the bind: it sees LISTENING
    router.bind("tcp://127.0.0.1:0")
    port = port_of(router)
    forged_name, forged_id, forged_svc = unique("forged"), secrets.token_hex(8), unique("bait")
    unknown_key = zmq.curve_keypair()[0].decode()
    with forger() as forge:
        forge(forged_name, forged_id, forged_txt(forged_id, unknown_key, port, forged_svc),
              port, "127.0.0.1")
        reason = wait_until(
            lambda: dict(map(tuple, ask(observer, victim, "refused"))).get(forged_name),
            WAIT, f"{victim.name} to list {forged_name} among its refused peers",
        )
        assert unknown_key in reason and "allow-list" in reason
        assert forged_name not in ask(observer, victim, "nodes")
        answer = ask(observer, victim, "request", service=forged_svc, timeout=0.3)
        assert answer.get("error") == "NoProviderError", answer
        assert ask(observer, victim, "counters").get("refused_peers", 0) > 0

    events = []
    while monitor.poll(0):
        events.append(recv_monitor_message(monitor)["event"])
    contacted = {zmq.EVENT_ACCEPTED, zmq.EVENT_HANDSHAKE_SUCCEEDED,
                 zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
                 zmq.EVENT_HANDSHAKE_FAILED_AUTH}
    assert zmq.EVENT_LISTENING in events  # the monitor works...
    assert not contacted & set(events), f"the raw ROUTER was contacted: {events}"
    # ...and would have seen a connection: a raw DEALER of ours is ACCEPTED at once.
    raw(zmq.DEALER, connect=f"tcp://127.0.0.1:{port}")
    assert wait_for_event(monitor, {zmq.EVENT_ACCEPTED}, WAIT, "the probe's connection") == [
        zmq.EVENT_ACCEPTED
    ]


def test_a_record_outside_the_scope_is_refused(keydir, procs: ProcessGroup, make_node,
                                               tmp_path: Path) -> None:
    """Even with the victim's own (trusted) key, a record for 192.0.2.1 is refused by scope;
    when tcpdump is available, a capture on every interface proves nothing went there."""
    kd = keydir("victim")
    victim = start_server(procs, kd.path, prefix="victim")
    observer = make_node("observer", keys=kd.path)
    assert observer.request(victim.svc, "warm-up", timeout=WAIT) == {"echo": "warm-up"}
    before = ask(observer, victim, "counters").get("refused_records", 0)
    forged_name, forged_id = unique("faraway"), secrets.token_hex(8)
    txt = forged_txt(forged_id, kd.public, 9, unique("bait"))

    watch = (tcpdump(tmp_path / "outside.pcap", ["host", OUTSIDE_ADDRESS], "any")
             if capture_skip_reason() is None else contextlib.nullcontext(None))
    with watch as pcap, forger() as forge:
        instance = forge(forged_name, forged_id, txt, 9, OUTSIDE_ADDRESS)
        warning = wait_until(
            lambda: [w for w in ask(observer, victim, "warnings") if forged_name in w],
            WAIT, f"{victim.name} to refuse the record {instance}",
        )[0]
        assert OUTSIDE_ADDRESS in warning and "scope" in warning
        after = ask(observer, victim, "counters").get("refused_records", 0)
        assert after > before
        assert forged_name not in ask(observer, victim, "nodes")
        assert forged_name not in dict(map(tuple, ask(observer, victim, "refused")))
        assert forged_name not in {r.name for r in observer.nodes()}
    if pcap is not None:
        assert not packets(pcap), f"something was sent to {OUTSIDE_ADDRESS}"


# --- what an eavesdropper on lo sees ------------------------------------------------------------


def capture_skip_reason() -> str | None:
    if shutil.which("tcpdump") is None:
        return "tcpdump is not installed (Debian package: tcpdump)"
    if shutil.which("timeout") is None:
        return "coreutils timeout is missing"
    if os.geteuid() != 0:
        return "capturing packets needs root (CAP_NET_RAW)"
    return None


@contextlib.contextmanager
def tcpdump(path: Path, expression: list[str], interface: str = "lo") -> Iterator[Path]:
    """Capture ``interface`` into ``path`` while the block runs. Bounded twice: coreutils
    ``timeout`` ends tcpdump after CAPTURE_LIMIT_S whatever happens to this process, and the
    block's exit always stops it (SIGINT, then SIGKILL) and reaps it."""
    argv = ["timeout", "-s", "INT", str(CAPTURE_LIMIT_S), "tcpdump", "-i", interface, "-n",
            "-U", "--immediate-mode", "-s", "0", "-w", str(path), *expression]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        seen = b""
        deadline = time.monotonic() + WAIT
        while b"listening on" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                pytest.fail(f"tcpdump did not start: {seen.decode(errors='replace')}")
            ready, _, _ = select.select([proc.stderr], [], [], min(left, 0.2))
            if ready:
                seen += os.read(proc.stderr.fileno(), 4096)
        yield path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # timeout passes it on; tcpdump flushes and exits
        try:
            proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)


@dataclass
class Packet:
    sport: int
    dport: int
    payload: bytes


def packets(path: Path) -> list[Packet]:
    """TCP/IPv4 packets of a pcap file (complete records only: it may still be written)."""
    data = path.read_bytes() if path.exists() else b""
    if len(data) < 24:
        return []
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    (linktype,) = struct.unpack(endian + "I", data[20:24])
    link_header = {1: 14, 113: 16, 276: 20}[linktype]  # Ethernet (lo), Linux cooked v1/v2
    out: list[Packet] = []
    offset = 24
    while offset + 16 <= len(data):
        _, _, caplen, _ = struct.unpack(endian + "IIII", data[offset:offset + 16])
        frame = data[offset + 16:offset + 16 + caplen]
        offset += 16 + caplen
        if len(frame) < caplen:
            break
        ip = frame[link_header:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            continue
        (total,) = struct.unpack(">H", ip[2:4])
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:  # not TCP
            out.append(Packet(0, 0, ip[ihl:total]))
            continue
        tcp = ip[ihl:total]
        sport, dport = struct.unpack(">HH", tcp[:4])
        out.append(Packet(sport, dport, tcp[(tcp[12] >> 4) * 4:]))
    return out


def flows(captured: list[Packet]) -> dict[tuple[int, int], bytes]:
    """Each direction's TCP payload bytes, concatenated in capture order."""
    joined: dict[tuple[int, int], bytes] = {}
    for p in captured:
        joined[(p.sport, p.dport)] = joined.get((p.sport, p.dport), b"") + p.payload
    return joined


def big_ports(captured: list[Packet], server: Server, size: int) -> set[int]:
    """The server's ports that carried a TCP payload of at least ``size`` bytes."""
    return {port for p in captured if len(p.payload) >= size
            for port in (p.sport, p.dport) if port in server.ports}


def captured_run(tmp_path: Path, procs: ProcessGroup, make_node, server_keys: Path | None,
                 client_keys: Path | None, label: str) -> tuple[bytes, list[Packet], str, Server]:
    """Send a marked body through every pattern while tcpdump captures the server's ports."""
    server = start_server(procs, server_keys, prefix=f"cap-{label}")
    client = make_node(f"cap-{label}-client", **({"keys": client_keys} if client_keys else {}))
    client.wait_for_node(server.name, WAIT)
    marker = f"zf-marker-{uuid.uuid4().hex}"
    body = {"marker": marker, "pad": marker * 40}  # ~1.7 KB: larger than any handshake frame
    expression = " or ".join(f"tcp port {port}" for port in server.ports)
    pcap = tmp_path / f"{label}.pcap"
    with tcpdump(pcap, [expression]):
        exercise(client, server, body)
        # Until the ports of the service, stream and pipeline each carried a packet as large as
        # the body: the capture holds the marked messages (encrypted or not) before it stops.
        wait_until(lambda: len(big_ports(packets(pcap), server, len(marker) * 40)) >= 3,
                   WAIT, f"the {label} capture to hold the marked messages",
                   detail=lambda: f"ports {server.ports}, largest payload per flow: " + str(
                       {flow: max(len(p.payload) for p in captured if (p.sport, p.dport) == flow)
                        for captured in [packets(pcap)]
                        for flow in {(p.sport, p.dport) for p in captured}}))
    return pcap.read_bytes(), packets(pcap), marker, server


def test_traffic_between_secured_nodes_is_encrypted(keydir, procs: ProcessGroup, make_node,
                                                    tmp_path: Path) -> None:
    reason = capture_skip_reason()
    if reason is not None:
        pytest.skip(reason)

    # Control run: plain nodes. The capture must show the marker on every endpoint's port.
    raw, captured, marker, server = captured_run(tmp_path, procs, make_node, None, None, "plain")
    needle = marker.encode()
    assert needle in raw
    ports_with_marker = {port for p in captured if needle in p.payload
                         for port in (p.sport, p.dport) if port in server.ports}
    assert len(ports_with_marker) >= 3, "the plain run should show the marker on each pattern"

    # Secured run: the same traffic, captured the same way, never shows it.
    a, b = keydir("a"), keydir("b")
    trust(a, b)
    raw, captured, marker, server = captured_run(tmp_path, procs, make_node, a.path, b.path,
                                                 "curve")
    needle = marker.encode()
    assert len(big_ports(captured, server, len(needle) * 40)) >= 3
    assert needle not in raw, "the marker crossed lo in clear text between secured nodes"
    assert all(needle not in stream for stream in flows(captured).values())
    assert all(b"zf-marker-" not in p.payload for p in captured)


def test_a_per_endpoint_allow_list_admits_only_its_keys(tmp_path, name) -> None:
    """Node-wide, the server trusts both clients; its "billing" service admits only one."""
    dirs = {who: tmp_path / who for who in ("server", "accounting", "web")}
    public = {who: keys.generate(path) for who, path in dirs.items()}
    for who in ("accounting", "web"):
        keys.allow(dirs["server"], public[who], who)
        keys.allow(dirs[who], public["server"], "server")
    billing, open_svc = name("billing"), name("open")
    server = zf.Node(name("srv"), keys=dirs["server"])

    @server.reply(billing, allow=[public["accounting"]])
    def bill(body: object) -> object:
        return {"billed": body}

    @server.reply(open_svc)
    def echo(body: object) -> object:
        return body

    with server, zf.Node(name("acct"), keys=dirs["accounting"]) as acct, \
            zf.Node(name("web"), keys=dirs["web"]) as web:
        server.serve_in_background()
        assert acct.request(billing, 1, timeout=WAIT) == {"billed": 1}
        assert web.request(open_svc, 2, timeout=WAIT) == 2
        with pytest.raises(zf.AuthorizationError, match=billing):
            web.request(billing, 3, timeout=WAIT)
        assert server.counters.get("refused_handshakes") > 0
        assert acct.request(billing, 4, timeout=WAIT) == {"billed": 4}
